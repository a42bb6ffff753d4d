"""Bring your own training loop: verified, exact, supervised resume for any torchrun script.

``FaultTolerant`` gives a hand-written loop what ftlaunch's own loop has (our ``Job`` in
``launcher/training.py`` runs on it too): the process group, the run directory and its lock,
verified DCP checkpoints (periodic, per epoch, in the background), resume from the latest
verified one with config and architecture checks, preemption signals (checkpoint, exit 75),
ftrun's progress reports, and ``metrics.jsonl``, TensorBoard, the loss plot and the run summary.
``examples/own_loop.py`` is a complete script; ``docs/own-loop.md`` walks through it::

    from launcher import FaultTolerant, run_main

    def main(args) -> int:
        with FaultTolerant(args.run_dir, config=vars(args), shape_keys=("hidden",)) as ft:
            model = DDP(Net(args.hidden).to(ft.device))
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
            ft.register(model=model, optim=opt, stats=stats)       # before resume()
            start = ft.resume(total_steps=args.steps, steps_per_epoch=spe)
            for step in range(start, args.steps):
                idx = ft.batch_indices(len(data), args.batch_size, step)   # the same batch after a resume
                loss = train_on(data[idx])
                if ft.end_step(step, loss=loss, lr=sched.get_last_lr()[0]):
                    break                                          # finished, or preempted
        return ft.exit_code                                        # 0, or 75 when preempted

    sys.exit(run_main(main, parse_args()))

The same script runs under ``python``, ``torchrun``, ``ftrun`` and SLURM. Every rank makes the
same calls in the same order. ``run_main`` turns a checkpoint problem into one clear line and
exit code 3, which ftrun and job scripts read as "do not retry" (``launcher/exit_codes.py``).

Step contract, kept for just-in-time snapshots (issue 11): the state held between the return
of ``resume()`` or ``end_step()`` and the first mutation of the next step is the clean state at
that step boundary. A registered optimizer's ``step()`` marks the step as mutating (a global
optimizer hook); code that changes other saved state before it calls :meth:`mutating` first.
:attr:`clean_boundary` says whether the state is still the boundary's.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from filelock import FileLock, Timeout
from torch.optim.optimizer import register_optimizer_step_pre_hook

from launcher import dist as ldist
from launcher import env as cluster_env
from launcher import events, exit_codes, logs, observers, rng
from launcher.checkpoint import files
from launcher.checkpoint.files import CheckpointError
from launcher.checkpoint.manager import CheckpointManager
from launcher.config import CheckpointConfig, ConfigError, checkpoint_section, diff_configs, plain_data, under
from launcher.heartbeat import Heartbeat
from launcher.metrics import MetricsLog
from launcher.observe import Observer
from launcher.preempt import PreemptionFlag
from launcher.state import RegistrationError, StateRegistry, check_fits
from launcher.steps import Progress, StepLog

log = logging.getLogger("launcher")

__all__ = ["CheckpointError", "FaultTolerant", "RegistrationError", "UsageError", "run_main"]


class UsageError(RuntimeError):
    """A call out of order (``end_step`` before ``resume``, a skipped step, ...), with the fix."""


class FaultTolerant:
    """One attempt at a run, seen from a training script. Use it as a context manager.

    Args:
        run_dir: checkpoints, metrics and logs; running again with the same one resumes.
        config: the run's settings (e.g. ``vars(args)``), saved with every checkpoint; a resume
            logs each changed value and refuses changes to ``shape_keys``.
        shape_keys: config keys (or dotted prefixes ending in ``.``) that define tensor shapes.
        checkpoint: when to save and what to keep: a ``CheckpointConfig`` or a mapping of its
            fields, e.g. ``{"interval_steps": 100, "async": True}`` (docs/config.md).
        best: ``(metric, "min"|"max")``: the evaluation metric that names the best checkpoint.
        seed: seeds the data order and the per-step random streams.
        log_interval: steps between progress lines and agreed metrics (``launcher/steps.py``).
        resume: ``auto`` (latest verified checkpoint, else fresh), ``none``, ``best`` or a path.
        weights_only: load only the models' weights (a fresh optimizer: ``--reset-optimizer``).
        name: what trained the run, recorded in each checkpoint (default: the script's name).
        log_level: console log level (default INFO on rank 0, WARNING elsewhere).
        configure_logging: set up rank-tagged logging and ``RUN_DIR/logs/``; None: only if the
            script configured none.
        observer: rank 0's progress, TensorBoard, plot and summary (default); tests pass fakes.
        preempt: a preemption flag the caller installed already (default: installed here).
        timeout_s: collective timeout when the process group is created here.

    Raises:
        CheckpointError: the run directory is in use, no checkpoint verifies, or the config
            changes the architecture.
    """

    def __init__(self, run_dir: str | Path, *, config: Mapping[str, Any] | None = None,
                 shape_keys: Sequence[str] = (), checkpoint: CheckpointConfig | Mapping[str, Any] | None = None,
                 best: tuple[str, str] = ("val_loss", "min"), seed: int = 0, log_interval: int = 10,
                 resume: str = "auto", weights_only: bool = False, name: str | None = None,
                 log_level: str | None = None, configure_logging: bool | None = None,
                 observer: Observer | None = None, preempt: PreemptionFlag | None = None,
                 timeout_s: float = 300.0):
        if log_interval < 1 or seed < 0:
            raise ValueError(f"log_interval must be >= 1 and seed >= 0, got {log_interval} and {seed}")
        self.run_dir = Path(run_dir)
        self.config = plain_data(dict(config or {}))
        self.shape_keys = tuple(shape_keys)
        self.seed, self.log_interval, self.weights_only = seed, log_interval, weights_only
        self.name = name or (Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "script")
        self.state = StateRegistry()
        self.progress = Progress()
        self.total_steps = self.steps_per_epoch = 0
        self.status = ""  # "finished", "preempted" or "stopped" once the attempt ended
        self._resumed = False
        self._first_step = 0  # the step this attempt started from
        self._clean = False  # no saved state touched since the last step boundary
        self._internal = False  # our own state_dict calls (their optimizer steps are not the user's)
        self._started = time.time()
        self._stack = contextlib.ExitStack()
        try:
            self._set_up(observer, preempt, log_level, configure_logging, timeout_s)
            self._open_run(checkpoint_section(checkpoint), best, resume)
        except BaseException:
            self._stack.close()
            raise

    # ------------------------------------------------------------------ set-up

    def _set_up(self, observer, preempt, log_level, configure_logging, timeout_s) -> None:
        env = cluster_env.detect()
        self.preempt = preempt or self._catch_preemption(env.preempt_signals)
        ctx = ldist.init(env, timeout_s) if not dist.is_initialized() else ldist.attach(env, timeout_s)
        self._stack.callback(ldist.shutdown, ctx)
        self.ctx = ctx
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if configure_logging or (configure_logging is None and not logging.getLogger().handlers):
            logs.setup(ctx.rank, log_level, self.run_dir)
        log.info("Process group: backend %s, world size %d, device %s (%s launch)", ctx.backend, ctx.world_size,
                 ctx.device, env.kind)
        lock = lock_run_dir(self.run_dir, ctx)
        if lock is not None:
            self._stack.callback(lock.release)
        self.observer = observer or observers.for_rank(ctx.is_main, self.log_interval)
        self._stack.callback(self.observer.close)
        hook = register_optimizer_step_pre_hook(self._on_optimizer_step)
        self._stack.callback(hook.remove)

    def _catch_preemption(self, names: Sequence[str]) -> PreemptionFlag:
        """Install our handlers, and put the previous ones back at the end."""
        flag = PreemptionFlag()
        try:
            previous = {name: signal.getsignal(getattr(signal, name)) for name in names}
            flag.install(names)
        except ValueError:  # not the main thread: signals cannot be caught here
            log.warning("Preemption signals are not caught: FaultTolerant was created outside the main thread")
            return flag
        for name, handler in previous.items():
            if handler is not None:  # None: a handler installed outside Python, which cannot be put back
                self._stack.callback(signal.signal, getattr(signal, name), handler)
        return flag

    def _open_run(self, ckpt_cfg: CheckpointConfig, best: tuple[str, str], resume: str) -> None:
        ctx = self.ctx
        self.manager = CheckpointManager(self.run_dir, ckpt_cfg, ctx.rank, ctx.world_size, ctx.ckpt_group, best=best)
        self._stack.callback(self.manager.close)
        self.metrics = MetricsLog(self.run_dir, enabled=ctx.is_main)
        self._stack.callback(self.metrics.close)
        self.heartbeat = Heartbeat(ctx.env.agent_progress_file, ctx.rank)
        reduce = (lambda vec: dist.all_reduce(vec, group=ctx.control_group)) if ctx.world_size > 1 else None
        self._steps = StepLog(ctx.world_size, self.log_interval, reduce)
        self.manager.prepare()
        self.checkpoint = self.manager.resolve(resume)
        self._info = files.read_info(self.checkpoint) if self.checkpoint else None
        if self._info:
            self._check_config(self._info)

    def _check_config(self, info: dict[str, Any]) -> None:
        changes = diff_configs(info.get("config", {}), self.config)
        bad = {k: v for k, v in changes.items() if any(under(k, f) for f in self.shape_keys)}
        if bad:
            lines = "\n".join(f"  - {k}: checkpoint has {a!r}, config has {b!r}" for k, (a, b) in bad.items())
            raise CheckpointError(
                f"The config changes the model's architecture relative to checkpoint {info.get('name')}:\n{lines}\n"
                f"Restore these values to resume, or start a new --run-dir (use --resume PATH with "
                f"--reset-optimizer only for weights of the same shape).")
        for k, (a, b) in changes.items():
            log.info("Config change accepted on resume: %s: %r -> %r", k, a, b)

    # ------------------------------------------------------------------ where this process is

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def local_rank(self) -> int:
        return self.ctx.env.local_rank

    @property
    def device(self) -> torch.device:
        """``cuda:<local rank>`` with NCCL, else ``cpu``."""
        return self.ctx.device

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def resuming(self) -> bool:
        """True when ``resume()`` will load a checkpoint (data built once per run can be reloaded)."""
        return self.checkpoint is not None

    @property
    def step(self) -> int:
        """Completed steps of the run: the index of the next step."""
        return self.progress.step

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per epoch end or evaluation, over the whole run (restored on resume)."""
        return self.progress.history

    @property
    def exit_code(self) -> int:
        """75 after a preemption checkpoint, else 0 (``launcher/exit_codes.py``)."""
        return exit_codes.PREEMPTED if self.status == "preempted" else exit_codes.OK

    # ------------------------------------------------------------------ registration and resume

    def register(self, **states: Any) -> None:
        """Save these with every checkpoint, under their names; call before :meth:`resume`.

        Models (``nn.Module``, DDP or plain), optimizers (their models must be registered too),
        anything with ``state_dict()``/``load_state_dict()`` (lr schedulers, ``GradScaler``), and
        dicts or lists of plain values, which a resume updates in place. Plain values must be
        the same on every rank (rank 0's are saved).
        """
        for name, obj in states.items():
            self.state.add(name, obj)

    def resume(self, total_steps: int, steps_per_epoch: int | None = None) -> int:
        """Load the latest verified checkpoint (if any) into the registered states.

        Args:
            total_steps: steps of the whole run (not of this attempt); may grow on a later start.
            steps_per_epoch: steps per pass over the data (default: the run is one epoch).
                Epoch ends get an evaluation record and, by default, a checkpoint.

        Returns:
            The step to start from: 0 on a fresh start, the checkpoint's step on a resume.
        """
        if self._resumed:
            raise UsageError("resume() was already called; it loads the checkpoint once per attempt")
        spe = total_steps if steps_per_epoch is None else steps_per_epoch
        if not (isinstance(total_steps, int) and isinstance(spe, int) and total_steps >= 1 and spe >= 1):
            raise ValueError(f"resume(total_steps={total_steps!r}, steps_per_epoch={steps_per_epoch!r}): "
                             f"expected integers >= 1")
        self.total_steps, self.steps_per_epoch = total_steps, spe
        self.state.seal()
        if self.checkpoint:
            self._load(self.checkpoint, self._info)
        else:
            log.info("Starting fresh in %s (no checkpoint found)", self.run_dir)
            # Metrics of an attempt that died before its first checkpoint are not part of this run.
            self.metrics.truncate_after(0)
        if self.is_main:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.config, sort_keys=False))
        self._record_start()
        self._resumed = True
        self._first_step = self.progress.step
        self._started = time.time()
        self._steps.start(self.progress.step)
        self.observer.on_start(self.run_dir, self.progress.step, total_steps, resumed=bool(self.progress.resumed_at))
        self._boundary()
        return self.progress.step

    def _load(self, path: Path, info: dict[str, Any]) -> None:
        with self._ours():
            template = self.state.template(self.weights_only)
        saved = CheckpointManager.saved_shapes(path)
        check_fits(path, template, saved)
        own = f"rank{self.rank}"
        has_rng = any(k.startswith(f"rng.{own}.") for k in saved)
        request = {**template, "progress": ""}
        if has_rng:
            request["rng"] = {own: rng.capture()}
        log.info("Resuming from checkpoint: %s", path)
        loaded = self.manager.load(path, request)
        step = int(info["step"])
        with self._ours():
            self.state.load(loaded, self.weights_only, step)
        self.progress = Progress.from_json(loaded["progress"])
        if has_rng:
            rng.restore(loaded["rng"][own])
        else:
            log.warning("Checkpoint has no RNG state for rank %d (saved at world size %s): this rank keeps "
                        "its fresh seed", self.rank, info.get("world_size"))
        self.progress.resumed_at.append(step)
        self.manager.mark_saved(step)
        dropped = self.metrics.truncate_after(step)
        log.info("Resumed from epoch %d, step %d (checkpoint %s); %d epoch record(s) restored%s; target %d steps",
                 step // self.steps_per_epoch + 1, step, path.name, len(self.progress.history),
                 f"; dropped {dropped} metrics record(s) logged after it" if dropped else "", self.total_steps)
        if self.weights_only:
            log.info("--reset-optimizer: weights loaded; optimizer and lr schedule start fresh at step %d", step)

    def _record_start(self) -> None:
        env = self.ctx.env
        if env.requeue_count or env.restart_count:
            log.info("Attempt: torchrun/ftrun restart %d, SLURM requeue (SLURM_RESTART_COUNT) %d",
                     env.restart_count, env.requeue_count)
        if self.is_main:
            events.append(self.run_dir, "worker_start", step=self.progress.step,
                          checkpoint=self.checkpoint.name if self.checkpoint else None,
                          world_size=self.world_size, restart_count=env.restart_count,
                          slurm_restart_count=env.requeue_count, job_id=env.job_id)

    # ------------------------------------------------------------------ the step

    def end_step(self, step: int, evals: Mapping[str, float] | None = None, **metrics: Any) -> bool:
        """Close step ``step``; return True when the loop must stop (finished, or preempted).

        Args:
            step: the 0-based index of the step just taken (the one given to ``batch_indices``).
            evals: evaluation metrics of this step (same on every rank), e.g. ``{"val_loss": 0.3}``.
                Epoch ends and steps with ``evals`` get an evaluation record; the checkpoint
                written there records them, which names the best checkpoint.
            **metrics: this rank's ``loss`` (required) and any others, as numbers or one-element
                tensors (kept on the device: no synchronisation here), averaged over ranks.

        Saves checkpoints when due, acts on preemption signals (a checkpoint, then True and
        ``exit_code`` 75), reports progress to ftrun and records metrics.
        """
        self._check_step(step)
        if "loss" not in metrics:
            raise UsageError("end_step(step, loss=...): the step's loss is required (it makes the epoch's "
                             "train_loss); add any other metrics as keywords")
        n = step + 1
        self._steps.add(n, metrics, time.time())
        self.progress.step = n
        epoch_end = n % self.steps_per_epoch == 0
        final = n >= self.total_steps
        due = self.manager.due(n, epoch_end, final, False)
        alone = self.world_size == 1 and (self.preempt.raised or self.manager.local_wants_save())
        if not self._steps.due(n, forced=epoch_end or final or evals is not None or due is not None or alone):
            self._boundary()
            return False
        synced = self._steps.sync(n, self.manager.local_wants_save(), self.preempt.raised)
        loss = self._publish(synced.records)
        scores = _numbers(evals or {}, "evals")
        if epoch_end or evals is not None:
            self._evaluation_record(n, scores, epoch_end)
        reason = "preemption" if synced.preempted else self.manager.due(n, epoch_end, final, synced.wants_save)
        if reason:
            self._save(reason, loss, scores, blocking=synced.preempted or final)
        if synced.preempted or final:
            self._end("preempted" if synced.preempted else "finished")
            return True
        self._boundary()
        return False

    def _check_step(self, step: int) -> None:
        if not self._resumed:
            raise UsageError("end_step() before resume(): register the states, then call resume(); it returns "
                             "the step to start from")
        if self.status:
            raise UsageError(f"end_step({step}) after the run ended ({self.status}) at step {self.progress.step}; "
                             f"stop the loop when end_step returns True")
        if step != self.progress.step:
            raise UsageError(f"end_step({step}): expected step {self.progress.step}, the next step of this run "
                             f"(0-based, counted from the start of the run across resumes); call it once per "
                             f"step, in order, starting from what resume() returned")

    def _boundary(self) -> None:
        self.heartbeat.report(self.progress.step, "training")
        self._clean = True

    def _publish(self, synced: list[tuple[int, dict[str, float], float]]) -> float:
        """Write the agreed step records; show the logged ones. Returns the last step's loss."""
        p, spe = self.progress, self.steps_per_epoch
        records = [{"step": s, "epoch": (s - 1) // spe + 1, **means, "time": t} for s, means, t in synced]
        for record in records:
            p.epoch_loss_sum += record["loss"]
            p.epoch_loss_count += 1
        self.metrics.write_many(records)
        start = self._first_step
        # Rank 0's observer prints progress itself (a bar, or lines with steps/s and ETA).
        quiet = getattr(self.observer, "reports_progress", False)
        for record in records:
            s = record["step"]
            if s % self.log_interval == 0 or s == start + 1 or s == self.total_steps:
                self.observer.on_step(record)
                if not quiet:
                    log.info("step %d/%d epoch %d loss %.5f%s", s, self.total_steps, record["epoch"], record["loss"],
                             f" lr {record['lr']:.3g}" if "lr" in record else "")
        return records[-1]["loss"]

    def _evaluation_record(self, n: int, evals: dict[str, float], epoch_end: bool) -> None:
        p = self.progress
        epoch = n // self.steps_per_epoch if epoch_end else (n - 1) // self.steps_per_epoch + 1
        train_loss = p.epoch_loss_sum / max(p.epoch_loss_count, 1)
        p.history.append({"epoch": epoch, "step": n, "train_loss": train_loss, **evals})
        p.epoch_loss_sum, p.epoch_loss_count = 0.0, 0
        record = {"step": n, "epoch": epoch, "train_loss": train_loss, **evals, "time": time.time()}
        self.metrics.write_many([record])
        self.observer.on_eval(record)
        shown = " ".join(f"{k} {v:.5f}" for k, v in evals.items())
        if epoch_end:
            log.info("epoch %d done at step %d: train_loss %.5f %s", epoch, n, train_loss, shown)
        else:
            log.info("evaluation at step %d (epoch %d): train_loss %.5f %s", n, epoch, train_loss, shown)

    def _save(self, reason: str, loss: float, evals: dict[str, float], blocking: bool) -> None:
        p, spe = self.progress, self.steps_per_epoch
        self.heartbeat.report(p.step, "saving")
        with self._ours():
            state = {**self.state.state(), "progress": p.to_json(), "rng": {f"rank{self.rank}": rng.capture()}}
        info = {"step": p.step, "epoch": p.step // spe, "steps_per_epoch": spe, "loss": loss, "metrics": evals,
                "config": self.config, "trainer": self.name, "reason": reason, "time": time.time(),
                "history": p.history[-5:]}
        self.manager.save(p.step, state, info, blocking=blocking)
        self.observer.on_save(p.step, reason, self.manager.last_save_seconds)
        log.info("Checkpoint step_%08d (%s) %s in %.2f s", p.step, reason,
                 "queued" if self.manager.cfg.async_save and not blocking else "written",
                 self.manager.last_save_seconds)

    def request_checkpoint(self) -> None:
        """Ask for a checkpoint (any rank may ask); every rank saves at the next sync point."""
        self.manager.request()

    @contextlib.contextmanager
    def activity(self, name: str) -> Iterator[None]:
        """Tell ftrun what this rank is doing, e.g. ``with ft.activity("evaluating"):``.

        ``evaluating`` and ``saving`` get a longer hang allowance than ``training``
        (``launcher/agent/progress.py``), so a long evaluation is not taken for a hang.
        """
        self.heartbeat.report(self.progress.step, name)
        yield

    # ------------------------------------------------------------------ the snapshot seam (issue 11)

    @property
    def clean_boundary(self) -> int | None:
        """The step boundary whose state this process still holds unchanged, or None.

        True from the return of ``resume()``/``end_step()`` until an optimizer's ``step()`` or a
        :meth:`mutating` call in the next step: a just-in-time snapshot taken then is exact.
        """
        return self.progress.step if self._clean and self._resumed and not self.status else None

    def mutating(self) -> None:
        """Declare that this step starts changing saved state (call before doing so by hand)."""
        self._clean = False

    def _on_optimizer_step(self, optimizer, args, kwargs) -> None:
        if not self._internal:
            self._clean = False

    @contextlib.contextmanager
    def _ours(self) -> Iterator[None]:
        """Our state_dict calls: torch initialises an empty optimizer state with a zero-lr step."""
        self._internal = True
        try:
            yield
        finally:
            self._internal = False

    # ------------------------------------------------------------------ exactness helpers

    def batch_indices(self, n: int, global_batch: int, step: int) -> torch.Tensor:
        """This rank's sample indices at ``step``: slice ``rank`` of the step's global batch.

        A pure function of (seed, step, world size), so a resumed run trains on exactly the
        samples an uninterrupted one would (``launcher.rng.global_batch_indices``).
        """
        return rng.global_batch_indices(n, global_batch, self.seed, step, self.rank, self.world_size)

    def generator(self, step: int, stream: str = rng.DEFAULT_STREAM) -> torch.Generator:
        """A generator on this rank's device for ``stream`` at ``step``: a pure function of
        (seed, step, rank, stream), so draws from it need no saved state."""
        return rng.step_generator(self.seed, step, self.rank, stream, self.device)

    def seed_step(self, step: int) -> None:
        """Seed the global generators (python, numpy, torch) for ``step``: dropout and other draws
        from them become a pure function of (seed, step, rank)."""
        rng.seed_step(self.seed, step, self.rank)

    # ------------------------------------------------------------------ the end

    def _end(self, status: str) -> None:
        self.status = status
        p = self.progress
        if status == "preempted":
            log.warning("Preempted (%s): checkpoint at step %d written; exiting with code %d",
                        self.preempt.name or "another rank's signal", p.step, exit_codes.PREEMPTED)
            if self.is_main:
                events.append(self.run_dir, "preempted", step=p.step, signal=self.preempt.name,
                              slurm_restart_count=self.ctx.env.requeue_count, job_id=self.ctx.env.job_id)
        else:
            self.manager.wait()
            if status == "finished":
                log.info("Training finished: %d steps in %.1f s this attempt", p.step, time.time() - self._started)
            else:
                log.info("Training stopped at step %d of %d: the loop ended before the target; the next start "
                         "resumes from the latest checkpoint", p.step, self.total_steps)
        self.observer.on_end({"status": status, "step": p.step, "total_steps": self.total_steps,
                              "attempt_seconds": time.time() - self._started, "history": p.history,
                              "resumed_at": p.resumed_at, "checkpoints": str(self.manager.root)})

    def close(self, failed: bool = False) -> None:
        """End the attempt: wait for a background save, close files, release the run directory.

        Called by ``with``; ``failed`` (an exception left the block) skips the end-of-run summary.
        """
        try:
            if self._resumed and not self.status and not failed:
                self._end("finished" if self.progress.step >= self.total_steps else "stopped")
        finally:
            self._stack.close()

    def __enter__(self) -> FaultTolerant:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(failed=exc_type is not None)
        return False


def lock_run_dir(run_dir: Path, ctx: ldist.DistContext) -> FileLock | None:
    """Refuse a second live job on ``run_dir`` (the lock dies with its holder); rank 0 holds it."""
    outcome: list[str | None] = [None]
    lock = None
    if ctx.is_main:
        lock = FileLock(str(run_dir / ".lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            lock = None
            outcome[0] = (f"{run_dir} is in use by another live job (lock {run_dir / '.lock'} "
                          f"is held). Wait for it to finish or stop it, or choose another --run-dir.")
    if ctx.world_size > 1:
        dist.broadcast_object_list(outcome, src=0, group=ctx.ckpt_group)
    if outcome[0]:
        raise CheckpointError(outcome[0])
    return lock


def run_main(main: Callable[..., int | None], *args: Any, **kwargs: Any) -> int:
    """Call ``main(*args, **kwargs)`` and return its exit code, for ``sys.exit(run_main(...))``.

    A checkpoint problem becomes one clear line and exit code 3; a bad registration or
    checkpoint setting, exit code 2 (ftrun restarts neither: restarting would not help).
    """
    try:
        code = main(*args, **kwargs)
    except CheckpointError as e:
        log.error("%s", e)
        return exit_codes.CHECKPOINT_ERROR
    except (ConfigError, RegistrationError) as e:
        log.error("%s", e)
        return exit_codes.CONFIG_ERROR
    return exit_codes.OK if code is None else int(code)


def _numbers(values: Mapping[str, Any], what: str) -> dict[str, float]:
    out = {}
    for k, v in values.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            raise UsageError(f"{what}[{k!r}] = {v!r}: expected a number") from None
    return out
