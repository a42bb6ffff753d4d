"""The training loop: resume, step, evaluate, checkpoint, stop. Same code for 1 or N processes."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from filelock import FileLock, Timeout

from launcher import dist as ldist
from launcher import env as cluster_env
from launcher import events, exit_codes, logs, observers, rng
from launcher.checkpoint import files
from launcher.checkpoint.manager import CheckpointError, CheckpointManager
from launcher.config import RunConfig, diff_configs, flatten
from launcher.heartbeat import Heartbeat
from launcher.metrics import MetricsLog
from launcher.observe import Observer
from launcher.preempt import PreemptionFlag, end_if_peer_failed
from trainers import resolve_trainer
from trainers.protocol import TrainContext

log = logging.getLogger("launcher")


@dataclass
class Progress:
    """Counters and histories saved with every checkpoint (as JSON inside the DCP state)."""

    step: int = 0
    epoch_loss_sum: float = 0.0  # running sum of the current epoch's step losses
    epoch_loss_count: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch
    resumed_at: list[int] = field(default_factory=list)  # steps at which the run resumed

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Progress:
        return cls(**json.loads(text))


@dataclass
class RunOptions:
    """What the command line asks for beyond the config."""

    run_dir: Path
    resume: str = "auto"
    reset_optimizer: bool = False
    log_level: str | None = None


def run(cfg: RunConfig, opts: RunOptions, preempt: PreemptionFlag | None = None) -> int:
    """Train ``cfg`` in ``opts.run_dir`` on this process's share of the job; return the exit code."""
    env = cluster_env.detect()
    ctx = ldist.init(env)
    opts.run_dir.mkdir(parents=True, exist_ok=True)
    logs.setup(ctx.rank, opts.log_level, opts.run_dir)
    log.info("Process group: backend %s, world size %d, device %s (%s launch)", ctx.backend, ctx.world_size,
             ctx.device, ctx.env.kind)
    try:
        return Job(cfg, opts, ctx, observer=observers.for_rank(ctx.is_main, cfg.train.log_interval),
                   preempt=preempt).run()
    except CheckpointError as e:
        log.error("%s", e)
        return exit_codes.CHECKPOINT_ERROR
    finally:
        ldist.shutdown()


class Job:
    """One attempt at a run: everything between process-group init and exit."""

    def __init__(self, cfg: RunConfig, opts: RunOptions, ctx: ldist.DistContext, observer: Observer | None = None,
                 preempt: PreemptionFlag | None = None):
        self.cfg, self.opts, self.ctx = cfg, opts, ctx
        self.observer = observer or Observer()
        self.run_dir = opts.run_dir
        self.trainer_cls = resolve_trainer(cfg.trainer)
        self.manager = CheckpointManager(self.run_dir, cfg.checkpoint, ctx.rank, ctx.world_size,
                                         ctx.ckpt_group, best=getattr(self.trainer_cls, "best", ("val_loss", "min")))
        self.metrics = MetricsLog(self.run_dir, enabled=ctx.is_main)
        self.heartbeat = Heartbeat(ctx.env.agent_progress_file, ctx.rank)
        self.preempt = preempt or PreemptionFlag()
        self.progress = Progress()
        self._lock: FileLock | None = None

    # ------------------------------------------------------------------ start

    def run(self) -> int:
        # Before the (possibly long) resume: SIGUSR1 and the like then stop the run after its first
        # step; SIGTERM keeps its default action until the loop begins (launcher/preempt.py).
        self.preempt.install(self.ctx.env.preempt_signals)
        try:
            self._lock_run_dir()
            self.manager.prepare()
            path = self.manager.resolve(self.opts.resume)
            info = files.read_info(path) if path else None
            if info:
                self._check_config(info)
            # Every generator of every rank starts from the seed, so a fresh attempt and a resumed
            # one draw the same numbers (python's and numpy's are otherwise seeded from the OS).
            rng.seed_everything(self.cfg.train.seed * 1000 + self.ctx.rank)
            self.trainer = self.trainer_cls()
            self.trainer.setup(TrainContext(config=self.cfg, rank=self.ctx.rank, world_size=self.ctx.world_size,
                                            device=self.ctx.device, run_dir=self.run_dir, fresh=path is None))
            if path:
                self._resume(path, info)
            else:
                log.info("Starting fresh in %s (no checkpoint found)", self.run_dir)
                # Metrics of an attempt that died before its first checkpoint are not part of this run.
                self.metrics.truncate_after(0)
            self._write_config()
            self._record_start(path, info)
            return self._loop()
        except RuntimeError as e:
            # A peer is gone: end now, before the clean-up below, which could wait for it.
            end_if_peer_failed(e, self.ctx.world_size, self.preempt)
            raise
        finally:
            self.manager.close()
            self.metrics.close()
            self.observer.close()
            if self._lock is not None:
                self._lock.release()

    def _lock_run_dir(self) -> None:
        """Refuse a second live job on this run directory (the lock dies with its holder)."""
        outcome = [None]
        if self.ctx.is_main:
            self._lock = FileLock(str(self.run_dir / ".lock"))
            try:
                self._lock.acquire(timeout=0)
            except Timeout:
                self._lock = None
                outcome[0] = (f"{self.run_dir} is in use by another live job (lock {self.run_dir / '.lock'} "
                              f"is held). Wait for it to finish or stop it, or choose another --run-dir.")
        if self.ctx.world_size > 1:
            dist.broadcast_object_list(outcome, src=0, group=self.ctx.ckpt_group)
        if outcome[0]:
            raise CheckpointError(outcome[0])

    def _check_config(self, info: dict[str, Any]) -> None:
        saved = info.get("config", {})
        changes = diff_configs(saved, self.cfg.to_dict())
        shape = getattr(self.trainer_cls, "shape_fields", ("model.",))
        bad = {k: v for k, v in changes.items() if any(k == f or k.startswith(f) for f in shape) or k == "trainer"}
        if bad:
            lines = "\n".join(f"  - {k}: checkpoint has {a!r}, config has {b!r}" for k, (a, b) in bad.items())
            raise CheckpointError(
                f"The config changes the model's architecture relative to checkpoint {info.get('name')}:\n{lines}\n"
                f"Restore these values to resume, or start a new --run-dir (use --resume PATH with "
                f"--reset-optimizer only for weights of the same shape).")
        for k, (a, b) in changes.items():
            log.info("Config change accepted on resume: %s: %r -> %r", k, a, b)

    def _resume(self, path: Path, info: dict[str, Any]) -> None:
        weights_only = self.opts.reset_optimizer
        template = self.trainer.state_dict(weights_only=weights_only)
        self._check_shapes(path, template)
        own_rng = f"rank{self.ctx.rank}"
        saved_keys = CheckpointManager.saved_shapes(path)
        has_rng = any(k.startswith(f"rng.{own_rng}.") for k in saved_keys)
        template["progress"] = ""
        if has_rng:
            template["rng"] = {own_rng: rng.capture()}
        log.info("Resuming from checkpoint: %s", path)
        state = self.manager.load(path, template)
        step = int(info["step"])
        self.trainer.load_state_dict(state, weights_only=weights_only, step=step)
        self.progress = Progress.from_json(state["progress"])
        if has_rng:
            rng.restore(state["rng"][own_rng])
        else:
            log.warning("Checkpoint has no RNG state for rank %d (saved at world size %s): this rank keeps "
                        "its fresh seed", self.ctx.rank, info.get("world_size"))
        self.progress.resumed_at.append(step)
        self.manager.mark_saved(step)
        dropped = self.metrics.truncate_after(step)
        spe = self.trainer.steps_per_epoch()
        log.info("Resumed from epoch %d, step %d (checkpoint %s); %d epoch record(s) restored%s; target %d steps",
                 step // spe + 1, step, path.name, len(self.progress.history),
                 f"; dropped {dropped} metrics record(s) logged after it" if dropped else "", self.total_steps)
        if weights_only:
            log.info("--reset-optimizer: weights loaded; optimizer and lr schedule start fresh at step %d", step)

    def _check_shapes(self, path: Path, template: dict[str, Any]) -> None:
        saved = CheckpointManager.saved_shapes(path)
        problems = []
        for key, value in flatten(template).items():
            if not isinstance(value, torch.Tensor):
                continue
            if key not in saved:
                problems.append(f"{key}: in the model, not in the checkpoint")
            elif saved[key] is not None and tuple(value.shape) != saved[key]:
                problems.append(f"{key}: checkpoint has shape {list(saved[key])}, model has {list(value.shape)}")
        if problems:
            listing = "\n".join(f"  - {p}" for p in problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise CheckpointError(f"Checkpoint {path} does not fit this model:\n{listing}{more}\n"
                                  f"The data or config defines a different architecture; restore it or use a "
                                  f"new --run-dir.")

    def _record_start(self, path: Path | None, info: dict[str, Any] | None) -> None:
        env = self.ctx.env
        if env.requeue_count or env.restart_count:
            log.info("Attempt: torchrun/ftrun restart %d, SLURM requeue (SLURM_RESTART_COUNT) %d",
                     env.restart_count, env.requeue_count)
        if self.ctx.is_main:
            events.append(self.run_dir, "worker_start", step=self.progress.step, checkpoint=path.name if path else None,
                          world_size=self.ctx.world_size, restart_count=env.restart_count,
                          slurm_restart_count=env.requeue_count, job_id=env.job_id)

    def _write_config(self) -> None:
        if self.ctx.is_main:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))

    # ------------------------------------------------------------------ loop

    @property
    def total_steps(self) -> int:
        return self.cfg.train.total_steps(self.trainer.steps_per_epoch())

    def _loop(self) -> int:
        self.preempt.training()  # from here on SIGTERM is a preemption: checkpoint, then exit 75
        spe = self.trainer.steps_per_epoch()
        p = self.progress
        started = time.time()
        self.observer.on_start(self.run_dir, p.step, self.total_steps, resumed=bool(p.resumed_at))
        while p.step < self.total_steps:
            self.heartbeat.report(p.step, "training")
            out = self.trainer.train_step(p.step)
            p.step += 1
            out, wants_save, preempted = self._reduce(out)
            p.epoch_loss_sum += out["loss"]
            p.epoch_loss_count += 1
            epoch_end = p.step % spe == 0
            record = {"step": p.step, "epoch": (p.step - 1) // spe + 1, **out, "time": time.time()}
            self.metrics.write(record)
            self.observer.on_step(record)
            # Rank 0's observer prints progress itself (a bar, or lines with steps/s and ETA).
            quiet = getattr(self.observer, "reports_progress", False)
            if not quiet and (p.step % self.cfg.train.log_interval == 0 or p.step == 1):
                log.info("step %d/%d epoch %d loss %.5f lr %.3g", p.step, self.total_steps,
                         record["epoch"], out["loss"], out.get("lr", float("nan")))
            evals = self._end_epoch(p.step // spe) if epoch_end else {}
            final = p.step >= self.total_steps
            reason = "preemption" if preempted else self.manager.due(p.step, epoch_end, final, wants_save)
            if reason:
                self._save(reason, out, evals, blocking=preempted or final)
            if preempted:
                log.warning("Preempted (%s): checkpoint at step %d written; exiting with code %d",
                            self.preempt.name or "another rank's signal", p.step, exit_codes.PREEMPTED)
                if self.ctx.is_main:
                    events.append(self.run_dir, "preempted", step=p.step, signal=self.preempt.name,
                                  slurm_restart_count=self.ctx.env.requeue_count, job_id=self.ctx.env.job_id)
                self.observer.on_end(self._summary("preempted", started))
                return exit_codes.PREEMPTED
        self.manager.wait()
        log.info("Training finished: %d steps in %.1f s this attempt", p.step, time.time() - started)
        self.observer.on_end(self._summary("finished", started))
        return exit_codes.OK

    def _summary(self, status: str, started: float) -> dict[str, Any]:
        p = self.progress
        return {"status": status, "step": p.step, "total_steps": self.total_steps,
                "attempt_seconds": time.time() - started, "history": p.history, "resumed_at": p.resumed_at,
                "checkpoints": str(self.manager.root)}

    def _reduce(self, out: dict[str, float]) -> tuple[dict[str, float], bool, bool]:
        """Mean of every metric over ranks, plus the save and preemption flags of any rank."""
        keys = sorted(out)
        vec = torch.tensor([float(out[k]) for k in keys] +
                           [float(self.manager.local_wants_save()), float(self.preempt.raised)], dtype=torch.float64)
        if self.ctx.world_size > 1:
            dev = vec.to(self.ctx.device)
            dist.all_reduce(dev)
            vec = dev.cpu()
        n = len(keys)
        means = {k: float(vec[i]) / self.ctx.world_size for i, k in enumerate(keys)}
        return means, bool(vec[n] > 0), bool(vec[n + 1] > 0)

    def _end_epoch(self, epoch: int) -> dict[str, float]:
        p = self.progress
        evals: dict[str, float] = {}
        if self.cfg.train.eval_every_epoch:
            self.heartbeat.report(p.step, "evaluating")
            evals = self.trainer.evaluate()
        train_loss = p.epoch_loss_sum / max(p.epoch_loss_count, 1)
        p.history.append({"epoch": epoch, "step": p.step, "train_loss": train_loss, **evals})
        p.epoch_loss_sum, p.epoch_loss_count = 0.0, 0
        record = {"step": p.step, "epoch": epoch, "train_loss": train_loss, **evals, "time": time.time()}
        self.metrics.write(record)
        self.observer.on_eval(record)
        shown = " ".join(f"{k} {v:.5f}" for k, v in evals.items())
        log.info("epoch %d done at step %d: train_loss %.5f %s", epoch, p.step, train_loss, shown)
        return evals

    def _save(self, reason: str, out: dict[str, float], evals: dict[str, float], blocking: bool) -> None:
        p = self.progress
        self.heartbeat.report(p.step, "saving")
        spe = self.trainer.steps_per_epoch()
        state = {**self.trainer.state_dict(), "progress": p.to_json(),
                 "rng": {f"rank{self.ctx.rank}": rng.capture()}}
        info = {"step": p.step, "epoch": p.step // spe, "steps_per_epoch": spe, "loss": out["loss"],
                "metrics": evals, "config": self.cfg.to_dict(), "trainer": self.cfg.trainer,
                "reason": reason, "time": time.time(), "history": p.history[-5:]}
        self.manager.save(p.step, state, info, blocking=blocking)
        self.observer.on_save(p.step, reason, self.manager.last_save_seconds)
        log.info("Checkpoint step_%08d (%s) %s in %.2f s", p.step, reason,
                 "queued" if self.cfg.checkpoint.async_save and not blocking else "written",
                 self.manager.last_save_seconds)
