"""A complete user-defined trainer: an MLP classifying points of two interleaved spirals.

Run it like our own trainers (from the repository root, so ``examples`` is importable)::

    python launcher/run.py --config examples/my_trainer.yaml --run-dir runs/spirals
    torchrun --nproc_per_node=2 launcher/run.py --config examples/my_trainer.yaml --run-dir runs/spirals

The YAML names this class as ``trainer: examples.my_trainer:MyTrainer``. It inherits from
nothing of ours: it implements the protocol in ``trainers/protocol.py`` (class attributes
``config_sections``, ``shape_fields`` and ``best``; methods ``setup``, ``steps_per_epoch``,
``train_step``, ``evaluate``, ``state_dict`` and ``load_state_dict``). The launcher owns the
loop, the process group, checkpoints, metrics, TensorBoard and logs. ``docs/own-trainer.md``
walks through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from launcher.config import Checks
from launcher.exact import make_deterministic
from trainers.common import (
    all_reduce_mean,
    global_batch_indices,
    load_module_state,
    load_optimizer_state,
    module_state,
    optimizer_state,
)
from trainers.protocol import TrainContext


@dataclass
class SpiralData:
    """The two-spirals data set, generated from the seed (no files needed)."""

    points: int = 2048  # points per spiral
    noise: float = 0.1  # standard deviation of the noise added to each point (before scaling)
    turns: float = 1.5  # how many times each spiral winds around the origin
    val_fraction: float = 0.2  # share of the points held out for evaluation
    batch_size: int = 64  # global batch (all ranks together); divisible by the world size

    def __post_init__(self) -> None:
        check = Checks("data")
        check(self.points >= 16, "points", self.points, "an integer >= 16")
        check(self.noise >= 0, "noise", self.noise, "a number >= 0")
        check(self.turns > 0, "turns", self.turns, "a number > 0")
        check(0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "a number between 0 and 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check.done()


@dataclass
class SpiralModel:
    """MLP size (changing these on resume is refused: the weights would not fit)."""

    hidden: int = 64  # width of each hidden layer
    layers: int = 3  # hidden layers

    def __post_init__(self) -> None:
        check = Checks("model")
        check(self.hidden >= 1, "hidden", self.hidden, "an integer >= 1")
        check(self.layers >= 1, "layers", self.layers, "an integer >= 1")
        check.done()


@dataclass
class SpiralOptim:
    """Adam with a step decay of the learning rate."""

    lr: float = 0.01  # initial learning rate (a resume applies the config's value)
    decay_every: int = 100  # multiply the lr by decay_factor every this many steps
    decay_factor: float = 0.5  # lr multiplier at each decay

    def __post_init__(self) -> None:
        check = Checks("optim")
        check(self.lr > 0, "lr", self.lr, "a number > 0")
        check(self.decay_every >= 1, "decay_every", self.decay_every, "an integer >= 1")
        check(0 < self.decay_factor <= 1, "decay_factor", self.decay_factor, "a number in (0, 1]")
        check.done()


def two_spirals(points: int, noise: float, turns: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``2 * points`` 2-D points and their spiral (0 or 1), a pure function of the arguments."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(points, generator=g) * turns * 2 * math.pi
    arm = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) / (turns * 2 * math.pi)
    x = torch.cat([arm, -arm]) + noise * torch.randn(2 * points, 2, generator=g) / (turns * 2)
    y = torch.cat([torch.zeros(points), torch.ones(points)]).long()
    order = torch.randperm(2 * points, generator=g)
    return x[order], y[order]


class MyTrainer:
    """Binary classification of the two spirals with an MLP."""

    config_sections = {"data": SpiralData, "model": SpiralModel, "optim": SpiralOptim}
    shape_fields = ("model.",)  # config keys that define tensor shapes
    best = ("val_accuracy", "max")  # the metric that names the best checkpoint

    def setup(self, ctx: TrainContext) -> None:
        cfg = self.cfg = ctx.config
        self.rank, self.world, self.device = ctx.rank, ctx.world_size, ctx.device
        self.report = ctx.step_metrics  # optional: see train_step
        d = cfg.data
        x, y = two_spirals(d.points, d.noise, d.turns, cfg.train.seed)
        n_val = int(len(x) * d.val_fraction)
        self.val_x, self.val_y = x[:n_val], y[:n_val]
        self.train_x, self.train_y = x[n_val:], y[n_val:]
        if len(self.train_x) < d.batch_size:
            raise ValueError(f"data.batch_size = {d.batch_size} exceeds the {len(self.train_x)} training points; "
                             f"lower it or raise data.points")
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        layers: list[nn.Module] = []
        width = 2
        for _ in range(cfg.model.layers):
            layers += [nn.Linear(width, cfg.model.hidden), nn.ReLU()]
            width = cfg.model.hidden
        net = nn.Sequential(*layers, nn.Linear(width, 2)).to(self.device)
        # Exact resume at any world size: DDP averages gradients in rank order (docs/own-trainer.md).
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = make_deterministic(DDP(net, device_ids=device_ids))
        self._build_optimizer()

    def _build_optimizer(self) -> None:
        o = self.cfg.optim
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=o.lr)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, o.decay_every, o.decay_factor)

    def steps_per_epoch(self) -> int:
        return len(self.train_x) // self.cfg.data.batch_size

    def train_step(self, step: int) -> dict[str, float]:
        # The batch is a pure function of (step, seed, world size): a resumed run sees
        # exactly the samples an uninterrupted one would, at any world size.
        idx = global_batch_indices(len(self.train_x), self.cfg.data.batch_size, self.cfg.train.seed, step,
                                   self.rank, self.world)
        x, y = self.train_x[idx].to(self.device), self.train_y[idx].to(self.device)
        self.model.train()
        loss = nn.functional.cross_entropy(self.model(x), y)
        metrics = {"loss": loss.detach(), "lr": self.optimizer.param_groups[0]["lr"]}  # a tensor: no device sync
        # Optional: the values on record before the step's collective and any change of state, so
        # that wherever this rank dies, the surviving ranks' snapshot of the step has them.
        self.report(**metrics)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP, the step's collective
        self.optimizer.step()
        self.scheduler.step()
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy on the held-out points; each rank scores a share, then all agree."""
        self.model.eval()
        mine = torch.arange(self.rank, len(self.val_x), self.world)
        x, y = self.val_x[mine].to(self.device), self.val_y[mine].to(self.device)
        logits = self.model.module(x)
        sums = torch.stack([nn.functional.cross_entropy(logits, y, reduction="sum"),
                            (logits.argmax(1) == y).sum().to(logits.dtype),
                            torch.tensor(float(len(y)), device=logits.device)])
        sums = all_reduce_mean(sums.cpu().double()) * self.world
        return {"val_loss": float(sums[0] / sums[2]), "val_accuracy": float(sums[1] / sums[2])}

    def state_dict(self, weights_only: bool = False) -> dict[str, Any]:
        state: dict[str, Any] = {"model": module_state(self.model)}
        if not weights_only:
            state["optim"] = optimizer_state(self.model, self.optimizer)
            state["lr_scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], weights_only: bool = False, step: int = 0) -> None:
        load_module_state(self.model, state["model"])
        if weights_only:  # --reset-optimizer: fresh Adam and lr schedule
            self._build_optimizer()
            return
        load_optimizer_state(self.model, self.optimizer, state["optim"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        saved_lr = self.scheduler.base_lrs[0]
        if self.cfg.optim.lr != saved_lr:
            # The config's lr wins over the saved one (the launcher logs the change); the
            # decays already applied are kept. Untouched otherwise, so a plain resume is exact.
            for group in self.optimizer.param_groups:
                group["lr"] *= self.cfg.optim.lr / saved_lr
            self.scheduler.base_lrs = [self.cfg.optim.lr for _ in self.optimizer.param_groups]
