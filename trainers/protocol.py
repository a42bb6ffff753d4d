"""The protocol every trainer implements: ours and a user's own.

A trainer is a plain class; it does not inherit from anything of ours. The launcher owns
the loop, the process group, checkpoints, metrics and logs; the trainer owns its data,
model(s) and optimizer(s) and says how to take one step. Read ``trainers/encoder/trainer.py``
for a complete example, and ``docs/own-trainer.md`` for a walk-through.

Loop contract (what the launcher guarantees):

* ``setup`` is called once per process, before anything else, on every rank.
* ``train_step(step)`` is called with the global step index (0-based, counts optimizer steps
  since the run began, across resumes). The batch must be a pure function of ``step``, the
  seed and the world size (see :func:`trainers.common.global_batch_indices`), so a resumed
  run sees exactly the samples an uninterrupted run would.
* ``evaluate()`` is called on every rank at each epoch end (every ``steps_per_epoch()`` steps).
* ``state_dict()`` / ``load_state_dict()`` are called on every rank around checkpoints.

Optional, each used when present:

* ``milestones() -> {step: label}``: steps whose checkpoint is always written and kept by retention
  (e.g. the end of a training phase).
* ``load_state_dict(..., restart_schedule=True)``: keep the optimizer state but start the lr
  schedule again at ``step`` (``--restart-schedule``, ``--init-from --init-optimizer``).
* ``package_keys``, ``package_meta()`` and ``from_package()``: what ``python -m launcher.ckpt package``
  writes and how :func:`launcher.package.load_package` runs it (see ``trainers/encoder/trainer.py``).
* ``trainers/lr.py``: a schedule that stays continuous when a run is extended, and the precedence
  between the config and a ``ckpt set-lr`` edit; ``set-lr`` works on every optimizer a trainer
  registers there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch


@dataclass
class TrainContext:
    """What the launcher hands a trainer at setup."""

    config: Any  # launcher.config.RunConfig
    rank: int
    world_size: int
    device: torch.device
    run_dir: Path
    fresh: bool  # True when the run starts at step 0 (nothing of this run is resumed; task sets etc. are created)
    #: The checkpoint whose state will be loaded: this run's own, another run's (``--resume PATH``),
    #: or, with ``fresh``, the one ``--init-from`` starts a new run from. None when nothing is loaded.
    source: Path | None = None
    #: Report the current step's metrics (the keywords ``train_step`` returns) as soon as they are
    #: known (before or after the step's collectives), before its optimizer step. Optional (``train_step``
    #: returns them anyway); with it, a rank killed during its optimizer step costs nothing
    #: (``docs/own-trainer.md``). Outside the launcher it does nothing.
    step_metrics: Callable[..., None] = field(default=lambda **metrics: None)


@runtime_checkable
class Trainer(Protocol):
    """What the launcher needs from a trainer."""

    #: Config sections the trainer owns: ``{"data": DataConfig, "model": ModelConfig, "optim": OptimConfig}``.
    config_sections: ClassVar[dict[str, type]]
    #: Dotted config prefixes that define tensor shapes; changing one on resume is an error.
    shape_fields: ClassVar[tuple[str, ...]]
    #: ``(metric, "min" | "max")`` that names the best checkpoint.
    best: ClassVar[tuple[str, str]]

    def setup(self, ctx: TrainContext) -> None:
        """Read data, build model(s) and optimizer(s) in their initial state."""

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one pass over the training data."""

    def train_step(self, step: int) -> dict[str, float | torch.Tensor]:
        """Take optimizer step number ``step``; return this rank's ``loss``, ``lr`` and any extras.

        Values are numbers or one-element tensors. Return ``loss.detach()`` rather than
        ``loss.item()``: the loop reads tensors only every ``train.log_interval`` steps, so on
        CUDA the step does not wait for the device.
        """

    def evaluate(self) -> dict[str, float]:
        """Metrics on held-out data, identical on every rank (reduce them if data is split)."""

    def state_dict(self, weights_only: bool = False) -> dict[str, Any]:
        """DCP-compatible state. Weights under ``"model"`` (no ``module.`` prefix).

        ``weights_only=True`` returns just the model weights (``--reset-optimizer``).
        """

    def load_state_dict(self, state: dict[str, Any], weights_only: bool = False, step: int = 0) -> None:
        """Restore from ``state`` saved after ``step`` steps.

        Re-apply settings the config may have changed (e.g. lr). With ``weights_only``
        (``--reset-optimizer``, ``--init-from`` without ``--init-optimizer``) only the
        ``weights_only`` entries are present: build a fresh optimizer and start the lr schedule
        again at ``step``. When the context's ``source`` is set and ``fresh`` is True, ``state``
        is another run's (``--init-from``) and this run starts at step 0 with its own config.
        """
