"""Early stopping: end a run when its best metric has not improved for ``patience`` evaluations.

The count lives in the loop's progress record, which every checkpoint saves, so a resumed run
counts on where it left off, and a run that stopped early stays stopped when the same command
is run again (it says so instead of training on). Raising ``train.early_stop_patience`` (or
setting it to 0) lets it train on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("launcher")


@dataclass
class EarlyStopping:
    metric: str  # the metric that names the best checkpoint
    mode: str  # "min" or "max"
    patience: int  # evaluations without improvement before stopping (0 = never stop)
    min_delta: float = 0.0  # smallest change that counts as an improvement

    def __post_init__(self) -> None:
        self._warned = False

    def observe(self, record: dict[str, Any], evals: dict[str, float], step: int) -> None:
        """Count one evaluation into ``record`` (the progress record's ``early_stop`` entry)."""
        if not self.patience:
            return
        value = evals.get(self.metric)
        if value is None:
            if not self._warned:
                log.warning("Early stopping watches %s, which the evaluation does not report (it reports %s); "
                            "set checkpoint.best_metric to one of them", self.metric, ", ".join(sorted(evals)))
                self._warned = True
            return
        best = record.get("best")
        if best is None:
            better = True
        else:
            better = value < best - self.min_delta if self.mode == "min" else value > best + self.min_delta
        if better:
            record.update(best=value, best_step=step, bad=0)
        else:
            record["bad"] = int(record.get("bad", 0)) + 1

    def stopped(self, record: dict[str, Any]) -> bool:
        return bool(self.patience) and int(record.get("bad", 0)) >= self.patience

    def reason(self, record: dict[str, Any]) -> str:
        by = f" by more than {self.min_delta:g}" if self.min_delta else ""
        return (f"{self.metric} has not improved{by} for {record.get('bad')} evaluation(s) "
                f"(train.early_stop_patience={self.patience}); best {record.get('best'):.6g} at step "
                f"{record.get('best_step')}")
