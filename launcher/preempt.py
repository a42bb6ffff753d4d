"""Signals and teardown: when a worker checkpoints and exits 75, and when it ends at once.

The rule (``docs/failures.md``, "SIGTERM: preemption or teardown"):

* **Preemption.** A preemption signal (``FTLAUNCH_PREEMPT_SIGNALS``, default SIGTERM and SIGUSR1,
  read by ``launcher/env.py``) that reaches a *training* worker asks for a checkpoint at the end
  of the current step, then exit 75. The handler only sets a flag; the training loop combines it
  across ranks with the per-step all-reduce, so every rank stops after the same step and writes
  one checkpoint together. A second signal during the save changes nothing: the handler never
  raises, so it cannot interrupt a half-written file (Python retries an interrupted system
  call, PEP 475), and the checkpoint is published only once every rank's shard is verified.
* **Teardown.** SIGTERM is also what torchrun's (and ftrun's) agent sends to the surviving
  workers when a peer failed, and to a group it abandons while it is still starting. Such a
  worker cannot checkpoint (its collectives fail) or has nothing new to save (it has not trained
  a step since the checkpoint it loads), and waiting for it costs the agent's shutdown timeout
  (30 s under torchrun). So a worker ends **at once**:

  - while it is *starting* (until the training loop begins: process group, resume), SIGTERM
    keeps its default action, so the kernel ends the process even inside a blocking call
    (a Python handler would only run once, say, gloo's connection set-up returned);
  - while it is *training*, when a collective fails because a peer is gone
    (:func:`is_peer_failure`), signal or not: through :func:`teardown`.

:func:`teardown` is the one place where a training worker decides "my group is being torn down
after a peer failed". A just-in-time snapshot of the last clean step boundary belongs there.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Iterable
from typing import NoReturn

from launcher.env import DEFAULT_PREEMPT_SIGNALS

log = logging.getLogger("launcher.preempt")

DEFAULT_SIGNALS = DEFAULT_PREEMPT_SIGNALS
TEARDOWN_SIGNAL = signal.SIGTERM  # the agents' teardown request (torch's _get_default_signal)

# What gloo raises (a plain RuntimeError) when a peer process is gone or unreachable; NCCL and
# the store raise torch.distributed.DistError subclasses instead.
GLOO_PEER_ERRORS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
                    "Timed out waiting", "connectFullMesh", "Socket Timeout")


class PreemptionFlag:
    """Set by the first of the preemption signals; read once per step by the training loop."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0  # signals received, repeats included
        self.starting = True  # until the training loop begins: SIGTERM keeps its default action
        self._names: tuple[str, ...] = ()

    @property
    def raised(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def install(self, names: Iterable[str] = DEFAULT_SIGNALS) -> None:
        """Catch ``names`` (e.g. ``("SIGTERM", "SIGUSR1")``) from now on, in the main thread.

        While the worker is starting, SIGTERM gets its default action instead (also undoing the
        ignore inherited from ftrun's fork server): a teardown then ends the process at once.
        """
        self._names = tuple(names)
        for name in self._names:
            sig = getattr(signal, name)
            starting_teardown = self.starting and sig == TEARDOWN_SIGNAL
            signal.signal(sig, signal.SIG_DFL if starting_teardown else self._handle)

    def training(self) -> None:
        """The training loop begins: from now on SIGTERM is a preemption unless a collective fails."""
        self.starting = False
        if TEARDOWN_SIGNAL.name in self._names:
            signal.signal(TEARDOWN_SIGNAL, self._handle)

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.signum is None:
            self.signum = signum
            log.warning("Received %s: will checkpoint after the current step and exit",
                        signal.Signals(signum).name)
        else:
            log.info("Received %s again: the checkpoint is already under way", signal.Signals(signum).name)


def is_peer_failure(error: BaseException) -> bool:
    """True if ``error`` means a collective failed because another rank is gone or unreachable."""
    import torch.distributed as dist  # late: launcher/run.py imports this module before torch

    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(p in str(error) for p in GLOO_PEER_ERRORS)


def end_if_peer_failed(error: BaseException, world_size: int, flag: PreemptionFlag) -> None:
    """From an ``except`` clause, before any clean-up: end this worker at once if ``error`` is a
    collective that failed because a peer is gone (:func:`teardown`); else return, and the caller
    re-raises."""
    if world_size > 1 and is_peer_failure(error):
        text = str(error).strip()
        first_line = text.splitlines()[0] if text else type(error).__name__
        teardown(f"a collective failed, another rank is gone ({first_line})",
                 signum=TEARDOWN_SIGNAL if flag.signum == TEARDOWN_SIGNAL else None)


def teardown(reason: str, signum: int | None = None) -> NoReturn:
    """End this worker now: its group is being torn down after a peer failed.

    Nothing more can be saved consistently here (a collective failed), and clean-up could block
    on the dead peer (an async save, the process group's destruction), so the process ends
    without it: by ``signum`` with its default action when the agent's SIGTERM came too (the
    exit status a plain script would have), else with exit code 1. The run directory's lock is
    released by the kernel, and the resume point is the latest verified checkpoint, untouched.
    """
    log.warning("Ending this worker at once: %s", reason)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    if signum is not None:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    os._exit(1)
