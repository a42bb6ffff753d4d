"""Static rendezvous (``--master_addr/--master_port/--node_rank``) with a fresh worker store per round.

Why. torch's ``StaticTCPRendezvous`` creates one TCPStore (hosted by node rank 0's agent) and
hands it to the workers of every attempt: its ``use_agent_store`` is always true, the key
prefix is the same run id each time, and ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE`` (which fixes this
for c10d) does not apply to it. A restarted worker group therefore finds its dead predecessors'
keys in the store; gloo's connection set-up reads a dead peer's address before the new peer has
replaced it (``Gloo connectFullMesh failed ... Connection refused``), and the first restart after
every failure fails again.

What changes. :class:`FreshStoreStatic` keeps torch's handler (same store, same host, the node
ranks the user gave) and adds, per call of :meth:`~FreshStoreStatic.next_rendezvous`:

1. a **round**: every node's agent joins round ``R``, the number of rounds completed so far as
   recorded in the store, and waits until all ``--nnodes`` agents have joined it. An agent that
   restarts its workers, and a replacement node started later, both join the next round, so
   all nodes agree on it whatever each has been through;
2. a **fresh worker store**: the round's keys live under their own prefix, and node rank 0
   picks a free port on which worker rank 0 hosts a new TCPStore for this round only (torch's
   ``RendezvousStoreInfo.build``, as the c10d handler does with its opt-out). Nothing of an
   earlier attempt is visible to the workers of a new one.
"""

from __future__ import annotations

import logging
import time

from torch.distributed import PrefixStore, Store
from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousInfo, RendezvousStoreInfo
from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import StaticTCPRendezvous

log = logging.getLogger("ftrun")

COMPLETED = "ftrun/rounds_completed"


def join_round(store: Store, nnodes: int, timeout) -> int:
    """Join the current round of ``nnodes`` agents on ``store`` and wait for it to fill; return its number.

    The round is the number of rounds completed so far. If it fills up just as this agent reads
    that number (a late replacement racing the round's last member), the agent moves to the next.
    """
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        rnd = int(store.add(COMPLETED, 0))
        arrived = int(store.add(f"ftrun/round{rnd}/arrived", 1))
        if arrived > nnodes:
            if time.monotonic() > deadline:
                raise RendezvousTimeoutError(f"static rendezvous: round {rnd} is full ({nnodes} nodes) but was "
                                             f"never completed; is a --node_rank running twice?")
            time.sleep(0.05)  # round ``rnd`` is full and about to be counted as completed: join the next
            continue
        if arrived == nnodes:
            store.add(COMPLETED, 1)
            store.set(f"ftrun/round{rnd}/complete", b"1")
        store.wait([f"ftrun/round{rnd}/complete"], timeout)
        return rnd


class FreshStoreStatic(RendezvousHandler):
    """torch's static rendezvous, with a round barrier and a fresh worker store per round."""

    def __init__(self, inner: StaticTCPRendezvous):
        self.inner = inner

    @property
    def use_agent_store(self) -> bool:
        return False  # workers get the round's own store (worker rank 0 hosts it)

    def next_rendezvous(self) -> RendezvousInfo:
        info = self.inner.next_rendezvous()  # the agents' store, node rank, --nnodes
        # A store error (its host died) propagates: the supervisor starts a new agent on it.
        rnd = join_round(info.store, info.world_size, self.inner.timeout)
        store = PrefixStore(f"ftrun/round{rnd}/", info.store)
        # Node rank 0 hosts global rank 0, at the address the user gave for it.
        bootstrap = RendezvousStoreInfo.build(info.rank, store, local_addr=self.inner.master_addr)
        log.info("ftrun: static rendezvous round %d complete: node rank %d of %d, worker store %s:%d", rnd,
                 info.rank, info.world_size, bootstrap.master_addr, bootstrap.master_port)
        return RendezvousInfo(store, info.rank, info.world_size, bootstrap)

    def get_backend(self) -> str:
        return self.inner.get_backend()

    def is_closed(self) -> bool:
        return self.inner.is_closed()

    def set_closed(self) -> None:
        self.inner.set_closed()

    def num_nodes_waiting(self) -> int:
        return self.inner.num_nodes_waiting()

    def get_run_id(self) -> str:
        return self.inner.get_run_id()

    def shutdown(self) -> bool:
        return self.inner.shutdown()
