"""``meta.json``: the pointer to the latest verified checkpoint, as a typed record (torch-free).

Schema (``format`` 1)::

    {
      "format": 1,
      "latest": "step_00000120",          # a directory name under checkpoints/
      "step": 120, "epoch": 8, "world_size": 2,
      "verified": ["step_00000120", "step_00000100"],   # newest first, short list
      "best": {"name": "step_00000100", "metric": "val_loss", "mode": "min", "value": 0.31, "step": 100},
      "run_id": "3f2c...",                # identity of this run directory (see docs/security.md)
      "updated": 1764441600.0
    }

Only rank 0 writes it, atomically, after the checkpoint it names is verified and in place.
:func:`read_meta` is the one reader: it never raises for a bad file, it says why the file (or
a part of it) cannot be used, and the caller falls back to scanning the directories.
Entries are names only; :mod:`launcher.checkpoint.layout` resolves them safely.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from launcher import fileio

META = "meta.json"


@dataclass
class Best:
    """The best checkpoint by the run's metric (a pointer: no copy is made)."""

    name: str
    metric: str
    mode: str  # "min" or "max"
    value: float
    step: int | None = None

    @classmethod
    def parse(cls, obj: Any) -> Best | None:
        if not isinstance(obj, dict):
            return None
        name, metric, mode, value = obj.get("name"), obj.get("metric"), obj.get("mode"), obj.get("value")
        step = obj.get("step")
        if not (isinstance(name, str) and isinstance(metric, str) and mode in ("min", "max")
                and isinstance(value, (int, float)) and not isinstance(value, bool)):
            return None
        return cls(name, metric, mode, float(value), step if isinstance(step, int) and not isinstance(step, bool)
                   else None)

    def beaten_by(self, value: float) -> bool:
        return value < self.value if self.mode == "min" else value > self.value


@dataclass
class Meta:
    latest: str
    step: int = 0
    epoch: int = 0
    world_size: int = 1
    verified: list[str] = field(default_factory=list)  # newest first, ``latest`` included
    best: Best | None = None
    run_id: str = ""
    updated: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "format": 1, "best": asdict(self.best) if self.best else None}


def _int(v: Any, default: int) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else default


def read_meta(root: Path) -> tuple[Meta | None, list[str]]:
    """``meta.json`` of a checkpoints directory, and a note for each part that could not be used.

    ``(None, [why])`` when the file is missing, special, damaged or names no latest checkpoint.
    A bad ``verified`` list or ``best`` entry is dropped with a note; ``"best": null`` (no
    evaluation yet) is no problem.
    """
    path = Path(root) / META
    try:
        obj = fileio.read_json(path)
    except FileNotFoundError:
        return None, [f"{path}: missing"]
    except (OSError, ValueError) as e:
        return None, [str(e) if str(path) in str(e) else f"{path}: unreadable ({e})"]
    if not isinstance(obj, dict):
        return None, [f"{path}: expected a JSON object, found {type(obj).__name__}"]
    if not isinstance(obj.get("latest"), str):
        return None, [f"{path}: no 'latest' entry"]
    notes = []
    verified = obj.get("verified", [])
    if not isinstance(verified, list) or not all(isinstance(n, str) for n in verified):
        notes.append(f"{path}: 'verified' is not a list of names; ignoring it")
        verified = []
    best = Best.parse(obj.get("best"))
    if best is None and obj.get("best") is not None:
        notes.append(f"{path}: 'best' is not a valid entry; ignoring it")
    run_id = obj.get("run_id") if isinstance(obj.get("run_id"), str) else ""
    updated = obj.get("updated")
    return Meta(latest=obj["latest"], step=_int(obj.get("step"), 0), epoch=_int(obj.get("epoch"), 0),
                world_size=_int(obj.get("world_size"), 1), verified=verified, best=best, run_id=run_id,
                updated=float(updated) if isinstance(updated, (int, float)) else 0.0), notes


def write_meta(root: Path, meta: Meta) -> None:
    """Replace ``meta.json`` atomically (fsynced file and directory)."""
    meta.updated = time.time()
    fileio.atomic_write_json(Path(root) / META, meta.to_json())
