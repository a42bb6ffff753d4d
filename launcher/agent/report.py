"""The agent's record of failures and recoveries: ``RUN_DIR/events.jsonl`` and the exit summary.

Events written here (all through :func:`launcher.events.append`, one JSON line each):

``failure``   time, kind (``worker_exit``, ``hang``, ``membership``), node, group_rank, ranks,
              exit_code / signal, restart_count, last_step (the last step completed before it)
``restart``   restart_count, reason, delay (back-off), counts (spends budget or not)
``recovered`` failure_time, failure_kind, resumed_from, steps_lost, recovery_seconds (from the
              failure to the first step completed after it), restart_count
``snapshot_wait`` ranks, seconds, killed: survivors of a failure were writing a snapshot of their
              step (``launcher/snapshot.py``); the agent waited before stopping them
``agent_start`` pid: this agent started (the run's wall time starts at the first one)
``agent_stop`` reason, exit_code
``store_lost`` / ``reform`` (the per-node supervisor, :mod:`launcher.agent.cli`)

Workers add ``worker_start``. The first completed step after a failure is taken from rank 0's
``metrics.jsonl`` when the run directory has one (exact step times), else from the progress
reports (late by at most the report throttle, 0.5 s).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher import events, goodput, runfiles
from launcher import metrics as metrics_log
from launcher.agent.progress import ProgressMonitor

SURVIVOR_SLACK = 10.0  # seconds before the agent saw a failure in which survivors may have reported it


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
    nodes: dict[str, int] | None = None  # the job's nodes at the last rendezvous (for ftrun's wording)

    def __post_init__(self) -> None:
        self.started = self.started or self.clock()

    def _append(self, kind: str, **fields: Any) -> dict[str, Any]:
        record = {"time": self.clock(), "kind": kind, "node": self.node, "group_rank": self.group_rank, **fields}
        if self.run_dir is not None:
            events.append(self.run_dir, kind, **{k: v for k, v in record.items() if k != "kind"})
        return record

    def last_step(self, monitor: ProgressMonitor | None, since: float | None = None) -> int | None:
        """The last step completed so far: the highest of rank 0's metrics (written at the loop's sync
        points, so up to a second behind), this node's progress reports and, with ``since``, the
        steps the survivors of a failure held (their ``snapshot`` events since then)."""
        steps = [r["step"] for r in self._metrics() if "loss" in r]
        if monitor is not None and monitor.last_step is not None:
            steps.append(monitor.last_step)
        if since is not None and self.run_dir is not None:
            steps += [e["step"] for e in events.read(self.run_dir) if e.get("kind") == "snapshot"
                      and isinstance(e.get("step"), int) and e.get("time", 0) >= since]
        return max(steps) if steps else None

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
        last = self.last_step(monitor, since=self.pending.time - SURVIVOR_SLACK)
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

    def snapshot_wait(self, ranks: list[int], seconds: float, killed: list[int]) -> None:
        """The agent waited for survivors writing a snapshot before stopping them."""
        self._append("snapshot_wait", ranks=ranks, seconds=round(seconds, 3), killed=killed)

    def agent_started(self) -> None:
        self._append("agent_start", pid=os.getpid())

    def stopped(self, reason: str, exit_code: int) -> None:
        self._append("agent_stop", reason=reason, exit_code=exit_code)

    def _metrics(self) -> list[dict[str, Any]]:
        # A torn last line (rank 0 killed, or writing it right now) is skipped by the reader.
        return metrics_log.read_records(Path(self.run_dir)) if self.run_dir is not None else []

    # ------------------------------------------------------------------ summary

    def summary(self, result: str) -> dict[str, Any]:
        """What the exit summary shows: the run's record (the same numbers as ``summary.json``)
        when there is a run directory, else this agent's own."""
        end = self.clock()
        own = {"failures": len(self.failures), "restarts": self.restarts,
               "steps_lost": sum(r["steps_lost"] or 0 for r in self.recoveries),
               "downtime_seconds": sum(r["recovery_seconds"] for r in self.recoveries)}
        kinds = {f["failure_kind"] for f in self.failures}
        good = None
        if self.run_dir is not None:
            own = runfiles.agent_report(self.run_dir) or {k: 0 for k in own}
            kinds |= {e.get("failure_kind") if e.get("kind") == "failure" else e.get("kind")
                      for e in events.read(self.run_dir) if e.get("kind") in ("failure", "store_lost")}
            good = goodput.of_run(self.run_dir, end)
        if self.pending is not None:
            own["downtime_seconds"] += end - self.pending.time
        return {"node": self.node, "result": result, **own,
                "wall_seconds": good.wall_seconds if good else max(end - self.started, 1e-9),
                "membership_changes": self.membership_changes, "failure_kinds": sorted(k for k in kinds if k),
                "unrecovered": self.pending is not None, "goodput": good.fraction if good else None}


def format_summary(s: dict[str, Any]) -> str:
    """The one-screen summary printed when the agent exits: the run's figures, the same as
    ``summary.json``'s (goodput as defined in ``docs/failures.md``)."""
    goodput = f"{100 * s['goodput']:.1f} % of the run's wall time on steps that were kept" \
        if s["goodput"] is not None else "n/a (no metrics.jsonl in the run directory)"
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
