"""Recovery time in every topology, stock torchrun vs ftrun: the same job, the same failures.

The matrix (issue 9): rendezvous {``--standalone`` (one node), c10d across 2 nodes, static across
2 nodes (``--master_addr/--master_port/--node_rank``)} x workers per node {1, 2} x launcher
{ftrun, torchrun} x failure:

* ``worker``: SIGKILL one worker (the last worker of the last node).
* ``node``: SIGKILL a whole node (agent and workers; never the store host) and start a
  replacement with the same command 2 s later. With ``--standalone`` the node is the job: the
  replacement is the same command run again.
* ``hang``: SIGSTOP one worker (ftrun only: torchrun has no hang detection; the worker stays
  stopped, ftrun must find it and restart the group with ``--hang-timeout``).
* ``shrink``, ``store_host`` (c10d only, not in the default matrix): ``--nnodes=1:2`` and a node
  lost for good; the node hosting the rendezvous store lost, replaced 2 s later.

Each "node" is one agent on 127.0.0.1 (``tests/agent_cluster.py``); the job is the encoder
trainer with its shipped config (``configs/encoder.yaml``: the default model, a checkpoint every
20 steps and at each epoch end), torch's default ``--monitor-interval``. A cell's job is struck
``--trials`` times, ``--gap`` seconds of training apart. Per trial:

* **recovery**: from the failure to the first step completed after the workers restarted (rank
  0's ``metrics.jsonl``, after its next ``worker_start`` event); for ``node`` also from the
  replacement's start. No such step within ``--timeout``: unrecovered, and the cell goes on with
  a fresh job (after ``--give-up`` unrecovered trials in a row it is abandoned);
* **failed attempts**: attempts of the worker group that failed beyond the one the failure
  struck (most on any surviving node: torch's "failed (exitcode: ...)" lines, ftrun's hang restarts);
* **30 s waits**: torch's "forcefully exiting via SIGKILL" after a SIGTERM teardown timed out;
* **steps lost**: the last step completed before the failure minus the step resumed from.

Every process is started in its own session and ended through it (never by name); every wait
is bounded, and the cell's processes are killed whatever happens.

Usage::

    python scripts/bench_recovery.py --trials 5 --out bench_recovery.json
    python scripts/bench_recovery.py --rdzv static --workers 2 --failures worker --trials 1
    python scripts/bench_recovery.py --trials 2 --table ftrun.json torchrun.json   # print saved runs
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from agent_cluster import Cluster, signal_proc, step_times  # noqa: E402
from helpers import RUN, config_path  # noqa: E402

from launcher import events  # noqa: E402

RDZV = ["standalone", "c10d", "static"]
FAILURES = ["worker", "node", "hang"]
EXTRA_FAILURES = ["shrink", "store_host"]  # c10d only
LAUNCHERS = ["ftrun", "torchrun"]
# One per failed attempt, logged by torch's agent (both launchers) at ERROR; ftrun's own for a hang.
ATTEMPT_FAILED = re.compile(r"failed \(exitcode: |ftrun: restarting workers \(a worker hung\)")
SIGKILL_AFTER_TERM = "forcefully exiting via"


@dataclass(frozen=True)
class Cell:
    rdzv: str
    workers: int  # per node
    launcher: str
    failure: str

    @property
    def nodes(self) -> int:
        return 1 if self.rdzv == "standalone" else 2

    def label(self) -> str:
        return f"{self.rdzv} {self.nodes}x{self.workers} {self.launcher} {self.failure}"


def cells(rdzvs, workers, launchers, failures) -> list[Cell]:
    out = []
    for rdzv, w, launcher, failure in itertools.product(rdzvs, workers, launchers, failures):
        if failure == "hang" and launcher == "torchrun":
            continue  # no hang detection: it would wait for the collective timeout
        if failure in EXTRA_FAILURES and rdzv != "c10d":
            continue
        out.append(Cell(rdzv, w, launcher, failure))
    return out


def script(run_dir: Path, config: str) -> list[str]:
    return [RUN, "--config", config, "--run-dir", str(run_dir), "--set", "train.max_steps=1000000",
            "--set", "train.log_interval=10"]


@dataclass
class Job:
    """One cell's job: a cluster of agents and its node names."""

    cell: Cell
    workdir: Path
    args: argparse.Namespace
    cluster: Cluster = field(init=False)
    serial: int = 0

    def __post_init__(self) -> None:
        self.run_dir = self.workdir / "run"
        self.workdir.mkdir(parents=True, exist_ok=True)
        agent_args = [f"--max_restarts={self.args.trials + 3}"]
        if self.cell.launcher == "ftrun":
            agent_args.append(f"--hang-timeout={self.args.hang_timeout}")
        nnodes = "1:2" if self.cell.failure == "shrink" else str(self.cell.nodes)
        self.cluster = Cluster(self.workdir, script(self.run_dir, self.args.config), nnodes=nnodes,
                               launcher=self.cell.launcher, agent_args=agent_args, rdzv=self.cell.rdzv,
                               nproc=self.cell.workers, monitor_interval=None)

    @property
    def world(self) -> int:
        return self.cell.nodes * self.cell.workers

    def new_node(self, node_rank: int) -> str:
        self.serial += 1
        name = f"n{node_rank}-{self.serial}"
        self.cluster.start_node(name, node_rank=node_rank)
        return name

    def start(self) -> bool:
        self.new_node(0)
        if self.cell.nodes == 2:
            if self.cell.rdzv != "standalone":
                self.cluster.wait_store()
            self.new_node(1)
        return self.wait_size(self.world, self.args.timeout * 3)

    def live(self) -> list[str]:
        return [n for n, p in self.cluster.nodes.items() if p.poll() is None]

    def store_host(self) -> str | None:
        for name in self.live():
            try:
                procs = [psutil.Process(self.cluster.nodes[name].pid)]
                procs += procs[0].children(recursive=True)
                for p in procs:
                    if any(c.laddr.port == self.cluster.port and c.status == psutil.CONN_LISTEN
                           for c in p.net_connections("tcp")):
                        return name
            except psutil.NoSuchProcess:
                continue
        return None

    def wait_size(self, size: int, timeout: float) -> bool:
        """Wait for a worker start at ``size`` and a step after it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            starts = [e for e in events.read(self.run_dir) if e["kind"] == "worker_start"]
            if starts and starts[-1]["world_size"] == size \
                    and any(t > starts[-1]["time"] for _, t in step_times(self.run_dir)):
                return True
            time.sleep(0.2)
        return False

    def recovery(self, t_fail: float, timeout: float) -> tuple[float | None, int | None]:
        """Seconds from ``t_fail`` to the first step after the next worker start, and the step resumed from."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            starts = [e for e in events.read(self.run_dir) if e["kind"] == "worker_start" and e["time"] > t_fail]
            if starts:
                later = [t for _, t in step_times(self.run_dir) if t > starts[0]["time"]]
                if later:
                    return later[0] - t_fail, starts[0].get("step")
            time.sleep(0.05)
        return None, None

    def log_sizes(self) -> dict[str, int]:
        return {n: self.cluster.log(n).stat().st_size if self.cluster.log(n).exists() else 0
                for n in self.cluster.nodes}

    def logs_since(self, sizes: dict[str, int]) -> dict[str, str]:
        out = {}
        for name in self.cluster.nodes:
            with open(self.cluster.log(name), "rb") as f:
                f.seek(sizes.get(name, 0))
                out[name] = f.read().decode(errors="replace")
        return out


def strike(job: Job) -> tuple[float, float | None]:
    """Inflict the cell's failure; return its time and, for replacements, the replacement's start time."""
    c, kind = job.cluster, job.cell.failure
    victim = sorted(job.live(), key=lambda n: (c.node_ranks[n], n))[-1]  # the last node: not the store host
    if kind in ("worker", "hang"):
        worker = c.workers(victim)[-1]
        t = time.time()
        signal_proc(worker, signal.SIGKILL if kind == "worker" else signal.SIGSTOP)
        return t, None
    if kind == "store_host":
        victim = job.store_host() or victim
    t = time.time()
    c.kill_node(victim)
    if kind == "shrink":
        return t, None
    time.sleep(2.0)
    t_rep = time.time()
    job.new_node(c.node_ranks[victim])
    return t, t_rep


def last_step_before(run_dir: Path, t: float) -> int | None:
    steps = [s for s, ts in step_times(run_dir) if ts <= t]
    return max(steps) if steps else None


def trial(job: Job) -> dict:
    sizes = job.log_sizes()
    t, t_rep = strike(job)
    before = last_step_before(job.run_dir, t)
    rec, resumed = job.recovery(t, job.args.timeout)
    time.sleep(0.5)  # let the agents finish logging the restart
    texts = job.logs_since(sizes)
    restarts = max((len(ATTEMPT_FAILED.findall(txt)) for n, txt in texts.items() if n in job.live()), default=0)
    return {"cell": job.cell.label(), "rdzv": job.cell.rdzv, "nodes": job.cell.nodes, "workers": job.cell.workers,
            "launcher": job.cell.launcher, "failure": job.cell.failure, "recovery_s": rec,
            "after_replacement_s": rec - (t_rep - t) if rec is not None and t_rep else None,
            "failed_attempts": max(restarts - 1, 0),  # unrecovered: those that failed within the timeout
            "sigkill_waits": sum(txt.count(SIGKILL_AFTER_TERM) for txt in texts.values()),
            "steps_lost": before - resumed if before is not None and resumed is not None else None,
            "planned": job.args.trials}


def bench(cell: Cell, args, root: Path) -> list[dict]:
    results: list[dict] = []
    in_a_row = 0
    while len(results) < args.trials and in_a_row < args.give_up:
        job = Job(cell, root / f"{cell.label().replace(' ', '-')}-{len(results)}", args)
        try:
            if not job.start():
                print(f"  {cell.label()}: job did not start\n{job.cluster.tails()}", flush=True)
                break
            while len(results) < args.trials and in_a_row < args.give_up:
                time.sleep(args.gap)
                row = trial(job)
                results.append(row)
                rec, rep = row["recovery_s"], row["after_replacement_s"]
                print(f"  {cell.label():32s} trial {len(results)}: "
                      f"{'UNRECOVERED' if rec is None else f'{rec:.1f} s'}"
                      f"{'' if rep is None else f' ({rep:.1f} s after the replacement)'}"
                      f", failed attempts {row['failed_attempts']}, 30-s waits {row['sigkill_waits']}, "
                      f"steps lost {row['steps_lost']}", flush=True)
                if rec is None:
                    in_a_row += 1
                    break  # a fresh job for the next trial
                in_a_row = 0
                if cell.failure == "hang":
                    job.cluster.close()  # the stopped worker is gone with its group; start clean next time
                    break
                if cell.failure == "shrink":  # grow back before the next trial
                    job.new_node(1)
                    if not job.wait_size(2, args.timeout):
                        break
        finally:
            job.cluster.close()
            if not args.keep:
                shutil.rmtree(job.workdir, ignore_errors=True)
    return results


def _fmt(values: list[float]) -> tuple[str, str]:
    return (f"{statistics.median(values):.1f}", f"{max(values):.1f}") if values else ("never", "-")


def table(rows: list[dict], trials: int) -> str:
    out = ["| rendezvous | nodes x workers | failure | launcher | trials | recovered | recovery median / max (s) "
           "| after replacement median (s) | failed attempts | 30-s waits | steps lost (median) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {k: i for i, k in enumerate(RDZV + FAILURES + EXTRA_FAILURES + LAUNCHERS)}
    seen = sorted({r["cell"]: r for r in rows}.values(),
                  key=lambda r: (order[r["rdzv"]], r["workers"], order[r["failure"]], order[r["launcher"]]))
    for label in (r["cell"] for r in seen):
        sel = [r for r in rows if r["cell"] == label]
        first = sel[0]
        ok = [r["recovery_s"] for r in sel if r["recovery_s"] is not None]
        rep = [r["after_replacement_s"] for r in sel if r["after_replacement_s"] is not None]
        lost = [r["steps_lost"] for r in sel if r["steps_lost"] is not None]
        med, mx = _fmt(ok)
        planned = first.get("planned", trials)
        skipped = f" ({planned - len(sel)} not run: gave up)" if len(sel) < planned else ""
        out.append(f"| {first['rdzv']} | {first['nodes']}x{first['workers']} | {first['failure']} "
                   f"| {first['launcher']} | {len(sel)}{skipped} | {len(ok)} | {med} / {mx} "
                   f"| {_fmt(rep)[0] if rep else '-'} "
                   f"| {sum(r['failed_attempts'] or 0 for r in sel)} | {sum(r['sigkill_waits'] for r in sel)} "
                   f"| {statistics.median(lost) if lost else '-'} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=3, help="failures per cell (default 3)")
    p.add_argument("--rdzv", default=",".join(RDZV), help=f"comma-separated subset of {RDZV}")
    p.add_argument("--workers", default="1,2", help="workers per node, comma-separated (default 1,2)")
    p.add_argument("--launchers", default=",".join(LAUNCHERS), help="comma-separated: ftrun, torchrun")
    p.add_argument("--failures", default=",".join(FAILURES),
                   help=f"comma-separated subset of {FAILURES + EXTRA_FAILURES} (default: {','.join(FAILURES)})")
    p.add_argument("--config", default=config_path("encoder"), help="training config (default: the shipped encoder)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a trial counts as unrecovered")
    p.add_argument("--hang-timeout", type=float, default=5.0, help="ftrun --hang-timeout (default 5)")
    p.add_argument("--gap", type=float, default=3.0, help="seconds of training between recovery and the next failure")
    p.add_argument("--give-up", type=int, default=2, help="unrecovered trials in a row before a cell is abandoned")
    p.add_argument("--out", type=Path, default=None, help="also write every trial as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the jobs' directories and logs")
    p.add_argument("--table", type=Path, nargs="+", default=None, metavar="JSON",
                   help="print the table of earlier runs' --out files (one table), run nothing")
    args = p.parse_args(argv)
    if args.table:
        rows = [row for path in args.table for row in json.loads(path.read_text())]
        print(table(rows, args.trials))
        return 0
    lists = {"rdzv": args.rdzv.split(","), "launchers": args.launchers.split(","),
             "failures": args.failures.split(",")}
    bad = [x for x in lists["rdzv"] if x not in RDZV] + [x for x in lists["launchers"] if x not in LAUNCHERS] \
        + [x for x in lists["failures"] if x not in FAILURES + EXTRA_FAILURES]
    try:
        workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        bad.append(args.workers)
        workers = []
    if bad:
        p.error(f"unknown rendezvous, launcher, failure or worker count: {bad}")
    root = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    rows: list[dict] = []
    for cell in cells(lists["rdzv"], workers, lists["launchers"], lists["failures"]):
        rows += bench(cell, args, root)
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nRecovery, {args.trials} trial(s) per cell (timeout {args.timeout:.0f} s), "
          f"logs in {root}{'' if args.keep else ' (removed; --keep keeps them)'}:\n")
    print(table(rows, args.trials))
    return 0


if __name__ == "__main__":
    sys.exit(main())
