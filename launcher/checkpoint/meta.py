"""``meta.json``: the pointer to the latest verified checkpoint, and how to find one without it.

Schema (``format`` 1)::

    {
      "format": 1,
      "latest": "step_00000120",          # a directory name under checkpoints/
      "step": 120, "epoch": 8, "world_size": 2,
      "verified": ["step_00000120", "step_00000100"],   # newest first, short list
      "best": {"name": "step_00000100", "metric": "val_loss", "mode": "min", "value": 0.31},
      "updated": 1764441600.0
    }

Entries are plain directory names. Anything that would leave the checkpoints directory
(``..``, an absolute path, a symlink pointing out) is rejected, so a tampered ``meta.json``
cannot make a job load or delete files elsewhere.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from launcher.checkpoint.files import atomic_write_json

META = "meta.json"
TMP_PREFIX = ".tmp-"
_NAME = re.compile(r"step_(\d{8,})")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    m = _NAME.fullmatch(name)
    return int(m.group(1)) if m else None


class UnsafeEntry(ValueError):
    pass


def safe_path(root: Path, name: Any) -> Path:
    """Resolve a ``meta.json`` entry to a directory inside ``root``, or raise UnsafeEntry."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise UnsafeEntry(f"meta.json entry {name!r} is not a plain directory name")
    path = root / name
    resolved_root = root.resolve()
    if path.is_symlink() and resolved_root not in path.resolve().parents:
        raise UnsafeEntry(f"meta.json entry {name!r} is a symlink pointing outside {root}")
    return path


def read_meta(root: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(meta, None)`` or ``(None, why it could not be used)``."""
    path = root / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"{path}: missing"
    except (OSError, ValueError) as e:
        return None, f"{path}: unreadable ({e})"
    if not isinstance(meta, dict) or not isinstance(meta.get("latest"), str):
        return None, f"{path}: no 'latest' entry"
    return meta, None


def write_meta(root: Path, meta: dict[str, Any]) -> None:
    meta = {**meta, "format": 1, "updated": time.time()}
    atomic_write_json(root / META, meta)


def scan(root: Path) -> list[str]:
    """Checkpoint directory names under ``root``, newest step first."""
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None]
    return sorted(names, key=lambda n: step_of(n) or -1, reverse=True)


def candidates(root: Path) -> tuple[list[str], list[str]]:
    """Names to try on resume, best guess first, and notes on what was skipped.

    ``meta.json``'s latest and its verified list come first; every other checkpoint
    directory follows, newest first, so a lost or stale ``meta.json`` still finds the answer.
    """
    notes: list[str] = []
    ordered: list[str] = []
    meta, why = read_meta(root)
    if meta is None:
        if root.is_dir() and scan(root):
            notes.append(f"{why}; scanning the checkpoint directories instead")
    else:
        earlier = meta.get("verified")
        if not isinstance(earlier, list):
            notes.append(f"{root / META}: 'verified' is not a list; ignoring it")
            earlier = []
        for name in [meta["latest"], *earlier]:
            try:
                path = safe_path(root, name)
            except UnsafeEntry as e:
                notes.append(str(e))
                continue
            if not path.is_dir():
                notes.append(f"meta.json points at {name}, which is not there")
            elif name not in ordered:
                ordered.append(name)
    scanned = scan(root)
    newest_listed = max((step_of(n) or -1 for n in ordered), default=-1)
    # A directory newer than meta.json's latest is a save that was renamed into place but
    # not yet published (a crash between the two): it is complete, so it comes first.
    newer = [n for n in scanned if (step_of(n) or -1) > newest_listed and n not in ordered]
    older = [n for n in scanned if n not in ordered and n not in newer]
    safe = []
    for name in [*newer, *ordered, *older]:
        try:
            safe_path(root, name)
            safe.append(name)
        except UnsafeEntry as e:
            notes.append(str(e).replace("meta.json entry", "checkpoint directory"))
    return safe, notes
