"""Checkpoints outside a training job: load whole, and write new verified ones.

Used by the ``launcher.ckpt`` tools. Everything here runs in one process without a process
group. A checkpoint is verified before anything in it is read; DCP's ``.metadata`` is read
with the restricted unpickler and values with ``weights_only=True`` (``dcp_io.py``).
"""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from launcher import exit_codes, fileio
from launcher.checkpoint import dcp_io, digest, files, layout
from launcher.checkpoint.files import CheckpointError
from launcher.checkpoint.find import require_verified
from launcher.checkpoint.record import CheckpointRecord, encode


class _SafeFullLoadPlanner(_EmptyStateDictLoadPlanner):
    """Rebuilds the whole state dict from the checkpoint's metadata (no template needed)."""

    load_bytes = dcp_io.SafeLoadPlanner.load_bytes


def load_full(path: Path, keys: list[str] | None = None) -> dict[str, Any]:
    """The whole saved state (or only the top-level ``keys``) of a verified checkpoint."""
    require_verified(path)
    state: dict[str, Any] = {}
    try:
        dcp_io.SafeFileSystemReader(str(path)).read_metadata()  # refused here, before torch logs its fallbacks
    except (pickle.UnpicklingError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read its DCP index: {e}") from None
    try:
        # dcp.load() fills only keys its argument already has; this is the call torch's own
        # dcp_to_torch_save makes to rebuild a state dict from nothing.
        _load_state_dict(state, storage_reader=dcp_io.SafeFileSystemReader(str(path)),
                         planner=_SafeFullLoadPlanner(keys=keys), no_dist=True)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise CheckpointError(f"{path}: cannot load: {e}") from None
    return state


def check_output(out: Path, record: CheckpointRecord) -> None:
    """Refuse an output directory that exists, or whose name claims another step than the checkpoint's.

    A directory named ``step_N`` in a run's ``checkpoints/`` is taken by ``--resume auto`` for
    step N; a checkpoint of another step under that name would roll the run back.
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise CheckpointError(f"{out} already exists; choose a new output path", exit_codes.CONFIG_ERROR)
    named = layout.step_of(out.name)
    if named is not None and named != record.step:
        raise CheckpointError(
            f"{out}: the name says step {named}, but this checkpoint is step {record.step}; a resume would take it "
            f"for step {named}. Name it {layout.checkpoint_name(record.step)}-<note> (or leave --out out)",
            exit_codes.CONFIG_ERROR)


def write_checkpoint(out: Path, state: dict[str, Any], record: CheckpointRecord) -> Path:
    """Write a new, verified checkpoint directory ``out`` (see :func:`check_output`).

    Same layout and commit steps as a training save (``layout.begin``/``seal``/``install``): written
    under ``.tmp-<name>``, digested while written, sealed with a (signed) manifest, verified in
    full, and renamed into place. It is not published in ``meta.json``: a resume uses it only
    when named with ``--resume PATH`` (or, named ``step_N`` for its own step, when it is the newest).
    """
    out = Path(out)
    check_output(out, record)
    scheme = digest.from_env()
    parent = out.parent
    record.name = out.name
    record.run_id = layout.run_id(parent) or record.run_id
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = layout.begin(parent, out.name)
    except OSError as e:
        raise CheckpointError(f"cannot create {out}: {fileio.describe_os_error(e)}") from None
    try:
        writer, fs = dcp_io.digesting_writer(tmp, scheme)
        dcp.save(state, storage_writer=writer, no_dist=True)
        data = encode(record)
        fileio.write_new(tmp / files.INFO, data)
        names = [n for n in fs.written.keys() | fs.unknown if n != files.INFO]
        listing = dcp_io.describe_written(tmp, names, fs)
        listing[files.INFO] = (len(data), digest.digest_bytes(scheme, data))
        layout.seal(tmp, files.make_manifest(scheme, out.name, record.step, record.run_id, listing), scheme)
        check = files.verify(tmp, name=out.name, scheme=scheme)
        if not check.ok:
            raise CheckpointError(f"new checkpoint failed verification: {check.reason()}")
        layout.install(parent, tmp, out.name)
    except OSError as e:
        raise CheckpointError(f"cannot write {out}: {fileio.describe_os_error(e)}") from None
    except CheckpointException as e:
        raise CheckpointError(f"cannot write {out}: {e}") from None
    finally:
        with contextlib.suppress(OSError):
            layout.remove_tree(tmp)
    return out
