"""Rank-tagged, timestamped logging: rank 0 at INFO, other ranks at WARNING, a file per rank.

The console is for what a user acts on; ``RUN_DIR/logs/rank<N>.log`` keeps everything,
tracebacks included. A record logged with ``extra=FILE_ONLY`` goes to the file alone: an
expected failure (a lost peer, Ctrl-C) prints one line on the console and its traceback only
in the file.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

from launcher import fileio

FORMAT = "%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"
FILE_ONLY = {"file_only": True}  # pass as ``extra=`` to keep a record off the console


def rank_log(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / "logs" / f"rank{rank}.log"


class _NotFileOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


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
        run_dir: if given, also write the rank's log file now (see :func:`attach_file`).
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(FORMAT.format(rank=rank), datefmt=DATEFMT))
    console.setLevel(level.upper() if level else (logging.INFO if rank == 0 else logging.WARNING))
    console.addFilter(_NotFileOnly())
    root.addHandler(console)
    # Records before the file is attached are kept here and written to it when it is (a run
    # that turns out to be finished never attaches it, and its records go nowhere).
    pending = _Pending(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    pending.setLevel(_file_level(level))
    root.addHandler(pending)
    root.setLevel(_file_level(level))
    if run_dir is not None:
        attach_file(rank, run_dir, level)


def _file_level(level: str | None) -> int:
    return logging.DEBUG if level and level.upper() == "DEBUG" else logging.INFO


class _Pending(logging.handlers.MemoryHandler):
    """Holds records until the rank's log file exists."""


def attach_file(rank: int, run_dir: Path, level: str | None = None) -> Path:
    """Also write every record of this rank to ``run_dir/logs/rank<N>.log`` (INFO, or DEBUG if asked).

    Separate from :func:`setup` so that a run that turns out to have nothing to do (already
    finished) leaves its run directory untouched. The records logged before are written first.
    Calling it again does nothing.
    """
    path = rank_log(run_dir, rank)
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) and h.baseFilename == os.path.abspath(path) for h in root.handlers):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = _LogFile(path)
    fh.setFormatter(logging.Formatter(FORMAT.format(rank=rank), datefmt=DATEFMT))
    fh.setLevel(_file_level(level))
    for pending in [h for h in root.handlers if isinstance(h, _Pending)]:
        pending.setTarget(fh)
        pending.flush()
        root.removeHandler(pending)
    root.addHandler(fh)
    return path
