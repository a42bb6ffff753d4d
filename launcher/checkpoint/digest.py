"""Content digests of checkpoint files: CRC32 without a key, keyed BLAKE3 with one (torch-free).

Both are computed *while a file is written* (:class:`StreamDigest`, fed every byte handed to
``write()``), and again by reading it back when a checkpoint is verified (:func:`digest_files`,
files in parallel, each mapped into memory once).

* **crc32** (no key): the CRC32 of the whole file, the same value as ``zlib.crc32``, computed
  with zlib-ng's vectorised implementation when installed (27 GB/s per core on the development
  box against 4 GB/s for zlib). It catches truncation, bit flips, torn and stale files, and a
  file swapped for one of another size. It is no protection against a deliberate edit: anyone
  can recompute a CRC, or keep it unchanged by choosing 4 bytes.
* **blake3-keyed** (``FTLAUNCH_HMAC_KEY`` or ``FTLAUNCH_HMAC_KEY_FILE`` set): BLAKE3 in keyed
  mode, a MAC: without the key no one can produce the digest of changed content. Two 32-byte
  keys are derived from the configured secret (BLAKE3's key derivation), one for file digests
  and one for the manifest's signature (:meth:`Scheme.sign`), so neither can stand in for the
  other. BLAKE3 was chosen by measurement on the development box: 4.6 GB/s per core, against
  1.3 GB/s for HMAC-SHA256 (with the CPU's SHA instructions) and 0.14 GB/s for keyed BLAKE2b, so
  digesting a file while writing it costs a few percent of the write.
"""

from __future__ import annotations

import concurrent.futures
import mmap
import os
import stat
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from launcher import fileio

try:  # identical values to zlib.crc32, several times faster
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # pragma: no cover - a platform without zlib-ng wheels
    _crc32 = zlib.crc32

KEY_ENV = "FTLAUNCH_HMAC_KEY"
KEY_FILE_ENV = "FTLAUNCH_HMAC_KEY_FILE"
MIN_KEY_BYTES = 16
CRC32, BLAKE3 = "crc32", "blake3-keyed"
MAX_WORKERS = 8
_CONTEXT = "ftlaunch 2026-12 checkpoint {}"  # BLAKE3 key-derivation contexts (fixed forever)


class KeyProblem(ValueError):
    """The signing key is set but unusable (too short, unreadable, readable by others)."""


class _Crc:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data) -> None:
        self.value = _crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


@dataclass(frozen=True)
class Scheme:
    """How file contents are digested: ``crc32`` (no key) or ``blake3-keyed`` (with a secret)."""

    name: str = CRC32
    file_key: bytes | None = field(default=None, repr=False)
    sign_key: bytes | None = field(default=None, repr=False)

    @classmethod
    def keyed(cls, secret: bytes) -> Scheme:
        import blake3
        derive = lambda purpose: blake3.blake3(secret, derive_key_context=_CONTEXT.format(purpose)).digest()  # noqa: E731
        return cls(BLAKE3, derive("file digest"), derive("manifest signature"))

    @property
    def signed(self) -> bool:
        return self.file_key is not None

    def new(self, threads: bool = False):
        """A fresh hasher (``update(bytes)``, ``hexdigest()``); ``threads``: BLAKE3 may use every core."""
        if self.file_key is None:
            return _Crc()
        import blake3
        return blake3.blake3(key=self.file_key, max_threads=blake3.blake3.AUTO if threads else 1)

    def sign(self, payload: bytes) -> str:
        """The manifest signature over ``payload`` (only with a key)."""
        if self.sign_key is None:
            raise ValueError("no key to sign with")
        import blake3
        return blake3.blake3(payload, key=self.sign_key).hexdigest()


def from_env(env: Mapping[str, str] | None = None) -> Scheme:
    """The scheme this process signs and verifies with: keyed when a key is configured.

    Raises:
        KeyProblem: a key is configured but too short, unreadable, or its file is readable by others.
    """
    env = os.environ if env is None else env
    text, key_file = env.get(KEY_ENV, ""), env.get(KEY_FILE_ENV, "")
    if text and key_file:
        raise KeyProblem(f"both {KEY_ENV} and {KEY_FILE_ENV} are set; set only one")
    if key_file:
        secret = _read_key_file(Path(key_file))
    elif text:
        secret = text.encode()
    else:
        return Scheme()
    if len(secret) < MIN_KEY_BYTES:
        raise KeyProblem(f"the checkpoint signing key ({KEY_FILE_ENV if key_file else KEY_ENV}) has {len(secret)} "
                         f"bytes; use at least {MIN_KEY_BYTES}, e.g. the output of "
                         f"python -c 'import secrets; print(secrets.token_hex(32))'")
    try:
        return Scheme.keyed(secret)
    except ImportError:
        raise KeyProblem("signing checkpoints needs the blake3 package: pip install blake3") from None


def _read_key_file(path: Path) -> bytes:
    try:
        mode = os.lstat(path).st_mode
        data = fileio.read_bytes(path, limit=4096)
    except (OSError, ValueError) as e:
        raise KeyProblem(f"{KEY_FILE_ENV}={path}: cannot read the key: {e}") from None
    if stat.S_IMODE(mode) & 0o077:
        raise KeyProblem(f"{KEY_FILE_ENV}={path}: the key file is readable by other users; run chmod 600 {path}")
    return data.rstrip(b"\r\n")


def digest_bytes(scheme: Scheme, data: bytes) -> str:
    """The digest of ``data`` as if it were a file's whole content."""
    h = scheme.new()
    h.update(data)
    return h.hexdigest()


def _digest_file(path: Path, scheme: Scheme) -> tuple[int, str]:
    fd = fileio.open_regular(path)  # a FIFO or a symlink is refused, never waited on
    try:
        size = os.fstat(fd).st_size
        h = scheme.new(threads=True)
        if size:
            with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as view:
                h.update(view)
        return size, h.hexdigest()
    finally:
        os.close(fd)


def digest_files(paths: list[Path], scheme: Scheme,
                 workers: int | None = None) -> dict[Path, tuple[int, str] | OSError]:
    """Size and digest of each file (files in parallel); an OSError in place of each unreadable one."""
    n = max(1, min(len(paths), workers or os.cpu_count() or 1, MAX_WORKERS))
    out: dict[Path, tuple[int, str] | OSError] = {}
    with concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="digest") as pool:
        futures = {path: pool.submit(_digest_file, path, scheme) for path in paths}
        for path, future in futures.items():
            try:
                out[path] = future.result()
            except (OSError, ValueError) as e:  # ValueError: the file shrank under the mapping
                out[path] = e if isinstance(e, OSError) else OSError(f"{path}: {e}")
    return out


class StreamDigest:
    """The digest of bytes as they are written: feed every written byte to :meth:`update`, in order."""

    def __init__(self, scheme: Scheme):
        self._h = scheme.new()
        self.size = 0

    def update(self, data) -> None:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        self._h.update(view)
        self.size += len(view)

    def result(self) -> tuple[int, str]:
        """``(size, digest)`` of everything written."""
        return self.size, self._h.hexdigest()
