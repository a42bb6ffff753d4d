"""``examples/own_loop.py``, a user's own loop on the public API, killed and preempted at random steps.

* stock torchrun, world size 2: one worker SIGKILLed; the same command run again finishes;
* ftrun, two "nodes" on 127.0.0.1: one worker SIGKILLed (ftrun restarts the job by itself),
  then SIGTERM to every process of both nodes, as a batch system preempting the job: both
  ranks write the checkpoint of the step the job reached and exit 75; the same commands
  started again finish the run.

Every run must end bit-equal to one uninterrupted torchrun run (shared by the tests): model,
AdamW, lr schedule, the script's own ``best`` record, every rank's RNG state, the epoch
history, and the best weights the script wrote itself. The seed of the random moments is
printed; set ``CHAOS_SEED`` to replay one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch
from agent_cluster import Cluster, chaos_rng, steps_done, wait_step
from helpers import (
    PY,
    REPO,
    assert_bit_equal,
    checkpoint_tensors,
    last_logged_step,
    run,
    start,
    stop,
    tail,
    wait_for,
)

from launcher import events, exit_codes
from launcher.checkpoint import files

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(360)]

EXAMPLE = str(REPO / "examples" / "own_loop.py")
ARGS = ["--epochs", "4", "--samples", "512", "--batch-size", "32", "--save-every", "10"]
TOTAL = 4 * ((512 - 512 // 10) // 32)  # 56 steps, 14 per epoch
STEP_WAIT = 150  # seconds for a job to reach a step (start-up or recovery on a loaded machine)


def example(run_dir: Path) -> list[str]:
    return [EXAMPLE, "--run-dir", str(run_dir), *ARGS]


def torchrun(run_dir: Path) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--monitor_interval=0.5",
            *example(run_dir)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run at world size 2."""
    d = tmp_path_factory.mktemp("own-loop-reference")
    assert run(torchrun(d / "run"), d / "log", timeout=240) == 0, tail(d / "log")
    return d / "run"


def assert_same_run(reference: Path, run_dir: Path) -> None:
    name = f"checkpoints/step_{TOTAL:08d}"
    a, b = checkpoint_tensors(reference / name), checkpoint_tensors(run_dir / name)
    compared = assert_bit_equal(a, b, ("model", "optim", "lr_scheduler", "best", "rng"))
    assert compared >= 20
    assert json.loads(a["progress"])["history"] == json.loads(b["progress"])["history"]
    best_a, best_b = (torch.load(d / "best_model.pt", weights_only=True) for d in (reference, run_dir))
    assert best_a.keys() == best_b.keys() and all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, TOTAL + 1)), "metrics.jsonl must read as one run: every step once, in order"


def interrupt(run_dir: Path, log: Path, kill_after: int, r: random.Random) -> int:
    """Start the job, SIGKILL one worker once step ``kill_after`` is logged; return the last logged step."""
    proc = start(torchrun(run_dir), log)
    try:
        wait_for(lambda: last_logged_step(run_dir) >= kill_after or proc.poll() is not None, STEP_WAIT,
                 interval=0.02, what=f"step {kill_after}")
        if proc.poll() is None:
            r.choice(psutil.Process(proc.pid).children()).send_signal(signal.SIGKILL)
            assert proc.wait(timeout=60) != 0, tail(log)
    finally:
        stop(proc)
    return last_logged_step(run_dir)


def test_torchrun_worker_sigkilled_at_a_random_step_resumes_bit_equal(reference, tmp_path):
    r = chaos_rng()
    run_dir = tmp_path / "run"
    for attempt in range(3):  # a fast run can finish between the poll and the kill: try earlier
        shutil.rmtree(run_dir, ignore_errors=True)
        killed_at = interrupt(run_dir, tmp_path / "killed.log", r.randint(3, TOTAL - 12 - 10 * attempt), r)
        if killed_at < TOTAL:
            break
    assert killed_at < TOTAL, f"never interrupted\n{tail(tmp_path / 'killed.log')}"
    assert run(torchrun(run_dir), tmp_path / "resume.log", timeout=240) == 0, tail(tmp_path / "resume.log")
    print(f"\nworker SIGKILLed after step {killed_at}; resumed from step {latest_start_step(run_dir)}")
    assert_same_run(reference, run_dir)


def latest_start_step(run_dir: Path) -> int:
    return [e["step"] for e in events.read(run_dir) if e["kind"] == "worker_start"][-1]


def test_ftrun_two_nodes_worker_sigkilled_then_job_preempted_resume_bit_equal(reference, tmp_path):
    r = chaos_rng()
    run_dir = tmp_path / "run"
    c = Cluster(tmp_path, example(run_dir), nnodes="2", agent_args=["--max_restarts=3", "--backoff-base=0.5"])
    try:
        c.start_node("a")
        c.wait_store()
        c.start_node("b")
        wait_step(run_dir, r.randint(3, 20), STEP_WAIT, c)
        t = time.time()
        victim = r.choice(c.workers(r.choice(["a", "b"])))
        killed_at = steps_done(run_dir)
        victim.send_signal(signal.SIGKILL)
        wait_for(lambda: any(e["kind"] == "worker_start" and e["time"] > t for e in events.read(run_dir)),
                 STEP_WAIT, what=f"ftrun restarting the workers\n{c.tails()}")
        wait_step(run_dir, min(steps_done(run_dir) + r.randint(2, 6), TOTAL - 4), STEP_WAIT, c)

        for proc in c.nodes.values():  # the batch system's preemption: every process of the job
            os.killpg(proc.pid, signal.SIGTERM)
        codes = c.wait_all(timeout=120)
        # ftrun itself exits 128+N when signalled (docs/agent.md), after its workers' checkpoint.
        assert codes == {"a": 128 + signal.SIGTERM, "b": 128 + signal.SIGTERM}, f"{codes}\n{c.tails()}"
        said = "".join(c.log(n).read_text(errors="replace") for n in c.nodes)
        assert said.count(f"exiting with code {exit_codes.PREEMPTED}") == 2, "each rank stops with exit code 75"
    finally:
        c.close()

    preempted = [e for e in events.read(run_dir) if e["kind"] == "preempted"]
    assert len(preempted) == 1, preempted
    step = preempted[0]["step"]
    meta = json.loads((run_dir / "checkpoints" / "meta.json").read_text())
    assert (meta["latest"], meta["step"]) == (f"step_{step:08d}", step), "the checkpoint of the step reached"
    assert files.verify(run_dir / "checkpoints" / meta["latest"]).ok
    assert last_logged_step(run_dir) == step < TOTAL, "no step trained past the preemption checkpoint"

    again = Cluster(tmp_path / "again", example(run_dir), nnodes="2", agent_args=["--max_restarts=3"])
    (tmp_path / "again").mkdir()
    try:
        again.start_node("a")
        again.wait_store()
        again.start_node("b")
        codes = again.wait_all(timeout=240)
        assert codes == {"a": 0, "b": 0}, f"{codes}\n{again.tails()}"
    finally:
        again.close()
    assert latest_start_step(run_dir) == step
    print(f"\nftrun: worker SIGKILLed after step {killed_at}, restarted; job preempted at step {step} "
          f"(exit 75 on both nodes); resumed to step {TOTAL}")
    assert_same_run(reference, run_dir)
