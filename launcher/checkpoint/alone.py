"""A checkpoint written by one process alone: a survivor's just-in-time snapshot.

When a peer is lost the process group is broken, so a survivor cannot use the collective save
of :mod:`launcher.checkpoint.manager`. Under data parallelism every rank holds the whole state,
so one survivor writes all of it, with DCP in one process (``no_dist=True``: no collective),
and commits it through the same steps of :mod:`launcher.checkpoint.layout` as every checkpoint.
It therefore verifies exactly like one: manifest of digests taken while writing, signature and
run identity with a key, ``checkpoint.json`` (whose ``snapshot_rank`` says who wrote it).

1. :func:`layout.begin`: ``.tmp-step_N.snapshot-rank<R>``, each survivor its own directory, so
   the survivors of one failure never write into the same files;
2. DCP writes ``.metadata`` and ``__0_0.distcp`` (digested as written), then ``checkpoint.json``;
3. :func:`layout.seal` (manifest, fsync, check);
4. :func:`layout.install_new`: the rename to ``step_N`` lands for the first survivor only (a
   rename never replaces a non-empty directory): exactly one snapshot per failure wins;
5. :func:`layout.publish`: the winner points ``meta.json`` at it.

Retention does not run here: nothing is deleted by a process in the middle of a failure. The
next save's retention removes an unscheduled snapshot once a newer checkpoint is verified. A
process killed anywhere leaves a ``.tmp-`` directory that the next start removes, or a complete
``step_N`` that the resume finds by scanning.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from launcher import fileio
from launcher.checkpoint import dcp_io, digest, files, layout, meta
from launcher.checkpoint.files import CheckpointError
from launcher.checkpoint.record import CheckpointRecord, encode


@dataclass
class Written:
    """What became of one survivor's snapshot."""

    path: Path | None  # the snapshot now in place, None when it was not this one
    seconds: float  # from the start of the write to its publication (or to giving up)
    note: str  # for the one-line report: "wrote step_00000037", "another survivor's snapshot ..."


def write(root: Path, state: dict[str, Any], record: CheckpointRecord, scheme: digest.Scheme,
          rank: int, best: tuple[str, str]) -> Written:
    """Write ``state`` as checkpoint ``record.name`` under ``root``, alone; publish it if it lands first.

    Raises:
        CheckpointError: the write failed (disk full, I/O error); nothing was published.
    """
    started = time.perf_counter()
    name = record.name
    if os.path.lexists(root / name):
        return Written(None, 0.0, f"{name} is already in place")
    tmp = layout.begin(root, f"{name}.snapshot-rank{rank}")
    try:
        listing = _fill(tmp, state, record, scheme)
        layout.seal(tmp, files.make_manifest(scheme, name, record.step, record.run_id, listing), scheme)
        if not layout.install_new(root, tmp, name):
            return Written(None, time.perf_counter() - started, f"another survivor's snapshot {name} landed first")
        old, _ = meta.read_meta(root)
        best_now = layout.next_best(root, old.best if old else None, name, record, *best)
        layout.publish(root, name, record, record.world_size, best_now, doomed=[])
    except OSError as e:
        raise CheckpointError(f"snapshot {name}: {fileio.describe_os_error(e)}") from None
    finally:
        layout.remove_tree(tmp)  # gone already when it landed
    return Written(root / name, time.perf_counter() - started, f"wrote {name}")


def _fill(tmp: Path, state: dict[str, Any], record: CheckpointRecord,
          scheme: digest.Scheme) -> dict[str, tuple[int, str]]:
    """DCP's files and ``checkpoint.json`` in ``tmp``; returns each file's size and digest."""
    writer, fs = dcp_io.digesting_writer(tmp, scheme)
    try:
        with warnings.catch_warnings():  # DCP warns that no_dist means "a single process": it does here
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, storage_writer=writer, no_dist=True)
    except CheckpointException as e:
        raise CheckpointError(f"writing snapshot {record.name} to {tmp} failed: {e}") from None
    listing = dcp_io.describe_written(tmp, sorted(os.listdir(tmp)), fs)
    data = encode(record)
    fileio.write_new(tmp / files.INFO, data)
    return {**listing, files.INFO: (len(data), digest.digest_bytes(scheme, data))}
