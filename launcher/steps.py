"""The loop's per-step bookkeeping, kept off the step's critical path.

Per step the loop hands the step's metrics to :meth:`StepLog.add`, which packs them, with this
rank's save request, preemption flag and step time, into one small vector and *starts* its sum
over the ranks (``all_reduce(async_op=True)``: on the gloo control group on CPU, on the training
group with the values left on the device under NCCL). Nothing waits for it: no device
synchronisation, no blocking collective, no file write. At a *sync point* the loop collects the
sums of the steps since the last one (they completed long ago), and the step records are written.

Why every step's metrics start their agreement at once instead of being buffered until the sync
point: a rank that dies takes its unshared values with it. The survivors of a failure write a
just-in-time snapshot of the step boundary they hold (``launcher/api.py``), and that snapshot
must carry the agreed records of every step up to it, or the run's history (``metrics.jsonl``,
the epoch's mean training loss) would differ from an uninterrupted run's. Sharing each step's
values as the step ends costs a few microseconds of this thread (the sum runs on the backend's
own thread) and leaves only one window open: a rank killed after its last collective of a step
but before that step's ``end_step`` (its optimizer step) dies before sharing the step's values;
then :meth:`StepLog.agreed` says so and no snapshot is written (``docs/failures.md``).

Sync points (every rank computes the same ones):

* the first step of an attempt, every ``log_interval``-th step, the last step;
* epoch ends, evaluations, and steps at which a checkpoint is due by step count;
* steps after which about :data:`SYNC_SECONDS` of training passed since the last sync: each
  sync sets how many steps may pass before the next one (1 to ``log_interval``) from the
  ranks' mean step time, which is part of the agreed vectors and hence equal on every rank.

So a preemption signal or a save request on any rank is acted upon by every rank at the same
step, within about ``SYNC_SECONDS`` of training or one step, whichever is longer. With one
process the flags are read every step.

Exactness: every step's vector has the same length and every metric the same slot in it, so the
sum over ranks adds the same numbers in the same order whatever the sync points were, and an
interrupted and resumed run records the very same values as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import numbers
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from launcher import epochs

SYNC_SECONDS = 1.0  # most training time between two agreements of the ranks (see the module docstring)
RECORD_KEYS = ("step", "epoch", "time")  # set by the loop; a metric may not use these names
FLAGS = 3  # wants_save, preempted, step seconds: the last slots of every step's vector


@dataclass
class Progress:
    """Counters and histories saved with every checkpoint (as JSON inside the DCP state)."""

    step: int = 0
    epoch_loss_sum: float = 0.0  # running sum of the step losses since the last evaluation record
    epoch_loss_count: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch end or evaluation
    resumed_at: list[int] = field(default_factory=list)  # steps at which the run resumed
    early_stop: dict[str, Any] = field(default_factory=dict)  # best value, its step, evaluations since
    init_from: str | None = None  # the checkpoint of another run this run started from (staged training)
    #: ``metrics.jsonl`` records up to ``step`` that the file may lack: a snapshot written by a rank
    #: other than rank 0 carries those agreed since the last checkpoint; the next start writes them.
    unwritten: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Progress:
        return cls(**json.loads(text))


Record = tuple[int, dict[str, float], float]  # (completed steps, mean over ranks, wall time)


@dataclass
class Synced:
    """What a sync point agreed: the step records, and whether any rank asked to save or stop."""

    records: list[Record]
    wants_save: bool
    preempted: bool


@dataclass
class Agreed:
    """The outcome of :meth:`StepLog.agreed`: the records whose agreement completed, oldest first."""

    records: list[Record]
    complete: bool  # every buffered step up to the last one added is among them
    missing: int | None = None  # the first step whose agreement did not complete


@dataclass
class _Step:
    step: int
    vec: torch.Tensor  # this rank's values; the sum over ranks once ``work`` completed
    work: Any  # the agreement in flight (torch's Work), or None when it completed at once
    time: float  # wall time of the step's end


class StepLog:
    """Starts each step's agreement over the ranks and collects the agreed records at sync points.

    Args:
        world_size: ranks in the job.
        log_interval: steps per log window (a sync point ends every window).
        reduce: starts an in-place sum over the ranks of a float64 tensor and returns a handle
            with ``wait()`` and ``is_completed()`` (torch's ``Work``), or None when it summed at
            once; None at world size 1.
        sync_seconds: most training time between two sync points.
        clock: seconds, monotonic (a fake in tests).
        device: where the vectors live (the values' device under NCCL, else the CPU).
    """

    def __init__(self, world_size: int, log_interval: int, reduce: Callable[[torch.Tensor], Any] | None = None,
                 sync_seconds: float = SYNC_SECONDS, clock: Callable[[], float] = time.perf_counter,
                 device: torch.device | str = "cpu"):
        self.world, self.interval, self.reduce = world_size, log_interval, reduce
        self.sync_seconds, self.clock = sync_seconds, clock
        self.device = torch.device(device)
        self.keys: tuple[str, ...] = ()  # the metric names, sorted (their order in each vector)
        self._order: tuple[str, ...] = ()  # the names in the order the caller passed them last
        self.next_sync = 0
        self._pending: list[_Step] = []
        self._tick = clock()  # when the last step ended (or the window began)

    def start(self, step: int) -> None:
        """An attempt starts after ``step`` completed steps: its first step is a sync point."""
        self._pending = []
        self.keys, self._order = (), ()
        self.next_sync = step + 1
        self._tick = self.clock()

    def add(self, step: int, metrics: Mapping[str, Any], now: float, wants_save: bool = False,
            preempted: bool = False) -> None:
        """Start the agreement of completed step ``step``: its metrics (numbers or one-element
        tensors) and this rank's flags, summed over the ranks in the background."""
        order = tuple(metrics)
        if order != self._order:
            self._set_names(order, step)
        tick = self.clock()
        seconds, self._tick = tick - self._tick, tick
        vec = self._vector(step, [metrics[k] for k in self.keys], [float(wants_save), float(preempted), seconds])
        work = self.reduce(vec) if self.reduce is not None and self.world > 1 else None
        self._pending.append(_Step(step, vec, work, now))

    def _set_names(self, order: tuple[str, ...], step: int) -> None:
        keys = tuple(sorted(order))
        if self.keys and keys != self.keys:
            raise ValueError(f"end_step: the metric names changed from {', '.join(self.keys)} to {', '.join(keys)} "
                             f"at step {step}; pass the same names at every step (float('nan') for a value a "
                             f"step does not have)")
        for k in keys:
            if k in RECORD_KEYS:
                raise ValueError(f"end_step(..., {k}=...): {k!r} is set by the loop itself; rename the metric")
        self.keys, self._order = keys, order

    def _vector(self, step: int, values: list[Any], flags: list[float]) -> torch.Tensor:
        """The step's float64 vector: metrics in key order, then the flags. Values on an accelerator
        stay there (one small copy kernel each, no synchronisation)."""
        for j, v in enumerate(values):
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                continue
            if not isinstance(v, numbers.Real):
                raise ValueError(f"end_step(..., {self.keys[j]}=...) at step {step}: expected a number or a "
                                 f"one-element tensor (e.g. the batch's mean loss), got {_describe(v)}")
        if self.device.type == "cpu" and not any(isinstance(v, torch.Tensor) and v.device.type != "cpu"
                                                 for v in values):
            return torch.tensor([float(v) for v in values] + flags, dtype=torch.float64)
        parts = [v.detach().reshape(1).to(self.device, torch.float64) if isinstance(v, torch.Tensor)
                 else torch.full((1,), float(v), dtype=torch.float64, device=self.device) for v in [*values, *flags]]
        return torch.cat(parts)

    def due(self, step: int, forced: bool = False) -> bool:
        """Whether completed step ``step`` is a sync point (``forced``: the caller's own reasons)."""
        return forced or step % self.interval == 0 or step >= self.next_sync

    def sync(self, step: int) -> Synced:
        """Collect the agreed records of the steps since the last sync point (they are complete
        by now; a failed agreement raises here, on every rank that sees it)."""
        for p in self._pending:
            if p.work is not None:
                p.work.wait()
        rows = [(p, p.vec.tolist()) for p in self._pending]  # one device-to-host copy per step, here only
        records = [self._record(p, out) for p, out in rows]
        seconds = [out[-1] / self.world for _, out in rows]
        # The time per step that spaces sync points: the first step of a window also holds what
        # ran before it (an evaluation, a save), so it counts only when it is the only one.
        per_step = sum(seconds[1:]) / (len(seconds) - 1) if len(seconds) > 1 else sum(seconds)
        allowed = math.floor(self.sync_seconds / per_step) if per_step > 0 else self.interval
        self.next_sync = step + max(1, min(self.interval, allowed))
        wants_save = any(out[-3] > 0 for _, out in rows)
        preempted = any(out[-2] > 0 for _, out in rows)
        self._pending = []
        self._tick = self.clock()
        return Synced(records, wants_save, preempted)

    def _record(self, p: _Step, out: list[float]) -> Record:
        return p.step, {k: out[j] / self.world for j, k in enumerate(self.keys)}, p.time

    def agreed(self, timeout: float, poll: float = 0.005) -> Agreed:
        """The buffered steps whose agreement completed, oldest first, waiting at most ``timeout``
        seconds in all; never raises. For a snapshot after a peer failed: a step that some rank
        never shared stops the list there."""
        deadline = time.monotonic() + timeout
        out: list[Record] = []
        for p in self._pending:
            if p.work is not None:
                while not p.work.is_completed() and time.monotonic() < deadline:
                    time.sleep(poll)
                try:
                    if not p.work.is_completed():
                        return Agreed(out, False, p.step)
                    p.work.wait()
                except Exception:  # the agreement failed: the dead rank never sent its values
                    return Agreed(out, False, p.step)
            out.append(self._record(p, p.vec.tolist()))
        return Agreed(out, True)

    @property
    def buffered(self) -> list[int]:
        """Steps added since the last sync point."""
        return [p.step for p in self._pending]


def settle_steps(progress: Progress, records: list[Record], steps_per_epoch: int) -> list[dict[str, Any]]:
    """Count agreed step records into the epoch's running loss; return them as ``metrics.jsonl`` records."""
    out = []
    for s, means, t in records:
        record = {"step": s, "epoch": epochs.of_step(s, steps_per_epoch), **means, "time": t}
        progress.epoch_loss_sum += record["loss"]
        progress.epoch_loss_count += 1
        out.append(record)
    return out


def settle_evaluation(progress: Progress, step: int, evals: dict[str, float], steps_per_epoch: int,
                      now: float) -> dict[str, Any]:
    """Close the epoch's running loss into an evaluation record at ``step`` (history and ``metrics.jsonl``)."""
    epoch = epochs.of_step(step, steps_per_epoch)
    train_loss = progress.epoch_loss_sum / max(progress.epoch_loss_count, 1)
    progress.history.append({"epoch": epoch, "step": step, "train_loss": train_loss, **evals})
    progress.epoch_loss_sum, progress.epoch_loss_count = 0.0, 0
    return {"step": step, "epoch": epoch, "train_loss": train_loss, **evals, "time": now}


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of {value.numel()} values"
    return type(value).__name__
