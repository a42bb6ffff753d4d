"""``RUN_DIR/events.jsonl``: an append-only record of starts, failures, restarts and recoveries.

Written by the agent (failures, restarts) and by rank 0 of the workers (starts, resumes,
requeues). Each line is one JSON object with at least ``time`` and ``kind``. Lines are
appended with a single ``write`` on a file opened in append mode, so writers on one machine
do not interleave within a line.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from launcher import fileio

FILE = "events.jsonl"


def append(run_dir: str | Path, kind: str, **fields: Any) -> dict[str, Any]:
    """Append one event; return it."""
    record = {"time": time.time(), "kind": kind, **fields}
    path = Path(run_dir) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, default=str) + "\n").encode()
    fd = fileio.open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)  # no planted symlink or FIFO
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return record


def read(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every event, oldest first; a missing or special file gives none, a torn line is skipped."""
    try:
        fd = fileio.open_regular(Path(run_dir) / FILE)
    except OSError:
        return []
    with os.fdopen(fd, "rb") as f:
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a torn last line from a killed writer
        if isinstance(rec, dict):
            out.append(rec)
    return out
