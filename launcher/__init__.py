"""ftlaunch: a fault-tolerant distributed training launcher for PyTorch.

Bring your own training loop with ``from launcher import FaultTolerant`` (``docs/own-loop.md``).
The names below are imported on first use, so ``import launcher`` (the ``ftrun`` agent's
import) stays free of torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "FaultTolerant": "launcher.api",
    "run_main": "launcher.api",
    "UsageError": "launcher.api",
    "RegistrationError": "launcher.state",
    "CheckpointError": "launcher.checkpoint.files",
    "global_batch_indices": "launcher.rng",
    "step_generator": "launcher.rng",
    "stream_seed": "launcher.rng",
    "seed_step": "launcher.rng",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'launcher' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
