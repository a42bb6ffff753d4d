"""Checkpoint benchmark: our verified saves next to what a user would otherwise use, in one run.

Usage::

    .venv/bin/python scripts/bench_checkpoint.py --size-mb 300 --world-size 2 --repeats 3

Spawns ``--world-size`` CPU processes on localhost (gloo). Every rank holds the same state, a
model of ``size/3`` MB plus AdamW's two moment buffers (like data-parallel training), and the
table compares, each the median of ``--repeats`` runs:

* ``torch.save`` of the whole state on rank 0 (no fsync: what most scripts do);
* ``dcp.save`` (torch's distributed checkpoint, fsync on);
* ``dcp.async_save``: the time it blocks the caller;
* our synchronous save (DCP + fsync + digests taken while writing + manifest + atomic rename +
  meta.json + retention), without a key (CRC32) and with one (keyed BLAKE3, signed manifest);
* our async save: time training is blocked, and time until the checkpoint is published;
* verifying the checkpoint as a resume does (re-reading every file), CRC32 and signed;
* the disk: writing the same number of bytes with fsync, as ``dd conv=fsync`` would.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launcher.checkpoint import digest, files
from launcher.checkpoint.manager import CheckpointManager
from launcher.config import CheckpointConfig

N_PARAMS = 25  # parameter tensors in the model
KEYED = digest.Scheme.keyed(b"benchmark key, 32 bytes long....")


def make_state(size_mb: float, device: str = "cpu") -> dict[str, Any]:
    """Model weights plus AdamW state totalling ``size_mb`` (identical on every rank)."""
    numel = max(1, int(size_mb * 2**20 / 3 / 4 / N_PARAMS))
    g = torch.Generator().manual_seed(0)
    rand = lambda: torch.randn(numel, generator=g).to(device)  # noqa: E731
    model = {f"layer{i}.weight": rand() for i in range(N_PARAMS)}
    optim_state = {k: {"step": torch.tensor(100.0), "exp_avg": rand(), "exp_avg_sq": rand().abs()} for k in model}
    groups = [{"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.01, "params": list(model)}]
    return {"model": model, "optim": {"state": optim_state, "param_groups": groups}, "progress": "{}"}


def state_bytes(state: Any) -> int:
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    return 0


def timed(fn: Callable[[], Any]) -> float:
    """Wall time of ``fn`` on the slowest rank (every rank starts together)."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    return slowest(time.perf_counter() - start)


def slowest(seconds: float) -> float:
    took = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return float(took)


def disk_write(path: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` in 8 MB blocks and fsync them (``dd bs=8M conv=fsync``)."""
    block = os.urandom(8 * 2**20)
    start = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(block[:min(left, len(block))])
            left -= len(block)
        f.flush()
        os.fsync(f.fileno())
    took = time.perf_counter() - start
    path.unlink()
    return took


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    bench = Bench(rank, world, Path(out_dir), make_state(args.size_mb, args.device))
    for r in range(1, args.repeats + 1):
        bench.round(r)
    for m in (bench.ours_sync, bench.ours_signed, bench.ours_async):
        m.close()
    if rank == 0:
        report(bench.results, bench.nbytes, world, args)
    dist.barrier()
    dist.destroy_process_group()


class Bench:
    """One rank's side of the measurements; every method is called on every rank."""

    def __init__(self, rank: int, world: int, base: Path, state: dict[str, Any]):
        self.rank, self.base, self.state = rank, base, state
        self.nbytes = state_bytes(state)
        self.results: dict[str, list[float]] = {}
        # As in training: timing collectives on the default group, each checkpointer on its
        # own gloo group, so a background write never interleaves with the caller's collectives.
        group = dist.new_group(backend="gloo")
        self.dcp_group = dist.new_group(backend="gloo")
        self.ours_sync = CheckpointManager(base / "ours_sync", CheckpointConfig(keep_last=2), rank, world, group)
        self.ours_signed = CheckpointManager(base / "ours_signed", CheckpointConfig(keep_last=2), rank, world, group)
        self.ours_signed.scheme = KEYED
        self.ours_async = CheckpointManager(base / "ours_async", CheckpointConfig(keep_last=2, async_save=True),
                                            rank, world, group)
        for m in (self.ours_sync, self.ours_signed, self.ours_async):
            m.prepare()
        self.ours_async.save(0, state, self.info(0))  # allocates the staging buffers: not measured
        self.ours_async.wait()

    @staticmethod
    def info(step: int) -> dict[str, Any]:
        return {"step": step, "epoch": 0, "metrics": {}, "config": {}}

    def record(self, name: str, seconds: float) -> None:
        self.results.setdefault(name, []).append(seconds)

    def fresh(self, name: str) -> Path:
        path = self.base / name
        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        dist.barrier()
        return path

    def dcp_save(self) -> None:
        path = self.base / "dcp"
        dcp.save(self.state, storage_writer=dcp.FileSystemWriter(str(path)), process_group=self.dcp_group)

    def round(self, r: int) -> None:
        state = self.state
        if self.rank == 0:
            start = time.perf_counter()
            torch.save(state, self.base / "torch_save.pt")
            self.record("torch.save, rank 0 (no fsync)", time.perf_counter() - start)
            (self.base / "torch_save.pt").unlink()
        # The synchronous saves (all fsync their files) run in an order that rotates from one repeat
        # to the next, so that none of them always follows the same neighbour.
        saves = [("dcp.save", self.dcp_save),
                 ("ours, sync", lambda: self.ours_sync.save(r, state, self.info(r), blocking=True)),
                 ("ours, sync, signed", lambda: self.ours_signed.save(r, state, self.info(r), blocking=True))]
        for name, save in saves[r % 3:] + saves[:r % 3]:
            if save == self.dcp_save:
                self.fresh("dcp")  # torch's save writes into an empty directory, removed outside the timing
            self.record(name, timed(save))
        path, futures = self.fresh("dcp_async"), []
        self.record("dcp.async_save: blocked", timed(lambda: futures.append(dcp.async_save(
            state, storage_writer=dcp.FileSystemWriter(str(path)), process_group=self.dcp_group))))
        futures[0].result()
        self.record("ours, async: blocked", timed(lambda: self.ours_async.save(r, state, self.info(r))))
        self.ours_async.wait()
        total = self.ours_async.last_save_seconds + self.ours_async.last_write_seconds
        self.record("ours, async: total", slowest(total))
        if self.rank == 0:
            for name, manager, scheme in (("verify (CRC32)", self.ours_sync, digest.Scheme()),
                                          ("verify (signed, BLAKE3 keyed)", self.ours_signed, KEYED)):
                start = time.perf_counter()
                check = files.verify(manager.root / f"step_{r:08d}", scheme=scheme)
                self.record(name, time.perf_counter() - start)
                if not check.ok:
                    raise RuntimeError(f"benchmark checkpoint does not verify: {check.reason()}")
            self.record("disk: same bytes + fsync", disk_write(self.base / "disk_probe.bin", self.nbytes))
        dist.barrier()


def report(results: dict[str, list[float]], nbytes: int, world: int, args: argparse.Namespace) -> None:
    order = ["torch.save, rank 0 (no fsync)", "dcp.save", "ours, sync", "ours, sync, signed"]
    med = {k: statistics.median(results[k]) for k in [*order, *(k for k in results if k not in order)]}
    sync = med["ours, sync"]
    mb = nbytes / 2**20
    print(f"\nstate {mb:.0f} MB per rank (model {mb / 3:.0f} MB + AdamW) on {args.device}, world size {world}, "
          f"median of {args.repeats}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"dir {args.dir or tempfile.gettempdir()}\n")
    print(f"| {'operation':<32} | {'seconds':>8} | {'MB/s':>7} | {'vs our sync save':>16} |")
    print(f"|{'-' * 34}|{'-' * 10}|{'-' * 9}|{'-' * 18}|")
    for name, seconds in med.items():
        print(f"| {name:<32} | {seconds:8.3f} | {mb / seconds:7.0f} | {seconds / sync:15.1%}  |")
    blocked = med["ours, async: blocked"]
    print(f"\nasync blocked / sync save: {blocked / sync:.1%} (target <= 10%)")
    signed = med["ours, sync, signed"]
    print(f"verify / sync save: CRC32 {med['verify (CRC32)'] / sync:.1%}, "
          f"signed {med['verify (signed, BLAKE3 keyed)'] / signed:.1%} (of the signed save)")
    print(f"signed verify / CRC32 verify: {med['verify (signed, BLAKE3 keyed)'] / med['verify (CRC32)']:.2f}x")
    print(f"sync save / disk write of the same bytes: {sync / med['disk: same bytes + fsync']:.2f}x")
    print(f"sync save / dcp.save: {sync / med['dcp.save']:.2f}x (target <= 1.2x); "
          f"signed: {signed / med['dcp.save']:.2f}x")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=float, default=300, help="state per rank: model + 2 AdamW buffers (default 300)")
    p.add_argument("--world-size", type=int, default=2, help="processes (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the median is shown")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the state lives (cuda: every rank on GPU 0; staging is a copy to pinned memory)")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory, removed after)")
    args = p.parse_args()
    if args.size_mb <= 0 or args.world_size < 1 or args.repeats < 1:
        p.error("--size-mb must be > 0, --world-size and --repeats >= 1")
    out = tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir)
    try:
        mp.spawn(worker, args=(args.world_size, free_port(), args, out), nprocs=args.world_size, join=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
