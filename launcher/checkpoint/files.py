"""Durable file operations and checkpoint manifests.

A checkpoint directory holds DCP's files (``.metadata``, ``__<rank>_<n>.distcp``), our
``checkpoint.json`` (step, epoch, config, metrics) and ``manifest.json``: every other file's
size and CRC32. A checkpoint is *verified* when every file in the manifest is present with
the recorded size and checksum and no manifest is missing.

CRC32 (zlib) was chosen by measurement: 1-3 GB/s per core against 0.5-1.4 GB/s for SHA-256,
and pieces of every file are checksummed on all cores (``crc.py``), so verifying costs far
less than writing. Checksums give integrity, not
authenticity: when ``FTLAUNCH_HMAC_KEY`` is set, the manifest also carries an HMAC-SHA256
over its file list, and a manifest whose signature does not match is rejected.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.checkpoint.crc import files_crc32

MANIFEST = "manifest.json"
INFO = "checkpoint.json"
DCP_METADATA = ".metadata"
HMAC_ENV = "FTLAUNCH_HMAC_KEY"


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit this run. Exit code 3."""


def fsync_path(path: Path) -> None:
    """fsync a file (its bytes) or a directory (a rename or a new file in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON to a temp file, fsync it, rename over ``path``, fsync the directory.

    A crash at any point leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def file_crc32(path: Path) -> tuple[int, str]:
    """Size and CRC32 (8 hex digits) of a file."""
    return files_crc32([Path(path)])[Path(path)]


def describe_files(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """fsync each file, then read it back for its size and checksum."""
    paths = [directory / name for name in names]
    for path in paths:
        fsync_path(path)
    sums = files_crc32(paths)
    return {path.name: {"size": sums[path][0], "crc32": sums[path][1]} for path in paths}


def _signature(files: dict[str, Any]) -> str | None:
    key = os.environ.get(HMAC_ENV)
    if not key:
        return None
    payload = json.dumps(files, sort_keys=True).encode()
    return hmac.new(key.encode(), payload, hashlib.sha256).hexdigest()


def write_manifest(directory: Path, files: dict[str, dict[str, Any]]) -> None:
    manifest: dict[str, Any] = {"format": 1, "checksum": "crc32", "files": files}
    signature = _signature(files)
    if signature:
        manifest["hmac_sha256"] = signature
    atomic_write_json(directory / MANIFEST, manifest)


@dataclass
class Verification:
    """Outcome of checking one checkpoint directory against its manifest."""

    path: Path
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def reason(self) -> str:
        return "; ".join(self.problems) if self.problems else "verified"


def verify(directory: Path, deep: bool = True) -> Verification:
    """Check a checkpoint directory against its manifest.

    Args:
        directory: the checkpoint directory.
        deep: also recompute checksums (False checks presence and sizes only).
    """
    directory = Path(directory)
    result = Verification(directory)
    if not directory.is_dir():
        result.problems.append(f"{directory}: not a directory")
        return result
    files = _read_manifest(directory, result.problems)
    if files is None:
        return result
    for required in (DCP_METADATA, INFO):
        if required not in files:
            result.problems.append(f"{directory / required}: not listed in the manifest")
    to_checksum: list[tuple[Path, str]] = []
    for name, want in sorted(files.items()):
        path = directory / name
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            result.problems.append(f"{name}: manifest entry escapes the checkpoint directory")
        elif path.is_symlink():
            result.problems.append(f"{path}: is a symlink, not a file written by the save")
        elif not path.is_file():
            result.problems.append(f"{path}: missing file")
        else:
            try:
                size = path.stat().st_size
            except OSError as e:
                result.problems.append(f"{path}: unreadable ({e.strerror or e})")
                continue
            if size != want["size"]:
                result.problems.append(f"{path}: size {size} bytes, manifest says {want['size']} "
                                       f"(truncated or overwritten)")
            elif deep:
                to_checksum.append((path, want["crc32"]))
    result.problems += _checksum_problems(to_checksum)
    return result


def _read_manifest(directory: Path, problems: list[str]) -> dict[str, dict[str, Any]] | None:
    """The manifest's file list, or None with the reason appended to ``problems``."""
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        problems.append(f"{path}: missing manifest")
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        problems.append(f"{path}: unreadable manifest ({e})")
        return None
    if not isinstance(files, dict) or not all(
            isinstance(w, dict) and isinstance(w.get("size"), int) and isinstance(w.get("crc32"), str)
            for w in files.values()):
        problems.append(f"{path}: unreadable manifest (entries must be {{name: {{size, crc32}}}})")
        return None
    expected_sig = _signature(files)
    if expected_sig and not hmac.compare_digest(expected_sig, str(manifest.get("hmac_sha256", ""))):
        problems.append(f"{path}: HMAC signature does not match ({HMAC_ENV} is set)")
    return files


def _checksum_problems(items: list[tuple[Path, str]]) -> list[str]:
    """Compare every file's CRC32 with the manifest's (all files at once, on every core)."""
    try:
        sums = {path: crc for path, (_, crc) in files_crc32([path for path, _ in items]).items()}
    except OSError:  # name the unreadable file(s): one at a time
        sums = {}
        for path, _ in items:
            try:
                sums[path] = file_crc32(path)[1]
            except OSError as e:
                sums[path] = OSError(e.strerror or str(e))
    problems = []
    for path, want in items:
        got = sums[path]
        if isinstance(got, OSError):
            problems.append(f"{path}: unreadable ({got})")
        elif got != want:
            problems.append(f"{path}: checksum {got}, manifest says {want} (bytes changed)")
    return problems


def read_info(directory: Path) -> dict[str, Any]:
    """The checkpoint's ``checkpoint.json`` (step, epoch, config, metrics, world size)."""
    return json.loads((Path(directory) / INFO).read_text())


def dir_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())
