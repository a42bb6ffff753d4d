"""Just-in-time snapshots: a survivor of a lost peer saves the step boundary it holds, then exits.

When a collective fails because another rank or node is gone, every surviving rank still holds
its state, and under data parallelism that is the whole state of the job. If the failure came
at a clean step boundary, a survivor completes that step's bookkeeping, writes the state alone
as a verified checkpoint (:mod:`launcher.checkpoint.alone`) and exits; the next attempt resumes
from it and loses at most the step that was under way. Otherwise it writes nothing and the next
attempt resumes from the latest periodic checkpoint, as before. Each survivor appends a
``snapshot`` event (written or not, and why) to ``events.jsonl``.

What makes a snapshot exactly what a periodic checkpoint of that step would have been:

* **The step contract** (``launcher/api.py``): the state is the boundary's from the start of
  ``end_step()`` (or the return of ``resume()``) until the next step's first optimizer
  ``step()`` (a global optimizer hook) or :meth:`FaultTolerant.mutating`. Our trainers do all of
  a step's collectives before its first change to saved state, so a peer lost during a step
  finds the survivors at the boundary before it (``docs/own-trainer.md``).
* **The step records**: the snapshot needs the records of every step up to the boundary, agreed
  at sync points or rebuilt from every rank's step ledger (``launcher/steps.py``: each rank
  appends its values of each step to ``RUN_DIR/steps/rank<N>.bin``), and carries those
  ``metrics.jsonl`` may lack (rank 0 writes the file, and may be the one lost).
* **Nothing only the dead rank held**: random draws come from per-step streams, a function of
  (seed, step, rank, stream) (``launcher/rng.py``), so no per-rank random state is saved.

The decision, in order; when there is no snapshot, the first reason that applies is reported:

1. training had begun, the state is at a clean boundary (:attr:`FaultTolerant.clean_boundary`),
   and this attempt completed a step since it started (else its checkpoint holds that state);
2. every rank's values of every step up to the boundary are known (agreed at a sync point, or
   in its ledger): not so when a rank died after its step's last collective but before its
   ``end_step`` (during its optimizer step), or when the values live on an accelerator (no ledger);
3. a failure during the step's evaluation (its result is part of the run's history and needs
   every rank) is snapshotted only when the loop gave ``resume(evaluate=...)``: the snapshot
   marks the evaluation pending and the next attempt runs it before its first step;
4. no saved tensor is sharded across ranks (``DTensor``, ``ShardedTensor``): a survivor holds
   the whole state under data parallelism only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from launcher import events, logs
from launcher.checkpoint.record import SNAPSHOT
from launcher.steps import settle_evaluation, settle_steps

if TYPE_CHECKING:
    from launcher.api import FaultTolerant

log = logging.getLogger("launcher")


@dataclass
class Closing:
    """What ``end_step`` still has to record for its boundary when a collective fails during it."""

    step: int
    evals: dict[str, float] | None  # the evaluation record this step gets (None: none)
    due: str | None  # why a checkpoint was due at this step (interval, end of epoch, ...), if one was
    milestone: str | None
    recorded: bool = False  # the evaluation record was made


@dataclass
class Outcome:
    """One survivor's snapshot, or why there is none."""

    step: int | None  # the boundary this survivor held (None: none)
    path: Path | None = None  # the snapshot, when this survivor's landed
    note: str = ""
    seconds: float = 0.0
    pending: bool = False  # taken during the step's evaluation: the next attempt runs it first
    written: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.written = self.path is not None

    def phrase(self) -> str:
        """For the one-line report of a lost peer."""
        if self.written:
            then = " (its evaluation runs again when the job resumes)" if self.pending else ""
            return f"wrote a snapshot of step {self.step} in {self.seconds:.2f} s{then}"
        return self.note


def after_peer_lost(ft: FaultTolerant) -> Outcome:
    """Write a snapshot of the boundary ``ft`` holds if it is clean and complete; never raises."""
    started = time.perf_counter()
    try:
        outcome = _take(ft)
    except Exception as e:  # the failure path must not fail: the latest verified checkpoint remains
        log.warning("No snapshot: writing it failed: %s", e, extra=logs.FILE_ONLY, exc_info=True)
        outcome = Outcome(ft.clean_boundary, note=f"no snapshot: writing it failed ({type(e).__name__}: {e})")
    outcome.seconds = time.perf_counter() - started
    log.info("Snapshot: %s", outcome.phrase(), extra=logs.FILE_ONLY)
    try:
        events.append(ft.run_dir, "snapshot", rank=ft.rank, step=outcome.step,
                      checkpoint=outcome.path.name if outcome.path else None, note=outcome.note,
                      seconds=round(outcome.seconds, 3))
    except OSError as e:
        log.warning("Cannot record the snapshot in events.jsonl: %s", e, extra=logs.FILE_ONLY)
    return outcome


def _take(ft: FaultTolerant) -> Outcome:
    step = ft.clean_boundary
    if step is None:
        return Outcome(ft.step_reached, note="no snapshot: the failure came while the step was changing the state"
                       if ft.started else "no snapshot: training had not begun")
    if step == ft._first_step:
        return Outcome(step, note="no snapshot needed: no step was completed since this attempt's checkpoint")
    pending = ft._evaluating == step  # the evaluation needs every rank: the next attempt runs it
    if pending and ft._evaluate is None:
        return Outcome(step, note=f"no snapshot: the failure came during step {step}'s evaluation (this loop "
                                  f"gave resume() no evaluate= to run it again)")
    agreed = ft._steps.agreed(ft._peer_steps, ft.rank)
    if not agreed.complete:
        return Outcome(step, note=f"no snapshot: step {agreed.missing}'s metrics were not written by every rank "
                                  f"before the failure")
    ft.heartbeat.report(step, "snapshot")  # ftrun waits for a rank that says so (launcher/agent/agent.py)
    p, closing = ft.progress, ft._closing if ft._closing is not None and ft._closing.step == step else None
    carried = [*ft._last_window, *settle_steps(p, agreed.records, ft.steps_per_epoch)]
    evals = closing.evals if closing is not None and closing.evals is not None else {}
    if closing is not None and closing.evals is not None and not closing.recorded:
        carried.append(settle_evaluation(p, step, closing.evals, ft.steps_per_epoch, time.time()))
        if closing.evals:
            ft._early_stop.observe(p.early_stop, closing.evals, step)
    p.unwritten = carried  # the next start writes those metrics.jsonl lacks
    p.eval_pending = step if pending else None
    with ft._ours():
        state = {**ft.state.state(), "progress": p.to_json()}
    if _sharded(state):
        return Outcome(step, note="no snapshot: the state is sharded across ranks (a survivor does not hold all "
                                  "of it)")
    losses = [r["loss"] for r in carried if "loss" in r and r["step"] == step]
    info = ft._record_info(closing.due if closing is not None and closing.due else SNAPSHOT,
                           losses[-1] if losses else None, evals, closing.milestone if closing else None)
    written = ft.manager.save_alone(step, state, info)
    if not written.path:
        return Outcome(step, None, f"no snapshot written: {written.note}")
    return Outcome(step, written.path, written.note, pending=pending)


def _sharded(state: Any) -> bool:
    """Whether a tensor of ``state`` holds only this rank's shard of the data."""
    if isinstance(state, dict):
        return any(_sharded(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return any(_sharded(v) for v in state)
    return isinstance(state, torch.Tensor) and type(state) not in (torch.Tensor, torch.nn.Parameter)
