"""The checkpoint manager: when to save, where, how to verify, what to keep, how to load.

Trainers only expose ``state_dict()`` / ``load_state_dict()``; everything about checkpoint
files lives here.

A save, synchronous or in the background, goes through the same steps:

1. every rank writes its DCP shard into ``checkpoints/.tmp-step_N/`` (checkpoint gloo group);
2. rank 0 adds ``checkpoint.json`` (step, epoch, config, metrics, world size);
3. every rank fsyncs its own files and reads them back for size and CRC32; rank 0 gathers
   them and writes ``manifest.json``;
4. rank 0 renames the directory to ``step_N`` and only then rewrites ``meta.json``;
5. rank 0 applies retention.

A process killed anywhere in 1-3 leaves a ``.tmp-`` directory that is never loaded and is
removed at the next start; killed between 4 and 5, the complete directory is found by
scanning. Either way the job resumes from the old checkpoint or the new one
(``launcher/checkpoint/faults.py`` kills a save at each of these instants in the tests).

A save that fails with an exception fails on every rank: each step's outcome is shared over
the checkpoint group before the next collective, so no rank is left waiting in a barrier
for a rank that gave up.
"""

from __future__ import annotations

import concurrent.futures
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from launcher.checkpoint import faults, files, meta
from launcher.checkpoint.files import CheckpointError
from launcher.checkpoint.retention import select_deletions
from launcher.checkpoint.staging import Stager, assign_owners, tensor_signatures
from launcher.config import CheckpointConfig

log = logging.getLogger("launcher.checkpoint")

KEEP_VERIFIED = 5  # length of meta.json's list of earlier verified checkpoints
TRASH_PREFIX = ".trash-"  # a checkpoint being replaced by a new save of the same step


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor values are unpickled with ``weights_only=True``.

    DCP stores non-tensor leaves (numbers, strings, lists) with ``torch.save`` and reads them
    back with ``weights_only=False``; nothing we save needs more than the safe unpickler.
    """

    def load_bytes(self, read_item, value) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class CheckpointManager:
    """Owns the checkpoints of one run directory.

    Args:
        run_dir: the run directory; checkpoints go to ``run_dir/checkpoints``.
        cfg: the checkpoint section of the run config.
        rank, world_size: this process in the job.
        group: the gloo process group used for every checkpoint collective.
        best: ``(metric, "min"|"max")`` naming the best checkpoint.
        clock: seconds, monotonic (a fake in tests).
    """

    def __init__(self, run_dir: Path, cfg: CheckpointConfig, rank: int = 0, world_size: int = 1,
                 group: dist.ProcessGroup | None = None, best: tuple[str, str] = ("val_loss", "min"),
                 clock: Callable[[], float] = time.monotonic):
        self.root = Path(run_dir) / "checkpoints"
        self.cfg = cfg
        self.rank, self.world_size, self.group = rank, world_size, group
        self.best_metric = cfg.best_metric or best[0]
        self.best_mode = cfg.best_mode or best[1]
        self.clock = clock
        self._last_save_time = clock()
        self._last_saved_step: int | None = None
        self._requested = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._inflight: concurrent.futures.Future | None = None
        self._stager = Stager()
        self.last_save_seconds = 0.0  # time training was blocked by the last save
        self.last_write_seconds = 0.0  # time the last save took from start to published

    # ---------------------------------------------------------------- start of a run

    def prepare(self) -> None:
        """Create the checkpoints directory and remove leftovers of interrupted saves."""
        error = None
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                for p in self.root.iterdir():
                    original = self.root / p.name[len(TRASH_PREFIX):]
                    if p.name.startswith(TRASH_PREFIX) and not original.exists() and not p.is_symlink():
                        # Killed while replacing a checkpoint: the old one was moved aside and the
                        # new one not yet renamed in. Put the old one back; it is verified as usual.
                        log.info("Restoring %s, moved aside by an interrupted save", original.name)
                        p.rename(original)
                    elif p.name.startswith((meta.TMP_PREFIX, TRASH_PREFIX)) and p.is_dir() and not p.is_symlink():
                        log.info("Removing leftover of an interrupted save: %s", p.name)
                        shutil.rmtree(p, ignore_errors=True)
            except OSError as e:
                error = f"cannot prepare {self.root}: {e}"
        self._agree_all(error)

    def existing(self) -> list[str]:
        return meta.scan(self.root)

    def resolve(self, resume: str) -> Path | None:
        """Pick the checkpoint to resume from, the same on every rank.

        Args:
            resume: ``auto`` (latest verified, or None for a fresh start when there is no
                checkpoint at all), ``none`` (fresh; refused if checkpoints exist), ``best``,
                or a path to a checkpoint directory.

        Raises:
            CheckpointError: nothing verifies, or the request cannot be honoured.
        """
        outcome: list[Any] = [None]
        if self.rank == 0:
            try:
                outcome[0] = ("ok", self._resolve_on_rank0(resume))
            except (CheckpointError, meta.UnsafeEntry, OSError) as e:
                # Every rank waits in the broadcast below: rank 0 must reach it, error or not.
                outcome[0] = ("error", str(e))
        if self.world_size > 1:
            dist.broadcast_object_list(outcome, src=0, group=self.group)
        status, value = outcome[0]
        if status == "error":
            raise CheckpointError(value)
        return Path(value) if value else None

    def _resolve_on_rank0(self, resume: str) -> str | None:
        if resume == "none":
            found = self.existing()
            if found:
                raise CheckpointError(
                    f"--resume none, but {self.root} already holds {len(found)} checkpoint(s) "
                    f"(newest: {found[0]}). Starting fresh would overwrite them. Use --resume auto "
                    f"to continue, or choose a new --run-dir.")
            return None
        if resume == "best":
            m, why = meta.read_meta(self.root)
            name = (m or {}).get("best", {}).get("name")
            if not name:
                raise CheckpointError(
                    f"--resume best: no best checkpoint recorded ({why or 'meta.json has no best entry'})")
            resume = str(meta.safe_path(self.root, name))
        if resume != "auto":
            path = Path(resume)
            if (path / meta.META).is_file() or path.name == "checkpoints":
                raise CheckpointError(f"--resume {resume}: that is a checkpoints directory; "
                                      f"pass one checkpoint inside it, e.g. {path / 'step_00000100'}")
            check = files.verify(path)
            if not check.ok:
                raise CheckpointError(f"--resume {resume}: checkpoint does not verify: {check.reason()}")
            return str(path)
        names, notes = meta.candidates(self.root)
        for note in notes:
            log.warning("%s", note)
        tried = []
        for name in names:
            check = files.verify(self.root / name)
            if check.ok:
                if tried:
                    log.warning("Falling back to %s: every newer checkpoint failed verification", name)
                return str(self.root / name)
            log.warning("Skipping checkpoint %s: %s", name, check.reason())
            tried.append(f"{name}: {check.reason()}")
        if tried:
            listing = "\n".join(f"  - {t}" for t in tried)
            raise CheckpointError(
                f"No valid checkpoint in {self.root}; tried, newest first:\n{listing}\n"
                f"Nothing was loaded and nothing was deleted. Restore a checkpoint from backup, "
                f"point --resume at a good one, or start over in a new --run-dir.")
        return None

    def load(self, path: Path, template: dict[str, Any]) -> dict[str, Any]:
        """Fill ``template`` (this rank's keys) from the DCP checkpoint at ``path``."""
        try:
            dcp.load(template, storage_reader=dcp.FileSystemReader(str(path)),
                     planner=SafeLoadPlanner(), process_group=self.group)
        except CheckpointException as e:  # raised on every rank when any rank failed
            raise CheckpointError(f"Loading checkpoint {path} failed: {failure_summary(e)}\n"
                                  f"It verified, so its bytes are as written; if a non-tensor value "
                                  f"needs the unsafe unpickler, the checkpoint was not written by this "
                                  f"launcher and should not be trusted.") from None
        return template

    @staticmethod
    def saved_shapes(path: Path) -> dict[str, tuple[int, ...] | None]:
        """Flattened key -> tensor shape (None for non-tensors) of a DCP checkpoint."""
        md = dcp.FileSystemReader(str(path)).read_metadata()
        out = {}
        for key, item in md.state_dict_metadata.items():
            size = getattr(item, "size", None)
            out[key] = tuple(size) if size is not None else None
        return out

    def mark_saved(self, step: int) -> None:
        """Record that a checkpoint of ``step`` exists (the one just resumed from)."""
        self._last_saved_step = step
        self._last_save_time = self.clock()

    # ---------------------------------------------------------------- triggers

    def request(self) -> None:
        """Ask for a checkpoint at the end of the current step (any rank may ask)."""
        self._requested = True

    def local_wants_save(self) -> bool:
        """This rank's own reasons to save now that other ranks cannot see (time, request).

        The training loop combines this flag across ranks at its sync points (``launcher/steps.py``),
        so every rank saves at the same step even though their clocks differ.
        """
        timed = self.cfg.interval_seconds > 0 and self.clock() - self._last_save_time >= self.cfg.interval_seconds
        return self._requested or timed

    def due(self, step: int, epoch_end: bool, final: bool, any_rank_wants: bool) -> str | None:
        """Why a checkpoint is due after ``step`` completed steps, or None."""
        if step == self._last_saved_step:
            return None
        if final:
            return "end of training"
        if any_rank_wants:
            return "requested"
        if epoch_end and self.cfg.every_epoch:
            return "end of epoch"
        if self.cfg.interval_steps and step % self.cfg.interval_steps == 0:
            return "interval"
        return None

    # ---------------------------------------------------------------- saving

    def save(self, step: int, state: dict[str, Any], info: dict[str, Any], blocking: bool = False) -> None:
        """Write a checkpoint of ``state`` after ``step`` completed steps.

        With ``checkpoint.async`` (and not ``blocking``) the state is copied into staging
        buffers and written by a background thread; this call returns after the copy. At most
        one save is in flight: a second call first waits for the previous one.
        """
        started = time.perf_counter()
        self.wait()
        name = meta.checkpoint_name(step)
        self._last_saved_step = step
        self._last_save_time = self.clock()
        self._requested = False
        if self.cfg.async_save and not blocking:
            staged = self._stage(state)
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt")
            self._inflight = self._executor.submit(self._write, name, staged, info)
        else:
            self._write(name, state, info)
        self.last_save_seconds = time.perf_counter() - started

    def wait(self) -> None:
        """Block until the in-flight background save (if any) is written and published."""
        if self._inflight is not None:
            future, self._inflight = self._inflight, None
            future.result()  # re-raises a background failure here, in the training thread

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def _stage(self, state: dict[str, Any]) -> dict[str, Any]:
        """Copy this rank's share of ``state`` into reused buffers so training can go on.

        Replicated tensors are copied by one rank only (see ``staging.py``); the ranks agree
        on who owns what through one small all-gather of tensor shapes.
        """
        keep = None
        if self.world_size > 1:
            per_rank: list[Any] = [None] * self.world_size
            dist.all_gather_object(per_rank, tensor_signatures(state), group=self.group)
            keep = {path for path, ranks in assign_owners(per_rank).items() if self.rank in ranks}
        staged = self._stager.stage(state, keep)
        self._stager.synchronize()
        return staged

    def _write(self, name: str, state: dict[str, Any], info: dict[str, Any]) -> None:
        """Write, verify, rename and publish one checkpoint (every rank calls this)."""
        started = time.perf_counter()
        step = int(info["step"])
        tmp = self.root / f"{meta.TMP_PREFIX}{name}"
        error = None
        if self.rank == 0:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as e:
                error = f"cannot create {tmp}: {e}"
        self._agree_all(error)
        writer = dcp.FileSystemWriter(str(tmp), sync_files=True)
        faults.arm_writer(writer, step, self.rank)
        try:
            dcp.save(state, storage_writer=writer, process_group=self.group)
        except CheckpointException as e:  # raised on every rank when any rank failed
            raise CheckpointError(f"writing checkpoint {name} to {tmp} failed: {failure_summary(e)}") from None
        faults.hit("after_dcp_save", step, self.rank)
        described, error = self._describe_own_files(tmp, name, info)
        gathered = self._gather(described)
        self._agree_all(error)
        error = None
        if self.rank == 0:
            try:
                self._commit(name, tmp, gathered, info)
            except (CheckpointError, OSError) as e:
                error = str(e)
        self._agree_all(error, only_rank0=True)
        self.last_write_seconds = time.perf_counter() - started

    def _describe_own_files(self, tmp: Path, name: str, info: dict[str, Any]) -> tuple[dict, str | None]:
        """fsync and checksum the files this rank wrote (rank 0 also adds ``checkpoint.json``)."""
        try:
            mine = sorted(p.name for p in tmp.iterdir() if p.name.startswith(f"__{self.rank}_"))
            if self.rank == 0:
                files.atomic_write_json(tmp / files.INFO, {**info, "name": name, "world_size": self.world_size})
                mine += [files.DCP_METADATA, files.INFO]
            return files.describe_files(tmp, mine), None
        except OSError as e:
            return {}, f"rank {self.rank}: cannot checksum its files in {tmp}: {e}"

    def _gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered

    def _agree_all(self, error: str | None, only_rank0: bool = False) -> None:
        """Share each rank's outcome of a step; raise CheckpointError on every rank if any failed.

        This replaces a plain barrier: a rank that failed still reaches the collective, so the
        others learn of the failure instead of waiting for it until the group times out.
        """
        if self.world_size == 1:
            errors = [error]
        elif only_rank0:
            box = [error]
            dist.broadcast_object_list(box, src=0, group=self.group)
            errors = box
        else:
            errors = self._gather(error)
        failed = [e for e in errors if e]
        if failed:
            raise CheckpointError("checkpoint save failed: " + "; ".join(failed))

    def _commit(self, name: str, tmp: Path, gathered: list[dict], info: dict[str, Any]) -> None:
        listing: dict[str, Any] = {}
        for part in gathered:
            listing.update(part)
        unlisted = sorted(p.name for p in tmp.iterdir() if p.name not in listing)
        if unlisted:
            raise CheckpointError(f"{tmp}: files no rank accounted for: {unlisted}")
        files.write_manifest(tmp, listing)
        faults.hit("after_manifest", info["step"], self.rank)
        check = files.verify(tmp, deep=False)
        if not check.ok:
            raise CheckpointError(f"checkpoint {name} failed verification after writing: {check.reason()}")
        final = self.root / name
        if final.exists():
            # Re-reaching a step after falling back past a bad checkpoint: replace the old
            # directory only now that the new one is complete.
            trash = self.root / f"{TRASH_PREFIX}{name}"
            final.rename(trash)
            tmp.rename(final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(final)
        files.fsync_path(self.root)
        faults.hit("after_rename", info["step"], self.rank)
        self._publish(name, info)

    def _publish(self, name: str, info: dict[str, Any]) -> None:
        """Point meta.json at ``name`` (already verified and in place), then apply retention."""
        old, _ = meta.read_meta(self.root)
        best = self._best(old, name, info)
        doomed = select_deletions(self.existing(), name, self.cfg.keep_last, self.cfg.keep_every,
                                  (best or {}).get("name"))
        earlier = (old or {}).get("verified", [])
        earlier = earlier if isinstance(earlier, list) else []
        verified = [n for n in [name, *earlier] if isinstance(n, str) and n not in doomed and _is_entry(self.root, n)]
        verified = list(dict.fromkeys(verified))[:KEEP_VERIFIED]
        # meta.json stops naming the doomed checkpoints before they are deleted, so a crash
        # in between never leaves it pointing at a half-deleted directory.
        meta.write_meta(self.root, {
            "latest": name, "step": info["step"], "epoch": info["epoch"],
            "world_size": self.world_size, "verified": verified, "best": best,
        })
        faults.hit("after_meta", info["step"], self.rank)
        for victim in doomed:
            path = self.root / victim
            if path.is_symlink():
                log.warning("Retention: not deleting %s: it is a symlink", path)
                continue
            log.info("Retention: deleting %s", victim)
            shutil.rmtree(path, ignore_errors=True)

    def _best(self, old: dict | None, name: str, info: dict[str, Any]) -> dict | None:
        best = (old or {}).get("best")
        if not isinstance(best, dict) or not _is_entry(self.root, best.get("name")) \
                or not isinstance(best.get("value"), (int, float)):
            best = None
        value = info.get("metrics", {}).get(self.best_metric)
        if value is None:
            return best
        better = best is None or (value < best["value"] if self.best_mode == "min" else value > best["value"])
        if better:
            return {"name": name, "metric": self.best_metric, "mode": self.best_mode, "value": value,
                    "step": info["step"]}
        return best



def failure_summary(e: CheckpointException) -> str:
    """One line per failed rank: the exception type and the first line of its message."""
    lines = []
    for rank, failure in sorted(e.failures.items()):
        exc = failure[0] if isinstance(failure, tuple) else failure
        text = str(exc).strip().splitlines()
        detail = next((t.strip() for t in text if "WeightsUnpickler error" in t), text[0] if text else "")
        lines.append(f"rank {rank}: {type(exc).__name__}: {detail}")
    return "; ".join(lines) or str(e)


def _is_entry(root: Path, name: Any) -> bool:
    """``name`` is a safe, existing checkpoint directory under ``root``."""
    try:
        return meta.safe_path(root, name).is_dir()
    except meta.UnsafeEntry:
        return False
