"""Our own loop: a trainer of ``trainers/protocol.py`` driven through the public API.

Everything a run does besides the trainer's steps (process group, run directory lock,
resume, checkpoints, preemption, early stopping, ftrun's progress reports, metrics and what
rank 0 shows) is :class:`launcher.api.FaultTolerant`'s, the same code a user's own loop calls
(``docs/own-loop.md``). This module only maps a run config onto it and runs the loop.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import endings, exit_codes, fileio, finished, logs, rng
from launcher import env as cluster_env
from launcher.api import FaultTolerant
from launcher.checkpoint.files import CheckpointError
from launcher.config import RunConfig
from launcher.observe import Observer
from launcher.preempt import TEARDOWN_SIGNAL, PreemptionFlag, teardown
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
    init_from: Path | None = None  # start a new run from another run's checkpoint (weights)
    init_optimizer: bool = False  # with init_from: also its optimizer state
    restart_schedule: bool = False  # on resume: keep the optimizer state, start the lr schedule again


def run(cfg: RunConfig, opts: RunOptions, preempt: PreemptionFlag | None = None,
        interrupt: endings.InterruptFlag | None = None, observer: Observer | None = None) -> int:
    """Train ``cfg`` in ``opts.run_dir`` on this process's share of the job; return the exit code.

    Ctrl-C and a lost peer end the process with one line each (:mod:`launcher.endings`); other
    errors keep their tracebacks.
    """
    env = cluster_env.detect()
    logs.setup(env.rank, opts.log_level)  # the rank's log file is added once there is work to do
    ft: FaultTolerant | None = None
    try:
        ft = open_run(cfg, opts, preempt, observer)
        with ft:
            Job(cfg, opts, ft).run()
        return ft.exit_code
    except KeyboardInterrupt as e:
        return endings.interrupted(env, opts.run_dir, ft.step_reached if ft else None, interrupt, e)
    except Exception as e:
        reached = ft.step_reached if ft else None
        if opts.run_dir.is_dir():  # whatever the failure, the rank's log file has it (and what led to it)
            with contextlib.suppress(OSError):  # a read-only or full run directory: the console has it
                logs.attach_file(env.rank, opts.run_dir, opts.log_level)
        if interrupt is not None and interrupt.raised:  # a peer stopped by the same Ctrl-C failed us first
            return endings.interrupted(env, opts.run_dir, reached, interrupt, e)
        if endings.is_peer_failure(e):  # while starting: the API ends a training worker itself
            endings.peer_lost(env, opts.run_dir, reached, e)
            signum = TEARDOWN_SIGNAL if preempt is not None and preempt.signum == TEARDOWN_SIGNAL else None
            teardown(f"a collective failed while starting ({endings.short_reason(e)})", signum=signum)
        if isinstance(e, CheckpointError):
            log.error("%s", e)
            return e.code
        if isinstance(e, OSError):  # a run-directory file that cannot be written mid-run (disk full, ...)
            log.error("%s", fileio.describe_os_error(e))
            return exit_codes.CHECKPOINT_ERROR
        raise


def open_run(cfg: RunConfig, opts: RunOptions, preempt: PreemptionFlag | None = None,
             observer: Observer | None = None) -> FaultTolerant:
    """The API session for ``cfg``: its checkpoint settings, shape fields, seed and logging."""
    trainer_cls = resolve_trainer(cfg.trainer)
    t = cfg.train
    return FaultTolerant(
        opts.run_dir, config=cfg.to_dict(),
        shape_keys=(*getattr(trainer_cls, "shape_fields", ("model.",)), "trainer"),
        checkpoint=cfg.checkpoint, best=getattr(trainer_cls, "best", ("val_loss", "min")), seed=t.seed,
        log_interval=t.log_interval, resume=opts.resume, weights_only=opts.reset_optimizer,
        name=cfg.trainer, log_level=opts.log_level, configure_logging=True, observer=observer, preempt=preempt,
        timeout_s=cfg.dist.timeout_s, early_stop_patience=t.early_stop_patience,
        early_stop_min_delta=t.early_stop_min_delta, init_from=opts.init_from, init_optimizer=opts.init_optimizer)


class Job:
    """One attempt at a run: set up the trainer, resume it, step it until the API says stop."""

    def __init__(self, cfg: RunConfig, opts: RunOptions, ft: FaultTolerant):
        self.cfg, self.opts, self.ft = cfg, opts, ft
        self.trainer: Any = None
        self.steps_per_epoch = 0
        self.milestones: dict[int, str] = {}  # step -> label of a checkpoint retention keeps for good

    def run(self) -> None:
        start, total = self.start()
        for step in range(start, total):
            if self.step(step):
                break

    def start(self) -> tuple[int, int]:
        """Build the trainer, register it, resume; return (first step, total steps)."""
        ft, cfg = self.ft, self.cfg
        if ft.record is not None:  # checked before the trainer is built: a finished run costs nothing
            message = finished.check(cfg.train, ft.record, ft.checkpoint)
            if message:
                ft.nothing_to_do(message)
                return 0, 0
        # The trainer's set-up draws the same numbers in every attempt (python's and numpy's
        # generators are otherwise seeded from the OS); each step's draws come from the step's
        # own streams, seeded by FaultTolerant at every step boundary (launcher/rng.py).
        rng.seed_everything(cfg.train.seed * 1000 + ft.rank)
        self.trainer = resolve_trainer(cfg.trainer)()
        self.trainer.setup(TrainContext(config=cfg, rank=ft.rank, world_size=ft.world_size, device=ft.device,
                                        run_dir=ft.run_dir, fresh=not ft.resuming,
                                        source=ft.checkpoint or ft.init_source,
                                        step_metrics=lambda **m: ft.step_metrics(ft.progress.step, **m)))
        ft.state.add_root(TrainerEntry(self.trainer, restart_schedule=self.opts.restart_schedule))
        self.steps_per_epoch = self.trainer.steps_per_epoch()
        self.milestones = self.trainer.milestones() if hasattr(self.trainer, "milestones") else {}
        total = cfg.train.total_steps(self.steps_per_epoch)
        evaluate = self.trainer.evaluate if cfg.train.eval_every_epoch else None  # a pending one runs first
        return ft.resume(total_steps=total, steps_per_epoch=self.steps_per_epoch, evaluate=evaluate), total

    def step(self, step: int) -> bool:
        """Take step ``step`` (0-based); True when the run must stop."""
        out = self.trainer.train_step(step)
        return self.ft.end_step(step, evals=self._evaluation(step + 1), milestone=self.milestones.get(step + 1),
                                **out)

    def _evaluation(self, done: int) -> Callable[[], dict[str, float]] | None:
        """The trainer's evaluation at each epoch end (``train.eval_every_epoch``), for ``end_step`` to
        run once the step's record is under way (a peer lost during it then finds the step complete)."""
        if done % self.steps_per_epoch or not self.cfg.train.eval_every_epoch:
            return None
        return self.trainer.evaluate
