"""Goodput under failures, ftrun vs stock torchrun: the same job uninterrupted, then with a failure every 30 s.

The job: ``launcher/run.py`` with the shipped config of ``--trainer`` (a checkpoint every 20 steps
and at each epoch end, evaluation at each epoch end), ``train.max_steps=--steps``, on two
"nodes" on 127.0.0.1 (one agent each, ``--nproc_per_node=--workers``, c10d rendezvous,
``tests/agent_cluster.py``). Stock torchrun gets what ``docs/failures.md`` advises for restarts
(``--max_restarts``, ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``); ftrun its defaults. Both run the
same worker code, so both get the survivors' just-in-time snapshots; what differs is the agent.

With failures, one strikes every ``--every`` seconds of wall time from the job's start,
alternating: SIGKILL one worker (of the second node); SIGKILL a whole node (agent and workers;
never the first node, which hosts the rendezvous store) and start a replacement with the same
command 2 s later. A run that has not finished ``--timeout-factor`` times the uninterrupted wall
time (plus 120 s) after its start is stopped and reported as not finished.

Reported per launcher:

* **goodput** = uninterrupted wall time / wall time with failures, for the same number of steps
  (issue 11's measure for this benchmark; wall time from the first agent's start to the last
  agent's exit);
* steps lost per failure: the step the survivors held (their ``snapshot`` events) minus the step
  the next attempt resumed from; and from how many failures it resumed from a snapshot;
* recovery per failure: from the failure to the first step completed after the workers restarted;
* the run's own goodput (``launcher/goodput.py``, ``docs/failures.md``): the share of the run's wall
  time spent on steps that were kept, for both runs. It also counts start-up, evaluation and saves
  as not training, so it is lower than the ratio above; it is the figure ``ftrun`` and the run
  summary print.

Usage::

    python scripts/bench_goodput.py --steps 6000 --out goodput.json
    python scripts/bench_goodput.py --launchers ftrun --steps 1500 --every 20    # a quick look
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from agent_cluster import Cluster, failure_cost, reported_step, signal_proc, steps_done  # noqa: E402
from helpers import RUN, config_path  # noqa: E402

from launcher import goodput  # noqa: E402


def job(launcher: str, args, workdir: Path) -> tuple[Cluster, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = workdir / "run"
    script = [RUN, "--config", config_path(args.trainer), "--run-dir", str(run_dir),
              "--set", f"train.max_steps={args.steps}"]
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if launcher == "torchrun" else {}
    cluster = Cluster(workdir, script, launcher=launcher, nproc=args.workers, monitor_interval=None, env=env,
                      agent_args=["--max_restarts=50"])
    return cluster, run_dir


def attempt(launcher: str, args, workdir: Path, strike_every: float | None, limit: float) -> dict:
    """Run the job to its end (or ``limit`` seconds); strike every ``strike_every`` s if given."""
    c, run_dir = job(launcher, args, workdir)
    serial, strikes = 1, []
    t0 = time.time()
    try:
        c.start_node("n1")
        c.wait_store(120)
        c.start_node("n2")
        next_strike = t0 + strike_every if strike_every else float("inf")
        while time.time() - t0 < limit:
            live = [n for n, p in c.nodes.items() if p.poll() is None]
            if not live:
                break
            if time.time() >= next_strike and len(live) == 2 and steps_done(run_dir) < args.steps:
                kind = "worker" if len(strikes) % 2 == 0 else "node"
                seen, t = reported_step(run_dir), time.time()
                if kind == "worker":
                    signal_proc(c.workers(live[-1])[-1], signal.SIGKILL)
                else:
                    c.kill_node(live[-1])
                    time.sleep(2.0)
                    serial += 1
                    c.start_node(f"n{serial + 1}")
                strikes.append({"kind": kind, "time": t, "seen": seen})
                next_strike += strike_every
            time.sleep(0.2)
        finished = (run_dir / "checkpoints" / f"step_{args.steps:08d}").is_dir()
        wall = time.time() - t0
    finally:
        c.close()
    costs = [{**s, **failure_cost(run_dir, s["time"], s["seen"])} for s in strikes]
    own = goodput.of_run(run_dir, time.time())
    return {"launcher": launcher, "finished": finished, "wall_s": wall, "steps": steps_done(run_dir),
            "failures": costs, "own_goodput": own.fraction if own else None}


def summarize(clean: dict, struck: dict) -> dict:
    lost = [f["lost"] for f in struck["failures"] if f["lost"] is not None]
    rec = [f["recovery_s"] for f in struck["failures"] if f["recovery_s"] is not None]
    return {"launcher": clean["launcher"], "clean_wall_s": clean["wall_s"], "struck_wall_s": struck["wall_s"],
            "finished": struck["finished"], "steps_reached": struck["steps"],
            "goodput": clean["wall_s"] / struck["wall_s"] if struck["finished"] and clean["finished"] else None,
            "failures": len(struck["failures"]),
            "kinds": {k: sum(1 for f in struck["failures"] if f["kind"] == k) for k in ("worker", "node")},
            "lost": lost, "from_snapshot": sum(1 for f in struck["failures"] if f["snapshot"]),
            "recovery": {k: [f["recovery_s"] for f in struck["failures"] if f["kind"] == k and f["recovery_s"]]
                         for k in ("worker", "node")},
            "unrecovered": len(struck["failures"]) - len(rec),
            "own_goodput": (clean["own_goodput"], struck["own_goodput"])}


def _med(values: list[float]) -> str:
    return f"{statistics.median(values):.1f}" if values else "-"


def table(rows: list[dict], args) -> str:
    out = ["| launcher | uninterrupted (s) | with failures (s) | failures (worker + node) | **goodput** "
           "| steps lost per failure (median / max) | resumed from a snapshot | recovery median, worker / node (s) "
           "| run's own goodput, uninterrupted / with failures |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        good = f"**{r['goodput']:.3f}**" if r["goodput"] is not None else \
            f"not finished (step {r['steps_reached']} of {args.steps} after {r['struck_wall_s']:.0f} s)"
        lost = f"{statistics.median(r['lost']):g} / {max(r['lost'])}" if r["lost"] else "-"
        own = " / ".join(f"{100 * g:.1f} %" if g is not None else "-" for g in r["own_goodput"])
        unrec = f" ({r['unrecovered']} never recovered)" if r["unrecovered"] else ""
        out.append(f"| {r['launcher']} | {r['clean_wall_s']:.1f} | {r['struck_wall_s']:.1f} "
                   f"| {r['failures']} ({r['kinds']['worker']} + {r['kinds']['node']}){unrec} | {good} | {lost} "
                   f"| {r['from_snapshot']} of {r['failures']} | {_med(r['recovery']['worker'])} / "
                   f"{_med(r['recovery']['node'])} | {own} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--launchers", default="ftrun,torchrun", help="comma-separated: ftrun, torchrun")
    p.add_argument("--trainer", default="encoder", choices=["encoder", "recommender"])
    p.add_argument("--workers", type=int, default=1, help="workers per node (default 1)")
    p.add_argument("--steps", type=int, default=6000, help="train.max_steps (default 6000: minutes on 2 cores)")
    p.add_argument("--every", type=float, default=30.0, help="seconds between failures (default 30)")
    p.add_argument("--timeout-factor", type=float, default=3.0,
                   help="stop a run with failures after this many times the uninterrupted wall time, plus 120 s")
    p.add_argument("--out", type=Path, default=None, help="also write the runs as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the jobs' directories and logs")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-goodput-"))
    rows, raw = [], []
    try:
        for launcher in args.launchers.split(","):
            clean = attempt(launcher, args, root / f"{launcher}-clean", None, 3600)
            print(f"  {launcher}: uninterrupted {clean['wall_s']:.1f} s "
                  f"({'finished' if clean['finished'] else 'NOT finished'})", flush=True)
            limit = args.timeout_factor * clean["wall_s"] + 120
            struck = attempt(launcher, args, root / f"{launcher}-failures", args.every, limit)
            for f in struck["failures"]:
                recovery = "never" if f["recovery_s"] is None else f"{f['recovery_s']:.1f} s"
                print(f"    {f['kind']:6s} at step {f['seen']}: held {f['held']}, resumed {f['resumed']} "
                      f"({'snapshot' if f['snapshot'] else 'periodic checkpoint'}), lost {f['lost']}, "
                      f"recovery {recovery}", flush=True)
            rows.append(summarize(clean, struck))
            raw.append({"clean": clean, "struck": struck})
            print(f"  {launcher}: with failures {struck['wall_s']:.1f} s "
                  f"({'finished' if struck['finished'] else 'NOT finished'})", flush=True)
            if args.out:
                args.out.write_text(json.dumps(raw, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.trainer}, 2 nodes x {args.workers} worker(s), {args.steps} steps, a failure every "
          f"{args.every:g} s; measured {time.strftime('%Y-%m-%d %H:%M')}:\n")
    print(table(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
