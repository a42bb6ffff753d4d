"""Preemption: a signal asks for a checkpoint at the end of the current step, then exit 75.

The handler only sets a flag; the training loop combines it across ranks with the per-step
all-reduce, so every rank stops after the same step and writes one checkpoint together.
A second signal during the save sets the same flag again and changes nothing.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger("launcher.preempt")

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")


class PreemptionFlag:
    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def raised(self) -> bool:
        return self.signum is not None

    def install(self, names=DEFAULT_SIGNALS) -> None:
        for name in names:
            signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum, frame) -> None:
        first = self.signum is None
        self.signum = signum
        if first:
            log.warning("Received %s: will checkpoint after the current step and exit",
                        signal.Signals(signum).name)
