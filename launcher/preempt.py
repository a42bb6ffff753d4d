"""Preemption: a signal asks for a checkpoint at the end of the current step, then exit 75.

The handler only sets a flag; the training loop combines it across ranks at its sync points
(``launcher/steps.py``: within about a second of training), so every rank stops after the same
step and writes one checkpoint together.
A second signal during the save sets the same flag again and changes nothing: the handler
never raises, so it cannot interrupt a half-written file (Python retries an interrupted
system call, PEP 475), and the checkpoint is published only once every rank's shard is verified.

Which signals count is the job's choice: ``FTLAUNCH_PREEMPT_SIGNALS`` (read by
``launcher/env.py``, default SIGTERM and SIGUSR1).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable

from launcher.env import DEFAULT_PREEMPT_SIGNALS

log = logging.getLogger("launcher.preempt")

DEFAULT_SIGNALS = DEFAULT_PREEMPT_SIGNALS


class PreemptionFlag:
    """Set by the first of the preemption signals; read by the training loop at every step end."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0  # signals received, repeats included

    @property
    def raised(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def install(self, names: Iterable[str] = DEFAULT_SIGNALS) -> None:
        """Catch ``names`` (e.g. ``("SIGTERM", "SIGUSR1")``) from now on, in the main thread."""
        for name in names:
            signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.signum is None:
            self.signum = signum
            log.warning("Received %s: will checkpoint after the current step and exit",
                        signal.Signals(signum).name)
        else:
            log.info("Received %s again: the checkpoint is already under way", signal.Signals(signum).name)
