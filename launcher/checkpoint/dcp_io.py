"""Our side of torch.distributed.checkpoint (DCP): digest while writing, read without running code.

* :class:`DigestFileSystem` is DCP's file system with every file digested *as it is written*
  (``digest.StreamDigest``, fed each buffer handed to ``write()``), so a save never reads its
  shards back. What is recorded is what was handed to ``write()``; the size on
  disk is checked against it, and a resume re-reads every byte, so nothing verified is weaker
  than a read-back. Files are created with ``O_EXCL | O_NOFOLLOW``: the save's directory is
  fresh, and nothing planted in it is followed or reused.
* :class:`SafeFileSystemReader` reads DCP's ``.metadata`` (a pickle) with an unpickler that
  resolves only the classes a DCP index is made of, so a crafted ``.metadata`` cannot run code
  even in a checkpoint that verifies.
* :class:`SafeLoadPlanner` reads non-tensor values with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from launcher.checkpoint import digest
from launcher.checkpoint.digest import Scheme, StreamDigest


class _DigestingStream:
    """A binary file being written by DCP; every byte written is also fed to a digest."""

    def __init__(self, raw: io.BufferedWriter, digest: StreamDigest, errors: list[str], name: str):
        self._raw, self.digest, self._errors, self.name = raw, digest, errors, name
        self.seeked = False

    def write(self, data) -> int:
        try:
            n = self._raw.write(data)
        except OSError as e:
            self._errors.append(f"{self.name}: {e.strerror or e}")
            raise
        self.digest.update(data)
        return n

    def seek(self, *args: Any) -> int:
        self.seeked = True  # the running digest no longer describes the file: it is read back instead
        return self._raw.seek(*args)

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno, close, closed
        return getattr(self._raw, name)


class DigestFileSystem(FileSystem):
    """DCP's ``FileSystem`` that records ``{file name: (size, digest)}`` of everything it writes.

    Args:
        scheme: how to digest (CRC32, or keyed BLAKE3).
    """

    def __init__(self, scheme: Scheme):
        super().__init__()
        self.scheme = scheme
        self.written: dict[str, tuple[int, str]] = {}
        self.unknown: set[str] = set()  # written, but their running digest is void: read them back
        self.errors: list[str] = []  # OS errors met while writing, "file: reason"
        self.stream_hook = None  # testing aid (faults.py): wraps each stream

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str):
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        path = Path(path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            self.errors.append(f"{path.name}: {e.strerror or e}")
            raise
        stream = _DigestingStream(open(fd, "wb"), StreamDigest(self.scheme), self.errors, path.name)  # noqa: SIM115
        try:
            yield stream if self.stream_hook is None else self.stream_hook(stream)
        finally:
            stream.close()
        if stream.seeked:
            self.unknown.add(path.name)
        else:
            self.written[path.name] = stream.digest.result()

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)
        old, new = Path(path).name, Path(new_path).name
        if old in self.written:
            self.written[new] = self.written.pop(old)
        if old in self.unknown:
            self.unknown.discard(old)
            self.unknown.add(new)


# What a DCP ``.metadata`` pickle may refer to (torch 2.4 - 2.13): its own dataclasses, tensor
# sizes, dtypes and layouts, and the checkpoint path. Anything else is refused.
_DCP_MODULES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class UnsafePickle(pickle.UnpicklingError):
    pass


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                                              torch.memory_format))):
            return getattr(torch, name)
        if name in _DCP_MODULES.get(module, ()):
            return super().find_class(module, name)
        raise UnsafePickle(f"it refers to {module}.{name}, which a DCP index never needs")


class SafeFileSystemReader(FileSystemReader):
    """DCP's reader, but ``.metadata`` is unpickled with an allow-list: no code from the checkpoint runs."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _IndexUnpickler(f).load()
        except UnsafePickle as e:
            raise UnsafePickle(f"{path}: refusing to unpickle it: {e}") from None
        if not isinstance(metadata, Metadata):
            raise UnsafePickle(f"{path}: not a DCP index (holds a {type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor values are unpickled with ``weights_only=True``.

    DCP stores non-tensor leaves (numbers, strings, lists) with ``torch.save`` and reads them
    back with ``weights_only=False``; nothing we save needs more than the safe unpickler.
    """

    def load_bytes(self, read_item, value) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def saved_shapes(path: Path) -> dict[str, tuple[int, ...] | None]:
    """Flattened key -> tensor shape (None for non-tensors) of a DCP checkpoint."""
    md = SafeFileSystemReader(str(path)).read_metadata()
    out = {}
    for key, item in md.state_dict_metadata.items():
        size = getattr(item, "size", None)
        out[key] = tuple(size) if size is not None else None
    return out


def digesting_writer(directory: Path, scheme: Scheme) -> tuple[dcp.FileSystemWriter, DigestFileSystem]:
    """A DCP writer (fsync on) into ``directory`` whose files are digested as they are written."""
    fs = DigestFileSystem(scheme)
    writer = dcp.FileSystemWriter(str(directory), sync_files=True)
    writer.fs = fs
    return writer, fs


def describe_written(directory: Path, names: list[str], fs: DigestFileSystem) -> dict[str, tuple[int, str]]:
    """``{name: (size, digest)}`` of files ``fs`` wrote into ``directory``.

    A file whose digest was not taken while it was written is read back. The size on disk of
    each must equal the bytes written.

    Raises:
        OSError: a file is unreadable, or its size on disk differs from what was written.
    """
    listing = {n: fs.written[n] for n in names if n in fs.written}
    reread = [Path(directory) / n for n in names if n not in fs.written]
    for path, got in digest.digest_files(reread, fs.scheme).items():
        if isinstance(got, OSError):
            raise got
        listing[path.name] = got
    for n, (size, _) in listing.items():
        on_disk = os.lstat(Path(directory) / n).st_size
        if on_disk != size:
            raise OSError(f"{Path(directory) / n} has {on_disk} bytes on disk, but {size} were written")
    return listing
