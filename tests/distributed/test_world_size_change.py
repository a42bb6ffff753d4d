"""A run that resumes at another world size (4 -> 2 -> 3, each a rerun of the same command with
another ``--nproc_per_node``) trains every step once, on exactly the samples of the global batch
an uninterrupted run would use, each sample of it once (bit-exactness cannot hold across sizes:
the gradient sums differ; the data order must not).

``--nnodes=MIN:MAX`` changes go through the same resume (``tests/chaos/test_agent_recovery.py``
shrinks and grows an elastic job).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from helpers import PY, REPO, RUN, child_env, run, tail

from trainers.common import epoch_permutation

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

BATCH = 12  # divisible by 4, 2 and 3
SETTINGS = ["--set", "trainer=recording_trainer:RecordingTrainer", "--set", "data.points=96",
            "--set", f"data.batch_size={BATCH}", "--set", "model.hidden=8", "--set", "model.layers=1",
            "--set", "checkpoint.interval_steps=4", "--set", "train.log_interval=1",
            "--set", "train.eval_every_epoch=false"]
PLAN = [(4, 8), (2, 16), (3, 24)]  # (world size, train.max_steps): each leg resumes where the last ended


def train(run_dir: Path, nproc: int, steps: int, log: Path) -> int:
    cmd = [PY, "-m", "launcher", "--standalone", f"--nproc_per_node={nproc}", "--max_restarts=0", RUN,
           "--config", str(REPO / "examples" / "my_trainer.yaml"), "--run-dir", str(run_dir), *SETTINGS,
           "--set", f"train.max_steps={steps}"]
    env = child_env(PYTHONPATH=str(Path(__file__).parent))
    return run(cmd, log, timeout=180, env=env)


def test_world_size_changes_keep_the_global_batch_of_every_step(tmp_path):
    run_dir = tmp_path / "run"
    for nproc, steps in PLAN:
        log = tmp_path / f"w{nproc}.log"
        assert train(run_dir, nproc, steps, log) == 0, tail(log)
    assert "Resumed at step 8" in (tmp_path / "w2.log").read_text()

    seen: dict[int, dict[int, list[int]]] = defaultdict(dict)  # step -> rank -> indices
    worlds: dict[int, set[int]] = defaultdict(set)
    for path in sorted((run_dir / "samples").glob("rank*.jsonl")):
        rank = int(path.stem[4:])
        for rec in map(json.loads, path.read_text().splitlines()):
            assert rank not in seen[rec["step"]], f"step {rec['step']} trained twice by rank {rank}"
            seen[rec["step"]][rank] = rec["idx"]
            worlds[rec["step"]].add(rec["world"])
    total = PLAN[-1][1]
    assert sorted(seen) == list(range(total)), "every step trained once, none skipped"

    n_train = 2 * 96 - int(2 * 96 * 0.2)  # the example's training points (val_fraction 0.2)
    steps_per_epoch = n_train // BATCH
    epochs: dict[int, list[int]] = defaultdict(list)
    for step, by_rank in seen.items():
        (world,) = worlds[step]
        expected_world = next(w for w, upto in PLAN if step < upto)
        assert world == expected_world and sorted(by_rank) == list(range(world)), (step, world, sorted(by_rank))
        batch = [i for r in range(world) for i in by_rank[r]]  # rank r takes slice r of the global batch
        epoch, k = divmod(step, steps_per_epoch)
        assert batch == epoch_permutation(n_train, 0, epoch)[k * BATCH:(k + 1) * BATCH].tolist(), step
        epochs[epoch] += batch
    for epoch, samples in epochs.items():
        assert len(samples) == len(set(samples)), f"a sample was seen twice in epoch {epoch}"
