"""The one place that reads the cluster environment.

Three environments are recognised, in this order:

* **torchrun / ftrun** (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...): the
  launcher's agent has already done rendezvous; ``TORCHELASTIC_RESTART_COUNT`` counts restarts.
* **SLURM** (``SLURM_JOB_ID`` ...): read for job id, node list, node rank and
  ``SLURM_RESTART_COUNT`` (requeues). When a worker is started by ``srun`` directly, with no
  torchrun in between, ``SLURM_PROCID``/``SLURM_NTASKS`` give rank and world size.
* **single process**: ``python launcher/run.py`` with none of the above: rank 0 of 1.

Nothing else in the code base reads these variables (see STYLE.md, "one owner per concern").
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Mapping


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
    requeue_count: int = 0  # SLURM requeues (SLURM_RESTART_COUNT)
    agent_progress_file: str = ""  # set by ftrun: where this rank reports its progress

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


def detect(env: Mapping[str, str] | None = None) -> ClusterEnv:
    """Read the environment of this process (or ``env``, for tests)."""
    env = os.environ if env is None else env
    slurm_job = env.get("SLURM_ARRAY_JOB_ID") and f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    job_id = slurm_job or env.get("SLURM_JOB_ID", "") or env.get("TORCHELASTIC_RUN_ID", "")
    nodes = tuple(expand_slurm_nodelist(env["SLURM_JOB_NODELIST"])) if env.get("SLURM_JOB_NODELIST") else ()
    common = dict(job_id=job_id, nodes=nodes, requeue_count=_int(env, "SLURM_RESTART_COUNT"),
                  agent_progress_file=env.get("FTRUN_PROGRESS_FILE", ""))
    if "RANK" in env and "WORLD_SIZE" in env:
        local_ws = _int(env, "LOCAL_WORLD_SIZE", 1)
        return ClusterEnv(
            kind="torchrun", rank=_int(env, "RANK"), world_size=_int(env, "WORLD_SIZE", 1),
            local_rank=_int(env, "LOCAL_RANK"), local_world_size=local_ws,
            node_rank=_int(env, "GROUP_RANK", _int(env, "RANK") // max(local_ws, 1)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=_int(env, "MASTER_PORT"),
            restart_count=_int(env, "TORCHELASTIC_RESTART_COUNT"), **common)
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and _int(env, "SLURM_NTASKS", 1) > 1:
        return ClusterEnv(
            kind="slurm", rank=_int(env, "SLURM_PROCID"), world_size=_int(env, "SLURM_NTASKS", 1),
            local_rank=_int(env, "SLURM_LOCALID"), local_world_size=_int(env, "SLURM_NTASKS_PER_NODE", 1),
            node_rank=_int(env, "SLURM_NODEID"), master_addr=nodes[0] if nodes else "127.0.0.1",
            master_port=_int(env, "MASTER_PORT", 29500), **common)
    return ClusterEnv(kind="slurm" if "SLURM_JOB_ID" in env else "single", **common)
