"""How a worker ends on an expected failure: one line that says what happened; the detail in its log.

Two failures are expected by design and are not bugs, so they get no traceback on the console:

* **Ctrl-C** (SIGINT, from the terminal or forwarded by torchrun/ftrun): the worker stops at
  once and prints ``Interrupted at step N; latest verified checkpoint step M; run the same
  command to resume``; exit code 130. A half-written checkpoint is never used (see
  ``launcher/checkpoint/manager.py``), so stopping mid-save loses nothing verified.
* **A lost peer**: another process or node of the job stopped, so a collective here failed
  (gloo "Connection reset by peer", a store connection closed, an NCCL communicator aborted).
  The worker says so in one line, with where the job will resume, and exits 1 so that its
  agent restarts the job.

On each node only local rank 0 prints the line; every rank writes it, with the traceback, to
``RUN_DIR/logs/rank<N>.log``. Anything else (a bug, bad data deep in a trainer) is not
handled here and keeps its traceback.

A survivor of a failed collective first writes a verified snapshot of the step boundary it
holds, when it can (``launcher/snapshot.py``); its one line says what became of it, and where
the job resumes.
"""

from __future__ import annotations

import logging
import re
import signal
import time
from pathlib import Path
from typing import ClassVar

from launcher import events, exit_codes, logs, runfiles
from launcher.env import ClusterEnv

log = logging.getLogger("launcher")

# Parts of the messages of errors raised when a peer process or the store went away.
PEER_MARKERS = ("connection reset by peer", "connection closed by peer", "broken pipe", "connection refused",
                "failed to recv", "connection was likely closed", "socket timeout", "timed out waiting",
                "connectfullmesh", "nccl communicator was aborted", "ncclremoteerror", "ncclsystemerror")
# torch's error classes for a failed collective or store operation (torch.distributed.DistError and kin).
DIST_ERRORS = frozenset({"DistError", "DistNetworkError", "DistStoreError", "DistBackendError"})


def interrupt_received() -> bool:
    """Whether this process got Ctrl-C (through the installed :class:`InterruptFlag`).

    A collective that fails after it is the job being interrupted, not a lost peer: no snapshot,
    and the interrupt's own one line ends the run.
    """
    flag = InterruptFlag.installed
    return flag is not None and flag.raised


class InterruptFlag:
    """Ctrl-C: remembers that SIGINT arrived, then raises ``KeyboardInterrupt`` as Python's own handler does.

    The flag matters when the interrupt surfaces as another error: a rank whose peer was
    interrupted first sees its collective fail before its own ``KeyboardInterrupt`` is raised.
    A repeat within ``REPEAT_WINDOW`` seconds is the same Ctrl-C delivered twice (the terminal
    signals the whole process group, and torchrun/ftrun forward it to their workers): it is
    ignored, so it cannot break off the report of the first. A later one interrupts the stop.
    """

    REPEAT_WINDOW = 2.0
    installed: ClassVar[InterruptFlag | None] = None  # the process's handler (interrupt_received())

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.count = 0
        self.reported = False  # the one line was printed
        self._first: float | None = None

    @property
    def raised(self) -> bool:
        return self.count > 0

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._handle)
        InterruptFlag.installed = self

    def _handle(self, signum, frame) -> None:
        now = self.clock()
        if self._first is not None and now - self._first < self.REPEAT_WINDOW:
            return
        self._first = self._first if self._first is not None else now
        self.count += 1
        raise KeyboardInterrupt


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def is_peer_failure(exc: BaseException) -> bool:
    """The error means another process or node of the job stopped (or the store host did)."""
    for e in _chain(exc):
        if any(c.__name__ in DIST_ERRORS for c in type(e).__mro__):
            return True
        # gloo raises plain RuntimeErrors; a ValueError that mentions a connection is a bug of ours.
        if isinstance(e, (RuntimeError, ConnectionError)) and any(m in str(e).lower() for m in PEER_MARKERS):
            return True
    return False


def short_reason(exc: BaseException) -> str:
    """The first line of the error, without torch's source location and advice boilerplate."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", text)
    text = text.split(". This is typically caused")[0].rstrip(".")
    return text if len(text) <= 160 else text[:157] + "..."


def latest_checkpoint_step(run_dir: Path) -> int | None:
    """The step of the latest verified checkpoint (``meta.json`` names only verified ones)."""
    step = runfiles.checkpoint_meta(run_dir).get("step")
    return step if isinstance(step, int) else None


def interrupted_line(step: int | None, checkpoint_step: int | None) -> str:
    where = f"at step {step}" if step is not None else "before training started"
    if checkpoint_step is None:
        return f"Interrupted {where}; no verified checkpoint yet; run the same command to start again"
    return f"Interrupted {where}; latest verified checkpoint step {checkpoint_step}; run the same command to resume"


def _say(env: ClusterEnv, run_dir: Path | None, message: str, exc: BaseException | None, level: int) -> None:
    """``message`` on the console of local rank 0; the traceback (if any) in every rank's log file."""
    if env.local_rank == 0:
        log.log(level, "%s", message)
    else:
        log.log(level, "%s", message, extra=logs.FILE_ONLY)
    if exc is not None and run_dir is not None:
        log.log(level, "Details of the error above:", exc_info=exc, extra=logs.FILE_ONLY)


def interrupted(env: ClusterEnv, run_dir: Path, step: int | None, flag: InterruptFlag | None,
                exc: BaseException | None = None) -> int:
    """Report Ctrl-C once and return exit code 130; ``step`` is None before training started."""
    if flag is None or not flag.reported:
        _say(env, run_dir, interrupted_line(step, latest_checkpoint_step(run_dir)), exc, logging.WARNING)
        if step is not None and env.rank == 0:
            # A deliberate stop: the run's wall time (launcher/goodput.py) pauses until the next start.
            events.append(run_dir, "run_end", status="interrupted", step=step)
    if flag is not None:
        flag.reported = True
    return exit_codes.INTERRUPTED


def peer_lost(env: ClusterEnv, run_dir: Path, step: int | None, exc: BaseException, snapshot: str = "") -> int:
    """Report a failed collective (another process or node stopped) in one line; return exit code 1.

    ``snapshot`` says what became of this rank's snapshot (``launcher/snapshot.py``), if it tried one.
    """
    ckpt = latest_checkpoint_step(run_dir)
    where = f"at step {step}" if step is not None else "while starting"
    resume = f"the latest verified checkpoint (step {ckpt})" if ckpt is not None else "the start (no checkpoint yet)"
    if env.restart_count < env.max_restarts:
        then = f"the launcher restarts the job from {resume}"
    else:
        then = f"run the same command to resume from {resume}"
    done = f"; {snapshot}" if snapshot else ""
    _say(env, run_dir, f"Lost contact with the rest of the job {where}: another process or node stopped "
                       f"({short_reason(exc)}){done}; {then}. Details: {logs.rank_log(run_dir, env.rank)}",
         exc, logging.ERROR)
    return 1
