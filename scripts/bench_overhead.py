"""Our own per-step work: the training loop vs a bare loop calling the same train_step, in one run.

For each trainer and world size one job starts (plain ``python`` for one process,
``torchrun --standalone`` for more), builds the trainer once through ``launcher/training.py``'s
``Job`` (the real session: process group, lock, metrics.jsonl, rank 0's progress lines and
TensorBoard, progress reports as under ftrun) and then alternates blocks of ``--block`` steps:

* **bare**: ``trainer.train_step(step)`` and nothing else (its early report of the step's
  metrics to us, ``step_metrics``, switched off);
* **ours**: ``Job.step(step)``: the same ``train_step``, then ``FaultTolerant.end_step``.

Both kinds run the same step indices (the bare block replays the steps the next ours block
takes), so they train on the same batches in the same phase. Checkpoints and evaluation are off
(``checkpoint.interval_steps=0``, ``checkpoint.every_epoch=false``, ``train.eval_every_epoch=false``),
as in the issue's measurement; everything else is the shipped config (``--set`` changes it).

Printed per trainer and world size, medians over the pairs, rank 0's (the ranks run in
lockstep through DDP's gradient all-reduce):

* wall ms/step of the bare and of our blocks, and of (ours - bare) per pair, with its
  interquartile range: the overhead a user sees, and how noisy it was;
* the fastest of our blocks minus the fastest bare block: the least disturbed estimate when
  other processes compete for the CPU;
* (ours - bare) in CPU time of the whole process (all threads: gloo's, TensorBoard's writer):
  our own work, unaffected by other processes taking the CPU (use it on a busy machine);
* CPU time of the training thread inside ``end_step`` per step;
* sync points (one small collective each, ``launcher/steps.py``) per 100 steps.

Usage::

    python scripts/bench_overhead.py                       # both trainers, world sizes 1 and 2
    python scripts/bench_overhead.py --trainers encoder --world-sizes 2 --pairs 9 --block 200
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OFF = ["--set", "checkpoint.interval_steps=0", "--set", "checkpoint.every_epoch=false",
       "--set", "train.eval_every_epoch=false", "--set", "train.max_steps=1000000000"]


# ---------------------------------------------------------------------------- one job (every rank)

def worker(args: argparse.Namespace) -> None:
    from launcher.config import load_config
    from launcher.training import Job, RunOptions, open_run

    cfg = load_config(REPO / "configs" / f"{args.trainer}.yaml", [*args.overrides, *OFF[1::2]])
    opts = RunOptions(run_dir=Path(args.run_dir))
    with open_run(cfg, opts) as ft:
        job = Job(cfg, opts, ft)
        job.start()
        own = [0.0]
        end_step = ft.end_step

        def timed_end_step(*a, **kw):
            t = time.thread_time()
            try:
                return end_step(*a, **kw)
            finally:
                own[0] += time.thread_time() - t

        ft.end_step = timed_end_step
        syncs = [0]
        sync = ft._steps.sync

        def counted_sync(*a, **kw):
            syncs[0] += 1
            return sync(*a, **kw)

        ft._steps.sync = counted_sync
        for _ in range(args.warmup):
            job.step(ft.step)
        rows = []
        for _ in range(args.pairs):
            first = ft.step
            report = getattr(job.trainer, "report", None)
            if report is not None:  # the bare loop without our early metrics report (it is our work)
                job.trainer.report = lambda **metrics: None
            wall, cpu = time.perf_counter(), time.process_time()
            for i in range(args.block):
                job.trainer.train_step(first + i)
            bare, bare_cpu = time.perf_counter() - wall, time.process_time() - cpu
            if report is not None:
                job.trainer.report = report
            own[0], syncs[0] = 0.0, 0
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.block):
                job.step(ft.step)
            ours, ours_cpu = time.perf_counter() - wall, time.process_time() - cpu
            rows.append({"bare": bare / args.block, "ours": ours / args.block, "bare_cpu": bare_cpu / args.block,
                         "ours_cpu": ours_cpu / args.block, "own": own[0] / args.block,
                         "syncs": syncs[0] * 100 / args.block})
        if ft.is_main:
            Path(args.out).write_text(json.dumps({"rows": rows, "world_size": ft.world_size}))


# ---------------------------------------------------------------------------- the driver

def run_job(trainer: str, world: int, args: argparse.Namespace, workdir: Path) -> dict:
    out = workdir / f"{trainer}-{world}.json"
    me = [str(Path(__file__).resolve()), "--worker", "--trainer", trainer,
          "--run-dir", str(workdir / f"{trainer}-{world}"),
          "--out", str(out), "--pairs", str(args.pairs), "--block", str(args.block), "--warmup", str(args.warmup)]
    for o in args.overrides:
        me += ["--set", o]
    cmd = [sys.executable, *me] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *me]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FTRUN_PROGRESS_FILE": str(workdir / "progress-{rank}.json")}
    log = workdir / f"{trainer}-{world}.log"
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=args.timeout).returncode
    if code != 0 or not out.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"{trainer} at world size {world} failed (exit {code}):\n{tail}")
    return json.loads(out.read_text())


def summarise(result: dict) -> dict:
    rows = result["rows"]

    def ms(values) -> float:
        return statistics.median(values) * 1e3

    diffs = sorted(r["ours"] - r["bare"] for r in rows)
    q1, _, q3 = statistics.quantiles(diffs, n=4) if len(diffs) >= 2 else (diffs[0], 0, diffs[0])
    return {"bare": ms(r["bare"] for r in rows), "ours": ms(r["ours"] for r in rows), "overhead": ms(diffs),
            "best_of": (min(r["ours"] for r in rows) - min(r["bare"] for r in rows)) * 1e3,
            "overhead_iqr": (q3 - q1) * 1e3, "overhead_cpu": ms(r["ours_cpu"] - r["bare_cpu"] for r in rows),
            "own": ms(r["own"] for r in rows), "syncs": statistics.median(r["syncs"] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trainers", default="encoder,recommender")
    p.add_argument("--world-sizes", default="1,2")
    p.add_argument("--pairs", type=int, default=7, help="bare/ours block pairs per job")
    p.add_argument("--block", type=int, default=100, help="steps per block")
    p.add_argument("--warmup", type=int, default=30, help="steps before the first block")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every job, e.g. --set train.log_interval=50")
    p.add_argument("--timeout", type=float, default=900, help="seconds per job")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--trainer", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.out = str(args.out)
        worker(args)
        return 0
    import torch
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, load average {load:.1f} at start; "
          f"{args.pairs} pairs of {args.block}-step blocks per job, checkpoints and evaluation off")
    table = []
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        for trainer in args.trainers.split(","):
            for world in map(int, args.world_sizes.split(",")):
                table.append((trainer, world, summarise(run_job(trainer, world, args, Path(tmp)))))
    print(f"load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| trainer | world size | bare loop ms/step | ours ms/step | ours - bare, wall ms/step (IQR) "
          "| fastest ours - fastest bare | ours - bare, CPU ms/step | end_step CPU ms/step | syncs per 100 steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for trainer, world, s in table:
        print(f"| {trainer} | {world} | {s['bare']:.3f} | {s['ours']:.3f} | {s['overhead']:+.3f} "
              f"({s['overhead_iqr']:.3f}) | {s['best_of']:+.3f} | {s['overhead_cpu']:+.3f} | {s['own']:.3f} "
              f"| {s['syncs']:.0f} |")
    if args.out:
        args.out.write_text(json.dumps([{"trainer": t, "world_size": w, **s} for t, w, s in table], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
