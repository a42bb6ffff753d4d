"""A small transformer encoder pretrained by reconstructing a masked span of a multivariate series.

The task: in each window one contiguous span of time steps is hidden and reconstructed from the
rest. A span (rather than scattered single steps, which linear interpolation between the
neighbours fills almost perfectly) makes the encoder learn the series' dynamics. The model sees
the window normalised by its own visible steps, with the span first filled by linear
interpolation, and learns the correction to that fill.
"""

from __future__ import annotations

import torch
from torch import nn


class TemporalEncoder(nn.Module):
    def __init__(self, channels: int, window: int, d_model: int, n_heads: int, n_layers: int,
                 ff_dim: int, dropout: float, kernel: int = 5):
        super().__init__()
        # Each step is embedded with its neighbours (values and a visible/hidden flag per channel).
        self.embed = nn.Conv1d(2 * channels, d_model, kernel, padding=kernel // 2)
        self.pos = nn.Parameter(torch.randn(window, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, ff_dim, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, channels)

    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """Hidden states ``[B, T, d_model]`` of ``x`` ([B, T, C]) with the steps where ``mask`` is True hidden.

        Also returns the interpolated, window-normalised input and the window statistics.
        Hidden values of ``x`` are never read (they may be NaN).
        """
        mean, std = visible_stats(x, mask)
        filled = linear_fill((torch.where(mask[..., None], 0.0, x) - mean) / std, mask)
        flags = (~mask)[..., None].to(x.dtype).expand_as(filled)
        h = self.embed(torch.cat([filled, flags], -1).transpose(1, 2)).transpose(1, 2)
        return self.encoder(h + self.pos), filled, (mean, std)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``x`` ([B, T, C]) with the time steps where ``mask`` ([B, T]) is True hidden."""
        hidden, filled, (mean, std) = self.encode(x, mask)
        return (filled + self.head(hidden)) * std + mean


def visible_stats(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window, per-channel mean and standard deviation of the visible steps, ``[B, 1, C]`` each."""
    vis = (~mask)[..., None].to(x.dtype)
    x = torch.where(mask[..., None], 0.0, x)
    n = vis.sum(1, keepdim=True).clamp_min(1)
    mean = (x * vis).sum(1, keepdim=True) / n
    var = (((x - mean) * vis) ** 2).sum(1, keepdim=True) / n
    return mean, var.sqrt() + 1e-3


def linear_fill(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with each hidden step replaced by linear interpolation between the nearest visible steps.

    Steps before the first (after the last) visible step take its value. Every window needs at
    least one visible step.
    """
    batch, steps, channels = x.shape
    t = torch.arange(steps, device=x.device).expand(batch, steps)
    visible = ~mask
    left = torch.where(visible, t, -1).cummax(1).values
    right = torch.where(visible, t, steps).flip(1).cummin(1).values.flip(1)
    has_left, has_right = left >= 0, right < steps
    li, ri = left.clamp(0, steps - 1), right.clamp(0, steps - 1)
    x_left = torch.gather(x, 1, li[..., None].expand(batch, steps, channels))
    x_right = torch.gather(x, 1, ri[..., None].expand(batch, steps, channels))
    w = ((t - left) / (right - left).clamp_min(1)).to(x.dtype)[..., None]
    inner = x_left + (x_right - x_left) * w
    edge = torch.where(has_left[..., None], x_left, x_right)
    return torch.where(visible[..., None], x, torch.where((has_left & has_right)[..., None], inner, edge))


def span_masks(batch: int, window: int, span: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[batch, window]`` masks, each hiding one contiguous ``span`` at a uniformly drawn start."""
    starts = torch.randint(0, window - span + 1, (batch, 1), generator=generator)
    t = torch.arange(window)[None]
    return (t >= starts) & (t < starts + span)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked time steps only."""
    err = ((pred - target) ** 2).mean(-1)
    return (err * mask).sum() / mask.sum().clamp_min(1)
