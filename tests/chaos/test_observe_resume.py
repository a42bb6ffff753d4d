"""A run killed mid-way and resumed reads as one run: TensorBoard, metrics.jsonl, plot, summary.

TensorBoard's event files are read back with TensorBoard's own reader (EventAccumulator),
which applies the ``purge_step`` marker the resumed attempt wrote, exactly as the
TensorBoard UI does.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from helpers import latest_step, run, start, stop, tail, train_cmd, wait_for
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from launcher.metrics import read_records

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

STEPS = 30
# An epoch is 7 steps: checkpoints at epoch ends only, so the killed attempt has time to log
# steps past its last checkpoint, and every checkpoint carries val_loss (for the best one).
EXTRA = ["--set", f"train.max_steps={STEPS}", "--set", "checkpoint.interval_steps=0"]


def raw_steps(tb_dir: Path, tag: str) -> list[int]:
    """Every step logged for ``tag`` in every event file, purged or not, in file order."""
    steps = []
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def logged_past_checkpoint(run_dir: Path) -> bool:
    """The running attempt has flushed TensorBoard steps beyond its newest checkpoint."""
    saved = latest_step(run_dir)
    tb = run_dir / "tensorboard"
    return saved >= 7 and tb.is_dir() and max(raw_steps(tb, "train/loss"), default=0) >= saved + 2


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("observe") / "run"
    log = run_dir.parent / "train.log"
    cmd = train_cmd("encoder", run_dir, extra=EXTRA)
    proc = start(cmd, log)
    try:
        wait_for(lambda: logged_past_checkpoint(run_dir) or proc.poll() is not None, timeout=120,
                 interval=0.05, what="TensorBoard steps past a checkpoint")
    finally:
        stop(proc, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, f"the first attempt was not killed mid-run:\n{tail(log)}"
    assert run(cmd, log, timeout=150) == 0, tail(log)
    return run_dir


def test_tensorboard_curves_continue_without_duplicates(resumed_run):
    tb = resumed_run / "tensorboard"
    resumed = [json.loads(line)["step"] for line in (resumed_run / "events.jsonl").read_text().splitlines()
               if json.loads(line)["kind"] == "worker_start"]
    assert resumed[0] == 0 and len(resumed) == 2, resumed
    # The killed attempt logged steps past the checkpoint that the resumed one logged again.
    raw = raw_steps(tb, "train/loss")
    assert len(raw) > len(set(raw)) and max(raw) == STEPS

    acc = event_accumulator.EventAccumulator(str(tb), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    records = read_records(resumed_run)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "train_loss" in r]
    for tag, key, expected in [("train/loss", "loss", steps), ("train/lr", "lr", steps),
                               ("val/loss", "val_loss", evals), ("train/epoch_loss", "train_loss", evals)]:
        seen = acc.Scalars(tag)
        assert [e.step for e in seen] == [r["step"] for r in expected], tag
        assert [e.value for e in seen] == pytest.approx([r[key] for r in expected], rel=1e-6), tag
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals] == [7, 14, 21, 28]

    restarts = acc.Scalars("run/restarts")
    assert [(e.step, e.value) for e in restarts] == [(1, 0.0), (resumed[1] + 1, 1.0)]
    saves = [e.step for e in acc.Scalars("perf/checkpoint_save_seconds")]
    assert saves == sorted(set(saves)) and saves[-1] == STEPS
    throughput = acc.Scalars("perf/steps_per_sec")
    assert throughput and all(e.value > 0 for e in throughput)


def test_plot_is_a_png_of_the_whole_history(resumed_run):
    import matplotlib.image

    png = resumed_run / "plots" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(str(png))
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600
    assert pixels.std() > 0.05  # drawn, not blank


def test_summary_describes_the_whole_run(resumed_run):
    summary = json.loads((resumed_run / "summary.json").read_text())
    meta = json.loads((resumed_run / "checkpoints" / "meta.json").read_text())
    records = read_records(resumed_run)
    val = [(r["val_loss"], r["step"]) for r in records if "val_loss" in r]
    assert summary["status"] == "finished" and summary["step"] == STEPS == summary["total_steps"]
    assert summary["attempts"] == 2 and len(summary["resumed_at"]) == 1
    assert summary["final"]["train"]["step"] == STEPS
    assert summary["final"]["train"]["loss"] == [r["loss"] for r in records if "loss" in r][-1]
    assert (summary["best"]["val_loss"]["value"], summary["best"]["val_loss"]["step"]) == min(val)
    assert summary["wall_seconds"] >= summary["attempt_seconds"] > 0
    ck = summary["checkpoints"]
    assert Path(ck["latest"]["path"]).name == meta["latest"] == f"step_{STEPS:08d}"
    assert Path(ck["best"]["path"]).name == meta["best"]["name"] and Path(ck["best"]["path"]).is_dir()
