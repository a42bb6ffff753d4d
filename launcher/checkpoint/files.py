"""Checkpoint manifests and verification (torch-free).

A checkpoint directory holds DCP's files (``.metadata``, ``__<rank>_<n>.distcp``), our
``checkpoint.json`` (:mod:`launcher.checkpoint.record`) and ``manifest.json``: the directory
name, step and run identity it was written for, and every other file's size and content digest
(:mod:`launcher.checkpoint.digest`). With a key, the manifest is signed.

A checkpoint *verifies* when its manifest parses and (with a key) its signature matches, its
name, step and run agree with where it is found, every listed file is a regular file of the
listed size and digest, and its ``checkpoint.json`` fits the schema. The signature is checked
before anything else in the directory is read, and nothing in a checkpoint is unpickled before
it verifies (DCP's ``.metadata`` is read later, with a restricted unpickler: ``dcp_io.py``).
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher import exit_codes, fileio
from launcher.checkpoint import digest, layout
from launcher.checkpoint.record import INFO, CheckpointRecord, RecordError, read_record

MANIFEST = "manifest.json"
DCP_METADATA = ".metadata"
FORMAT = 2


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit this run.

    ``code`` is the process exit code: 3 (:data:`launcher.exit_codes.CHECKPOINT_ERROR`) unless
    the problem is in the command line (2, e.g. a path that does not exist).
    """

    def __init__(self, message: str, code: int = exit_codes.CHECKPOINT_ERROR):
        super().__init__(message)
        self.code = code


@dataclass
class Manifest:
    """``manifest.json``. Format 2 binds name, step and run; format 1 (older saves) lists files only."""

    files: dict[str, tuple[int, str]]  # file name -> (size, digest)
    algorithm: str = digest.CRC32  # "crc32" or "blake3-keyed" (JSON key: digest)
    name: str | None = None
    step: int | None = None
    run_id: str | None = None
    format: int = FORMAT
    signature: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"format": self.format, "name": self.name, "step": self.step, "run_id": self.run_id,
               "digest": self.algorithm,
               "files": {n: {"size": s, "digest": d} for n, (s, d) in sorted(self.files.items())}}
        if self.signature is not None:
            out["signature"] = self.signature
        return out

    def payload(self) -> bytes:
        """What the signature covers: everything in the manifest but the signature itself."""
        body = {k: v for k, v in self.to_json().items() if k != "signature"}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, obj: Any) -> Manifest:
        """Raises ValueError naming the first thing that does not fit."""
        if not isinstance(obj, dict):
            raise ValueError("expected a JSON object")
        if obj.get("format") == 1:
            return cls._parse_v1(obj)
        if obj.get("format") != FORMAT:
            raise ValueError(f"unknown manifest format {obj.get('format')!r} (this version reads 1 and 2)")
        files = obj.get("files")
        ok = isinstance(files, dict) and all(
            isinstance(e, dict) and _size(e.get("size")) and isinstance(e.get("digest"), str) for e in files.values())
        if not ok:
            raise ValueError("'files' must map each name to {size, digest}")
        if obj.get("digest") not in (digest.CRC32, digest.BLAKE3):
            raise ValueError(f"unknown digest {obj.get('digest')!r}")
        name, step, run_id, sig = obj.get("name"), obj.get("step"), obj.get("run_id"), obj.get("signature")
        if not (isinstance(name, str) and _size(step) and isinstance(run_id, str)
                and (sig is None or isinstance(sig, str))):
            raise ValueError("'name', 'step', 'run_id' (and 'signature') have the wrong types")
        return cls({n: (e["size"], e["digest"]) for n, e in files.items()}, obj["digest"], name, step, run_id,
                   FORMAT, sig)

    @classmethod
    def _parse_v1(cls, obj: dict) -> Manifest:
        files = obj.get("files")
        if not isinstance(files, dict) or not all(
                isinstance(e, dict) and _size(e.get("size")) and isinstance(e.get("crc32"), str)
                for e in files.values()):
            raise ValueError("'files' must map each name to {size, crc32}")
        sig = obj.get("hmac_sha256")
        return cls({n: (e["size"], e["crc32"]) for n, e in files.items()}, digest.CRC32, format=1,
                   signature=sig if isinstance(sig, str) else None)


def _size(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def make_manifest(scheme: digest.Scheme, name: str, step: int, run_id: str,
                  files: dict[str, tuple[int, str]]) -> Manifest:
    """A format-2 manifest, signed when ``scheme`` has a key."""
    m = Manifest(dict(files), scheme.name, name, step, run_id)
    if scheme.signed:
        m.signature = scheme.sign(m.payload())
    return m


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Create ``manifest.json`` in a checkpoint directory being written (fsynced; the directory is not)."""
    data = (json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n").encode()
    fileio.write_new(Path(directory) / MANIFEST, data)


@dataclass
class Verification:
    """Outcome of checking one checkpoint directory against its manifest."""

    path: Path
    problems: list[str] = field(default_factory=list)
    manifest: Manifest | None = None
    record: CheckpointRecord | None = None  # its checkpoint.json, once everything else checked out

    @property
    def ok(self) -> bool:
        return not self.problems

    def reason(self) -> str:
        return "; ".join(self.problems) if self.problems else "verified"


def verify(directory: Path, deep: bool = True, expected_run: str | None = None, name: str | None = None,
           scheme: digest.Scheme | None = None) -> Verification:
    """Check a checkpoint directory against its manifest.

    Args:
        directory: the checkpoint directory.
        deep: also recompute every file's digest (False: presence, types and sizes only).
        expected_run: the run id of the checkpoints directory it sits in (``meta.json``); a
            checkpoint of another run is refused. None skips the check.
        name: check it as if it were named this (a save checks ``.tmp-step_N`` as ``step_N``).
        scheme: digest scheme and key (default: from the environment).
    """
    directory = Path(directory)
    result = Verification(directory)
    problems = result.problems
    if not directory.is_dir():
        problems.append(f"{directory}: not a directory")
        return result
    try:
        scheme = scheme or digest.from_env()
    except digest.KeyProblem as e:
        problems.append(str(e))
        return result
    manifest = result.manifest = _read_manifest(directory, problems)
    if manifest is None or not _signature_ok(directory / MANIFEST, manifest, scheme, problems):
        return result
    _check_identity(directory, name or directory.name, manifest, expected_run, problems)
    _check_files(directory, manifest, scheme, deep, problems)
    if problems:
        return result
    try:
        result.record = read_record(directory)
    except RecordError as e:
        problems.append(str(e))
        return result
    _check_record(directory, name or directory.name, manifest, result.record, problems)
    return result


def _read_manifest(directory: Path, problems: list[str]) -> Manifest | None:
    path = directory / MANIFEST
    try:
        return Manifest.parse(fileio.read_json(path))
    except FileNotFoundError:
        problems.append(f"{path}: missing manifest")
    except (OSError, ValueError) as e:
        problems.append(f"{path}: unreadable manifest ({str(e).removeprefix(f'{path}: ')})")
    return None


def _signature_ok(path: Path, m: Manifest, scheme: digest.Scheme, problems: list[str]) -> bool:
    """Whether the manifest may be trusted as written; if not, the reason is appended to ``problems``."""
    before = len(problems)
    if scheme.signed:
        if m.format == 1:
            problems.append(f"{path}: a format-1 manifest (an older save) whose checksums can be forged; it cannot "
                            f"be verified with a key. Verify it without {digest.KEY_ENV} only if you trust where it "
                            f"came from")
        elif m.signature is None or m.algorithm != digest.BLAKE3:
            problems.append(f"{path}: not signed, but a signing key is set ({digest.KEY_ENV}/{digest.KEY_FILE_ENV}): "
                            f"written without the key, or its signature was removed")
        elif not hmac.compare_digest(m.signature, scheme.sign(m.payload())):
            problems.append(f"{path}: signature does not match: changed after it was written, or written with "
                            f"another key")
        return len(problems) == before
    if m.algorithm == digest.BLAKE3:
        problems.append(f"{path}: signed with a key; set {digest.KEY_ENV} (or {digest.KEY_FILE_ENV}) to the key it "
                        f"was written with to verify it")
        return False
    return True


def _check_identity(directory: Path, name: str, m: Manifest, expected_run: str | None, problems: list[str]) -> None:
    """Name, step and run of a format-2 manifest against where the directory is found."""
    if m.format == 1:
        return
    named_step = layout.step_of(name)
    if m.name != name:
        if m.signature is not None:
            problems.append(f"{directory}: renamed or copied: it was written as {m.name}, and its signature binds "
                            f"the name; rename it back")
        elif named_step is not None:
            problems.append(f"{directory}: its name says step {named_step} but it holds step {m.step} (written as "
                            f"{m.name}); rename it back to {m.name} or remove it")
    elif named_step is not None and named_step != m.step:
        problems.append(f"{directory}: its name says step {named_step} but its manifest says step {m.step}")
    if expected_run and m.run_id and m.run_id != expected_run:
        problems.append(f"{directory}: belongs to another run (run id {m.run_id[:12]}, this run's is "
                        f"{expected_run[:12]}): copied in from another run directory? Move it out, or load it "
                        f"explicitly with --resume PATH from its own run directory")


def _check_files(directory: Path, m: Manifest, scheme: digest.Scheme, deep: bool, problems: list[str]) -> None:
    for required in (DCP_METADATA, INFO):
        if required not in m.files:
            problems.append(f"{directory / required}: not listed in the manifest")
    to_digest: list[tuple[Path, str]] = []
    for fname, (size, want) in sorted(m.files.items()):
        path = directory / fname
        if "/" in fname or "\\" in fname or "\0" in fname or fname in ("", ".", ".."):
            problems.append(f"{fname!r}: manifest entry escapes the checkpoint directory")
            continue
        try:
            st_size = path.lstat().st_size
        except FileNotFoundError:
            problems.append(f"{path}: missing file")
            continue
        except OSError as e:
            problems.append(f"{path}: unreadable ({e.strerror or e})")
            continue
        if not fileio.is_regular(path):
            problems.append(f"{path}: is a {fileio.kind(path)}, not a file written by the save")
        elif st_size != size:
            problems.append(f"{path}: size {st_size} bytes, manifest says {size} (truncated or overwritten)")
        elif deep:
            to_digest.append((path, want))
    if to_digest:
        sums = digest.digest_files([p for p, _ in to_digest], scheme)
        for path, want in to_digest:
            got = sums[path]
            if isinstance(got, OSError):
                problems.append(f"{path}: unreadable ({got.strerror or got})")
            elif not hmac.compare_digest(got[1], want):
                problems.append(f"{path}: {m.algorithm} {got[1][:16]}, manifest says {want[:16]} (bytes changed)")


def _check_record(directory: Path, name: str, m: Manifest, record: CheckpointRecord, problems: list[str]) -> None:
    if m.step is not None and record.step != m.step:
        problems.append(f"{directory / INFO}: says step {record.step}, the manifest says step {m.step}")
    named_step = layout.step_of(name)
    if m.format == 1 and named_step is not None and named_step != record.step:
        problems.append(f"{directory}: its name says step {named_step} but it holds step {record.step}; rename it "
                        f"back or remove it")


def dir_size(directory: Path) -> int:
    return sum(p.lstat().st_size for p in Path(directory).iterdir() if fileio.is_regular(p))
