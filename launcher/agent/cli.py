"""``ftrun``: torchrun's command line, an agent that survives more failures, and a per-node supervisor.

Usage (every torchrun flag works; ftrun's own flags are listed under "ftrun")::

    ftrun --nnodes=1:2 --nproc_per_node=1 --rdzv_backend=c10d --rdzv_endpoint=HOST:29400 \\
        --rdzv_id=job1 --hang-timeout=600 launcher/run.py --config configs/encoder.yaml --run-dir runs/enc1
    python -m launcher --standalone --nproc_per_node=2 launcher/run.py --config ... --run-dir ...

How it differs from torchrun (details in ``docs/agent.md``):

* restarts on any worker failure (default ``--max_restarts=3``), all ranks together, with
  exponential back-off and a crash-loop guard; exit codes 2, 3 and 75 are not restarted;
* a rank with no progress for ``--hang-timeout`` seconds is a failure: stacks are dumped, then
  the group restarts;
* the survivors of a failure that write a snapshot of the step they hold get up to
  ``--snapshot-grace`` seconds before they are stopped (the next attempt resumes from it);
* c10d rendezvous defaults tuned for failure: dead nodes are dropped after ~3 s
  (``keep_alive_interval=1``) and a smaller group forms 2 s after the minimum is reached
  (``last_call_timeout=2``); each round gets a fresh worker store (no stale keys);
* workers are forked from a server that has already imported torch (``--warm-start``, on for
  ``.py`` scripts), so a restart does not pay for the torch import again;
* if the agent loses the rendezvous store (the node hosting it died), the per-node supervisor
  starts a new agent, which hosts a new store at the same endpoint if it can;
* events go to ``RUN_DIR/events.jsonl`` and a summary is printed at exit;
* the console gets one line per event in plain words; tracebacks and torch's own warnings go
  to ``RUN_DIR/logs/ftrun.log`` (torch's C++ warnings are off unless ``TORCH_CPP_LOG_LEVEL`` is set);
* a run that already finished (``launcher/run.py`` whose checkpoint reached its target) is
  reported in one line before any rendezvous, and nothing is started or written.

Exit codes: 0 all workers finished (or the run had finished already); the worker's own code
for 2, 3, 75; 130 after Ctrl-C; 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import sys
import tempfile
import threading
import uuid
from pathlib import Path

from launcher import env, finished
from launcher.agent import console
from launcher.agent.policy import PolicyConfig

log = logging.getLogger("ftrun")

# Rendezvous settings ftrun uses unless --rdzv_conf names them (torch's defaults in brackets).
RDZV_DEFAULTS = {
    "last_call_timeout": 2,  # [30] wait for more nodes once --nnodes' minimum is there
    "keep_alive_interval": 1,  # [5] agent heartbeat to the rendezvous store...
    "keep_alive_max_attempt": 3,  # [3] ...missed this many times: the node is dead
    "close_timeout": 10,  # [30]
}

WARM_MODULES = ["launcher.agent.warm"]  # torch, numpy, and the fork server's signal dispositions


def build_parser() -> argparse.ArgumentParser:
    from torch.distributed.run import get_args_parser

    p = get_args_parser()
    p.prog = "ftrun"
    p.description = "torchrun-compatible launcher that recovers from worker crashes, hangs and node loss"
    if "PET_MAX_RESTARTS" not in os.environ:
        p.set_defaults(max_restarts=3)  # torchrun: 0. Recovering is the point of ftrun.
    g = p.add_argument_group("ftrun")
    g.add_argument("--hang-timeout", type=float, default=600.0,
                   help="seconds a rank may go without completing a step before it counts as hung (default 600; "
                        "saves and evaluations get --long-activity-factor times longer)")
    g.add_argument("--long-activity-factor", type=float, default=3.0,
                   help="hang allowance multiplier while a rank reports 'saving' or 'evaluating' (default 3)")
    g.add_argument("--run-dir", dest="ft_run_dir", default=None,
                   help="where events.jsonl goes (default: the training script's own --run-dir argument)")
    g.add_argument("--backoff-base", type=float, default=1.0,
                   help="seconds to wait before restarting after an attempt that made no progress; doubles "
                        "each time (default 1)")
    g.add_argument("--backoff-cap", type=float, default=30.0, help="longest back-off in seconds (default 30)")
    g.add_argument("--crash-loop", type=int, default=3,
                   help="stop after this many consecutive restarts that fail before completing a new step "
                        "(default 3)")
    g.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=None,
                   help="start workers by forking a server that has already imported torch (torchrun's "
                        "--run-path with --start-method=forkserver), so a restart skips the import: seconds "
                        "each. Default: on for a .py script run with python, off otherwise")
    g.add_argument("--snapshot-grace", type=float, default=60.0,
                   help="after a worker failed: seconds a surviving worker that writes a snapshot of the step it "
                        "holds may take before it is stopped (default 60; others get 5 s to end)")
    g.add_argument("--store-reforms", type=int, default=3,
                   help="times this node's supervisor may start a new agent after losing the rendezvous store "
                        "(default 3; 0: die like torchrun)")
    return p


def script_run_dir(script_args: list[str]) -> Path | None:
    """The ``--run-dir`` the training script was given, if any."""
    for i, arg in enumerate(script_args):
        if arg == "--run-dir" and i + 1 < len(script_args):
            return Path(script_args[i + 1])
        if arg.startswith("--run-dir="):
            return Path(arg.split("=", 1)[1])
    return None


def prepare(args: argparse.Namespace):
    """torchrun's own argument handling (``torch.distributed.run.run``), plus ftrun's defaults."""
    from torch.distributed.run import config_from_args, parse_min_max_nnodes

    plain_script = args.training_script.endswith(".py") and not (args.no_python or args.module)
    if args.warm_start and not plain_script:
        raise ValueError(f"--warm-start runs a Python script file, not {args.training_script!r} with "
                         f"--no-python/--module: drop one of them")
    if args.warm_start or (args.warm_start is None and plain_script and not args.run_path):
        args.run_path, args.start_method = True, "forkserver"
        # The fork server imports these once; every worker (and every restart) is forked from it.
        multiprocessing.set_forkserver_preload(WARM_MODULES)
    if args.standalone or (args.rdzv_backend == "static" and not args.rdzv_endpoint and args.master_port is None
          and parse_min_max_nnodes(args.nnodes)[1] == 1):
        args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    if args.master_port is None:
        args.master_port = 29500
    handled = args.signals_to_handle.split(",")
    # The preemption signals (launcher/env.py) are always handled as well: torch then forwards
    # them to the workers and waits --shutdown_timeout for their checkpoint. Unhandled, SIGUSR1
    # kills the agent, and a batch system ends the step's remaining processes, the checkpointing
    # workers with it.
    args.signals_to_handle = ",".join([*handled, *(s for s in env.detect().preempt_signals if s not in handled)])
    config, cmd, cmd_args = config_from_args(args)
    if config.rdzv_backend == "c10d":
        for key, value in RDZV_DEFAULTS.items():
            config.rdzv_configs.setdefault(key, value)
    return config, cmd, cmd_args


def options_from_args(args: argparse.Namespace, cmd_args: list[str]):
    from launcher.agent.agent import AgentOptions

    problems = []
    if args.hang_timeout <= 0:
        problems.append(f"--hang-timeout must be > 0 seconds, got {args.hang_timeout}")
    if args.long_activity_factor < 1:
        problems.append(f"--long-activity-factor must be >= 1, got {args.long_activity_factor}")
    if args.snapshot_grace < 0:
        problems.append(f"--snapshot-grace must be >= 0 seconds, got {args.snapshot_grace}")
    if args.store_reforms < 0:
        problems.append(f"--store-reforms must be >= 0, got {args.store_reforms}")
    try:
        policy = PolicyConfig(max_restarts=args.max_restarts, backoff_base=args.backoff_base,
                              backoff_cap=args.backoff_cap, crash_loop=args.crash_loop)
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise ValueError("; ".join(problems))
    run_dir = Path(args.ft_run_dir) if args.ft_run_dir else script_run_dir(cmd_args)
    progress_dir = run_dir / "ftrun" / "progress" if run_dir else Path(tempfile.mkdtemp(prefix="ftrun-"))
    progress_dir.mkdir(parents=True, exist_ok=True)
    return AgentOptions(run_dir=run_dir, script=args.training_script,
                        progress_template=str(progress_dir / "rank{rank}.json"),
                        hang_timeout=args.hang_timeout, long_activity_factor=args.long_activity_factor,
                        snapshot_grace=args.snapshot_grace,
                        policy=policy)


def start_fork_server(argv: list[str]) -> None:
    """Start the warm-start fork server now if the command line plainly runs a ``.py`` script.

    Called before this process imports torch (torchrun's parser does), so that the server's
    imports of torch and of what workers import lazily overlap the agent's own instead of
    following it: seconds off a cold start, such as a replacement node's. :func:`prepare` still
    decides; a server started for a command that turns out not to use it stays idle.
    """
    for token in argv:
        if token in ("--no-warm-start", "--no-python", "--no_python", "-m", "--module"):
            return
        if token.endswith(".py") and not token.startswith("-"):  # the training script: ftrun's flags end here
            multiprocessing.set_forkserver_preload(WARM_MODULES)
            threading.Thread(target=multiprocessing.forkserver.ensure_running, name="ftrun-forkserver",
                             daemon=True).start()
            return


def main(argv: list[str] | None = None) -> int:
    # torch's C++ warnings repeat, with a C++ stack, what ftrun and the workers say in one line
    # (a store connection closed). Read once, when torch is imported (build_parser imports it);
    # the fork server and the workers inherit it.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    start_fork_server(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    done = finished.check_command(args.training_script, args.training_script_args, module=args.module)
    if done:  # before any rendezvous: a late node of a finished job starts nothing and writes nothing
        print(done, file=sys.stderr)
        return 0
    console.setup(Path(args.ft_run_dir) if args.ft_run_dir else script_run_dir(args.training_script_args))
    try:
        config, cmd, cmd_args = prepare(args)
        options = options_from_args(args, cmd_args)
    except (ValueError, AssertionError) as e:
        print(f"ftrun: error: {e}", file=sys.stderr)
        return 2
    if config.start_method == "forkserver":
        # Start the fork server now (unless start_fork_server already has), in the background,
        # so its imports overlap this agent's rendezvous instead of following it.
        threading.Thread(target=multiprocessing.forkserver.ensure_running, name="ftrun-forkserver",
                         daemon=True).start()
    from launcher.agent.supervisor import supervise

    return supervise(config, cmd, cmd_args, options, store_reforms=args.store_reforms)


if __name__ == "__main__":
    sys.exit(main())
