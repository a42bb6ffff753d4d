"""The static rendezvous round barrier (launcher/agent/static.py) on an in-process store."""

from __future__ import annotations

import datetime
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch.distributed as dist

from launcher.agent.static import join_round

TIMEOUT = datetime.timedelta(seconds=20)


def join_together(store, nnodes: int, agents: int) -> list[int]:
    with ThreadPoolExecutor(agents) as pool:
        return sorted(pool.map(lambda _: join_round(store, nnodes, TIMEOUT), range(agents)))


def test_every_start_and_restart_of_all_nodes_is_a_new_round():
    store = dist.HashStore()
    assert join_together(store, 2, 2) == [0, 0]  # the job starts
    assert join_together(store, 2, 2) == [1, 1]  # both agents restart their workers
    assert join_together(store, 2, 2) == [2, 2]


def test_a_replacement_node_joins_the_round_the_survivor_waits_in():
    store = dist.HashStore()
    assert join_together(store, 2, 2) == [0, 0]
    with ThreadPoolExecutor(2) as pool:
        survivor = pool.submit(join_round, store, 2, TIMEOUT)  # restarted after its peer died
        replacement = pool.submit(join_round, store, 2, TIMEOUT)  # a new process, started later
        assert (survivor.result(), replacement.result()) == (1, 1)


def test_an_agent_arriving_at_a_full_round_moves_to_the_next():
    store = dist.HashStore()
    assert join_together(store, 2, 2) == [0, 0]
    store.add("ftrun/round1/arrived", 2)  # round 1 filled up, not yet counted as completed
    with ThreadPoolExecutor(2) as pool:
        late = [pool.submit(join_round, store, 2, TIMEOUT) for _ in range(2)]
        store.add("ftrun/rounds_completed", 1)
        store.set("ftrun/round1/complete", b"1")
        assert sorted(f.result() for f in late) == [2, 2]


def test_a_node_that_never_comes_is_a_store_timeout():
    store = dist.HashStore()
    with pytest.raises(dist.DistStoreError):
        join_round(store, 2, datetime.timedelta(seconds=0.5))
