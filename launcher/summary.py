"""The run summary: printed when an attempt ends and written to ``RUN_DIR/summary.json``.

It describes the run, not the attempt: final and best metrics over the whole history
(``metrics.jsonl``), the run's wall time and goodput (:mod:`launcher.goodput`, the same
figures ``ftrun`` prints at exit), the agents' restarts when ``ftrun`` recorded them
(``events.jsonl``), and where the latest and best checkpoints are (``checkpoints/meta.json``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from launcher import fileio, goodput
from launcher.plots import is_loss_like
from launcher.runfiles import agent_report, checkpoint_meta, is_eval, read_metrics, scalars, worker_starts

FILE = "summary.json"


def build(run_dir: Path, loop: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """Summary of the run in ``run_dir``; ``loop`` is what the training loop passes to ``on_end``."""
    now = time.time() if now is None else now
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    starts = worker_starts(run_dir)
    good = goodput.of_run(run_dir, now)
    out: dict[str, Any] = {
        "status": loop.get("status"),
        "step": loop.get("step"),
        "total_steps": loop.get("total_steps"),
        "final": _final(records),
        "best": _best(records),
        "wall_seconds": round(good.wall_seconds, 3) if good else None,
        "goodput": round(good.fraction, 4) if good else None,
        "attempt_seconds": round(float(loop.get("attempt_seconds", 0.0)), 3),
        "attempts": len(starts),
        "resumed_at": list(loop.get("resumed_at", [])),
    }
    agent = agent_report(run_dir)
    if agent:
        out["agent"] = agent
    out["checkpoints"] = _checkpoints(run_dir)
    return out


def _final(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The last step record's measurements, and the last evaluation's."""
    steps = [r for r in records if not is_eval(r)]
    evals = [r for r in records if is_eval(r)]
    out: dict[str, Any] = {}
    if steps:
        out["train"] = {"step": steps[-1]["step"], **scalars(steps[-1])}
    if evals:
        out["eval"] = {"step": evals[-1]["step"], "epoch": evals[-1].get("epoch"), **scalars(evals[-1])}
    return out


def _best(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Best value of each evaluation metric: lowest for losses and errors, highest otherwise."""
    best: dict[str, dict[str, Any]] = {}
    for rec in records:
        if not is_eval(rec):
            continue
        for k, v in scalars(rec).items():
            mode = "min" if is_loss_like(k) else "max"
            held = best.get(k)
            if held is None or (v < held["value"] if mode == "min" else v > held["value"]):
                best[k] = {"value": v, "step": rec["step"], "epoch": rec.get("epoch"), "mode": mode}
    return best


def _checkpoints(run_dir: Path) -> dict[str, Any]:
    meta = checkpoint_meta(run_dir)
    root = (run_dir / "checkpoints").resolve()
    out: dict[str, Any] = {"dir": str(root)}
    if isinstance(meta.get("latest"), str):
        out["latest"] = {"path": str(root / meta["latest"]), "step": meta.get("step")}
    best = meta.get("best")
    if isinstance(best, dict) and isinstance(best.get("name"), str):
        out["best"] = {"path": str(root / best["name"]), "metric": best.get("metric"),
                       "mode": best.get("mode"), "value": best.get("value")}
    return out


def write(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Write ``summary.json`` atomically (a reader never sees half of it)."""
    path = Path(run_dir) / FILE
    fileio.atomic_write(path, (json.dumps(summary, indent=2, sort_keys=False) + "\n").encode(), durable=False)
    return path


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_text(summary: dict[str, Any]) -> str:
    """A short human-readable block for the console and the rank-0 log."""
    lines = [f"Run summary ({summary['status']}): step {summary['step']}/{summary['total_steps']}, "
             f"wall time {_hms(summary['wall_seconds'])} over {summary['attempts']} attempt(s), "
             f"this attempt {_hms(summary['attempt_seconds'])}"]
    if summary["resumed_at"]:
        lines.append(f"  resumed at step(s): {', '.join(map(str, summary['resumed_at']))}")
    if summary.get("goodput") is not None:
        lines.append(f"  goodput {100 * summary['goodput']:.1f} % (wall time on steps that were kept)")
    agent = summary.get("agent")
    if agent:
        lines.append(f"  ftrun: {agent['restarts']} restart(s) after {agent['failures']} failure(s), "
                     f"{agent['steps_lost']} step(s) lost, downtime {agent['downtime_seconds']:.1f} s")
    for part in ("train", "eval"):
        final = summary["final"].get(part)
        if final:
            shown = " ".join(f"{k} {v:.5g}" for k, v in final.items() if k not in ("step", "epoch"))
            lines.append(f"  final {part} (step {final['step']}): {shown}")
    for k, b in summary["best"].items():
        lines.append(f"  best {k}: {b['value']:.5g} at step {b['step']} ({b['mode']})")
    ck = summary["checkpoints"]
    if "latest" in ck:
        lines.append(f"  latest checkpoint: {ck['latest']['path']}")
    if "best" in ck:
        b = ck["best"]
        lines.append(f"  best checkpoint: {b['path']} ({b['metric']} {b['value']})")
    return "\n".join(lines)
