"""Rank 0's observer parts in one process, on run directories written by hand."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from launcher import observers, plots, runfiles, summary


def write_lines(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def fake_run(run_dir: Path, steps: int = 12, spe: int = 4, resumes: tuple[int, ...] = (),
             ranking: bool = True) -> None:
    """Step losses and epoch records; with ``ranking``, recall, NDCG and reward as the recommender reports."""
    recs = []
    for s in range(1, steps + 1):
        recs.append({"step": s, "epoch": (s - 1) // spe + 1, "loss": 1.0 / s, "lr": 0.01, "time": 100.0 + s})
        if s % spe == 0:
            ev = {"step": s, "epoch": s // spe, "train_loss": 1.0 / s, "val_loss": 2.0 / s, "time": 100.0 + s}
            if ranking:
                ev.update({"recall@10": 0.1 * s, "ndcg@10": 0.05 * s, "reward": 1.0 - 0.01 * s})
            recs.append(ev)
    write_lines(run_dir / "metrics.jsonl", recs)
    starts = [{"time": 10.0 * i, "kind": "worker_start", "step": s} for i, s in enumerate((0, *resumes))]
    write_lines(run_dir / "events.jsonl", starts)


def test_resume_points_follow_the_current_lineage(tmp_path):
    # Resumed at 8, then at 12; then --resume best went back to 4: only 4 is on the lineage.
    write_lines(tmp_path / "events.jsonl", [
        {"kind": "worker_start", "step": 0}, {"kind": "worker_start", "step": 8},
        {"kind": "worker_start", "step": 12}, {"kind": "worker_failed", "step": 13},
        {"kind": "worker_start", "step": 4}, {"kind": "worker_start", "step": 4}])
    assert runfiles.resume_points(tmp_path) == [4]


def test_torn_metrics_line_is_skipped(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    assert runfiles.read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]


def test_agent_report_counts_each_restart_once_over_nodes(tmp_path):
    # Two nodes' agents record the same failure and restart; steps 1-10 kept, 1 s each.
    fake_run(tmp_path, steps=10, resumes=(4,))  # worker starts at t=0 and t=10; step s ends at 100 + s
    node = lambda n, **ev: {"node": n, **ev}  # noqa: E731
    with open(tmp_path / "events.jsonl", "a") as f:
        for n in ("a", "b"):
            f.write(json.dumps(node(n, time=11.0, kind="failure", restart_count=0, last_step=6)) + "\n")
            f.write(json.dumps(node(n, time=12.0, kind="restart", restart_count=1, counts=True)) + "\n")
            f.write(json.dumps(node(n, time=15.0, kind="recovered", restart_count=1, steps_lost=2,
                                    recovery_seconds=4.0)) + "\n")
    assert runfiles.agent_report(tmp_path) == {"failures": 1, "restarts": 1, "steps_lost": 2, "downtime_seconds": 4.0}


def test_one_lost_node_is_one_failure_whatever_each_agent_saw(tmp_path):
    fake_run(tmp_path, steps=10, resumes=(4,))
    with open(tmp_path / "events.jsonl", "a") as f:
        # node a's worker lost its peer, then node a lost the store the dead node hosted; node b saw
        # only the store go; the job recovered; later a second, separate failure
        for ev in ({"node": "a", "time": 11.0, "kind": "failure", "restart_count": 1},
                   {"node": "a", "time": 11.1, "kind": "store_lost", "reform": 1},
                   {"node": "b", "time": 11.2, "kind": "store_lost", "reform": 1},
                   {"node": "a", "time": 15.0, "kind": "recovered", "restart_count": 0, "recovery_seconds": 4.0},
                   {"node": "a", "time": 30.0, "kind": "failure", "restart_count": 1}):
            f.write(json.dumps(ev) + "\n")
    assert runfiles.agent_report(tmp_path)["failures"] == 2


def test_no_agent_no_agent_report(tmp_path):
    fake_run(tmp_path, resumes=(4,))
    assert runfiles.agent_report(tmp_path) == {}


def test_summary_final_best_and_checkpoints(tmp_path):
    fake_run(tmp_path, resumes=(4,))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "meta.json").write_text(json.dumps(
        {"latest": "step_00000012", "step": 12, "best": {"name": "step_00000004", "metric": "recall@10",
                                                        "mode": "max", "value": 0.4}}))
    out = summary.build(tmp_path, {"status": "finished", "step": 12, "total_steps": 12, "attempt_seconds": 5.0,
                                   "resumed_at": [4]}, now=110.0)
    assert out["final"]["train"] == {"step": 12, "loss": 1 / 12, "lr": 0.01}
    assert out["final"]["eval"]["recall@10"] == pytest.approx(1.2)
    assert out["best"]["val_loss"] == {"value": 2 / 12, "step": 12, "epoch": 3, "mode": "min"}
    assert out["best"]["recall@10"]["step"] == 12 and out["best"]["recall@10"]["mode"] == "max"
    assert out["best"]["reward"]["step"] == 4  # reward falls over this fake run: its best is early
    assert out["wall_seconds"] == 110.0 and out["attempts"] == 2
    assert out["checkpoints"]["latest"]["path"].endswith("checkpoints/step_00000012")
    assert out["checkpoints"]["best"]["metric"] == "recall@10"
    text = summary.format_text(out)
    assert "wall time 0:01:50 over 2 attempt(s)" in text and "best recall@10: 1.2 at step 12 (max)" in text
    path = summary.write(tmp_path, out)
    assert json.loads(path.read_text()) == out


def test_plot_draws_every_metric_panel(tmp_path):
    import matplotlib.image

    fake_run(tmp_path / "rec", resumes=(4, 8))
    fake_run(tmp_path / "enc", ranking=False)
    rec = matplotlib.image.imread(str(plots.plot_run(tmp_path / "rec")))
    enc = matplotlib.image.imread(str(plots.plot_run(tmp_path / "enc")))
    assert rec.shape[0] > enc.shape[0]  # a third panel for recall, NDCG and reward
    assert (tmp_path / "rec" / "plots" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_of_an_empty_run_dir_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics records to plot"):
        plots.plot_run(tmp_path)


def record(step: int, epoch: int = 1) -> dict:
    return {"step": step, "epoch": epoch, "loss": 0.5, "lr": 1e-3, "time": 1000.0 + step}


def test_plain_progress_lines_when_not_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="launcher.progress")
    shown = observers.ProgressDisplay(total=40, start=12, interval=10, stream=io.StringIO(), terminal=False)
    for s in range(13, 41):
        shown.update(record(s))
    shown.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "launcher.progress"]
    assert [line.split()[1] for line in lines] == ["13/40", "20/40", "30/40", "40/40"]
    assert "steps/s, ETA" in lines[1] and lines[-1].endswith("ETA 0:00:00")


def test_bar_starts_at_the_resumed_step():
    stream = io.StringIO()
    shown = observers.ProgressDisplay(total=40, start=12, interval=10, stream=stream, terminal=True)
    shown.update(record(13))
    shown.close()
    text = stream.getvalue()
    assert "13/40" in text and " 1/40" not in text and "loss=0.5000" in text


def test_tensorboard_purges_what_a_crashed_attempt_logged(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    def attempt(start: int, stop: int, value: float) -> None:
        tb = observers.TensorBoardLog(tmp_path, start)
        for s in range(start + 1, stop + 1):
            tb.step({"step": s, "loss": value, "time": 0.0})
        tb.close()

    attempt(0, 3, 9.0)  # died before its first checkpoint: a fresh start drops all of it
    attempt(0, 8, 1.0)  # crashed after step 8; its checkpoint was step 5
    attempt(5, 10, 2.0)
    tb = observers.TensorBoardLog(tmp_path, 10)
    tb.step({"step": 11, "loss": 0.5, "lr": 0.01, "reward": -0.4, "phase": 1.0, "time": 0.0})
    tb.evaluation({"step": 11, "epoch": 2, "train_loss": 0.6, "val_loss": 0.7, "recall@10": 0.2, "ndcg@10": 0.1,
                   "time": 0.0})
    tb.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    seen = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert seen == [(s, 1.0) for s in range(1, 6)] + [(s, 2.0) for s in range(6, 11)] + [(11, 0.5)]
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr", "train/reward", "train/phase", "train/epoch_loss",
                                          "val/loss", "eval/recall@10", "eval/ndcg@10"}


def test_ckpt_plot_subcommand(tmp_path, capsys):
    from launcher import ckpt

    fake_run(tmp_path / "run", resumes=(4,))
    assert ckpt.main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"
    assert ckpt.main(["plot", str(tmp_path / "empty")]) == 2
    assert "no metrics records to plot" in capsys.readouterr().err
