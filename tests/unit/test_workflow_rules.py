"""The seeds' workflows in one process: lr schedules across extensions, which lr wins on resume
(config, set-lr, checkpoint) for both trainers, early stopping's count, and milestones kept by retention."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.distributed as dist
from ckpt_testing import ckpt, make_info, make_state, manager
from helpers import FAST, config_path

from launcher import ckpt as tool
from launcher.checkpoint import layout
from launcher.config import load_config
from launcher.early_stop import EarlyStopping
from trainers import resolve_trainer
from trainers.lr import LrControl, LrEntry, WarmupCosine, resolve, set_lr
from trainers.protocol import TrainContext

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


# ---------------------------------------------------------------- the schedule

@pytest.mark.parametrize("at,old,new", [(42, 42, 56), (30, 42, 56), (5, 42, 56), (30, 42, 34), (10, 42, 200)])
def test_extending_a_run_never_makes_the_lr_jump(at, old, new):
    s = WarmupCosine(warmup_steps=10, min_ratio=0.1, total=old)
    before = s.factor(at)
    assert s.retarget(new, at)
    assert s.factor(at) == pytest.approx(before, abs=1e-12)
    after = [s.factor(t) for t in range(at, new + 1)]
    warm = max(0, 10 - at)  # still warming up: the lr rises until the warmup ends, then only falls
    assert all(b <= a + 1e-12 for a, b in zip(after[warm:], after[warm + 1:], strict=False))
    assert after[-1] == pytest.approx(0.1)
    assert max(abs(b - a) for a, b in zip(after[warm:], after[warm + 1:], strict=False)) < 0.25


def test_the_old_rule_jumped_and_restart_is_the_explicit_choice():
    # The case: 42 steps, extended to 56. Recomputing the cosine over the new length
    # (what a plain LambdaLR does) raises the lr at step 42; retarget does not.
    s = WarmupCosine(10, 0.1, 42)
    restretched = WarmupCosine(10, 0.1, 56)
    assert restretched.factor(42) > 2 * s.factor(42)
    s.retarget(56, 42)
    assert s.factor(42) == pytest.approx(0.1) and s.factor(43) == pytest.approx(0.1)
    s.restart(42, 56)
    assert s.factor(42) == pytest.approx(0.1) and s.factor(51) == 1.0 and s.factor(56) == pytest.approx(0.1)
    assert WarmupCosine.from_json(s.to_json()) == s


# ---------------------------------------------------------------- precedence, pure

def entry(config=0.01, override=None, key="optim.lr"):
    return LrEntry(key=key, state_key="optim", config=config, lr=0.5 * (override or config), override=override)


@pytest.mark.parametrize("saved,now,wins,override", [
    (entry(), 0.01, "as in the checkpoint", None),
    (entry(), 0.02, "the config wins", None),
    (entry(override=0.004), 0.01, "the set-lr value in the checkpoint wins", 0.004),
    (entry(override=0.004), 0.02, "the config wins", None),
])
def test_precedence_config_change_then_set_lr_then_checkpoint(saved, now, wins, override):
    kept, why = resolve("model", saved, "optim.lr", now)
    assert kept == override and wins in why
    if override and "config" in wins:
        assert "replaces the set-lr value" in why


def test_set_lr_names_the_optimizer_and_keeps_the_schedule_shape():
    control = LrControl({"model": ("optim.lr", "optim"), "scheduler": ("optim.scheduler_lr", "sched_optim")},
                        {"model": 0.01, "scheduler": 0.001})
    control.record("model", 0.006, "optim.lr", 0.01, next_factor=0.5)  # the next step's schedule factor: 0.5
    control.record("scheduler", 0.001, "optim.scheduler_lr", 0.001)
    state = {"lr_control": control.to_json(), "optim": {"param_groups": [{"lr": 0.005}]},
             "sched_optim": {"param_groups": [{"lr": 0.001}]}}
    with pytest.raises(KeyError, match="model, scheduler; name one with --optimizer"):
        set_lr(state, 0.002)
    with pytest.raises(KeyError, match="no optimizer 'nope'"):
        set_lr(state, 0.002, "nope")
    name, e = set_lr(state, 0.002, "model")
    assert (name, e.override) == ("model", pytest.approx(0.004))  # the next step: 0.004 * 0.5 = 0.002
    assert state["optim"]["param_groups"][0]["lr"] == 0.002 and state["sched_optim"]["param_groups"][0]["lr"] == 0.001


# ---------------------------------------------------------------- precedence, both trainers

@pytest.fixture(scope="module")
def group():
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def fast_config(trainer: str, *extra: str):
    overrides = [a for a in FAST[trainer] if a != "--set"] + list(extra)
    return load_config(config_path(trainer), overrides)


def trainer_at(trainer: str, tmp_path, *extra: str, state=None, step=0):
    cfg = fast_config(trainer, *extra)
    t = resolve_trainer(trainer)()
    t.setup(TrainContext(config=cfg, rank=0, world_size=1, device=torch.device("cpu"), run_dir=tmp_path,
                         fresh=state is None, source=tmp_path / "checkpoints" / "x" if state else None))
    if state is not None:
        t.load_state_dict(state, step=step)
    return t


LR = {"encoder": ("optim.lr", "0.003"), "recommender": ("optim.meta_update_lr", "0.03")}


@pytest.mark.parametrize("trainer", ["encoder", "recommender"])
@pytest.mark.parametrize("case", ["checkpoint", "config", "set-lr", "set-lr then config"])
def test_which_lr_wins_on_resume(trainer, case, group, tmp_path, caplog):
    key, value = LR[trainer]
    first = trainer_at(trainer, tmp_path)
    for step in range(3):
        first.train_step(step)
    state = first.state_dict()
    if "set-lr" in case:
        set_lr(state, 0.0007, "model")
    extra = [f"{key}={float(value) * 2}"] if "config" in case and case != "checkpoint" else []
    with caplog.at_level(logging.INFO, logger="launcher.lr"):
        resumed = trainer_at(trainer, tmp_path, *extra, state=state, step=3)
    lr = resumed.train_step(3)["lr"]
    expected = {"checkpoint": first.train_step(3)["lr"]}  # the lr the next step has without any change
    expected["config"] = expected["checkpoint"] * 2
    expected["set-lr"] = 0.0007  # the next step's lr; a schedule goes on along its shape from it
    expected["set-lr then config"] = expected["config"]
    assert lr == pytest.approx(expected[case], rel=1e-9)
    line = next(r.getMessage() for r in caplog.records if "optimizer 'model'" in r.getMessage())
    assert {"checkpoint": "as in the checkpoint", "config": "the config wins", "set-lr": "set-lr value",
            "set-lr then config": "replaces the set-lr value"}[case] in line


def test_recommender_set_lr_for_its_scheduler_optimizer(group, tmp_path):
    first = trainer_at("recommender", tmp_path)
    first.train_step(0)
    state = first.state_dict()
    set_lr(state, 0.0123, "scheduler")
    resumed = trainer_at("recommender", tmp_path, state=state, step=1)
    resumed.train_step(1)
    assert resumed.scheduler_optimizer.param_groups[0]["lr"] == 0.0123
    assert resumed.optimizer.param_groups[0]["lr"] == 0.03  # the other optimizer is untouched


def test_a_set_lr_override_ends_with_its_phase(group, tmp_path):
    first = trainer_at("recommender", tmp_path, "meta.steps=2")
    first.train_step(0)
    state = first.state_dict()
    set_lr(state, 0.0007, "model")  # made for optim.meta_update_lr
    resumed = trainer_at("recommender", tmp_path, "meta.steps=2", state=state, step=1)
    assert resumed.train_step(1)["lr"] == 0.0007
    assert resumed.train_step(2)["lr"] == resumed.cfg.optim.finetune_lr  # fine-tune phase: its own key


# ---------------------------------------------------------------- the recommender's task set in staged training

def test_task_set_carried_rebuilt_or_refused_with_a_clear_message(group, tmp_path, caplog):
    from trainers.common import DataError
    from trainers.recommender.data import load_tasks

    stage1 = tmp_path / "stage1"
    trainer_at("recommender", stage1)  # a fresh run writes its task set once
    source = stage1 / "checkpoints" / "step_00000024"

    def start(run_dir, *extra, fresh=True):
        cfg = fast_config("recommender", *extra)
        t = resolve_trainer("recommender")()
        t.setup(TrainContext(config=cfg, rank=0, world_size=1, device=torch.device("cpu"), run_dir=run_dir,
                             fresh=fresh, source=source))
        return t

    caplog.set_level(logging.INFO, logger="launcher")
    carried = start(tmp_path / "carry")
    assert carried.fingerprint == load_tasks(stage1 / "tasks").fingerprint()
    assert (tmp_path / "carry" / "tasks" / "tasks.npz").read_bytes() == (stage1 / "tasks" / "tasks.npz").read_bytes()
    assert "Task set carried from" in caplog.text and "the same users held out" in caplog.text
    rebuilt = start(tmp_path / "rebuild", "data.tasks_on_init=rebuild", "train.seed=3")
    assert rebuilt.fingerprint != carried.fingerprint and "Task set rebuilt from this run's data" in caplog.text
    (stage1 / "tasks" / "tasks.npz").unlink()
    with pytest.raises(DataError, match="task set .* is missing.*data.tasks_on_init=rebuild"):
        start(tmp_path / "orphan")
    with pytest.raises(DataError, match="missing, but this run has checkpoints"):
        start(stage1, fresh=False)  # resuming its own checkpoint without its task set


# ---------------------------------------------------------------- early stopping

def test_early_stopping_counts_evaluations_without_improvement():
    stop = EarlyStopping("val_loss", "min", patience=2, min_delta=0.01)
    record = {}
    for step, value in [(10, 1.0), (20, 0.95), (30, 0.945), (40, 0.96)]:
        stop.observe(record, {"val_loss": value}, step)
    assert record == {"best": 0.95, "best_step": 20, "bad": 2} and stop.stopped(record)
    assert "best 0.95 at step 20" in stop.reason(record)
    assert not EarlyStopping("val_loss", "min", patience=3).stopped(record)  # a larger patience trains on
    assert not EarlyStopping("val_loss", "min", patience=0).stopped(record)
    up = EarlyStopping("ndcg", "max", patience=1)
    rec = {}
    up.observe(rec, {"ndcg": 0.2}, 1)
    up.observe(rec, {"ndcg": 0.3}, 2)
    assert rec["bad"] == 0 and rec["best"] == 0.3


# ---------------------------------------------------------------- milestones

def test_milestones_survive_retention_and_prune(tmp_path, capsys):
    m = manager(tmp_path, keep_last=2)
    for step in (10, 20, 30, 40, 50):
        info = make_info(step)
        if step == 20:
            info["milestone"] = "end of meta-learning"
        m.save(step, make_state(step), info)
    m.close()
    assert layout.scan(tmp_path / "checkpoints") == [layout.checkpoint_name(s) for s in (50, 40, 20)]
    m = manager(tmp_path, keep_last=5)  # keeps everything: prune by hand does the same as training
    for step in (60, 70):
        m.save(step, make_state(step), make_info(step))
    m.close()
    assert tool.main(["prune", str(tmp_path), "--keep-last", "2"]) == 0
    assert layout.scan(tmp_path / "checkpoints") == [layout.checkpoint_name(s) for s in (70, 60, 20)]
    assert json.loads((ckpt(tmp_path, 20) / "checkpoint.json").read_text())["milestone"] == "end of meta-learning"
