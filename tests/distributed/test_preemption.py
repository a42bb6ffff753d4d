"""Preemption of whole runs: signal -> the step is finished -> verified checkpoint -> exit 75,
then a resume that ends bit-for-bit where an unsignalled run ends.

* one process, in this pytest process, with SIGTERM and SIGUSR1 delivered at every instant of
  the preemption save (the failpoints of ``launcher/checkpoint/faults.py``): nothing is corrupted;
* two ranks under stock torchrun, SIGUSR1 sent to one worker only: both ranks checkpoint at
  the same step, the step the job had reached, and exit 75.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import (
    FAST,
    assert_bit_equal,
    checkpoint_tensors,
    child_env,
    config_path,
    run,
    start,
    stop,
    tail,
    train_cmd,
    wait_for,
)

from launcher import events, exit_codes
from launcher import run as run_cli
from launcher.checkpoint import faults, files

pytestmark = pytest.mark.distributed

CATCHABLE = (signal.SIGTERM, signal.SIGUSR1)


def metrics_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError):
            continue
    return out


def final(run_dir: Path, step: int) -> dict:
    return checkpoint_tensors(run_dir / "checkpoints" / f"step_{step:08d}")


@pytest.fixture
def single_process(monkeypatch):
    """This pytest process as a lone worker: no launcher variables; pytest's handlers restored after."""
    for key in list(os.environ):
        if key.startswith(("SLURM_", "TORCHELASTIC_", "FTRUN_", "FTLAUNCH_")) or key in (
                "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    saved = {s: signal.getsignal(s) for s in CATCHABLE}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def train_here(run_dir: Path, max_steps: int = 12) -> int:
    return run_cli.main(["--config", config_path("encoder"), "--run-dir", str(run_dir), *FAST["encoder"],
                         "--set", f"train.max_steps={max_steps}"])


def test_signals_at_every_instant_of_the_save_corrupt_nothing(tmp_path, monkeypatch, single_process):
    """SIGUSR1 during the step-5 interval save starts a preemption; SIGTERM and SIGUSR1 then
    arrive at every instant of the preemption save. The run must still exit 75 with a verified
    checkpoint at the step it reached, published in meta.json, and resume to the same weights
    as a run that was never signalled."""
    clean, signalled = tmp_path / "clean", tmp_path / "signalled"
    assert train_here(clean) == exit_codes.OK

    sent: list[tuple[str, int]] = []

    def signal_myself(point: str, step: int, rank: int) -> None:
        if step == 5 and not sent:
            sent.append((point, step))
            os.kill(os.getpid(), signal.SIGUSR1)
        elif step > 5:
            for s in CATCHABLE:
                sent.append((point, step))
                os.kill(os.getpid(), s)

    monkeypatch.setattr(faults, "hit", signal_myself)
    assert train_here(signalled) == exit_codes.PREEMPTED
    monkeypatch.setattr(faults, "hit", lambda *a: None)

    preempted = [e for e in events.read(signalled) if e["kind"] == "preempted"]
    assert [e["step"] for e in preempted] == [6], preempted  # the step after the one signalled in
    assert {p for p, s in sent if s == 6} >= {"after_dcp_save", "after_manifest", "after_rename", "after_meta"}
    meta = json.loads((signalled / "checkpoints" / "meta.json").read_text())
    assert (meta["latest"], meta["step"]) == ("step_00000006", 6)
    check = files.verify(signalled / "checkpoints" / "step_00000006", deep=True)
    assert check.ok, check.reason()
    assert max(metrics_steps(signalled)) == 6, "trained past the checkpoint: those steps would be lost"

    assert train_here(signalled) == exit_codes.OK
    assert_bit_equal(final(clean, 12), final(signalled, 12))


def test_sigusr1_to_one_torchrun_worker_checkpoints_the_step_reached_and_exits_75(tmp_path):
    total = 24
    clean, signalled = tmp_path / "clean", tmp_path / "signalled"
    assert run(train_cmd("encoder", clean, 2), tmp_path / "clean.log") == 0, tail(tmp_path / "clean.log")

    log = tmp_path / "signalled.log"
    beats = tmp_path / "beat-{rank}.json"
    proc = start(train_cmd("encoder", signalled, 2), log, env=child_env(FTRUN_PROGRESS_FILE=str(beats)))
    try:
        beat1 = Path(str(beats).replace("{rank}", "1"))

        def rank1() -> dict:
            try:
                return json.loads(beat1.read_text())
            except (OSError, ValueError):
                return {}

        wait_for(lambda: rank1().get("step", 0) >= 5 or proc.poll() is not None, 180, what="rank 1 at step 5")
        assert proc.poll() is None, f"finished before the signal:\n{tail(log)}"
        os.kill(rank1()["pid"], signal.SIGUSR1)
        code = proc.wait(timeout=120)
    except (AssertionError, subprocess.TimeoutExpired):
        stop(proc)
        raise
    # Stock torchrun (--max_restarts=0) reports the workers' exit code 75 and fails itself;
    # with restarts allowed it would restart them (see docs/slurm.md): job scripts must look
    # at the checkpoint or the signal they sent, not at torchrun's exit code.
    text = log.read_text(errors="replace")
    assert code != 0 and re.search(r"exitcode\s*:\s*75\b", text), tail(log)
    assert text.count("exiting with code 75") == 2, "both ranks must stop at the same step\n" + tail(log)

    preempted = [e for e in events.read(signalled) if e["kind"] == "preempted"]
    assert len(preempted) == 1 and preempted[0]["signal"] in ("SIGUSR1", ""), preempted
    step = preempted[0]["step"]
    meta = json.loads((signalled / "checkpoints" / "meta.json").read_text())
    assert (meta["latest"], meta["step"]) == (f"step_{step:08d}", step)
    assert files.verify(signalled / "checkpoints" / meta["latest"], deep=True).ok
    reached = max(metrics_steps(signalled))
    assert 5 <= step < total and reached == step, f"checkpoint at {step}, trained to {reached}: steps lost"

    assert run(train_cmd("encoder", signalled, 2), tmp_path / "resume.log") == 0, tail(tmp_path / "resume.log")
    starts = [e for e in events.read(signalled) if e["kind"] == "worker_start"]
    assert starts[-1]["step"] == step, starts
    compared = assert_bit_equal(final(clean, total), final(signalled, total))
    print(f"\nSIGUSR1 to rank 1 at step >= 5: checkpoint at step {step}, trained to step {reached} "
          f"(0 lost), exit code 75, resumed; {compared} tensors bit-equal")
