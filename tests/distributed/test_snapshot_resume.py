"""A just-in-time snapshot, made deterministic with a failpoint (``launcher/checkpoint/faults.py``):
two ranks under stock torchrun, rank 1 killed as a step begins (as in its forward pass), the same
command run again, the result compared bit for bit (weights, optimizer, history, every metrics
record) with an uninterrupted run. Rank 0 meets the loss in that step's first collective, at a
clean boundary with every step's metrics shared: it writes a snapshot of that step, and the
rerun resumes from it, losing nothing.

Two more instants: rank 1 killed inside its optimizer step (its metrics of the step were
reported before it, ``step_metrics``: rank 0 finishes the step and writes a snapshot of it), and
rank 1 killed as an evaluation begins (a snapshot marking the evaluation pending; the rerun
runs it first). Random kills, ftrun and two "nodes" are in ``tests/chaos/test_snapshot_chaos.py`` and
``scripts/snapshot_trials.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import assert_bit_equal, checkpoint_tensors, child_env, run, tail, train_cmd

from launcher import events
from launcher.checkpoint import faults
from launcher.metrics import read_records

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

STEPS = 24
# Agreement windows of 10 steps (the default), checkpoints every 10 steps and not at epoch ends.
EXTRA = ["--set", f"train.max_steps={STEPS}", "--set", "checkpoint.interval_steps=10", "--set",
         "checkpoint.every_epoch=false", "--set", "train.log_interval=10"]
KEYS = ("model", "optim", "lr_schedule", "lr_control")


def final(run_dir: Path) -> dict:
    return checkpoint_tensors(run_dir / "checkpoints" / f"step_{STEPS:08d}")


def records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in read_records(run_dir)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ref")
    assert run(train_cmd("encoder", tmp / "run", 2, EXTRA), tmp / "log") == 0, tail(tmp / "log")
    return tmp / "run"


def kill_and_rerun(tmp_path: Path, failpoint: str) -> tuple[Path, list[dict], int]:
    """Run with ``failpoint`` (rank 1 dies), then the same command; return the run, the
    survivor's snapshot events and the step the rerun resumed from."""
    run_dir, log = tmp_path / "run", tmp_path / "log"
    code = run(train_cmd("encoder", run_dir, 2, EXTRA), log, env=child_env(**{faults.ENV: failpoint}))
    assert code != 0, f"the failpoint did not fire\n{tail(log)}"
    snapshots = [e for e in events.read(run_dir) if e["kind"] == "snapshot"]
    assert run(train_cmd("encoder", run_dir, 2, EXTRA), tmp_path / "rerun.log") == 0, tail(tmp_path / "rerun.log")
    starts = [e for e in events.read(run_dir) if e["kind"] == "worker_start"]
    return run_dir, snapshots, starts[-1]["step"]


def assert_same_run(reference: Path, run_dir: Path) -> None:
    a, b = final(reference), final(run_dir)
    assert assert_bit_equal(a, b, KEYS) > 10
    assert json.loads(a["progress"])["history"] == json.loads(b["progress"])["history"]
    assert records(run_dir) == records(reference), "metrics.jsonl: every step once, the same values"


def test_a_rank_lost_as_a_step_begins_costs_nothing(reference, tmp_path):
    run_dir, snapshots, resumed = kill_and_rerun(tmp_path, "step_start:13:1")
    (snap,) = snapshots
    assert (snap["rank"], snap["step"], snap["checkpoint"]) == (0, 13, "step_00000013"), snap
    assert resumed == 13, "resumed from the snapshot: no completed step is redone"
    assert "a snapshot by rank 0" in (tmp_path / "rerun.log").read_text()
    assert_same_run(reference, run_dir)


def test_a_rank_lost_in_its_optimizer_step_costs_nothing(reference, tmp_path):
    """Its metrics of the step were on record before its optimizer step (the trainer's early
    report), so the survivor completes the step and writes a snapshot of it."""
    run_dir, snapshots, resumed = kill_and_rerun(tmp_path, "optimizer_step:11:1")  # step 12: no epoch end
    (snap,) = snapshots
    assert (snap["rank"], snap["step"], snap["checkpoint"]) == (0, 12, "step_00000012"), snap
    assert resumed == 12
    assert_same_run(reference, run_dir)


def test_a_rank_lost_during_an_evaluation_costs_nothing(reference, tmp_path):
    """The survivor cannot finish the evaluation alone (it needs every rank), but its state is the
    step's: it writes a snapshot that marks the evaluation pending, and the rerun evaluates before
    its first step, so the history is the uninterrupted run's."""
    run_dir, snapshots, resumed = kill_and_rerun(tmp_path, "evaluation::1")
    (snap,) = snapshots
    assert snap["checkpoint"] == f"step_{snap['step']:08d}", snap
    assert resumed == snap["step"], "resumed from the snapshot of the evaluated step"
    assert f"Running step {resumed}'s evaluation" in (tmp_path / "rerun.log").read_text()
    assert_same_run(reference, run_dir)
