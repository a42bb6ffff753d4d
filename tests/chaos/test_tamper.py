"""Tamper and corruption: every bad input we know of, each with its outcome, exit code, no traceback,
and every checkpoint that verified before it byte for byte unchanged after it.

One tiny run is trained once (in this process) and copied for each case. Each case damages the
copy, runs one command as a user would (``launcher/run.py``'s ``main`` or a ``ckpt`` subcommand,
in this process), and checks what it printed and returned. Cases that need a read-only or a
full file system run in a subprocess inside a private mount namespace (``unshare -rm``), so
nothing on the machine changes; they are skipped where user namespaces are not available.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from ckpt_testing import make_run
from helpers import ENCODER_FAST, PY, REPO, child_env, config_path

from launcher import ckpt, fileio
from launcher.checkpoint import digest, files, layout, meta

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300),
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]

KEY = "a-signing-key-of-32-characters!!"
STEPS = ["--set", "train.max_steps=6", "--set", "checkpoint.interval_steps=2", "--set", "checkpoint.keep_last=10"]
N = layout.checkpoint_name


@dataclass
class Outcome:
    code: int
    text: str


@contextlib.contextmanager
def process_state():
    """Give back the logging handlers and signal handlers a training run replaces in this process."""
    import logging
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    signals = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        yield
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
            if h not in handlers:
                h.close()
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
        for s, h in signals.items():
            signal.signal(s, h)


def call(main, argv: list[str]) -> Outcome:
    buf = io.StringIO()
    with process_state(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = 1
    return Outcome(code, buf.getvalue())


def train(run_dir: Path, *extra: str) -> Outcome:
    """Resume (or start) the run with a target two steps past the trained run's, so that a resume
    from its last checkpoint really loads it and trains (a finished run would only say so)."""
    from launcher.run import main
    return call(main, ["--config", config_path("encoder"), "--run-dir", run_dir, *ENCODER_FAST, *STEPS,
                       "--set", "train.max_steps=8", *extra])


def tool(*argv) -> Outcome:
    return call(ckpt.main, list(argv))


def verified_bytes(run_dir: Path) -> dict[Path, bytes]:
    """Every file of every checkpoint that verifies now (with the key in the environment, if any)."""
    root = run_dir / "checkpoints"
    out = {}
    for name in layout.scan(root):
        if files.verify(root / name, expected_run=layout.run_id(root)).ok:
            out.update({p: p.read_bytes() for p in (root / name).iterdir()})
    return out


def check(outcome: Outcome, code: int, *needles: str, before: dict[Path, bytes] | None = None) -> None:
    assert outcome.code == code, outcome.text
    assert "Traceback" not in outcome.text, outcome.text
    for needle in needles:
        assert needle in outcome.text, f"{needle!r} not in:\n{outcome.text}"
    for path, data in (before or {}).items():
        assert path.is_file() and path.read_bytes() == data, f"{path} changed"


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("tamper") / "run"
    outcome = train(run_dir, "--set", "train.max_steps=6")
    assert outcome.code == 0, outcome.text
    assert layout.scan(run_dir / "checkpoints") == [N(6), N(4), N(2)]
    return run_dir


@pytest.fixture
def run(trained, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out, symlinks=True)
    return out


def ck(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / N(step)


def reseal(directory: Path, scheme: digest.Scheme | None = None) -> None:
    """Rewrite a checkpoint's manifest for its current bytes, as someone who knows the format would."""
    m = files.Manifest.parse(json.loads((directory / files.MANIFEST).read_text()))
    scheme = scheme or digest.Scheme()
    sums = digest.digest_files([directory / n for n in m.files], scheme)
    new = files.make_manifest(scheme, m.name, m.step, m.run_id, {p.name: v for p, v in sums.items()})
    (directory / files.MANIFEST).unlink()
    files.write_manifest(directory, new)


def forge_crc(data: bytes, target: int, pos: int) -> bytes:
    """``data`` with the 4 bytes at ``pos`` chosen so that its CRC32 is ``target`` (CRC32 is linear)."""
    base = bytearray(data)
    base[pos:pos + 4] = bytes(4)
    c0 = zlib.crc32(bytes(base))
    basis: dict[int, tuple[int, int]] = {}  # pivot bit -> (effect on the CRC, bits flipped)
    for i in range(32):
        flipped = bytearray(base)
        flipped[pos + i // 8] ^= 1 << (i % 8)
        v, m = zlib.crc32(bytes(flipped)) ^ c0, 1 << i
        for bit in sorted(basis, reverse=True):
            if v >> bit & 1:
                v, m = v ^ basis[bit][0], m ^ basis[bit][1]
        if v:
            basis[v.bit_length() - 1] = (v, m)
    want, x = c0 ^ target, 0
    for bit in sorted(basis, reverse=True):
        if want >> bit & 1:
            want, x = want ^ basis[bit][0], x ^ basis[bit][1]
    assert want == 0
    base[pos:pos + 4] = x.to_bytes(4, "little")
    assert zlib.crc32(bytes(base)) == target
    return bytes(base)


class Payload:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def evil_metadata(original: bytes, marker: Path) -> bytes:
    """A pickle that runs code, padded and forged to the size and CRC32 of ``original``."""
    evil = pickle.dumps(Payload(marker))
    assert len(evil) + 8 <= len(original)
    padded = evil + bytes(len(original) - len(evil))  # pickle stops reading at its STOP opcode
    return forge_crc(padded, zlib.crc32(original), len(evil) + 2)


# ---------------------------------------------------------------------------- the run's own checks

def test_step_and_name_disagree_resume_ignores_the_copy(run):
    """``cp -a step_2 step_50`` used to roll every resume back to step 2 and drop metrics."""
    shutil.copytree(ck(run, 2), ck(run, 50))
    before, metrics = verified_bytes(run), (run / "metrics.jsonl").read_bytes()
    out = train(run)
    check(out, 0, "Skipping checkpoint step_00000050", "its name says step 50 but it holds step 2",
          f"Resuming from checkpoint: {ck(run, 6)}", before=before)
    assert (run / "metrics.jsonl").read_bytes().startswith(metrics)  # steps 1-6 kept, 7-8 added


def test_set_lr_never_creates_a_misnamed_checkpoint(run):
    out = tool("set-lr", ck(run, 6), "0.001", "--out", run / "checkpoints" / N(99))
    check(out, 2, "the name says step 99, but this checkpoint is step 6", before=verified_bytes(run))
    assert not ck(run, 99).exists() and not list((run / "checkpoints").glob(".tmp-*"))


def test_resume_best_before_any_evaluation(run):
    assert json.loads((run / "checkpoints" / meta.META).read_text())["best"] is None  # written by our launcher
    check(train(run, "--resume", "best"), 3, "records no best checkpoint yet", before=verified_bytes(run))


@pytest.mark.parametrize("command", ["inspect", "diff", "list", "resume"])
def test_checkpoint_json_with_a_flipped_byte(run, command):
    info = ck(run, 6) / files.INFO
    data = bytearray(info.read_bytes())
    data[10] = 0xFF  # not UTF-8 any more
    info.write_bytes(bytes(data))
    before = verified_bytes(run)
    if command == "inspect":
        check(tool("inspect", ck(run, 6)), 3, "checkpoint.json: not UTF-8", before=before)
    elif command == "diff":
        check(tool("diff", ck(run, 6), ck(run, 4)), 3, "checkpoint.json: not UTF-8", before=before)
    elif command == "list":
        check(tool("list", run), 0, "bytes changed", before=before)
    else:
        check(train(run), 0, "Skipping checkpoint step_00000006", "Falling back to step_00000004", before=before)


@pytest.mark.parametrize("content,needle", [(b"[1, 2]\n", "expected a JSON object"),
                                            (b"not json\n", "not valid JSON"),
                                            (b'{"step": "six"}\n', "'step' = 'six'")])
def test_resealed_checkpoint_json_that_does_not_fit_the_schema(run, content, needle):
    """Manifest recomputed to match: the checkpoint still does not verify, and resume falls back."""
    (ck(run, 6) / files.INFO).write_bytes(content)
    reseal(ck(run, 6))
    before = verified_bytes(run)
    check(tool("list", run), 0, needle, before=before)
    check(train(run), 0, f"Skipping checkpoint step_00000006: {ck(run, 6) / files.INFO}: ", needle, before=before)


@pytest.mark.parametrize("target", [meta.META, f"{N(6)}/{files.INFO}", f"{N(6)}/{files.DCP_METADATA}",
                                    f"{N(6)}/{files.MANIFEST}"])
def test_fifo_in_place_of_a_file_never_blocks(run, target):
    path = run / "checkpoints" / target
    path.unlink()
    os.mkfifo(path)
    before = verified_bytes(run)
    fallback = "Resuming from checkpoint" if target == meta.META else "Falling back to step_00000004"
    check(tool("list", run), 0, "FIFO", before=before)
    check(train(run), 0, "FIFO", fallback, before=before)


def test_malicious_metadata_with_a_recomputed_crc_never_runs(run, tmp_path):
    """Without a key anyone can recompute a CRC; DCP's index is still read by an allow-list unpickler."""
    marker = tmp_path / "pwned"
    meta_file = ck(run, 6) / files.DCP_METADATA
    meta_file.write_bytes(evil_metadata(meta_file.read_bytes(), marker))
    reseal(ck(run, 6))
    before = verified_bytes(run)
    check(train(run), 3, "refusing to unpickle it", "posix.mkdir", before=before)
    check(tool("export", run, tmp_path / "w.pt"), 3, "refusing to unpickle it", before=before)
    assert not marker.exists() and not (tmp_path / "w.pt").exists()


def test_checkpoint_copied_in_from_another_run_is_refused(run, tmp_path):
    other = tmp_path / "other"
    make_run(other, steps=(8,))
    shutil.copytree(other / "checkpoints" / N(8), ck(run, 8))
    check(train(run), 0, "Skipping checkpoint step_00000008", "belongs to another run",
          f"Resuming from checkpoint: {ck(run, 6)}", before=verified_bytes(run))


@pytest.mark.parametrize("damage,needle", [("truncate", "truncated"), ("flip", "bytes changed"),
                                           ("no-metadata", ".metadata: missing file"),
                                           ("no-manifest", "missing manifest"),
                                           ("manifest-garbage", "unreadable manifest"),
                                           ("shard-symlink", "is a symlink")])
def test_damaged_newest_checkpoint_falls_back(run, tmp_path, damage, needle):
    shard = ck(run, 6) / "__0_0.distcp"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 1
        shard.write_bytes(bytes(data))
    elif damage == "no-metadata":
        (ck(run, 6) / files.DCP_METADATA).unlink()
    elif damage == "no-manifest":
        (ck(run, 6) / files.MANIFEST).unlink()
    elif damage == "manifest-garbage":
        (ck(run, 6) / files.MANIFEST).write_bytes(b"\x00{")
    else:
        shutil.copy(shard, tmp_path / "outside.distcp")
        shard.unlink()
        shard.symlink_to(tmp_path / "outside.distcp")
    before = verified_bytes(run)
    check(tool("verify", ck(run, 6)), 3, needle, before=before)
    check(train(run), 0, needle, "Falling back to step_00000004", before=before)


@pytest.mark.parametrize("entry", ["../../etc", "/tmp", 42])
def test_meta_json_entries_cannot_leave_the_checkpoints_directory(run, entry):
    m = json.loads((run / "checkpoints" / meta.META).read_text())
    m.update(latest=entry, verified=[entry])
    (run / "checkpoints" / meta.META).write_text(json.dumps(m))
    check(train(run), 0, f"Resuming from checkpoint: {ck(run, 6)}", before=verified_bytes(run))


def test_a_live_job_holds_the_run_directory(run):
    from filelock import FileLock
    lock = FileLock(str(run / ".lock"))
    lock.acquire(timeout=5)
    try:
        check(train(run), 3, "in use by another live job", before=verified_bytes(run))
    finally:
        lock.release()


def test_our_files_never_follow_a_planted_symlink_and_leftovers_are_cleaned(run, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(victim)
    leftovers = [run / "checkpoints" / ".meta.json.tmp-12345", run / ".config.yaml.tmp-7-abcd1234"]
    for p in leftovers:
        p.write_text("half")
    before = verified_bytes(run)
    check(train(run), 3, "metrics.jsonl: is a symlink, not a regular file; remove it", before=before)
    assert victim.read_text() == "precious"
    assert not any(p.exists() for p in leftovers)


def test_seed_too_large_for_the_generators_is_named(tmp_path):
    check(train(tmp_path / "r", "--set", "train.seed=99999999999999999999999"), 2, "train.seed = 9999")


@pytest.mark.parametrize("target", ["a directory", "under a file"])
def test_export_refuses_a_bad_target_and_leaves_nothing_behind(run, tmp_path, target):
    out = tmp_path / "dir.pt" if target == "a directory" else run / "config.yaml" / "w.pt"
    if target == "a directory":
        out.mkdir()
    check(tool("export", run, out), 2, "is a directory" if target == "a directory" else "cannot write",
          before=verified_bytes(run))
    where = out.parent if target == "a directory" else run
    assert not [p for p in where.iterdir() if fileio.TMP_INFIX in p.name]


def test_a_failure_on_rank_0_alone_reaches_every_rank_at_once(run, tmp_path):
    """Two ranks; only rank 0 writes metrics.jsonl, and a planted symlink makes it fail there. Rank 1
    learns of it in the same start-up step: both exit 3 at once, not after the 300 s collective timeout."""
    from helpers import run as run_cmd
    from helpers import tail, train_cmd
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(tmp_path / "victim")
    before, log = verified_bytes(run), tmp_path / "log"
    started = time.monotonic()
    code = run_cmd(train_cmd("encoder", run, 2, [*STEPS, "--set", "train.max_steps=8"]), log, timeout=150)
    text = log.read_text()
    assert code != 0 and "(exitcode: 3)" in text, tail(log)
    assert "metrics.jsonl: is a symlink" in text and "(reported by another rank)" in text, tail(log)
    assert "launcher/training.py" not in text and "launcher/checkpoint/" not in text, tail(log)  # no traceback of ours
    assert time.monotonic() - started < 120
    check(Outcome(0, ""), 0, before=before)


# ---------------------------------------------------------------------------- signed checkpoints

@pytest.fixture
def signed(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(digest.KEY_ENV, KEY)
    run_dir = tmp_path / "signed"
    make_run(run_dir, steps=(10, 20, 30))
    return run_dir


def resolve(run_dir: Path):
    from ckpt_testing import manager
    return manager(run_dir).resolve("auto")


def test_forged_crc_with_a_key_is_rejected_and_never_runs(signed, tmp_path):
    """The attack of issue 10: .metadata swapped for a code-running pickle of the same size and CRC32."""
    marker = tmp_path / "pwned"
    target = signed / "checkpoints" / N(30)
    original = (target / files.DCP_METADATA).read_bytes()
    (target / files.DCP_METADATA).write_bytes(evil_metadata(original, marker))
    before = verified_bytes(signed)
    check(tool("verify", target), 3, "bytes changed", before=before)
    assert resolve(signed) == signed / "checkpoints" / N(20)
    # The attacker rewrites the manifest too: as an old CRC32 manifest, unsigned, or signed with another key.
    for forged, needle in ((None, "not signed"), (digest.Scheme.keyed(b"not the key at all!"), "signature does not")):
        reseal(target, forged)
        check(tool("verify", target), 3, needle, before=before)
    sums = {n: {"size": len(b), "crc32": f"{zlib.crc32(b):08x}"}
            for n, b in ((p.name, p.read_bytes()) for p in target.iterdir() if p.name != files.MANIFEST)}
    (target / files.MANIFEST).write_text(json.dumps({"format": 1, "checksum": "crc32", "files": sums}))
    check(tool("verify", target), 3, "format-1 manifest", before=before)
    assert resolve(signed) == signed / "checkpoints" / N(20)
    assert not marker.exists()


def test_signed_checkpoint_renamed_or_replayed_from_another_run(signed, tmp_path):
    other = tmp_path / "other"
    make_run(other, steps=(30,))  # the same key, another run
    shutil.rmtree(signed / "checkpoints" / N(30))
    shutil.copytree(other / "checkpoints" / N(30), signed / "checkpoints" / N(30))
    (signed / "checkpoints" / N(20)).rename(signed / "checkpoints" / N(40))
    before = verified_bytes(signed)
    out = tool("verify", signed)
    check(out, 3, "belongs to another run", "renamed or copied: it was written as step_00000020", before=before)
    assert resolve(signed) == signed / "checkpoints" / N(10)


def test_key_missing_short_or_unsigned_checkpoint(signed, tmp_path, monkeypatch):
    before = verified_bytes(signed)
    monkeypatch.delenv(digest.KEY_ENV)
    check(tool("verify", signed), 3, "set FTLAUNCH_HMAC_KEY", before=before)
    monkeypatch.setenv(digest.KEY_ENV, "short")
    check(tool("verify", signed), 2, "use at least 16", before=before)
    check(train(tmp_path / "r"), 2, "use at least 16")
    monkeypatch.setenv(digest.KEY_ENV, KEY)
    unsigned = tmp_path / "unsigned"
    monkeypatch.delenv(digest.KEY_ENV)
    make_run(unsigned, steps=(10,))
    monkeypatch.setenv(digest.KEY_ENV, KEY)
    check(tool("verify", unsigned), 3, "not signed, but a signing key is set")


# ---------------------------------------------------------------------------- progress reports

def test_heartbeat_never_follows_a_planted_temporary_symlink(tmp_path):
    from launcher.heartbeat import Heartbeat
    victim = tmp_path / "victim"
    victim.write_text("precious")
    template = str(tmp_path / "rank{rank}.json")
    for name in ("rank0.json.tmp", ".rank0.json.tmp-1"):  # the old fixed name, and one like ours
        (tmp_path / name).symlink_to(victim)
    beat = Heartbeat(template, 0, min_interval=0)
    beat.report(3)
    assert victim.read_text() == "precious"
    assert json.loads((tmp_path / "rank0.json").read_text())["step"] == 3


@pytest.mark.parametrize("when", [math.nan, math.inf, 1e12])
def test_a_report_from_the_future_or_nan_does_not_switch_hang_detection_off(tmp_path, when):
    from launcher.agent.progress import ProgressMonitor, Report
    now = [1000.0]
    reports = {0: Report(0, 5, "training", when, 42, 0)}
    monitor = ProgressMonitor(str(tmp_path / "rank{rank}.json"), hang_timeout=10, clock=lambda: now[0],
                              reader=lambda path: reports.get(0) if math.isfinite(reports[0].time) else None)
    monitor.start_attempt({0: 42})
    monitor.poll()
    reports[0] = Report(0, 6, "training", 1000.0, 42, 0)  # a sane report, so the rank counts as reporting
    monitor.poll()
    reports[0] = Report(0, 7, "training", when, 42, 0)
    monitor.poll()
    now[0] += 30
    assert 0 in monitor.hung()


# ---------------------------------------------------------------------------- read-only and full disks

def _namespaces() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_namespaces = pytest.mark.skipif(not _namespaces(), reason="needs unshare -rm (user and mount namespaces)")


def in_namespace(setup: str, actions: list) -> list[Outcome]:
    """Run the driver's ``actions`` after the shell ``setup``, in a private mount namespace."""
    driver = f"{PY} {REPO / 'tests' / 'tamper_driver.py'} '{json.dumps(actions)}'"
    r = subprocess.run(["unshare", "-rm", "sh", "-c", f"set -e; {setup}; exec {driver}"], capture_output=True,
                       text=True, timeout=240, env=child_env(), cwd=REPO)
    assert r.returncode == 0, r.stderr
    return [Outcome(**json.loads(line)) for line in r.stdout.splitlines() if line.startswith("{")]


def _train_args(run_dir: Path, *extra: str) -> list:
    return ["train", "--config", config_path("encoder"), "--run-dir", str(run_dir), *ENCODER_FAST, *STEPS, *extra]


@needs_namespaces
def test_read_only_run_directory(run):
    before = verified_bytes(run)
    outs = in_namespace(f"mount --bind {run} {run}; mount -o remount,bind,ro {run}",
                        [_train_args(run, "--set", "train.max_steps=8"),
                         ["ckpt", "prune", str(run), "--keep-last", "2"],
                         ["ckpt", "set-lr", str(ck(run, 6)), "0.001"]])
    check(outs[0], 3, "Read-only file system", before=before)
    check(outs[1], 3, "Read-only file system", before=before)
    check(outs[2], 3, "Read-only file system", before=before)


@needs_namespaces
def test_full_disk_during_a_save_says_so_every_time(trained, tmp_path):
    """Room for the metrics of a few steps, not for a checkpoint: each attempt fails with a clear message."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_dir = mnt / "run"
    train_args = _train_args(run_dir, "--set", "train.max_steps=8")
    outs = in_namespace(f"mount -t tmpfs -o size=4m none {mnt}; cp -a {trained} {run_dir}",
                        [["fill", str(mnt / "filler"), "24576"], train_args, train_args,
                         ["ckpt", "verify", str(run_dir)], ["fill", str(mnt / "filler2"), "0"], train_args,
                         ["ckpt", "verify", str(run_dir)]])
    for out in outs[1:3]:  # a save fails
        check(out, 3, "No space left on device", "free")
    check(outs[5], 3, "No space left on device")  # no room at all: a file of the start, or the save, fails
    for out in (outs[3], outs[6]):
        check(out, 0, f"OK   {run_dir / 'checkpoints' / N(6)}", f"OK   {run_dir / 'checkpoints' / N(2)}")
