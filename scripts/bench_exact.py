"""What exact gradient averaging costs: DDP steps/s with and without ``launcher.exact``, side by side.

For each world size (gloo processes on this machine), the shipped encoder model (or a larger
one, ``--model large``, whose gradients fill several DDP buckets) trains ``--steps`` steps on
random data with a global batch of 24 (it splits over 2, 3 and 4 ranks), alternately under
stock DDP and under DDP with ``make_deterministic``, ``--repeats`` times each (interleaved, so
that load from elsewhere hits both alike). Printed per world size: median steps/s of each, their
ratio, and the cause the hook removes: how many gradient tensors stock DDP reduces to other bits
in its first iteration than in its second, for the same inputs and weights (0 under
``make_deterministic``).

Usage::

    python scripts/bench_exact.py                       # world sizes 2, 3, 4; the shipped encoder
    python scripts/bench_exact.py --world 4 --model large --steps 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launcher import exact  # noqa: E402
from trainers.encoder.model import TemporalEncoder, masked_mse  # noqa: E402

MODELS = {  # the shipped configs/encoder.yaml, and one with ~19 M parameters (several 25 MB buckets)
    "default": dict(channels=8, window=32, d_model=32, n_heads=4, n_layers=2, ff_dim=64, dropout=0.1),
    "large": dict(channels=8, window=32, d_model=512, n_heads=8, n_layers=6, ff_dim=2048, dropout=0.1),
}
GLOBAL_BATCH = 24  # divisible by 2, 3 and 4 (the shipped config's 32 is not by 3)


def build(model: str, deterministic: bool) -> tuple[DDP, torch.optim.Optimizer]:
    torch.manual_seed(0)
    ddp = DDP(TemporalEncoder(**MODELS[model]))
    if deterministic:
        exact.make_deterministic(ddp)
    return ddp, torch.optim.AdamW(ddp.parameters(), lr=1e-3)


def step(ddp: DDP, opt: torch.optim.Optimizer, x: torch.Tensor, mask: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    masked_mse(ddp(x, mask), x, mask).backward()
    opt.step()


def steps_per_second(ddp: DDP, opt, x, mask, steps: int) -> float:
    step(ddp, opt, x, mask)  # the first iteration (bucket rebuild) is not timed
    dist.barrier()
    t = time.perf_counter()
    for _ in range(steps):
        step(ddp, opt, x, mask)
    dist.barrier()
    return steps / (time.perf_counter() - t)


def differing_first_iteration(model: str, deterministic: bool, x, mask) -> int:
    """Gradient tensors whose first-iteration average differs from the second's, same inputs and weights."""
    ddp, _ = build(model, deterministic)
    ddp.eval()  # no dropout: the two iterations compute the same local gradients
    grads = []
    for _ in range(2):
        ddp.zero_grad(set_to_none=True)
        masked_mse(ddp(x, mask), x, mask).backward()
        grads.append([p.grad.clone() for p in ddp.parameters()])
    return sum(not torch.equal(a, b) for a, b in zip(*grads, strict=True))


def worker(rank: int, world: int, port: int, args, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    window, channels = MODELS[args.model]["window"], MODELS[args.model]["channels"]
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(GLOBAL_BATCH // world, window, channels, generator=g)
    mask = torch.rand(GLOBAL_BATCH // world, window, generator=g) < 0.25
    rates: dict[str, list[float]] = {"stock DDP": [], "make_deterministic": []}
    for _ in range(args.repeats):
        for name, det in (("stock DDP", False), ("make_deterministic", True)):
            ddp, opt = build(args.model, det)
            rates[name].append(steps_per_second(ddp, opt, x, mask, args.steps))
    diffs = {name: differing_first_iteration(args.model, det, x, mask)
             for name, det in (("stock DDP", False), ("make_deterministic", True))}
    if rank == 0:  # (building a DDP module here would be a collective on one rank only: a deadlock)
        out[world] = {"rates": rates, "diffs": diffs,
                      "tensors": len(list(TemporalEncoder(**MODELS[args.model]).parameters()))}
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", default="2,3,4", help="world sizes, comma-separated (default 2,3,4)")
    p.add_argument("--model", choices=sorted(MODELS), default="default")
    p.add_argument("--steps", type=int, default=50, help="timed steps per measurement (default 50)")
    p.add_argument("--repeats", type=int, default=3, help="measurements of each variant (default 3)")
    args = p.parse_args(argv)
    worlds = [int(w) for w in args.world.split(",")]
    bad = [w for w in worlds if w < 1 or GLOBAL_BATCH % w]
    if bad:
        p.error(f"world sizes must divide the global batch {GLOBAL_BATCH}: {bad}")
    results = mp.Manager().dict()
    for world in worlds:
        mp.start_processes(worker, args=(world, free_port(), args, results), nprocs=world, start_method="spawn")
    n_params = sum(p.numel() for p in TemporalEncoder(**MODELS[args.model]).parameters())
    print(f"\nDDP steps/s, {args.model} encoder ({n_params:,} parameters), global batch {GLOBAL_BATCH}, gloo, "
          f"median of {args.repeats} x {args.steps} steps:\n")
    print("| world size | stock DDP | make_deterministic | ratio | gradients differing, iteration 1 vs 2 "
          "(stock / deterministic) |")
    print("|---|---|---|---|---|")
    for world in worlds:
        r = results[world]
        stock, det = (statistics.median(r["rates"][k]) for k in ("stock DDP", "make_deterministic"))
        print(f"| {world} | {stock:.1f} | {det:.1f} | {det / stock:.2f} | {r['diffs']['stock DDP']} / "
              f"{r['diffs']['make_deterministic']} of {r['tensors']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
