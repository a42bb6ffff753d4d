"""The loop's per-step bookkeeping, kept off the step's critical path.

Per step the loop only appends the step's metrics to a buffer: numbers, or tensors that stay
where they are (no device synchronisation, no collective, no file write). At a *sync point*
the buffer is reduced across ranks in one collective on the gloo control group, together with
each rank's save request, preemption flag and step time, and the step records are written.

Sync points (every rank computes the same ones):

* the first step of an attempt, every ``log_interval``-th step, the last step;
* epoch ends, evaluations, and steps at which a checkpoint is due by step count;
* steps after which about :data:`SYNC_SECONDS` of training passed since the last sync: each
  sync sets how many steps may pass before the next one (1 to ``log_interval``) from the
  ranks' mean step time, which is part of the reduced vector and hence equal on every rank.

So a preemption signal or a save request on any rank is acted upon by every rank at the same
step, within about ``SYNC_SECONDS`` of training or one step, whichever is longer. With one
process the flags are read every step.

Exactness: every metric of every step has a fixed slot in a fixed-size vector (its step's
position in its ``log_interval`` window; a window never spans two), so the sum over ranks
adds the same numbers in the same order whatever the sync points were, and an interrupted
and resumed run records the very same values as an uninterrupted one.
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

SYNC_SECONDS = 1.0  # most training time between two agreements of the ranks (see the module docstring)
RECORD_KEYS = ("step", "epoch", "time")  # set by the loop; a metric may not use these names


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

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Progress:
        return cls(**json.loads(text))


@dataclass
class Synced:
    """What a sync point agreed: the step records, and whether any rank asked to save or stop."""

    records: list[tuple[int, dict[str, float], float]]  # (completed steps, mean over ranks, wall time)
    wants_save: bool
    preempted: bool


class StepLog:
    """Buffers step metrics between sync points and reduces them there.

    Args:
        world_size: ranks in the job.
        log_interval: steps per log window (a sync point ends every window).
        reduce: in-place sum of a float64 CPU tensor over the ranks (None at world size 1).
        sync_seconds: most training time between two sync points.
        clock: seconds, monotonic (a fake in tests).
    """

    def __init__(self, world_size: int, log_interval: int, reduce: Callable[[torch.Tensor], Any] | None = None,
                 sync_seconds: float = SYNC_SECONDS, clock: Callable[[], float] = time.perf_counter):
        self.world, self.interval, self.reduce = world_size, log_interval, reduce
        self.sync_seconds, self.clock = sync_seconds, clock
        self.keys: tuple[str, ...] = ()  # the metric names, sorted (their order in each row)
        self._order: tuple[str, ...] = ()  # the names in the order the caller passed them last
        self.next_sync = 0
        self._steps: list[int] = []
        self._rows: list[list[Any]] = []
        self._times: list[float] = []
        self._window_start = clock()

    def start(self, step: int) -> None:
        """An attempt starts after ``step`` completed steps: its first step is a sync point."""
        self._steps, self._rows, self._times = [], [], []
        self.keys, self._order = (), ()
        self.next_sync = step + 1
        self._window_start = self.clock()

    def add(self, step: int, metrics: Mapping[str, Any], now: float) -> None:
        """Buffer the metrics of completed step ``step`` (numbers or one-element tensors).

        Only the names are checked here, and only when they change; the values are checked at
        the sync point that reads them (this runs every step and must cost next to nothing).
        """
        order = tuple(metrics)
        if order != self._order:
            self._set_names(order, step)
        self._steps.append(step)
        self._rows.append([metrics[k] for k in self.keys])
        self._times.append(now)

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

    def due(self, step: int, forced: bool = False) -> bool:
        """Whether completed step ``step`` is a sync point (``forced``: the caller's own reasons)."""
        return forced or step % self.interval == 0 or step >= self.next_sync

    def sync(self, step: int, wants_save: bool, preempted: bool) -> Synced:
        """Reduce the buffered steps and this rank's flags over the ranks (one collective)."""
        m, n_steps = len(self.keys), len(self._steps)
        values = [0.0] * (self.interval * m + 3)
        tensors: list[tuple[int, torch.Tensor]] = []
        for s, row in zip(self._steps, self._rows, strict=True):
            base = ((s - 1) % self.interval) * m
            for j, v in enumerate(row):
                if isinstance(v, torch.Tensor) and v.numel() == 1:
                    tensors.append((base + j, v))
                elif isinstance(v, numbers.Real):
                    values[base + j] = float(v)
                else:
                    raise ValueError(f"end_step(..., {self.keys[j]}=...) at step {s}: expected a number or a "
                                     f"one-element tensor (e.g. the batch's mean loss), got {_describe(v)}")
        if tensors:  # one device-to-host copy for the whole window
            device = tensors[0][1].device
            host = torch.stack([t.detach().to(device, torch.float64).reshape(()) for _, t in tensors]).cpu()
            for (i, _), x in zip(tensors, host.tolist(), strict=True):
                values[i] = x
        # This rank's time per step: from the steps' own timestamps (a pause before the window's
        # first step, e.g. an evaluation, does not count), or since the last sync for one step.
        per_step = ((self._times[-1] - self._times[0]) / (n_steps - 1) if n_steps > 1
                    else self.clock() - self._window_start)
        values[-3:] = [float(wants_save), float(preempted), max(per_step, 0.0)]
        vec = torch.tensor(values, dtype=torch.float64)
        if self.reduce is not None and self.world > 1:
            self.reduce(vec)
        out = vec.tolist()
        records = []
        for s, t in zip(self._steps, self._times, strict=True):
            base = ((s - 1) % self.interval) * m
            records.append((s, {k: out[base + j] / self.world for j, k in enumerate(self.keys)}, t))
        mean_step = out[-1] / self.world
        allowed = math.floor(self.sync_seconds / mean_step) if mean_step > 0 else self.interval
        self.next_sync = step + max(1, min(self.interval, allowed))
        self._steps, self._rows, self._times = [], [], []
        self._window_start = self.clock()
        return Synced(records, out[-3] > 0, out[-2] > 0)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of {value.numel()} values"
    return type(value).__name__
