"""The own-loop API in one process: clear errors, in-place restores, the step contract, the streams.

Each test opens a ``FaultTolerant`` session in this pytest process (a one-process gloo group
on a free loopback port), so what is checked is the public API as a script uses it.
"""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from helpers import as_lone_process
from torch import nn

from launcher import FaultTolerant, RegistrationError, UsageError, events, rng
from launcher.api import run_main
from launcher.checkpoint.files import CheckpointError
from launcher.checkpoint.manager import CheckpointManager
from launcher.metrics import read_records
from launcher.observe import Observer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def lone_process(monkeypatch):
    """This pytest process as a lone worker (no launcher variables), its signal handlers kept."""
    as_lone_process(monkeypatch)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        assert signal.getsignal(s) == handler, f"{s!r} handler not restored by close()"


def session(run_dir, **kw) -> FaultTolerant:
    return FaultTolerant(run_dir, observer=Observer(), checkpoint={"interval_steps": 0, "every_epoch": False},
                         **kw)


def build(width: int = 4):
    torch.manual_seed(0)
    model = nn.Linear(3, width)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, opt


def train(ft: FaultTolerant, model, opt, start: int, total: int) -> None:
    for step in range(start, total):
        g = ft.generator(step)
        loss = model(torch.randn(5, 3, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ft.end_step(step, loss=loss.detach()):
            break


def finished_run(run_dir, total: int = 4, **states):
    """A run of ``total`` steps with a checkpoint at the end; returns its model."""
    model, opt = build()
    with session(run_dir) as ft:
        ft.register(model=model, optim=opt, **states)
        train(ft, model, opt, ft.resume(total_steps=total), total)
    return model


def test_resume_restores_models_optimizers_and_plain_values_in_place(tmp_path):
    stats = {"best": 0.25, "seen": [1, 2]}
    trained = finished_run(tmp_path, stats=stats)
    model, opt = build()
    mine = {"best": math.inf, "seen": []}
    with session(tmp_path) as ft:
        ft.register(model=model, optim=opt, stats=mine)
        assert ft.resuming
        assert ft.resume(total_steps=4) == 4
    assert mine == {"best": 0.25, "seen": [1, 2]}, "the caller's own dict holds the restored values"
    for a, b in zip(trained.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt.state_dict()["state"][0]["step"] == 4


def test_one_optimizer_over_two_registered_models_is_keyed_by_their_names(tmp_path):
    """Seed 002's shape: an encoder and a decoder trained by one AdamW."""
    def build_pair():
        torch.manual_seed(0)
        encoder, decoder = nn.Linear(3, 4), nn.Linear(4, 3)
        return encoder, decoder, torch.optim.AdamW([*encoder.parameters(), *decoder.parameters()], lr=0.1)

    def steps(ft, encoder, decoder, opt, start, total):
        for step in range(start, total):
            loss = decoder(encoder(torch.randn(5, 3, generator=ft.generator(step)))).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            ft.end_step(step, loss=loss.detach())

    encoder, decoder, opt = build_pair()
    with session(tmp_path) as ft:
        ft.register(encoder=encoder, decoder=decoder, optim=opt)
        steps(ft, encoder, decoder, opt, ft.resume(total_steps=3), 3)
    saved = CheckpointManager.saved_shapes(tmp_path / "checkpoints" / "step_00000003")
    assert saved["optim.state.encoder.weight.exp_avg"] == (4, 3)
    assert saved["optim.state.decoder.weight.exp_avg"] == (3, 4)
    fresh = build_pair()
    with session(tmp_path) as ft:
        ft.register(encoder=fresh[0], decoder=fresh[1], optim=fresh[2])
        ft.resume(total_steps=3)
    for a, b in zip([*encoder.parameters(), *decoder.parameters()], [*fresh[0].parameters(), *fresh[1].parameters()],
                    strict=True):
        assert torch.equal(a, b) and torch.equal(opt.state[a]["exp_avg"], fresh[2].state[b]["exp_avg"])


def test_registering_after_resume_is_refused(tmp_path):
    model, opt = build()
    with session(tmp_path) as ft:
        ft.register(model=model)
        ft.resume(total_steps=2)
        with pytest.raises(RegistrationError, match=r"(?s)register\(optim=\.\.\.\) after resume\(\).*before calling"):
            ft.register(optim=opt)


def test_a_state_the_checkpoint_lacks_is_named(tmp_path):
    finished_run(tmp_path)
    model, opt = build()
    with session(tmp_path) as ft:
        ft.register(model=model, optim=opt, ema=nn.Linear(3, 4))
        with pytest.raises(CheckpointError, match=r"(?s)has no state for 'ema'.*it holds model, optim, progress"):
            ft.resume(total_steps=4)


def test_a_changed_shape_is_named_with_both_shapes(tmp_path):
    finished_run(tmp_path)
    model, opt = build(width=6)
    with session(tmp_path) as ft:
        ft.register(model=model, optim=opt)
        with pytest.raises(CheckpointError, match=r"(?s)does not fit.*model\.weight: checkpoint has shape \[4, 3\], "
                                                  r"model has \[6, 3\]"):
            ft.resume(total_steps=4)


def test_a_changed_architecture_setting_is_refused_before_anything_loads(tmp_path):
    model, opt = build()
    with session(tmp_path, config={"width": 4, "lr": 0.1}, shape_keys=("width",)) as ft:
        ft.register(model=model, optim=opt)
        train(ft, model, opt, ft.resume(total_steps=2), 2)
    with pytest.raises(CheckpointError, match=r"width: checkpoint has 4, config has 6"):
        session(tmp_path, config={"width": 6, "lr": 0.1}, shape_keys=("width",))
    with session(tmp_path, config={"width": 4, "lr": 0.2}, shape_keys=("width",)) as ft:  # lr may change
        assert ft.resuming


def test_run_main_turns_a_checkpoint_problem_into_exit_code_3(tmp_path):
    (tmp_path / "checkpoints" / "step_00000002").mkdir(parents=True)  # unverifiable: no manifest

    def main() -> int:
        with session(tmp_path) as ft:
            return ft.exit_code

    assert run_main(main) == 3


@pytest.mark.parametrize("bad, message", [
    (3.5, r"cannot save a float.*dict or list"),
    ({"f": print}, r"plain JSON"),
])
def test_unsaveable_values_are_refused_at_register(tmp_path, bad, message):
    with session(tmp_path) as ft, pytest.raises(RegistrationError, match=message):
        ft.register(value=bad)


def test_a_preemption_signal_writes_the_checkpoint_of_the_step_and_exits_75(tmp_path):
    model, opt = build()

    def main() -> int:
        with session(tmp_path) as ft:
            ft.register(model=model, optim=opt)
            for step in range(ft.resume(total_steps=10), 10):
                if step == 4:
                    os.kill(os.getpid(), signal.SIGUSR1)  # arrives during step 4: saved after it
                train(ft, model, opt, step, step + 1)
                if ft.status:
                    break
        return ft.exit_code

    assert run_main(main) == 75
    meta = json.loads((tmp_path / "checkpoints" / "meta.json").read_text())
    assert (meta["latest"], meta["step"]) == ("step_00000005", 5)
    assert [e["step"] for e in events.read(tmp_path) if e["kind"] == "preempted"] == [5]


def test_optimizer_of_an_unregistered_model_and_reserved_names_are_refused(tmp_path):
    model, opt = build()
    with session(tmp_path) as ft:
        with pytest.raises(RegistrationError, match="reserved"):
            ft.register(progress={})
        ft.register(optim=opt)
        with pytest.raises(RegistrationError, match=r"(?s)belong to no registered model.*register\(model=model"):
            ft.resume(total_steps=2)


def test_calls_out_of_order_say_what_to_do(tmp_path):
    model, opt = build()
    with session(tmp_path) as ft:
        ft.register(model=model, optim=opt)
        with pytest.raises(UsageError, match=r"before resume\(\)"):
            ft.end_step(0, loss=1.0)
        ft.resume(total_steps=3)
        with pytest.raises(UsageError, match="expected step 0"):
            ft.end_step(1, loss=1.0)
        with pytest.raises(UsageError, match="loss is required"):
            ft.end_step(0, accuracy=1.0)
        with pytest.raises(UsageError, match="already called"):
            ft.resume(total_steps=3)
        train(ft, model, opt, 0, 3)
        with pytest.raises(UsageError, match="after the run ended"):
            ft.end_step(3, loss=1.0)


def test_clean_boundary_ends_at_the_first_optimizer_step(tmp_path):
    """The seam for just-in-time snapshots: state is the boundary's until an optimizer steps."""
    model, opt = build()
    with session(tmp_path) as ft:
        ft.register(model=model, optim=opt)
        assert ft.clean_boundary is None  # nothing loaded yet
        ft.resume(total_steps=3)
        assert ft.clean_boundary == 0
        loss = model(torch.ones(2, 3)).sum()
        loss.backward()
        assert ft.clean_boundary == 0, "forward and backward leave saved state alone"
        opt.step()
        assert ft.clean_boundary is None
        ft.end_step(0, loss=loss.detach())
        assert ft.clean_boundary == 1
        ft.mutating()
        assert ft.clean_boundary is None


def test_step_metrics_reported_before_the_optimizer_step_make_the_steps_record(tmp_path):
    """``step_metrics`` (before the optimizer step) then ``end_step(step)``: the same records as
    passing the metrics to ``end_step``."""
    model, opt = build()
    with session(tmp_path / "early") as ft:
        ft.register(model=model, optim=opt)
        ft.resume(total_steps=2)
        with pytest.raises(UsageError, match="loss is required"):
            ft.step_metrics(0, lr=0.1)
        for step in range(2):
            loss = model(torch.ones(2, 3)).sum()
            loss.backward()
            ft.step_metrics(step, loss=loss.detach(), lr=0.1)
            assert ft.clean_boundary == step, "reporting changes nothing saved"
            opt.step()
            ft.end_step(step)
    model, opt = build()
    with session(tmp_path / "late") as ft:
        ft.register(model=model, optim=opt)
        ft.resume(total_steps=2)
        for step in range(2):
            loss = model(torch.ones(2, 3)).sum()
            loss.backward()
            opt.step()
            ft.end_step(step, loss=loss.detach(), lr=0.1)
    strip = lambda d: [{k: v for k, v in r.items() if k != "time"} for r in read_records(d)]  # noqa: E731
    assert strip(tmp_path / "early") == strip(tmp_path / "late")
    assert [r["step"] for r in strip(tmp_path / "late") if "loss" in r] == [1, 2]


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    """One process: stop after 3 of 6 steps (no checkpoint on the way), resume, compare."""
    whole = finished_run(tmp_path / "whole", total=6)
    model, opt = build()
    with FaultTolerant(tmp_path / "split", observer=Observer(), checkpoint={"interval_steps": 3}) as ft:
        ft.register(model=model, optim=opt)
        train(ft, model, opt, ft.resume(total_steps=6), 3)  # the loop leaves early: "stopped"
    assert ft.status == "stopped"
    model, opt = build()
    with session(tmp_path / "split") as ft:
        ft.register(model=model, optim=opt)
        train(ft, model, opt, ft.resume(total_steps=6), 6)
    for a, b in zip(whole.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_streams_are_pure_functions_of_seed_step_rank_and_stream():
    draw = lambda *key: torch.rand(4, generator=rng.step_generator(*key))  # noqa: E731
    assert torch.equal(draw(0, 5, 1, "noise"), draw(0, 5, 1, "noise"))
    others = [(1, 5, 1, "noise"), (0, 6, 1, "noise"), (0, 5, 0, "noise"), (0, 5, 1, "mask")]
    assert all(not torch.equal(draw(0, 5, 1, "noise"), draw(*k)) for k in others)
    assert rng.stream_seed(0, 1, 0) != rng.stream_seed(1, 0, 0), "seed and step must not simply add up"
    rng.seed_step(3, 7, 1)
    first = torch.rand(3)
    torch.rand(10)
    rng.seed_step(3, 7, 1)
    assert torch.equal(first, torch.rand(3))
