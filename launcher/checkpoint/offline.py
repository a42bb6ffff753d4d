"""Checkpoints outside a training job: find, load whole, and write new verified ones.

Used by the ``launcher.ckpt`` tools. Everything here runs in one process without a process
group; loading unpickles non-tensor values with ``weights_only=True`` only.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from launcher.checkpoint import files, meta
from launcher.checkpoint.files import CheckpointError
from launcher.checkpoint.find import require_verified
from launcher.checkpoint.manager import SafeLoadPlanner


class _SafeFullLoadPlanner(_EmptyStateDictLoadPlanner):
    """Rebuilds the whole state dict from the checkpoint's metadata (no template needed)."""

    load_bytes = SafeLoadPlanner.load_bytes


def load_full(path: Path, keys: list[str] | None = None) -> dict[str, Any]:
    """The whole saved state (or only the top-level ``keys``) of a verified checkpoint."""
    require_verified(path)
    state: dict[str, Any] = {}
    try:
        # dcp.load() fills only keys its argument already has; this is the call torch's own
        # dcp_to_torch_save makes to rebuild a state dict from nothing.
        _load_state_dict(state, storage_reader=dcp.FileSystemReader(str(path)),
                         planner=_SafeFullLoadPlanner(keys=keys), no_dist=True)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise CheckpointError(f"{path}: cannot load: {e}") from None
    return state


def write_checkpoint(out: Path, state: dict[str, Any], info: dict[str, Any]) -> None:
    """Write a new, verified checkpoint directory ``out`` (refused if it exists).

    Same layout and commit protocol as a training save: written under ``.tmp-<name>``,
    manifest last, renamed into place only once it verifies.
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise CheckpointError(f"{out} already exists; choose a new output path")
    tmp = out.parent / f"{meta.TMP_PREFIX}{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True), no_dist=True)
        files.atomic_write_json(tmp / files.INFO, {**info, "name": out.name})
        names = sorted(p.name for p in tmp.iterdir() if p.name != files.MANIFEST)
        files.write_manifest(tmp, files.describe_files(tmp, names))
        check = files.verify(tmp)
        if not check.ok:
            raise CheckpointError(f"new checkpoint failed verification: {check.reason()}")
        os.rename(tmp, out)
        files.fsync_path(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
