"""Rank-tagged, timestamped logging: rank 0 at INFO, other ranks at WARNING, a file per rank."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from launcher import fileio

FORMAT = "%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"


class _LogFile(logging.FileHandler):
    """A FileHandler that refuses a symlink or FIFO planted at the log's path (``fileio.open_append``).

    A write that fails (a full disk) is reported once on stderr, in one line, and the file is
    given up; the console keeps every message. logging's default prints a traceback per record.
    """

    def _open(self):
        return fileio.open_append(Path(self.baseFilename))

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
            return
        if self.level != logging.CRITICAL + 1:
            sys.stderr.write(f"cannot write the log file {self.baseFilename}: {fileio.describe_os_error(error)}; "
                             f"logging to the console only\n")
            self.setLevel(logging.CRITICAL + 1)


def setup(rank: int, level: str | None = None, run_dir: Path | None = None) -> None:
    """Configure the root logger for this rank.

    Args:
        rank: global rank, shown on every line.
        level: ``--log-level``; default INFO on rank 0 and WARNING elsewhere.
        run_dir: if given, every rank also writes ``run_dir/logs/rank<N>.log`` at INFO.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter(FORMAT.format(rank=rank), datefmt="%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(level.upper() if level else (logging.INFO if rank == 0 else logging.WARNING))
    root.addHandler(console)
    root.setLevel(logging.DEBUG if level and level.upper() == "DEBUG" else logging.INFO)
    if run_dir is not None:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        fh = _LogFile(run_dir / "logs" / f"rank{rank}.log")
        fh.setFormatter(fmt)
        fh.setLevel(logging.DEBUG if level and level.upper() == "DEBUG" else logging.INFO)
        root.addHandler(fh)
