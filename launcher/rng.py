"""Random numbers a resume can reproduce: the data order and per-step streams. No saved state.

* **The data order** (:func:`global_batch_indices`) is a pure function of the seed and the
  step: the global batch of step ``s`` is the same whatever happened before, and rank ``r``
  takes slice ``r`` of it, so a resumed run trains on exactly the samples an uninterrupted
  run would, at any world size.
* **Per-step streams** (:func:`stream_seed`, :func:`step_generator`, :func:`seed_step`) are a
  pure function of ``(seed, step, rank, stream)``. ``FaultTolerant`` seeds python's, numpy's and
  torch's global generators with :func:`seed_step` at every step boundary, so every draw of a
  step (dropout, masks, sampling) is one too, and trainers that want named streams take
  :func:`step_generator`. Nothing random is saved in a checkpoint, so any rank's checkpoint
  (a survivor's snapshot, ``launcher/snapshot.py``) restores every rank's draws exactly, and a
  resume at another world size gives each rank well-defined streams: rank ``r`` at step ``s``
  draws from ``(seed, s, r)`` whatever the world size before.

Checkpoints written before this scheme hold each rank's generator states (``rng.rank<N>``);
they are left unread.
"""

from __future__ import annotations

import hashlib
import random
from functools import lru_cache

import numpy as np
import torch

DEFAULT_STREAM = "default"
GLOBAL_STREAM = "global"  # the stream that seed_step() puts into the global generators


# ---------------------------------------------------------------------------- data order

@lru_cache(maxsize=2)
def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the ``n`` training samples in ``epoch``: a pure function of its arguments."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def global_batch_indices(n: int, global_batch: int, seed: int, step: int, rank: int, world: int) -> torch.Tensor:
    """Sample indices this rank trains on at ``step``.

    The global batch (``global_batch`` samples) at each step depends only on the step and the
    seed; rank ``r`` takes slice ``r`` of it. The data position is therefore the global sample
    count ``step * global_batch`` whatever the world size, so a job that resumes at a
    different world size neither skips nor repeats a sample.
    """
    if global_batch % world:
        raise ValueError(f"the global batch size {global_batch} (data.batch_size in our configs) must be "
                         f"divisible by the world size {world}; choose a multiple of {world}")
    if n < global_batch:
        raise ValueError(f"{n} training samples cannot fill one global batch of {global_batch}; "
                         f"use a smaller batch size or more data")
    spe = n // global_batch
    epoch, k = divmod(step, spe)
    batch = epoch_permutation(n, seed, epoch)[k * global_batch:(k + 1) * global_batch]
    per = global_batch // world
    return batch[rank * per:(rank + 1) * per]


# ---------------------------------------------------------------------------- per-step streams

def stream_seed(seed: int, step: int, rank: int, stream: str = DEFAULT_STREAM) -> int:
    """A 63-bit seed that is a pure function of ``(seed, step, rank, stream)``.

    A cryptographic hash mixes the four, so neighbouring steps, ranks and streams get
    unrelated seeds (``seed + step`` would make run A's step 1 equal to run B's step 0).
    """
    digest = hashlib.blake2b(f"{seed}/{step}/{rank}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def step_generator(seed: int, step: int, rank: int, stream: str = DEFAULT_STREAM,
                   device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` for ``stream`` at ``step`` on ``rank``; needs no saved state."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, step, rank, stream))


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed python's, numpy's and torch's global generators (CPU and CUDA) for ``step`` on ``rank``.

    Call it at the start of a step: dropout and any other draw from the global generators in
    that step are then a pure function of ``(seed, step, rank)``.
    """
    s = stream_seed(seed, step, rank, GLOBAL_STREAM)
    random.seed(s)
    np.random.seed(s % 2**32)
    # The CPU generator and this process's CUDA device. Not torch.manual_seed: it also queues a
    # seed for every CUDA device, recording a Python stack trace each time while CUDA is not
    # initialised (about 0.1-1 ms, every step).
    torch.default_generator.manual_seed(s)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed(s)


# ---------------------------------------------------------------------------- set-up

def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) in this process."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
