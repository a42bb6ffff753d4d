"""The loop's per-step bookkeeping, kept off the step's critical path.

Per step the loop only appends the step's metrics to a buffer: numbers, or tensors that stay
where they are (no device synchronisation, no collective). At a *sync point* the buffer is
combined across ranks in one collective on the gloo control group (an all-gather, summed in
rank order), together with each rank's save request, preemption flag and step time, and the
step records are written.

Sync points (every rank computes the same ones):

* the first step of an attempt, every ``log_interval``-th step, the last step;
* epoch ends, evaluations, and steps at which a checkpoint is due by step count;
* steps after which about :data:`SYNC_SECONDS` of training passed since the last sync: each
  sync sets how many steps may pass before the next one (1 to ``log_interval``) from the
  ranks' mean step time, which is part of the combined vector and hence equal on every rank.

So a preemption signal or a save request on any rank is acted upon by every rank at the same
step, within about ``SYNC_SECONDS`` of training or one step, whichever is longer. With one
process the flags are read every step.

Exactness: every metric of every step has a fixed slot in a fixed-size vector (its step's
position in its ``log_interval`` window; a window never spans two), and the ranks' vectors are
added in rank order, so an interrupted and resumed run records the very same values as an
uninterrupted one.

**The step ledger** (:class:`StepLedger`). A rank that dies takes the values it had not yet
shared with it, and the survivors' just-in-time snapshot (``launcher/snapshot.py``) needs the
records of every step up to the boundary it saves, or the run's history (``metrics.jsonl``, the
epoch's mean training loss) would differ from an uninterrupted run's. So each rank also appends
its values of each step to its own small file in the run directory as the step ends: one
``write`` of a few dozen bytes, microseconds (a collective per step costs a hundred times more
CPU on a busy machine, and the lean loop exists to avoid one). A survivor reads the others'
files for the steps since the last sync point and adds them in rank order, the same sum a
sync point computes. A rank that reports its step's values as soon as they are known
(:meth:`StepLog.add_early`, ``FaultTolerant.step_metrics``: before or right after the step's
collectives, before its optimizer step, as our trainers do) has written them before it changes
any state; a rank that reports them only in ``end_step`` and is killed after the step's last
collective has not written that step: then :meth:`StepLog.agreed` says so and no snapshot is
written. The ledger needs the values on the CPU: it is off when the loop's device is an
accelerator (a per-step device synchronisation is what the lean loop avoids; with NCCL a lost
peer blocks the survivors' collectives anyway).
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from launcher import epochs, fileio

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
    #: ``metrics.jsonl`` records up to ``step`` that the file may lack: a snapshot written by a rank
    #: other than rank 0 carries those agreed since the last checkpoint; the next start writes them.
    unwritten: list[dict[str, Any]] = field(default_factory=list)
    #: A snapshot taken while step ``step``'s evaluation ran: the next attempt runs it before its
    #: first step (``FaultTolerant.resume(evaluate=...)``), as the uninterrupted run would have.
    eval_pending: int | None = None

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
    """What a survivor can reconstruct of the steps since the last sync point (:meth:`StepLog.agreed`)."""

    records: list[Record]  # the steps every rank's values are known of, oldest first
    complete: bool  # all the buffered steps
    missing: int | None = None  # the first step some rank's values are missing of


class StepLedger:
    """One rank's values of every step, appended to ``DIR/rank<R>.bin`` as the step ends.

    The file starts with a header line naming the attempt (a token every rank of it shares), then
    holds one fixed-size record per step: the step (int64) and its values (float64, in the metric
    names' order). A torn last record (the writer killed mid-write) is ignored by :meth:`read`.
    Each attempt starts the file afresh.
    """

    def __init__(self, directory: Path, rank: int, token: str):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"rank{rank}.bin"
        self._fd: int | None = fileio.open_regular(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
        os.write(self._fd, f"ftlaunch-steps {token}\n".encode())

    def write(self, step: int, values: list[float]) -> None:
        if self._fd is not None:
            os.write(self._fd, struct.pack(f"<q{len(values)}d", step, *values))

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    @staticmethod
    def read(directory: Path, rank: int, token: str, width: int) -> dict[int, tuple[float, ...]]:
        """Rank ``rank``'s values by step, if its file belongs to attempt ``token`` (else none)."""
        try:
            data = fileio.read_bytes(directory / f"rank{rank}.bin", limit=1 << 30)
        except OSError:
            return {}
        header, _, body = data.partition(b"\n")
        if header != f"ftlaunch-steps {token}".encode():
            return {}
        size = struct.calcsize(f"<q{width}d")
        out = {}
        for i in range(len(body) // size):
            step, *values = struct.unpack_from(f"<q{width}d", body, i * size)
            out[step] = tuple(values)
        return out


class StepLog:
    """Buffers step metrics between sync points and combines them across ranks there.

    Args:
        world_size: ranks in the job.
        log_interval: steps per log window (a sync point ends every window).
        gather: every rank's copy of a float64 CPU tensor, as a ``[world_size, n]`` tensor
            (None at world size 1).
        sync_seconds: most training time between two sync points.
        clock: seconds, monotonic (a fake in tests).
        ledger: this rank's :class:`StepLedger` (None: no snapshots can be exact after a loss).
    """

    def __init__(self, world_size: int, log_interval: int, gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 sync_seconds: float = SYNC_SECONDS, clock: Callable[[], float] = time.perf_counter,
                 ledger: StepLedger | None = None):
        self.world, self.interval, self.gather = world_size, log_interval, gather
        self.sync_seconds, self.clock, self.ledger = sync_seconds, clock, ledger
        self.keys: tuple[str, ...] = ()  # the metric names, sorted (their order in each row)
        self._order: tuple[str, ...] = ()  # the names in the order the caller passed them last
        self.next_sync = 0
        self._steps: list[int] = []
        self._rows: list[list[Any]] = []
        self._times: list[float] = []
        self._window_start = clock()
        self._early: tuple[int, list[Any]] | None = None  # (step, row) reported by add_early

    def start(self, step: int) -> None:
        """An attempt starts after ``step`` completed steps: its first step is a sync point."""
        self._steps, self._rows, self._times, self._early = [], [], [], None
        self.keys, self._order = (), ()
        self.next_sync = step + 1
        self._window_start = self.clock()

    def add(self, step: int, metrics: Mapping[str, Any], now: float) -> None:
        """Buffer the metrics of completed step ``step`` (numbers or one-element tensors).

        Only the names are checked here, and only when they change; without a ledger the values
        are checked at the sync point that reads them (this runs every step and must cost next
        to nothing); with one, they are written to it now (one ``write``).
        """
        if self._early is not None and self._early[0] == step:
            if metrics and tuple(sorted(metrics)) != self.keys:
                raise ValueError(f"end_step: step {step}'s metrics were reported as {', '.join(self.keys)} and "
                                 f"now as {', '.join(sorted(metrics))}; report them once (or the same names)")
            row, self._early = self._early[1], None
        else:
            row = self._row(step, metrics)
        self._steps.append(step)
        self._rows.append(row)
        self._times.append(now)

    def add_early(self, step: int, metrics: Mapping[str, Any]) -> None:
        """The metrics of step ``step``, known before the step changes any state: written to the
        ledger now, so that a survivor has them even if this rank dies in its optimizer step;
        :meth:`add` then buffers them when the step completes."""
        self._early = (step, self._row(step, metrics))

    def has_early(self, step: int) -> bool:
        return self._early is not None and self._early[0] == step

    def _row(self, step: int, metrics: Mapping[str, Any]) -> list[Any]:
        order = tuple(metrics)
        if order != self._order:
            self._set_names(order, step)
        row = [metrics[k] for k in self.keys]
        if self.ledger is not None:
            row = [self._number(step, j, v) for j, v in enumerate(row)]
            self.ledger.write(step, row)
        return row

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

    def _number(self, step: int, j: int, v: Any) -> float:
        if (isinstance(v, torch.Tensor) and v.numel() == 1) or isinstance(v, numbers.Real):
            return float(v)
        raise ValueError(f"end_step(..., {self.keys[j]}=...) at step {step}: expected a number or a "
                         f"one-element tensor (e.g. the batch's mean loss), got {_describe(v)}")

    def due(self, step: int, forced: bool = False) -> bool:
        """Whether completed step ``step`` is a sync point (``forced``: the caller's own reasons)."""
        return forced or step % self.interval == 0 or step >= self.next_sync

    def sync(self, step: int, wants_save: bool, preempted: bool) -> Synced:
        """Combine the buffered steps and this rank's flags over the ranks (one collective)."""
        m, n_steps = len(self.keys), len(self._steps)
        values = [0.0] * (self.interval * m + 3)
        tensors: list[tuple[int, torch.Tensor]] = []
        for s, row in zip(self._steps, self._rows, strict=True):
            base = ((s - 1) % self.interval) * m
            for j, v in enumerate(row):
                if isinstance(v, torch.Tensor) and v.numel() == 1:
                    tensors.append((base + j, v))
                else:
                    values[base + j] = self._number(s, j, v)
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
        out = _rank_ordered_sum(self.gather(vec)) if self.gather is not None and self.world > 1 else values
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

    def agreed(self, peers: Callable[[int], dict[int, tuple[float, ...]]], rank: int) -> Agreed:
        """The buffered steps' records as the next sync point would have made them, from this rank's
        values and the other ranks' ledgers (``peers(r)``: rank ``r``'s values by step). For a
        snapshot after a peer was lost; stops at the first step some rank never wrote."""
        if self.ledger is None and self.world > 1:
            return Agreed([], not self._steps, self._steps[0] if self._steps else None)
        others = {r: peers(r) for r in range(self.world) if r != rank}
        out: list[Record] = []
        for s, row, t in zip(self._steps, self._rows, self._times, strict=True):
            rows = [row if r == rank else others[r].get(s) for r in range(self.world)]
            if any(v is None or len(v) != len(self.keys) for v in rows):
                return Agreed(out, False, s)
            totals = [0.0] * len(self.keys)
            for values in rows:  # rank order, as a sync point adds them
                totals = [a + float(b) for a, b in zip(totals, values, strict=True)]
            out.append((s, {k: totals[j] / self.world for j, k in enumerate(self.keys)}, t))
        return Agreed(out, True)

    @property
    def buffered(self) -> list[int]:
        """Steps added since the last sync point."""
        return list(self._steps)


def _rank_ordered_sum(parts: torch.Tensor) -> list[float]:
    """``parts[0] + parts[1] + ...`` element by element, in rank order."""
    total = parts[0].clone()
    for part in parts[1:]:
        total.add_(part)
    return total.tolist()


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
