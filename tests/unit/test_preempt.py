"""The preemption flag: set by the first listed signal, unchanged by repeats; SIGTERM while a
worker is starting, or a failed collective, ends it at once (the teardown rule).

Whole runs that are signalled (one process, with signals at every instant of a save; two
ranks under torchrun) are in ``tests/distributed/test_preemption.py``; SLURM in ``tests/slurm``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.endings import is_peer_failure
from launcher.preempt import PreemptionFlag

REPO = Path(__file__).resolve().parents[2]

CATCHABLE = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@pytest.fixture
def restore_signals():
    """The code under test installs handlers in this (pytest's) process: put pytest's back."""
    saved = {s: signal.getsignal(s) for s in CATCHABLE}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_first_signal_sets_the_flag_and_repeats_change_nothing(restore_signals):
    flag = PreemptionFlag()
    flag.install(("SIGUSR2",))
    assert not flag.raised and flag.name == ""
    os.kill(os.getpid(), signal.SIGUSR2)
    assert flag.raised and flag.name == "SIGUSR2" and flag.count == 1
    os.kill(os.getpid(), signal.SIGUSR2)
    assert flag.signum == signal.SIGUSR2 and flag.count == 2


def test_signals_not_listed_are_left_alone(restore_signals):
    flag = PreemptionFlag()
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    flag.install(("SIGUSR2",))
    os.kill(os.getpid(), signal.SIGUSR1)
    assert not flag.raised


# --- SIGTERM: preemption while training, teardown while starting (docs/failures.md) -----------

WORKER = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from launcher.preempt import PreemptionFlag
flag = PreemptionFlag()
flag.install(("SIGTERM", "SIGUSR1"))
if {training}:
    flag.training()
os.kill(os.getpid(), signal.{sig})
time.sleep(0.2)  # the handler runs between bytecodes
print("still running, flag", flag.name, flush=True)
"""


def run_worker(training: bool, sig: str) -> subprocess.CompletedProcess:
    code = WORKER.format(repo=str(REPO), training=training, sig=sig)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_sigterm_while_starting_ends_the_worker_at_once_by_the_signal():
    out = run_worker(training=False, sig="SIGTERM")
    assert out.returncode == -signal.SIGTERM, (out.returncode, out.stdout, out.stderr)
    assert "still running" not in out.stdout


def test_sigterm_while_starting_ends_a_worker_blocked_in_a_call():
    """A Python handler runs only between bytecodes: a worker blocked in gloo's set-up would not
    see it. The default action ends the process wherever it is."""
    code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r})\n"
            "from launcher.preempt import PreemptionFlag\n"
            "PreemptionFlag().install(('SIGTERM',))\n"
            "print('blocking', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "blocking"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_while_training_is_a_preemption():
    out = run_worker(training=True, sig="SIGTERM")
    assert out.returncode == 0, out.stderr
    assert "still running, flag SIGTERM" in out.stdout


def test_other_preemption_signals_while_starting_still_ask_for_a_checkpoint():
    out = run_worker(training=False, sig="SIGUSR1")
    assert out.returncode == 0, out.stderr
    assert "still running, flag SIGUSR1" in out.stdout


@pytest.mark.parametrize(("error", "expected"), [
    (RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242"), True),
    (RuntimeError("Gloo connectFullMesh failed with [..] Connection refused"), True),
    (RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 300000ms for recv"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"), False),
    (ValueError("Connection closed by peer"), False),
])
def test_peer_failures_are_told_from_bugs(error, expected):
    assert is_peer_failure(error) is expected


def test_distributed_errors_are_peer_failures():
    import torch.distributed as dist
    assert is_peer_failure(dist.DistNetworkError("store gone"))


def test_a_failed_collective_ends_the_worker_at_once_and_a_bug_does_not():
    """What FaultTolerant does with an error leaving its block: a peer failure ends the process at
    once (exit 1, no clean-up that could wait for the dead peer); anything else is raised as usual."""
    code = (f"import sys, logging; sys.path.insert(0, {str(REPO)!r}); logging.basicConfig()\n"
            "from launcher.endings import is_peer_failure\n"
            "from launcher.preempt import teardown\n"
            "for error in (ValueError('a bug'), RuntimeError('[pair.cc:534] Connection closed by peer [::1]:1')):\n"
            "    if is_peer_failure(error):\n"
            "        teardown('a collective failed')\n"
            "    print(type(error).__name__, 'returned', flush=True)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert out.stdout.strip() == "ValueError returned"
    assert "Ending this worker at once: a collective failed" in out.stderr
