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

FILE = "events.jsonl"


def append(run_dir: str | Path, kind: str, **fields: Any) -> dict[str, Any]:
    """Append one event; return it."""
    record = {"time": time.time(), "kind": kind, **fields}
    path = Path(run_dir) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return record


def read(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a torn last line from a killed writer
    return out
