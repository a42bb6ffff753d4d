"""Recovery time, stock torchrun vs ftrun: the same job, the same machine, the same failures.

For each launcher and failure kind, one job runs on two local "nodes" (one agent each,
``--nproc_per_node=1``, c10d rendezvous on 127.0.0.1) and is struck ``--trials`` times, a few
seconds apart. A trial's recovery time runs from the moment of the failure to the first step
completed after the workers restarted (rank 0's ``metrics.jsonl``, after its next
``worker_start`` event). A trial with no step within ``--timeout`` seconds is unrecovered; the
job is then torn down and a fresh one takes the remaining trials (after ``--give-up`` unrecovered
trials in a row the kind is abandoned for that launcher, and the table says so).

Failure kinds:

* ``worker_crash``: SIGKILL one worker.
* ``hang``: SIGSTOP one worker (ftrun ``--hang-timeout`` is ``--hang-timeout`` here).
* ``node_replaced``: SIGKILL a whole node (agent and worker, not the store host); a replacement
  agent starts 2 s later. Also reported: time from the replacement's start.
* ``shrink``: ``--nnodes=1:2``; SIGKILL a whole node, no replacement. Between trials the node
  comes back (grow back, not timed).
* ``store_host``: SIGKILL the node hosting the rendezvous store; a replacement starts 2 s later.

Usage::

    python scripts/bench_recovery.py --trials 5 --out bench_recovery.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from agent_cluster import Cluster, script_args, signal_proc, step_times  # noqa: E402

from launcher import events  # noqa: E402

KINDS = ["worker_crash", "hang", "node_replaced", "shrink", "store_host"]
LAUNCHERS = ["torchrun", "ftrun"]


class Job:
    """One benchmark job and its node names (the next replacement is a fresh name)."""

    def __init__(self, workdir: Path, launcher: str, kind: str, hang_timeout: float, max_restarts: int):
        self.run_dir = workdir / "run"
        workdir.mkdir(parents=True, exist_ok=True)
        agent_args = [f"--max_restarts={max_restarts}"]
        if launcher == "ftrun":
            agent_args += [f"--hang-timeout={hang_timeout}"]
        self.cluster = Cluster(workdir, script_args(self.run_dir, steps=1_000_000, interval=25), launcher=launcher,
                               nnodes="1:2" if kind == "shrink" else "2", agent_args=agent_args)
        self.serial = 0

    def new_node(self) -> str:
        self.serial += 1
        name = f"n{self.serial}"
        self.cluster.start_node(name)
        return name

    def start(self, timeout: float) -> bool:
        self.new_node()
        self.cluster.wait_store()
        self.new_node()
        return self.wait_size(2, timeout)

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

    def recovery(self, t_fail: float, timeout: float) -> float | None:
        """Seconds from ``t_fail`` to the first step after the next worker start, or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            starts = [e["time"] for e in events.read(self.run_dir)
                      if e["kind"] == "worker_start" and e["time"] > t_fail]
            if starts:
                later = [t for _, t in step_times(self.run_dir) if t > starts[0]]
                if later:
                    return later[0] - t_fail
            time.sleep(0.1)
        return None


def strike(job: Job, kind: str) -> tuple[float, float | None]:
    """Inflict one failure; return its time and, for replacement kinds, the replacement's start time."""
    c = job.cluster
    victim = job.live()[-1]  # the newest node: never the store host unless asked
    if kind in ("worker_crash", "hang"):
        worker = c.workers(victim)[0]
        t = time.time()
        signal_proc(worker, signal.SIGKILL if kind == "worker_crash" else signal.SIGSTOP)
        return t, None
    if kind == "store_host":
        victim = job.store_host() or job.live()[0]
    t = time.time()
    c.kill_node(victim)
    if kind == "shrink":
        return t, None
    time.sleep(2.0)
    t_rep = time.time()
    job.new_node()
    return t, t_rep


def bench(launcher: str, kind: str, args, root: Path) -> list[dict]:
    results: list[dict] = []
    in_a_row = 0
    while len(results) < args.trials and in_a_row < args.give_up:
        workdir = root / f"{launcher}-{kind}-{len(results)}"
        job = Job(workdir, launcher, kind, args.hang_timeout, max_restarts=args.trials + 2)
        try:
            if not job.start(args.timeout * 2):
                print(f"  {launcher} {kind}: job did not start\n{job.cluster.tails()}", flush=True)
                break
            while len(results) < args.trials and in_a_row < args.give_up:
                time.sleep(args.gap)
                t, t_rep = strike(job, kind)
                rec = job.recovery(t, args.timeout)
                row = {"launcher": launcher, "kind": kind, "recovery_s": rec,
                       "after_replacement_s": (rec - (t_rep - t)) if rec is not None and t_rep else None}
                results.append(row)
                print(f"  {launcher:8s} {kind:13s} trial {len(results)}: "
                      f"{'UNRECOVERED' if rec is None else f'{rec:.1f} s'}", flush=True)
                if rec is None:
                    in_a_row += 1
                    break  # a fresh job for the next trial
                in_a_row = 0
                if kind == "shrink":  # grow back before the next trial
                    job.new_node()
                    if not job.wait_size(2, args.timeout):
                        break
        finally:
            job.cluster.close()
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
    return results


def table(rows: list[dict], trials: int) -> str:
    out = ["| failure | launcher | trials | recovered | median failure -> first step (s) | "
           "median replacement start -> first step (s) |",
           "|---|---|---|---|---|---|"]
    for kind in KINDS:
        for launcher in LAUNCHERS:
            sel = [r for r in rows if r["kind"] == kind and r["launcher"] == launcher]
            if not sel:
                continue
            ok = [r["recovery_s"] for r in sel if r["recovery_s"] is not None]
            rep = [r["after_replacement_s"] for r in sel if r["after_replacement_s"] is not None]
            skipped = f" ({trials - len(sel)} not run: gave up)" if len(sel) < trials else ""
            med = f"{statistics.median(ok):.1f}" if ok else "never"
            med_rep = f"{statistics.median(rep):.1f}" if rep else "-"
            out.append(f"| {kind} | {launcher} | {len(sel)}{skipped} | {len(ok)} | {med} | {med_rep} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=5, help="failures per launcher and kind (default 5)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {KINDS}")
    p.add_argument("--launchers", default=",".join(LAUNCHERS), help="comma-separated: torchrun, ftrun")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds before a trial counts as unrecovered")
    p.add_argument("--hang-timeout", type=float, default=10.0, help="ftrun --hang-timeout for the hang trials")
    p.add_argument("--gap", type=float, default=2.0, help="seconds of training between recovery and next failure")
    p.add_argument("--give-up", type=int, default=2, help="unrecovered trials in a row before abandoning a kind")
    p.add_argument("--out", type=Path, default=None, help="also write every trial as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the jobs' directories and logs")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    launchers = [x for x in args.launchers.split(",") if x]
    bad = [k for k in kinds if k not in KINDS] + [x for x in launchers if x not in LAUNCHERS]
    if bad:
        p.error(f"unknown kind or launcher: {bad}; choose from {KINDS} and {LAUNCHERS}")
    root = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    rows: list[dict] = []
    for kind in kinds:
        for launcher in launchers:
            rows += bench(launcher, kind, args, root)
            if args.out:
                args.out.write_text(json.dumps(rows, indent=1))
    print(f"\nRecovery time, {args.trials} trials per row (timeout {args.timeout:.0f} s), logs in {root}:\n")
    print(table(rows, args.trials))
    return 0


if __name__ == "__main__":
    sys.exit(main())
