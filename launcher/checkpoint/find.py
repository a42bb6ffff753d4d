"""Finding checkpoints from a path a user typed: a run, its checkpoints directory, or one checkpoint.

No torch import here, so ``list``, ``verify``, ``inspect`` and ``diff`` start instantly. The
rules (what counts as a checkpoint, which one a resume would pick) are ``layout.py``'s.
"""

from __future__ import annotations

from pathlib import Path

from launcher import exit_codes
from launcher.checkpoint import files, layout
from launcher.checkpoint.files import CheckpointError


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory as given, or a run directory's newest verified checkpoint.

    Raises:
        CheckpointError: the path does not exist (code 2), or no checkpoint of the run verifies.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory", exit_codes.CONFIG_ERROR)
    if layout.is_checkpoint_dir(path):
        return path
    root = layout.checkpoints_root(path)
    choice = layout.choose(root)
    if choice.path is None:
        tried = "".join(f"\n  - {s}" for s in [*choice.notes, *choice.skipped]) or " (no checkpoints)"
        raise CheckpointError(f"{path}: no checkpoint verifies; tried:{tried}")
    return choice.path


def require_verified(path: Path) -> files.Verification:
    """Verify ``path`` against the run it sits in, or raise CheckpointError naming every problem."""
    check = files.verify(path, expected_run=layout.run_id(Path(path).parent))
    if not check.ok:
        raise CheckpointError(f"{path} does not verify, refusing to read it: {check.reason()}")
    return check
