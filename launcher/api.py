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
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import psutil
import torch
import torch.distributed as dist
import yaml
from torch.optim.optimizer import register_optimizer_step_pre_hook

from launcher import dist as ldist
from launcher import endings, epochs, events, exit_codes, fileio, logs, observers, rng, snapshot
from launcher import env as cluster_env
from launcher.checkpoint import faults
from launcher.checkpoint.files import CheckpointError
from launcher.checkpoint.manager import CheckpointManager
from launcher.checkpoint.record import CheckpointRecord, read_record
from launcher.config import CheckpointConfig, ConfigError, checkpoint_section, diff_configs, plain_data, under
from launcher.early_stop import EarlyStopping
from launcher.heartbeat import Heartbeat
from launcher.metrics import MetricsLog
from launcher.observe import Observer
from launcher.preempt import TEARDOWN_SIGNAL, PreemptionFlag, teardown
from launcher.startup import init_source, lock_run_dir, together
from launcher.state import RegistrationError, StateRegistry, check_fits
from launcher.steps import Progress, StepLedger, StepLog, settle_evaluation, settle_steps

log = logging.getLogger("launcher")

LEDGER_DIR = "steps"  # RUN_DIR/steps/rank<N>.bin: each rank's values of each step (launcher/steps.py)

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
        early_stop_patience: stop when the ``best`` metric has not improved for this many
            evaluations (0: never), with a final checkpoint (``launcher/early_stop.py``).
        early_stop_min_delta: the smallest change of the metric that counts as an improvement.
        init_from: staged training: a new run (no checkpoint of its own yet) starts from this
            checkpoint of another run (or that run's newest verified one): its models' weights.
        init_optimizer: with ``init_from``, also its optimizers' state.

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
                 timeout_s: float = 300.0, early_stop_patience: int = 0, early_stop_min_delta: float = 0.0,
                 init_from: str | Path | None = None, init_optimizer: bool = False):
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
        self.status = ""  # "finished", "preempted", "stopped early" or "stopped" once the attempt ended
        self.started = False  # training began: the start is recorded (what a one-line ending reports)
        self.init_from, self.init_optimizer = (Path(init_from) if init_from else None), init_optimizer
        self.init_source: Path | None = None  # the verified checkpoint init_from names, when it is used
        self._early_stop_args = (early_stop_patience, early_stop_min_delta)
        self._idle = False  # the run had nothing left to do: this attempt changed nothing
        self._owns_logging = False
        self._resumed = False
        self._first_step = 0  # the step this attempt started from
        self._clean = False  # no saved state touched since the last step boundary
        self._closing: snapshot.Closing | None = None  # what end_step still records for its boundary
        self._evaluating: int | None = None  # the step whose evaluation is running (launcher/snapshot.py)
        self._evaluate: Callable[[], Mapping[str, float]] | None = None  # resume(evaluate=...)
        self._last_window: list[dict[str, Any]] = []  # the records of the last sync point (rank 0 may lack them)
        self._internal = False  # our own state_dict calls (their optimizer steps are not the user's)
        self._failpoint = faults.active()  # a testing aid: none outside tests
        self._ledger_token = ""  # the attempt's step ledgers (launcher/steps.py)
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
        if configure_logging or (configure_logging is None and not logging.getLogger().handlers):
            # The rank's log file is attached once there is work to do: a rerun of a finished
            # run leaves its directory untouched (logs.attach_file).
            logs.setup(env.rank, log_level)
            self._owns_logging = True
        self._log_level, self._timeout_s = log_level, timeout_s
        ctx = ldist.init(env, timeout_s) if not dist.is_initialized() else ldist.attach(env, timeout_s)
        self._stack.callback(ldist.shutdown, ctx)
        self.ctx = ctx
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"Cannot use the run directory {self.run_dir}: "
                                  f"{fileio.describe_os_error(e)}") from None
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
        self._steps = StepLog(ctx.world_size, self.log_interval, self._gather if ctx.world_size > 1 else None)
        self._early_stop = EarlyStopping(self.manager.best_metric, self.manager.best_mode, *self._early_stop_args)
        self.manager.prepare()
        self.checkpoint = self.manager.resolve(resume)
        path = self.checkpoint
        self.record: CheckpointRecord | None = self._together(lambda: self._read_record(path)) if path else None
        if path is None and self.init_from is not None:
            self.init_source = init_source(self.init_from, ctx)
        elif self.init_from is not None:
            log.info("--init-from %s: not used, this run already has a checkpoint to resume from", self.init_from)

    def _gather(self, vec: torch.Tensor) -> torch.Tensor:
        """Every rank's copy of ``vec`` (the loop's agreement at sync points, on the gloo control group)."""
        out = vec.new_empty(self.world_size * vec.numel())
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the name of torch < 2.13
        gather(out, vec, group=self.ctx.control_group)
        return out.view(self.world_size, vec.numel())

    def _open_ledger(self) -> None:
        """This rank's step ledger (``launcher/steps.py``): with peers, and values on the CPU only."""
        ctx = self.ctx
        if ctx.world_size == 1 or ctx.device.type != "cpu":
            return
        box = [uuid.uuid4().hex if ctx.is_main else None]  # the attempt's token, the same on every rank
        dist.broadcast_object_list(box, src=0, group=ctx.control_group)
        self._ledger_token = box[0]
        try:
            ledger = StepLedger(self.run_dir / LEDGER_DIR, self.rank, box[0])
        except OSError as e:  # the run goes on; a snapshot after a lost peer cannot be exact, and is not written
            log.warning("Cannot keep the step ledger in %s: %s", self.run_dir / LEDGER_DIR, fileio.describe_os_error(e))
            return
        self._stack.callback(ledger.close)
        self._steps.ledger = ledger

    def _peer_steps(self, rank: int) -> dict[int, tuple[float, ...]]:
        """Rank ``rank``'s values by step from its ledger (for a snapshot)."""
        return StepLedger.read(self.run_dir / LEDGER_DIR, rank, self._ledger_token, len(self._steps.keys))

    def _together(self, step: Callable[[], Any]) -> Any:
        return together(step, self.ctx)

    def _read_record(self, path: Path) -> CheckpointRecord:
        """The resume checkpoint's record, checked against this run's config."""
        record = read_record(path)
        self._check_config(record)
        return record

    def _check_config(self, info: CheckpointRecord) -> None:
        changes = diff_configs(info.config, self.config)
        bad = {k: v for k, v in changes.items() if any(under(k, f) for f in self.shape_keys)}
        if bad:
            lines = "\n".join(f"  - {k}: checkpoint has {a!r}, config has {b!r}" for k, (a, b) in bad.items())
            raise CheckpointError(
                f"The config changes the model's architecture relative to checkpoint {info.name}:\n{lines}\n"
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
    def step_reached(self) -> int | None:
        """Steps completed when training began or since; None before it began (``launcher/endings.py``)."""
        return self.progress.step if self.started else None

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

    def resume(self, total_steps: int, steps_per_epoch: int | None = None,
               evaluate: Callable[[], Mapping[str, float]] | None = None) -> int:
        """Load the latest verified checkpoint (if any) into the registered states.

        Args:
            total_steps: steps of the whole run (not of this attempt); may grow on a later start.
            steps_per_epoch: steps per pass over the data (default: the run is one epoch).
                Epoch ends get an evaluation record and, by default, a checkpoint.
            evaluate: the evaluation your loop passes to ``end_step`` at epoch ends, if any. With
                it, a peer lost during an evaluation still leaves a snapshot of that step, and the
                next attempt runs the evaluation here, before its first step, as the uninterrupted
                run did (then records it and writes the checkpoint due there); without it, such a
                failure falls back to the last periodic checkpoint.

        Returns:
            The step to start from: 0 on a fresh start, the checkpoint's step on a resume, and
            ``total_steps`` when the run has nothing left to do (it finished, or stopped early):
            then one line says so, and nothing in the run directory changes.
        """
        if self._resumed:
            raise UsageError("resume() was already called; it loads the checkpoint once per attempt")
        spe = total_steps if steps_per_epoch is None else steps_per_epoch
        if not (isinstance(total_steps, int) and isinstance(spe, int) and total_steps >= 1 and spe >= 1):
            raise ValueError(f"resume(total_steps={total_steps!r}, steps_per_epoch={steps_per_epoch!r}): "
                             f"expected integers >= 1")
        self.total_steps, self.steps_per_epoch, self._evaluate = total_steps, spe, evaluate
        self.state.seal()
        self._resumed = True
        if self._idle:
            return self.total_steps
        if self.checkpoint:
            self._load(self.checkpoint, self.record)  # loading changes no file: a finished run is loaded too
            if self.progress.step >= total_steps:
                return self.nothing_to_do(
                    f"Run already finished at step {self.progress.step} (checkpoint {self.checkpoint}); nothing "
                    f"to do, nothing changed. To train longer, raise the run's total steps; to start afresh, use "
                    f"another run directory.")
            if self._early_stop.stopped(self.progress.early_stop):
                return self.nothing_to_do(
                    f"This run stopped early at step {self.progress.step} of {total_steps}: "
                    f"{self._early_stop.reason(self.progress.early_stop)}. Nothing to train; to go on, raise "
                    f"train.early_stop_patience (or set it to 0)", status="stopped early")
        elif self.init_source is not None:
            self._initialize(self.init_source)
        else:
            log.info("Starting fresh in %s (no checkpoint found)", self.run_dir)
        self._start_logs()
        # Metrics past the resume step (or of an attempt that died before its first checkpoint)
        # are not part of this run; those a snapshot carries (agreed, but maybe never written) are.
        carried, self.progress.unwritten = self.progress.unwritten, []
        dropped, added = self._together(lambda: self.metrics.restore(self.progress.step, carried))
        if dropped:
            log.info("Dropped %d metrics record(s) logged after step %d", dropped, self.progress.step)
        if added:
            log.info("Wrote %d metrics record(s) up to step %d that the snapshot carried", added, self.progress.step)
        self._together(lambda: (self._write_config(), self._record_start()))
        self._first_step = self.progress.step
        self._started = time.time()
        self._open_ledger()
        self._steps.start(self.progress.step)
        self.observer.on_start(self.run_dir, self.progress.step, total_steps, resumed=bool(self.progress.resumed_at))
        self.preempt.training()  # from here on SIGTERM is a preemption (launcher/preempt.py)
        if self._finish_evaluation():
            return self.total_steps  # it stopped the run early
        self._boundary()
        return self.progress.step

    def _finish_evaluation(self) -> bool:
        """Run the evaluation a snapshot left pending (the failure came during it); True: stop early."""
        p = self.progress
        n, p.eval_pending = p.eval_pending, None
        if n is None or n != p.step:
            return False
        if self._evaluate is None:
            log.warning("Step %d's evaluation was under way when the last attempt failed, and resume() got no "
                        "evaluate= to run it again: step %d has no evaluation record", n, n)
            return False
        log.info("Running step %d's evaluation, which was under way when the last attempt failed", n)
        epoch_end = n % self.steps_per_epoch == 0
        with self.activity("evaluating"):
            self._evaluating = n
            scores = _numbers(self._evaluate(), "evals")
            self._evaluating = None
        self._closing = snapshot.Closing(n, scores, None, None)
        self._evaluation_record(n, scores, epoch_end)
        stopping = self._early_stop.stopped(p.early_stop)
        final = n >= self.total_steps
        reason = "early stop" if stopping else self.manager.due(n, epoch_end, final, False, again=True)
        if reason:  # the checkpoint of this step again, now with its evaluation (it names the best)
            self._save(reason, self.record.loss if self.record else None, scores, blocking=True)
        if stopping:
            self._end("stopped early")
        return stopping

    def nothing_to_do(self, message: str, status: str = "finished") -> int:
        """End this attempt before it starts: say ``message`` and change nothing in the run directory.

        Returns ``total_steps`` (a loop ``for step in range(resume(...), total_steps)`` takes no step).
        """
        log.info("%s", message)
        self.status, self._idle = status, True
        return self.total_steps

    def _start_logs(self) -> None:
        """There is work to do: the rank's log file (with what was logged so far) and the process group."""
        if self._owns_logging:
            logs.attach_file(self.rank, self.run_dir, self._log_level)
        ctx = self.ctx
        log.info("Process group: backend %s, world size %d, device %s (%s launch), collective timeout %g s",
                 ctx.backend, ctx.world_size, ctx.device, ctx.env.kind, self._timeout_s)

    def _write_config(self) -> None:
        if self.is_main:
            text = yaml.safe_dump(self.config, sort_keys=False)
            fileio.atomic_write(self.run_dir / "config.yaml", text.encode())

    def _load(self, path: Path, info: CheckpointRecord) -> None:
        with self._ours():
            template = self.state.template(self.weights_only)
        check_fits(path, template, CheckpointManager.saved_shapes(path))
        # No RNG state is loaded: random draws are per-step streams (launcher/rng.py); the
        # per-rank states older checkpoints hold (rng.rank<N>) are left unread.
        log.info("Resuming from checkpoint: %s", path)
        loaded = self.manager.load(path, {**template, "progress": ""})
        step = info.step
        with self._ours():
            self.state.load(loaded, self.weights_only, step)
        self.progress = Progress.from_json(loaded["progress"])
        self.progress.resumed_at.append(step)
        self.manager.mark_saved(step)
        log.info("Resumed at step %d (%s; checkpoint %s, %s); %d epoch record(s) restored; target %d steps", step,
                 epochs.describe(step, self.steps_per_epoch), path.name, _origin(info), len(self.progress.history),
                 self.total_steps)
        if self.weights_only:
            log.info("--reset-optimizer: weights loaded; optimizer and lr schedule start fresh at step %d", step)

    def _initialize(self, source: Path) -> None:
        """``init_from``: this new run starts at step 0 from another run's weights (and optimizer state)."""
        with_optimizer = self.init_optimizer
        with self._ours():
            template = self.state.init_template(with_optimizer)
        check_fits(source, template, CheckpointManager.saved_shapes(source))
        loaded = self.manager.load(source, template)
        with self._ours():
            self.state.init_load(loaded, with_optimizer)
        self.progress.init_from = str(source)
        info = read_record(source)
        log.info("Initialised from %s (step %s of %s): %s; this run starts at step 0 with its own config, lr "
                 "schedule and data order", source, info.step, source.parent.parent,
                 "weights and optimizer state" if with_optimizer else "weights, fresh optimizer")
        for k, (a, b) in diff_configs(info.config, self.config).items():
            log.info("  differs from the source run: %s: %r -> %r", k, a, b)
        if self.is_main:
            events.append(self.run_dir, "init_from", checkpoint=str(source), step=info.step,
                          optimizer=with_optimizer)

    def _record_start(self) -> None:
        env = self.ctx.env
        if env.requeue_count or env.restart_count:
            log.info("Attempt: torchrun/ftrun restart %d, SLURM requeue (SLURM_RESTART_COUNT) %d",
                     env.restart_count, env.requeue_count)
        if self.is_main:
            events.append(self.run_dir, "worker_start", step=self.progress.step,
                          checkpoint=self.checkpoint.name if self.checkpoint else None,
                          snapshot=bool(self.record and self.record.snapshot_rank is not None),
                          world_size=self.world_size, restart_count=env.restart_count,
                          slurm_restart_count=env.requeue_count, job_id=env.job_id,
                          launched=psutil.Process().create_time())
        self.started = True

    def _record_end(self, status: str) -> None:
        """A deliberate end (finished, preempted, stopped): the run's wall time pauses until its next start."""
        if self.is_main:
            events.append(self.run_dir, "run_end", status=status, step=self.progress.step)

    # ------------------------------------------------------------------ the step

    def end_step(self, step: int, evals: Mapping[str, float] | Callable[[], Mapping[str, float]] | None = None,
                 milestone: str | None = None, **metrics: Any) -> bool:
        """Close step ``step``; return True when the loop must stop (finished, stopped early, or preempted).

        Args:
            step: the 0-based index of the step just taken (the one given to ``batch_indices``).
            evals: evaluation metrics of this step (same on every rank), e.g. ``{"val_loss": 0.3}``,
                or a function that computes them (called here, once the step's record is under
                way: a peer lost during the evaluation then still finds the step complete, and a
                snapshot of it can be written). Epoch ends and steps with ``evals`` get an
                evaluation record; the checkpoint written there records them, which names the
                best checkpoint (and, with ``early_stop_patience``, counts toward early stopping).
            milestone: a label (e.g. "end of stage 1"): a checkpoint of this step is written and
                kept by retention for good.
            **metrics: this rank's ``loss`` (required) and any others, as numbers or one-element
                tensors (kept on the device: no synchronisation here), averaged over ranks.

        Saves checkpoints when due, acts on preemption signals (a checkpoint, then True and
        ``exit_code`` 75), reports progress to ftrun and records metrics.
        """
        self._check_step(step)
        n = step + 1
        if "loss" not in metrics and not self._steps.has_early(n):
            raise UsageError("end_step(step, loss=...): the step's loss is required (it makes the epoch's "
                             "train_loss); add any other metrics as keywords")
        self.progress.step = n
        self._clean = True  # the step is over: from here on the state is boundary n's (launcher/snapshot.py)
        self._steps.add(n, metrics, time.time())
        epoch_end = n % self.steps_per_epoch == 0
        final = n >= self.total_steps
        if callable(evals):
            with self.activity("evaluating"):
                if self._failpoint is not None:  # tests only (launcher/checkpoint/faults.py)
                    faults.hit("evaluation", n, self.rank, self._failpoint)
                self._evaluating = n  # a failure in it leaves no snapshot (launcher/snapshot.py)
                evals = evals()
                self._evaluating = None
        scores = _numbers(evals, "evals") if evals is not None else None
        due = self.manager.due(n, epoch_end, final, False, milestone=milestone is not None)
        self._closing = snapshot.Closing(n, (scores or {}) if epoch_end or scores is not None else None, due, milestone)
        alone = self.world_size == 1 and (self.preempt.raised or self.manager.local_wants_save())
        if not self._steps.due(n, forced=epoch_end or final or scores is not None or due is not None or alone):
            self._boundary()
            return False
        synced = self._steps.sync(n, self.manager.local_wants_save(), self.preempt.raised)
        loss = self._publish(synced.records)
        if self._closing.evals is not None:
            self._evaluation_record(n, self._closing.evals, epoch_end)
        stopping = self._early_stop.stopped(self.progress.early_stop)
        final = final or stopping
        reason = ("preemption" if synced.preempted else "early stop" if stopping
                  else self.manager.due(n, epoch_end, final, synced.wants_save, milestone=milestone is not None))
        if reason:
            self._save(reason, loss, scores or {}, blocking=synced.preempted or final, milestone=milestone)
        if synced.preempted or final:
            self._end("preempted" if synced.preempted else "stopped early" if stopping else "finished")
            return True
        self._boundary()
        return False

    def step_metrics(self, step: int, **metrics: Any) -> None:
        """Report step ``step``'s metrics as soon as they are known; optional, before ``end_step``.

        Call it as soon as the values exist (e.g. after the forward pass, before or after the step's
        collectives) and before its first change to saved state (the optimizer's ``step()``), with
        what ``end_step`` would get (``loss`` required). If this rank then dies after the step's
        collectives (in its optimizer step), a survivor still has the values and can write its
        snapshot of the step (``docs/own-loop.md``).
        ``end_step(step)`` then takes no metrics (or the same names: these values are used).
        """
        self._check_step(step)
        if "loss" not in metrics:
            raise UsageError("step_metrics(step, loss=...): the step's loss is required")
        self._steps.add_early(step + 1, metrics)

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
        """The next step begins: its random draws come from its own streams (nothing to save)."""
        rng.seed_step(self.seed, self.progress.step, self.rank)
        self.heartbeat.report(self.progress.step, "training")
        self._clean = True
        if self._failpoint is not None:  # tests only (launcher/checkpoint/faults.py)
            faults.hit("step_start", self.progress.step, self.rank, self._failpoint)

    def _publish(self, synced: list[tuple[int, dict[str, float], float]]) -> float:
        """Write the agreed step records; show the logged ones. Returns the last step's loss."""
        records = settle_steps(self.progress, synced, self.steps_per_epoch)
        self._last_window = list(records)
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
        record = settle_evaluation(self.progress, n, evals, self.steps_per_epoch, time.time())
        if evals:
            self._early_stop.observe(self.progress.early_stop, evals, n)
        self._closing.recorded = True
        self._last_window.append(record)
        self.metrics.write_many([record])
        self.observer.on_eval(record)
        shown = " ".join(f"{k} {v:.5f}" for k, v in evals.items())
        if epoch_end:
            log.info("epoch %d done at step %d: train_loss %.5f %s", record["epoch"], n, record["train_loss"], shown)
        else:
            log.info("evaluation at step %d (epoch %d): train_loss %.5f %s", n, record["epoch"],
                     record["train_loss"], shown)

    def _record_info(self, reason: str, loss: float | None, evals: dict[str, float],
                     milestone: str | None) -> dict[str, Any]:
        """The checkpoint record's fields this loop knows (the manager adds name, world size, run)."""
        p, spe = self.progress, self.steps_per_epoch
        return {"step": p.step, "epoch": epochs.of_step(p.step, spe), "steps_per_epoch": spe, "loss": loss,
                "metrics": evals, "config": self.config, "trainer": self.name, "reason": reason, "time": time.time(),
                "history": p.history[-5:],
                # The latest evaluation, so that a checkpoint between two evaluations says how good it is.
                "last_eval": p.history[-1] if p.history else None,
                "milestone": milestone,  # kept by retention
                "init_from": p.init_from}

    def _save(self, reason: str, loss: float, evals: dict[str, float], blocking: bool,
              milestone: str | None = None) -> None:
        p = self.progress
        self.heartbeat.report(p.step, "saving")
        with self._ours():
            state = {**self.state.state(), "progress": p.to_json()}
        self.manager.save(p.step, state, self._record_info(reason, loss, evals, milestone), blocking=blocking)
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

    # ------------------------------------------------------------------ the step contract (snapshots)

    @property
    def clean_boundary(self) -> int | None:
        """The step boundary whose state this process still holds unchanged, or None.

        From the start of ``end_step()`` (the step is over) or the return of ``resume()`` until
        an optimizer's ``step()`` or a :meth:`mutating` call in the next step: a just-in-time
        snapshot taken then is exact (``launcher/snapshot.py``).
        """
        return self.progress.step if self._clean and self._resumed and not self.status else None

    def mutating(self) -> None:
        """Declare that this step starts changing saved state (call before doing so by hand)."""
        self._clean = False

    def _on_optimizer_step(self, optimizer, args, kwargs) -> None:
        if not self._internal:
            if self._clean and self._failpoint is not None:
                faults.hit("optimizer_step", self.progress.step, self.rank, self._failpoint)
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
            elif status == "stopped early":
                log.info("Stopped early at step %d of %d: %s", p.step, self.total_steps,
                         self._early_stop.reason(p.early_stop))
            else:
                log.info("Training stopped at step %d of %d: the loop ended before the target; the next start "
                         "resumes from the latest checkpoint", p.step, self.total_steps)
        self._record_end(status)
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
        if exc is not None and endings.is_peer_failure(exc) and not endings.interrupt_received():
            self._peer_lost(exc)  # does not return; after Ctrl-C the interrupt's own ending applies
        self.close(failed=exc_type is not None)
        return False

    def _peer_lost(self, exc: BaseException) -> NoReturn:
        """A collective failed because another rank or node is gone: snapshot, say so in one line, end.

        A survivor holding a clean step boundary writes it, alone, as a verified checkpoint
        (``launcher/snapshot.py``); then the one-line report, and the process ends at once.
        Clean-up is skipped: it could block on the dead peer (an async save's collectives, the
        process group's destruction). The resume point is the newest verified checkpoint or
        snapshot (``launcher/preempt.py``, ``docs/failures.md``).
        """
        outcome = snapshot.after_peer_lost(self)
        endings.peer_lost(self.ctx.env, self.run_dir, self.step_reached, exc, outcome.phrase())
        signum = TEARDOWN_SIGNAL if self.preempt.signum == TEARDOWN_SIGNAL else None
        teardown(f"a collective failed, another rank is gone ({endings.short_reason(exc)})", signum=signum)


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


def _origin(info: CheckpointRecord) -> str:
    """What wrote a checkpoint, for the resume lines: a periodic save, or a survivor's snapshot."""
    if info.snapshot_rank is not None:
        return f"a snapshot by rank {info.snapshot_rank} after a peer was lost ({info.reason})"
    return info.reason or "a checkpoint"
