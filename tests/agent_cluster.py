"""A few "nodes" on 127.0.0.1 for agent chaos tests and ``scripts/bench_recovery.py``.

Each node is one agent process (``ftrun`` or stock ``torchrun``) in its own session, so a
whole node (agent and workers) is lost with one ``killpg``. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from helpers import FAST, PY, RUN, child_env, config_path, free_port, start, stop, tail

# Chaos runs need enough steps to strike at random moments; evaluation is off to keep them short.
CHAOS_ARGS = ["--set", "data.synthetic_length=4096", "--set", "train.eval_every_epoch=false",
              "--set", "train.log_interval=10"]


def chaos_rng() -> random.Random:
    """The random moments of a chaos test; the seed is printed, and ``CHAOS_SEED`` replays one."""
    seed = int(os.environ.get("CHAOS_SEED", time.time_ns() % 100_000))
    print(f"CHAOS_SEED={seed}")
    return random.Random(seed)


def script_args(run_dir: Path, steps: int, interval: int = 10, extra: Sequence[str] = ()) -> list[str]:
    return [RUN, "--config", config_path("encoder"), "--run-dir", str(run_dir), *FAST["encoder"], *CHAOS_ARGS,
            "--set", f"train.max_steps={steps}", "--set", f"checkpoint.interval_steps={interval}", *extra]


RDZV = ("c10d", "static", "standalone")


@dataclass
class Cluster:
    """Agents of one job on localhost.

    ``launcher`` is "ftrun" or "torchrun"; ``rdzv`` is "c10d" (``--rdzv_endpoint``), "static"
    (``--master_addr/--master_port/--node_rank``; node rank 0 hosts the store) or "standalone"
    (one node: ``--standalone``); ``nproc`` workers per node.
    """

    workdir: Path
    script: list[str]
    nnodes: str = "2"
    launcher: str = "ftrun"
    agent_args: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    rdzv_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)
    rdzv: str = "c10d"
    nproc: int = 1
    node_ranks: dict[str, int] = field(default_factory=dict)
    monitor_interval: float | None = 0.5  # None: the launcher's default (0.1 s)
    env: dict[str, str] = field(default_factory=dict)  # extra environment of every agent

    def command(self, node_rank: int = 0) -> list[str]:
        module = "launcher" if self.launcher == "ftrun" else "torch.distributed.run"
        if self.rdzv == "standalone":
            topology = ["--standalone"]
        elif self.rdzv == "static":
            topology = [f"--nnodes={self.nnodes}", f"--node_rank={node_rank}", "--master_addr=127.0.0.1",
                        f"--master_port={self.port}"]
        else:
            topology = [f"--nnodes={self.nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{self.port}",
                        f"--rdzv_id={self.rdzv_id}"]
        monitor = [] if self.monitor_interval is None else [f"--monitor_interval={self.monitor_interval}"]
        return [PY, "-m", module, *topology, f"--nproc_per_node={self.nproc}", *monitor, *self.agent_args,
                *self.script]

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def start_node(self, name: str, node_rank: int = 0) -> subprocess.Popen:
        """Start one node's agent (``node_rank`` matters for static rendezvous only)."""
        proc = start(self.command(node_rank), self.log(name), child_env(**self.env))
        self.nodes[name] = proc
        self.node_ranks[name] = node_rank
        return proc

    def wait_store(self, timeout: float = 60) -> None:
        """Wait until some agent listens on the rendezvous port (it hosts the store)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(c.laddr.port == self.port and c.status == psutil.CONN_LISTEN
                   for c in psutil.net_connections("tcp")):
                return
            time.sleep(0.2)
        raise AssertionError(f"no agent listened on 127.0.0.1:{self.port} within {timeout}s\n{self.tails()}")

    def workers(self, name: str) -> list[psutil.Process]:
        """The node's live training processes."""
        try:
            kids = psutil.Process(self.nodes[name].pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        out = []
        for p in kids:
            try:
                if p.status() != psutil.STATUS_ZOMBIE and (RUN in p.cmdline() or _forked_worker(p)):
                    out.append(p)
            except psutil.NoSuchProcess:
                continue
        return out

    def kill_node(self, name: str) -> None:
        """Lose the node: SIGKILL its agent and its workers (torch starts each worker in a new
        session, so the agent's process group alone would leave them running)."""
        proc = self.nodes[name]
        try:
            family = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        stop(proc, signal.SIGKILL)
        for p in family:
            signal_proc(p, signal.SIGKILL)

    def wait_all(self, timeout: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        codes = {}
        for name, proc in self.nodes.items():
            try:
                codes[name] = proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                codes[name] = None
        return codes

    def close(self) -> None:
        for name, proc in self.nodes.items():
            if proc.poll() is None:
                self.kill_node(name)

    def tails(self, n: int = 40) -> str:
        return "\n".join(f"--- {name} ---\n{tail(self.log(name), n)}" for name in self.nodes)


def _forked_worker(p: psutil.Process) -> bool:
    """A worker forked by ftrun --warm-start's fork server (a child of the server itself)."""
    parent = p.parent()
    return parent is not None and "forkserver" in " ".join(p.cmdline()) and "forkserver" in " ".join(parent.cmdline())


def steps_done(run_dir: Path) -> int:
    """The last completed step in rank 0's metrics.jsonl (0 if none yet)."""
    path = Path(run_dir) / "metrics.jsonl"
    last = 0
    try:
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "loss" in rec:
                last = rec["step"]
    except FileNotFoundError:
        pass
    return last


def step_times(run_dir: Path) -> list[tuple[int, float]]:
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "loss" in rec:
            out.append((rec["step"], rec["time"]))
    return out


def wait_step(run_dir: Path, step: int, timeout: float, cluster: Cluster | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if steps_done(run_dir) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached within {timeout}s (at {steps_done(run_dir)})\n"
                         f"{cluster.tails() if cluster else ''}")


def first_step_after(run_dir: Path, t: float, timeout: float) -> float | None:
    """Seconds from ``t`` to the first step completed after it, or None if none within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        later = [ts for _, ts in step_times(run_dir) if ts > t]
        if later:
            return later[0] - t
        time.sleep(0.05)
    return None


def signal_proc(proc: psutil.Process, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)


def reported_step(run_dir: Path) -> int:
    """The highest step any rank reported to its agent (``ftrun/progress``, at most 0.5 s old) or
    rank 0 logged (``metrics.jsonl``, written at the loop's sync points)."""
    best = 0
    for path in (Path(run_dir) / "ftrun" / "progress").glob("rank*.json"):
        try:
            best = max(best, int(json.loads(path.read_text())["step"]))
        except (OSError, ValueError, KeyError):
            continue
    return max(best, steps_done(run_dir))


def failure_cost(run_dir: Path, t: float, seen: int) -> dict:
    """What the failure struck at ``t`` cost, from ``events.jsonl``: the step the survivors held (their
    ``snapshot`` events; ``seen``, the last step reported before it, when none survived), the step
    the next attempt resumed from, steps lost (held - resumed), whether it resumed from a snapshot,
    and why the survivors wrote none (if they did not)."""
    from launcher import events
    evs = events.read(run_dir)
    start = next((e for e in evs if e["kind"] == "worker_start" and e["time"] > t), None)
    end = start["time"] if start else float("inf")
    snaps = [e for e in evs if e["kind"] == "snapshot" and t - 1 <= e["time"] <= end]
    held = max((e["step"] for e in snaps if isinstance(e.get("step"), int)), default=seen)
    resumed = start["step"] if start else None
    first = next((ts for _, ts in step_times(run_dir) if start and ts > start["time"]), None)
    return {"held": held, "seen": seen, "resumed": resumed, "lost": None if resumed is None else held - resumed,
            "snapshot": bool(start and start.get("snapshot")), "recovery_s": None if first is None else first - t,
            "why_not": sorted({e["note"] for e in snaps if not e.get("checkpoint")} - {""})}
