"""``RUN_DIR/metrics.jsonl``: one JSON object per completed step (and per evaluation), rank 0 only.

On resume, records past the checkpoint's step (written by the attempt that crashed) are
dropped, so the file reads as one continuous run with no duplicate or backward steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool):
        self.path = Path(run_dir) / FILE
        self.enabled = enabled
        self._f = None

    def truncate_after(self, step: int) -> int:
        """Drop records with ``step`` > ``step`` (and torn last lines); return how many were dropped."""
        if not self.enabled or not self.path.exists():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            if rec.get("step", 0) > step:
                dropped += 1
            else:
                kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(f"{k}\n" for k in kept))
        os.replace(tmp, self.path)
        return dropped

    def write(self, record: dict[str, Any]) -> None:
        self.write_many([record])

    def write_many(self, records: list[dict[str, Any]]) -> None:
        """Append ``records`` with one write and one flush (the loop writes a window of steps at once)."""
        if not self.enabled or not records:
            return
        if self._f is None:
            self._f = open(self.path, "a")  # noqa: SIM115 (kept open for the run)
        self._f.write("".join(json.dumps(r) + "\n" for r in records))
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
