"""The user-defined example trainer (examples/my_trainer.py) trains and resumes exactly through launcher/run.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import PY, REPO, RUN, assert_bit_equal, checkpoint_tensors, run, start, stop, tail

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

SMALL = ["--set", "data.points=128", "--set", "data.batch_size=32", "--set", "model.hidden=16",
         "--set", "checkpoint.interval_steps=10", "--set", "train.log_interval=5"]


def cmd(run_dir: Path, steps: int) -> list[str]:
    return [PY, RUN, "--config", str(REPO / "examples" / "my_trainer.yaml"), "--run-dir", str(run_dir),
            *SMALL, "--set", f"train.max_steps={steps}"]


def test_example_trainer_resumes_bit_exact(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    log = tmp_path / "train.log"
    uninterrupted = start(cmd(whole, 40), tmp_path / "whole.log")
    try:
        assert run(cmd(split, 20), log) == 0, tail(log)
        assert run(cmd(split, 40), log) == 0, tail(log)
        assert uninterrupted.wait(timeout=180) == 0, tail(tmp_path / "whole.log")
    finally:
        stop(uninterrupted)
    text = log.read_text()
    assert "Resumed at step 20 (epoch 4, 2 of 6 steps done" in text  # 205 training points / 32 = 6 steps per epoch
    assert "Config change accepted on resume: train.max_steps: 20 -> 40" in text
    compared = assert_bit_equal(checkpoint_tensors(whole / "checkpoints" / "step_00000040"),
                                checkpoint_tensors(split / "checkpoints" / "step_00000040"))
    assert compared >= 8  # 4 linear layers' weights and biases, and their Adam moments
    summary = json.loads((split / "summary.json").read_text())
    assert summary["resumed_at"] == [20] and summary["best"]["val_accuracy"]["mode"] == "max"
    assert summary["checkpoints"]["best"]["metric"] == "val_accuracy"
