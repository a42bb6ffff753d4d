"""How ftlaunch reads and writes its own files in a run directory (torch-free).

Every small file we own (``meta.json``, ``checkpoint.json``, ``manifest.json``, ``metrics.jsonl``,
``config.yaml``, progress reports, ...) goes through here, so three rules hold everywhere:

* **Never block on a special file.** A FIFO, device or socket planted in place of a file we read
  would block ``open()`` forever; files are opened with ``O_NONBLOCK`` and refused unless
  ``fstat`` says they are regular files.
* **Never follow a planted symlink.** The last path component is opened with ``O_NOFOLLOW``, and
  temporary files are created with ``O_EXCL`` under a fresh name, so a symlink placed where we
  write makes the write fail instead of overwriting its target.
* **Writes are atomic and leave recognisable leftovers.** A write goes to
  ``.<name>.tmp-<pid>-<random>``, is fsynced and renamed over the target, then the directory is
  fsynced. A process killed in between leaves a temporary file that :func:`clean_leftovers`
  removes at the next start.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any

SMALL = 64 * 2**20  # largest JSON/YAML file we read whole (ours are far smaller)
TMP_INFIX = ".tmp-"
# .<name>.tmp-<pid>[-<hex>]: what atomic_write creates (the hex part since this module exists).
_LEFTOVER = re.compile(r"\..+\.tmp-\d+(-[0-9a-f]+)?")


class FileProblem(OSError):
    """A file of the run directory cannot be used; the message names it and says what to do."""


class NotRegularFile(FileProblem):
    """A path we read or write is a symlink, FIFO, device, socket or directory."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISLNK, "symlink")):
        if test(mode):
            return name
    return "special file"


def open_regular(path: Path, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """``os.open`` that never follows a final symlink, never blocks, and accepts regular files only.

    Raises:
        NotRegularFile: ``path`` is a symlink or not a regular file (the message says which).
        OSError: any other failure (missing file, permissions, no space).
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        # ELOOP: the last component is a symlink; ENXIO: a FIFO opened for writing with no reader.
        if e.errno == errno.ELOOP or (e.errno == errno.ENXIO and os.path.lexists(path)):
            kind = "symlink" if os.path.islink(path) else _kind(os.lstat(path).st_mode)
            raise NotRegularFile(f"{path}: is a {kind}, not a regular file; remove it") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegularFile(f"{path}: is a {_kind(st.st_mode)}, not a regular file; remove it")
    return fd


def kind(path: Path) -> str:
    """What is at ``path`` (not following a symlink): "regular file", "symlink", "FIFO (named pipe)", ..."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return "missing"
    return "regular file" if stat.S_ISREG(mode) else _kind(mode)


def is_regular(path: Path) -> bool:
    """``path`` is a regular file itself (not a symlink to one)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def read_bytes(path: Path, limit: int = SMALL) -> bytes:
    """The whole content of a small regular file (see :func:`open_regular`)."""
    fd = open_regular(path)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"{path}: larger than {limit // 2**20} MB, not a file ftlaunch wrote")
    return data


def read_text(path: Path, limit: int = SMALL) -> str:
    data = read_bytes(path, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (bad byte at offset {e.start}); the file is damaged") from None


def read_json(path: Path, limit: int = SMALL) -> Any:
    """Parse a small JSON file; ``ValueError`` names the file and the position of a syntax error."""
    text = read_text(path, limit)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                         f"the file is damaged") from None


def fsync_path(path: Path) -> None:
    """fsync a file (its bytes) or a directory (a rename or a new file in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _named(e: OSError, path: Path) -> OSError:
    """``e`` with ``path`` as its file name, so that the message says which file (``os.write`` gives none)."""
    if e.filename is None and e.errno is not None and not isinstance(e, FileProblem):
        return OSError(e.errno, e.strerror, str(path))
    return e


def write_new(path: Path, data: bytes, durable: bool = True) -> None:
    """Create ``path`` (which must not exist: never follows or reuses anything there) with ``data``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, data)
        if durable:
            os.fsync(fd)
    except OSError as e:
        raise _named(e, path) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, durable: bool = True):
    """A binary file object whose content replaces ``path`` when the block ends without an error.

    The temporary file is created fresh (``O_EXCL``), so a symlink planted at ``path`` or at a
    predictable temporary name is never followed; the rename replaces a planted symlink itself.
    If the block raises (or the write fails), the temporary file is removed and ``path`` is
    untouched. With ``durable`` the file and the directory are fsynced (skip it for files that
    only matter while the process lives, such as progress reports).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_INFIX}{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _named(e, path) from None
        raise
    if durable:
        fsync_path(path.parent)


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Replace ``path`` with ``data``: a crash leaves the old file or the new one, never half of one."""
    with atomic_file(path, durable) as f:
        f.write(data)


def atomic_write_json(path: Path, obj: Any, durable: bool = True) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), durable)


def open_append(path: Path):
    """A text file object appending to ``path`` (created if missing; a symlink or FIFO there is refused)."""
    fd = open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return os.fdopen(fd, "a", encoding="utf-8")


def clean_leftovers(directory: Path) -> list[str]:
    """Remove temporary files our killed writes left in ``directory``; return their names.

    Only names of the form ``.<name>.tmp-<pid>[-<hex>]`` that are regular files or symlinks
    (unlinked, never followed) are removed: nothing else in the directory is touched. Call it
    only while no other writer of ours is active there (a job holds the run directory's lock).
    """
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if _LEFTOVER.fullmatch(entry.name) and (entry.is_symlink() or entry.is_file(follow_symlinks=False)):
            try:
                os.unlink(entry.path)
                removed.append(entry.name)
            except OSError:
                continue
    return removed


def describe_os_error(e: OSError) -> str:
    """``[Errno 28] No space left on device`` -> a sentence that says what to do."""
    hints = {errno.ENOSPC: "free disk space or choose another --run-dir",
             errno.EROFS: "the file system is read-only; choose a writable --run-dir",
             errno.EACCES: "check the directory's owner and permissions",
             errno.EDQUOT: "the disk quota is exceeded; free space"}
    if isinstance(e, FileProblem):
        return str(e)
    hint = hints.get(e.errno or 0)
    text = f"{str(e.filename) + ': ' if e.filename else ''}{e.strerror or e}"
    return f"{text} ({hint})" if hint else text
