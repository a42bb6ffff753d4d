"""Exact data-parallel gradient averaging: the reduction of a step depends on the step alone.

Why. A sum of floats depends on its order, and with three or more ranks an all-reduce's order
depends on where an element sits in the buffer being reduced (gloo's ring, NCCL's ring or tree,
cut the buffer into per-rank chunks). DDP reduces gradients in *buckets*: at construction it lays
them out in parameter order, and after the first iteration of every process it rebuilds them in
the order the gradients became ready. An uninterrupted run therefore reduces step 0 in one layout
and every later step in another, while a run resumed at step ``k`` reduces step ``k`` in the
first layout again: its gradients differ in the last bits from the uninterrupted run's, and the
two runs drift apart from there. With two ranks ``a + b == b + a`` and nothing shows.
``scripts/bench_exact.py`` shows the difference and measures the cost of the cure.

The rule. Each gradient element's mean over ``W`` ranks is ``((g_0 + g_1) + ... + g_{W-1}) / W``,
summed in rank order, whatever the buffer it travels in, the bucket layout, the backend or the
backend's algorithm: a pure function of the ranks' local gradients, which are a pure function of
the step.

* :func:`make_deterministic` makes it the communication hook of a ``DistributedDataParallel``
  module (any model; call it right after wrapping; calling it again is a no-op);
* :func:`average_gradients` applies it to gradients that code outside DDP averages itself.

How. A small buffer (every rank's copy together up to 4 MiB) is all-gathered whole and each rank
sums the copies in rank order: one collective, latency first. A larger one goes chunk-wise: an
all-to-all hands every rank its chunk of every rank's buffer, each rank sums its chunk in rank
order, an all-gather hands the sums back, as many bytes as a ring all-reduce (2 (W-1)/W of the
buffer per rank). Both give the same bits. CPU (gloo) and CUDA (NCCL) run the same code.
"""

# No ``from __future__ import annotations``: DDP checks a hook's annotations against the real
# ``dist.GradBucket`` and ``Future[Tensor]`` objects, and string annotations would fail that check.

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

# torch >= 2.13 names it all_gather_single and deprecates the old name; older torch has only that one.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# Buffers whose every rank's copy together stays under this are all-gathered whole (one
# collective: latency wins); larger ones go chunk-wise (bandwidth and memory win).
GATHER_BYTES = 4 << 20
_MARK = "_ftlaunch_exact_mean"  # set on a DDP module once its hook is registered


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _rank_ordered_sum(parts: torch.Tensor) -> torch.Tensor:
    """``parts[0] + parts[1] + ...`` in that order, element by element (no reduction kernel's own order)."""
    total = parts[0].clone()
    for part in parts[1:]:
        total.add_(part)
    return total


def mean_over_ranks(flat: torch.Tensor, group=None) -> torch.futures.Future:
    """Start replacing the 1-D tensor ``flat`` by its element-wise mean over ranks, in rank order.

    Returns a future that holds ``flat`` once ``flat`` holds the mean. Every rank must call this
    with a tensor of the same size and dtype, at the same point of its sequence of collectives.
    Small buffers (up to :data:`GATHER_BYTES`) take one all-gather of every rank's buffer; larger
    ones an all-to-all and an all-gather of the sums, as many bytes as a ring all-reduce. Both
    sum each element in rank order: the same bits either way.

    Collectives are issued here, by the calling thread, never from a completion callback: a
    collective issued from a callback would be ordered by timing, differently on each rank
    (and would block gloo's worker threads).
    """
    world = dist.get_world_size(group)
    n = flat.numel()
    if n * flat.element_size() * world <= GATHER_BYTES:
        everyone = flat.new_empty(world * n)
        gathered = _all_gather(everyone, flat, group=group, async_op=True).get_future()

        def sum_gathered(fut):
            fut.value()  # re-raises a failed gather (a lost peer): never sum a buffer it did not fill
            flat.copy_(_rank_ordered_sum(everyone.view(world, n)).div_(world))
            return flat

        return gathered.then(sum_gathered)
    chunk = -(-n // world)
    send = flat.new_zeros(world * chunk)  # padded so that every rank gets an equal chunk
    send[:n].copy_(flat)
    received = torch.empty_like(send)
    # Waited for here (on CUDA that only orders the current stream after it): the all-gather
    # that follows needs its result and must be issued by this thread.
    dist.all_to_all_single(received, send, group=group, async_op=True).wait()
    # received[r * chunk:(r + 1) * chunk] is rank r's copy of this rank's chunk.
    mine = _rank_ordered_sum(received.view(world, chunk)).div_(world)
    gathered = _all_gather(send, mine, group=group, async_op=True).get_future()

    def copy_back(fut):
        fut.value()  # re-raises a failed gather
        flat.copy_(send[:n])
        return flat

    return gathered.then(copy_back)


def _exact_mean_hook(group, bucket):
    """DDP communication hook: the bucket's mean over ranks by :func:`mean_over_ranks`."""
    return mean_over_ranks(bucket.buffer(), group)


def is_deterministic(model: torch.nn.Module) -> bool:
    """True if :func:`make_deterministic` was applied to ``model``."""
    return getattr(model, _MARK, False)


def make_deterministic(model: DistributedDataParallel) -> DistributedDataParallel:
    """Make ``model``'s gradient averaging a function of the step alone; return ``model``.

    Call it once the model is wrapped, before its first backward (every process, fresh or
    resumed, must reduce every step the same way). Calling it again is a no-op (one attribute
    lookup). Raises ``TypeError`` for a module that is not DDP and ``ValueError`` when ``model``
    already has another communication hook (DDP allows one).
    """
    if not isinstance(model, DistributedDataParallel):
        raise TypeError(f"make_deterministic expects a DistributedDataParallel module, got "
                        f"{type(model).__name__}; wrap the model in DDP first (code that averages gradients "
                        f"itself calls launcher.exact.average_gradients instead)")
    if is_deterministic(model):
        return model
    others = [getattr(hook, "__qualname__", repr(hook)) for hook, _ in getattr(model, "_comm_hooks", [])]
    if others:
        raise ValueError(f"this DDP module already has the communication hook {others[0]}; DDP allows one, and "
                         f"exact resume needs launcher.exact's. Drop yours (a compressing hook is not "
                         f"bit-reproducible across a resume either) or leave make_deterministic out")
    try:
        model.register_comm_hook(model.process_group, _exact_mean_hook)
    except RuntimeError as e:  # e.g. a built-in hook (register_builtin_comm_hook) was registered before
        raise ValueError(f"cannot register launcher.exact's communication hook on this DDP module: {e}") from None
    setattr(model, _MARK, True)
    return model


def average_gradients(params: Iterable[torch.nn.Parameter], group=None) -> None:
    """Average the gradients of ``params`` over ranks by the same rule as DDP under :func:`make_deterministic`.

    For code DDP does not see into (the recommender's functional inner loop). All gradients go
    in one flat buffer, one collective pair per call; parameters without a gradient are skipped,
    so every rank must have gradients for the same parameters.
    """
    if _world(group) == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    mean_over_ranks(flat, group).wait()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
