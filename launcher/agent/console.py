"""What ``ftrun`` prints: short lines in a user's words on the console, every detail in a log file.

The console gets ftrun's own lines (``[ftrun 10:13:07] ...``) and torch's elastic errors as
one line each. Tracebacks (torch logs one for every worker that exits non-zero) and torch's
warnings go only to ``RUN_DIR/logs/ftrun.log`` (every agent of the run appends to it; each
line names its host and process). Without a run directory there is no file, and the console
keeps everything.

The wording of failures, restarts and membership changes lives here too, so the agent and the
supervisor only say *what* happened.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from launcher import logs

log = logging.getLogger("ftrun")

TORCH_DIST = "torch.distributed"  # torch's registered logger: it has a handler of its own and stops there
# torch's own report of a worker that exited non-zero (with a traceback): ftrun words it itself,
# unless the worker raised an error nobody handled (ProcessRaisedException: a warm-started worker's
# traceback reaches the console only through this record), which keeps its traceback.
TORCH_WORKER_EXIT = "torch.distributed.elastic.multiprocessing.api"
WORKER_RAISED = "ProcessRaisedException"
LOG_FILE = "ftrun.log"


class _Console(logging.Filter):
    """On the console: no file-only records; torch's records only from ERROR up, one line each;
    a worker's unhandled error in full."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "file_only", False):
            return False
        if not record.name.startswith("torch"):
            return True
        if record.name == TORCH_WORKER_EXIT:
            raised = type(record.exc_info[1]).__name__ if record.exc_info else getattr(record, "exc_type", None)
            return raised == WORKER_RAISED  # (supervisor.RenderedTraceback keeps the type, drops exc_info)
        if record.levelno < logging.ERROR:
            return False
        record.msg, record.args = record.getMessage().splitlines()[0], None
        record.exc_info = record.exc_text = None
        return True


def setup(run_dir: Path | None) -> Path | None:
    """Route ftrun's and torch's elastic logging; return the log file, if there is one."""
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("[ftrun %(asctime)s] %(message)s", datefmt="%H:%M:%S"))
    handlers: list[logging.Handler] = [console]
    path = None
    if run_dir is not None:
        path = Path(run_dir) / "logs" / LOG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        detail = logging.FileHandler(path)
        detail.setFormatter(logging.Formatter(
            f"%(asctime)s [ftrun {socket.gethostname()} pid {os.getpid()}] %(levelname)s %(name)s: %(message)s",
            datefmt=logs.DATEFMT))
        handlers.append(detail)
        console.addFilter(_Console())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(logging.INFO)
    # torch gives "torch.distributed" a handler of its own and stops its records there (its
    # format, tracebacks included, on stderr); they come to ftrun's handlers instead.
    dist_log = logging.getLogger(TORCH_DIST)
    dist_log.propagate = False
    for h in list(dist_log.handlers):
        dist_log.removeHandler(h)
    for h in handlers:
        dist_log.addHandler(h)
    return path


# ---------------------------------------------------------------------------- wording

def worker_failure(ranks: list[dict[str, Any]]) -> str:
    """``"worker rank 1 was killed by SIGKILL"``, ``"workers rank 0 and 2 exited with code 1"``..."""
    if not ranks:
        return "a worker failed"
    parts = []
    for r in ranks:
        how = f"was killed by {r['signal']}" if r.get("signal") else f"exited with code {r.get('exit_code')}"
        parts.append(f"worker rank {r['rank']} {how}")
    return "; ".join(parts)


def restart_line(what: str, restart: int, budget: int, delay: float) -> str:
    wait = f" after {delay:.1f} s back-off" if delay else ""
    return f"{what}: restarting the job from its latest verified checkpoint{wait} (restart {restart} of {budget})"


def participants(rdzv_handler: Any) -> dict[str, int] | None:
    """The nodes of the rendezvous round just completed, ``"host, ftrun pid N"`` -> node rank.

    Read from the c10d rendezvous handler's state (``DynamicRendezvousHandler``; torch has no
    public accessor). None for other rendezvous backends, which then get the generic wording.
    """
    state = getattr(getattr(rdzv_handler, "_state_holder", None), "state", None)
    nodes = getattr(state, "participants", None)
    if not isinstance(nodes, dict) or not nodes:
        return None
    try:
        return {f"{n.addr}, ftrun pid {n.pid}": int(rank) for n, rank in nodes.items()}
    except (AttributeError, TypeError, ValueError):
        return None


def membership_line(before: dict[str, int], after: dict[str, int]) -> str | None:
    """``"the job re-formed with 2 node(s) after node 1 (host, ftrun pid 42) left; ..."``, or None if unchanged."""
    left = sorted((rank, name) for name, rank in before.items() if name not in after)
    joined = sorted(name for name in after if name not in before)
    if not left and not joined:
        return None
    parts = [f"node {rank} ({name}) left" for rank, name in left] + [f"a new node ({name}) joined" for name in joined]
    return f"the job re-formed with {len(after)} node(s) after " + " and ".join(parts)


def store_lost_line(endpoint: str, reform: int, allowed: int) -> str:
    return (f"the rendezvous at {endpoint} stopped answering (the node hosting it left); re-forming the job "
            f"with a new rendezvous (attempt {reform} of {allowed}, --store-reforms)")


def snapshot_wait_line(ranks: list[int], seconds: float, killed: list[int]) -> str:
    """The agent waited for survivors writing a snapshot of their step (``launcher/snapshot.py``)."""
    who = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
    line = f"waited {seconds:.1f} s for {who} to write a snapshot of the step they hold"
    if killed:
        line += f"; rank{'s' if len(killed) > 1 else ''} {', '.join(map(str, killed))} still running: stopped now"
    return line
