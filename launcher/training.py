"""The training loop: resume, step, evaluate, checkpoint, stop. Same code for 1 or N processes."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist
import yaml
from filelock import FileLock, Timeout

from launcher import dist as ldist
from launcher import endings, epochs, events, exit_codes, fileio, finished, logs, observers, rng
from launcher import env as cluster_env
from launcher.checkpoint import files, find
from launcher.checkpoint.manager import CheckpointError, CheckpointManager
from launcher.checkpoint.record import CheckpointRecord, RecordError, read_record
from launcher.config import RunConfig, diff_configs, flatten
from launcher.early_stop import EarlyStopping
from launcher.heartbeat import Heartbeat
from launcher.metrics import MetricsLog
from launcher.observe import Observer
from launcher.preempt import PreemptionFlag
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
    early_stop: dict[str, Any] = field(default_factory=dict)  # best value, its step, evaluations since
    init_from: str | None = None  # the checkpoint --init-from started this run from

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
    init_from: Path | None = None  # start a new run from another run's checkpoint (weights)
    init_optimizer: bool = False  # with init_from: also its optimizer state
    restart_schedule: bool = False  # on resume: keep the optimizer state, start the lr schedule again


def run(cfg: RunConfig, opts: RunOptions, preempt: PreemptionFlag | None = None,
        interrupt: endings.InterruptFlag | None = None) -> int:
    """Train ``cfg`` in ``opts.run_dir`` on this process's share of the job; return the exit code.

    Ctrl-C and a lost peer end the process with one line each (:mod:`launcher.endings`); other
    errors keep their tracebacks.
    """
    env = cluster_env.detect()
    logs.setup(env.rank, opts.log_level)  # the rank's log file is added once there is work to do
    job: Job | None = None
    try:
        ctx = ldist.init(env, timeout_s=cfg.dist.timeout_s)
        try:
            opts.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.error("Cannot use the run directory %s: %s", opts.run_dir, fileio.describe_os_error(e))
            return exit_codes.CHECKPOINT_ERROR
        job = Job(cfg, opts, ctx, observer=observers.for_rank(ctx.is_main, cfg.train.log_interval),
                  preempt=preempt)
        return job.run()
    except KeyboardInterrupt as e:
        return endings.interrupted(env, opts.run_dir, job.step_reached if job else None, interrupt, e)
    except Exception as e:
        if opts.run_dir.is_dir():  # whatever the failure, the rank's log file has it (and what led to it)
            with contextlib.suppress(OSError):  # a read-only or full run directory: the console has it
                logs.attach_file(env.rank, opts.run_dir, opts.log_level)
        if interrupt is not None and interrupt.raised:  # a peer stopped by the same Ctrl-C failed us first
            return endings.interrupted(env, opts.run_dir, job.step_reached if job else None, interrupt, e)
        if endings.is_peer_failure(e):
            return endings.peer_lost(env, opts.run_dir, job.step_reached if job else None, e)
        if isinstance(e, CheckpointError):
            log.error("%s", e)
            return e.code
        if isinstance(e, OSError):  # a run-directory file that cannot be written mid-run (disk full, ...)
            log.error("%s", fileio.describe_os_error(e))
            return exit_codes.CHECKPOINT_ERROR
        raise
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
        self.started = False  # training began: the start is recorded and the loop runs
        self.early_stop = EarlyStopping(self.manager.best_metric, self.manager.best_mode,
                                        cfg.train.early_stop_patience, cfg.train.early_stop_min_delta)
        self._lock: FileLock | None = None

    @property
    def step_reached(self) -> int | None:
        """Steps completed when training began or since; None before it began."""
        return self.progress.step if self.started else None

    # ------------------------------------------------------------------ start

    def run(self) -> int:
        # Catch the preemption signals before the (possibly long) resume: left at their default
        # action, SIGTERM/SIGUSR1 would kill the process there; caught, they stop it after its first step.
        self.preempt.install(self.ctx.env.preempt_signals)
        try:
            self._lock_run_dir()
            self.manager.prepare()
            path = self.manager.resolve(self.opts.resume)
            info = self._together(lambda: self._read_record(path)) if path else None
            if info and self._already_finished(path, info):
                return exit_codes.OK
            self._start_logs()
            init = self._init_source() if path is None else None
            if path and self.opts.init_from:
                log.info("--init-from %s: not used, this run already has a checkpoint to resume from",
                         self.opts.init_from)
            # Every generator of every rank starts from the seed, so a fresh attempt and a resumed
            # one draw the same numbers (python's and numpy's are otherwise seeded from the OS).
            rng.seed_everything(self.cfg.train.seed * 1000 + self.ctx.rank)
            self.trainer = self.trainer_cls()
            self.trainer.setup(TrainContext(config=self.cfg, rank=self.ctx.rank, world_size=self.ctx.world_size,
                                            device=self.ctx.device, run_dir=self.run_dir, fresh=path is None,
                                            source=path or init))
            if path:
                self._resume(path, info)
            elif init:
                self._initialize(init)
            else:
                log.info("Starting fresh in %s (no checkpoint found)", self.run_dir)
                # Metrics of an attempt that died before its first checkpoint are not part of this run.
                self._together(lambda: self.metrics.truncate_after(0))
            self._together(lambda: (self._write_config(), self._record_start(path, info)))
            return self._loop()
        finally:
            self.manager.close()
            self.metrics.close()
            self.observer.close()
            if self._lock is not None:
                self._lock.release()

    def _already_finished(self, path: Path, info: CheckpointRecord) -> bool:
        """Say so and touch nothing if the checkpoint to resume from already reached the target."""
        message = finished.check(self.cfg.train, info, path)
        if message:
            log.info("%s", message)
        return message is not None

    def _start_logs(self) -> None:
        logs.attach_file(self.ctx.rank, self.run_dir, self.opts.log_level)
        log.info("Process group: backend %s, world size %d, device %s (%s launch), collective timeout %g s",
                 self.ctx.backend, self.ctx.world_size, self.ctx.device, self.ctx.env.kind, self.cfg.dist.timeout_s)

    def _lock_run_dir(self) -> None:
        """Refuse a second live job on this run directory (the lock dies with its holder).

        The holder then removes temporary files that killed writes of ours left in the run
        directory (no other writer of ours can be active there now).
        """
        outcome = [None]
        if self.ctx.is_main:
            self._lock = FileLock(str(self.run_dir / ".lock"))
            try:
                self._lock.acquire(timeout=0)
                for name in fileio.clean_leftovers(self.run_dir):
                    log.info("Removed %s, left by an interrupted write", name)
            except Timeout:
                self._lock = None
                outcome[0] = (f"{self.run_dir} is in use by another live job (lock {self.run_dir / '.lock'} "
                              f"is held). Wait for it to finish or stop it, or choose another --run-dir.")
            except OSError as e:
                self._lock = None
                outcome[0] = f"cannot lock the run directory: {fileio.describe_os_error(e)}"
        if self.ctx.world_size > 1:
            dist.broadcast_object_list(outcome, src=0, group=self.ctx.ckpt_group)
        if outcome[0]:
            raise CheckpointError(outcome[0])

    def _together(self, step: Any) -> Any:
        """Run one start-up ``step`` on every rank; if it fails on any rank, fail on every rank.

        Each rank shares its outcome before going on, so a rank that failed (rank 0 alone writes
        the run's files) never leaves the others waiting in a collective until the timeout.
        """
        error, result = None, None
        try:
            result = step()
        except CheckpointError as e:
            error = (str(e), e.code)
        except (RecordError, OSError) as e:
            error = (fileio.describe_os_error(e) if isinstance(e, OSError) else str(e), exit_codes.CHECKPOINT_ERROR)
        errors = ldist.agree(error, self.ctx.ckpt_group, self.ctx.world_size)
        if errors:
            message, code = errors[0]
            raise CheckpointError(message if error else f"{message} (reported by another rank)", code)
        return result

    def _read_record(self, path: Path) -> CheckpointRecord:
        """The resume checkpoint's record, checked against this run's config."""
        record = read_record(path)
        self._check_config(record)
        return record

    def _check_config(self, info: CheckpointRecord) -> None:
        saved = info.config
        changes = diff_configs(saved, self.cfg.to_dict())
        shape = getattr(self.trainer_cls, "shape_fields", ("model.",))
        bad = {k: v for k, v in changes.items() if any(k == f or k.startswith(f) for f in shape) or k == "trainer"}
        if bad:
            lines = "\n".join(f"  - {k}: checkpoint has {a!r}, config has {b!r}" for k, (a, b) in bad.items())
            raise CheckpointError(
                f"The config changes the model's architecture relative to checkpoint {info.name}:\n{lines}\n"
                f"Restore these values to resume, or start a new --run-dir (use --resume PATH with "
                f"--reset-optimizer only for weights of the same shape).")
        for k, (a, b) in changes.items():
            log.info("Config change accepted on resume: %s: %r -> %r", k, a, b)

    def _resume(self, path: Path, info: CheckpointRecord) -> None:
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
        step = info.step
        self._load_trainer(state, weights_only, step, self.opts.restart_schedule and not weights_only)
        self.progress = Progress.from_json(state["progress"])
        if has_rng:
            rng.restore(state["rng"][own_rng])
        else:
            log.warning("Checkpoint has no RNG state for rank %d (saved at world size %s): this rank keeps "
                        "its fresh seed", self.ctx.rank, info.world_size)
        self.progress.resumed_at.append(step)
        self.manager.mark_saved(step)
        dropped = self._together(lambda: self.metrics.truncate_after(step))
        log.info("Resumed at step %d (%s; checkpoint %s); %d epoch record(s) restored%s; target %d steps",
                 step, epochs.describe(step, self.trainer.steps_per_epoch()), path.name, len(self.progress.history),
                 f"; dropped {dropped} metrics record(s) logged after it" if dropped else "", self.total_steps)
        if weights_only:
            log.info("--reset-optimizer: weights loaded; optimizer and lr schedule start fresh at step %d", step)

    def _load_trainer(self, state: dict[str, Any], weights_only: bool, step: int, restart_schedule: bool) -> None:
        kwargs = {}
        if restart_schedule:
            if "restart_schedule" not in inspect.signature(self.trainer.load_state_dict).parameters:
                raise CheckpointError(f"trainer {self.cfg.trainer} cannot restart its lr schedule while keeping its "
                                      f"optimizer state (its load_state_dict has no restart_schedule argument); "
                                      f"use --reset-optimizer to start optimizer and schedule afresh")
            kwargs["restart_schedule"] = True
        self.trainer.load_state_dict(state, weights_only=weights_only, step=step, **kwargs)

    # ------------------------------------------------------------------ staged training

    def _init_source(self) -> Path | None:
        """The verified checkpoint ``--init-from`` names (a checkpoint, or a run's newest), the same on every rank."""
        if self.opts.init_from is None:
            return None
        outcome: list[Any] = [None]
        if self.ctx.is_main:
            try:
                found = find.resolve_checkpoint(self.opts.init_from)
                check = files.verify(found)
                outcome[0] = ("ok", str(found)) if check.ok else ("error", f"{found} does not verify: {check.reason()}")
            except CheckpointError as e:
                outcome[0] = ("error", str(e))
        if self.ctx.world_size > 1:
            dist.broadcast_object_list(outcome, src=0, group=self.ctx.ckpt_group)
        status, value = outcome[0]
        if status == "error":
            raise CheckpointError(f"--init-from {self.opts.init_from}: {value}")
        return Path(value)

    def _initialize(self, source: Path) -> None:
        """``--init-from``: this new run starts at step 0 from another run's weights (and optimizer state)."""
        with_optimizer = self.opts.init_optimizer
        template = self.trainer.state_dict(weights_only=not with_optimizer)
        self._check_shapes(source, template)
        state = self.manager.load(source, template)
        self._load_trainer(state, not with_optimizer, 0, with_optimizer)
        self.progress.init_from = str(source)
        info = read_record(source)
        log.info("Initialised from %s (step %s of %s): %s; this run starts at step 0 with its own config, lr "
                 "schedule and data order", source, info.step, source.parent.parent,
                 "weights and optimizer state" if with_optimizer else "weights, fresh optimizer")
        for k, (a, b) in diff_configs(info.config, self.cfg.to_dict()).items():
            log.info("  differs from the source run: %s: %r -> %r", k, a, b)
        self.metrics.truncate_after(0)
        if self.ctx.is_main:
            events.append(self.run_dir, "init_from", checkpoint=str(source), step=info.step,
                          optimizer=with_optimizer)

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

    def _record_start(self, path: Path | None, info: CheckpointRecord | None) -> None:
        env = self.ctx.env
        if env.requeue_count or env.restart_count:
            log.info("Attempt: torchrun/ftrun restart %d, SLURM requeue (SLURM_RESTART_COUNT) %d",
                     env.restart_count, env.requeue_count)
        if self.ctx.is_main:
            events.append(self.run_dir, "worker_start", step=self.progress.step, checkpoint=path.name if path else None,
                          world_size=self.ctx.world_size, restart_count=env.restart_count,
                          slurm_restart_count=env.requeue_count, job_id=env.job_id,
                          launched=psutil.Process().create_time())
        self.started = True

    def _record_end(self, status: str) -> None:
        """A deliberate end (finished, preempted): the run's wall time pauses until its next start."""
        if self.ctx.is_main:
            events.append(self.run_dir, "run_end", status=status, step=self.progress.step)

    def _write_config(self) -> None:
        if self.ctx.is_main:
            text = yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
            fileio.atomic_write(self.run_dir / "config.yaml", text.encode())

    # ------------------------------------------------------------------ loop

    @property
    def total_steps(self) -> int:
        return self.cfg.train.total_steps(self.trainer.steps_per_epoch())

    def _loop(self) -> int:
        spe = self.trainer.steps_per_epoch()
        p = self.progress
        started = time.time()
        milestones = self.trainer.milestones() if hasattr(self.trainer, "milestones") else {}
        if self.early_stop.stopped(p.early_stop):
            return self._already_stopped(started)
        self.observer.on_start(self.run_dir, p.step, self.total_steps, resumed=bool(p.resumed_at))
        while p.step < self.total_steps:
            self.heartbeat.report(p.step, "training")
            out = self.trainer.train_step(p.step)
            p.step += 1
            out, wants_save, preempted = self._reduce(out)
            p.epoch_loss_sum += out["loss"]
            p.epoch_loss_count += 1
            epoch_end = p.step % spe == 0
            record = {"step": p.step, "epoch": epochs.of_step(p.step, spe), **out, "time": time.time()}
            self.metrics.write(record)
            self.observer.on_step(record)
            # Rank 0's observer prints progress itself (a bar, or lines with steps/s and ETA).
            quiet = getattr(self.observer, "reports_progress", False)
            if not quiet and (p.step % self.cfg.train.log_interval == 0 or p.step == 1):
                log.info("step %d/%d epoch %d loss %.5f lr %.3g", p.step, self.total_steps,
                         record["epoch"], out["loss"], out.get("lr", float("nan")))
            evals = self._end_epoch(p.step // spe) if epoch_end else {}
            if evals:
                self.early_stop.observe(p.early_stop, evals, p.step)
            stopping = self.early_stop.stopped(p.early_stop)
            final = p.step >= self.total_steps or stopping
            reason = "preemption" if preempted else "early stop" if stopping else \
                self.manager.due(p.step, epoch_end, final, wants_save, milestone=p.step in milestones)
            if reason:
                self._save(reason, out, evals, blocking=preempted or final, milestone=milestones.get(p.step))
            if stopping:
                break
            if preempted:
                log.warning("Preempted (%s): checkpoint at step %d written; exiting with code %d",
                            self.preempt.name or "another rank's signal", p.step, exit_codes.PREEMPTED)
                if self.ctx.is_main:
                    events.append(self.run_dir, "preempted", step=p.step, signal=self.preempt.name,
                                  slurm_restart_count=self.ctx.env.requeue_count, job_id=self.ctx.env.job_id)
                self._record_end("preempted")
                self.observer.on_end(self._summary("preempted", started))
                return exit_codes.PREEMPTED
        self.manager.wait()
        if self.early_stop.stopped(p.early_stop):
            log.info("Stopped early at step %d of %d: %s", p.step, self.total_steps,
                     self.early_stop.reason(p.early_stop))
            self._record_end("stopped early")
            self.observer.on_end(self._summary("stopped early", started))
            return exit_codes.OK
        log.info("Training finished: %d steps in %.1f s this attempt", p.step, time.time() - started)
        self._record_end("finished")
        self.observer.on_end(self._summary("finished", started))
        return exit_codes.OK

    def _already_stopped(self, started: float) -> int:
        """A rerun of a run that stopped early: say so instead of training on."""
        self.observer.on_start(self.run_dir, self.progress.step, self.total_steps, resumed=True)
        log.info("This run stopped early at step %d of %d: %s. Nothing to train; to go on, raise "
                 "train.early_stop_patience (or set it to 0)", self.progress.step, self.total_steps,
                 self.early_stop.reason(self.progress.early_stop))
        self.observer.on_end(self._summary("stopped early", started))
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

    def _save(self, reason: str, out: dict[str, float], evals: dict[str, float], blocking: bool,
              milestone: str | None = None) -> None:
        p = self.progress
        self.heartbeat.report(p.step, "saving")
        spe = self.trainer.steps_per_epoch()
        state = {**self.trainer.state_dict(), "progress": p.to_json(),
                 "rng": {f"rank{self.ctx.rank}": rng.capture()}}
        info = {"step": p.step, "epoch": epochs.of_step(p.step, spe), "steps_per_epoch": spe, "loss": out["loss"],
                "metrics": evals, "config": self.cfg.to_dict(), "trainer": self.cfg.trainer,
                "reason": reason, "time": time.time(), "history": p.history[-5:],
                # The latest evaluation, so that a checkpoint between two evaluations says how good it is.
                "last_eval": p.history[-1] if p.history else None}
        if milestone:
            info["milestone"] = milestone  # kept by retention
        if p.init_from:
            info["init_from"] = p.init_from
        self.manager.save(p.step, state, info, blocking=blocking)
        self.observer.on_save(p.step, reason, self.manager.last_save_seconds)
        log.info("Checkpoint step_%08d (%s) %s in %.2f s", p.step, reason,
                 "queued" if self.cfg.checkpoint.async_save and not blocking else "written",
                 self.manager.last_save_seconds)
