"""Progress reports from a rank to its agent (``ftrun``), for hang detection.

The agent sets ``FTRUN_PROGRESS_FILE`` (read through :mod:`launcher.env`) to a per-rank path
containing ``{rank}``. Each rank rewrites that small JSON file when it completes a step or
starts a long activity (``saving``, ``evaluating``), so a slow save or evaluation is not
taken for a hang. Writes are atomic (rename) and throttled; with no agent this does nothing.
"""

from __future__ import annotations

import json
import os
import time


class Heartbeat:
    def __init__(self, path_template: str, rank: int, min_interval: float = 0.5):
        self.path = path_template.replace("{rank}", str(rank)) if path_template else ""
        self.rank = rank
        self.min_interval = min_interval
        self._last = (None, None, 0.0)

    def report(self, step: int, activity: str = "training") -> None:
        """Record that this rank completed ``step`` steps and is now doing ``activity``."""
        if not self.path:
            return
        now = time.time()
        _, last_activity, last_time = self._last
        if activity == last_activity and now - last_time < self.min_interval:
            return
        self._last = (step, activity, now)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"rank": self.rank, "step": step, "activity": activity, "time": now, "pid": os.getpid()}, f)
        os.replace(tmp, self.path)
