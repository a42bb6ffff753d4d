"""Retention, triggers and the run-directory lock, with a fake clock and real small checkpoints."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from ckpt_testing import FakeClock, ckpt, make_info, make_state, manager

from launcher.checkpoint import layout, meta
from launcher.checkpoint.layout import Entry, plan_retention
from launcher.checkpoint.manager import CheckpointError, CheckpointManager
from launcher.config import CheckpointConfig, ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

N = layout.checkpoint_name


# ---------------------------------------------------------------- plan_retention (pure)

def entries(*steps: int, bad: tuple[int, ...] = (), milestones: tuple[int, ...] = ()) -> list[Entry]:
    return [Entry(N(s), s, s not in bad, "label" if s in milestones else None) for s in steps]


def test_keeps_the_newest_n_counting_from_the_verified_one():
    every = entries(10, 20, 30, 40, 50)
    assert plan_retention(every, N(50), keep_last=2) == [N(30), N(20), N(10)]
    assert plan_retention(every, N(50), keep_last=5) == []


def test_never_deletes_newer_than_the_verified_one_nor_best_nor_milestones():
    every = entries(10, 20, 30, 40, 50, 60, milestones=(50,))
    # 60 exists but is not the verified one (it failed verification or is being replaced)
    doomed = plan_retention(every, N(40), keep_last=2, keep_every=20, best=N(10))
    assert doomed == []  # 60, 50: newer; 40, 30: last 2; 20: every 20th; 10: best
    assert plan_retention(every, N(40), keep_last=2, keep_every=0, best=None) == [N(20), N(10)]
    assert plan_retention(entries(10, 20, 30, 40, milestones=(10,)), N(40), keep_last=2) == [N(20)]


def test_unverifiable_checkpoints_never_count_and_never_outlive_a_verified_one():
    """30 does not verify: 40 and 20 are the two kept, 30 goes, and so does 10."""
    every = entries(10, 20, 30, 40, bad=(30,))
    assert plan_retention(every, N(40), keep_last=2) == [N(30), N(10)]
    assert plan_retention(every, N(40), keep_last=3) == [N(30)]  # 40, 20, 10 verify
    assert plan_retention(entries(10, 20, 30, 40, bad=(20, 30)), N(40), keep_last=2, best=N(20)) == [N(30)]


def test_ignores_a_newest_name_that_is_not_a_checkpoint():
    assert plan_retention(entries(10, 20, 30), "step_00000030-lr0.01", keep_last=2) == []


def test_keep_last_below_two_is_a_config_error():
    with pytest.raises((ValueError, ConfigError), match="keep_last"):
        CheckpointConfig(keep_last=1)


# ---------------------------------------------------------------- triggers

def test_triggers_interval_epoch_end_request():
    cfg = CheckpointConfig(interval_steps=5, every_epoch=True)
    m = CheckpointManager(Path("/unused"), cfg, clock=FakeClock())
    assert m.due(3, epoch_end=False, final=False, any_rank_wants=False) is None
    assert m.due(5, False, False, False) == "interval"
    assert m.due(7, True, False, False) == "end of epoch"
    assert m.due(8, False, True, False) == "end of training"
    assert not m.local_wants_save()
    m.request()
    assert m.local_wants_save()
    assert m.due(9, False, False, True) == "requested"
    m.mark_saved(9)
    assert m.due(9, True, True, True) is None  # already saved at this step


def test_wall_clock_trigger_with_fake_clock_and_retention_on_disk(tmp_path):
    """Save every 60 s of (fake) wall time; keep 2 + every 20th step + the best."""
    clock = FakeClock()
    run = tmp_path / "run"
    m = manager(run, clock=clock, interval_steps=0, every_epoch=False, interval_seconds=60,
                keep_last=2, keep_every=20)
    val = {10: 0.9, 20: 0.5, 30: 0.2, 40: 0.6, 50: 0.7, 60: 0.8, 70: 0.85}
    saved = []
    for step in range(1, 71):
        clock.advance(6.0)  # 6 s per step: due every 10 steps
        if m.due(step, False, False, m.local_wants_save()):
            m.save(step, make_state(step), make_info(step, val.get(step)))
            saved.append(step)
    m.close()
    assert saved == [10, 20, 30, 40, 50, 60, 70]
    present = layout.scan(m.root)
    # newest 2 (70, 60), milestones (60, 40, 20), best by val_loss (30)
    assert present == [N(70), N(60), N(40), N(30), N(20)]
    info = json.loads((m.root / meta.META).read_text())
    assert info["latest"] == N(70)
    assert info["best"]["name"] == N(30) and info["best"]["value"] == 0.2
    assert all(n in present for n in info["verified"])  # never names a deleted checkpoint
    # best is a pointer into the directory, not a copy
    assert sorted(p.name for p in m.root.iterdir()) == sorted([*present, meta.META])


def test_milestones_and_unverifiable_checkpoints_on_disk(tmp_path, caplog):
    """A milestone (issue 12's stage boundaries) is always kept; a corrupt older checkpoint never
    counts toward keep_last and goes, with a warning, while the verified ones stay."""
    import logging
    m = manager(tmp_path / "run", keep_last=2)
    for step in (10, 20, 30):
        info = make_info(step)
        if step == 10:
            info["milestone"] = "meta-training done"
        m.save(step, make_state(step), info)
    (ckpt(tmp_path / "run", 20) / "__0_0.distcp").write_bytes(b"corrupt")
    m2 = manager(tmp_path / "run", keep_last=2)  # a restart: the last resume's findings count
    assert m2.resolve("auto") == ckpt(tmp_path / "run", 30)
    (ckpt(tmp_path / "run", 30) / "__0_0.distcp").write_bytes(b"x")
    m3 = manager(tmp_path / "run", keep_last=2)
    with caplog.at_level(logging.DEBUG, logger="launcher.checkpoint"):
        assert m3.resolve("auto") == ckpt(tmp_path / "run", 10)  # 30 and 20 do not verify
        m3.save(40, make_state(40), make_info(40))
        m3.close()
    assert layout.scan(m3.root) == [N(40), N(10)]  # 30, 20: unverifiable, gone; 10: the milestone
    assert "Retention: deleting step_00000030, which does not verify" in caplog.text
    m4 = manager(tmp_path / "run", keep_last=2)
    m4.resolve("auto")
    for step in (50, 60):
        m4.save(step, make_state(step), make_info(step))
    m4.close()
    assert layout.scan(m4.root) == [N(60), N(50), N(10)]  # the milestone outlives keep_last
    assert json.loads((ckpt(tmp_path / "run", 10) / "checkpoint.json").read_text())["milestone"] == "meta-training done"


def test_best_mode_max_and_configured_metric(tmp_path):
    m = manager(tmp_path / "run", keep_last=2, best_metric="acc", best_mode="max")
    for step, acc in ((10, 0.5), (20, 0.9), (30, 0.7), (40, 0.8)):
        info = make_info(step)
        info["metrics"] = {"acc": acc}
        m.save(step, make_state(step), info)
    best = json.loads((m.root / meta.META).read_text())["best"]
    assert best["name"] == N(20) and best["metric"] == "acc" and best["mode"] == "max"
    assert layout.scan(m.root) == [N(40), N(30), N(20)]


def test_async_save_is_identical_to_sync_save(tmp_path):
    sync = manager(tmp_path / "sync")
    asyn = manager(tmp_path / "async", async_save=True)
    for step in (10, 20):
        state = make_state(step)
        sync.save(step, state, make_info(step))
        asyn.save(step, state, make_info(step))
        for t in (state["model"]["w"], state["optim"]["state"]["w"]["exp_avg"]):
            t.add_(1.0)  # training goes on and modifies the tensors while the write is in flight
    asyn.close()
    from helpers import assert_bit_equal, checkpoint_tensors
    for step in (10, 20):
        a = checkpoint_tensors(ckpt(tmp_path / "sync", step))
        b = checkpoint_tensors(ckpt(tmp_path / "async", step))
        assert assert_bit_equal(a, b, ("model", "optim", "lr_scheduler", "progress")) == 4


# ---------------------------------------------------------------- lock

HOLDER = textwrap.dedent("""
    import sys, time
    from filelock import FileLock
    lock = FileLock(sys.argv[1]); lock.acquire(timeout=5)
    print("locked", flush=True)
    time.sleep(60)
""")


def _lock_job(run_dir: Path) -> None:
    """Run the training session's lock step on ``run_dir`` without building a whole job."""
    from launcher.startup import lock_run_dir
    lock_run_dir(run_dir, SimpleNamespace(is_main=True, world_size=1)).release()


def _hold_lock(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_job_is_refused_while_a_live_job_holds_the_lock(tmp_path):
    holder = _hold_lock(tmp_path / ".lock")
    try:
        with pytest.raises(CheckpointError, match="in use by another live job"):
            _lock_job(tmp_path)
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_stale_lock_of_a_killed_job_does_not_block(tmp_path):
    holder = _hold_lock(tmp_path / ".lock")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    assert (tmp_path / ".lock").exists()  # the file is left behind, the lock is not
    _lock_job(tmp_path)
