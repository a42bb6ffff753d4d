"""The words a user reads: expected failures, finished runs, epoch numbers, ftrun's console."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from launcher import endings, epochs, finished, logs
from launcher.agent import console
from launcher.checkpoint.files import CheckpointError
from launcher.checkpoint.record import CheckpointRecord
from launcher.config import TrainConfig

GLOO = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:13698: "
        "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the application.")


def test_peer_failures_are_told_apart_from_bugs():
    DistNetworkError = type("DistNetworkError", (RuntimeError,), {})  # torch's class, by name
    assert endings.is_peer_failure(RuntimeError(GLOO))
    assert endings.is_peer_failure(DistNetworkError("Failed to recv, got 0 bytes"))
    try:
        try:
            raise RuntimeError(GLOO)
        except RuntimeError as inner:
            raise CheckpointError("checkpoint save failed") from inner
    except CheckpointError as outer:
        assert endings.is_peer_failure(outer)
    assert not endings.is_peer_failure(ValueError("shape mismatch: [3, 4] vs [4, 3]"))
    assert not endings.is_peer_failure(RuntimeError("CUDA out of memory"))
    assert endings.short_reason(RuntimeError(GLOO)) == "Read error [127.0.0.1]:13698: Connection reset by peer"


def test_interrupted_line():
    assert endings.interrupted_line(31, 28) == \
        "Interrupted at step 31; latest verified checkpoint step 28; run the same command to resume"
    assert endings.interrupted_line(3, None) == \
        "Interrupted at step 3; no verified checkpoint yet; run the same command to start again"


def test_the_same_ctrl_c_delivered_twice_interrupts_once():
    now = [100.0]
    flag = endings.InterruptFlag(clock=lambda: now[0])
    with pytest.raises(KeyboardInterrupt):
        flag._handle(2, None)
    now[0] += 0.3
    flag._handle(2, None)  # forwarded by torchrun/ftrun: ignored
    assert flag.count == 1
    now[0] += 5.0
    with pytest.raises(KeyboardInterrupt):  # the user presses Ctrl-C again while it stops
        flag._handle(2, None)
    assert flag.count == 2 and flag.raised


def test_one_epoch_numbering():
    assert [epochs.of_step(s, 15) for s in (0, 1, 15, 16, 20, 120)] == [0, 1, 1, 2, 2, 8]
    assert epochs.describe(120, 15) == "epoch 8 complete"
    assert epochs.describe(20, 15) == "epoch 2, 5 of 15 steps done"
    # checkpoint.json written before: "epoch" held completed epochs; recomputed from the step
    assert epochs.of_record(CheckpointRecord(step=80, epoch=5, steps_per_epoch=14)) == 6
    assert epochs.of_record(CheckpointRecord(step=45, epoch=3)) == 3


@pytest.mark.parametrize(("train", "hint"), [(TrainConfig(max_steps=120), "--set train.max_steps=240"),
                                             (TrainConfig(epochs=8), "--set train.epochs=9")])
def test_finished_run_message(train, hint):
    path = Path("runs/enc1/checkpoints/step_00000120")
    message = finished.check(train, CheckpointRecord(step=120, steps_per_epoch=15), path)
    assert message.startswith(f"Run already finished at step 120 (checkpoint {path})")
    assert hint in message and "another --run-dir" in message
    assert finished.check(TrainConfig(max_steps=121), CheckpointRecord(step=120, steps_per_epoch=15), path) is None
    assert finished.check(train, CheckpointRecord(step=120), path) is None  # no steps per epoch: the worker decides


def test_ftrun_names_the_nodes_that_left_and_joined():
    before = {"10.0.0.1, ftrun pid 11": 0, "10.0.0.2, ftrun pid 22": 1}
    after = {"10.0.0.1, ftrun pid 11": 0, "10.0.0.3, ftrun pid 33": 1}
    assert console.membership_line(before, after) == (
        "the job re-formed with 2 node(s) after node 1 (10.0.0.2, ftrun pid 22) left and a new node "
        "(10.0.0.3, ftrun pid 33) joined")
    assert console.membership_line(before, dict(before)) is None
    assert console.worker_failure([{"rank": 1, "exit_code": -9, "signal": "SIGKILL"}]) == \
        "worker rank 1 was killed by SIGKILL"


def test_ftrun_console_shows_torch_errors_in_one_line_and_keeps_tracebacks_for_the_file():
    keep = console._Console()
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        exc = sys.exc_info()
    rendezvous = logging.LogRecord("torch.distributed.elastic.rendezvous", logging.ERROR, "x", 1,
                                   "rendezvous failed\nmore detail", None, exc)
    assert keep.filter(rendezvous) and rendezvous.getMessage() == "rendezvous failed" and not rendezvous.exc_info
    worker_exit = logging.LogRecord(console.TORCH_WORKER_EXIT, logging.ERROR, "x", 1, "failed (exitcode: 1)", None, exc)
    warning = logging.LogRecord("torch.distributed.elastic.agent", logging.WARNING, "x", 1, "Received 2", None, None)
    file_only = logging.LogRecord("ftrun", logging.INFO, "x", 1, "summary box", None, None)
    file_only.file_only = True
    assert not any(keep.filter(r) for r in (worker_exit, warning, file_only))
    assert keep.filter(logging.LogRecord("ftrun", logging.WARNING, "x", 1, "ftrun: restarting", None, None))
    # a worker's unhandled error (a bug, not an expected failure) keeps its traceback on the console
    raised = type(console.WORKER_RAISED, (Exception,), {})("-- Process 0 terminated with the following error: ...")
    bug = logging.LogRecord(console.TORCH_WORKER_EXIT, logging.ERROR, "x", 1, "failed (exitcode: 1)", None,
                            (type(raised), raised, None))
    assert keep.filter(bug) and bug.exc_info is not None


def test_rank_log_holds_what_came_before_it_and_expected_tracebacks_stay_off_the_console(tmp_path, capsys):
    log = logging.getLogger("launcher")
    try:
        logs.setup(rank=0)
        log.info("chose checkpoint step_00000010")
        try:
            raise RuntimeError(GLOO)
        except RuntimeError as e:
            log.error("Details", exc_info=e, extra=logs.FILE_ONLY)
        assert not (tmp_path / "logs").exists()  # nothing written before there is work to do
        path = logs.attach_file(0, tmp_path)
        assert logs.attach_file(0, tmp_path) == path  # once
        log.info("training")
        for h in logging.getLogger().handlers:
            h.flush()
        text = path.read_text()
        assert text.count("chose checkpoint") == 1 and text.count("training") == 1 and "Traceback" in text
        err = capsys.readouterr().err
        assert "chose checkpoint" in err and "Traceback" not in err
    finally:
        for h in list(logging.getLogger().handlers):
            logging.getLogger().removeHandler(h)
            h.close()
