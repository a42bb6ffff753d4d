"""The lean step loop's bookkeeping (``launcher/steps.py``): when the ranks agree, what they record,
and what a survivor rebuilds from the other ranks' step ledgers."""

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


def three_ranks(vec: torch.Tensor) -> torch.Tensor:
    """A fake all-gather over 3 ranks. For a large value ``x`` of rank 0, ranks 1 and 2 hold ``1.0``
    and ``-x``: summed in rank order the 1.0 is lost, in another order it survives, so a sum whose
    order depended on where a value sits (or on the sync points) would show."""
    def other(v: float, r: int) -> float:
        if abs(v) < 1e15:
            return v
        return 1.0 if r == 1 else -v
    rows = [vec.tolist()] + [[other(v, r) for v in vec.tolist()] for r in (1, 2)]
    return torch.tensor(rows, dtype=torch.float64)


def run(step_seconds: float, steps: int = 23, interval: int = 10) -> tuple[list, list[int]]:
    """Records and sync points of ``steps`` steps of rank 0, each taking ``step_seconds``."""
    clock = Clock()
    log = StepLog(3, interval, three_ranks, sync_seconds=1.0, clock=clock)
    log.start(0)
    records, syncs = [], []
    for n in range(1, steps + 1):
        clock.now += step_seconds
        log.add(n, {"loss": 1e16 * n, "lr": torch.tensor(0.5)}, now=clock.now)
        if log.due(n):
            syncs.append(n)
            records += log.sync(n, wants_save=False, preempted=False).records
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
    log = StepLog(2, 10, lambda vec: torch.stack([vec, vec]), clock=clock)  # two ranks holding the same values
    log.start(0)
    log.add(1, {"loss": 1.0}, now=0.0)
    synced = log.sync(1, wants_save=True, preempted=False)
    assert synced.wants_save and not synced.preempted
    assert synced.records == [(1, {"loss": 1.0}, 0.0)]


def test_metric_names_must_stay_the_same_and_be_numbers():
    log = StepLog(1, 10)
    log.start(0)
    log.add(1, {"loss": 1.0, "lr": 0.1}, now=0.0)
    log.add(2, {"lr": 0.1, "loss": 2.0}, now=0.0)  # another order is fine
    with pytest.raises(ValueError, match="metric names changed from loss, lr to loss"):
        log.add(3, {"loss": 1.0}, now=0.0)
    log.add(3, {"loss": torch.ones(3), "lr": 0.1}, now=0.0)
    with pytest.raises(ValueError, match=r"loss=\.\.\.\) at step 3: .* got a tensor of 3 values"):
        log.sync(3, wants_save=False, preempted=False)
    with pytest.raises(ValueError, match="set by the loop itself"):
        StepLog(1, 10).add(1, {"loss": 1.0, "epoch": 2}, now=0.0)
    text = StepLog(1, 10)
    text.add(1, {"loss": "low"}, now=0.0)
    with pytest.raises(ValueError, match="got str"):
        text.sync(1, wants_save=False, preempted=False)


def test_a_survivor_rebuilds_the_steps_since_the_sync_point_from_the_ledgers(tmp_path):
    """The records a survivor rebuilds equal, bit for bit, what the next sync point would have recorded."""
    from launcher.steps import StepLedger
    token = "attempt-1"
    logs = [StepLog(3, 10, three_ranks, ledger=StepLedger(tmp_path, r, token)) for r in range(3)]
    loss = {0: lambda n: 1e16 * n, 1: lambda n: 1.0, 2: lambda n: -1e16 * n}  # as three_ranks fakes them
    for log in logs:
        log.start(0)
    for n in (1, 2, 3):
        for r, log in enumerate(logs):
            log.add(n, {"loss": loss[r](n), "lr": torch.tensor(0.5)}, now=float(n))
    peers = lambda r: StepLedger.read(tmp_path, r, token, 2)  # noqa: E731
    rebuilt = logs[2].agreed(peers, rank=2)  # its own values first would keep a 1.0 rank order loses
    assert rebuilt.complete and [s for s, _, _ in rebuilt.records] == [1, 2, 3]
    synced = logs[0].sync(3, wants_save=False, preempted=False).records  # rank 0's view of the same steps
    assert [r for _, r, _ in rebuilt.records] == [r for _, r, _ in synced]
    assert StepLedger.read(tmp_path, 2, "another attempt", 2) == {}, "a stale ledger is not read"
    with open(tmp_path / "rank2.bin", "ab") as f:  # rank 2 dies half-way through writing step 4
        f.write(b"\x04\x00\x00")
    logs[1].add(4, {"loss": 4.0, "lr": 0.5}, now=4.0)
    late = logs[1].agreed(peers, rank=1)
    assert not late.complete and late.missing == 4 and len(late.records) == 3


def test_values_reported_early_reach_the_survivors_before_the_step_ends(tmp_path):
    """A rank that reports its step's values before its optimizer step (``step_metrics``) and dies
    in that optimizer step has left them in its ledger: the survivor's step is complete."""
    from launcher.steps import StepLedger
    token = "attempt-1"
    logs = [StepLog(2, 10, ledger=StepLedger(tmp_path, r, token)) for r in range(2)]
    for log in logs:
        log.start(0)
    peers = lambda r: StepLedger.read(tmp_path, r, token, 2)  # noqa: E731
    logs[1].add_early(1, {"loss": 3.0, "lr": 0.5})  # rank 1 reports, then dies in its optimizer step
    logs[0].add_early(1, {"loss": 1.0, "lr": 0.5})
    logs[0].add(1, {"loss": torch.tensor(9.0), "lr": 0.5}, now=1.0)  # end_step: the early values are kept
    rebuilt = logs[0].agreed(peers, rank=0)
    assert rebuilt.complete and rebuilt.records == [(1, {"loss": 2.0, "lr": 0.5}, 1.0)]
    assert logs[0].has_early(1) is False, "taken by add()"
    assert StepLedger.read(tmp_path, 0, token, 2) == {1: (1.0, 0.5)}, "written once, at the early report"

    late = StepLog(2, 10, ledger=StepLedger(tmp_path / "b", 1, token))  # without the early report: missing
    late.start(0)
    logs2 = StepLog(2, 10, ledger=StepLedger(tmp_path / "b", 0, token))
    logs2.start(0)
    logs2.add(1, {"loss": 1.0, "lr": 0.5}, now=1.0)
    assert logs2.agreed(lambda r: StepLedger.read(tmp_path / "b", r, token, 2), rank=0).missing == 1

    with pytest.raises(ValueError, match="reported as loss, lr and now as loss"):
        logs[1].add(1, {"loss": 3.0}, now=1.0)
