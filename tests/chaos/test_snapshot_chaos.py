"""Lose at most one step per failure, in the topologies of issue 11's targets: two ``ftrun`` "nodes"
on 127.0.0.1, a checkpoint every 20 steps, a failure at a random step between two
of them. Each case asserts that the job recovers by itself, that it resumed from the step the
survivors held (their ``snapshot`` events), and that the final weights, optimizer state, history
and every ``metrics.jsonl`` record equal those of an uninterrupted run of the same world size.

* 2 nodes x 2 workers (world size 4), c10d rendezvous, encoder: node 1 lost whole (agent and
  both workers), a replacement started 2 s later with the same command.
* 2 nodes x 1 worker, static rendezvous (``--master_addr/--master_port/--node_rank``),
  recommender: one worker SIGKILLed (its meta-learning phase, with the
  reward's collective after the gradients', runs through step 30).

Our trainers report a step's metrics before its last collective (``step_metrics``), so a rank
killed anywhere in a step leaves the survivors what their snapshot needs. The one instant
without a snapshot is a rank lost during an epoch-end evaluation (its result belongs to the
history and needs every rank, ``docs/failures.md``): the job then resumes from the latest
periodic checkpoint. The cases accept exactly that, and nothing else, as the alternative;
``scripts/snapshot_trials.py`` counts how often a random kill costs more than one step.
The seed of the random moments is printed; ``CHAOS_SEED`` replays one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from agent_cluster import CHAOS_ARGS, Cluster, chaos_rng, signal_proc, steps_done, wait_step
from helpers import FAST, PY, RUN, assert_bit_equal, checkpoint_tensors, config_path, run, tail

from launcher import events
from launcher.metrics import read_records

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

STEPS, INTERVAL = 60, 20
WINDOW = "evaluation"  # the one documented reason for no snapshot here ("the failure came during step N's ...")
KEYS = ("model", "optim", "lr_schedule", "lr_control", "task_scheduler", "moving_avg_reward")


def script(trainer: str, run_dir: Path) -> list[str]:
    own = CHAOS_ARGS if trainer == "encoder" else ["--set", "meta.steps=30", "--set", "train.eval_every_epoch=false",
                                                   "--set", "train.log_interval=10"]
    return [RUN, "--config", config_path(trainer), "--run-dir", str(run_dir), *FAST[trainer], *own,
            "--set", f"train.max_steps={STEPS}", "--set", f"checkpoint.interval_steps={INTERVAL}",
            "--set", "checkpoint.every_epoch=false"]


def final(run_dir: Path) -> dict:
    return checkpoint_tensors(run_dir / "checkpoints" / f"step_{STEPS:08d}")


def records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in read_records(run_dir)]


def reference(tmp: Path, trainer: str, nproc: int) -> Path:
    run_dir = tmp / "run"
    cmd = [PY, "-m", "launcher", "--standalone", f"--nproc_per_node={nproc}", "--max_restarts=0",
           *script(trainer, run_dir)]
    assert run(cmd, tmp / "log", timeout=240) == 0, tail(tmp / "log")
    return run_dir


@pytest.fixture(scope="module")
def reference_encoder_w4(tmp_path_factory) -> Path:
    return reference(tmp_path_factory.mktemp("ref-enc4"), "encoder", 4)


@pytest.fixture(scope="module")
def reference_recommender_w2(tmp_path_factory) -> Path:
    return reference(tmp_path_factory.mktemp("ref-rec2"), "recommender", 2)


def check(run_dir: Path, ref: Path, struck: float, seen: int) -> None:
    """The resume point against the step the survivors held; then the whole run against the reference."""
    evs = events.read(run_dir)
    snaps = [e for e in evs if e["kind"] == "snapshot" and e["time"] >= struck]
    start = next(e for e in evs if e["kind"] == "worker_start" and e["time"] > struck)
    assert snaps, f"no survivor reported on a snapshot: {evs}"
    held = max(e["step"] for e in snaps)
    assert held >= seen, f"the survivors held step {held}, but step {seen} was logged before the failure"
    lost = held - start["step"]
    print(f"failure after step {seen}: survivors held step {held}, resumed from step {start['step']} "
          f"({start['checkpoint']}); snapshots: {[(e['rank'], e['note']) for e in snaps]}")
    if lost > 1:  # the one documented case: a rank lost during an evaluation
        assert all(WINDOW in e["note"] for e in snaps), snaps
        assert start["checkpoint"] and not start["snapshot"], start  # the latest periodic one (or a milestone)
    else:
        assert start["snapshot"] and lost == 0, start
    a, b = final(ref), final(run_dir)
    assert assert_bit_equal(a, b, KEYS) > 10
    assert json.loads(a["progress"])["history"] == json.loads(b["progress"])["history"]
    assert records(run_dir) == records(ref), "metrics.jsonl: every step once, with the reference's values"


def test_node_lost_2_nodes_x_2_workers_resumes_from_the_survivors_snapshot(tmp_path, reference_encoder_w4):
    r = chaos_rng()
    run_dir = tmp_path / "run"
    c = Cluster(tmp_path, script("encoder", run_dir), nproc=2, agent_args=["--max_restarts=3", "--hang-timeout=60"])
    try:
        c.start_node("n0")
        c.wait_store()
        c.start_node("n1")
        wait_step(run_dir, r.randint(INTERVAL + 1, 2 * INTERVAL - 3), 150, c)
        struck, seen = time.time(), steps_done(run_dir)
        c.kill_node("n1")
        time.sleep(2.0)
        c.start_node("n1b")
        codes = c.wait_all(timeout=240)
        assert codes["n0"] == 0 and codes["n1b"] == 0, f"{codes}\n{c.tails()}"
    finally:
        c.close()
    check(run_dir, reference_encoder_w4, struck, seen)


def test_worker_killed_2x1_static_rendezvous_resumes_from_the_survivors_snapshot(tmp_path, reference_recommender_w2):
    r = chaos_rng()
    run_dir = tmp_path / "run"
    c = Cluster(tmp_path, script("recommender", run_dir), rdzv="static",
                agent_args=["--max_restarts=3", "--hang-timeout=60"])
    try:
        c.start_node("n0", node_rank=0)
        c.wait_store()
        c.start_node("n1", node_rank=1)
        wait_step(run_dir, r.randint(INTERVAL + 1, 2 * INTERVAL - 3), 150, c)
        struck, seen = time.time(), steps_done(run_dir)
        signal_proc(r.choice(c.workers(r.choice(["n0", "n1"]))), 9)
        codes = c.wait_all(timeout=240)
        assert codes == {"n0": 0, "n1": 0}, f"{codes}\n{c.tails()}"
    finally:
        c.close()
    check(run_dir, reference_recommender_w2, struck, seen)
