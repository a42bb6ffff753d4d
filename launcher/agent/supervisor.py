"""The per-node supervisor: run one :class:`FtAgent`, and start a new one if the store is lost.

torch's ``launch_agent`` (``torch/distributed/launcher/api.py``) builds the rendezvous handler,
the ``WorkerSpec`` and a ``LocalElasticAgent``; :func:`launch_once` does the same with
:class:`FtAgent` (torch's function hard-codes the agent class).

The c10d rendezvous keeps its state in one TCPStore, hosted by the first agent that could bind
``--rdzv_endpoint``. When that node dies, every other agent's next store operation fails
(``DistNetworkError`` / ``RendezvousConnectionError``): stock torchrun dies with the job
(pytorch/pytorch#150916). :func:`supervise` instead starts a new agent with the same settings,
up to ``--store-reforms`` times. Its rendezvous handler tries to host a fresh store at the same
endpoint (the port is free now that its owner is dead) and the survivors re-form the job there,
resuming from the latest checkpoint. That works when the endpoint's host can be taken over: on
one machine, or when the endpoint is a name or address that moves to a live node; otherwise the
new agents wait for the store host to come back until the rendezvous join timeout.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import torch.distributed as dist
from torch.distributed.elastic.agent.server.api import WorkerSpec
from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous import registry as rdzv_registry
from torch.distributed.elastic.rendezvous.api import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousStateError,
    RendezvousTimeoutError,
)
from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import StaticTCPRendezvous
from torch.distributed.launcher.api import LaunchConfig, _get_addr_and_port

from launcher import logs
from launcher.agent import console
from launcher.agent.agent import AgentOptions, FtAgent
from launcher.agent.policy import Action
from launcher.agent.report import Recorder, format_summary
from launcher.agent.static import FreshStoreStatic
from launcher.dist import rendezvous_store_on_endpoint

log = logging.getLogger("ftrun")

# What an agent raises when the rendezvous store stopped answering.
STORE_LOST = (RendezvousConnectionError, RendezvousStateError, RendezvousTimeoutError, dist.DistError)


def launch_once(config: LaunchConfig, entrypoint, args: list[str], options: AgentOptions,
                recorder: Recorder) -> int:
    """One agent's life: rendezvous, run and restart workers; return ftrun's exit code."""
    params = RendezvousParameters(backend=config.rdzv_backend, endpoint=config.rdzv_endpoint, run_id=config.run_id,
                                  min_nodes=config.min_nodes, max_nodes=config.max_nodes,
                                  local_addr=config.local_addr, **config.rdzv_configs)
    master_addr, master_port = _get_addr_and_port(params)
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = config.signals_to_handle
    # By default torch's workers keep using rank 0's agent store across restarts, and a
    # restarted gloo group reads its dead predecessors' addresses from it ("Gloo
    # connectFullMesh failed ... Connection refused"): restarts then fail until the budget is
    # spent. Torch's opt-out gives each attempt a fresh store, hosted by worker rank 0.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    with rendezvous_store_on_endpoint():  # an IP or localhost endpoint: the store listens there only
        rdzv_handler = rdzv_registry.get_rendezvous_handler(params)
    if isinstance(rdzv_handler, StaticTCPRendezvous):
        # A fresh worker store per round (launcher/agent/static.py); its address comes from the round.
        rdzv_handler, master_addr, master_port = FreshStoreStatic(rdzv_handler), None, None
    spec = WorkerSpec(role=config.role, local_world_size=config.nproc_per_node, entrypoint=entrypoint,
                      args=tuple(args), rdzv_handler=rdzv_handler,
                      max_restarts=config.max_restarts, monitor_interval=config.monitor_interval,
                      master_addr=master_addr, master_port=master_port, local_addr=config.local_addr,
                      event_log_handler=config.event_log_handler, numa_options=config.numa_options,
                      duplicate_stdout_filters=config.duplicate_stdout_filters,
                      duplicate_stderr_filters=config.duplicate_stderr_filters,
                      virtual_local_rank=config.virtual_local_rank)
    agent = FtAgent(spec, config.logs_specs, options, recorder=recorder, start_method=config.start_method,
                    log_line_prefix_template=config.log_line_prefix_template,
                    shutdown_timeout=config.shutdown_timeout or 30)
    # Closing the rendezvous tells the other agents the job is over. Not when this agent was
    # signalled (torch's rule: the job may go on without it) or lost the store (nothing to close).
    close = True
    try:
        agent.run()
    except (SignalException, *STORE_LOST):
        close = False
        raise
    finally:
        if close:
            try:
                spec.rdzv_handler.shutdown()
            except Exception as e:
                log.warning("ftrun: could not close the rendezvous: %s", e)
    final = agent.final
    if final is None:  # torch's agent returned early: this node was not admitted to the rendezvous
        return 0
    return 0 if final.action is Action.SUCCEED else (final.exit_code or 1)


class RenderedTraceback(logging.Filter):
    """Render a record's traceback with logging's own formatter, so torch's need not.

    torch's log formatter imports ``torch._dynamo`` (and sympy) to format a record that carries a
    traceback, which its process context logs when a worker fails: 3-5 s on the loaded 2-core test
    machine, spent between the failure and the restart. The text printed is the same.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            record.exc_text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            record.exc_type = type(record.exc_info[1]).__name__  # what the console filter decides on
            record.exc_info = None
        return True


def supervise(config: LaunchConfig, entrypoint, args: list[str], options: AgentOptions, store_reforms: int) -> int:
    """Run agents on this node until the job ends; print the summary; return the exit code.

    After Ctrl-C the summary goes to the log file only: the workers' one line (``Interrupted at
    step N; ...``) is the last thing on the console.
    """
    # Filters apply to the logger a record comes from: the one that reports failed workers.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(RenderedTraceback())
    recorder = Recorder(options.run_dir)
    recorder.agent_started()
    reforms, code, result, quiet = 0, 1, "failed", False
    try:
        while True:
            try:
                code = launch_once(config, entrypoint, args, options, recorder)
                result = "succeeded" if code == 0 else f"stopped (exit code {code})"
                return code
            except STORE_LOST as e:
                if reforms >= store_reforms:
                    result = f"lost the rendezvous store ({type(e).__name__}); --store-reforms={store_reforms} spent"
                    log.error("ftrun: %s", result)
                    return 1
                reforms += 1
                log.warning("ftrun: %s", console.store_lost_line(config.rdzv_endpoint, reforms, store_reforms))
                log.info("ftrun: the store error was %s: %s", type(e).__name__, e, extra=logs.FILE_ONLY)
                recorder.store_lost(error=f"{type(e).__name__}: {e}", reform=reforms)
                time.sleep(1.0)  # let the dead store's port be released before binding it
            except RendezvousClosedError:
                result = "the rendezvous was closed by another node (the job ended or gave up there)"
                log.error("ftrun: %s", result)
                return 1
            except SignalException as e:
                result = f"stopped by {signal.Signals(e.sigval).name}"
                code = 128 + int(e.sigval)
                quiet = e.sigval == signal.SIGINT
                return code
    finally:
        text = format_summary(recorder.summary(result))
        if quiet:
            log.info("%s", text, extra=logs.FILE_ONLY)
        else:
            print(text, flush=True)
