"""Progress reports from a rank to its agent (``ftrun``), for hang detection.

The agent sets ``FTRUN_PROGRESS_FILE`` (read through :mod:`launcher.env`) to a per-rank path
containing ``{rank}``. Each rank rewrites that small JSON file when it completes a step or
starts a long activity (``saving``, ``evaluating``), so a slow save or evaluation is not
taken for a hang. Writes are atomic (rename) and throttled; with no agent this does nothing.

A rank that reports also prints all its threads' Python stacks on SIGUSR2 (faulthandler):
the agent sends it when it finds the rank hung, before restarting it, so the log shows
where it was stuck. Only reporting ranks get the signal; to any other process SIGUSR2 is fatal.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import time


class Heartbeat:
    def __init__(self, path_template: str, rank: int, min_interval: float = 0.5):
        self.path = path_template.replace("{rank}", str(rank)) if path_template else ""
        self.rank = rank
        self.min_interval = min_interval
        self._last = (None, None, 0.0)
        self._first_step: int | None = None  # the step this process started (resumed) from
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
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"rank": self.rank, "step": step, "activity": activity, "time": now, "pid": os.getpid(),
                       "first_step": self._first_step}, f)
        os.replace(tmp, self.path)
