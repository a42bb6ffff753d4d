"""Learning rates: the warmup + cosine schedule and which value wins on resume.

Two rules live here, for every trainer that wants them (ours both use them):

* **A schedule that stays continuous when a run is extended.** :class:`WarmupCosine` maps a
  step to a factor of the base lr. When ``train.max_steps`` changes on resume, the part of the
  cosine that is left is stretched (or squeezed) from the current step to the new end, so the lr
  at the resume step is the lr the run had there: no jump. Starting the schedule again (a new
  warmup, then a cosine to the new end) is an explicit choice (``--restart-schedule``).

* **Which lr wins on resume** (:class:`LrControl`), per named optimizer, in this order:

  1. the run config (file or ``--set``), when its value differs from the one the checkpoint was
     trained with: the user changed it for this start;
  2. otherwise a ``ckpt set-lr`` edit recorded in the checkpoint;
  3. otherwise the checkpoint's own value (which is the config's): training continues unchanged.

  One log line per optimizer says which one won. The state is a JSON string inside the
  checkpoint (``lr_control``), so ``python -m launcher.ckpt set-lr`` can edit it without the
  trainer's code.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger("launcher.lr")


@dataclass
class WarmupCosine:
    """Linear warmup from ``start`` to 1, then cosine decay to ``min_ratio`` at ``total``.

    ``anchor_step``/``anchor_progress`` pin the cosine: its progress is ``anchor_progress`` at
    ``anchor_step`` and 1 at ``total``, linear in between. A new run anchors at the end of the
    warmup with progress 0; :meth:`retarget` moves the anchor to the current step.
    """

    warmup_steps: int
    min_ratio: float
    total: int
    start: int = 0  # step at which this schedule began (0, or where it was restarted)
    anchor_step: int = -1  # -1: the end of the warmup
    anchor_progress: float = 0.0

    def _anchor(self) -> int:
        return self.start + self.warmup_steps if self.anchor_step < 0 else self.anchor_step

    def progress(self, step: int) -> float:
        anchor = self._anchor()
        span = max(1, self.total - anchor)
        return min(1.0, max(0.0, self.anchor_progress + (1 - self.anchor_progress) * (step - anchor) / span))

    def factor(self, step: int) -> float:
        """Multiplier of the base lr for optimizer step ``step`` (0-based)."""
        if step - self.start < self.warmup_steps:
            return (step - self.start + 1) / self.warmup_steps
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * self.progress(step)))

    def retarget(self, total: int, step: int) -> bool:
        """The run now ends at ``total``: stretch what is left of the cosine from ``step``. Returns
        whether anything changed; ``factor(step)`` is the same before and after."""
        if total == self.total:
            return False
        if step >= self._anchor():
            self.anchor_progress, self.anchor_step = self.progress(step), step
        self.total = total
        return True

    def restart(self, step: int, total: int) -> None:
        """Begin again at ``step``: a new warmup, then a full cosine down to ``total``."""
        self.start, self.total, self.anchor_step, self.anchor_progress = step, total, -1, 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WarmupCosine:
        return cls(**json.loads(text))


@dataclass
class LrEntry:
    """One optimizer's learning-rate bookkeeping, as saved in a checkpoint: what governs its next step."""

    key: str  # the config key that sets the base lr of the next step, e.g. "optim.lr"
    state_key: str  # where the optimizer's state lives in the checkpoint, e.g. "optim"
    config: float  # that key's value in the config the run was trained with
    lr: float = 0.0  # lr of the last step taken
    next_factor: float = 1.0  # the schedule's factor for the next step (1 for a constant lr)
    override: float | None = None  # base lr set by ``ckpt set-lr`` (None: no edit)


class LrControl:
    """Base learning rates of a trainer's named optimizers, and the precedence on resume."""

    def __init__(self, keys: dict[str, tuple[str, str]], config: dict[str, float]):
        """``keys``: optimizer name -> (config key of its first step's base lr, checkpoint state key);
        ``config``: optimizer name -> that key's value."""
        self.entries = {name: LrEntry(key=k, state_key=s, config=config[name]) for name, (k, s) in keys.items()}

    def base(self, name: str, config_value: float) -> float:
        """Base lr of optimizer ``name`` for this step: a set-lr override, else ``config_value``."""
        entry = self.entries[name]
        return config_value if entry.override is None else entry.override

    def record(self, name: str, lr: float, next_key: str, next_config: float, next_factor: float = 1.0) -> None:
        """After a step: its lr, and what governs the next step (its config key and value, the schedule's
        factor). A set-lr override applies while the same key governs; it ends when another key takes over
        (a trainer's next phase), which is logged."""
        entry = self.entries[name]
        if entry.override is not None and next_key != entry.key:
            log.info("lr of optimizer '%s': the set-lr value %.4g was for %s; from now on %s = %.4g applies",
                     name, entry.override, entry.key, next_key, next_config)
            entry.override = None
        entry.key, entry.config, entry.lr, entry.next_factor = next_key, next_config, lr, next_factor

    def to_json(self) -> str:
        return json.dumps({name: asdict(e) for name, e in self.entries.items()})

    def load(self, text: str, config_values: dict[str, tuple[str, float]]) -> None:
        """Restore saved entries and apply the precedence, one log line per optimizer.

        ``config_values``: optimizer name -> (config key governing the resume step, its value in
        this start's config).
        """
        saved = json.loads(text)
        for name, (key, value) in config_values.items():
            if name not in saved:
                continue
            entry = LrEntry(**saved[name])
            entry.override, why = resolve(name, entry, key, value)
            entry.key, entry.config = key, value
            log.info("%s", why)
            self.entries[name] = entry


def resolve(name: str, saved: LrEntry, key: str, value: float) -> tuple[float | None, str]:
    """The set-lr override still in force (or None) for optimizer ``name``, and the log line.

    ``saved`` is the checkpoint's entry; ``key``/``value`` the governing config key now and its
    value in this start's config. The rule is in the module docstring.
    """
    head = f"lr of optimizer '{name}' ({key}):"
    if key == saved.key and not math.isclose(value, saved.config, rel_tol=1e-12, abs_tol=0.0):
        replaced = f"; it replaces the set-lr value {saved.override:.4g}" if saved.override is not None else ""
        return None, (f"{head} the config wins: {value:.4g}, changed from {saved.config:.4g} since the "
                      f"checkpoint (file or --set){replaced}")
    if key == saved.key and saved.override is not None:
        return saved.override, (f"{head} the set-lr value in the checkpoint wins: base {saved.override:.4g} "
                                f"(config unchanged at {value:.4g})")
    return None, f"{head} {value:.4g} from the config, as in the checkpoint"


def set_lr(state: dict[str, Any], lr: float, name: str | None = None) -> tuple[str, LrEntry]:
    """What ``ckpt set-lr`` edits: optimizer ``name``'s lr in a checkpoint's ``state``.

    The step after the checkpoint runs at ``lr``, and a schedule goes on along its shape from
    there: the base lr becomes ``lr / factor`` (the schedule's factor for that step), recorded as a
    set-lr override, which wins on resume unless the config's value changed (see
    :class:`LrControl`). Raises ``KeyError`` naming the choices for a bad ``name``.
    """
    entries = json.loads(state["lr_control"])
    if name is None:
        if len(entries) != 1:
            raise KeyError(f"this checkpoint has optimizers {', '.join(sorted(entries))}; name one with --optimizer")
        name = next(iter(entries))
    if name not in entries:
        raise KeyError(f"no optimizer {name!r} in this checkpoint; it has {', '.join(sorted(entries))}")
    entry = LrEntry(**entries[name])
    entry.override = lr / entry.next_factor if entry.next_factor > 0 else lr
    for group in state[entry.state_key]["param_groups"]:
        group["lr"] = lr
    entries[name] = asdict(entry)
    state["lr_control"] = json.dumps(entries)
    return name, entry


def resume_schedule(schedule: WarmupCosine, total: int, step: int, restart: bool) -> None:
    """Fit a restored schedule to this start: restarted on request, else stretched to a new end."""
    if restart:
        schedule.restart(step, total)
        log.info("lr schedule restarted at step %d (--restart-schedule): %d warmup steps, then cosine to step %d",
                 step, schedule.warmup_steps, total)
    elif schedule.retarget(total, step):
        log.info("lr schedule: the run now ends at step %d; what was left of the cosine is stretched from "
                 "step %d, so the lr goes on from where it was (--restart-schedule starts it again instead)",
                 total, step)
