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

import contextlib
import datetime
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from launcher.env import ClusterEnv

log = logging.getLogger("launcher")


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


def _listening_socket(host: str, port: int) -> socket.socket | None:
    """A socket listening on ``host:port`` only (not on every interface), or None.

    torch's TCPStore listens on every interface when it creates its own socket; handed one
    that is already bound (``master_listen_fd``), it listens where we bound it. Only an address
    the user spelled out is bound (an IP, or ``localhost``): a host name may resolve differently
    here (e.g. 127.0.1.1) than on the nodes that connect to it.
    """
    addr = "127.0.0.1" if host == "localhost" else host
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    sock = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(1024)
        return sock
    except OSError:  # not an address of this machine, or the port is taken: torch reports it
        sock.close()
        return None


def _store_on(host: str, port: int, create: Any, **kwargs: Any) -> Any:
    """``create(host, port, is_master=True, ...)`` listening only on ``host``'s address, if we can bind it.

    Falls back to torch's own socket (every interface) when ``host`` is a name, not an address
    of this machine, or the port is taken (torch then reports or handles that itself).
    """
    sock = _listening_socket(host, port)
    if sock is not None:
        bound_port, fd = sock.getsockname()[1], sock.detach()
        try:
            store = create(host, bound_port, is_master=True, master_listen_fd=fd, use_libuv=True, **kwargs)
            log.debug("Store listening on %s:%d only", host, bound_port)
            return store
        except (RuntimeError, TypeError, ValueError) as e:
            with contextlib.suppress(OSError):
                os.close(fd)
            log.debug("Store: cannot listen on %s only (%s); listening on every interface", host, e)
    return create(host, port, is_master=True, **kwargs)


def bound_store(host: str, port: int, world_size: int, timeout: datetime.timedelta) -> dist.TCPStore:
    """The process-group store, hosted here and listening only on the interface of ``host`` (see :func:`_store_on`)."""
    return _store_on(host, port, dist.TCPStore, world_size=world_size, timeout=timeout)


@contextlib.contextmanager
def rendezvous_store_on_endpoint():
    """While torch's c10d rendezvous handler is created, its store listens only on the endpoint's address.

    ``ftrun --rdzv_endpoint=127.0.0.1:29400`` (an IP or localhost) then hosts the rendezvous
    store on that address alone; torch would listen on every interface. Torch builds the store
    inside ``get_rendezvous_handler`` through this module-level name, and nowhere else.
    """
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend as backend

    original = backend.TCPStore

    def create(host: str, port: int, *args: Any, is_master: bool = False, **kwargs: Any) -> Any:
        if is_master and not args:
            return _store_on(host, port, original, **kwargs)
        return original(host, port, *args, is_master=is_master, **kwargs)

    backend.TCPStore = create
    try:
        yield
    finally:
        backend.TCPStore = original


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
    if env.kind == "torchrun" and env.use_agent_store:
        # env:// reuses the agent's TCPStore (TORCHELASTIC_USE_AGENT_STORE); a tcp:// URL
        # would try to bind MASTER_PORT a second time.
        kwargs["init_method"] = "env://"
    elif env.needs_free_port:
        kwargs["store"] = bound_store("127.0.0.1", 0, 1, timeout)
    elif env.rank == 0:  # we host the store (SLURM, or an agent that leaves it to the workers)
        kwargs["store"] = bound_store(env.master_addr, env.master_port, env.world_size, timeout)
    else:
        kwargs["store"] = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False,
                                        timeout=timeout)
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


def agree(outcome: Any, group: dist.ProcessGroup | None, world_size: int) -> list[Any]:
    """Every rank's outcome of one step (None for success), the failures only, on every rank.

    Used where one rank alone may fail (rank 0 writes the run's files): all ranks learn of it at
    the same point, instead of the others waiting in their next collective until it times out.
    """
    if world_size == 1:
        return [outcome] if outcome is not None else []
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, outcome, group=group)
    return [o for o in gathered if o is not None]


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
