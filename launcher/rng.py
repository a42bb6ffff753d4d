"""Per-rank random number generator state, as tensors.

Every rank draws its own dropout masks, noise and sampled tasks, so every rank's RNG state
is saved under its own key (``rng.rank<N>``): DCP de-duplicates equal keys across ranks,
and one shared key would silently keep only one rank's state.

States are stored as tensors rather than pickled objects so that loading them needs no
unpickling of arbitrary Python objects.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) in this process."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture() -> dict[str, torch.Tensor]:
    """This process's RNG states as a flat dict of tensors."""
    version, py_state, gauss = random.getstate()
    kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    out = {
        "python": torch.tensor([version, *py_state], dtype=torch.int64),
        "python_gauss": torch.tensor([0.0 if gauss is None else gauss, float(gauss is not None)],
                                     dtype=torch.float64),
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": torch.tensor([np_pos, np_has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_gauss], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore(state: dict[str, Any]) -> None:
    """Set this process's RNG states from :func:`capture`'s output."""
    py = state["python"].tolist()
    gauss_value, has_gauss = state["python_gauss"].tolist()
    random.setstate((py[0], tuple(py[1:]), gauss_value if has_gauss else None))
    pos, has_np_gauss = state["numpy_pos"].tolist()
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), pos, has_np_gauss,
                         float(state["numpy_gauss"][0])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
