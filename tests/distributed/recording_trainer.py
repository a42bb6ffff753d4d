"""The example trainer (examples/my_trainer.py), also writing down the samples each rank trains on.

``RUN_DIR/samples/rank<R>.jsonl``: one line per step, ``{"step", "world", "idx"}``. Used by
``test_world_size_change.py`` (a worker imports it through ``PYTHONPATH``).
"""

from __future__ import annotations

import json

from examples.my_trainer import MyTrainer
from trainers.common import global_batch_indices


class RecordingTrainer(MyTrainer):
    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.record = ctx.run_dir / "samples" / f"rank{ctx.rank}.jsonl"
        self.record.parent.mkdir(parents=True, exist_ok=True)

    def train_step(self, step: int) -> dict[str, float]:
        idx = global_batch_indices(len(self.train_x), self.cfg.data.batch_size, self.cfg.train.seed, step,
                                   self.rank, self.world)
        with open(self.record, "a") as f:
            f.write(json.dumps({"step": step, "world": self.world, "idx": idx.tolist()}) + "\n")
        return super().train_step(step)
