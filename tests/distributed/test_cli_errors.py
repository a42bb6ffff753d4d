"""Bad input gets one clear error and a distinct exit code, and never touches good checkpoints."""

from __future__ import annotations

import hashlib
import subprocess

import numpy as np
import pytest
from helpers import PY, REPO, RUN, child_env, config_path, run, tail, train_cmd

pytestmark = pytest.mark.distributed


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PY, RUN, *args], capture_output=True, text=True, timeout=timeout, env=child_env(), cwd=REPO)


def digest(run_dir) -> str:
    h = hashlib.sha256()
    for p in sorted((run_dir / "checkpoints").rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    log = run_dir.parent / "log"
    assert run(train_cmd("encoder", run_dir, 1, ["--set", "train.max_steps=10"]), log) == 0, tail(log)
    return run_dir


def test_bad_config_value_exits_2_naming_fields(tmp_path):
    r = cli("--config", config_path("encoder"), "--run-dir", str(tmp_path / "r"),
            "--set", "optim.lr=-1", "--set", "model.colour=red")
    assert r.returncode == 2
    assert "optim.lr = -1.0: expected a number > 0" in r.stderr
    assert "model.colour: unknown key" in r.stderr
    assert "Traceback" not in r.stderr


def test_malformed_data_file_exits_2_naming_file_and_line(tmp_path):
    bad = tmp_path / "series.csv"
    bad.write_text("1,2,3\n4,5,6\n7,oops,9\n")
    r = cli("--config", config_path("encoder"), "--run-dir", str(tmp_path / "r"), "--set", f"data.path={bad}")
    assert r.returncode == 2, r.stderr
    assert f"{bad}, line 3" in r.stderr and "Traceback" not in r.stderr


def test_architecture_change_on_resume_is_one_clear_error(trained):
    before = digest(trained)
    r = cli("--config", config_path("encoder"), "--run-dir", str(trained), "--set", "model.d_model=32",
            "--set", "model.ff_dim=48", "--set", "train.max_steps=12")
    assert r.returncode == 3, r.stderr
    assert "model.d_model: checkpoint has 16, config has 32" in r.stderr
    assert "model.ff_dim: checkpoint has 32, config has 48" in r.stderr
    assert "Traceback" not in r.stderr and "size mismatch" not in r.stderr
    assert digest(trained) == before


def test_data_defined_shape_change_names_tensors(trained, tmp_path):
    """A change the config cannot see (channels come from the data) still gives a readable error."""
    before = digest(trained)
    series = tmp_path / "five.npy"
    np.save(series, np.random.default_rng(0).normal(size=(1024, 5)).astype(np.float32))
    cmd = train_cmd("encoder", trained, 1, ["--set", f"data.path={series}", "--set", "train.max_steps=12"])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=child_env(), cwd=REPO)
    assert r.returncode == 3, r.stderr
    assert "does not fit this model" in r.stderr and "model.embed.weight: checkpoint has shape [16, 16, 5]" in r.stderr
    assert digest(trained) == before


def test_resume_none_refuses_to_overwrite(trained):
    before = digest(trained)
    cmd = train_cmd("encoder", trained, 1, ["--resume", "none"])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=child_env(), cwd=REPO)
    assert r.returncode == 3
    assert "--resume none, but" in r.stderr and "already holds" in r.stderr
    assert digest(trained) == before


def test_reset_optimizer_and_new_lr_are_accepted_and_logged(trained, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    (copy / ".lock").unlink(missing_ok=True)
    cmd = train_cmd("encoder", copy, 1, ["--set", "train.max_steps=14", "--set", "optim.lr=0.0005",
                                         "--reset-optimizer"])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=child_env(), cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "Config change accepted on resume: optim.lr: 0.003 -> 0.0005" in r.stderr
    assert "--reset-optimizer: weights loaded; optimizer and lr schedule start fresh at step 10" in r.stderr
    assert (copy / "checkpoints" / "step_00000014").is_dir()


def test_recommender_refuses_a_changed_task_set(tmp_path):
    run_dir = tmp_path / "rec"
    assert run(train_cmd("recommender", run_dir, 1, ["--set", "train.max_steps=6"]), tmp_path / "log") == 0
    z = dict(np.load(run_dir / "tasks" / "tasks.npz"))
    z["users"] = z["users"][::-1].copy()
    np.savez(run_dir / "tasks" / "tasks.npz", **z)
    cmd = train_cmd("recommender", run_dir, 1, ["--set", "train.max_steps=8"])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=child_env(), cwd=REPO)
    assert r.returncode == 2, r.stderr
    assert "does not match the one this run was trained on" in r.stderr
