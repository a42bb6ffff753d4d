"""Process groups: one for training, one (gloo) for checkpoint collectives.

``python launcher/run.py`` with no launcher still initialises a one-process group, so one
process and N processes run the same code (DDP, DCP, barriers) and differ only in size.
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

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(env: ClusterEnv, timeout_s: float = 300.0) -> DistContext:
    """Initialise the default process group and a gloo group for checkpointing."""
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
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
    # Checkpoint collectives run on their own gloo group: an async save's background
    # thread would otherwise interleave with training collectives and deadlock.
    ckpt_group = dist.new_group(backend="gloo", timeout=timeout)
    return DistContext(env=env, rank=env.rank, world_size=env.world_size, device=device,
                       backend=backend, ckpt_group=ckpt_group)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
