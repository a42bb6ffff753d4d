"""Goodput: the share of a run's wall time spent on training steps that were kept. Defined here only.

The definition users read is in ``docs/failures.md`` ("Goodput"); this module is the one
computation of it. ``ftrun``'s exit summary, ``summary.json`` and the run summary that rank 0
prints all call :func:`of_run`, on the same files, so they print the same figure.

* **Kept step time**: ``metrics.jsonl`` holds one record per step that survives in the run's
  history (records a crashed attempt wrote past its checkpoint are dropped on resume, so redone
  work appears once). A step's time is the gap to the previous step's record, so it includes
  the evaluations and checkpoint saves between steps. The first step after a (re)start would
  also count the outage and the start-up, so it is given the run's median step time.
* **Wall time**: from the run's first start (``ftrun``'s ``agent_start``, or the first
  ``worker_start``) to its end, leaving out the time between a clean stop (``run_end``: finished,
  preempted, interrupted; ``agent_stop``: ``ftrun`` gave up) and the next start, when nothing of
  the job ran because someone chose so. A job killed outright and restarted by hand is down until
  the restart, and that time counts.

The end of a run is its last ``run_end`` or ``agent_stop`` when it is stopped, else "now".
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import events, runfiles

STARTS = frozenset({"agent_start", "worker_start"})  # something of the job starts running
STOPS = frozenset({"run_end", "agent_stop"})  # the job stopped on purpose (or ftrun gave up)
BREAKS = frozenset({"worker_start", "failure", "restart", "store_lost"})  # a step gap spanning one is no step time


@dataclass(frozen=True)
class Goodput:
    kept_seconds: float  # seconds spent on steps that were kept
    wall_seconds: float  # seconds the run was up (see the module docstring)

    @property
    def fraction(self) -> float:
        return self.kept_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def percent(self) -> str:
        return f"{100 * self.fraction:.1f} %"


def _when(ev: dict[str, Any]) -> float | None:
    """An event's time; a worker's start counts from its process's creation (``launched``), so a
    plain ``python``/``torchrun`` run counts its start-up as ``ftrun``'s ``agent_start`` does."""
    t = ev.get("launched") if ev.get("kind") == "worker_start" else None
    t = t if isinstance(t, (int, float)) else ev.get("time")
    return t if isinstance(t, (int, float)) else None


def up_intervals(evs: list[dict[str, Any]], now: float) -> list[tuple[float, float]]:
    """The ``[start, end]`` wall-clock intervals the run was up, oldest first."""
    out: list[tuple[float, float]] = []
    start: float | None = None
    for t, ev in sorted(((_when(e), e) for e in evs if _when(e) is not None), key=lambda p: p[0]):
        kind = ev.get("kind")
        if kind in STARTS and start is None:
            start = t
        elif kind in STOPS and start is not None:
            out.append((start, t))
            start = None
    if start is not None:
        out.append((start, max(now, start)))
    return out


def kept_step_seconds(records: list[dict[str, Any]], breaks: list[float],
                      intervals: list[tuple[float, float]]) -> float | None:
    """Seconds spent on the step records (``metrics.jsonl``: kept steps only) that fall in ``intervals``.

    A step's time is the gap to the previous step's record; the first step of an attempt (a
    ``breaks`` time lies in its gap, or the previous step is not the one before it) gets the
    median step time instead, since its gap also holds the outage and the start-up.
    """
    steps = [r for r in records if "loss" in r and isinstance(r.get("time"), (int, float))]
    if not steps:
        return None
    gaps: list[float | None] = [None]
    for prev, cur in zip(steps, steps[1:], strict=False):
        restarted = any(prev["time"] < b <= cur["time"] for b in breaks)
        gaps.append(None if restarted or cur["step"] != prev["step"] + 1 else cur["time"] - prev["time"])
    known = [g for g in gaps if g is not None]
    typical = statistics.median(known) if known else 0.0
    inside = lambda t: any(a <= t <= b for a, b in intervals)  # noqa: E731
    return sum(typical if g is None else g for r, g in zip(steps, gaps, strict=True) if inside(r["time"]))


def compute(evs: list[dict[str, Any]], records: list[dict[str, Any]], now: float) -> Goodput | None:
    """Goodput of a run from its events and metrics records; None without step records or starts."""
    intervals = up_intervals(evs, now)
    if not intervals:
        return None
    breaks = [e["time"] for e in evs if e.get("kind") in BREAKS and isinstance(e.get("time"), (int, float))]
    kept = kept_step_seconds(records, breaks, intervals)
    if kept is None:
        return None
    return Goodput(kept_seconds=kept, wall_seconds=sum(b - a for a, b in intervals))


def of_run(run_dir: Path, now: float) -> Goodput | None:
    """Goodput of the run in ``run_dir`` (``events.jsonl`` and ``metrics.jsonl``), as of ``now``."""
    return compute(events.read(run_dir), runfiles.read_metrics(run_dir), now)
