"""What users see of a run: hooks the training loop calls on rank 0 (and every rank for logs).

The loop calls these methods; implementations (progress bar, TensorBoard, plots, summary)
live behind this one seam so the loop stays short. :class:`Observer` does nothing; a
richer observer subclasses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Observer:
    """No-op base: every hook is optional."""

    def on_start(self, run_dir: Path, start_step: int, total_steps: int, resumed: bool) -> None:
        """Training is about to start (or continue) at ``start_step`` of ``total_steps``."""

    def on_step(self, record: dict[str, Any]) -> None:
        """A logged step finished: every ``log_interval``-th step, and the first and last of an
        attempt. ``record`` is its metrics.jsonl record (step, epoch, loss, lr, time, ...), whose
        values are means over the ranks. Every step has a record in metrics.jsonl; only these
        reach the observer, so showing progress costs nothing on the other steps."""

    def on_eval(self, record: dict[str, Any]) -> None:
        """An epoch ended; ``record`` has step, epoch, train_loss and the evaluation metrics."""

    def on_save(self, step: int, reason: str, seconds: float) -> None:
        """A checkpoint of ``step`` was written (or queued); training was blocked ``seconds``."""

    def on_end(self, summary: dict[str, Any]) -> None:
        """The attempt ended (finished, preempted); ``summary`` describes the run."""

    def close(self) -> None:
        """Release files; called on every exit path."""
