"""Progress reports from a rank to its agent (``ftrun``), for hang detection.

The agent sets ``FTRUN_PROGRESS_FILE`` (read through :mod:`launcher.env`) to a per-rank path
containing ``{rank}``. Each rank rewrites that small JSON file when it completes a step or
starts a long activity (``saving``, ``evaluating``), so a slow save or evaluation is not
taken for a hang. Writes are atomic (a fresh temporary file renamed over the report, so a
symlink planted at the report's path or next to it is never followed) and throttled; with no
agent this does nothing. A report that cannot be written is logged once and training goes on:
the agent then judges the rank by its other reports, or not at all.

A rank that reports also prints all its threads' Python stacks on SIGUSR2 (faulthandler):
the agent sends it when it finds the rank hung, before restarting it, so the log shows
where it was stuck. Only reporting ranks get the signal; to any other process SIGUSR2 is fatal.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import time
from pathlib import Path

from launcher import fileio

log = logging.getLogger("launcher")


class Heartbeat:
    def __init__(self, path_template: str, rank: int, min_interval: float = 0.5):
        self.path = path_template.replace("{rank}", str(rank)) if path_template else ""
        self.rank = rank
        self.min_interval = min_interval
        self._last = (None, None, 0.0)
        self._first_step: int | None = None  # the step this process started (resumed) from
        self._failed = False
        if self.path and hasattr(signal, "SIGUSR2"):
            faulthandler.register(signal.SIGUSR2, all_threads=True)

    def report(self, step: int, activity: str = "training") -> None:
        """Record that this rank completed ``step`` steps and is now doing ``activity``."""
        if not self.path:
            return
        now = time.time()
        if self._first_step is None:
            self._first_step = step
        last_step, last_activity, last_time = self._last
        # The first completed step is always written: it tells the agent this attempt made
        # progress (its recovery time, and the crash-loop guard, depend on it).
        first_progress = last_step == self._first_step and step > self._first_step
        if activity == last_activity and now - last_time < self.min_interval and not first_progress:
            return
        self._last = (step, activity, now)
        report = {"rank": self.rank, "step": step, "activity": activity, "time": now, "pid": os.getpid(),
                  "first_step": self._first_step}
        try:
            fileio.atomic_write(Path(self.path), json.dumps(report).encode(), durable=False)
        except OSError as e:
            if not self._failed:
                log.warning("Cannot write the progress report %s for the agent: %s", self.path,
                            fileio.describe_os_error(e))
            self._failed = True
