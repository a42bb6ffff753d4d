"""Our own loop: a trainer of ``trainers/protocol.py`` driven through the public API.

Everything a run does besides the trainer's steps (process group, run directory lock,
resume, checkpoints, preemption, ftrun's progress reports, metrics and what rank 0 shows)
is :class:`launcher.api.FaultTolerant`'s, the same code a user's own loop calls
(``docs/own-loop.md``). This module only maps a run config onto it and runs the loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import exit_codes, rng
from launcher.api import FaultTolerant
from launcher.checkpoint.files import CheckpointError
from launcher.config import RunConfig
from launcher.observe import Observer
from launcher.preempt import PreemptionFlag
from launcher.state import TrainerEntry
from trainers import resolve_trainer
from trainers.protocol import TrainContext

log = logging.getLogger("launcher")


@dataclass
class RunOptions:
    """What the command line asks for beyond the config."""

    run_dir: Path
    resume: str = "auto"
    reset_optimizer: bool = False
    log_level: str | None = None


def run(cfg: RunConfig, opts: RunOptions, preempt: PreemptionFlag | None = None,
        observer: Observer | None = None) -> int:
    """Train ``cfg`` in ``opts.run_dir`` on this process's share of the job; return the exit code."""
    try:
        with open_run(cfg, opts, preempt, observer) as ft:
            Job(cfg, ft).run()
        return ft.exit_code
    except CheckpointError as e:
        log.error("%s", e)
        return exit_codes.CHECKPOINT_ERROR


def open_run(cfg: RunConfig, opts: RunOptions, preempt: PreemptionFlag | None = None,
             observer: Observer | None = None) -> FaultTolerant:
    """The API session for ``cfg``: its checkpoint settings, shape fields, seed and logging."""
    trainer_cls = resolve_trainer(cfg.trainer)
    return FaultTolerant(
        opts.run_dir, config=cfg.to_dict(),
        shape_keys=(*getattr(trainer_cls, "shape_fields", ("model.",)), "trainer"),
        checkpoint=cfg.checkpoint, best=getattr(trainer_cls, "best", ("val_loss", "min")), seed=cfg.train.seed,
        log_interval=cfg.train.log_interval, resume=opts.resume, weights_only=opts.reset_optimizer,
        name=cfg.trainer, log_level=opts.log_level, configure_logging=True, observer=observer, preempt=preempt)


class Job:
    """One attempt at a run: set up the trainer, resume it, step it until the API says stop."""

    def __init__(self, cfg: RunConfig, ft: FaultTolerant):
        self.cfg, self.ft = cfg, ft
        self.trainer: Any = None
        self.steps_per_epoch = 0

    def run(self) -> None:
        start, total = self.start()
        for step in range(start, total):
            if self.step(step):
                break

    def start(self) -> tuple[int, int]:
        """Build the trainer, register it, resume; return (first step, total steps)."""
        ft, cfg = self.ft, self.cfg
        # Every generator of every rank starts from the seed, so a fresh attempt and a resumed
        # one draw the same numbers (python's and numpy's are otherwise seeded from the OS).
        rng.seed_everything(cfg.train.seed * 1000 + ft.rank)
        self.trainer = resolve_trainer(cfg.trainer)()
        self.trainer.setup(TrainContext(config=cfg, rank=ft.rank, world_size=ft.world_size, device=ft.device,
                                        run_dir=ft.run_dir, fresh=not ft.resuming))
        ft.state.add_root(TrainerEntry(self.trainer))
        self.steps_per_epoch = self.trainer.steps_per_epoch()
        total = cfg.train.total_steps(self.steps_per_epoch)
        return ft.resume(total_steps=total, steps_per_epoch=self.steps_per_epoch), total

    def step(self, step: int) -> bool:
        """Take step ``step`` (0-based); True when the run must stop."""
        out = self.trainer.train_step(step)
        return self.ft.end_step(step, evals=self._evaluate(step + 1), **out)

    def _evaluate(self, done: int) -> dict[str, float] | None:
        """The trainer's evaluation at each epoch end (``train.eval_every_epoch``)."""
        if done % self.steps_per_epoch or not self.cfg.train.eval_every_epoch:
            return None
        with self.ft.activity("evaluating"):
            return self.trainer.evaluate()
