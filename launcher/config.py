"""Run configuration: YAML into typed dataclasses, validated all at once.

Precedence is command line (``--set a.b=v``) > YAML file > dataclass defaults.

A run config has generic sections owned by the launcher (``train``, ``checkpoint``)
and sections owned by the trainer (``data``, ``model``, ``optim``), whose dataclasses
the trainer declares. Every problem in a file is collected and reported in one
:class:`ConfigError`, each line naming the field, the value found and what was expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """One or more configuration problems, each on its own line."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


MIN_KEEP_LAST = 2  # one checkpoint alone leaves nothing to fall back to (also enforced by `ckpt prune`)
MAX_SEED = 2**32 - 1  # derived seeds (seed * 1000003 + epoch, ...) must fit the 64-bit seeds of torch and numpy


@dataclass
class TrainConfig:
    """Settings shared by every trainer."""

    max_steps: int = 100  # total optimizer steps of the run (not of this attempt)
    epochs: int = 0  # if > 0, the run's length in epochs instead of max_steps
    seed: int = 0  # seeds data order, model init and every rank's per-step random streams
    log_interval: int = 10  # progress (bar or line), TensorBoard point and agreement of the ranks every N steps
    eval_every_epoch: bool = True  # run the trainer's evaluation at each epoch end
    early_stop_patience: int = 0  # stop when the best metric has not improved for this many evaluations (0 = off)
    early_stop_min_delta: float = 0.0  # smallest change of the best metric that counts as an improvement

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the whole run: ``epochs`` epochs if set, else ``max_steps``."""
        return self.epochs * steps_per_epoch if self.epochs else self.max_steps

    def __post_init__(self) -> None:
        check = Checks("train")
        check(self.max_steps >= 1, "max_steps", self.max_steps, "an integer >= 1")
        check(self.epochs >= 0, "epochs", self.epochs, "an integer >= 0")
        check(0 <= self.seed <= MAX_SEED, "seed", self.seed, f"an integer from 0 to {MAX_SEED} (2**32 - 1)")
        check(self.log_interval >= 1, "log_interval", self.log_interval, "an integer >= 1")
        check(self.early_stop_patience >= 0, "early_stop_patience", self.early_stop_patience, "an integer >= 0")
        check(self.early_stop_min_delta >= 0, "early_stop_min_delta", self.early_stop_min_delta, "a number >= 0")
        check(not (self.early_stop_patience and not self.eval_every_epoch), "early_stop_patience",
              self.early_stop_patience, "0 when train.eval_every_epoch is false (it counts evaluations)")
        check.done()


@dataclass
class DistConfig:
    """The process groups (see docs/troubleshooting.md, "Time-outs")."""

    timeout_s: float = 300.0  # seconds a collective or the rendezvous store may wait for other ranks before failing

    def __post_init__(self) -> None:
        check = Checks("dist")
        check(self.timeout_s > 0, "timeout_s", self.timeout_s, "a number of seconds > 0")
        check.done()


@dataclass
class CheckpointConfig:
    """When and how checkpoints are written and kept."""

    interval_steps: int = 50  # save every N steps (0 = only at epoch ends and at the end)
    every_epoch: bool = True  # save at each epoch end
    interval_seconds: float = 0.0  # also save when this much wall time passed since the last save (0 = off)
    keep_last: int = 3  # newest verified checkpoints kept (>= 2, so a corrupt newest one has a fallback)
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0 = off)
    best_metric: str = ""  # metric that names the best checkpoint ("" = the trainer's default)
    best_mode: str = ""  # "min" or "max" ("" = the trainer's default)
    async_save: bool = False  # write in the background while training goes on (YAML key: async)

    def __post_init__(self) -> None:
        check = Checks("checkpoint")
        check(self.interval_steps >= 0, "interval_steps", self.interval_steps, "an integer >= 0")
        check(self.interval_seconds >= 0, "interval_seconds", self.interval_seconds, "a number >= 0")
        check(self.keep_last >= MIN_KEEP_LAST, "keep_last", self.keep_last,
              f"an integer >= {MIN_KEEP_LAST} (one checkpoint alone leaves nothing to fall back to)")
        check(self.keep_every >= 0, "keep_every", self.keep_every, "an integer >= 0")
        check(self.best_mode in ("", "min", "max"), "best_mode", self.best_mode, "'min' or 'max'")
        check.done()


# YAML spellings that are Python keywords.
_ALIASES = {"async": "async_save"}


@dataclass
class RunConfig:
    """A whole run: which trainer, the launcher's sections, and the trainer's own sections."""

    trainer: str  # "encoder", "recommender", or "package.module:ClassName"
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    sections: dict[str, Any] = field(default_factory=dict)  # the trainer's: data, model, optim, ...

    def __getattr__(self, name: str) -> Any:
        """``cfg.data``, ``cfg.model`` ... for the trainer's sections."""
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(name)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, as saved with every checkpoint."""
        out: dict[str, Any] = {"trainer": self.trainer, "train": dataclasses.asdict(self.train),
                               "checkpoint": dataclasses.asdict(self.checkpoint)}
        out["checkpoint"]["async"] = out["checkpoint"].pop("async_save")
        out["dist"] = dataclasses.asdict(self.dist)
        out.update({k: dataclasses.asdict(v) for k, v in self.sections.items()})
        return out


class _FieldError(Exception):
    pass


class FieldErrors(ValueError):
    """Raised by a dataclass's ``__post_init__`` with every bad field it found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


class Checks:
    """Collects field checks in ``__post_init__`` so that all of them are reported, not the first.

    Example::

        check = Checks("optim")
        check(self.lr > 0, "lr", self.lr, "a number > 0")
        check.done()   # raises FieldErrors if any check failed
    """

    def __init__(self, section: str):
        self.section = section
        self.problems: list[str] = []

    def __call__(self, ok: bool, name: str, value: Any, expected: str) -> None:
        if not ok:
            self.problems.append(f"{self.section}.{name} = {value!r}: expected {expected}")

    def done(self) -> None:
        if self.problems:
            raise FieldErrors(self.problems)


def _convert(value: Any, tp: Any, name: str) -> Any:
    """Coerce a YAML value to a field's declared type, or raise _FieldError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], name)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise _FieldError(f"{name} = {value!r}: expected a list")
        return [_convert(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _FieldError(f"{name} = {value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _FieldError(f"{name} = {value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _FieldError(f"{name} = {value!r}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _FieldError(f"{name} = {value!r}: expected a string")
    raise _FieldError(f"{name}: unsupported field type {tp!r}")


def build_section(cls: type, raw: Any, section: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from ``raw``, appending every problem found to ``problems``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{section} = {raw!r}: expected a mapping of settings")
        return None
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        attr = _ALIASES.get(key, key)
        if attr not in names:
            spelled = {v: k for k, v in _ALIASES.items()}
            known = ", ".join(sorted(spelled.get(n, n) for n in names))
            problems.append(f"{section}.{key}: unknown key (known keys: {known})")
            continue
        try:
            kwargs[attr] = _convert(value, hints[attr], f"{section}.{key}")
        except _FieldError as e:
            problems.append(str(e))
    before = len(problems)
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{section}.{f.name}: missing (required)")
    if len(problems) > before:
        return None
    try:
        return cls(**kwargs)
    except FieldErrors as e:
        problems.extend(e.problems)
    except (ValueError, TypeError) as e:
        problems.append(f"{section}: {e}")
    return None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError([f"--set {text!r}: expected dotted.key=value, e.g. --set train.max_steps=60"],
                          source="command line")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError([f"--set {text!r}: empty key"], source="command line")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to the raw YAML mapping (command line wins over the file)."""
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError([f"--set {text}: {part} is not a section"], source="command line")
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping, with a clear error for a missing or bad file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: no such file (pass an existing YAML file with --config)"], source=str(path))
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML: {e}"], source=str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: top level must be a mapping of sections"], source=str(path))
    return raw


def build_run_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a raw mapping into a RunConfig, reporting every problem at once."""
    from trainers import resolve_trainer  # late: trainers import this module

    problems: list[str] = []
    raw = dict(raw)
    name = raw.pop("trainer", None)
    trainer_cls = None
    if not isinstance(name, str) or not name:
        problems.append(f"trainer = {name!r}: expected 'encoder', 'recommender' or 'package.module:ClassName'")
    else:
        try:
            trainer_cls = resolve_trainer(name)
        except ValueError as e:
            problems.append(str(e))
    sections: dict[str, Any] = {
        "train": TrainConfig, "checkpoint": CheckpointConfig, "dist": DistConfig,
    }
    if trainer_cls is not None:
        sections.update(trainer_cls.config_sections)
    built: dict[str, Any] = {}
    for key in raw:
        if key not in sections and trainer_cls is not None:
            problems.append(f"{key}: unknown section (known: trainer, {', '.join(sections)})")
    for key, cls in sections.items():
        built[key] = build_section(cls, raw.get(key), key, problems)
    if problems:
        raise ConfigError(problems, source=source)
    return RunConfig(trainer=name, train=built.pop("train"), checkpoint=built.pop("checkpoint"),
                     dist=built.pop("dist"), sections=built)


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML file (or ``base``), apply ``--set`` overrides, validate."""
    raw = read_yaml(path) if path else dict(base or {})
    raw = apply_overrides(raw, overrides or [])
    return build_run_config(raw, source=str(path) if path else "config")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def diff_configs(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Fields whose values differ, as ``{"a.b": (old, new)}``."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def checkpoint_section(value: CheckpointConfig | dict[str, Any] | None) -> CheckpointConfig:
    """A ``CheckpointConfig`` from itself or a mapping of its fields (YAML spellings), checked."""
    if isinstance(value, CheckpointConfig):
        return value
    problems: list[str] = []
    built = build_section(CheckpointConfig, dict(value or {}), "checkpoint", problems)
    if problems:
        raise ConfigError(problems, source="checkpoint settings")
    return built


def under(key: str, field: str) -> bool:
    """``key`` is ``field`` or lies under it (``model.`` covers ``model.dim``; ``hidden`` only itself)."""
    return key == field or key.startswith(field if field.endswith(".") else f"{field}.")


def plain_data(value: Any) -> Any:
    """``value`` as plain JSON/YAML data (paths and other objects as strings), to save with a checkpoint."""
    if isinstance(value, dict):
        return {str(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
