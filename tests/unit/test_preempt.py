"""The preemption flag: set by the first listed signal, unchanged by repeats.

Whole runs that are signalled (one process, with signals at every instant of a save; two
ranks under torchrun) are in ``tests/distributed/test_preemption.py``; SLURM in ``tests/slurm``.
"""

from __future__ import annotations

import os
import signal

import pytest

from launcher.preempt import PreemptionFlag

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
