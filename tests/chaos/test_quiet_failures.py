"""What a user sees when a worker dies under ftrun, and when a finished run is run again.

One job (``ftrun --standalone``, 2 workers) loses worker rank 1 to SIGKILL mid-run. Its console
must tell the story in plain lines (the survivor lost its peer, ftrun restarts the job, it ends)
with no traceback and no C++ stack, name the user's script, and show one goodput figure
(ftrun's box = the run summary = ``summary.json``). Then the same command, stock torchrun's and
plain python's are run again on the finished run: each says so in one line, exits 0 and leaves
every byte of the run directory as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from pathlib import Path

import pytest
from helpers import PY, RUN, child_env, config_path, last_logged_step, run, start, stop, tail, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

STEPS = 30
FAST = ["--set", "data.synthetic_length=1024", "--set", "data.window=16", "--set", "data.batch_size=16",
        "--set", "model.d_model=16", "--set", "model.n_layers=1", "--set", "model.ff_dim=32",
        "--set", f"train.max_steps={STEPS}", "--set", "checkpoint.interval_steps=5", "--set", "train.log_interval=5"]


def script_args(run_dir: Path) -> list[str]:
    return [RUN, "--config", config_path("encoder"), "--run-dir", str(run_dir), *FAST]


def ftrun_cmd(run_dir: Path) -> list[str]:
    return [PY, "-m", "launcher", "--standalone", "--nproc_per_node=2", "--monitor_interval=0.5",
            *script_args(run_dir)]


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file under ``run_dir`` and its content digest."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def worker_pid(run_dir: Path, rank: int) -> int | None:
    try:
        return json.loads((run_dir / "ftrun" / "progress" / f"rank{rank}.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[Path, str]:
    """The run directory and the console output of the job whose worker rank 1 was killed."""
    run_dir = tmp_path_factory.mktemp("quiet") / "run"
    log = run_dir.parent / "console.log"
    proc = start(ftrun_cmd(run_dir), log)
    try:
        wait_for(lambda: last_logged_step(run_dir) >= 8 and worker_pid(run_dir, 1) or proc.poll() is not None,
                 timeout=150, interval=0.1, what="step 8")
        assert proc.poll() is None, tail(log)
        os.kill(worker_pid(run_dir, 1), signal.SIGKILL)
        proc.wait(timeout=200)
    finally:
        stop(proc)
    assert proc.returncode == 0, tail(log, 200)
    return run_dir, log.read_text(errors="replace")


def test_an_expected_worker_failure_reads_as_plain_lines(job):
    run_dir, console = job
    assert "Traceback" not in console and "frame #" not in console, console
    assert re.search(r"\[rank0\] ERROR launcher: Lost contact with the rest of the job at step \d+: another "
                     r"process or node stopped \(.+\); (?:wrote a snapshot of step \d+ in [\d.]+ s; )?the launcher "
                     r"restarts the job from the latest verified "
                     r"checkpoint \(step \d+\)", console), console
    assert "ftrun: worker rank " in console and "restarting the job from its latest verified checkpoint" in console
    assert f"starting workers for {RUN} " in console and "run_script_path" not in console, console
    # the detail is in the files the one-liners point at
    assert "Traceback" in (run_dir / "logs" / "rank0.log").read_text()
    assert "Traceback" in (run_dir / "logs" / "ftrun.log").read_text()


def test_one_goodput_figure(job):
    run_dir, console = job
    figures = set(re.findall(r"goodput\s+(\d+\.\d) %", console))
    saved = json.loads((run_dir / "summary.json").read_text())["goodput"]
    assert figures == {f"{100 * saved:.1f}"}, (figures, saved)  # the run summary and ftrun's box


def test_rerunning_the_finished_run_says_so_and_changes_nothing(job, tmp_path):
    run_dir, _ = job
    before = snapshot(run_dir)
    commands = {
        "ftrun": ftrun_cmd(run_dir),
        "torchrun": [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *script_args(run_dir)],
        "python": [PY, *script_args(run_dir)],
    }
    for name, cmd in commands.items():
        log = tmp_path / f"{name}.log"
        assert run(cmd, log, timeout=120, env=child_env()) == 0, tail(log)
        out = log.read_text()
        assert f"Run already finished at step {STEPS} (checkpoint {run_dir / 'checkpoints'}" in out, out
        assert "--set train.max_steps=" in out and "another --run-dir" in out, out
        assert "goodput" not in out and "Training finished" not in out, out
        assert snapshot(run_dir) == before, f"{name} changed the run directory"
