"""The lean step loop's bookkeeping (``launcher/steps.py``): when the ranks agree, what they record,
and which records a survivor holds after a peer was lost."""

from __future__ import annotations

import pytest
import torch

from launcher.steps import StepLog


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def others(x: float) -> tuple[float, float]:
    return (1.0, -x) if abs(x) >= 1e15 else (x, x)


def ring_sum():
    """A fake all-reduce over 3 ranks whose order of addition depends on where a value sits.

    As in a ring all-reduce, element ``i`` of an ``n``-element vector is summed starting at rank
    ``3 * i // n``. For a large value ``x`` of rank 0, ranks 1 and 2 hold ``1.0`` and ``-x``, so
    the order decides whether the 1.0 survives: a metric that moved to another position (or a
    vector of another length) would be recorded differently. Small values (times, flags) are
    held by every rank.
    """
    def reduce(vec: torch.Tensor) -> None:
        n = len(vec)
        out = []
        for i, x in enumerate(vec.tolist()):
            vals = [x, *others(x)]
            start = 3 * i // n
            total = 0.0
            for r in range(3):
                total += vals[(start + r) % 3]
            out.append(total)
        vec.copy_(torch.tensor(out, dtype=torch.float64))
    return reduce


def run(step_seconds: float, steps: int = 23, interval: int = 10) -> tuple[list, list[int]]:
    """Records and sync points of ``steps`` steps of rank 0, each taking ``step_seconds``."""
    clock = Clock()
    log = StepLog(3, interval, ring_sum(), sync_seconds=1.0, clock=clock)
    log.start(0)
    records, syncs = [], []
    for n in range(1, steps + 1):
        clock.now += step_seconds
        log.add(n, {"loss": 1e16 * n, "lr": torch.tensor(0.5)}, now=clock.now)
        if log.due(n):
            syncs.append(n)
            records += log.sync(n).records
    return records, syncs


def test_sync_points_first_step_every_interval_and_about_every_second():
    _, fast = run(step_seconds=0.01)
    assert fast == [1, 10, 20], "fast steps: the first step, then every log_interval-th"
    _, slow = run(step_seconds=0.3)
    assert slow[:5] == [1, 4, 7, 10, 13], "0.3 s steps: every 3 steps, so flags wait at most ~1 s"
    _, very_slow = run(step_seconds=2.0)
    assert very_slow == list(range(1, 24)), "steps longer than a second: every step"


def test_recorded_values_do_not_depend_on_the_sync_points():
    """The fixed slots make the float sums identical whatever the agreement schedule was."""
    fast, fast_syncs = run(step_seconds=0.01, steps=20)
    slow, slow_syncs = run(step_seconds=2.0, steps=20)
    assert len(fast_syncs) == 3 and len(slow_syncs) == 20
    assert [s for s, _, _ in fast] == [s for s, _, _ in slow] == list(range(1, 21))
    assert [r for _, r, _ in fast] == [r for _, r, _ in slow]
    assert {r["lr"] for _, r, _ in fast} == {0.5}


def test_flags_of_any_rank_reach_every_rank():
    clock = Clock()
    def two_ranks(vec):  # two ranks holding the same values; summed at once
        vec.mul_(2)

    log = StepLog(2, 10, two_ranks, clock=clock)
    log.start(0)
    log.add(1, {"loss": 1.0}, now=0.0)
    log.add(2, {"loss": 3.0}, now=1.0, wants_save=True)  # any step of the window
    synced = log.sync(2)
    assert synced.wants_save and not synced.preempted
    assert synced.records == [(1, {"loss": 1.0}, 0.0), (2, {"loss": 3.0}, 1.0)]


def test_metric_names_must_stay_the_same_and_be_numbers():
    log = StepLog(1, 10)
    log.start(0)
    log.add(1, {"loss": 1.0, "lr": 0.1}, now=0.0)
    log.add(2, {"lr": 0.1, "loss": 2.0}, now=0.0)  # another order is fine
    with pytest.raises(ValueError, match="metric names changed from loss, lr to loss"):
        log.add(3, {"loss": 1.0}, now=0.0)
    with pytest.raises(ValueError, match=r"loss=\.\.\.\) at step 3: .* got a tensor of 3 values"):
        log.add(3, {"loss": torch.ones(3), "lr": 0.1}, now=0.0)
    with pytest.raises(ValueError, match="set by the loop itself"):
        StepLog(1, 10).add(1, {"loss": 1.0, "epoch": 2}, now=0.0)
    with pytest.raises(ValueError, match="got str"):
        StepLog(1, 10).add(1, {"loss": "low"}, now=0.0)


class Work:
    """A fake agreement in flight: completes when told, or fails (its peer is gone)."""

    def __init__(self):
        self.done, self.error = False, None

    def is_completed(self) -> bool:
        return self.done

    def wait(self) -> None:
        if self.error is not None:
            raise self.error


def test_a_survivor_holds_the_records_whose_agreement_completed():
    """After a peer is lost: the steps every rank shared, oldest first, up to the first that one never sent."""
    works: list[Work] = []

    def reduce(vec):
        works.append(Work())
        return works[-1]

    log = StepLog(2, 10, reduce)
    log.start(0)
    for n in (1, 2, 3):
        log.add(n, {"loss": float(n)}, now=float(n))
    assert log.buffered == [1, 2, 3]
    works[0].done = works[1].done = True
    works[2].done, works[2].error = True, RuntimeError("Connection reset by peer")
    agreed = log.agreed(timeout=0.05)
    assert not agreed.complete and agreed.missing == 3
    assert [s for s, _, _ in agreed.records] == [1, 2]
    works[2].error = None  # this survivor did get every rank's values of step 3
    assert log.agreed(timeout=0.05).complete
    works.append(Work())
    log.add(4, {"loss": 4.0}, now=4.0)  # never completes: the dead rank did not reach it
    late = log.agreed(timeout=0.05)
    assert not late.complete and late.missing == 4 and len(late.records) == 3


def test_a_failed_agreement_raises_at_the_sync_point_and_keeps_the_buffer():
    works: list[Work] = []

    def reduce(vec):
        works.append(Work())
        works[-1].done, works[-1].error = True, RuntimeError("Connection reset by peer")
        return works[-1]

    log = StepLog(2, 10, reduce)
    log.start(0)
    log.add(1, {"loss": 1.0}, now=1.0)
    with pytest.raises(RuntimeError, match="reset by peer"):
        log.sync(1)
    assert log.buffered == [1], "a snapshot still sees what was not agreed"
