"""The one place that reads the cluster environment.

Three environments are recognised, in this order:

* **torchrun / ftrun** (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...): the
  launcher's agent has already done rendezvous; ``TORCHELASTIC_RESTART_COUNT`` counts restarts
  out of ``TORCHELASTIC_MAX_RESTARTS``.
* **SLURM** (``SLURM_JOB_ID`` ...): read for job id, node list, node rank and
  ``SLURM_RESTART_COUNT`` (requeues). When a worker is started by ``srun`` directly, with no
  torchrun in between, ``SLURM_PROCID``/``SLURM_NTASKS`` give rank and world size.
* **single process**: ``python launcher/run.py`` with none of the above: rank 0 of 1.

Under torchrun inside a SLURM job both sets are present: rank, world size and node rank come
from torchrun (its rendezvous decided them), job id, node list and requeue count from SLURM.

One variable that is not the cluster's but the job script's is read here too:
``FTLAUNCH_PREEMPT_SIGNALS`` (default ``SIGTERM,SIGUSR1``), the comma-separated signals on
which a worker checkpoints and exits 75. Set it to the signal your ``#SBATCH --signal`` or
scheduler sends (names with or without ``SIG``, e.g. ``USR2``); SIGKILL and SIGSTOP cannot be caught.

Nothing else in the code base reads these variables (see STYLE.md, "one owner per concern").
"""

from __future__ import annotations

import os
import re
import signal
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1")
_UNCATCHABLE = ("SIGKILL", "SIGSTOP")


@dataclass(frozen=True)
class ClusterEnv:
    """Where this process sits in the job."""

    kind: str  # "torchrun", "slurm" or "single"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0 = pick a free port (single process only)
    job_id: str = ""
    nodes: tuple[str, ...] = field(default_factory=tuple)
    restart_count: int = 0  # restarts of the workers by torchrun/ftrun
    max_restarts: int = 0  # the agent's restart budget (torchrun/ftrun --max_restarts)
    requeue_count: int = 0  # SLURM requeues (SLURM_RESTART_COUNT)
    agent_progress_file: str = ""  # set by ftrun: where this rank reports its progress
    num_nodes: int = 1  # machines in the job (torchrun's GROUP_WORLD_SIZE, else SLURM's node count)
    node_name: str = ""  # this machine (SLURMD_NODENAME under SLURM, else the host name)
    preempt_signals: tuple[str, ...] = DEFAULT_PREEMPT_SIGNALS  # checkpoint and exit 75 on these
    use_agent_store: bool = True  # torchrun/ftrun: workers use the agent's store (else rank 0 hosts one)

    @property
    def needs_free_port(self) -> bool:
        """True for a lone process that must pick its own rendezvous port."""
        return self.master_port == 0


def expand_slurm_nodelist(text: str) -> list[str]:
    """Expand a SLURM node list such as ``n[1-3,5],gpu07`` into host names.

    ``scontrol show hostnames`` does this on a cluster; this pure-Python version serves
    where scontrol is not on the PATH (and in unit tests).
    """
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", text):
        m = re.fullmatch(r"(.*?)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def _int(env: Mapping[str, str], key: str, default: int = 0) -> int:
    value = env.get(key, "")
    try:
        return int(value) if value != "" else default
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def parse_signals(text: str, source: str = "FTLAUNCH_PREEMPT_SIGNALS") -> tuple[str, ...]:
    """``"TERM, SIGUSR1"`` -> ``("SIGTERM", "SIGUSR1")``; a clear error for anything else."""
    names, bad = [], []
    for item in (t.strip().upper() for t in text.split(",")):
        if not item:
            continue
        name = item if item.startswith("SIG") else f"SIG{item}"
        if not isinstance(getattr(signal, name, None), signal.Signals) or name in _UNCATCHABLE:
            bad.append(item)
        elif name not in names:
            names.append(name)
    if bad or not names:
        raise ValueError(f"{source}={text!r}: {', '.join(bad) or 'no signal'} cannot be caught as a "
                         f"preemption signal; expected comma-separated names such as SIGTERM,SIGUSR1 "
                         f"(not SIGKILL/SIGSTOP)")
    return tuple(names)


def detect(env: Mapping[str, str] | None = None) -> ClusterEnv:
    """Read the environment of this process (or ``env``, for tests)."""
    env = os.environ if env is None else env
    slurm_job = env.get("SLURM_ARRAY_JOB_ID") and f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    job_id = slurm_job or env.get("SLURM_JOB_ID", "") or env.get("TORCHELASTIC_RUN_ID", "")
    nodes = tuple(expand_slurm_nodelist(env["SLURM_JOB_NODELIST"])) if env.get("SLURM_JOB_NODELIST") else ()
    signals = env.get("FTLAUNCH_PREEMPT_SIGNALS", "")
    common = dict(job_id=job_id, nodes=nodes, requeue_count=_int(env, "SLURM_RESTART_COUNT"),
                  agent_progress_file=env.get("FTRUN_PROGRESS_FILE", ""),
                  node_name=env.get("SLURMD_NODENAME") or socket.gethostname(),
                  preempt_signals=parse_signals(signals) if signals.strip() else DEFAULT_PREEMPT_SIGNALS)
    slurm_nodes = _int(env, "SLURM_JOB_NUM_NODES", _int(env, "SLURM_NNODES", len(nodes) or 1))
    if "RANK" in env and "WORLD_SIZE" in env:
        local_ws = _int(env, "LOCAL_WORLD_SIZE", 1)
        return ClusterEnv(
            kind="torchrun", rank=_int(env, "RANK"), world_size=_int(env, "WORLD_SIZE", 1),
            local_rank=_int(env, "LOCAL_RANK"), local_world_size=local_ws,
            node_rank=_int(env, "GROUP_RANK", _int(env, "RANK") // max(local_ws, 1)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=_int(env, "MASTER_PORT"),
            num_nodes=_int(env, "GROUP_WORLD_SIZE", slurm_nodes if "SLURM_JOB_ID" in env else 1),
            restart_count=_int(env, "TORCHELASTIC_RESTART_COUNT"),
            max_restarts=_int(env, "TORCHELASTIC_MAX_RESTARTS"),
            use_agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE", "True") == "True", **common)
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and _int(env, "SLURM_NTASKS", 1) > 1:
        return ClusterEnv(
            kind="slurm", rank=_int(env, "SLURM_PROCID"), world_size=_int(env, "SLURM_NTASKS", 1),
            local_rank=_int(env, "SLURM_LOCALID"), local_world_size=_int(env, "SLURM_NTASKS_PER_NODE", 1),
            node_rank=_int(env, "SLURM_NODEID"), master_addr=nodes[0] if nodes else "127.0.0.1",
            master_port=_int(env, "MASTER_PORT", 29500), num_nodes=slurm_nodes, **common)
    return ClusterEnv(kind="slurm" if "SLURM_JOB_ID" in env else "single", **common)
