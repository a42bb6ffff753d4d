"""Train one of our trainers, or your own, with exact resume from verified checkpoints.

Usage::

    python launcher/run.py --config configs/encoder.yaml --run-dir runs/enc1
    torchrun --nproc_per_node=2 launcher/run.py --config configs/encoder.yaml --run-dir runs/enc1
    torchrun --nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d --rdzv_endpoint=127.0.0.1:29400 \\
        launcher/run.py --config configs/recommender.yaml --run-dir runs/rec1

Run the same command again after any failure: it resumes from the latest verified
checkpoint in ``--run-dir`` and ends bit-for-bit where an uninterrupted run would.

Rerunning a finished run says so and changes nothing. Ctrl-C stops at once with one line
(``Interrupted at step N; latest verified checkpoint step M; ...``); a lost peer process or
node ends this one with one line too. Their tracebacks go to ``RUN_DIR/logs/rank<N>.log``.

Exit codes (the same as the ``ckpt`` tools', ``launcher/exit_codes.py``): 0 done (or already
done), 2 bad command line, config or data, 3 checkpoint or run-directory problem (none valid,
architecture mismatch, run directory in use, read-only or full), 75 preempted after a
checkpoint, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (torchrun launcher/run.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launcher import env as cluster_env
from launcher import exit_codes
from launcher.config import ConfigError, load_config
from launcher.endings import InterruptFlag
from launcher.preempt import PreemptionFlag


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launcher/run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML run config (configs/encoder.yaml, configs/recommender.yaml)")
    p.add_argument("--run-dir", required=True, type=Path,
                   help="directory for checkpoints, metrics and logs; rerunning with the same one resumes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=60 (repeatable; wins over the file)")
    p.add_argument("--resume", default="auto", metavar="{auto,none,best,PATH}",
                   help="auto: latest verified checkpoint if any, else fresh (default); none: fresh, refused if "
                        "checkpoints exist; best: the best checkpoint; PATH: that checkpoint directory")
    p.add_argument("--reset-optimizer", action="store_true",
                   help="load weights only; fresh optimizer and lr schedule (e.g. after fixing a wrong lr)")
    p.add_argument("--restart-schedule", action="store_true",
                   help="on resume, keep the optimizer state but start the lr schedule again (warmup, then decay "
                        "to train.max_steps); without it an extended run's lr goes on smoothly")
    p.add_argument("--init-from", type=Path, default=None, metavar="PATH",
                   help="staged training: start this new run from another run's checkpoint (or its newest one) "
                        "with this config; weights only unless --init-optimizer. Ignored once the run has "
                        "checkpoints of its own, so rerunning the same command resumes")
    p.add_argument("--init-optimizer", action="store_true",
                   help="with --init-from: also take the optimizer state (the lr schedule starts anew)")
    p.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="console log level (default: INFO on rank 0, WARNING on other ranks)")
    return p


def main(argv: list[str] | None = None) -> int:
    interrupt = InterruptFlag()
    interrupt.install()
    try:
        return _main(argv, interrupt)
    except KeyboardInterrupt:  # before training began, or a second Ctrl-C while stopping
        if not interrupt.reported:
            when = "before training started" if interrupt.count <= 1 else "while stopping"
            print(f"Interrupted {when}; run the same command to start or resume", file=sys.stderr)
        return exit_codes.INTERRUPTED


def _main(argv: list[str] | None, interrupt: InterruptFlag) -> int:
    # torch's C++ warnings (a store connection closed, with a C++ stack) repeat what the one-line
    # report of a lost peer says; they stay available with TORCH_CPP_LOG_LEVEL=WARNING. Read by
    # torch when it is first imported, below.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    # Set the preemption signals first: a worker forked by ftrun's warm-start server inherits
    # them ignored. SIGUSR1 during start-up still leads to a checkpoint after the first step;
    # SIGTERM ends a starting worker at once (a teardown, launcher/preempt.py) until training begins.
    preempt = PreemptionFlag()
    try:
        preempt.install(cluster_env.detect().preempt_signals)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.CONFIG_ERROR
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.init_optimizer and args.init_from is None:
        parser.error("--init-optimizer needs --init-from PATH")
    if args.init_from is not None and args.resume not in ("auto", "none"):
        parser.error(f"--init-from starts a new run; it cannot be combined with --resume {args.resume}")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.CONFIG_ERROR
    from launcher.training import RunOptions, run  # late: torch import only once the config is good
    from trainers.common import DataError
    try:
        return run(cfg, RunOptions(run_dir=args.run_dir, resume=args.resume, reset_optimizer=args.reset_optimizer,
                                   log_level=args.log_level, init_from=args.init_from,
                                   init_optimizer=args.init_optimizer, restart_schedule=args.restart_schedule),
                   preempt, interrupt)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.CONFIG_ERROR


if __name__ == "__main__":
    sys.exit(main())
