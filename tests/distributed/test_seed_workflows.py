"""The seeds' workflows end to end, with the real command line: packages, set-lr, extending a run,
early stopping, staged training (--init-from) and milestones, on small runs of both trainers.

Two short runs (one per trainer) are shared by the module; every test works on a copy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import PY, REPO, checkpoint_tensors, run, tail, train_cmd

from launcher.checkpoint import files
from launcher.checkpoint.record import read_record
from trainers.recommender.data import TEST, load_tasks
from trainers.recommender.model import recall_ndcg

pytestmark = pytest.mark.distributed


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def lrs(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in metrics(run_dir) if "lr" in r}


def ckpt_tool(*args: str, log: Path) -> int:
    return run([PY, "-m", "launcher.ckpt", *map(str, args)], log, timeout=120)


def train(trainer: str, run_dir: Path, log: Path, *extra: str, expect: int = 0) -> str:
    code = run(train_cmd(trainer, run_dir, 1, list(extra)), log)
    assert code == expect, tail(log)
    return log.read_text()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("workflows")
    out = {}
    for trainer in ("encoder", "recommender"):
        out[trainer] = base / trainer
        train(trainer, out[trainer], base / f"{trainer}.log")
    return out


def copy_run(runs, trainer: str, tmp_path: Path) -> Path:
    dest = tmp_path / f"{trainer}-copy"
    shutil.copytree(runs[trainer], dest)
    return dest


def best_checkpoint(run_dir: Path) -> Path:
    best = json.loads((run_dir / "checkpoints" / "meta.json").read_text())["best"]["name"]
    return run_dir / "checkpoints" / best


# ---------------------------------------------------------------- packages

def test_encoder_package_reproduces_the_evaluation_on_raw_data(runs, tmp_path):
    from launcher.package import load_package
    from trainers.encoder.data import make_windows, synthetic_series
    from trainers.encoder.model import span_masks

    source = best_checkpoint(runs["encoder"])
    assert ckpt_tool("package", source, tmp_path / "pkg", log=tmp_path / "log") == 0, tail(tmp_path / "log")
    pkg = load_package(tmp_path / "pkg")
    info = read_record(source)
    assert not pkg.model.training and pkg.info["step"] == info.step and pkg.info["metrics"] == info.metrics
    assert {"torch", "safetensors", "python"} <= set(pkg.info["versions"])
    assert len(pkg.info["normalization"]["mean"]) == pkg.config.data.synthetic_channels
    weights = checkpoint_tensors(source)["model"]
    from safetensors.torch import load_file
    packed = load_file(str(tmp_path / "pkg" / "model.safetensors"))
    assert packed.keys() == weights.keys() and not any(k.startswith("module.") for k in packed)
    assert all(torch.equal(packed[k], weights[k]) for k in packed)

    # The raw validation windows, reconstructed by the package, score what the trainer measured.
    d, seed = pkg.config.data, pkg.config.train.seed
    series = synthetic_series(d.synthetic_length, d.synthetic_channels, seed)
    raw = torch.from_numpy(make_windows(series[int(len(series) * (1 - d.val_fraction)):], d.window, d.stride))
    mask = span_masks(len(raw), d.window, d.mask_span, torch.Generator().manual_seed(seed + 7))
    out = pkg.reconstruct(raw, mask)
    err = ((pkg.normalize(out) - pkg.normalize(raw)) ** 2).mean(-1)
    assert float((err * mask).sum() / mask.sum()) == pytest.approx(info.metrics["val_loss"], rel=1e-6)
    hidden = torch.where(mask[..., None], float("nan"), raw)
    assert torch.equal(pkg.reconstruct(hidden, mask), out)  # hidden values are never read
    with pytest.raises(ValueError, match=r"expected a window of shape \[16, 8\]"):
        pkg.reconstruct(raw[:, :10], mask[:, :10])
    assert ckpt_tool("package", source, tmp_path / "pkg", log=tmp_path / "log2") == 2  # no silent overwrite


def test_recommender_package_recommends_what_evaluation_scored(runs, tmp_path):
    from launcher.package import load_package

    source = best_checkpoint(runs["recommender"])
    assert ckpt_tool("package", source, tmp_path / "pkg", log=tmp_path / "log") == 0, tail(tmp_path / "log")
    pkg = load_package(tmp_path / "pkg")
    info = read_record(source)
    tasks = load_tasks(runs["recommender"] / "tasks")
    q = pkg.config.data.query_size
    users = [tasks.histories[t] for t in tasks.of(TEST)]
    names = lambda items: [tasks.item_ids[i] for i in items]  # noqa: E731  (raw ids, as a user has them)
    top = pkg.recommend_many([names(h[:-q]) for h in users], k=10)
    index = {name: i for i, name in enumerate(tasks.item_ids)}
    recall, ndcg = recall_ndcg([[index[n] for n in row] for row in top], [h[-q:] for h in users], 10)
    assert recall / len(users) == pytest.approx(info.metrics["test_recall@10"], rel=1e-9)
    assert ndcg / len(users) == pytest.approx(info.metrics["test_ndcg@10"], rel=1e-9)
    assert pkg.recommend(names(users[0][:-q])) == top[0] and not set(top[0]) & set(names(users[0][:-q]))
    with pytest.raises(KeyError, match="unknown item id"):
        pkg.recommend(["no such item"])


# ---------------------------------------------------------------- set-lr, extension

# The precedence for both trainers, case by case: tests/unit/test_workflow_rules.py. Here: the tool
# and a resume through the command line, for the trainer with two optimizers.
@pytest.mark.parametrize("trainer,expected", [("recommender", 5e-4)])
def test_set_lr_checkpoint_takes_effect_on_resume_without_flags(runs, trainer, expected, tmp_path):
    run_dir = copy_run(runs, trainer, tmp_path)
    source = run_dir / "checkpoints" / "step_00000024"
    assert ckpt_tool("set-lr", source, expected, "--optimizer", "model", log=tmp_path / "tool.log") == 0
    edited = run_dir / "checkpoints" / f"step_00000024-model-lr{expected:g}"
    assert files.verify(edited).ok and "resume with: --resume" in (tmp_path / "tool.log").read_text()
    log = train(trainer, run_dir, tmp_path / "resume.log", "--resume", str(edited), "--set", "train.max_steps=26")
    assert "the set-lr value in the checkpoint wins" in log
    assert lrs(run_dir)[25] == pytest.approx(expected, rel=1e-12)  # the step after the checkpoint


def test_extending_a_run_keeps_the_lr_continuous_unless_restarted(runs, tmp_path):
    run_dir = copy_run(runs, "encoder", tmp_path)
    original = lrs(run_dir)
    start = run_dir / "checkpoints" / "step_00000020"
    log = train("encoder", run_dir, tmp_path / "longer.log", "--resume", str(start), "--set", "train.max_steps=40")
    assert "what was left of the cosine is stretched from step 20" in log
    lr = lrs(run_dir)
    assert lr[21] == pytest.approx(original[21], rel=1e-12)  # the step after the extension: no jump
    later = [lr[s] for s in range(21, 41)]
    assert all(b <= a for a, b in zip(later, later[1:], strict=False))
    assert max(a - b for a, b in zip(later, later[1:], strict=False)) < 0.1 * later[0]
    assert later[-1] == pytest.approx(0.003 * 0.1, rel=0.01)  # still ends near min_lr_ratio * lr

    restarted = copy_run(runs, "encoder", tmp_path / "r")
    start = restarted / "checkpoints" / "step_00000020"
    log = train("encoder", restarted, tmp_path / "restart.log", "--resume", str(start), "--set",
                "train.max_steps=22", "--restart-schedule")
    assert "lr schedule restarted at step 20" in log
    assert lrs(restarted)[21] == pytest.approx(0.003 / 10)  # a new warmup, by choice


# ---------------------------------------------------------------- early stopping, timeouts

def test_early_stopping_ends_with_a_checkpoint_and_a_rerun_says_so(tmp_path):
    run_dir = tmp_path / "run"
    cmd = ["--set", "train.early_stop_patience=1", "--set", "train.early_stop_min_delta=100",
           "--set", "dist.timeout_s=1234"]
    log = train("encoder", run_dir, tmp_path / "first.log", *cmd)
    assert "collective timeout 1234 s" in log
    assert "Stopped early at step 14 of 24: val_loss has not improved by more than 100" in log
    final = read_record(run_dir / "checkpoints" / "step_00000014")
    assert final.reason == "early stop"
    between = read_record(run_dir / "checkpoints" / "step_00000010")  # an interval checkpoint
    assert between.metrics == {} and between.last_eval["step"] == 7 and "val_loss" in between.last_eval
    steps = [r["step"] for r in metrics(run_dir)]
    log = train("encoder", run_dir, tmp_path / "again.log", *cmd)
    assert "This run stopped early at step 14 of 24" in log and "Nothing to train" in log
    assert [r["step"] for r in metrics(run_dir)] == steps
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "stopped early"


# ---------------------------------------------------------------- staged training, milestones

def adam_steps(checkpoint: Path) -> set[float]:
    state = checkpoint_tensors(checkpoint)["optim"]["state"]
    return {float(s["step"]) for s in state.values()}


def test_staged_recommender_carries_its_task_set_and_keeps_the_phase_boundary(runs, tmp_path):
    stage1 = runs["recommender"]
    boundary = stage1 / "checkpoints" / "step_00000012"  # meta.steps=12 in the fast config
    assert read_record(boundary).milestone == "end of meta-learning"  # kept although keep_last=3

    stage2 = tmp_path / "stage2"
    cmd = ["--init-from", str(stage1), "--set", "meta.steps=0", "--set", "train.max_steps=5"]
    log = train("recommender", stage2, tmp_path / "stage2.log", *cmd)
    assert f"Task set carried from {stage1 / 'tasks'}" in log and "Initialised from" in log
    assert (stage2 / "tasks" / "tasks.npz").read_bytes() == (stage1 / "tasks" / "tasks.npz").read_bytes()
    last = stage2 / "checkpoints" / "step_00000005"
    assert read_record(last).init_from == str(stage1 / "checkpoints" / "step_00000024")
    assert adam_steps(last) == {5.0}  # weights only: a fresh optimizer
    log = train("recommender", stage2, tmp_path / "again.log", *cmd)  # the same command again: done
    assert "Run already finished at step 5" in log and "Initialised from" not in log
    longer = [*cmd[:-1], "train.max_steps=6"]  # a longer target resumes this run, not the init source
    log = train("recommender", stage2, tmp_path / "longer.log", *longer)
    assert "not used, this run already has a checkpoint" in log and "Initialised from" not in log
    assert adam_steps(stage2 / "checkpoints" / "step_00000006") == {6.0}
    # (carrying, rebuilding and a missing task set: tests/unit/test_workflow_rules.py)


def test_init_from_with_optimizer_continues_its_state_on_a_new_schedule(runs, tmp_path):
    new = tmp_path / "stage2"
    log = train("encoder", new, tmp_path / "log", "--init-from", str(runs["encoder"] / "checkpoints"
                                                                       / "step_00000024"),
                "--init-optimizer", "--set", "train.max_steps=1")
    assert "weights and optimizer state" in log and "this run starts at step 0" in log
    assert adam_steps(new / "checkpoints" / "step_00000001") == {25.0}  # AdamW's count goes on
    assert lrs(new)[1] == pytest.approx(0.003 / 10)  # the new run's own warmup
    code = run([PY, str(REPO / "launcher" / "run.py"), "--config", str(REPO / "configs" / "encoder.yaml"),
                "--run-dir", str(tmp_path / "x"), "--init-optimizer"], tmp_path / "bad.log", timeout=60)
    assert code == 2 and "--init-optimizer needs --init-from" in (tmp_path / "bad.log").read_text()
