"""Checkpoint tools: list, verify, inspect, export, package, set-lr, prune, diff, plot.

Usage::

    python -m launcher.ckpt list RUN_DIR
    python -m launcher.ckpt verify PATH            # a checkpoint, or every checkpoint of a run
    python -m launcher.ckpt inspect PATH [--json]  # PATH: a checkpoint, or a run (newest verified)
    python -m launcher.ckpt export PATH OUT.pt     # model weights only, for inference
    python -m launcher.ckpt package PATH OUT_DIR   # weights + config + statistics, for sharing
    python -m launcher.ckpt set-lr PATH LR [--optimizer NAME] [--out NEW_CHECKPOINT]
    python -m launcher.ckpt prune RUN_DIR --keep-last N [--keep-every K] [--dry-run]
    python -m launcher.ckpt diff A B               # config and metric differences
    python -m launcher.ckpt plot RUN_DIR [--out PNG]  # redraw the loss plot of the whole run

(also installed as ``ftlaunch-ckpt``). Exit codes, the same as ``launcher/run.py``'s
(``launcher/exit_codes.py``): 0 done; 2 bad command line or input (a path that does not exist,
a bad value, an output that exists); 3 a checkpoint does not verify or cannot be used, or the
run directory cannot be used (locked by a live job, read-only, full); 1 only for an unexpected
internal error (a bug: please report the traceback).

Nothing here modifies an existing checkpoint: ``set-lr`` writes a new one, ``prune`` deletes
only checkpoints older than the newest verified one (never the best or a milestone) and
refuses a run directory that a live job holds. Every checkpoint is verified before anything
in it is read, and DCP's ``.metadata`` pickle is read with a restricted unpickler.

Adding a subcommand: write ``def cmd_NAME(args) -> int`` and decorate it with
``@command("NAME", help, arguments...)``; ``main`` builds the parser from the registry.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launcher import epochs, exit_codes, fileio
from launcher.checkpoint import digest, files, find, layout, meta
from launcher.checkpoint.files import CheckpointError
from launcher.checkpoint.record import CheckpointRecord, RecordError, read_record
from launcher.config import MIN_KEEP_LAST

EXIT_OK, EXIT_USAGE, EXIT_BAD_CHECKPOINT = exit_codes.OK, exit_codes.CONFIG_ERROR, exit_codes.CHECKPOINT_ERROR


class ToolError(Exception):
    """A problem the user can fix; printed without a traceback."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


@dataclass
class Command:
    name: str
    help: str
    func: Callable[[argparse.Namespace], int]
    arguments: tuple[tuple[tuple, dict], ...]


COMMANDS: dict[str, Command] = {}


def arg(*names: str, **kwargs: Any) -> tuple[tuple, dict]:
    """One ``add_argument`` call, for :func:`command`."""
    return names, kwargs


def command(name: str, help: str, *arguments: tuple[tuple, dict]):
    """Register ``func`` as subcommand ``name``."""
    def register(func: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = Command(name, help, func, arguments)
        return func
    return register


# ---------------------------------------------------------------------------- helpers

def _offline():
    # torch is imported only when a subcommand needs it, so --help stays fast.
    from launcher.checkpoint import offline
    return offline


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _record_or_none(path: Path) -> CheckpointRecord | None:
    try:
        return read_record(path)
    except RecordError:
        return None


def _locked(run_dir: Path):
    """Hold the run directory's lock, as a training job does, or refuse."""
    from filelock import FileLock, Timeout
    lock = FileLock(str(run_dir / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ToolError(f"{run_dir} is in use by a live job (lock {run_dir / '.lock'} is held); "
                        f"wait for it to finish or stop it first", EXIT_BAD_CHECKPOINT) from None
    except OSError as e:
        raise ToolError(f"cannot lock the run directory: {fileio.describe_os_error(e)}", EXIT_BAD_CHECKPOINT) from None
    return lock


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _root(path: Path) -> Path:
    try:
        return layout.checkpoints_root(path)
    except CheckpointError as e:
        raise ToolError(str(e), e.code) from None


def _checkpoint(path: Path) -> Path:
    try:
        return find.resolve_checkpoint(path)
    except CheckpointError as e:
        raise ToolError(str(e), e.code) from None


def _verified(path: Path) -> files.Verification:
    try:
        return find.require_verified(path)
    except CheckpointError as e:
        raise ToolError(str(e), e.code) from None


def _check(path: Path, deep: bool = True) -> files.Verification:
    """Verify ``path`` against the run it sits in (its run identity from ``meta.json``)."""
    return files.verify(path, deep=deep, expected_run=layout.run_id(path.parent))


# ---------------------------------------------------------------------------- list

@command("list", "checkpoints of a run: step, epoch, size, verified, best",
         arg("run_dir", type=Path, help="run directory (or its checkpoints/ directory)"),
         arg("--fast", action="store_true", help="check presence and sizes only, not checksums"))
def cmd_list(args: argparse.Namespace) -> int:
    root = _root(args.run_dir)
    m, notes = meta.read_meta(root)
    best = m.best.name if m and m.best else None
    latest = m.latest if m else None
    rows = [("name", "step", "epoch", "size", "verified", "notes")]
    for name in layout.scan(root):
        path = root / name
        check = _check(path, deep=not args.fast)
        record = check.record or _record_or_none(path)
        marks = [n for n, on in (("best", name == best), ("latest", name == latest)) if on]
        if record and record.milestone:
            marks.append(f"milestone {record.milestone!r}")
        if not check.ok:
            more = f" (+{len(check.problems) - 1} more)" if len(check.problems) > 1 else ""
            marks.append(check.problems[0] + more)
        rows.append((name, str(record.step) if record else "?", str(epochs.of_record(record)) if record else "?",
                     _human(files.dir_size(path)), "yes" if check.ok else "NO", ", ".join(marks)))
    for p in sorted(root.iterdir()):
        if p.name.startswith(layout.TMP_PREFIX):
            rows.append((p.name, "-", "-", "-", "NO", "interrupted save; removed at the next start"))
        elif p.name.startswith(layout.DELETING_PREFIX):
            rows.append((p.name, "-", "-", "-", "NO", "being deleted by retention; removed at the next start"))
    if len(rows) == 1:
        print(f"{root}: no checkpoints")
        return EXIT_OK
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5])
    for note in notes:
        print(f"note: {note}")
    return EXIT_OK


# ---------------------------------------------------------------------------- verify

@command("verify", "check checksums; exit 0 if every checkpoint verifies, 3 naming each bad file",
         arg("path", type=Path, help="a checkpoint directory, or a run directory (checks all of them)"))
def cmd_verify(args: argparse.Namespace) -> int:
    path = args.path
    if not path.exists():
        raise ToolError(f"{path}: no such file or directory")
    if layout.is_checkpoint_dir(path):
        targets = [path]
    else:
        root = _root(path)
        targets = [root / n for n in layout.scan(root)]
        for note in layout.candidates(root)[1]:
            print(f"note: {note}")
        if not targets:
            print(f"{root}: no checkpoints to verify")
            return EXIT_BAD_CHECKPOINT
    bad = 0
    for target in targets:
        check = _check(target)
        if check.ok:
            print(f"OK   {target}")
            continue
        bad += 1
        print(f"BAD  {target}")
        for problem in check.problems:
            print(f"       {problem}")
    return EXIT_BAD_CHECKPOINT if bad else EXIT_OK


# ---------------------------------------------------------------------------- inspect

@command("inspect", "step, epoch, losses, config and world size of a checkpoint",
         arg("path", type=Path, help="a checkpoint directory, or a run directory (its newest verified checkpoint)"),
         arg("--json", action="store_true", help="print checkpoint.json as JSON"))
def cmd_inspect(args: argparse.Namespace) -> int:
    path = _checkpoint(args.path)
    check = _check(path)
    try:
        record = check.record or read_record(path)
    except RecordError as e:
        raise ToolError(f"cannot inspect {path}: {e}", EXIT_BAD_CHECKPOINT) from None
    if args.json:
        print(json.dumps({**record.to_json(), "path": str(path), "verified": check.ok, "problems": check.problems},
                         indent=2))
        return EXIT_OK
    import yaml
    print(f"checkpoint  {path}")
    print(f"verified    {'yes' if check.ok else 'NO: ' + check.reason()}")
    for key in ("step", "epoch", "steps_per_epoch", "world_size", "trainer", "reason", "loss", "milestone",
                "init_from"):
        value = epochs.of_record(record) if key == "epoch" else getattr(record, key)
        if value not in (None, ""):
            print(f"{key:<11} {_fmt(value)}")
    for key, value in sorted(record.metrics.items()):
        print(f"{key:<11} {_fmt(value)}")
    last = record.last_eval
    if last and not record.metrics:
        shown = "  ".join(f"{k} {_fmt(v)}" for k, v in last.items() if k != "step")
        print(f"last eval   step {last.get('step')}: {shown}")
    if record.history:
        print("recent epochs:")
        for rec in record.history:
            print("  " + "  ".join(f"{k} {_fmt(v)}" for k, v in rec.items()))
    if record.derived_from:
        print(f"derived     from {record.derived_from} ({record.change})")
    print("config:")
    print("  " + yaml.safe_dump(record.config, sort_keys=False).rstrip().replace("\n", "\n  "))
    return EXIT_OK


# ---------------------------------------------------------------------------- export

@command("export", "model weights only, as one .pt file for inference",
         arg("path", type=Path, help="a checkpoint directory, or a run directory (its newest verified checkpoint)"),
         arg("out", type=Path, help="output file, ending in .pt (torch.save of the model's state dict)"),
         arg("--force", action="store_true", help="overwrite OUT if it exists"))
def cmd_export(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.suffix not in (".pt", ".pth"):
        raise ToolError(f"{out}: export writes a .pt file (torch.save of the model's state dict, "
                        f"loadable with torch.load(..., weights_only=True)); for model.safetensors with the "
                        f"config, metrics and normalisation statistics use: package PATH OUT_DIR")
    if out.is_dir() or (out.is_symlink() and not args.force):
        raise ToolError(f"{out} is a {'directory' if out.is_dir() else 'symlink'}; choose a file path")
    if out.exists() and not args.force:
        raise ToolError(f"{out} already exists; pass --force to overwrite it")
    path = _checkpoint(args.path)
    record = _verified(path).record
    import torch
    state = _load(path, ["model"])
    weights = state.get("model")
    if not isinstance(weights, dict) or not weights:
        raise ToolError(f"{path}: no 'model' entry to export", EXIT_BAD_CHECKPOINT)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with fileio.atomic_file(out) as f:
            torch.save(weights, f)
    except OSError as e:
        raise ToolError(f"cannot write {out}: {fileio.describe_os_error(e)}", EXIT_USAGE) from None
    total = sum(t.numel() for t in weights.values() if isinstance(t, torch.Tensor))
    print(f"wrote {out}: {len(weights)} tensors, {total} parameters, from {path} (step {record.step})")
    return EXIT_OK


def _load(path: Path, keys: list[str] | None = None) -> dict[str, Any]:
    try:
        return _offline().load_full(path, keys)
    except CheckpointError as e:
        raise ToolError(str(e), EXIT_BAD_CHECKPOINT) from None


# ---------------------------------------------------------------------------- package

@command("package", "weights (safetensors), config and statistics in one directory, for sharing (load_package)",
         arg("path", type=Path, help="a checkpoint directory, or a run directory (its newest verified checkpoint)"),
         arg("out", type=Path, help="output directory: model.safetensors, config.yaml, package.json"),
         arg("--force", action="store_true", help="replace OUT if it exists (only once the new package is complete)"))
def cmd_package(args: argparse.Namespace) -> int:
    from launcher.package import PackageError, write_package
    path = _checkpoint(args.path)
    _verified(path)  # nothing of a checkpoint is loaded before it verifies
    try:
        meta = write_package(path, args.out, force=args.force)
    except PackageError as e:
        raise ToolError(str(e)) from None
    except (CheckpointError, ValueError) as e:
        raise ToolError(str(e), EXIT_BAD_CHECKPOINT) from None
    metrics = " ".join(f"{k} {_fmt(v)}" for k, v in sorted((meta.get("metrics") or {}).items()))
    print(f"wrote {args.out}: {meta['trainer']} at step {meta['step']} (epoch {meta['epoch']}) from {path}"
          + (f"; {metrics}" if metrics else ""))
    print(f"use it: from launcher.package import load_package; pkg = load_package({str(args.out)!r})")
    return EXIT_OK


# ---------------------------------------------------------------------------- set-lr

@command("set-lr", "write a new checkpoint whose learning rate is LR; it takes effect when a run resumes from it",
         arg("path", type=Path, help="a checkpoint directory, or a run directory (its newest verified checkpoint)"),
         arg("lr", type=float, help="the learning rate from the checkpoint's step on"),
         arg("--optimizer", default=None, metavar="NAME",
             help="which optimizer (the recommender has 'model' and 'scheduler'); needed when there are several"),
         arg("--out", type=Path, default=None,
             help="new checkpoint directory (default: next to PATH, named <name>-lr<LR>)"))
def cmd_set_lr(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ToolError(f"LR must be a finite number > 0, got {args.lr}")
    path = _checkpoint(args.path)
    record = _verified(path).record
    suffix = f"-{args.optimizer}" if args.optimizer else ""
    out = args.out or path.parent / f"{path.name}{suffix}-lr{args.lr:g}"
    offline = _offline()
    try:
        offline.check_output(out, record)
    except CheckpointError as e:
        raise ToolError(str(e), e.code) from None
    state = _load(path)
    if "lr_control" in state:
        from trainers.lr import set_lr
        try:
            name, entry = set_lr(state, args.lr, args.optimizer)
        except KeyError as e:
            raise ToolError(str(e.args[0])) from None
        what = f"optimizer '{name}' lr {args.lr:g} from step {record.step} on" + (
            f" (schedule base {entry.override:.4g}, replacing {entry.key} = {entry.config:g})"
            if entry.next_factor != 1 else f" (replacing {entry.key} = {entry.config:g})")
    else:
        what = _set_lr_plain(state, path, args)
    # The record's config stays as saved: a resume compares it with the run's config, and a
    # config change since the checkpoint would win over this edit (docs/workflows.md).
    record.derived_from, record.change = str(path), f"set-lr {what}"
    lock = _locked(out.parent.parent) if out.parent.name == "checkpoints" else None
    try:
        offline.write_checkpoint(out, state, record)
    except CheckpointError as e:
        raise ToolError(str(e), e.code) from None
    finally:
        if lock is not None:
            lock.release()
    print(f"wrote {out}: {what}")
    print(f"resume with: --resume {out}")
    if "lr_control" in state:
        print("it wins on resume unless the run's config changes that lr (then the config wins; the log says which)")
    return EXIT_OK


def _set_lr_plain(state: dict[str, Any], path: Path, args: argparse.Namespace) -> str:
    """set-lr for a checkpoint without ``lr_control`` (a trainer of your own): every group of ``optim``.

    A torch lr scheduler's state beside it (``lr_scheduler`` with ``base_lrs``/``_last_lr``) is
    scaled so that the schedule continues along the same shape from ``LR``.
    """
    if args.optimizer:
        raise ToolError(f"{path}: this trainer does not name its optimizers (no lr_control, see trainers/lr.py); "
                        f"drop --optimizer to set every group of its 'optim' entry")
    groups = (state.get("optim") or {}).get("param_groups")
    if not isinstance(groups, list) or not groups:
        raise ToolError(f"{path}: no optimizer param_groups in this checkpoint (saved with --reset-optimizer "
                        f"or weights only?)", EXIT_BAD_CHECKPOINT)
    sched = state.get("lr_scheduler")
    base = None
    if isinstance(sched, dict) and isinstance(sched.get("base_lrs"), list) and isinstance(sched.get("_last_lr"), list):
        old_base, old_last = sched["base_lrs"][0], sched["_last_lr"][0]
        factor = old_last / old_base if old_base else 0.0
        base = args.lr / factor if factor > 0 else args.lr
        sched["base_lrs"] = [base for _ in sched["base_lrs"]]
        sched["_last_lr"] = [args.lr for _ in sched["_last_lr"]]
    for group in groups:
        group["lr"] = args.lr
        if "initial_lr" in group and base is not None:
            group["initial_lr"] = base
    return (f"lr {args.lr:g} in every group of 'optim'" + (f" (schedule base lr {base:g})" if base else "")
            + "; whether it survives a resume depends on the trainer's load_state_dict (it may re-apply the "
              "config's lr)")


# ---------------------------------------------------------------------------- prune

@command("prune", "delete old checkpoints, keeping the newest N verified ones, the best and milestones",
         arg("run_dir", type=Path, help="run directory (or its checkpoints/ directory)"),
         arg("--keep-last", type=int, required=True,
             help=f"verified checkpoints to keep, counting from the newest verified one (>= {MIN_KEEP_LAST})"),
         arg("--keep-every", type=int, default=0, help="also keep steps that are multiples of this"),
         arg("--dry-run", action="store_true", help="only print what would be deleted"))
def cmd_prune(args: argparse.Namespace) -> int:
    if args.keep_last < MIN_KEEP_LAST or args.keep_every < 0:
        raise ToolError(f"--keep-last must be >= {MIN_KEEP_LAST} (as checkpoint.keep_last: one checkpoint alone "
                        f"leaves nothing to fall back to) and --keep-every >= 0, got {args.keep_last} and "
                        f"{args.keep_every}")
    root = _root(args.run_dir)
    lock = _locked(root.parent)
    try:
        choice = layout.choose(root)
        if choice.path is None:
            raise ToolError(f"{root}: no checkpoint verifies; refusing to delete anything", EXIT_BAD_CHECKPOINT)
        newest = choice.path.name
        m, _ = meta.read_meta(root)
        entries = layout.survey(root, below=layout.step_of(newest) or 0, known={newest: True}, deep=True)
        doomed = layout.plan_retention(entries, newest, args.keep_last, args.keep_every,
                                       m.best.name if m and m.best else None)
        if not doomed:
            print(f"nothing to delete (newest verified: {newest})")
            return EXIT_OK
        bad = {e.name for e in entries if not e.verified}
        for name in doomed:
            print(f"{'would delete' if args.dry_run else 'deleting'} {root / name}"
                  + (" (does not verify)" if name in bad else ""))
        if args.dry_run:
            return EXIT_OK
        layout.unpublish(root, doomed, newest)
        failures = layout.delete(layout.set_aside(root, doomed))
        if failures:
            raise ToolError("could not delete: " + "; ".join(failures), EXIT_BAD_CHECKPOINT)
        print(f"deleted {len(doomed)}; kept {len(layout.scan(root))}")
        return EXIT_OK
    finally:
        lock.release()


# ---------------------------------------------------------------------------- diff

@command("diff", "config and metric differences between two checkpoints",
         arg("a", type=Path, help="a checkpoint directory, or a run directory (its newest verified checkpoint)"),
         arg("b", type=Path, help="the same, for the other side"))
def cmd_diff(args: argparse.Namespace) -> int:
    from launcher.config import diff_configs
    a, b = _checkpoint(args.a), _checkpoint(args.b)
    try:
        ia, ib = read_record(a), read_record(b)
    except RecordError as e:
        raise ToolError(f"cannot compare: {e}", EXIT_BAD_CHECKPOINT) from None
    print(f"A: {a}\nB: {b}")
    changes = diff_configs(ia.config, ib.config)
    print("config:" + ("" if changes else " identical"))
    for key, (va, vb) in changes.items():
        print(f"  {key}: {va!r} -> {vb!r}")
    print("metrics:")
    print(f"  {'':<16}{'A':>14}{'B':>14}{'B - A':>14}")
    for key, va, vb in _metric_rows(ia, ib):
        delta = f"{vb - va:+.6g}" if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else ""
        print(f"  {key:<16}{_fmt(va):>14}{_fmt(vb):>14}{delta:>14}")
    return EXIT_OK


def _metric_rows(ia: CheckpointRecord, ib: CheckpointRecord) -> list[tuple[str, Any, Any]]:
    def value(r: CheckpointRecord, k: str) -> Any:
        v = epochs.of_record(r) if k == "epoch" else getattr(r, k)
        return "-" if v is None else v
    rows = [(k, value(ia, k), value(ib, k)) for k in ("step", "epoch", "world_size", "loss")]
    rows += [(k, ia.metrics.get(k, "-"), ib.metrics.get(k, "-")) for k in sorted(set(ia.metrics) | set(ib.metrics))]
    return rows


# ---------------------------------------------------------------------------- plot

@command("plot", "draw the run's whole loss history, resumes marked (default RUN_DIR/plots/loss.png)",
         arg("run_dir", type=Path, help="run directory (holds metrics.jsonl)"),
         arg("--out", type=Path, default=None, help="PNG to write instead of RUN_DIR/plots/loss.png"))
def cmd_plot(args: argparse.Namespace) -> int:
    from launcher.plots import plot_run
    try:
        print(plot_run(args.run_dir, args.out))
    except FileNotFoundError as e:
        raise ToolError(str(e)) from None
    return EXIT_OK


# ---------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launcher.ckpt", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS.values():
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        for names, kwargs in cmd.arguments:
            sp.add_argument(*names, **kwargs)
        sp.set_defaults(func=cmd.func)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command != "plot":
            digest.from_env()  # a bad signing key is one message, not one per checkpoint
        return args.func(args)
    except ToolError as e:
        code, message = e.code, str(e)
    except CheckpointError as e:
        code, message = e.code, str(e)
    except digest.KeyProblem as e:
        code, message = EXIT_USAGE, str(e)
    except OSError as e:
        code, message = EXIT_BAD_CHECKPOINT, fileio.describe_os_error(e)
    except KeyboardInterrupt:
        code, message = 130, "interrupted"
    print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
