"""Ctrl-C (SIGINT to the whole process group, as a terminal sends it) under python, torchrun and ftrun.

Each ends with one line, ``Interrupted at step N; latest verified checkpoint step M; run the
same command to resume``, where M is the checkpoint ``meta.json`` names, and no worker traceback.
python and ftrun exit 130. Stock torchrun is not ours: after the workers' line it prints its own
``SignalException`` traceback and exits 1 (torch's ``launch_agent`` re-raises the signal).
"""

from __future__ import annotations

import json
import re
import signal

import pytest
from helpers import PY, RUN, config_path, last_logged_step, start, stop, tail, wait_for

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

FAST = ["--set", "data.synthetic_length=1024", "--set", "data.window=16", "--set", "data.batch_size=16",
        "--set", "model.d_model=16", "--set", "model.n_layers=1", "--set", "model.ff_dim=32",
        "--set", "train.max_steps=100000", "--set", "checkpoint.interval_steps=3", "--set", "train.log_interval=5"]
LAUNCH = {
    "python": [PY],
    "torchrun": [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--monitor_interval=0.5"],
    "ftrun": [PY, "-m", "launcher", "--standalone", "--nproc_per_node=2", "--monitor_interval=0.5"],
}
LINE = re.compile(r"Interrupted at step (\d+); latest verified checkpoint step (\d+); run the same command to resume$")


@pytest.mark.parametrize("launcher", list(LAUNCH))
def test_ctrl_c_ends_with_one_line(tmp_path, launcher):
    run_dir, log = tmp_path / "run", tmp_path / "console.log"
    proc = start([*LAUNCH[launcher], RUN, "--config", config_path("encoder"), "--run-dir", str(run_dir), *FAST], log)
    try:
        wait_for(lambda: last_logged_step(run_dir) >= 7 or proc.poll() is not None, timeout=150, what="step 7")
        assert proc.poll() is None, tail(log)
        stop(proc, signal.SIGINT, timeout=90)
    finally:
        stop(proc)
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    found = [m for m in map(LINE.search, lines) if m]
    assert len(found) == 1, "\n".join(lines[-40:])
    step, checkpoint = map(int, found[0].groups())
    meta = json.loads((run_dir / "checkpoints" / "meta.json").read_text())
    assert checkpoint == meta["step"] and 0 < checkpoint <= step, (found[0].group(0), meta)
    if launcher == "torchrun":
        assert sum("Traceback" in ln for ln in lines) == 1 and "SignalException" in lines[-1], "\n".join(lines[-40:])
    else:
        assert proc.returncode == 130, tail(log)
        assert not any("Traceback" in ln for ln in lines), "\n".join(lines[-40:])
        assert LINE.search(lines[-1]), "the interrupted line is not the last one:\n" + "\n".join(lines[-10:])
    events = [json.loads(ln) for ln in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events[-1]["kind"] == "run_end" and events[-1]["status"] == "interrupted"
