"""``checkpoint.json``: what one checkpoint holds, as a typed record (torch-free).

Written by the save next to DCP's files and covered by the manifest's digest, read by resume
(the config it was saved with, its step), retention (milestones), and the tools (``list``,
``inspect``, ``diff``, ``set-lr``). Everything reads it through :func:`read_record`, which
refuses a special file, a damaged file and a wrong type with one message naming the file and
the key. Keys this version does not know are kept in :attr:`CheckpointRecord.extra` and
written back unchanged, so a newer writer's fields survive an older tool.

Example::

    {"format": 1, "name": "step_00000120", "step": 120, "epoch": 2, "steps_per_epoch": 60,
     "world_size": 2, "run_id": "3f2c...", "trainer": "encoder", "reason": "interval",
     "time": 1764441600.0, "loss": 0.41, "metrics": {"val_loss": 0.45},
     "history": [{"epoch": 2, "step": 120, "train_loss": 0.43, "val_loss": 0.45}],
     "config": {...}, "milestone": null}
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher import fileio

INFO = "checkpoint.json"
FORMAT = 1


class RecordError(ValueError):
    """A ``checkpoint.json`` (or a record handed to a save) that does not fit the schema."""


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _optional(check):
    return lambda v: v is None or check(v)


_CHECKS: dict[str, tuple[Any, str]] = {
    "format": (lambda v: _int(v, 1), "an integer >= 1"),
    "name": (lambda v: isinstance(v, str), "a string"),
    "step": (lambda v: _int(v, 0), "an integer >= 0"),
    "epoch": (lambda v: _int(v, 0), "an integer >= 0"),
    "steps_per_epoch": (_optional(lambda v: _int(v, 1)), "an integer >= 1 or null"),
    "world_size": (lambda v: _int(v, 1), "an integer >= 1"),
    "run_id": (lambda v: isinstance(v, str), "a string"),
    "trainer": (lambda v: isinstance(v, str), "a string"),
    "reason": (lambda v: isinstance(v, str), "a string"),
    "time": (_optional(_number), "a number or null"),
    "loss": (_optional(_number), "a number or null"),
    "metrics": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _number(x) for k, x in v.items()),
                "an object of metric name -> number"),
    "history": (lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v), "a list of objects"),
    "config": (lambda v: isinstance(v, dict), "an object"),
    "milestone": (_optional(lambda v: isinstance(v, str) and v != ""), "a non-empty label or null"),
    "derived_from": (_optional(lambda v: isinstance(v, str)), "a string or null"),
    "change": (_optional(lambda v: isinstance(v, str)), "a string or null"),
    "last_eval": (_optional(lambda v: isinstance(v, dict)), "an object or null"),
    "init_from": (_optional(lambda v: isinstance(v, str)), "a string or null"),
    "snapshot_rank": (_optional(lambda v: _int(v, 0)), "an integer >= 0 or null"),
}

#: ``reason`` of a snapshot taken at a step where no checkpoint was due: retention keeps it only
#: until a newer checkpoint is verified (``layout.plan_retention``).
SNAPSHOT = "snapshot"


@dataclass
class CheckpointRecord:
    """One checkpoint's description (the content of its ``checkpoint.json``)."""

    step: int  # optimizer steps completed when it was taken; the directory is named step_<step:08d>
    epoch: int = 0  # epochs completed
    name: str = ""  # the directory name it was written under
    steps_per_epoch: int | None = None
    world_size: int = 1  # processes that wrote it
    run_id: str = ""  # identity of the run directory it belongs to (see meta.json)
    trainer: str = ""  # the config's trainer
    reason: str = ""  # why it was taken: interval, end of epoch, end of training, preemption, ...
    time: float | None = None  # wall time of the save
    loss: float | None = None  # training loss of its last step (mean over ranks)
    metrics: dict[str, float] = field(default_factory=dict)  # evaluation metrics at this step
    history: list[dict[str, Any]] = field(default_factory=list)  # the last epochs' records
    config: dict[str, Any] = field(default_factory=dict)  # the resolved run config it was trained with
    milestone: str | None = None  # a label (e.g. "meta-train done"): retention always keeps it
    derived_from: str | None = None  # set by tools that write a new checkpoint from another (set-lr)
    change: str | None = None  # what such a tool changed
    last_eval: dict[str, Any] | None = None  # the latest evaluation's record, also between evaluations
    init_from: str | None = None  # staged training: the other run's checkpoint this run started from
    snapshot_rank: int | None = None  # written alone by this rank after a peer was lost (launcher/snapshot.py)
    format: int = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as written

    @classmethod
    def from_json(cls, obj: Any, source: str = INFO) -> CheckpointRecord:
        """Validate a parsed ``checkpoint.json``; every problem is named in one RecordError."""
        if not isinstance(obj, dict):
            raise RecordError(f"{source}: expected a JSON object, found {type(obj).__name__}")
        problems = []
        if "step" not in obj:
            problems.append("'step' is missing")
        known, extra = {}, {}
        for key, value in obj.items():
            if key in _CHECKS:
                ok, expected = _CHECKS[key]
                if ok(value):
                    known[key] = value
                else:
                    problems.append(f"'{key}' = {value!r:.60}: expected {expected}")
            else:
                extra[key] = value
        if problems:
            raise RecordError(f"{source}: " + "; ".join(problems))
        return cls(**known, extra=extra)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **out}

    def validate(self) -> CheckpointRecord:
        """Raise RecordError if a field holds a value :meth:`from_json` would refuse."""
        return CheckpointRecord.from_json(self.to_json(), source="checkpoint record")

    @property
    def finite_loss(self) -> float | None:
        return self.loss if self.loss is not None and math.isfinite(self.loss) else None


def read_record(directory: Path) -> CheckpointRecord:
    """The ``checkpoint.json`` of a checkpoint directory.

    Raises:
        RecordError: the file is missing, special, damaged or does not fit the schema; the
            message names the file and what is wrong.
    """
    path = Path(directory) / INFO
    try:
        obj = fileio.read_json(path)
    except FileNotFoundError:
        raise RecordError(f"{path}: missing") from None
    except (OSError, ValueError) as e:
        raise RecordError(str(e) if str(path) in str(e) else f"{path}: unreadable ({e})") from None
    return CheckpointRecord.from_json(obj, source=str(path))


def encode(record: CheckpointRecord) -> bytes:
    """The bytes of a ``checkpoint.json`` for ``record`` (validated first)."""
    record.validate()
    return (json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n").encode()
