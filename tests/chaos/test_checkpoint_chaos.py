"""Whole encoder runs killed in the middle of a save, or with their newest checkpoint damaged.

Each interrupted run is started again with the same command; it must resume from a verified
checkpoint and end bit-for-bit where an uninterrupted run ends. Failpoints
(``launcher/checkpoint/faults.py``) SIGKILL the process at a named instant of the save.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import PY, REPO, assert_bit_equal, checkpoint_tensors, child_env, run, tail, train_cmd

from launcher.checkpoint import faults, files, layout, meta
from launcher.checkpoint.record import read_record

pytestmark = [pytest.mark.chaos, pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]

FINAL = "step_00000024"  # FAST runs 24 steps; saves at 5, 7, 10, 14, 15, 20, 21, 24
KEYS = ("model", "optim", "lr_scheduler", "rng")


def _train(run_dir: Path, log: Path, nproc: int = 1, extra=(), timeout: float = 240, **env: str) -> int:
    return run(train_cmd("encoder", run_dir, nproc, list(extra)), log, timeout=timeout, env=child_env(**env))


def _final(run_dir: Path) -> dict:
    return checkpoint_tensors(run_dir / "checkpoints" / FINAL)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted single-process run and its final checkpoint's contents."""
    out = tmp_path_factory.mktemp("reference")
    run_dir = out / "run"
    assert _train(run_dir, out / "log") == 0, tail(out / "log")
    return run_dir, _final(run_dir)


def _resumed_from(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if "Resuming from checkpoint:" in line]
    assert lines, tail(log)
    return Path(lines[-1].split("Resuming from checkpoint:")[1].strip()).name


SAVE_AND_DIE = """
import sys
sys.path.insert(0, "tests")
from pathlib import Path
from ckpt_testing import make_info, make_run, make_state, manager
run = Path(sys.argv[1])
make_run(run, steps=(10, 20), **{"async_save": sys.argv[2] == "async"})
m = manager(run, async_save=sys.argv[2] == "async")
m.save(30, make_state(30), make_info(30))
m.close()
"""


@pytest.mark.parametrize("point, mode, survivor", [
    ("mid_shard", "sync", 20), ("after_dcp_save", "async", 20), ("after_manifest", "sync", 20),
    ("after_rename", "async", 30), ("after_meta", "sync", 30),
])
def test_failpoint_leaves_the_old_checkpoint_or_the_new_one(tmp_path, point, mode, survivor):
    """SIGKILL at each instant of a save (of step 30); the next start loads 20 or 30, whole."""
    from ckpt_testing import make_state, manager, template
    run_dir = tmp_path / "run"
    proc = subprocess.run([PY, "-c", SAVE_AND_DIE, str(run_dir), mode], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=child_env(**{faults.ENV: f"{point}:30"}))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    m = manager(run_dir)  # prepare(): removes the interrupted save's leftovers
    path = m.resolve("auto")
    assert path.name == layout.checkpoint_name(survivor)
    state = m.load(path, template())
    import torch
    assert torch.equal(state["model"]["w"], make_state(survivor)["model"]["w"])
    assert not [p for p in m.root.iterdir() if p.name.startswith(layout.TMP_PREFIX)]


def test_killed_during_save_resumes_and_ends_bit_exact(reference, tmp_path):
    """A whole run killed after its shard of step 10 is written; the rerun resumes from step 7."""
    run_dir, log = tmp_path / "run", tmp_path / "log"
    root = run_dir / "checkpoints"
    code = _train(run_dir, log, **{faults.ENV: "after_dcp_save:10"})
    assert code == -signal.SIGKILL, f"expected the failpoint to kill the run, exit {code}\n{tail(log)}"
    assert (root / f"{layout.TMP_PREFIX}step_00000010").is_dir()
    assert json.loads((root / meta.META).read_text())["latest"] == "step_00000007"
    assert _train(run_dir, log) == 0, tail(log)
    assert _resumed_from(log) == "step_00000007"
    assert not [p for p in root.iterdir() if p.name.startswith(layout.TMP_PREFIX)]
    assert assert_bit_equal(reference[1], _final(run_dir), KEYS) > 10


def test_corrupt_latest_then_resume_warns_falls_back_and_ends_bit_exact(reference, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    shutil.copytree(reference[0], run_dir)
    bad = run_dir / "checkpoints" / FINAL / "__0_0.distcp"
    data = bytearray(bad.read_bytes())
    data[len(data) // 3] ^= 0xFF
    bad.write_bytes(bytes(data))
    assert _train(run_dir, log) == 0, tail(log)
    warnings = [line for line in log.read_text().splitlines() if "WARNING" in line]
    assert any(str(bad) in line and "bytes changed" in line for line in warnings), "\n".join(warnings)
    assert _resumed_from(log) == "step_00000021"
    assert files.verify(run_dir / "checkpoints" / FINAL).ok  # rewritten by the resumed run
    assert assert_bit_equal(reference[1], _final(run_dir), KEYS) > 10


def test_nothing_verifies_exits_3_with_clear_message(reference, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    shutil.copytree(reference[0], run_dir)
    names = layout.scan(run_dir / "checkpoints")
    for name in names:
        (run_dir / "checkpoints" / name / "__0_0.distcp").write_bytes(b"")
    assert _train(run_dir, log) == 3, tail(log)
    text = log.read_text()
    assert "No valid checkpoint" in text and all(n in text for n in names)
    assert "Traceback" not in text
    assert all((run_dir / "checkpoints" / n).is_dir() for n in names)  # nothing deleted


def test_tools_on_a_real_run(reference, tmp_path, capsys):
    from launcher import ckpt as tool
    run_dir = reference[0]
    listed = subprocess.run([PY, "-m", "launcher.ckpt", "list", str(run_dir)], cwd=REPO, capture_output=True,
                            text=True, timeout=60, env=child_env())
    assert listed.returncode == 0 and FINAL in listed.stdout and "best" in listed.stdout
    assert tool.main(["verify", str(run_dir)]) == 0
    assert tool.main(["inspect", str(run_dir)]) == 0
    shown = capsys.readouterr().out
    assert "step        24" in shown and "d_model: 16" in shown and "val_loss" in shown
    out = tmp_path / "weights.pt"
    assert tool.main(["export", str(run_dir), str(out)]) == 0
    import torch
    weights = torch.load(out, weights_only=True)
    assert weights.keys() == reference[1]["model"].keys()
    assert all(torch.equal(weights[k], reference[1]["model"][k]) for k in weights)


@pytest.mark.distributed
def test_two_ranks_async_rank1_killed_mid_shard(tmp_path):
    """Rank 1 dies half-way through writing its shard of an async save; the rerun (async
    again) ends bit-exact with an uninterrupted synchronous 2-rank run."""
    ref_dir, run_dir, log = tmp_path / "ref", tmp_path / "run", tmp_path / "log"
    assert _train(ref_dir, tmp_path / "ref.log", nproc=2) == 0, tail(tmp_path / "ref.log")
    asynchronous = ["--set", "checkpoint.async=true"]
    code = _train(run_dir, log, nproc=2, extra=asynchronous, **{faults.ENV: "mid_shard:14:1"})
    assert code != 0, tail(log)
    assert (run_dir / "checkpoints" / f"{layout.TMP_PREFIX}step_00000014").is_dir()
    # The survivor (rank 0) held a later step boundary and wrote it alone (launcher/snapshot.py);
    # the broken save of step 14 is never used either way.
    latest = json.loads((run_dir / "checkpoints" / meta.META).read_text())["latest"]
    assert latest == "step_00000010" or (
        layout.step_of(latest) >= 14 and read_record(run_dir / "checkpoints" / latest).snapshot_rank == 0), latest
    assert _train(run_dir, log, nproc=2, extra=asynchronous) == 0, tail(log)
    assert _resumed_from(log) == latest
    assert assert_bit_equal(_final(ref_dir), _final(run_dir), KEYS) > 10
    # step 21 was written in the background (each rank snapshotting its share of the
    # replicated tensors): the same contents as the synchronous run's step 21.
    info = json.loads((run_dir / "checkpoints" / "step_00000021" / files.INFO).read_text())
    assert info["config"]["checkpoint"]["async"] is True
    step21 = lambda d: checkpoint_tensors(d / "checkpoints" / "step_00000021")  # noqa: E731
    assert assert_bit_equal(step21(ref_dir), step21(run_dir), KEYS) > 10
