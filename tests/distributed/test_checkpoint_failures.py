"""A save that fails on one rank fails on every rank, promptly, and the next save still works."""

from __future__ import annotations

import time

import pytest
import torch.multiprocessing as mp
from ckpt_testing import failing_saves_worker
from helpers import free_port

from launcher.checkpoint import files, layout

pytestmark = pytest.mark.distributed


def test_failure_on_one_rank_reaches_every_rank_without_deadlock(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    ctx = mp.start_processes(failing_saves_worker, args=(2, free_port(), str(run_dir), str(out)), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "ranks still running after 120 s: a rank is stuck"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    for rank in (0, 1):
        lines = (out / f"rank{rank}").read_text().splitlines()
        assert lines[0].startswith("1 CheckpointError") and "rank 1: cannot checksum" in lines[0], lines
        assert lines[1].startswith("2 CheckpointError") and "Input/output error" in lines[1], lines
        assert lines[2] == "3 ok", lines
    root = run_dir / "checkpoints"
    assert layout.scan(root) == ["step_00000003"]
    assert files.verify(root / "step_00000003").ok
