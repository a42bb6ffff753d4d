"""A preemption signal sent to every process of an ftrun job (as SLURM does to a job step, or
``kill -- -PGID``) must still end in a checkpoint at the step reached: the warm-start fork server
ignores the signal and each worker catches it."""

from __future__ import annotations

import json
import os
import signal

import pytest
from helpers import FAST, PY, RUN, config_path, last_logged_step, start, stop, tail, wait_for

from launcher import events

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]



@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_to_the_whole_process_group_checkpoints_the_step_reached(tmp_path, sig):
    run_dir, log = tmp_path / "run", tmp_path / "ftrun.log"
    cmd = [PY, "-m", "launcher", "--standalone", "--nproc_per_node=2", "--monitor_interval=0.2",
           RUN, "--config", config_path("encoder"), "--run-dir", str(run_dir), *FAST["encoder"],
           "--set", "train.max_steps=500"]
    proc = start(cmd, log)
    try:
        wait_for(lambda: last_logged_step(run_dir) >= 3 or proc.poll() is not None, 150, what="step 3")
        assert proc.poll() is None, tail(log)
        os.killpg(proc.pid, sig)  # the agent, the fork server and both workers
        proc.wait(timeout=90)
    finally:
        stop(proc)
    text = log.read_text()
    assert text.count("exiting with code 75") == 2, tail(log)
    meta = json.loads((run_dir / "checkpoints" / "meta.json").read_text())
    assert meta["step"] == last_logged_step(run_dir) < 500, "the checkpoint is not at the step reached"
    assert [e["step"] for e in events.read(run_dir) if e["kind"] == "preempted"] == [meta["step"]]
