"""Start-up steps of a run that every rank takes together: the lock, shared outcomes, the init source.

A start-up step that fails on one rank must fail on every rank at the same point: rank 0 alone
takes the lock and writes the run's files, and a rank left waiting in its next collective for a
rank that gave up would only learn of it when the collective times out (300 s by default).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist
from filelock import FileLock, Timeout

from launcher import dist as ldist
from launcher import exit_codes, fileio
from launcher.checkpoint import files, find
from launcher.checkpoint.files import CheckpointError
from launcher.checkpoint.record import RecordError

log = logging.getLogger("launcher")

T = TypeVar("T")


def lock_run_dir(run_dir: Path, ctx: ldist.DistContext) -> FileLock | None:
    """Refuse a second live job on ``run_dir`` (the lock dies with its holder); rank 0 holds it.

    The holder then removes temporary files that killed writes of ours left in the run
    directory (no other writer of ours can be active there now).
    """
    outcome: list[str | None] = [None]
    lock = None
    if ctx.is_main:
        lock = FileLock(str(run_dir / ".lock"))
        try:
            lock.acquire(timeout=0)
            for name in fileio.clean_leftovers(run_dir):
                log.info("Removed %s, left by an interrupted write", name)
        except Timeout:
            lock = None
            outcome[0] = (f"{run_dir} is in use by another live job (lock {run_dir / '.lock'} "
                          f"is held). Wait for it to finish or stop it, or choose another --run-dir.")
        except OSError as e:
            lock = None
            outcome[0] = f"cannot lock the run directory: {fileio.describe_os_error(e)}"
    if ctx.world_size > 1:
        dist.broadcast_object_list(outcome, src=0, group=ctx.ckpt_group)
    if outcome[0]:
        raise CheckpointError(outcome[0])
    return lock


def together(step: Callable[[], T], ctx: ldist.DistContext) -> T:
    """Run one start-up ``step`` on every rank; if it fails on any rank, fail on every rank.

    Each rank shares its outcome before going on, so a rank that failed never leaves the
    others waiting in a collective until the timeout.

    Raises:
        CheckpointError: on every rank, with the first failing rank's message and exit code.
    """
    error, result = None, None
    try:
        result = step()
    except CheckpointError as e:
        error = (str(e), e.code)
    except (RecordError, OSError) as e:
        error = (fileio.describe_os_error(e) if isinstance(e, OSError) else str(e), exit_codes.CHECKPOINT_ERROR)
    errors = ldist.agree(error, ctx.ckpt_group, ctx.world_size)
    if errors:
        message, code = errors[0]
        raise CheckpointError(message if error else f"{message} (reported by another rank)", code)
    return result  # type: ignore[return-value]


def init_source(init_from: Path, ctx: ldist.DistContext) -> Path:
    """The verified checkpoint ``init_from`` names (a checkpoint, or a run's newest), the same on every rank.

    Raises:
        CheckpointError: it does not exist or does not verify (on every rank).
    """
    outcome: list[Any] = [None]
    if ctx.is_main:
        try:
            found = find.resolve_checkpoint(init_from)
            check = files.verify(found)
            outcome[0] = ("ok", str(found)) if check.ok else ("error", f"{found} does not verify: {check.reason()}")
        except CheckpointError as e:
            outcome[0] = ("error", str(e))
    if ctx.world_size > 1:
        dist.broadcast_object_list(outcome, src=0, group=ctx.ckpt_group)
    status, value = outcome[0]
    if status == "error":
        raise CheckpointError(f"--init-from {init_from}: {value}")
    return Path(value)
