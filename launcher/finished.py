"""A run with nothing left to do: its checkpoint already reached the run's target step.

Rerunning a finished run (the README's commands, a job script run twice, a replacement node
that arrives after the job ended) must not look like training: before this check it "finished
120 steps in 0.0 s", rewrote ``config.yaml``, truncated nothing useful but appended events and
rewrote ``summary.json``. Now the worker (:class:`launcher.training.Job`) and ``ftrun`` (before
it joins any rendezvous) ask :func:`check` and, if the run is done, print one line and exit 0
without writing anything.

The target is ``train.max_steps``, or ``train.epochs`` times the steps per epoch recorded in the
checkpoint (the data that defined an epoch when it was written).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from launcher.checkpoint.record import CheckpointRecord
from launcher.config import TrainConfig


def check(train: TrainConfig, info: CheckpointRecord, path: Path) -> str | None:
    """The "already finished" message if checkpoint ``path`` (its ``checkpoint.json`` is ``info``)
    reached the target of ``train``, else None."""
    step, spe = info.step, info.steps_per_epoch
    if spe is None:
        return None
    if step < train.total_steps(spe):
        return None
    longer = f"--set train.epochs={step // spe + 1}" if train.epochs else f"--set train.max_steps={2 * step}"
    return (f"Run already finished at step {step} (checkpoint {path}); nothing to do, nothing changed. "
            f"To train longer, rerun with a higher target, e.g. {longer}; to start afresh, use another --run-dir.")


def check_command(script: str, script_args: list[str], module: bool = False) -> str | None:
    """``ftrun``'s check before any rendezvous: the message if ``script`` is ``launcher/run.py`` and
    its ``--run-dir`` holds a finished run, else None.

    Only the cheap path is taken here (``meta.json``'s latest checkpoint, verified only if it
    looks finished): every other case, bad arguments included, is left to the workers, which
    check again on the checkpoint they would resume from.
    """
    from launcher import run as run_py
    from launcher.checkpoint import files, layout, meta
    from launcher.checkpoint.record import RecordError, read_record
    from launcher.config import ConfigError, load_config

    ours = script == "launcher.run" if module else _same_file(script, run_py.__file__)
    if not ours:
        return None
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the workers report bad arguments, once
            args, _ = run_py.build_parser().parse_known_args(script_args)
    except SystemExit:
        return None
    if args.resume != "auto":
        return None
    try:
        train = load_config(args.config, args.overrides).train
    except (ConfigError, OSError):
        return None
    root = Path(args.run_dir) / "checkpoints"
    latest, _ = meta.read_meta(root)
    if latest is None:
        return None
    try:
        path = layout.safe_entry(root, latest.latest)
        info = read_record(path)
    except (layout.UnsafeEntry, OSError, RecordError):
        return None
    message = check(train, info, path)
    return message if message and files.verify(path, expected_run=layout.run_id(root)).ok else None


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False
