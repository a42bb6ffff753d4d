"""Process groups: the training group, and two gloo groups of our own.

``python launcher/run.py`` with no launcher still initialises a one-process group, so one
process and N processes run the same code (DDP, DCP, barriers) and differ only in size.

Besides the training group (nccl on CUDA, gloo on CPU) every process joins two gloo groups:

* ``ckpt_group`` for checkpoint collectives: an async save's background thread would
  otherwise interleave its collectives with the training thread's and deadlock;
* ``control_group`` for the training loop's own agreement (metrics, the save and preemption
  flags): small CPU tensors, so on CUDA our bookkeeping never waits for the device.

A script that initialised the process group itself keeps it (:func:`attach`); only a group
this module created is destroyed at the end.
"""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from launcher.env import ClusterEnv


@dataclass
class DistContext:
    """The initialised job as the training code sees it."""

    env: ClusterEnv
    rank: int
    world_size: int
    device: torch.device
    backend: str
    ckpt_group: dist.ProcessGroup  # gloo, so checkpoint collectives never queue behind NCCL ones
    control_group: dist.ProcessGroup | None = None  # gloo, the loop's metrics and flags
    owns_group: bool = True  # the default group was created here (and is destroyed by shutdown)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device_for(backend: str, env: ClusterEnv) -> torch.device:
    if backend == "nccl":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init(env: ClusterEnv, timeout_s: float = 300.0) -> DistContext:
    """Initialise the default process group and our two gloo groups."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = _device_for(backend, env)
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs: dict = {}
    if env.kind == "torchrun":
        # env:// reuses the agent's TCPStore (TORCHELASTIC_USE_AGENT_STORE); a tcp:// URL
        # would try to bind MASTER_PORT a second time.
        kwargs["init_method"] = "env://"
    elif env.needs_free_port:
        kwargs["store"] = dist.TCPStore("127.0.0.1", _free_port(), 1, is_master=True, timeout=timeout)
    else:
        kwargs["init_method"] = f"tcp://{env.master_addr}:{env.master_port}"
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                            timeout=timeout, **kwargs)
    return _with_groups(env, dist.get_rank(), dist.get_world_size(), device, backend, timeout, owns=True)


def attach(env: ClusterEnv, timeout_s: float = 300.0) -> DistContext:
    """Use the default process group a script initialised itself; add our two gloo groups."""
    backend = str(dist.get_backend())
    device = _device_for("nccl", env) if "nccl" in backend else torch.device("cpu")
    return _with_groups(env, dist.get_rank(), dist.get_world_size(), device, backend,
                        datetime.timedelta(seconds=timeout_s), owns=False)


def _with_groups(env: ClusterEnv, rank: int, world: int, device: torch.device, backend: str,
                 timeout: datetime.timedelta, owns: bool) -> DistContext:
    ckpt_group = dist.new_group(backend="gloo", timeout=timeout)
    control_group = dist.new_group(backend="gloo", timeout=timeout)
    return DistContext(env=env, rank=rank, world_size=world, device=device, backend=backend,
                       ckpt_group=ckpt_group, control_group=control_group, owns_group=owns)


def shutdown(ctx: DistContext | None = None) -> None:
    """Destroy the process group if it is ours (``ctx`` None: whatever is initialised)."""
    if not dist.is_initialized():
        return
    if ctx is None or ctx.owns_group:
        dist.destroy_process_group()
        return
    for group in (ctx.ckpt_group, ctx.control_group):
        if group is not None:
            dist.destroy_process_group(group)
