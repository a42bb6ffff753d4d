"""Running a packaged temporal encoder on raw series (``launcher.package.load_package``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from trainers.encoder.model import TemporalEncoder, span_masks


@dataclass
class EncoderPackage:
    """The trained encoder in eval mode, its config, and the normalisation of the raw series.

    Inputs are raw series windows ``[T, C]`` or ``[B, T, C]`` in the units of the training data,
    ``T = config.data.window``; the normalisation statistics are applied and undone here.
    """

    model: TemporalEncoder
    config: Any  # launcher.config.RunConfig
    info: dict[str, Any]  # package.json
    mean: torch.Tensor  # [C] of the training part of the series
    std: torch.Tensor  # [C]

    @classmethod
    def build(cls, config, weights: dict[str, torch.Tensor], meta: dict[str, Any]) -> EncoderPackage:
        norm = meta["normalization"]
        mean = torch.tensor(norm["mean"], dtype=torch.float32)
        std = torch.tensor(norm["std"], dtype=torch.float32)
        m = config.model
        model = TemporalEncoder(len(mean), config.data.window, m.d_model, m.n_heads, m.n_layers, m.ff_dim,
                                m.dropout, m.kernel)
        model.load_state_dict(weights, strict=True)
        return cls(model.eval(), config, meta, mean, std)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.mean) / self.std

    def denormalize(self, values: torch.Tensor) -> torch.Tensor:
        return values * self.std + self.mean

    def _batch(self, series, mask) -> tuple[torch.Tensor, torch.Tensor, bool]:
        x = torch.as_tensor(series, dtype=torch.float32)
        single = x.dim() == 2
        x = x[None] if single else x
        window, channels = self.config.data.window, len(self.mean)
        if x.dim() != 3 or x.shape[1:] != (window, channels):
            raise ValueError(f"expected a window of shape [{window}, {channels}] or a batch [B, {window}, "
                             f"{channels}] (config.data.window steps, one column per channel); got {list(x.shape)}")
        if mask is None:
            mask = torch.zeros(x.shape[:2], dtype=torch.bool)
        mask = torch.as_tensor(mask, dtype=torch.bool)
        mask = mask[None] if mask.dim() == 1 else mask
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask of shape {list(mask.shape)}; expected {list(x.shape[:2])} (True = hidden step)")
        if mask.all(1).any():
            raise ValueError("every window needs at least one visible step (mask all True)")
        return x, mask, single

    @torch.no_grad()
    def reconstruct(self, series, mask) -> torch.Tensor:
        """``series`` with the steps where ``mask`` is True reconstructed, in raw units.

        Hidden values are never read (they may be NaN). Visible steps are returned as the
        model's reconstruction too; take ``torch.where(mask[..., None], out, series)`` to keep them.
        """
        x, m, single = self._batch(series, mask)
        out = self.denormalize(self.model(self.normalize(x), m))
        return out[0] if single else out

    @torch.no_grad()
    def encode(self, series, mask=None) -> torch.Tensor:
        """Hidden states ``[T, d_model]`` (or ``[B, T, d_model]``) of raw windows, for downstream use."""
        x, m, single = self._batch(series, mask)
        hidden = self.model.encode(self.normalize(x), m)[0]
        return hidden[0] if single else hidden

    def span_masks(self, batch: int, seed: int = 0) -> torch.Tensor:
        """Masks like the ones the encoder was trained with (one span of ``data.mask_span`` steps)."""
        g = torch.Generator().manual_seed(seed)
        return span_masks(batch, self.config.data.window, self.config.data.mask_span, g)
