"""Small helpers our trainers share; a user's trainer may use them too."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

# The data order is the launcher's (one owner for what exact resume needs); re-exported here
# for trainers written against this module.
from launcher.exact import average_gradients
from launcher.rng import epoch_permutation, global_batch_indices

__all__ = ["DataError", "all_reduce_mean", "average_gradients", "epoch_permutation", "global_batch_indices",
           "load_module_state", "load_optimizer_state", "module_state", "optimizer_state", "warmup_cosine"]


class DataError(ValueError):
    """A data file that cannot be used, with the file, the place and what was expected."""


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def module_state(module: torch.nn.Module) -> dict:
    """Model weights without DDP's ``module.`` prefix."""
    return get_model_state_dict(module)


def optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter names, so DCP can reshard it."""
    return get_optimizer_state_dict(module, optimizer)


def load_module_state(module: torch.nn.Module, state: dict) -> None:
    set_model_state_dict(module, state)


def load_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(module, optimizer, state)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a no-op cost at world size 1)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = values.device
        # NCCL reduces only CUDA tensors; gloo reduces them where they are.
        work = values.to(f"cuda:{torch.cuda.current_device()}") if dist.get_backend() == "nccl" else values.clone()
        dist.all_reduce(work)
        values = (work / dist.get_world_size()).to(device)
    return values
