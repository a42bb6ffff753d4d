"""Finding checkpoints from a path a user typed: a run, its checkpoints directory, or one checkpoint.

No torch import here, so ``list``, ``verify``, ``inspect`` and ``diff`` start instantly.
"""

from __future__ import annotations

from pathlib import Path

from launcher.checkpoint import files, meta
from launcher.checkpoint.files import CheckpointError


def checkpoints_root(path: Path) -> Path:
    """``RUN_DIR`` or ``RUN_DIR/checkpoints`` -> the checkpoints directory."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if path.is_dir() and (path.name == "checkpoints" or (path / meta.META).exists() or meta.scan(path)):
        return path
    raise CheckpointError(f"{path}: not a run directory (no checkpoints/ inside) and not a checkpoints directory")


def is_checkpoint(path: Path) -> bool:
    """``path`` looks like one checkpoint directory (it has a manifest or DCP metadata)."""
    path = Path(path)
    return path.is_dir() and ((path / files.MANIFEST).exists() or (path / files.DCP_METADATA).exists()
                              or (path / files.INFO).exists())


def newest_verified(root: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint a resume would pick, and one line per checkpoint skipped on the way."""
    names, notes = meta.candidates(root)
    skipped = list(notes)
    for name in names:
        check = files.verify(root / name)
        if check.ok:
            return root / name, skipped
        skipped.append(f"{name}: {check.reason()}")
    return None, skipped


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory as given, or a run directory's newest verified checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if is_checkpoint(path):
        return path
    found, skipped = newest_verified(checkpoints_root(path))
    if found is None:
        tried = "".join(f"\n  - {s}" for s in skipped) or " (no checkpoints)"
        raise CheckpointError(f"{path}: no checkpoint verifies; tried:{tried}")
    return found


def require_verified(path: Path) -> None:
    check = files.verify(path)
    if not check.ok:
        raise CheckpointError(f"{path} does not verify, refusing to read it: {check.reason()}")
