"""A small transformer encoder pretrained by masked reconstruction of time steps."""

from __future__ import annotations

import torch
from torch import nn


class TemporalEncoder(nn.Module):
    def __init__(self, channels: int, window: int, d_model: int, n_heads: int, n_layers: int,
                 ff_dim: int, dropout: float):
        super().__init__()
        self.embed = nn.Linear(channels, d_model)
        self.pos = nn.Parameter(torch.randn(window, d_model) * 0.02)
        self.mask_token = nn.Parameter(torch.zeros(d_model))
        layer = nn.TransformerEncoderLayer(d_model, n_heads, ff_dim, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Reconstruct ``x`` ([B, T, C]) with the time steps where ``mask`` ([B, T]) is True hidden."""
        h = self.embed(x)
        h = torch.where(mask[..., None], self.mask_token.expand_as(h), h) + self.pos
        return self.head(self.encoder(h))


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked time steps only."""
    err = ((pred - target) ** 2).mean(-1)
    return (err * mask).sum() / mask.sum().clamp_min(1)
