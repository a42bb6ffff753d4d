"""Issue 11's targets, trial by trial: the work each failure loses, and a run still bit-exact at the end.

For each case (trainer x nodes x workers x failure) one uninterrupted reference job and one job
struck ``--trials`` times, both with the shipped config (``configs/<trainer>.yaml``: a checkpoint
every 20 steps and at each epoch end, evaluation at each epoch end) and ``train.max_steps=--steps``.
The struck job runs on two ``ftrun`` agents on 127.0.0.1 ("nodes", c10d rendezvous,
``--nproc_per_node`` 1 or 2, ``tests/agent_cluster.py``); the reference on one ``ftrun
--standalone`` with as many workers (the same world size, the same ranks).

A failure strikes at a random moment, ``--gap`` seconds (uniform) of training after the job
recovered from the previous one:

* ``worker``: SIGKILL one worker (a random worker of a random node);
* ``node``: SIGKILL a whole node (agent and workers; never the one hosting the rendezvous
  store), and start a replacement with the same command 2 s later;
* ``all``: SIGKILL every process of the job, and start both nodes again 2 s later.

Per failure: the step the survivors held (their ``snapshot`` events; for ``all``, the highest
step the ranks had reported in their progress files), the step the job resumed from (the next
``worker_start``), **steps lost** = held - resumed, and whether a snapshot was used or why not.
At the end the struck job's final checkpoint (weights, optimizer, lr schedule), epoch history and
every ``metrics.jsonl`` record are compared with the reference's.

``window`` is not random: two ranks under stock torchrun, rank 1 killed by a failpoint
(``launcher/checkpoint/faults.py``) as the evaluation at the end of step 28 begins (an epoch end
at world size 2). The evaluation needs every rank, so the survivor cannot finish it; its snapshot
marks it pending and the rerun runs it before its first step. Shown end to end.

Every process is started in its own session and ended through it (never by name); every wait
is bounded. Usage::

    python scripts/snapshot_trials.py --trials 10 --out trials.json
    python scripts/snapshot_trials.py --cases encoder:1:worker --trials 2 --steps 400
    python scripts/snapshot_trials.py --table trials.json
"""

from __future__ import annotations

import argparse
import json
import random
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

from agent_cluster import Cluster, failure_cost, reported_step, signal_proc, step_times  # noqa: E402
from helpers import PY, RUN, checkpoint_tensors, child_env, config_path, run, tail, train_cmd  # noqa: E402

from launcher import events  # noqa: E402
from launcher.checkpoint import faults  # noqa: E402
from launcher.metrics import read_records  # noqa: E402

DEFAULT_CASES = [f"{t}:{w}:{f}" for f in ("worker", "node") for t in ("encoder", "recommender") for w in (1, 2)]
KEYS = ("model", "optim", "lr_schedule", "lr_control", "task_scheduler", "task_scheduler_optim", "moving_avg_reward",
        "data_norm")


def script(trainer: str, run_dir: Path, steps: int) -> list[str]:
    return [RUN, "--config", config_path(trainer), "--run-dir", str(run_dir), "--set", f"train.max_steps={steps}"]


def reference(trainer: str, world: int, steps: int, workdir: Path, timeout: float) -> Path:
    run_dir = workdir / f"ref-{trainer}-{world}"
    if not (run_dir / "checkpoints" / f"step_{steps:08d}").is_dir():
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [PY, "-m", "launcher", "--standalone", f"--nproc_per_node={world}", "--max_restarts=0",
               *script(trainer, run_dir, steps)]
        if run(cmd, workdir / f"ref-{trainer}-{world}.log", timeout=timeout) != 0:
            raise SystemExit(f"reference run failed:\n{tail(workdir / f'ref-{trainer}-{world}.log')}")
    return run_dir


def compare(ref: Path, run_dir: Path, steps: int) -> str:
    """"bit-exact", or what differs first."""
    name = f"step_{steps:08d}"
    if not (run_dir / "checkpoints" / name).is_dir():
        return "did not finish"
    a, b = checkpoint_tensors(ref / "checkpoints" / name), checkpoint_tensors(run_dir / "checkpoints" / name)
    for key in sorted(k for k in a if k.startswith(KEYS)):
        if not _equal(a[key], b.get(key)):
            return f"{key} differs"
    if json.loads(a["progress"])["history"] != json.loads(b["progress"])["history"]:
        return "epoch history differs"
    strip = lambda d: [{k: v for k, v in r.items() if k != "time"} for r in read_records(d)]  # noqa: E731
    return "bit-exact" if strip(ref) == strip(run_dir) else "metrics.jsonl differs"


def _equal(x, y) -> bool:
    import torch
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and torch.equal(x, y)
    return x == y


class StruckJob:
    """One case's job on two agents, and the failures struck at it."""

    def __init__(self, trainer: str, workers: int, failure: str, steps: int, workdir: Path, trials: int):
        self.trainer, self.failure, self.steps = trainer, failure, steps
        self.run_dir = workdir / "run"
        self.cluster = Cluster(workdir, script(trainer, self.run_dir, steps), nproc=workers, monitor_interval=None,
                               agent_args=[f"--max_restarts={2 * trials + 3}", "--hang-timeout=120"])
        self.serial = 0

    def node(self) -> str:
        self.serial += 1
        name = f"n{self.serial}"
        self.cluster.start_node(name)
        return name

    def start(self, timeout: float) -> None:
        self.node()
        self.cluster.wait_store(timeout)
        self.node()

    def live(self) -> list[str]:
        return [n for n, p in self.cluster.nodes.items() if p.poll() is None]

    def strike(self, rng: random.Random) -> tuple[float, int]:
        """Inflict the case's failure; return its time and the highest step reported just before."""
        c, live = self.cluster, self.live()
        seen = reported_step(self.run_dir)
        t = time.time()
        if self.failure == "worker":
            signal_proc(rng.choice(c.workers(rng.choice(live))), signal.SIGKILL)
        elif self.failure == "node":
            c.kill_node(live[-1])  # the newest node: never the store host (the first one to start)
            time.sleep(2.0)
            self.node()
        else:  # all
            for name in live:
                c.kill_node(name)
            time.sleep(2.0)
            self.start(60)
        return t, seen

    def recovered(self, t: float, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            starts = [e["time"] for e in events.read(self.run_dir) if e["kind"] == "worker_start" and e["time"] > t]
            if starts and any(ts > starts[0] for _, ts in step_times(self.run_dir)):
                return True
            if not self.live():
                return False
            time.sleep(0.2)
        return False


def run_case(case: str, args, root: Path, rng: random.Random) -> dict:
    trainer, workers, failure = case.split(":")
    workers = int(workers)
    workdir = root / case.replace(":", "-")
    workdir.mkdir(parents=True, exist_ok=True)
    ref = reference(trainer, 2 * workers, args.steps, root, args.timeout * 4)
    job = StruckJob(trainer, workers, failure, args.steps, workdir, args.trials)
    trials: list[dict] = []
    try:
        job.start(args.timeout)
        if not job.recovered(0.0, args.timeout * 2):
            raise SystemExit(f"{case}: the job did not start\n{job.cluster.tails()}")
        while len(trials) < args.trials:
            time.sleep(rng.uniform(*args.gap))
            if not job.live() or reported_step(job.run_dir) > args.steps * 0.9:
                break  # the run is (nearly) over: no room for another trial
            t, seen = job.strike(rng)
            ok = job.recovered(t, args.timeout)
            trials.append({"case": case, "time": t, "recovered": ok, **failure_cost(job.run_dir, t, seen)})
            row = trials[-1]
            print(f"  {case:26s} trial {len(trials)}: held step {row['held']}, resumed from {row['resumed']} "
                  f"({'snapshot' if row['snapshot'] else 'periodic checkpoint'}), lost {row['lost']}"
                  f"{'; ' + '; '.join(row['why_not']) if row['why_not'] and not row['snapshot'] else ''}", flush=True)
            if not ok:
                break
        codes = job.cluster.wait_all(args.timeout * 4)
    finally:
        job.cluster.close()
    result = compare(ref, job.run_dir, args.steps)
    print(f"  {case:26s} {len(trials)} trial(s); final state vs the reference: {result} (agents exited {codes})",
          flush=True)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"case": case, "trials": trials, "final": result}


def window(args, root: Path) -> dict:
    """Rank 1 killed as an epoch-end evaluation begins: a snapshot with the evaluation pending."""
    extra = ["--set", "train.max_steps=48", "--set", "train.log_interval=10", "--set", "checkpoint.interval_steps=20",
             "--set", "checkpoint.every_epoch=false"]
    ref_dir, run_dir = root / "window-ref", root / "window"
    if run(train_cmd("encoder", ref_dir, 2, extra), root / "window-ref.log", timeout=args.timeout * 4) != 0:
        raise SystemExit(tail(root / "window-ref.log"))
    env = child_env(**{faults.ENV: "evaluation:28:1"})
    first = run(train_cmd("encoder", run_dir, 2, extra), root / "window.log", timeout=args.timeout * 4, env=env)
    second = run(train_cmd("encoder", run_dir, 2, extra), root / "window-2.log", timeout=args.timeout * 4)
    t = next(e["time"] for e in events.read(run_dir) if e["kind"] == "snapshot")
    row = {"case": "window", "time": t, "recovered": second == 0 and first != 0, **failure_cost(run_dir, t, 0)}
    result = compare(ref_dir, run_dir, 48)
    print(f"  window: held step {row['held']}, resumed from {row['resumed']} "
          f"({'snapshot' if row['snapshot'] else 'periodic checkpoint'}); {'; '.join(row['why_not'])}; "
          f"final state vs the reference: {result}", flush=True)
    return {"case": "window", "trials": [row], "final": result}


def table(results: list[dict]) -> str:
    out = ["| case (trainer : workers per node : failure) | trials | lost <= 1 step | resumed from a snapshot "
           "| steps lost per failure (median / max) | final state vs uninterrupted |", "|---|---|---|---|---|---|"]
    for r in results:
        lost = [t["lost"] for t in r["trials"] if t["lost"] is not None]
        ok = sum(1 for x in lost if x <= 1)
        snap = sum(1 for t in r["trials"] if t["snapshot"])
        spread = f"{statistics.median(lost):g} / {max(lost)}" if lost else "-"
        unrec = sum(1 for t in r["trials"] if not t["recovered"])
        note = f" ({unrec} not recovered)" if unrec else ""
        out.append(f"| {r['case']} | {len(r['trials'])}{note} | {ok} of {len(r['trials'])} | {snap} | {spread} "
                   f"| {r['final']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(DEFAULT_CASES + ["encoder:1:all", "window"]),
                   help="comma-separated TRAINER:WORKERS_PER_NODE:FAILURE (worker, node, all), or window")
    p.add_argument("--trials", type=int, default=10, help="failures per case (default 10)")
    p.add_argument("--steps", type=int, default=900, help="train.max_steps of every job (default 900)")
    p.add_argument("--gap", type=float, nargs=2, default=(1.5, 4.0), metavar=("MIN", "MAX"),
                   help="seconds of training between a recovery and the next failure (uniform; default 1.5 4)")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds before a failure counts as unrecovered")
    p.add_argument("--seed", type=int, default=None, help="seed of the random moments (default: printed)")
    p.add_argument("--out", type=Path, default=None, help="also write every trial as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the jobs' directories and logs")
    p.add_argument("--table", type=Path, nargs="+", default=None, metavar="JSON",
                   help="print the table of earlier runs' --out files, run nothing")
    args = p.parse_args(argv)
    if args.table:
        print(table([r for path in args.table for r in json.loads(path.read_text())]))
        return 0
    seed = args.seed if args.seed is not None else time.time_ns() % 100_000
    print(f"seed {seed}; {args.trials} trial(s) per case; train.max_steps={args.steps}", flush=True)
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="snapshot-trials-"))
    results = []
    try:
        for case in args.cases.split(","):
            results.append(window(args, root) if case == "window" else run_case(case, args, root, rng))
            if args.out:
                args.out.write_text(json.dumps(results, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\nseed {seed}, measured {time.strftime('%Y-%m-%d %H:%M')}:\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
