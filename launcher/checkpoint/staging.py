"""Snapshots for background saves: copy only what this rank will write, into reused buffers.

An async save blocks training only while the state is copied; the write happens later in a
background thread. Under data parallelism every rank holds the same weights and optimizer
state, and DCP writes each replicated tensor once (from one rank) anyway, so each rank copies
only the tensors it *owns*: the largest-first greedy split below gives every rank about
``1 / world_size`` of the bytes. Tensors a rank does not own are left out of its snapshot,
which is what DCP's own de-duplication would have done after planning, so the checkpoint
holds exactly the same data as a synchronous save.
"""

from __future__ import annotations

from typing import Any

import torch

Signature = tuple[tuple[int, ...], str, int]  # shape, dtype, bytes


def _is_plain(value: Any) -> bool:
    # DTensor / ShardedTensor hold different data under the same key on each rank: never
    # treat them as replicated.
    return type(value) in (torch.Tensor, torch.nn.Parameter)


def tensor_signatures(state: Any, prefix: str = "") -> dict[str, Signature]:
    """Path -> (shape, dtype, bytes) of every plain tensor in nested dicts (lists are always copied)."""
    out: dict[str, Signature] = {}
    if isinstance(state, dict):
        for k, v in state.items():
            out.update(tensor_signatures(v, f"{prefix}{k}."))
    elif _is_plain(state):
        out[prefix] = (tuple(state.shape), str(state.dtype), state.numel() * state.element_size())
    return out


def assign_owners(per_rank: list[dict[str, Signature]]) -> dict[str, set[int]]:
    """Which ranks snapshot each tensor path.

    A path held by several ranks with the same shape and dtype is replicated: exactly one of
    them owns it, chosen largest tensor first for the least-loaded rank (ties: lowest rank),
    so every rank computes the same answer from the same inputs. A path whose copies differ
    is not replicated, and every rank that holds it keeps it.
    """
    holders: dict[str, list[int]] = {}
    for rank, sigs in enumerate(per_rank):
        for path in sigs:
            holders.setdefault(path, []).append(rank)
    load = [0] * len(per_rank)
    owners: dict[str, set[int]] = {}
    by_size = sorted(holders, key=lambda p: (-per_rank[holders[p][0]][p][2], p))
    for path in by_size:
        ranks = holders[path]
        if len({per_rank[r][path] for r in ranks}) > 1:
            owners[path] = set(ranks)
            continue
        owner = min(ranks, key=lambda r: (load[r], r))
        load[owner] += per_rank[owner][path][2]
        owners[path] = {owner}
    return owners


class Stager:
    """Copies a state dict into CPU buffers that are reused from one save to the next."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def stage(self, state: Any, keep: set[str] | None = None, prefix: str = "") -> Any:
        """A copy of ``state`` whose tensors live in reused buffers.

        Args:
            state: nested dicts and lists of tensors and plain values.
            keep: tensor paths (as in :func:`tensor_signatures`) to copy; other plain
                tensors are left out. None copies every tensor.
        """
        if isinstance(state, dict):
            out = {}
            for k, v in state.items():
                staged = self.stage(v, keep, f"{prefix}{k}.")
                if staged is not _DROP:
                    out[k] = staged
            return out
        if isinstance(state, list):
            return [self.stage(v, None, f"{prefix}{i}.") for i, v in enumerate(state)]
        if isinstance(state, torch.Tensor):
            if keep is not None and _is_plain(state) and prefix not in keep:
                return _DROP
            return self._copy(prefix, state)
        return state

    def _copy(self, path: str, tensor: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(path)
        if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
            buf = self._buffers[path] = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu",
                                                    pin_memory=tensor.is_cuda)
        buf.copy_(tensor.detach(), non_blocking=tensor.is_cuda)
        return buf

    def synchronize(self) -> None:
        """Wait for device-to-host copies started with ``non_blocking``."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()


_DROP = object()
