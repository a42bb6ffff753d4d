"""The checkpoint manager: when to save, where, how to verify, what to keep, how to load.

Trainers only expose ``state_dict()`` / ``load_state_dict()``; everything about checkpoint
files lives in this package, and the rules of the checkpoints directory (names, the resume
choice, retention, the commit steps) in :mod:`launcher.checkpoint.layout`, which the manager
calls on rank 0 like the offline tools do.

A save, synchronous or in the background, goes through the same steps (the directory rules
are :mod:`launcher.checkpoint.layout`'s, shared with the offline tools):

1. every rank writes its DCP shard into ``checkpoints/.tmp-step_N/`` (checkpoint gloo group),
   digesting each file as it is written (``dcp_io.DigestFileSystem``) and fsyncing it;
2. rank 0 adds ``checkpoint.json`` (the typed record: step, epoch, config, metrics, run);
3. rank 0 gathers every rank's sizes and digests and seals the directory with ``manifest.json``
   (signed with a key), renames it to ``step_N`` and only then rewrites ``meta.json``;
4. rank 0 applies retention: the doomed directories are renamed aside at once and deleted by
   a background thread (the next save, and the end of the run, wait for it).

A process killed anywhere in 1-3 leaves a ``.tmp-`` directory that is never loaded and is
removed at the next start; killed between the rename and ``meta.json``, the complete directory
is found by scanning. Either way the job resumes from the old checkpoint or the new one
(``launcher/checkpoint/faults.py`` kills a save at each of these instants in the tests).

A save that fails with an exception fails on every rank: each step's outcome is shared over
the checkpoint group before the next collective, so no rank is left waiting in a barrier
for a rank that gave up. The same holds for choosing the checkpoint to resume from: rank 0
decides, and any error it meets (a bad ``meta.json``, nothing that verifies) reaches every rank
in the same broadcast.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import pickle
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from launcher import exit_codes, fileio
from launcher.checkpoint import alone, dcp_io, digest, faults, files, layout, meta
from launcher.checkpoint.files import CheckpointError
from launcher.checkpoint.record import CheckpointRecord, RecordError, encode
from launcher.checkpoint.staging import Stager, assign_owners, tensor_signatures
from launcher.config import CheckpointConfig

log = logging.getLogger("launcher.checkpoint")


class CheckpointManager:
    """Owns the checkpoints of one run directory.

    Args:
        run_dir: the run directory; checkpoints go to ``run_dir/checkpoints``.
        cfg: the checkpoint section of the run config.
        rank, world_size: this process in the job.
        group: the gloo process group used for every checkpoint collective.
        best: ``(metric, "min"|"max")`` naming the best checkpoint.
        clock: seconds, monotonic (a fake in tests).

    Raises:
        digest.KeyProblem: a signing key is configured but unusable (a ValueError: exit code 2).
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
        self.scheme = digest.from_env()
        self.run_id = ""  # this run directory's identity, bound into every manifest (set by prepare)
        self._known: dict[str, bool] = {}  # verification outcomes established by this process
        self._surveyed: dict[str, layout.Entry] = {}  # retention's view of older checkpoints, reused
        self._last_save_time = clock()
        self._last_saved_step: int | None = None
        self._requested = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._inflight: concurrent.futures.Future | None = None
        self._deleter: concurrent.futures.ThreadPoolExecutor | None = None
        self._deleting: concurrent.futures.Future | None = None
        self._stager = Stager()
        self.last_save_seconds = 0.0  # time training was blocked by the last save
        self.last_write_seconds = 0.0  # time the last save took from start to published

    # ---------------------------------------------------------------- start of a run

    def prepare(self) -> None:
        """Create the checkpoints directory, clean up after interrupted saves, agree on the run id."""
        outcome: Any = None
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                for line in layout.recover(self.root):
                    log.info("Checkpoints: %s", line)
                outcome = ("ok", layout.run_id(self.root) or layout.new_run_id())
            except OSError as e:
                outcome = ("error", f"cannot prepare {self.root}: {fileio.describe_os_error(e)}")
        status, value = self._from_rank0(outcome)
        if status == "error":
            raise CheckpointError(value)
        self.run_id = value

    def existing(self) -> list[str]:
        return layout.scan(self.root)

    def resolve(self, resume: str) -> Path | None:
        """Pick the checkpoint to resume from, the same on every rank.

        Args:
            resume: ``auto`` (latest verified, or None for a fresh start when there is no
                checkpoint at all), ``none`` (fresh; refused if checkpoints exist), ``best``,
                or a path to a checkpoint directory.

        Raises:
            CheckpointError: nothing verifies, or the request cannot be honoured (on every rank).
        """
        outcome: Any = None
        if self.rank == 0:
            try:
                path = self._resolve_on_rank0(resume)
                outcome = ("ok", str(path) if path else None, self._run_id_after(path))
            except (CheckpointError, layout.UnsafeEntry, OSError) as e:
                outcome = ("error", str(e), getattr(e, "code", exit_codes.CHECKPOINT_ERROR))
            except Exception as e:  # every rank waits in the broadcast below: rank 0 must reach it
                outcome = ("error", f"choosing a checkpoint failed: {type(e).__name__}: {e}",
                           exit_codes.CHECKPOINT_ERROR)
        status, value, extra = self._from_rank0(outcome)
        if status == "error":
            raise CheckpointError(value, extra)
        self.run_id = extra
        return Path(value) if value else None

    def _run_id_after(self, path: Path | None) -> str:
        """A run directory whose meta.json was lost keeps the identity of the checkpoint it resumes from."""
        if self.run_id and layout.run_id(self.root):
            return self.run_id
        if path is not None and path.parent == self.root:
            v = files.verify(path, deep=False)
            if v.manifest is not None and v.manifest.run_id:
                return v.manifest.run_id
        return self.run_id

    def _resolve_on_rank0(self, resume: str) -> Path | None:
        if resume == "none":
            found = self.existing()
            if found:
                raise CheckpointError(
                    f"--resume none, but {self.root} already holds {len(found)} checkpoint(s) "
                    f"(newest: {found[0]}). Starting fresh would overwrite them. Use --resume auto "
                    f"to continue, or choose a new --run-dir.")
            return None
        if resume == "best":
            return self._resolve_path(str(self._best_path()), "--resume best")
        if resume != "auto":
            return self._resolve_path(resume, f"--resume {resume}")
        choice = layout.choose(self.root)
        for note in choice.notes:
            log.warning("%s", note)
        for line in choice.skipped:
            name, reason = line.split(": ", 1)
            self._known[name] = False
            log.warning("Skipping checkpoint %s: %s", name, reason)
        if choice.path is not None:
            self._known[choice.path.name] = True
            if choice.skipped:
                log.warning("Falling back to %s: every newer checkpoint failed verification", choice.path.name)
            return choice.path
        if choice.skipped:
            raise layout.nothing_verifies(self.root, choice.skipped)
        return None

    def _best_path(self) -> Path:
        m, notes = meta.read_meta(self.root)
        if m is None:
            raise CheckpointError(f"--resume best: no best checkpoint recorded ({notes[0]}); use --resume auto "
                                  f"or --resume PATH")
        if m.best is None:
            raise CheckpointError(f"--resume best: {self.root / meta.META} records no best checkpoint yet (none "
                                  f"has been evaluated with a '{self.best_metric}' metric); use --resume auto or "
                                  f"--resume PATH")
        return layout.safe_entry(self.root, m.best.name)

    def _resolve_path(self, resume: str, what: str) -> Path:
        path = Path(resume)
        if not path.exists():
            raise CheckpointError(f"{what}: {path} does not exist; pass a checkpoint directory, e.g. "
                                  f"{self.root / layout.checkpoint_name(100)}", exit_codes.CONFIG_ERROR)
        if (path / meta.META).is_file() or path.name == "checkpoints":
            raise CheckpointError(f"{what}: that is a checkpoints directory; pass one checkpoint inside it, "
                                  f"e.g. {path / layout.checkpoint_name(100)}", exit_codes.CONFIG_ERROR)
        check = files.verify(path, expected_run=layout.run_id(path.parent))
        if not check.ok:
            raise CheckpointError(f"{what}: checkpoint does not verify: {check.reason()}")
        return path

    def load(self, path: Path, template: dict[str, Any]) -> dict[str, Any]:
        """Fill ``template`` (this rank's keys) from the DCP checkpoint at ``path`` (verified first)."""
        try:
            dcp.load(template, storage_reader=dcp_io.SafeFileSystemReader(str(path)),
                     planner=dcp_io.SafeLoadPlanner(), process_group=self.group)
        except CheckpointException as e:  # raised on every rank when any rank failed
            raise CheckpointError(f"Loading checkpoint {path} failed: {failure_summary(e)}\n"
                                  f"It verified, so its bytes are as written; if a value needs the unsafe "
                                  f"unpickler, the checkpoint was not written by this launcher and should not "
                                  f"be trusted.") from None
        return template

    @staticmethod
    def saved_shapes(path: Path) -> dict[str, tuple[int, ...] | None]:
        """Flattened key -> tensor shape (None for non-tensors) of a DCP checkpoint."""
        try:
            return dcp_io.saved_shapes(path)
        except (pickle.UnpicklingError, OSError, EOFError, ValueError) as e:
            raise CheckpointError(f"Checkpoint {path}: cannot read its DCP index: {e}") from None

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

    def due(self, step: int, epoch_end: bool, final: bool, any_rank_wants: bool,
            milestone: bool = False, again: bool = False) -> str | None:
        """Why a checkpoint is due after ``step`` completed steps, or None (``milestone``: the trainer's;
        ``again``: even though one of this step exists, e.g. a snapshot written before its evaluation)."""
        if step == self._last_saved_step and not again:
            return None
        if final:
            return "end of training"
        if any_rank_wants:
            return "requested"
        if milestone:
            return "milestone"
        if epoch_end and self.cfg.every_epoch:
            return "end of epoch"
        if self.cfg.interval_steps and step % self.cfg.interval_steps == 0:
            return "interval"
        return None

    # ---------------------------------------------------------------- saving

    def save(self, step: int, state: dict[str, Any], info: dict[str, Any], blocking: bool = False) -> None:
        """Write a checkpoint of ``state`` after ``step`` completed steps.

        ``info`` holds the :class:`~launcher.checkpoint.record.CheckpointRecord` fields the caller
        knows (step, epoch, loss, metrics, config, reason, ...); name, world size and run id are
        added here. With ``checkpoint.async`` (and not ``blocking``) the state is copied into
        staging buffers and written by a background thread; this call returns after the copy.
        At most one save is in flight: a second call first waits for the previous one.

        Raises:
            RecordError: ``info`` does not fit the schema (raised before anything is written).
            CheckpointError: the save failed (on every rank).
        """
        started = time.perf_counter()
        self.wait()
        name = layout.checkpoint_name(step)
        record = CheckpointRecord.from_json({**info, "step": step, "name": name, "world_size": self.world_size,
                                             "run_id": self.run_id or layout.new_run_id()},
                                            source=f"the record of checkpoint {name}")
        self.run_id = record.run_id
        self._last_saved_step = step
        self._last_save_time = self.clock()
        self._requested = False
        if self.cfg.async_save and not blocking:
            staged = self._stage(state)
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt")
            self._inflight = self._executor.submit(self._write, name, staged, record)
        else:
            self._write(name, state, record)
        self.last_save_seconds = time.perf_counter() - started

    def save_alone(self, step: int, state: dict[str, Any], info: dict[str, Any]) -> alone.Written:
        """Write a snapshot of ``state`` after ``step`` steps by this process alone (no collective: a
        peer is lost), verified like every checkpoint; published if no other survivor's landed
        first (:mod:`launcher.checkpoint.alone`). ``info`` as for :meth:`save`.

        Raises:
            RecordError: ``info`` does not fit the schema.
            CheckpointError: the write failed; nothing was published.
        """
        name = layout.checkpoint_name(step)
        record = CheckpointRecord.from_json({**info, "step": step, "name": name, "world_size": self.world_size,
                                             "run_id": self.run_id or layout.new_run_id(), "snapshot_rank": self.rank},
                                            source=f"the record of snapshot {name}")
        return alone.write(self.root, state, record, self.scheme, self.rank, (self.best_metric, self.best_mode))

    def wait(self) -> None:
        """Block until the in-flight background save (if any) is written and published."""
        if self._inflight is not None:
            future, self._inflight = self._inflight, None
            future.result()  # re-raises a background failure here, in the training thread

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown()
                self._executor = None
            self._wait_deleting()
            if self._deleter is not None:
                self._deleter.shutdown()
                self._deleter = None

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

    def _write(self, name: str, state: dict[str, Any], record: CheckpointRecord) -> None:
        """Write, seal, rename and publish one checkpoint (every rank calls this)."""
        started = time.perf_counter()
        tmp = self.root / f"{layout.TMP_PREFIX}{name}"
        error = None
        if self.rank == 0:
            try:
                layout.begin(self.root, name)
            except OSError as e:
                error = f"cannot create {tmp}: {fileio.describe_os_error(e)}"
        self._agree_all(error)
        writer, fs = dcp_io.digesting_writer(tmp, self.scheme)
        faults.arm_writer(fs, record.step, self.rank)
        try:
            dcp.save(state, storage_writer=writer, process_group=self.group)
        except CheckpointException as e:  # raised on every rank when any rank failed
            raise CheckpointError(f"writing checkpoint {name} to {tmp} failed: "
                                  f"{failure_summary(e, fs.errors, self.root)}") from None
        faults.hit("after_dcp_save", record.step, self.rank)
        described = self._describe_own_files(tmp, fs, record)
        gathered = self._gather(described)
        failed = [error for _, error in gathered if error]
        if failed:
            raise CheckpointError("checkpoint save failed: " + "; ".join(failed))
        error = None
        if self.rank == 0:
            try:
                self._commit(name, tmp, [listing for listing, _ in gathered], record)
            except (CheckpointError, OSError) as e:
                error = fileio.describe_os_error(e) if isinstance(e, OSError) else str(e)
        self._agree_all(error, only_rank0=True)
        self.last_write_seconds = time.perf_counter() - started

    def _describe_own_files(self, tmp: Path, fs: dcp_io.DigestFileSystem,
                            record: CheckpointRecord) -> tuple[dict[str, tuple[int, str]], str | None]:
        """Size and digest of the files this rank wrote (rank 0 also writes ``checkpoint.json``)."""
        try:
            mine = sorted(n for n in os.listdir(tmp) if n.startswith(f"__{self.rank}_"))
            listing: dict[str, tuple[int, str]] = {}
            if self.rank == 0:
                data = encode(record)
                fileio.write_new(tmp / files.INFO, data)
                listing[files.INFO] = (len(data), digest.digest_bytes(self.scheme, data))
                mine.append(files.DCP_METADATA)
            return {**listing, **dcp_io.describe_written(tmp, mine, fs)}, None
        except (OSError, RecordError) as e:
            why = fileio.describe_os_error(e) if isinstance(e, OSError) else str(e)
            return {}, f"rank {self.rank}: cannot checksum its files in {tmp}: {why}"

    def _gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered

    def _from_rank0(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def _agree_all(self, error: str | None, only_rank0: bool = False) -> None:
        """Share each rank's outcome of a step; raise CheckpointError on every rank if any failed.

        This replaces a plain barrier: a rank that failed still reaches the collective, so the
        others learn of the failure instead of waiting for it until the group times out.
        """
        errors = [self._from_rank0(error)] if only_rank0 else self._gather(error)
        failed = [e for e in errors if e]
        if failed:
            raise CheckpointError("checkpoint save failed: " + "; ".join(failed))

    def _commit(self, name: str, tmp: Path, listings: list[dict], record: CheckpointRecord) -> None:
        listing: dict[str, tuple[int, str]] = {}
        for part in listings:
            listing.update(part)
        unlisted = sorted(n for n in os.listdir(tmp) if n not in listing)
        if unlisted:
            raise CheckpointError(f"{tmp}: files no rank accounted for: {unlisted}")
        layout.seal(tmp, files.make_manifest(self.scheme, name, record.step, record.run_id, listing), self.scheme)
        faults.hit("after_manifest", record.step, self.rank)
        layout.install(self.root, tmp, name, durable=False)  # publish's fsync of the directory covers the rename
        self._known[name] = True
        self._surveyed.pop(name, None)
        faults.hit("after_rename", record.step, self.rank)
        self._publish(name, record)

    def _publish(self, name: str, record: CheckpointRecord) -> None:
        """Point meta.json at ``name`` (verified and in place), then apply retention."""
        self._wait_deleting()
        old, _ = meta.read_meta(self.root)
        best = layout.next_best(self.root, old.best if old else None, name, record, self.best_metric, self.best_mode)
        entries = layout.survey(self.root, below=record.step, known=self._known, cache=self._surveyed)
        doomed = layout.plan_retention(entries, name, self.cfg.keep_last, self.cfg.keep_every,
                                       best.name if best else None)
        layout.publish(self.root, name, record, self.world_size, best, doomed)
        faults.hit("after_meta", record.step, self.rank)
        bad = {e.name for e in entries if not e.verified}
        for victim in doomed:
            if victim in bad:
                log.warning("Retention: deleting %s, which does not verify", victim)
            else:
                log.debug("Retention: deleting %s", victim)
            self._known.pop(victim, None)
        moved = layout.set_aside(self.root, doomed)
        if moved:
            if self._deleter is None:
                self._deleter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-delete")
            self._deleting = self._deleter.submit(layout.delete, moved)

    def _wait_deleting(self) -> None:
        """Wait for retention's background deletion; a failure is logged (the next start retries it)."""
        if self._deleting is not None:
            future, self._deleting = self._deleting, None
            for failure in future.result():
                log.warning("Retention: could not delete %s; it is removed at the next start", failure)


def failure_summary(e: CheckpointException, local_errors: list[str] | None = None, root: Path | None = None) -> str:
    """One line per failed rank (exception type, first line), this rank's OS errors, and free space if short."""
    lines = []
    for rank, failure in sorted(e.failures.items()):
        exc = failure[0] if isinstance(failure, tuple) else failure
        text = str(exc).strip().splitlines()
        detail = next((t.strip() for t in text if "WeightsUnpickler error" in t or "refusing" in t),
                      text[0] if text else "")
        lines.append(f"rank {rank}: {type(exc).__name__}: {detail}")
    summary = "; ".join(lines) or str(e)
    if local_errors:
        summary += f" (on this rank: {'; '.join(local_errors[:3])})"
    if root is not None and any("No space left" in t for t in [summary, *(local_errors or [])]):
        free = shutil.disk_usage(root).free if root.exists() else 0
        summary += f"; the disk is full ({free // 2**20} MB free in {root}): free space or choose another --run-dir"
    return summary
