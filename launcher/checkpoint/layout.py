"""The checkpoint-directory layout: names, listing, the resume choice, retention, the commit steps.

This module (torch-free) is the one owner of every rule about which directories under
``RUN_DIR/checkpoints`` count and what happens to them. The checkpoint manager (training),
the offline writer (``ckpt set-lr``) and the tools (``list``, ``verify``, ``inspect``,
``prune``) all call it, so they cannot drift apart::

    checkpoints/
      meta.json                 pointer to the latest verified checkpoint (meta.py)
      step_00000120/            a checkpoint; the name is exactly step_<step:08d>
      .tmp-step_00000140/       a save in progress, or killed: never loaded, removed at start
      .trash-step_00000100/     a checkpoint being replaced by a new save of the same step:
                                put back at start if the new one is not in place
      .deleting-step_00000080/  set aside by retention: deleted in the background, or at start
      step_00000120-lr0.0005/   anything else (a set-lr output, notes): ignored by resume and retention

A save commits in four steps: :func:`begin` (an empty ``.tmp-`` directory), the writers fill
it, :func:`seal` (manifest, fsync, check), :func:`install` (rename into place), :func:`publish`
(``meta.json``; only then does the checkpoint count as the latest), then retention sets aside
what :func:`plan_retention` selects (:func:`set_aside`) and deletes it (:func:`delete`).
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from launcher import exit_codes, fileio
from launcher.checkpoint import digest, files, meta
from launcher.checkpoint.record import SNAPSHOT, CheckpointRecord, RecordError, read_record

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
DELETING_PREFIX = ".deleting-"
KEEP_VERIFIED = 5  # length of meta.json's list of verified checkpoints
_NAME = re.compile(r"step_(\d{8,})")


# ---------------------------------------------------------------------------- names

def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    """The step a checkpoint directory name stands for; None unless it is exactly ``checkpoint_name(step)``."""
    m = _NAME.fullmatch(name)
    if m is None:
        return None
    step = int(m.group(1))
    return step if checkpoint_name(step) == name else None


def new_run_id() -> str:
    return uuid.uuid4().hex


class UnsafeEntry(ValueError):
    """A name from ``meta.json`` or a directory listing that would leave the checkpoints directory."""


def safe_entry(root: Path, name: object) -> Path:
    """Resolve a ``meta.json`` entry to a path inside ``root``, or raise UnsafeEntry."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
        raise UnsafeEntry(f"meta.json entry {name!r} is not a plain directory name")
    path = root / name
    if path.is_symlink() and root.resolve() not in path.resolve().parents:
        raise UnsafeEntry(f"checkpoint directory {name!r} is a symlink pointing outside {root}")
    return path


def is_entry(root: Path, name: object) -> bool:
    """``name`` is a safe, existing directory under ``root``."""
    try:
        return safe_entry(root, name).is_dir()
    except UnsafeEntry:
        return False


# ---------------------------------------------------------------------------- listing

def scan(root: Path) -> list[str]:
    """Checkpoint directory names under ``root`` (exact ``step_N`` names only), newest step first."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    names = [e.name for e in entries if step_of(e.name) is not None and e.is_dir()]
    return sorted(names, key=lambda n: step_of(n) or -1, reverse=True)


def checkpoints_root(path: Path) -> Path:
    """``RUN_DIR`` or ``RUN_DIR/checkpoints`` -> the checkpoints directory."""
    path = Path(path)
    if not path.exists():
        raise files.CheckpointError(f"{path}: no such file or directory", exit_codes.CONFIG_ERROR)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if path.is_dir() and (path.name == "checkpoints" or (path / meta.META).exists() or scan(path)):
        return path
    raise files.CheckpointError(f"{path}: not a run directory (no checkpoints/ inside) and not a checkpoints directory",
                          exit_codes.CONFIG_ERROR)


def is_checkpoint_dir(path: Path) -> bool:
    """``path`` looks like one checkpoint directory (it has a manifest, DCP metadata or a checkpoint.json)."""
    path = Path(path)
    return path.is_dir() and any(os.path.lexists(path / n) for n in (files.MANIFEST, files.DCP_METADATA,
                                                                      files.INFO))


def run_id(root: Path) -> str | None:
    """The run identity recorded in ``root/meta.json`` (None without one)."""
    m, _ = meta.read_meta(root)
    return m.run_id if m and m.run_id else None


# ---------------------------------------------------------------------------- the resume choice

def candidates(root: Path) -> tuple[list[str], list[str]]:
    """Names to try on resume, best guess first, and notes on what was skipped.

    Directories newer than ``meta.json``'s latest come first (a save killed after its rename and
    before ``meta.json`` was rewritten is complete), then ``latest`` and its ``verified`` list,
    then every other checkpoint directory, newest first: a lost or stale ``meta.json`` still
    finds the answer.
    """
    m, notes = meta.read_meta(root)
    scanned = scan(root)
    if m is None and not scanned:
        notes = []
    elif m is None:
        notes = [f"{notes[0]}; scanning the checkpoint directories instead"]
    ordered: list[str] = []
    for name in ([m.latest, *m.verified] if m else []):
        try:
            path = safe_entry(root, name)
        except UnsafeEntry as e:
            notes.append(str(e))
            continue
        if not path.is_dir():
            notes.append(f"meta.json points at {name}, which is not there")
        elif name not in ordered and step_of(name) is not None:
            ordered.append(name)
    newest_listed = max((step_of(n) or -1 for n in ordered), default=-1)
    newer = [n for n in scanned if (step_of(n) or -1) > newest_listed and n not in ordered]
    older = [n for n in scanned if n not in ordered and n not in newer]
    safe = []
    for name in [*newer, *ordered, *older]:
        try:
            safe_entry(root, name)
            safe.append(name)
        except UnsafeEntry as e:
            notes.append(str(e))
    return safe, notes


@dataclass
class Choice:
    """The outcome of looking for the checkpoint to resume from."""

    path: Path | None  # None: nothing verifies (or there is nothing)
    verification: files.Verification | None = None
    skipped: list[str] = field(default_factory=list)  # "name: reason" for each one that failed
    notes: list[str] = field(default_factory=list)  # problems with meta.json or entries


def choose(root: Path, check: Callable[[Path, str | None], files.Verification] | None = None) -> Choice:
    """The newest checkpoint under ``root`` that verifies, in :func:`candidates` order.

    Args:
        root: the checkpoints directory.
        check: ``(path, expected_run) -> Verification``; default a full :func:`files.verify`.
    """
    check = check or (lambda path, run: files.verify(path, expected_run=run))
    names, notes = candidates(root)
    expected = run_id(root)
    skipped = []
    for name in names:
        v = check(root / name, expected)
        if v.ok:
            return Choice(root / name, v, skipped, notes)
        skipped.append(f"{name}: {v.reason()}")
    return Choice(None, None, skipped, notes)


def nothing_verifies(root: Path, skipped: list[str]) -> files.CheckpointError:
    listing = "\n".join(f"  - {s}" for s in skipped)
    return files.CheckpointError(
        f"No valid checkpoint in {root}; tried, newest first:\n{listing}\n"
        f"Nothing was loaded and nothing was deleted. Restore a checkpoint from backup, point --resume "
        f"at a good one, or start over in a new --run-dir.")


# ---------------------------------------------------------------------------- retention

@dataclass(frozen=True)
class Entry:
    """One checkpoint directory as retention sees it."""

    name: str
    step: int
    verified: bool
    milestone: str | None = None
    snapshot: bool = False  # a just-in-time snapshot at a step where no checkpoint was due


def plan_retention(entries: list[Entry], newest: str, keep_last: int, keep_every: int = 0,
                   best: str | None = None) -> list[str]:
    """Names retention deletes (a pure function: tested without a file system).

    Only checkpoints older than ``newest`` (the one just verified and published) are candidates,
    so nothing is deleted that a verified newer one does not supersede, and nothing newer is
    touched. Of those, the ``keep_last - 1`` newest that *verify* are kept (``newest`` is the
    first of ``keep_last``); one that does not verify never counts and is deleted, so a
    verified checkpoint is never deleted while an unverifiable one is kept. The best, every
    milestone (a ``milestone`` label in its ``checkpoint.json``) and every ``keep_every``-th step
    are always kept. A snapshot a survivor wrote at a step where no checkpoint was due
    (``snapshot``) is a resume point only: it neither counts toward ``keep_last`` nor stays once
    a newer checkpoint verifies.
    """
    newest_step = step_of(newest)
    if newest_step is None:
        return []
    doomed, counted = [], 1
    for e in sorted(entries, key=lambda e: e.step, reverse=True):
        if e.step >= newest_step:
            continue
        if e.verified and counted < keep_last and not e.snapshot:
            counted += 1
            continue
        if e.name == best or e.milestone is not None or (keep_every and e.step % keep_every == 0):
            continue
        doomed.append(e.name)
    return doomed


def survey(root: Path, below: int, known: dict[str, bool] | None = None, deep: bool = False,
           cache: dict[str, Entry] | None = None) -> list[Entry]:
    """Retention's view of every checkpoint older than step ``below`` (symlinks are never entries).

    Args:
        known: verification outcomes already established in this process (name -> ok).
        deep: recompute digests of the others (``ckpt prune``); otherwise they are checked by
            manifest, signature, names, types and sizes (cheap, once per save).
        cache: entries surveyed before by this process, reused as they are (a checkpoint does
            not change once written) and updated; keeps each save's survey short in a run
            that keeps hundreds of milestones.
    """
    known = known or {}
    cache = {} if cache is None else cache
    expected = run_id(root)
    out = []
    for name in scan(root):
        step = step_of(name) or 0
        path = root / name
        if step >= below or path.is_symlink():
            continue
        if name not in cache or (name in known and cache[name].verified != known[name]):
            cache[name] = _entry(path, step, known.get(name), deep, expected)
        out.append(cache[name])
    for gone in set(cache) - {e.name for e in out}:
        if step_of(gone) is not None and step_of(gone) < below:
            del cache[gone]
    return out


def _entry(path: Path, step: int, known: bool | None, deep: bool, expected: str | None) -> Entry:
    v = None if known is not None else files.verify(path, deep=deep, expected_run=expected)
    record = v.record if v is not None else None
    if record is None:
        try:
            record = read_record(path)
        except RecordError:
            record = None
    return Entry(path.name, step, known if v is None else v.ok, record.milestone if record else None,
                 snapshot=record is not None and record.reason == SNAPSHOT)


def next_best(root: Path, old: meta.Best | None, name: str, record: CheckpointRecord, metric: str,
              mode: str) -> meta.Best | None:
    """The best checkpoint after ``name`` (described by ``record``) was saved."""
    if old is not None and (old.metric != metric or old.mode != mode or not is_entry(root, old.name)):
        old = None
    value = record.metrics.get(metric)
    if value is None or not math.isfinite(value):
        return old
    if old is None or old.beaten_by(value):
        return meta.Best(name, metric, mode, float(value), record.step)
    return old


# ---------------------------------------------------------------------------- the commit steps

def remove_tree(path: Path) -> None:
    """Delete a directory we own (never follows a symlink: one is unlinked as a file)."""
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def begin(root: Path, name: str) -> Path:
    """A fresh, empty ``.tmp-<name>`` directory under ``root`` for a save to fill."""
    tmp = root / f"{TMP_PREFIX}{name}"
    remove_tree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def seal(tmp: Path, manifest: files.Manifest, scheme: digest.Scheme) -> None:
    """Write the manifest, make every entry durable, and check the result (signature, names, types, sizes)."""
    files.write_manifest(tmp, manifest)
    fileio.fsync_path(tmp)
    check = files.verify(tmp, deep=False, name=manifest.name, scheme=scheme)
    if not check.ok:
        raise files.CheckpointError(f"checkpoint {manifest.name} failed verification after writing: {check.reason()}")


def install(root: Path, tmp: Path, name: str, durable: bool = True) -> Path:
    """Rename a sealed ``tmp`` into place as ``root/name``.

    A directory already there (the same step saved again after falling back past a bad
    checkpoint) is moved to ``.trash-<name>`` first and deleted only once the new one is in
    place; :func:`recover` puts it back if the process dies in between. ``durable=False``
    leaves the fsync of ``root`` to the caller's next step (:func:`publish` does one).
    """
    final = root / name
    if final.is_symlink():
        raise files.CheckpointError(f"{final} is a symlink; remove it so that the checkpoint can be written there")
    if final.exists():
        trash = root / f"{TRASH_PREFIX}{name}"
        remove_tree(trash)
        final.rename(trash)
        tmp.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(final)
    if durable:
        fileio.fsync_path(root)
    return final


def install_new(root: Path, tmp: Path, name: str) -> bool:
    """Rename a sealed ``tmp`` into place as ``root/name`` unless a checkpoint is there; True if it was.

    For a snapshot, which several survivors of one failure may write at once, each into its own
    ``tmp``: a rename never replaces a non-empty directory, so exactly one of them lands, and
    the others are told so and remove their copies.
    """
    final = root / name
    if os.path.lexists(final):
        return False
    try:
        tmp.rename(final)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    fileio.fsync_path(root)
    return True


def publish(root: Path, name: str, record: CheckpointRecord, world_size: int, best: meta.Best | None,
            doomed: list[str]) -> meta.Meta:
    """Point ``meta.json`` at ``name`` (verified and in place), leaving out what retention deletes next.

    ``meta.json`` stops naming the doomed checkpoints before they are touched, so a crash in
    between never leaves it pointing at a half-deleted directory.
    """
    old, _ = meta.read_meta(root)
    earlier = old.verified if old else []
    verified = [n for n in dict.fromkeys([name, *earlier]) if n not in doomed and is_entry(root, n)]
    m = meta.Meta(latest=name, step=record.step, epoch=record.epoch, world_size=world_size,
                  verified=verified[:KEEP_VERIFIED], best=best, run_id=record.run_id)
    meta.write_meta(root, m)
    return m


def unpublish(root: Path, doomed: list[str], fallback: str) -> None:
    """Drop ``doomed`` from ``meta.json`` (``ckpt prune``); ``latest`` moves to ``fallback`` if doomed."""
    m, _ = meta.read_meta(root)
    if m is None:
        return
    m.verified = [n for n in m.verified if n not in doomed]
    if m.latest in doomed:
        m.latest = fallback
    if m.best is not None and m.best.name in doomed:
        m.best = None
    meta.write_meta(root, m)


def set_aside(root: Path, names: list[str]) -> list[Path]:
    """Rename each doomed checkpoint to ``.deleting-<name>`` (symlinks are left alone); return the new paths.

    A renamed directory no longer counts as a checkpoint, so deleting it can take its time (in
    the background during training) and a crash half way leaves nothing that looks like one.
    """
    moved = []
    for name in names:
        path = root / name
        if path.is_symlink() or not path.is_dir():
            continue
        target = root / f"{DELETING_PREFIX}{name}"
        remove_tree(target)
        path.rename(target)
        moved.append(target)
    return moved


def delete(paths: list[Path]) -> list[str]:
    """Delete directories set aside by :func:`set_aside`; one message per failure."""
    failures = []
    for path in paths:
        try:
            shutil.rmtree(path)
        except OSError as e:
            failures.append(f"{path}: {fileio.describe_os_error(e)}")
    return failures


def recover(root: Path) -> list[str]:
    """At the start of a job: undo or remove what interrupted saves and deletions left. One line each."""
    done = []
    for p in sorted(root.iterdir()):
        n = p.name
        if p.is_symlink():
            continue
        if n.startswith(TRASH_PREFIX) and p.is_dir():
            original = root / n[len(TRASH_PREFIX):]
            if not original.exists() and step_of(original.name) is not None:
                p.rename(original)
                done.append(f"restored {original.name}, moved aside by an interrupted save")
                continue
        if n.startswith((TMP_PREFIX, TRASH_PREFIX, DELETING_PREFIX)) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {n}, left by an interrupted save or deletion")
    done += [f"removed {n}, left by an interrupted write" for n in fileio.clean_leftovers(root)]
    return done
