"""Shared test helpers: launching training jobs on localhost and comparing their results.

Every process a test starts is started in its own session and ended through its own
process group id (never by name), and every wait has a bound.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
RUN = str(REPO / "launcher" / "run.py")

# Small, fast variants of the shipped configs (seconds per run on 2 cores).
ENCODER_FAST = [
    "--set", "data.synthetic_length=1024", "--set", "data.window=16", "--set", "data.batch_size=16",
    "--set", "model.d_model=16", "--set", "model.n_layers=1", "--set", "model.ff_dim=32",
    "--set", "train.max_steps=24", "--set", "checkpoint.interval_steps=5", "--set", "train.log_interval=1",
]
RECOMMENDER_FAST = [
    "--set", "data.synthetic_users=64", "--set", "data.synthetic_items=80", "--set", "data.batch_size=8",
    "--set", "model.dim=8", "--set", "train.max_steps=24", "--set", "meta.steps=12",
    "--set", "checkpoint.interval_steps=5", "--set", "train.log_interval=1",
]
FAST = {"encoder": ENCODER_FAST, "recommender": RECOMMENDER_FAST}


def config_path(trainer: str) -> str:
    return str(REPO / "configs" / f"{trainer}.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "SLURM_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"):
        env.pop(k, None)
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra})
    return env


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def as_lone_process(monkeypatch) -> None:
    """Make this pytest process a lone worker: no launcher, SLURM or ftlaunch variables."""
    for key in list(os.environ):
        if key.startswith(("SLURM_", "TORCHELASTIC_", "FTRUN_", "FTLAUNCH_")) or key in LAUNCHER_VARS:
            monkeypatch.delenv(key)


def train_cmd(trainer: str, run_dir: Path, nproc: int = 1, extra: Sequence[str] = ()) -> list[str]:
    """The command a user runs: plain python for 1 process, torchrun --standalone for more."""
    args = [RUN, "--config", config_path(trainer), "--run-dir", str(run_dir), *FAST[trainer], *extra]
    if nproc == 1:
        return [PY, *args]
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--monitor_interval=0.5", *args]


def start(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own session (its own process group), output to ``log``."""
    with open(log, "ab") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(list(cmd), stdout=f, stderr=subprocess.STDOUT, env=env or child_env(),
                                cwd=REPO, start_new_session=True)


def stop(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 30) -> None:
    """End ``proc`` and everything in its process group (which this test created)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def run(cmd: Sequence[str], log: Path, timeout: float = 240, env: dict[str, str] | None = None) -> int:
    """Run ``cmd`` to completion (bounded); return its exit code."""
    proc = start(cmd, log, env)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{tail(log)}") from None


def tail(log: Path, n: int = 60) -> str:
    try:
        return "\n".join(Path(log).read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def latest_step(run_dir: Path) -> int:
    """Highest step with a complete checkpoint directory (0 if none)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return 0
    steps = [int(p.name[5:]) for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")]
    return max(steps, default=0)


def last_logged_step(run_dir: Path) -> int:
    """The newest step in rank 0's ``metrics.jsonl`` (0 if none; a torn last line is skipped)."""
    from launcher.metrics import read_records
    return max((rec["step"] for rec in read_records(run_dir)), default=0)


def checkpoint_tensors(ckpt_dir: Path) -> dict:
    """Every entry of a DCP checkpoint, read with torch's own ``dcp_to_torch_save``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "state.pt"
        dcp_to_torch_save(str(ckpt_dir), str(out))
        return torch.load(out, weights_only=False)


def flatten(state, prefix: str = "") -> dict:
    out = {}
    if isinstance(state, dict):
        for k, v in state.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(state, (list, tuple)) and any(isinstance(v, (dict, torch.Tensor)) for v in state):
        for i, v in enumerate(state):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = state
    return out


def assert_bit_equal(a: dict, b: dict, keys_prefix: Sequence[str] = ("model", "optim")) -> int:
    """Assert every tensor under ``keys_prefix`` is ``torch.equal`` in both; return how many were compared."""
    fa, fb = flatten(a), flatten(b)
    sel = lambda d: {k: v for k, v in d.items() if k.startswith(tuple(keys_prefix))}  # noqa: E731
    fa, fb = sel(fa), sel(fb)
    assert fa.keys() == fb.keys(), f"different keys: {sorted(set(fa) ^ set(fb))[:10]}"
    compared = 0
    for k in fa:
        va, vb = fa[k], fb[k]
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), f"{k} differs (max abs diff {(va.double() - vb.double()).abs().max()})"
            compared += 1
        else:
            assert va == vb, f"{k}: {va!r} != {vb!r}"
    assert compared > 0, "no tensors compared"
    return compared
