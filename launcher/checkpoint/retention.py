"""Which checkpoints to delete: a pure function, so it is tested without a file system.

Milestones (a ``"milestone"`` label in ``checkpoint.json``, e.g. the end of a training phase)
are always kept; :func:`milestones` finds them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from launcher.checkpoint import files
from launcher.checkpoint.meta import step_of


def select_deletions(names: list[str], newest_verified: str, keep_last: int,
                     keep_every: int = 0, best: str | None = None, keep: Iterable[str] = ()) -> list[str]:
    """Checkpoint names that retention removes.

    Args:
        names: every checkpoint directory present (any order).
        newest_verified: the checkpoint just verified and published. Only checkpoints older
            than it are candidates: nothing is deleted that is not superseded by a verified
            newer one, and a save in flight (not yet in ``names``) is never touched.
        keep_last: how many of the newest checkpoints, ``newest_verified`` included, to keep.
        keep_every: keep every checkpoint whose step is a multiple of this (0 = none).
        best: the best checkpoint's name, always kept.
        keep: more names always kept (milestones).
    """
    newest_step = step_of(newest_verified)
    if newest_step is None:
        return []
    ordered = sorted((n for n in names if step_of(n) is not None), key=step_of, reverse=True)
    kept = set(ordered[ordered.index(newest_verified):][:keep_last]) if newest_verified in ordered else set()
    kept.add(newest_verified)
    if best:
        kept.add(best)
    kept.update(keep)
    doomed = []
    for name in ordered:
        step = step_of(name)
        if step >= newest_step or name in kept:
            continue
        if keep_every and step % keep_every == 0:
            continue
        doomed.append(name)
    return doomed


def milestones(root: Path, names: Iterable[str]) -> set[str]:
    """The checkpoints among ``names`` whose ``checkpoint.json`` carries a milestone label."""
    found = set()
    for name in names:
        try:
            if files.read_info(root / name).get("milestone"):
                found.add(name)
        except (OSError, ValueError):
            continue  # unreadable: not known to be a milestone (verification judges it)
    return found
