"""Temporal-encoder pretraining (seed 001): masked-span reconstruction of a multivariate series.

Train/validation split in time, normalisation statistics from the training part (saved in every
checkpoint, so a package can be built from any of them), AdamW with warmup + cosine, gradient
clipping, validation each epoch next to two simple baselines on the same windows and masks:
linear interpolation across the span and the window's visible mean. The best checkpoint by
``val_loss`` is tracked by the checkpoint manager.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from launcher.config import Checks
from launcher.exact import make_deterministic
from launcher.rng import step_generator
from trainers.common import (
    all_reduce_mean,
    global_batch_indices,
    load_module_state,
    load_optimizer_state,
    module_state,
    optimizer_state,
)
from trainers.encoder.data import DataError, load_series, make_windows, synthetic_series
from trainers.encoder.model import TemporalEncoder, linear_fill, masked_mse, span_masks, visible_stats
from trainers.lr import LrControl, WarmupCosine, resume_schedule
from trainers.protocol import TrainContext

log = logging.getLogger("launcher")


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
    mask_span: int = 8  # length of the contiguous span hidden in each window and reconstructed

    def __post_init__(self) -> None:
        check = Checks("data")
        check(self.synthetic_length >= 64, "synthetic_length", self.synthetic_length, "an integer >= 64")
        check(self.synthetic_channels >= 1, "synthetic_channels", self.synthetic_channels, "an integer >= 1")
        check(self.window >= 2, "window", self.window, "an integer >= 2")
        check(self.stride >= 1, "stride", self.stride, "an integer >= 1")
        check(0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "a number between 0 and 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(1 <= self.mask_span < self.window, "mask_span", self.mask_span,
              f"an integer from 1 to data.window - 1 ({self.window - 1}): some steps must stay visible")
        check.done()


@dataclass
class EncoderModel:
    """Transformer encoder size (changing any of these on resume is refused)."""

    d_model: int = 32  # width of the hidden states
    n_heads: int = 4  # attention heads; must divide d_model
    n_layers: int = 2  # encoder layers
    ff_dim: int = 64  # feed-forward width
    dropout: float = 0.0  # dropout probability
    kernel: int = 5  # time steps the input convolution sees around each step (odd)

    def __post_init__(self) -> None:
        check = Checks("model")
        check(self.d_model >= 1, "d_model", self.d_model, "an integer >= 1")
        check(self.n_heads >= 1 and self.d_model % max(self.n_heads, 1) == 0, "n_heads", self.n_heads,
              f"a positive divisor of model.d_model ({self.d_model})")
        check(self.n_layers >= 1, "n_layers", self.n_layers, "an integer >= 1")
        check(self.ff_dim >= 1, "ff_dim", self.ff_dim, "an integer >= 1")
        check(0 <= self.dropout < 1, "dropout", self.dropout, "a number in [0, 1)")
        check(self.kernel >= 1 and self.kernel % 2 == 1, "kernel", self.kernel, "an odd integer >= 1")
        check.done()


@dataclass
class EncoderOptim:
    """AdamW with linear warmup and cosine decay."""

    lr: float = 0.003  # peak learning rate (may change on resume: fine-tuning; see docs/checkpoints.md)
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
    """Masked-span reconstruction pretraining of :class:`TemporalEncoder`."""

    config_sections = {"data": EncoderData, "model": EncoderModel, "optim": EncoderOptim}
    shape_fields = ("model.", "data.window")
    best = ("val_loss", "min")
    #: State entries a package needs (``python -m launcher.ckpt package``).
    package_keys = ("model", "data_norm")

    def setup(self, ctx: TrainContext) -> None:
        cfg = self.cfg = ctx.config
        self.rank, self.world, self.device = ctx.rank, ctx.world_size, ctx.device
        self.report = ctx.step_metrics
        self.initializing = ctx.fresh and ctx.source is not None  # --init-from: a new run from another's weights
        self.train_x, self.val_x = self._load_windows(cfg)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        m = cfg.model
        net = TemporalEncoder(self.train_x.shape[-1], cfg.data.window, m.d_model, m.n_heads, m.n_layers,
                              m.ff_dim, m.dropout, m.kernel).to(self.device)
        # Gradients averaged in rank order: a resumed run reduces each step as an uninterrupted one did.
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = make_deterministic(DDP(net, device_ids=device_ids))
        o = cfg.optim
        self.schedule = WarmupCosine(o.warmup_steps, o.min_lr_ratio, self._total())
        self.lr_control = LrControl({"model": ("optim.lr", "optim")}, {"model": o.lr})
        self._build_optimizer()
        self._baselines: dict[str, float] | None = None

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
        # The statistics of the training part only: validation data must not leak into them.
        self.norm_mean = torch.from_numpy(series[:split].mean(0).astype(np.float32))
        self.norm_std = torch.from_numpy((series[:split].std(0) + 1e-6).astype(np.float32))
        return self.normalize(torch.from_numpy(train)), self.normalize(torch.from_numpy(val))

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.norm_mean) / self.norm_std

    def _total(self) -> int:
        return self.cfg.train.total_steps(self.steps_per_epoch())

    def _build_optimizer(self) -> None:
        o = self.cfg.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay)

    def steps_per_epoch(self) -> int:
        return len(self.train_x) // self.cfg.data.batch_size

    def train_step(self, step: int) -> dict[str, float]:
        d, seed = self.cfg.data, self.cfg.train.seed
        idx = global_batch_indices(len(self.train_x), d.batch_size, seed, step, self.rank, self.world)
        x = self.train_x[idx].to(self.device)
        # The step's masks from its own stream, a function of (seed, step, rank): nothing to save, and
        # any rank's checkpoint restores every rank's draws. Dropout draws from the global generators,
        # which the loop seeds for each step the same way (launcher/rng.py).
        g = step_generator(seed, step, self.rank, "masks")
        mask = span_masks(len(idx), d.window, d.mask_span, g).to(self.device)
        self.model.train()
        loss = masked_mse(self.model(x, mask), x, mask)
        lr = self.lr_control.base("model", self.cfg.optim.lr) * self.schedule.factor(step)
        metrics = {"loss": loss.detach(), "lr": lr}  # a tensor: no device sync here (on CUDA)
        # The step's values are known: on record before its collective and any change of state, so
        # that the survivors' snapshot has them whenever this rank dies (the step contract).
        self.report(**metrics)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # the step's collective (the exact gradient average); saved state is untouched so far
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        # Saved state changes from here on, after the last collective: a peer lost before this point
        # leaves this rank at the step boundary, from which a snapshot can be written.
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.lr_control.record("model", lr, "optim.lr", self.cfg.optim.lr, self.schedule.factor(step + 1))
        self.optimizer.step()
        return metrics

    # ------------------------------------------------------------------ evaluation

    def _val_masks(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.cfg.train.seed + 7)
        return span_masks(len(self.val_x), self.cfg.data.window, self.cfg.data.mask_span, g)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Masked MSE on the validation windows (fixed masks), each rank taking a share of them,
        next to the same error of linear interpolation and of the window's visible mean."""
        self.model.eval()
        mask = self._val_masks()
        mine = torch.arange(self.rank, len(self.val_x), self.world)
        x, m = self.val_x[mine].to(self.device), mask[mine].to(self.device)
        if self._baselines is None:  # they do not change while training: computed once
            mean, _ = visible_stats(x, m)
            self._baselines = {"val_loss_linear_interp": self._reduce_mse(linear_fill(x, m), x, m),
                               "val_loss_window_mean": self._reduce_mse(mean.expand_as(x), x, m)}
        return {"val_loss": self._reduce_mse(self.model.module(x, m), x, m), **self._baselines}

    def _reduce_mse(self, pred: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> float:
        err = ((pred - x) ** 2).mean(-1)
        totals = torch.stack([(err * mask).sum(), mask.sum().to(err.dtype)]) * self.world
        totals = all_reduce_mean(totals.cpu().double())
        return float(totals[0] / totals[1])

    # ------------------------------------------------------------------ state

    def state_dict(self, weights_only: bool = False) -> dict[str, Any]:
        state: dict[str, Any] = {"model": module_state(self.model),
                                 "data_norm": {"mean": self.norm_mean.clone(), "std": self.norm_std.clone()}}
        if not weights_only:
            state["optim"] = optimizer_state(self.model, self.optimizer)
            state["lr_schedule"] = self.schedule.to_json()
            state["lr_control"] = self.lr_control.to_json()
        return state

    def load_state_dict(self, state: dict[str, Any], weights_only: bool = False, step: int = 0,
                        restart_schedule: bool = False) -> None:
        load_module_state(self.model, state["model"])
        self._check_norm(state["data_norm"])
        if weights_only:
            # --reset-optimizer / --init-from: fresh AdamW, and the lr schedule starts again at this step.
            self.schedule.restart(step, self._total())
            self._build_optimizer()
            return
        load_optimizer_state(self.model, self.optimizer, state["optim"])
        if self.initializing:
            self.schedule.restart(step, self._total())  # a new run: its own schedule and lr
            return
        self.schedule = WarmupCosine.from_json(state["lr_schedule"])
        resume_schedule(self.schedule, self._total(), step, restart_schedule)
        self.lr_control.load(state["lr_control"], {"model": ("optim.lr", self.cfg.optim.lr)})

    def _check_norm(self, saved: dict[str, torch.Tensor]) -> None:
        """The data's normalisation must be the one the weights were trained with, or say so."""
        if not (torch.allclose(saved["mean"], self.norm_mean) and torch.allclose(saved["std"], self.norm_std)):
            log.warning(
                "The series' normalisation statistics differ from the checkpoint's (the data changed since): "
                "training goes on with this data's statistics; a package built from a later checkpoint "
                "records them")

    # ------------------------------------------------------------------ packages

    @classmethod
    def package_meta(cls, state: dict[str, Any], info: dict[str, Any], run_dir: Path | None) -> dict[str, Any]:
        """What a package needs besides the weights: the normalisation of the raw series."""
        norm = state["data_norm"]
        return {"normalization": {"mean": norm["mean"].tolist(), "std": norm["std"].tolist()}}

    @classmethod
    def from_package(cls, config, weights: dict[str, torch.Tensor], meta: dict[str, Any]):
        from trainers.encoder.package import EncoderPackage
        return EncoderPackage.build(config, weights, meta)

