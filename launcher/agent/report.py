"""The agent's record of failures and recoveries: ``RUN_DIR/events.jsonl`` and the exit summary.

Events written here (all through :func:`launcher.events.append`, one JSON line each):

``failure``   time, kind (``worker_exit``, ``hang``, ``membership``), node, group_rank, ranks,
              exit_code / signal, restart_count, last_step (the last step completed before it)
``restart``   restart_count, reason, delay (back-off), counts (spends budget or not)
``recovered`` failure_time, failure_kind, resumed_from, steps_lost, recovery_seconds (from the
              failure to the first step completed after it), restart_count
``agent_stop`` reason, exit_code
``store_lost`` / ``reform`` (the per-node supervisor, :mod:`launcher.agent.cli`)

Workers add ``worker_start``. The first completed step after a failure is taken from rank 0's
``metrics.jsonl`` when the run directory has one (exact step times), else from the progress
reports (late by at most the report throttle, 0.5 s).
"""

from __future__ import annotations

import json
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher import events
from launcher import metrics as metrics_log
from launcher.agent.progress import ProgressMonitor

BREAKS = ("worker_start", "failure", "restart", "store_lost")


@dataclass
class _Pending:
    time: float
    kind: str
    last_step: int | None
    stopped: float = 0.0  # when the failed attempt's workers were stopped: later steps are new ones


@dataclass
class Recorder:
    """Appends this agent's events and keeps the numbers for its summary."""

    run_dir: Path | None
    node: str = field(default_factory=socket.gethostname)
    clock: Callable[[], float] = time.time
    started: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    restarts: int = 0
    membership_changes: int = 0
    group_rank: int | None = None
    pending: _Pending | None = None

    def __post_init__(self) -> None:
        self.started = self.started or self.clock()

    def _append(self, kind: str, **fields: Any) -> dict[str, Any]:
        record = {"time": self.clock(), "kind": kind, "node": self.node, "group_rank": self.group_rank, **fields}
        if self.run_dir is not None:
            events.append(self.run_dir, kind, **{k: v for k, v in record.items() if k != "kind"})
        return record

    def last_step(self, monitor: ProgressMonitor | None) -> int | None:
        """The last step completed so far: rank 0's metrics if readable, else the progress reports."""
        steps = [r["step"] for r in self._metrics() if "loss" in r]
        if steps:
            return max(steps)
        return monitor.last_step if monitor else None

    def failure(self, kind: str, monitor: ProgressMonitor, restart_count: int, **fields: Any) -> None:
        last = self.last_step(monitor)
        rec = self._append("failure", failure_kind=kind, restart_count=restart_count, last_step=last, **fields)
        self.failures.append(rec)
        if self.pending is None:  # a second failure before recovery extends the same outage
            self.pending = _Pending(rec["time"], kind, last)

    def restart(self, restart_count: int, reason: str, delay: float, counts: bool) -> None:
        self._append("restart", restart_count=restart_count, reason=reason, delay=delay, counts=counts)
        if counts:
            self.restarts += 1
        else:
            self.membership_changes += 1

    def workers_stopped(self, monitor: ProgressMonitor) -> None:
        """The failed attempt's workers are gone. Steps they completed after the failure was
        recorded (a peer finished its step while the hung group was inspected) are lost too."""
        if self.pending is None:
            return
        self.pending.stopped = self.clock()
        last = self.last_step(monitor)
        if last is not None and (self.pending.last_step is None or last > self.pending.last_step):
            self.pending.last_step = last

    def check_recovered(self, monitor: ProgressMonitor, restart_count: int) -> None:
        """Once per monitor interval: close the pending outage when a new step has completed."""
        if self.pending is None or not monitor.progressed:
            return
        p, resumed = self.pending, monitor.resumed_from
        after = [r for r in self._metrics() if "loss" in r and r.get("time", 0) > max(p.time, p.stopped)]
        first_time = after[0]["time"] if after else monitor.first_progress_time
        lost = max(p.last_step - resumed, 0) if p.last_step is not None and resumed is not None else None
        rec = self._append("recovered", failure_time=p.time, failure_kind=p.kind, resumed_from=resumed,
                           steps_lost=lost, recovery_seconds=round(first_time - p.time, 3),
                           restart_count=restart_count)
        self.recoveries.append(rec)
        self.pending = None

    def store_lost(self, **fields: Any) -> None:
        """The per-node supervisor lost the rendezvous store and starts a new agent."""
        last = self.last_step(None)
        rec = self._append("store_lost", last_step=last, **fields)
        if self.pending is None:
            self.pending = _Pending(rec["time"], "store_lost", last)

    def stopped(self, reason: str, exit_code: int) -> None:
        self._append("agent_stop", reason=reason, exit_code=exit_code)

    def _metrics(self) -> list[dict[str, Any]]:
        if self.run_dir is None:
            return []
        try:
            lines = (Path(self.run_dir) / metrics_log.FILE).read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a torn last line: rank 0 was killed, or is writing it right now
        return out

    # ------------------------------------------------------------------ summary

    def summary(self, result: str) -> dict[str, Any]:
        end = self.clock()
        wall = max(end - self.started, 1e-9)
        downtime = sum(r["recovery_seconds"] for r in self.recoveries)
        if self.pending is not None:
            downtime += end - self.pending.time
        # A gap between two kept steps that spans a failure, restart or start-up is no step time.
        breaks = [e["time"] for e in (events.read(self.run_dir) if self.run_dir else []) if e["kind"] in BREAKS]
        kept = kept_step_seconds(self._metrics(), breaks, self.started, end)
        return {"node": self.node, "result": result, "wall_seconds": wall, "restarts": self.restarts,
                "membership_changes": self.membership_changes, "failures": len(self.failures),
                "failure_kinds": sorted({f["failure_kind"] for f in self.failures}),
                "unrecovered": self.pending is not None, "downtime_seconds": downtime,
                "steps_lost": sum(r["steps_lost"] or 0 for r in self.recoveries),
                "goodput": kept / wall if kept is not None else None}


def kept_step_seconds(records: list[dict[str, Any]], breaks: list[float], t0: float, t1: float) -> float | None:
    """Seconds spent on the steps in ``metrics.jsonl`` (which holds only kept steps) within [t0, t1].

    A step's time is the gap to the previous step's record. The first step of an attempt (one
    of the ``breaks`` times, e.g. a ``worker_start``, lies in the gap) would also count the
    outage and start-up, so it gets the median step time.
    """
    steps = [r for r in records if "loss" in r and "time" in r]
    if not steps:
        return None
    gaps: list[float | None] = [None]
    for prev, cur in zip(steps, steps[1:], strict=False):
        restarted = any(prev["time"] < b <= cur["time"] for b in breaks)
        gaps.append(None if restarted or cur["step"] != prev["step"] + 1 else cur["time"] - prev["time"])
    known = [g for g in gaps if g is not None]
    typical = statistics.median(known) if known else 0.0
    return sum(typical if g is None else g for r, g in zip(steps, gaps, strict=True) if t0 <= r["time"] <= t1)


def format_summary(s: dict[str, Any]) -> str:
    """The one-screen summary printed when the agent exits."""
    goodput = f"{100 * s['goodput']:.1f} % of wall time on steps that were kept" if s["goodput"] is not None \
        else "n/a (no metrics.jsonl in the run directory)"
    kinds = ", ".join(s["failure_kinds"]) or "none"
    lines = [
        f"==================== ftrun summary ({s['node']}) ====================",
        f"result          {s['result']}",
        f"wall time       {s['wall_seconds']:.1f} s",
        f"failures        {s['failures']} ({kinds})" + ("; the last one never recovered" if s["unrecovered"] else ""),
        f"restarts        {s['restarts']} (+{s['membership_changes']} for nodes joining)",
        f"downtime        {s['downtime_seconds']:.1f} s (failure to first completed step after it)",
        f"steps lost      {s['steps_lost']} (completed, then redone after resuming from a checkpoint)",
        f"goodput         {goodput}",
        "=" * 68,
    ]
    return "\n".join(lines)
