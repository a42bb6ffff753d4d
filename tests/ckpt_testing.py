"""Small real checkpoints for one-process checkpoint tests (no process group, no trainer)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from launcher.checkpoint.manager import CheckpointManager
from launcher.config import CheckpointConfig

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class FakeClock:
    """Monotonic seconds that only move when a test says so."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_state(step: int) -> dict[str, Any]:
    """A trainer-shaped state whose every value depends on ``step``."""
    g = torch.Generator().manual_seed(step)
    return {
        "model": {"w": torch.randn(64, 32, generator=g), "b": torch.full((32,), float(step))},
        "optim": {
            "state": {"w": {"step": torch.tensor(float(step)), "exp_avg": torch.randn(64, 32, generator=g)}},
            "param_groups": [{"lr": 0.01, "initial_lr": 0.1, "params": ["w", "b"]}],
        },
        "lr_scheduler": {"base_lrs": [0.1], "_last_lr": [0.01], "last_epoch": step},
        "progress": json.dumps({"step": step}),
    }


def template() -> dict[str, Any]:
    """An empty state of the same shape as :func:`make_state`, to load into."""
    state = make_state(0)
    for t in (state["model"]["w"], state["model"]["b"], state["optim"]["state"]["w"]["exp_avg"]):
        t.zero_()
    state["progress"] = ""
    return state


def make_info(step: int, val_loss: float | None = None, lr: float = 0.1) -> dict[str, Any]:
    return {"step": step, "epoch": step // 10, "steps_per_epoch": 10, "loss": 1.0 / step,
            "metrics": {} if val_loss is None else {"val_loss": val_loss},
            "config": {"trainer": "toy", "optim": {"lr": lr}, "train": {"max_steps": 100}},
            "trainer": "toy", "reason": "test", "history": []}


def manager(run_dir: Path, clock=None, **cfg: Any) -> CheckpointManager:
    settings = {"keep_last": 10, **cfg}
    m = CheckpointManager(run_dir, CheckpointConfig(**settings), rank=0, world_size=1, group=None,
                          clock=clock or FakeClock())
    m.prepare()
    return m


def make_run(run_dir: Path, steps=(10, 20, 30), losses=None, **cfg: Any) -> CheckpointManager:
    """A run directory with a verified checkpoint for each step."""
    m = manager(run_dir, **cfg)
    for i, step in enumerate(steps):
        m.save(step, make_state(step), make_info(step, None if losses is None else losses[i]))
    m.close()
    return m


def ckpt(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def shard(run_dir: Path, step: int) -> Path:
    return ckpt(run_dir, step) / "__0_0.distcp"


def failing_saves_worker(rank: int, world: int, port: int, run_dir: str, out_dir: str) -> None:
    """Two ranks save three times: rank 1 fails to checksum its shard, then rank 0 fails to
    commit, then a save succeeds. Each rank writes what every save did to ``out_dir/rank<N>``."""
    import torch.distributed as dist

    from launcher.checkpoint import dcp_io, files
    from launcher.checkpoint.manager import CheckpointError

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.new_group(backend="gloo")
    m = CheckpointManager(Path(run_dir), CheckpointConfig(keep_last=2), rank, world, group, clock=FakeClock())
    m.prepare()
    outcomes = []
    real_describe, real_manifest = dcp_io.describe_written, files.write_manifest

    def broken(*args, **kwargs):
        raise OSError(5, "Input/output error")

    for step, (describe, manifest) in ((1, (broken if rank == 1 else real_describe, real_manifest)),
                                       (2, (real_describe, broken if rank == 0 else real_manifest)),
                                       (3, (real_describe, real_manifest))):
        dcp_io.describe_written, files.write_manifest = describe, manifest
        try:
            m.save(step, make_state(step), make_info(step))
            outcomes.append(f"{step} ok")
        except CheckpointError as e:
            outcomes.append(f"{step} CheckpointError {e}")
    Path(out_dir, f"rank{rank}").write_text("\n".join(outcomes))
    dist.destroy_process_group()
