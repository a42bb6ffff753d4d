"""``RUN_DIR/metrics.jsonl``: one JSON object per completed step (and per evaluation), rank 0 only.

On resume, records past the checkpoint's step (written by the attempt that crashed) are
dropped, so the file reads as one continuous run with no duplicate or backward steps.
:func:`read_records` is the one reader (the plot, the summary, the agent's report, the tests):
it skips a torn last line, written by a process killed mid-line.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from launcher import fileio

FILE = "metrics.jsonl"


def _parse(line: str) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    step = rec.get("step") if isinstance(rec, dict) else None
    return rec if isinstance(step, int) and not isinstance(step, bool) else None


def _read_lines(path: Path) -> list[str]:
    fd = fileio.open_regular(path)
    with os.fdopen(fd, "rb") as f:
        return f.read().decode("utf-8", errors="replace").splitlines()


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``RUN_DIR/metrics.jsonl``, oldest first.

    A line that is not a JSON object with an integer ``step`` (a torn last line) is skipped. A
    missing file, or one that is not a regular file (a FIFO is never waited on), gives no records.
    """
    try:
        lines = _read_lines(Path(run_dir) / FILE)
    except OSError:
        return []
    return [rec for rec in map(_parse, lines) if rec is not None]


def _problem(verb: str, path: Path, e: OSError) -> fileio.FileProblem:
    """An error that names the file once and says what to do."""
    if isinstance(e, fileio.FileProblem):
        return e
    return fileio.FileProblem(f"cannot {verb} {path}: {fileio.describe_os_error(e).removeprefix(f'{path}: ')}")


class MetricsLog:
    """Rank 0's writer (a no-op on other ranks). OSError messages name the file and what to do."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path = Path(run_dir) / FILE
        self.enabled = enabled
        self._f = None

    def truncate_after(self, step: int) -> int:
        """Drop records with ``step`` > ``step`` (and torn lines); return how many were dropped."""
        if not self.enabled:
            return 0
        try:
            lines = _read_lines(self.path)
        except FileNotFoundError:
            return 0
        except OSError as e:
            raise _problem("read", self.path, e) from None
        kept = [line for line in lines if (rec := _parse(line)) is not None and rec["step"] <= step]
        dropped = len([line for line in lines if line.strip()]) - len(kept)
        if dropped:
            try:
                fileio.atomic_write(self.path, "".join(f"{k}\n" for k in kept).encode())
            except OSError as e:
                raise _problem("rewrite", self.path, e) from None
        return dropped

    def write(self, record: dict[str, Any]) -> None:
        self.write_many([record])

    def write_many(self, records: list[dict[str, Any]]) -> None:
        """Append ``records`` with one write and one flush (the loop writes a window of steps at once)."""
        if not self.enabled or not records:
            return
        try:
            if self._f is None:
                self._f = fileio.open_append(self.path)
            self._f.write("".join(json.dumps(r) + "\n" for r in records))
            self._f.flush()
        except OSError as e:
            raise _problem("write", self.path, e) from None

    def close(self) -> None:
        if self._f is not None:
            with contextlib.suppress(OSError):  # the last write already reported the problem
                self._f.close()
            self._f = None
