"""``RUN_DIR/metrics.jsonl``: one JSON object per completed step (and per evaluation), rank 0 only.

On resume, records past the checkpoint's step (written by the attempt that crashed) are
dropped, and the records a just-in-time snapshot carries that the file lacks are added, so the
file reads as one continuous run with every step once and no backward steps.
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


def _identity(record: dict[str, Any]) -> tuple[int, bool]:
    """(step, is a step record): one step record and one evaluation record per step at most."""
    return record["step"], "loss" in record


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

    def restore(self, step: int, carried: list[dict[str, Any]] = ()) -> tuple[int, int]:
        """Make the file the run's history up to ``step``: drop records past it (and torn lines),
        add the ``carried`` records it lacks (a snapshot's, which rank 0 may never have written).

        A record is identified by its step and kind (a step's record, or an evaluation record),
        so one already in the file is never written twice. Returns (dropped, added).
        """
        if not self.enabled:
            return 0, 0
        try:
            lines = _read_lines(self.path)
        except FileNotFoundError:
            lines = []
        except OSError as e:
            raise _problem("read", self.path, e) from None
        kept = [(rec, line) for line in lines if (rec := _parse(line)) is not None and rec["step"] <= step]
        dropped = len([line for line in lines if line.strip()]) - len(kept)
        have = {_identity(rec) for rec, _ in kept}
        extra = [(r, json.dumps(r)) for r in carried if r.get("step", step + 1) <= step and _identity(r) not in have]
        if extra:  # in step order, an evaluation record after its step's record
            kept = sorted([*kept, *extra], key=lambda pair: (pair[0]["step"], "loss" not in pair[0]))
        if dropped or extra:
            try:
                fileio.atomic_write(self.path, "".join(f"{line}\n" for _, line in kept).encode())
            except OSError as e:
                raise _problem("rewrite", self.path, e) from None
        return dropped, len(extra)

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
