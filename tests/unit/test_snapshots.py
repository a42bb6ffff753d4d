"""Just-in-time snapshots in one process: what a survivor writes, what it refuses, and the rules
around it (one snapshot per failure, retention, the carried metrics, ftrun's wait for it).

The survivor is this pytest process holding a one-process ``FaultTolerant`` session; the lost
peer is simulated by calling ``launcher.snapshot.after_peer_lost`` where ``FaultTolerant`` would.
Multi-process kills are in ``tests/distributed/test_snapshot_resume.py`` and
``tests/chaos/test_snapshot_chaos.py``.
"""

from __future__ import annotations

import json
import signal

import pytest
import torch
from helpers import as_lone_process
from test_own_loop_api import build, session

from launcher import events, snapshot
from launcher.agent.progress import wait_for_survivors
from launcher.checkpoint import files, layout
from launcher.checkpoint.layout import Entry, plan_retention
from launcher.checkpoint.record import read_record
from launcher.metrics import MetricsLog, read_records
from launcher.steps import Agreed

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def lone_process(monkeypatch):
    """This pytest process as a lone worker (no launcher variables), its signal handlers kept."""
    as_lone_process(monkeypatch)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def take_steps(ft, model, opt, start: int, stop: int) -> torch.Tensor:
    for step in range(start, stop):
        loss = model(torch.randn(5, 3, generator=ft.generator(step))).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ft.end_step(step, loss=loss.detach(), evals={"val_loss": 1.0 / (step + 1)} if step + 1 == 4 else None)
    return loss


def test_a_survivor_at_a_clean_boundary_writes_a_verified_snapshot_the_next_start_resumes_from(tmp_path):
    model, opt = build()
    with session(tmp_path, log_interval=100) as ft:  # no sync point after the first step: records in flight
        ft.register(model=model, optim=opt)
        take_steps(ft, model, opt, ft.resume(total_steps=10, steps_per_epoch=4), 6)
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        outcome = snapshot.after_peer_lost(ft)
        assert outcome.written and outcome.step == 6, outcome.note
        assert "wrote a snapshot of step 6" in outcome.phrase()
    path = tmp_path / "checkpoints" / "step_00000006"
    check = files.verify(path, expected_run=layout.run_id(path.parent))
    assert check.ok, check.reason()
    record = read_record(path)
    assert (record.snapshot_rank, record.reason) == (0, "snapshot")
    assert json.loads((path.parent / "meta.json").read_text())["latest"] == "step_00000006"
    (ev,) = [e for e in events.read(tmp_path) if e["kind"] == "snapshot"]
    assert ev["checkpoint"] == "step_00000006" and ev["step"] == 6
    # metrics.jsonl had steps 1, 4 (sync points) and the epoch record; the snapshot carried the rest
    model2, opt2 = build()
    with session(tmp_path, log_interval=100) as ft:
        ft.register(model=model2, optim=opt2)
        assert ft.resume(total_steps=10, steps_per_epoch=4) == 6
        assert ft.history[-1]["step"] == 4 and ft.history[-1]["val_loss"] == 0.25
    for k, v in expected.items():
        assert torch.equal(model2.state_dict()[k], v), k
    steps = [r["step"] for r in read_records(tmp_path) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6], "every step once, in order"
    assert [r["step"] for r in read_records(tmp_path) if "train_loss" in r] == [4]


def test_no_snapshot_when_the_step_was_changing_the_state_or_nothing_was_trained(tmp_path):
    model, opt = build()
    with session(tmp_path) as ft:
        ft.register(model=model, optim=opt)
        ft.resume(total_steps=10)
        assert "no snapshot needed" in snapshot.after_peer_lost(ft).note  # the start is the checkpoint
        take_steps(ft, model, opt, 0, 2)
        model(torch.ones(1, 3)).sum().backward()
        opt.step()  # the step under way has changed the weights
        outcome = snapshot.after_peer_lost(ft)
        assert not outcome.written and "while the step was changing the state" in outcome.note
    assert not (tmp_path / "checkpoints" / "step_00000002").exists()


def test_no_snapshot_when_a_steps_metrics_never_reached_every_rank(tmp_path, monkeypatch):
    model, opt = build()
    with session(tmp_path) as ft:
        ft.register(model=model, optim=opt)
        take_steps(ft, model, opt, ft.resume(total_steps=10), 3)
        monkeypatch.setattr(ft._steps, "agreed", lambda peers, rank: Agreed([], False, 3))
        outcome = snapshot.after_peer_lost(ft)
        assert not outcome.written and "step 3's metrics were not written by every rank" in outcome.note
    assert layout.scan(tmp_path / "checkpoints") == []


def test_a_snapshot_at_a_step_with_a_save_due_takes_its_reason(tmp_path):
    """A peer lost during an interval save: the snapshot stands in for it (and retention treats it so)."""
    model, opt = build()
    with session(tmp_path) as ft:
        ft.register(model=model, optim=opt)
        take_steps(ft, model, opt, ft.resume(total_steps=10), 3)
        ft._closing = snapshot.Closing(3, None, "interval", None)
        assert snapshot.after_peer_lost(ft).written
    assert read_record(tmp_path / "checkpoints" / "step_00000003").reason == "interval"


def test_one_snapshot_per_failure_lands(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    first, second = (layout.begin(root, f"step_00000007.snapshot-rank{r}") for r in (0, 1))
    (first / "a").write_text("0")
    (second / "a").write_text("1")
    assert layout.install_new(root, first, "step_00000007")
    assert not layout.install_new(root, second, "step_00000007"), "a second survivor must not replace it"
    assert (root / "step_00000007" / "a").read_text() == "0"


def test_retention_keeps_an_unscheduled_snapshot_only_until_a_newer_checkpoint():
    entries = [Entry("step_00000040", 40, True), Entry("step_00000037", 37, True, snapshot=True),
               Entry("step_00000020", 20, True), Entry("step_00000010", 10, True)]
    assert plan_retention(entries, "step_00000060", keep_last=3) == ["step_00000037", "step_00000010"]
    assert plan_retention(entries[1:], "step_00000040", keep_last=3) == ["step_00000037"]
    scheduled = [Entry("step_00000040", 40, True), Entry("step_00000020", 20, True)]  # e.g. an interval snapshot
    assert plan_retention(scheduled, "step_00000060", keep_last=3) == []


def test_metrics_restore_adds_what_the_file_lacks_once_and_drops_what_came_after(tmp_path):
    log = MetricsLog(tmp_path, enabled=True)
    log.write_many([{"step": s, "loss": float(s), "time": 0.0} for s in (1, 2, 3, 9)])
    log.close()
    carried = [{"step": 3, "loss": 3.0, "time": 0.0}, {"step": 4, "loss": 4.0, "time": 0.0},
               {"step": 4, "train_loss": 2.5, "time": 0.0}, {"step": 5, "loss": 5.0, "time": 0.0}]
    assert MetricsLog(tmp_path, enabled=True).restore(5, carried) == (1, 3)
    assert [(r["step"], "loss" in r) for r in read_records(tmp_path)] == [(1, True), (2, True), (3, True), (4, True),
                                                                          (4, False), (5, True)]
    assert MetricsLog(tmp_path, enabled=True).restore(5, carried) == (0, 0), "never twice"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize("case", ["all end at once", "one writes a snapshot", "one never ends", "snapshot too long"])
def test_ftrun_waits_for_survivors_writing_a_snapshot_and_no_longer(case):
    clock = Clock()
    ends = {"all end at once": (0.0, 0.0), "one writes a snapshot": (0.5, 12.0), "one never ends": (0.5, 1e9),
            "snapshot too long": (0.5, 1e9)}[case]
    writing = case in ("one writes a snapshot", "snapshot too long")

    def alive():
        return {r for r, end in enumerate(ends) if clock.now < end}

    def snapshotting():
        return {1} if writing and clock.now < ends[1] else set()

    wait = wait_for_survivors(alive, snapshotting, grace=5.0, snapshot_grace=60.0, clock=clock, sleep=clock.sleep)
    expected = {"all end at once": (0.0, set()), "one writes a snapshot": (12.0, set()),
                "one never ends": (5.0, {1}), "snapshot too long": (60.0, {1})}[case]
    assert wait.seconds == pytest.approx(expected[0], abs=0.06)
    assert set(wait.left) == expected[1]
    assert set(wait.snapshotting) == ({1} if writing else set())


def test_the_failure_line_says_what_became_of_the_snapshot(tmp_path, caplog):
    from launcher import endings
    from launcher.env import ClusterEnv
    endings.peer_lost(ClusterEnv(kind="torchrun", world_size=2), tmp_path, 7, RuntimeError("Connection reset by peer"),
                      "wrote a snapshot of step 7 in 0.05 s")
    assert "at step 7" in caplog.text and "; wrote a snapshot of step 7 in 0.05 s;" in caplog.text


def test_a_gradient_average_whose_gather_failed_raises(monkeypatch):
    """A survivor never steps on a gradient whose gather failed (its buffer was never filled):
    the failure reaches ``backward()``, at the step boundary, where a snapshot is still exact."""
    from launcher import exact

    class FailedWork:
        def get_future(self):
            fut = torch.futures.Future()
            fut.set_exception(RuntimeError("Connection reset by peer"))
            return fut

    monkeypatch.setattr(exact.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(exact, "_all_gather", lambda *a, **kw: FailedWork())
    with pytest.raises(RuntimeError, match="Connection reset by peer"):
        exact.mean_over_ranks(torch.ones(4)).wait()
