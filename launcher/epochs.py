"""Epoch numbering, in one place: the logs, ``metrics.jsonl``, ``checkpoint.json``, ``ckpt list``
and ``inspect`` and the loss plot all number epochs with these functions.

Epochs count from 1. Step ``s`` (the ``s``-th optimizer step, also counting from 1) belongs to
epoch ``(s - 1) // steps_per_epoch + 1``, so with 15 steps per epoch steps 1-15 are epoch 1 and
step 120 is the last step of epoch 8. A checkpoint "at step s" holds the state after step s and
carries that step's epoch: ``step_00000120`` is epoch 8 (complete), ``step_00000020`` is epoch 2
(5 of its 15 steps done).
"""

from __future__ import annotations

from launcher.checkpoint.record import CheckpointRecord


def of_step(step: int, steps_per_epoch: int) -> int:
    """The epoch step ``step`` belongs to (0 for step 0: nothing trained yet)."""
    return 0 if step <= 0 else (step - 1) // steps_per_epoch + 1


def describe(step: int, steps_per_epoch: int) -> str:
    """``"epoch 8 complete"``, ``"epoch 2, 5 of 15 steps done"`` or ``"before epoch 1"``."""
    if step <= 0:
        return "before epoch 1"
    epoch, done = of_step(step, steps_per_epoch), (step - 1) % steps_per_epoch + 1
    if done == steps_per_epoch:
        return f"epoch {epoch} complete"
    return f"epoch {epoch}, {done} of {steps_per_epoch} steps done"


def of_record(record: CheckpointRecord) -> int:
    """The epoch of a checkpoint from its record: recomputed from step and steps per epoch
    (checkpoints written before this numbering stored the number of completed epochs)."""
    if record.steps_per_epoch:
        return of_step(record.step, record.steps_per_epoch)
    return record.epoch
