"""Temporal-encoder pretraining (seed 001): masked reconstruction of a multivariate series.

Train/validation split in time, AdamW with warmup + cosine, gradient clipping, validation
each epoch; the best checkpoint by ``val_loss`` is tracked by the checkpoint manager.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
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
    warmup_cosine,
)
from trainers.encoder.data import DataError, load_series, make_windows, synthetic_series
from trainers.encoder.model import TemporalEncoder, masked_mse
from trainers.protocol import TrainContext


@dataclass
class EncoderData:
    """Where the series comes from and how it is cut into training windows."""

    path: str = ""  # .npy or .csv series [time, channels]; "" = built-in synthetic series
    synthetic_length: int = 4096  # time steps of the synthetic series
    synthetic_channels: int = 8  # channels of the synthetic series
    window: int = 32  # time steps per training window
    stride: int = 8  # time steps between window starts
    val_fraction: float = 0.1  # last part of the series held out for validation
    batch_size: int = 32  # global batch (all ranks together); divisible by the world size
    mask_ratio: float = 0.25  # share of time steps hidden and reconstructed

    def __post_init__(self) -> None:
        check = Checks("data")
        check(self.synthetic_length >= 64, "synthetic_length", self.synthetic_length, "an integer >= 64")
        check(self.synthetic_channels >= 1, "synthetic_channels", self.synthetic_channels, "an integer >= 1")
        check(self.window >= 2, "window", self.window, "an integer >= 2")
        check(self.stride >= 1, "stride", self.stride, "an integer >= 1")
        check(0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "a number between 0 and 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(0 < self.mask_ratio < 1, "mask_ratio", self.mask_ratio, "a number between 0 and 1")
        check.done()


@dataclass
class EncoderModel:
    """Transformer encoder size (changing any of these on resume is refused)."""

    d_model: int = 32  # width of the hidden states
    n_heads: int = 4  # attention heads; must divide d_model
    n_layers: int = 2  # encoder layers
    ff_dim: int = 64  # feed-forward width
    dropout: float = 0.1  # dropout probability

    def __post_init__(self) -> None:
        check = Checks("model")
        check(self.d_model >= 1, "d_model", self.d_model, "an integer >= 1")
        check(self.n_heads >= 1 and self.d_model % max(self.n_heads, 1) == 0, "n_heads", self.n_heads,
              f"a positive divisor of model.d_model ({self.d_model})")
        check(self.n_layers >= 1, "n_layers", self.n_layers, "an integer >= 1")
        check(self.ff_dim >= 1, "ff_dim", self.ff_dim, "an integer >= 1")
        check(0 <= self.dropout < 1, "dropout", self.dropout, "a number in [0, 1)")
        check.done()


@dataclass
class EncoderOptim:
    """AdamW with linear warmup and cosine decay."""

    lr: float = 1e-3  # peak learning rate (may change on resume: fine-tuning)
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_steps: int = 10  # steps of linear warmup
    min_lr_ratio: float = 0.1  # final lr as a fraction of the peak
    grad_clip: float = 1.0  # max gradient norm (0 = no clipping)

    def __post_init__(self) -> None:
        check = Checks("optim")
        check(self.lr > 0, "lr", self.lr, "a number > 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an integer >= 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "a number >= 0")
        check.done()


class EncoderTrainer:
    """Masked-reconstruction pretraining of :class:`TemporalEncoder`."""

    config_sections = {"data": EncoderData, "model": EncoderModel, "optim": EncoderOptim}
    shape_fields = ("model.", "data.window")
    best = ("val_loss", "min")

    def setup(self, ctx: TrainContext) -> None:
        cfg = self.cfg = ctx.config
        self.rank, self.world, self.device = ctx.rank, ctx.world_size, ctx.device
        self.train_x, self.val_x = self._load_windows(cfg)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        m = cfg.model
        net = TemporalEncoder(self.train_x.shape[-1], cfg.data.window, m.d_model, m.n_heads, m.n_layers,
                              m.ff_dim, m.dropout).to(self.device)
        # Gradients averaged in rank order: a resumed run reduces each step as an uninterrupted one did.
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = make_deterministic(DDP(net, device_ids=device_ids))
        self.schedule_offset = 0  # step at which the lr schedule (re)started (--reset-optimizer)
        self._build_optimizer()
        # Each rank draws its own masks and dropout from its own stream, restored on resume.
        torch.manual_seed(cfg.train.seed * 1000 + 1 + self.rank)

    def _load_windows(self, cfg) -> tuple[torch.Tensor, torch.Tensor]:
        d = cfg.data
        series = load_series(d.path) if d.path else synthetic_series(d.synthetic_length, d.synthetic_channels,
                                                                       cfg.train.seed)
        split = int(len(series) * (1 - d.val_fraction))
        train, val = make_windows(series[:split], d.window, d.stride), make_windows(series[split:], d.window, d.stride)
        source = d.path or "the synthetic series"
        if len(train) < d.batch_size or len(val) == 0:
            raise DataError(f"{source}: {len(series)} time steps give {len(train)} training and {len(val)} "
                            f"validation windows of {d.window}; expected at least data.batch_size="
                            f"{d.batch_size} training windows and one validation window (use a longer "
                            f"series, a smaller window or stride)")
        mean, std = train.reshape(-1, train.shape[-1]).mean(0), train.reshape(-1, train.shape[-1]).std(0) + 1e-6
        norm = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32))  # noqa: E731
        return norm(train), norm(val)

    def _build_optimizer(self) -> None:
        o = self.cfg.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    def _lr_factor(self, schedule_step: int) -> float:
        o, total = self.cfg.optim, self.cfg.train.total_steps(self.steps_per_epoch()) - self.schedule_offset
        return warmup_cosine(o.warmup_steps, total, o.min_lr_ratio)(schedule_step)

    def steps_per_epoch(self) -> int:
        return len(self.train_x) // self.cfg.data.batch_size

    def train_step(self, step: int) -> dict[str, float]:
        d = self.cfg.data
        idx = global_batch_indices(len(self.train_x), d.batch_size, self.cfg.train.seed, step, self.rank, self.world)
        x = self.train_x[idx].to(self.device)
        mask = torch.rand(x.shape[:2], device=self.device) < d.mask_ratio
        self.model.train()
        loss = masked_mse(self.model(x, mask), x, mask)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        return {"loss": loss.item(), "lr": lr}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss with fixed masks, each rank taking a share of the windows."""
        self.model.eval()
        g = torch.Generator().manual_seed(self.cfg.train.seed + 7)
        masks = torch.rand(self.val_x.shape[:2], generator=g) < self.cfg.data.mask_ratio
        mine = torch.arange(self.rank, len(self.val_x), self.world)
        x, mask = self.val_x[mine].to(self.device), masks[mine].to(self.device)
        err = ((self.model.module(x, mask) - x) ** 2).mean(-1)
        totals = torch.stack([(err * mask).sum(), mask.sum().to(err.dtype)]) * self.world
        totals = all_reduce_mean(totals.cpu().double())
        return {"val_loss": float(totals[0] / totals[1])}

    def state_dict(self, weights_only: bool = False) -> dict[str, Any]:
        state: dict[str, Any] = {"model": module_state(self.model)}
        if not weights_only:
            state["optim"] = optimizer_state(self.model, self.optimizer)
            state["lr_scheduler"] = self.scheduler.state_dict()
            state["schedule_offset"] = self.schedule_offset
        return state

    def load_state_dict(self, state: dict[str, Any], weights_only: bool = False, step: int = 0) -> None:
        load_module_state(self.model, state["model"])
        if weights_only:
            # --reset-optimizer: fresh AdamW, and the lr schedule starts again from this step.
            self.schedule_offset = step
            self._build_optimizer()
            return
        load_optimizer_state(self.model, self.optimizer, state["optim"])
        self.schedule_offset = int(state["schedule_offset"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        # The config's lr wins over the saved one (fine-tuning with a new learning rate).
        self.scheduler.base_lrs = [self.cfg.optim.lr for _ in self.optimizer.param_groups]
        factor = self._lr_factor(self.scheduler.last_epoch)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * factor
