"""Read what a run directory records about its history, tolerating files a killed process left.

The plot, the run summary and the TensorBoard writer all need the same few facts: the
metrics records of the run's current lineage (``metrics.jsonl``), the steps at which it
resumed (``events.jsonl``), and where its checkpoints are (``checkpoints/meta.json``).
They read them here, and never write them: the training loop and the checkpoint manager
own those files.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from launcher import events, metrics
from launcher.checkpoint.meta import read_meta

#: Record keys that describe a record rather than measure something.
NOT_METRICS = frozenset({"step", "epoch", "time"})


read_metrics = metrics.read_records  # the one reader of metrics.jsonl


def is_eval(record: dict[str, Any]) -> bool:
    """Epoch-end records carry ``train_loss``; per-step records carry ``loss``."""
    return "train_loss" in record


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite measurements of a record (no step, epoch or time)."""
    out = {}
    for k, v in record.items():
        if k in NOT_METRICS or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out[k] = float(v)
    return out


def resume_points(run_dir: Path) -> list[int]:
    """Steps at which the current lineage of the run resumed, oldest first.

    Every worker start is in ``events.jsonl``, including those of branches a later resume
    abandoned (``--resume best`` or ``--resume PATH`` going back to an older checkpoint).
    A start at step ``s`` drops every resume point after ``s``, so what is left matches the
    steps whose metrics ``metrics.jsonl`` still holds.
    """
    points: list[int] = []
    for ev in events.read(run_dir):
        if ev.get("kind") != "worker_start" or not isinstance(ev.get("step"), int):
            continue
        step = ev["step"]
        points = [p for p in points if p <= step]
        if step > 0 and step not in points:
            points.append(step)
    return points


def worker_starts(run_dir: Path) -> list[dict[str, Any]]:
    """Every ``worker_start`` event: one per attempt (first start, restarts, requeues, reruns)."""
    return [ev for ev in events.read(run_dir) if ev.get("kind") == "worker_start"]


def agent_report(run_dir: Path) -> dict[str, Any]:
    """The agents' record of failures, restarts and lost work, if ``ftrun`` ran the job.

    ``ftrun`` appends ``failure``, ``restart`` and ``recovered`` events (``launcher/agent/report.py``);
    with several nodes each agent appends its own, so they are counted once per restart
    (``restart_count``). Empty when no agent recorded anything (plain ``python``, stock
    ``torchrun``, or a run without failures). Goodput is not here: :mod:`launcher.goodput`
    computes it for every run.
    """
    evs = events.read(run_dir)
    restarts = {ev.get("restart_count") for ev in evs if ev.get("kind") == "restart" and ev.get("counts", True)}
    recovered: dict[Any, dict[str, Any]] = {}
    for ev in evs:
        if ev.get("kind") == "recovered":
            recovered.setdefault(ev.get("restart_count"), ev)
    failures = outages(evs)
    if not (restarts or recovered or failures):
        return {}
    return {
        "failures": failures, "restarts": len(restarts),
        "steps_lost": sum(ev.get("steps_lost") or 0 for ev in recovered.values()),
        "downtime_seconds": round(sum(ev.get("recovery_seconds") or 0.0 for ev in recovered.values()), 3),
    }


def outages(evs: list[dict[str, Any]]) -> int:
    """Failures, counted as outages: a ``failure`` or ``store_lost`` and every such event after it
    until a ``recovered`` (each agent records what it saw, and one lost node is a worker exit on
    one node, a lost store on another, or both on one)."""
    count, down = 0, False
    for ev in sorted((e for e in evs if isinstance(e.get("time"), (int, float))), key=lambda e: e["time"]):
        if ev.get("kind") in ("failure", "store_lost"):
            count += 0 if down else 1
            down = True
        elif ev.get("kind") == "recovered":
            down = False
    return count


def checkpoint_meta(run_dir: Path) -> dict[str, Any]:
    """``checkpoints/meta.json`` as a dict (empty if missing or unreadable), read by its one reader."""
    m, _ = read_meta(Path(run_dir) / "checkpoints")
    return m.to_json() if m is not None else {}
