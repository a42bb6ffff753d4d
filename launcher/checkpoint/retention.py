"""Which checkpoints to delete: a pure function, so it is tested without a file system."""

from __future__ import annotations

from launcher.checkpoint.meta import step_of


def select_deletions(names: list[str], newest_verified: str, keep_last: int,
                     keep_every: int = 0, best: str | None = None) -> list[str]:
    """Checkpoint names that retention removes.

    Args:
        names: every checkpoint directory present (any order).
        newest_verified: the checkpoint just verified and published. Only checkpoints older
            than it are candidates: nothing is deleted that is not superseded by a verified
            newer one, and a save in flight (not yet in ``names``) is never touched.
        keep_last: how many of the newest checkpoints, ``newest_verified`` included, to keep.
        keep_every: keep every checkpoint whose step is a multiple of this (0 = none).
        best: the best checkpoint's name, always kept.
    """
    newest_step = step_of(newest_verified)
    if newest_step is None:
        return []
    ordered = sorted((n for n in names if step_of(n) is not None), key=step_of, reverse=True)
    keep = set(ordered[ordered.index(newest_verified):][:keep_last]) if newest_verified in ordered else set()
    keep.add(newest_verified)
    if best:
        keep.add(best)
    doomed = []
    for name in ordered:
        step = step_of(name)
        if step >= newest_step or name in keep:
            continue
        if keep_every and step % keep_every == 0:
            continue
        doomed.append(name)
    return doomed
