"""Reading the ranks' progress reports (``launcher/heartbeat.py``) and judging hangs.

Each local worker rewrites ``FTRUN_PROGRESS_FILE`` (``{rank}`` replaced by its global rank)
with ``{rank, step, activity, time, pid, first_step}`` when it starts a step, a save or an evaluation.
The agent polls these files once per monitor interval. A report counts only if its ``pid``
is one of the current attempt's workers: files left by an earlier attempt (or by another
agent's workers before a re-rendezvous renumbered the ranks) are ignored.

Hang rule: a rank whose ``(step, activity)`` has not changed for longer than its allowance
is hung. The allowance is ``hang_timeout`` while training, and
``hang_timeout * long_activity_factor`` while ``saving``, ``evaluating`` or starting (before the
first report of an attempt: process-group set-up and checkpoint loading), so a slow save,
evaluation or resume is not taken for a hang. Scripts that never report are never judged hung: before
any rank of this agent has reported once, hang detection stays off.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from launcher import fileio

LONG_ACTIVITIES = frozenset({"saving", "evaluating", "starting"})
SNAPSHOT = "snapshot"  # a survivor of a lost peer writing its step boundary (launcher/snapshot.py)


@dataclass(frozen=True)
class Report:
    rank: int
    step: int
    activity: str
    time: float
    pid: int
    first_step: int  # the step the worker started from (its resume point)


def read_report(path: str) -> Report | None:
    """The last report written to ``path``, or None if there is none (yet) or it is unreadable."""
    try:
        d = json.loads(fileio.read_bytes(Path(path), limit=4096))  # never blocks on a FIFO planted there
        report = Report(int(d["rank"]), int(d["step"]), str(d["activity"]), float(d["time"]), int(d["pid"]),
                        int(d.get("first_step", d["step"])))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # not written yet, or replaced between open and read
    return report if math.isfinite(report.time) else None


@dataclass
class _RankState:
    pid: int
    changed_at: float  # when (step, activity) last changed; the attempt start before any report
    first: Report | None = None  # first report seen in this attempt
    last: Report | None = None
    first_progress_time: float | None = None  # time of the first report with a new completed step


class ProgressMonitor:
    """Progress of this agent's local workers during one attempt."""

    def __init__(self, template: str, hang_timeout: float, long_activity_factor: float = 3.0,
                 clock: Callable[[], float] = time.time, reader: Callable[[str], Report | None] = read_report):
        if "{rank}" not in template:
            raise ValueError(f"progress file template must contain '{{rank}}', got {template!r}")
        if hang_timeout <= 0:
            raise ValueError(f"hang timeout must be > 0 seconds, got {hang_timeout}")
        self.template = template
        self.hang_timeout = hang_timeout
        self.long_activity_factor = long_activity_factor
        self.clock, self.reader = clock, reader
        self.reporting = False  # True once any worker of this agent has reported
        self._ranks: dict[int, _RankState] = {}

    def path(self, rank: int) -> str:
        return self.template.replace("{rank}", str(rank))

    def start_attempt(self, pids: Mapping[int, int]) -> None:
        """New workers started: ``pids`` maps global rank to process id."""
        now = self.clock()
        self._ranks = {rank: _RankState(pid=pid, changed_at=now) for rank, pid in pids.items()}

    def poll(self) -> None:
        """Read every local rank's report once."""
        for rank, st in self._ranks.items():
            rep = self.reader(self.path(rank))
            if rep is None or rep.pid != st.pid:
                continue
            self.reporting = True
            if st.first is None:
                st.first = rep
            if st.last is None or (rep.step, rep.activity) != (st.last.step, st.last.activity):
                # A report's own time counts only up to now: a time in the future would keep the
                # rank from ever being judged hung.
                st.changed_at = max(min(rep.time, self.clock()), st.changed_at)
                if st.first_progress_time is None and rep.step > rep.first_step:
                    st.first_progress_time = rep.time
            st.last = rep

    def hung(self) -> dict[int, str]:
        """Ranks judged hung now, each with a one-line explanation."""
        if not self.reporting:
            return {}
        now, out = self.clock(), {}
        for rank, st in self._ranks.items():
            activity = st.last.activity if st.last else "starting"
            allowance = self.hang_timeout * (self.long_activity_factor if activity in LONG_ACTIVITIES else 1.0)
            idle = now - st.changed_at
            if idle > allowance:
                step = st.last.step if st.last else "?"
                out[rank] = f"rank {rank} (pid {st.pid}) made no progress for {idle:.0f} s while {activity} " \
                            f"at step {step} (allowed {allowance:.0f} s)"
        return out

    def snapshotting(self) -> set[int]:
        """Ranks of the current workers whose latest report says they are writing a snapshot."""
        out = set()
        for rank, st in self._ranks.items():
            rep = self.reader(self.path(rank))
            if rep is not None and rep.pid == st.pid and rep.activity == SNAPSHOT:
                out.add(rank)
        return out

    def reported_pids(self) -> set[int]:
        """Process ids of the current workers that have reported at least once."""
        return {st.pid for st in self._ranks.values() if st.first is not None}

    @property
    def resumed_from(self) -> int | None:
        """The step this attempt started from (its first report), if any rank has reported."""
        firsts = [st.last.first_step for st in self._ranks.values() if st.last]
        return min(firsts) if firsts else None

    @property
    def last_step(self) -> int | None:
        """The highest step count any local rank reported in this attempt."""
        lasts = [st.last.step for st in self._ranks.values() if st.last]
        return max(lasts) if lasts else None

    @property
    def progressed(self) -> bool:
        """This attempt completed at least one new step."""
        return self.first_progress_time is not None

    @property
    def first_progress_time(self) -> float | None:
        times = [st.first_progress_time for st in self._ranks.values() if st.first_progress_time is not None]
        return min(times) if times else None


@dataclass(frozen=True)
class SurvivorWait:
    """How the agent's wait for the survivors of a failure ended."""

    snapshotting: frozenset[int]  # ranks seen writing a snapshot
    seconds: float
    left: frozenset[int]  # ranks still running when the wait ended (the caller kills them)


def wait_for_survivors(alive: Callable[[], set[int]], snapshotting: Callable[[], set[int]], grace: float,
                       snapshot_grace: float, clock: Callable[[], float] = time.monotonic,
                       sleep: Callable[[float], None] = time.sleep, poll: float = 0.05) -> SurvivorWait:
    """Wait until the live workers have exited: at most ``grace`` seconds, or up to ``snapshot_grace``
    while one of them reports that it writes a snapshot. Pure timing logic (fakes in tests)."""
    start, seen = clock(), set()
    while True:
        live = alive()
        now = snapshotting() & live
        seen |= now
        waited = clock() - start
        if not live or waited >= snapshot_grace or (not now and waited >= grace):
            return SurvivorWait(frozenset(seen), waited, frozenset(live))
        sleep(poll)
