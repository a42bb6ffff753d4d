"""What a checkpoint holds: the states registered with a run, and how each is saved and loaded.

Each registered object becomes an *entry* that knows how to produce its state for a save, an
empty template for a load, and how to put a loaded state back:

==============================  ===========================================================
registered object               saved as
==============================  ===========================================================
``nn.Module`` (DDP or plain)     ``get_model_state_dict``: weights without DDP's ``module.``
``torch.optim.Optimizer``        ``get_optimizer_state_dict``: keyed by parameter names, so
                                 DCP can reshard it; the model(s) it trains must be registered
anything with ``state_dict()``   its ``state_dict()`` (lr schedulers, ``GradScaler``, ...)
and ``load_state_dict()``
a ``dict`` or ``list``           JSON text; updated in place on load, so the caller's own
                                 object holds the restored values
a trainer (``add_root``)         ``trainers/protocol.py``'s ``state_dict(weights_only)``, its
                                 keys at the top level (our ``Job``)
==============================  ===========================================================

:func:`check_fits` compares a template with a checkpoint's metadata before anything is
loaded, so a missing state or a changed shape is one clear error naming every problem,
not a traceback from inside DCP.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from launcher.checkpoint.files import CheckpointError
from launcher.exact import make_deterministic

#: Top-level keys the run itself saves next to the registered states.
RESERVED = ("progress", "rng")


class RegistrationError(ValueError):
    """A ``register()`` call that cannot work, with what to do instead."""


class Entry(Protocol):
    """One registered state."""

    kind: str  # for messages: "model", "optimizer", ...

    def state(self) -> Any:
        """The state to save."""

    def template(self, weights_only: bool) -> Any | None:
        """What to load into (None: not loaded, e.g. an optimizer with ``weights_only``)."""

    def load(self, value: Any, weights_only: bool, step: int) -> None:
        """Put the loaded ``value`` back into the object."""


class ModuleEntry:
    kind = "model"

    def __init__(self, module: nn.Module):
        self.module = module

    def state(self) -> Any:
        return get_model_state_dict(self.module)

    def template(self, weights_only: bool) -> Any:
        return get_model_state_dict(self.module)

    def load(self, value: Any, weights_only: bool, step: int) -> None:
        set_model_state_dict(self.module, value)


class OptimizerEntry:
    kind = "optimizer"

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.owner: nn.Module | None = None  # set by StateRegistry.seal()

    def state(self) -> Any:
        return get_optimizer_state_dict(self.owner, self.optimizer)

    def template(self, weights_only: bool) -> Any | None:
        return None if weights_only else get_optimizer_state_dict(self.owner, self.optimizer)

    def load(self, value: Any, weights_only: bool, step: int) -> None:
        if not weights_only:
            set_optimizer_state_dict(self.owner, self.optimizer, value)


class StatefulEntry:
    kind = "stateful"

    def __init__(self, obj: Any):
        self.obj = obj

    def state(self) -> Any:
        return self.obj.state_dict()

    def template(self, weights_only: bool) -> Any | None:
        return None if weights_only else self.obj.state_dict()

    def load(self, value: Any, weights_only: bool, step: int) -> None:
        if not weights_only:
            self.obj.load_state_dict(value)


class JsonEntry:
    """A dict or list of plain values, saved as JSON text and restored in place."""

    kind = "values"

    def __init__(self, name: str, obj: dict | list):
        self.name, self.obj = name, obj
        self.state()  # fail at register(), not at the first save

    def state(self) -> str:
        try:
            return json.dumps(self.obj, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise RegistrationError(f"register({self.name}=...): its values must be plain JSON (numbers, "
                                    f"strings, booleans, None, lists, dicts with string keys): {e}") from None

    def template(self, weights_only: bool) -> str | None:
        return None if weights_only else ""

    def load(self, value: Any, weights_only: bool, step: int) -> None:
        if weights_only:
            return
        loaded = json.loads(value)
        if isinstance(self.obj, dict):
            self.obj.clear()
            self.obj.update(loaded)
        else:
            self.obj[:] = loaded


class TrainerEntry:
    """A trainer of ``trainers/protocol.py``: its own keys, at the top level of the checkpoint.

    ``restart_schedule`` (``--restart-schedule``): keep the optimizer state but start the lr
    schedule again, for trainers whose ``load_state_dict`` takes that argument.
    """

    kind = "trainer"

    def __init__(self, trainer: Any, restart_schedule: bool = False):
        self.trainer, self.restart_schedule = trainer, restart_schedule

    def state(self) -> dict[str, Any]:
        return self.trainer.state_dict()

    def template(self, weights_only: bool) -> dict[str, Any]:
        return self.trainer.state_dict(weights_only=weights_only)

    def load(self, value: Any, weights_only: bool, step: int, restart_schedule: bool | None = None) -> None:
        restart = self.restart_schedule and not weights_only if restart_schedule is None else restart_schedule
        kwargs = {}
        if restart:
            if "restart_schedule" not in inspect.signature(self.trainer.load_state_dict).parameters:
                raise CheckpointError(f"trainer {type(self.trainer).__name__} cannot restart its lr schedule while "
                                      f"keeping its optimizer state (its load_state_dict has no restart_schedule "
                                      f"argument); use --reset-optimizer to start optimizer and schedule afresh")
            kwargs["restart_schedule"] = True
        self.trainer.load_state_dict(value, weights_only=weights_only, step=step, **kwargs)


def entry_for(name: str, obj: Any) -> Entry:
    """The entry that saves ``obj`` under ``name``, or a RegistrationError saying what fits."""
    if isinstance(obj, nn.Module):
        if isinstance(obj, DistributedDataParallel):
            # Gradients averaged in rank order, so a resumed run reduces each step exactly as an
            # uninterrupted one did at world size >= 3 (launcher/exact.py; a no-op if already done).
            make_deterministic(obj)
        return ModuleEntry(obj)
    if isinstance(obj, torch.optim.Optimizer):
        return OptimizerEntry(obj)
    if callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)):
        return StatefulEntry(obj)
    if isinstance(obj, (dict, list)):
        return JsonEntry(name, obj)
    raise RegistrationError(
        f"register({name}=...): cannot save a {type(obj).__name__}. Register an nn.Module, an optimizer, "
        f"an object with state_dict() and load_state_dict(), or a dict or list of plain values (restored in "
        f"place on resume), e.g. register({name}={{'value': ...}}) for a single number.")


class StateRegistry:
    """The registered states of a run, in registration order."""

    def __init__(self) -> None:
        self.named: dict[str, Entry] = {}
        self.roots: list[Entry] = []
        self.sealed = False
        self._root_keys: list[list[str]] = []  # each root's keys in the last template

    def add(self, name: str, obj: Any) -> None:
        """Register ``obj`` under ``name`` (its key in the checkpoint)."""
        self._check_open(name)
        if name in RESERVED:
            raise RegistrationError(f"register({name}=...): {name!r} is reserved for the run's own state "
                                    f"({', '.join(RESERVED)}); choose another name")
        if name in self.named:
            raise RegistrationError(f"register({name}=...): {name!r} is already registered; each name "
                                    f"holds one object")
        self.named[name] = entry_for(name, obj)

    def add_root(self, entry: Entry) -> None:
        """Register an entry whose keys sit at the top level (a trainer's own ``state_dict``)."""
        self._check_open(type(entry).__name__)
        self.roots.append(entry)

    def _check_open(self, name: str) -> None:
        if self.sealed:
            raise RegistrationError(
                f"register({name}=...) after resume(): the other states were already loaded, so this one "
                f"would start fresh while the rest resumes. Register every model, optimizer and value "
                f"before calling resume().")

    def seal(self) -> None:
        """Close registration; find the model(s) each optimizer trains."""
        owners: dict[int, tuple[str, nn.Module]] = {}
        for name, entry in self.named.items():
            if isinstance(entry, ModuleEntry):
                for p in entry.module.parameters():
                    owners.setdefault(id(p), (name, entry.module))
        for name, entry in self.named.items():
            if isinstance(entry, OptimizerEntry):
                entry.owner = _owner(name, entry.optimizer, owners)
        self.sealed = True

    def state(self) -> dict[str, Any]:
        """Everything registered, as one DCP state dict."""
        out: dict[str, Any] = {}
        for entry in self.roots:
            out.update(entry.state())
        for name, entry in self.named.items():
            out[name] = entry.state()
        return out

    def template(self, weights_only: bool) -> dict[str, Any]:
        """What a load fills in (only the models' weights with ``weights_only``)."""
        out: dict[str, Any] = {}
        self._root_keys = []
        for entry in self.roots:
            mine = entry.template(weights_only)
            self._root_keys.append(list(mine))
            out.update(mine)
        for name, entry in self.named.items():
            value = entry.template(weights_only)
            if value is not None:
                out[name] = value
        return out

    def load(self, loaded: dict[str, Any], weights_only: bool, step: int) -> None:
        """Put back what DCP loaded into the last :meth:`template` (``loaded`` holds its keys)."""
        for entry, keys in zip(self.roots, self._root_keys, strict=True):
            entry.load({k: loaded[k] for k in keys}, weights_only, step)
        for name, entry in self.named.items():
            if name in loaded:
                entry.load(loaded[name], weights_only, step)

    def init_template(self, with_optimizer: bool) -> dict[str, Any]:
        """What staged training takes from another run: models' weights, and optimizers' state if asked.

        Lr schedulers and plain values are this run's own (a new stage has its own schedule).
        """
        out: dict[str, Any] = {}
        self._root_keys = []
        for entry in self.roots:
            mine = entry.template(not with_optimizer)
            self._root_keys.append(list(mine))
            out.update(mine)
        for name, entry in self.named.items():
            if isinstance(entry, ModuleEntry) or (with_optimizer and isinstance(entry, OptimizerEntry)):
                out[name] = entry.template(False)
        return out

    def init_load(self, loaded: dict[str, Any], with_optimizer: bool) -> None:
        """Put back what :meth:`init_template` asked for; the run starts at step 0 on a fresh schedule."""
        for entry, keys in zip(self.roots, self._root_keys, strict=True):
            if isinstance(entry, TrainerEntry):
                entry.load({k: loaded[k] for k in keys}, not with_optimizer, 0, restart_schedule=with_optimizer)
            else:
                entry.load({k: loaded[k] for k in keys}, not with_optimizer, 0)
        for name, entry in self.named.items():
            if name in loaded:
                entry.load(loaded[name], False, 0)


def _owner(name: str, optimizer: torch.optim.Optimizer, owners: dict[int, tuple[str, nn.Module]]) -> nn.Module:
    """The registered module whose parameters ``optimizer`` updates (a ModuleDict when several)."""
    found: dict[str, nn.Module] = {}
    orphans = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in owners:
                module_name, module = owners[id(p)]
                found[module_name] = module
            else:
                orphans += 1
    if orphans or not found:
        raise RegistrationError(
            f"register({name}=optimizer): {orphans or 'all'} of its parameters belong to no registered model, "
            f"so their optimizer state could not be named in the checkpoint. Register the model(s) it trains "
            f"too, e.g. register(model=model, {name}=optimizer).")
    if len(found) == 1:
        return next(iter(found.values()))
    return nn.ModuleDict(found)  # parameter names get the models' registered names as prefixes


def check_fits(path: Path, template: dict[str, Any], saved: dict[str, tuple[int, ...] | None]) -> None:
    """Raise CheckpointError naming every registered state that the checkpoint lacks or sizes differently.

    Args:
        path: the checkpoint (for the message).
        template: what the run is about to load.
        saved: the checkpoint's flattened keys and tensor shapes (None for non-tensors).
    """
    flat, _ = flatten_state_dict(template)
    tops_saved = {k.split(".", 1)[0] for k in saved}
    absent = sorted({k.split(".", 1)[0] for k in flat} - tops_saved)
    if absent:
        raise CheckpointError(
            f"Checkpoint {path} has no state for {', '.join(repr(a) for a in absent)}, which this run "
            f"registered; it holds {', '.join(sorted(tops_saved))}. Register the same states under the same "
            f"names as the run that wrote it, or start a new --run-dir.")
    problems = []
    for key, value in flat.items():
        if key not in saved:
            what = "in the model" if isinstance(value, torch.Tensor) else "a value this run restores"
            problems.append(f"{key}: {what}, not in the checkpoint")
        elif isinstance(value, torch.Tensor) and saved[key] is not None and tuple(value.shape) != saved[key]:
            problems.append(f"{key}: checkpoint has shape {list(saved[key])}, model has {list(value.shape)}")
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(f"Checkpoint {path} does not fit this model:\n{listing}{more}\n"
                              f"The data or config defines a different architecture; restore it or use a "
                              f"new --run-dir.")
