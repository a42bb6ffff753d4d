"""Failpoints: a testing aid that kills the process at a named instant of a checkpoint save or a step.

Set ``FTLAUNCH_FAILPOINT=POINT[:STEP[:RANK]]`` and the process SIGKILLs itself when a save
reaches ``POINT`` (only for the save of ``STEP`` and only on ``RANK``, when given). SIGKILL
gives no chance to clean up, exactly like a node losing power or the OOM killer, so the
chaos tests use it to prove that a save interrupted at any of these instants leaves the old
checkpoint or the new one, never a half-written one that gets loaded.

Points, in the order a save reaches them:

==================  ========================================================================
``mid_shard``       inside ``dcp.save``: the first bytes of this rank's ``.distcp`` shard are
                    on disk, the rest are not (a truncated shard in ``.tmp-step_N``)
``after_dcp_save``  every file of this rank's shard is written; no manifest yet
``after_manifest``  rank 0: ``manifest.json`` is written in ``.tmp-step_N``, not yet renamed
``after_rename``    rank 0: ``step_N`` is in place, ``meta.json`` still names the previous one
``after_meta``      rank 0: ``meta.json`` names ``step_N``; retention has not run
==================  ========================================================================

And three instants of the training loop (``STEP``: the steps completed when it is reached), for
the just-in-time snapshots of the survivors (``launcher/snapshot.py``):

==================  ========================================================================
``step_start``      a step begins (``resume()`` or ``end_step()`` returned): the other ranks
                    meet the loss in the step's first collective, at a clean boundary
``optimizer_step``  inside the step's first optimizer ``step()``, after its collectives: the
                    other ranks finish the step (with its metrics when it reported them early)
``evaluation``      ``end_step()`` is about to run the step's evaluation: the other ranks meet
                    the loss in the evaluation's collectives
==================  ========================================================================

With ``FTLAUNCH_FAILPOINT_ONCE=PATH`` a failpoint fires once: it creates ``PATH`` before the
kill and never fires while ``PATH`` exists (the restarted workers of an agent keep the variable).

Never set it outside tests: it exists to lose work on purpose.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

ENV = "FTLAUNCH_FAILPOINT"
ONCE_ENV = "FTLAUNCH_FAILPOINT_ONCE"
POINTS = ("mid_shard", "after_dcp_save", "after_manifest", "after_rename", "after_meta", "step_start",
          "optimizer_step", "evaluation")


@dataclass(frozen=True)
class Failpoint:
    point: str
    step: int | None = None
    rank: int | None = None

    def matches(self, point: str, step: int, rank: int) -> bool:
        return (point == self.point and (self.step is None or step == self.step)
                and (self.rank is None or rank == self.rank))


def parse(text: str) -> Failpoint | None:
    """``POINT[:STEP[:RANK]]`` -> Failpoint; empty -> None; anything else raises ValueError."""
    if not text:
        return None
    parts = text.split(":")
    if parts[0] not in POINTS or len(parts) > 3:
        raise ValueError(f"{ENV}={text!r}: expected POINT[:STEP[:RANK]] with POINT one of {', '.join(POINTS)}")
    try:
        numbers = [int(p) if p else None for p in parts[1:]]
    except ValueError:
        raise ValueError(f"{ENV}={text!r}: STEP and RANK must be integers") from None
    return Failpoint(parts[0], *numbers)


def active() -> Failpoint | None:
    return parse(os.environ.get(ENV, ""))


def hit(point: str, step: int, rank: int, fp: Failpoint | None = None) -> None:
    """SIGKILL this process if the failpoint in the environment (or ``fp``) names this instant."""
    fp = fp or active()
    if fp is not None and fp.matches(point, step, rank):
        once = os.environ.get(ONCE_ENV)
        if once:
            try:
                os.close(os.open(once, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            except FileExistsError:
                return  # fired before
        os.kill(os.getpid(), signal.SIGKILL)


class _DyingStream:
    """A file stream that SIGKILLs the process right after its first write reaches the disk."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, data) -> int:
        n = self._stream.write(data)
        self._stream.flush()
        os.fsync(self._stream.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
        return n

    def __getattr__(self, name):
        return getattr(self._stream, name)


def arm_writer(fs, step: int, rank: int) -> None:
    """Make ``fs`` (a ``dcp_io.DigestFileSystem``) die mid-shard if ``mid_shard`` names this save."""
    fp = active()
    if fp is not None and fp.matches("mid_shard", step, rank):
        fs.stream_hook = lambda stream: _DyingStream(stream) if stream.name.endswith(".distcp") else stream
