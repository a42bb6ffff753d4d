"""Every corruption case resolves to the right checkpoint, or to a CheckpointError listing what was tried."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from ckpt_testing import ckpt, make_info, make_run, make_state, manager, shard, template

from launcher.checkpoint import digest, files, layout, meta
from launcher.checkpoint.manager import CheckpointError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("pristine") / "run"
    make_run(run, steps=(10, 20, 30), losses=(0.5, 0.3, 0.4))
    return run


@pytest.fixture
def run(pristine, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(pristine, out, symlinks=True)
    return out


def resolve(run_dir: Path, resume: str = "auto") -> Path | None:
    return manager(run_dir).resolve(resume)


def meta_json(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / meta.META


def edit_meta(run_dir: Path, **changes) -> None:
    m = json.loads(meta_json(run_dir).read_text())
    m.update(changes)
    meta_json(run_dir).write_text(json.dumps(m))


def test_intact_run_resolves_latest_and_loads_its_values(run):
    path = resolve(run)
    assert path == ckpt(run, 30)
    state = manager(run).load(path, template())
    assert torch.equal(state["model"]["w"], make_state(30)["model"]["w"])
    assert state["progress"] == json.dumps({"step": 30})


def _falls_back(run, caplog, needle: str) -> None:
    with caplog.at_level(logging.WARNING, logger="launcher.checkpoint"):
        path = resolve(run)
    assert path == ckpt(run, 20)
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "step_00000030" in warnings and needle in warnings, warnings
    state = manager(run).load(path, template())
    assert torch.equal(state["model"]["b"], make_state(20)["model"]["b"])


def test_truncated_shard_falls_back(run, caplog):
    f = shard(run, 30)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _falls_back(run, caplog, "truncated")


def test_changed_byte_falls_back(run, caplog):
    f = shard(run, 30)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    _falls_back(run, caplog, "bytes changed")


def test_missing_dcp_metadata_falls_back(run, caplog):
    (ckpt(run, 30) / ".metadata").unlink()
    _falls_back(run, caplog, ".metadata: missing file")


def test_missing_manifest_falls_back(run, caplog):
    (ckpt(run, 30) / files.MANIFEST).unlink()
    _falls_back(run, caplog, "missing manifest")


@pytest.mark.parametrize("text", ["\x00garbage", '{"files": [1, 2]}', '{"files": {"__0_0.distcp": {"size": "9"}}}',
                                  '{"nofiles": {}}'])
def test_unreadable_manifest_falls_back(run, caplog, text):
    (ckpt(run, 30) / files.MANIFEST).write_text(text)
    _falls_back(run, caplog, "unreadable manifest")


def test_manifest_without_signature_fails_when_a_key_is_set(run, monkeypatch, caplog):
    monkeypatch.setenv(digest.KEY_ENV, "secret-key-of-16-bytes")
    with caplog.at_level(logging.WARNING, logger="launcher.checkpoint"), \
            pytest.raises(CheckpointError, match="not signed, but a signing key is set"):
        resolve(run)  # none of the three was signed


def test_deleted_file_falls_back(run, caplog):
    (ckpt(run, 30) / files.INFO).unlink()
    _falls_back(run, caplog, "checkpoint.json: missing file")


def test_extra_manifest_entry_escaping_the_directory_fails_verification(run, caplog):
    m = json.loads((ckpt(run, 30) / files.MANIFEST).read_text())
    m["files"]["../step_00000020/__0_0.distcp"] = {"size": 1, "digest": "00000000"}
    (ckpt(run, 30) / files.MANIFEST).write_text(json.dumps(m))
    _falls_back(run, caplog, "escapes the checkpoint directory")


def test_shard_replaced_by_symlink_fails_verification(run, tmp_path, caplog):
    outside = tmp_path / "outside.distcp"
    shutil.copy(shard(run, 30), outside)
    shard(run, 30).unlink()
    shard(run, 30).symlink_to(outside)
    _falls_back(run, caplog, "is a symlink")


@pytest.mark.parametrize("damage", ["missing", "garbage", "not a dict", "points at nothing"])
def test_meta_json_problems_are_answered_by_scanning(run, caplog, damage):
    if damage == "missing":
        meta_json(run).unlink()
    elif damage == "garbage":
        meta_json(run).write_bytes(b"\x00{not json")
    elif damage == "not a dict":
        meta_json(run).write_text("[1, 2]")
    else:
        edit_meta(run, latest="step_00000099", verified=["step_00000098"])
    with caplog.at_level(logging.WARNING, logger="launcher.checkpoint"):
        assert resolve(run) == ckpt(run, 30)
    assert "meta.json" in caplog.text


def test_meta_json_stale_and_newest_corrupt_still_finds_right_one(run, caplog):
    """meta.json says 20 (a crash before it was rewritten), but 30 is complete: 30 wins; corrupt it and 20 wins."""
    edit_meta(run, latest="step_00000020", verified=["step_00000020", "step_00000010"])
    assert resolve(run) == ckpt(run, 30)
    shard(run, 30).write_bytes(b"")
    assert resolve(run) == ckpt(run, 20)


@pytest.mark.parametrize("entry", ["../elsewhere", "..", "/tmp", "a/../../b", "step_00000030/../../x", 42])
def test_unsafe_meta_entries_are_rejected(run, caplog, entry):
    edit_meta(run, latest=entry, verified=[entry, "step_00000020"])
    with caplog.at_level(logging.WARNING, logger="launcher.checkpoint"):
        path = resolve(run)
    assert path == ckpt(run, 30)  # found by scanning, the bad entry never used
    assert "not a plain directory name" in caplog.text or "no 'latest' entry" in caplog.text


def test_symlinked_checkpoint_pointing_outside_is_rejected(run, tmp_path, caplog):
    outside = tmp_path / "elsewhere"
    shutil.copytree(ckpt(run, 30), outside)  # a valid checkpoint, but not ours
    link = run / "checkpoints" / "step_00000040"
    link.symlink_to(outside, target_is_directory=True)
    edit_meta(run, latest="step_00000040")
    with caplog.at_level(logging.WARNING, logger="launcher.checkpoint"):
        assert resolve(run) == ckpt(run, 30)
    assert "symlink pointing outside" in caplog.text
    assert outside.is_dir()


def test_nothing_verifies_lists_everything_tried(run):
    for step in (10, 20, 30):
        shard(run, step).write_bytes(b"x")
    with pytest.raises(CheckpointError) as err:
        resolve(run)
    text = str(err.value)
    for step in (10, 20, 30):
        assert f"step_{step:08d}" in text
    assert "Nothing was loaded and nothing was deleted" in text
    assert all(shard(run, s).exists() for s in (10, 20, 30))


def test_leftover_tmp_dir_is_removed_and_never_loaded(run):
    tmp = run / "checkpoints" / f"{layout.TMP_PREFIX}step_00000040"
    shutil.copytree(ckpt(run, 30), tmp)
    assert resolve(run) == ckpt(run, 30)  # manager() runs prepare(), which removes it
    assert not tmp.exists()


def test_killed_while_replacing_a_checkpoint_restores_the_old_one(run):
    """A save of step 30 again (after falling back past it) moves the old step_00000030 aside
    before renaming the new one in; killed in between, the old one comes back."""
    root = run / "checkpoints"
    (root / "step_00000030").rename(root / ".trash-step_00000030")
    (root / f"{layout.TMP_PREFIX}step_00000030").mkdir()
    assert resolve(run) == ckpt(run, 30)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []


def test_resume_none_refuses_existing_checkpoints_and_best_and_path(run):
    with pytest.raises(CheckpointError, match="already holds 3 checkpoint"):
        resolve(run, "none")
    assert resolve(run, "best") == ckpt(run, 20)  # val_loss 0.3
    assert resolve(run, str(ckpt(run, 10))) == ckpt(run, 10)
    shard(run, 10).write_bytes(b"")
    with pytest.raises(CheckpointError, match="does not verify"):
        resolve(run, str(ckpt(run, 10)))


def test_best_pointing_outside_is_refused(run):
    edit_meta(run, best={"name": "../../etc", "metric": "val_loss", "mode": "min", "value": 0.0})
    with pytest.raises(CheckpointError, match="not a plain directory name"):
        resolve(run, "best")


def test_no_checkpoints_is_a_fresh_start(tmp_path):
    assert resolve(tmp_path / "new") is None


def test_hmac_key_signs_manifests(tmp_path, monkeypatch):
    monkeypatch.setenv(digest.KEY_ENV, "secret-1-of-16-bytes")
    run = tmp_path / "run"
    make_run(run, steps=(10,))
    assert files.verify(ckpt(run, 10)).ok
    monkeypatch.setenv(digest.KEY_ENV, "another key of 16 bytes")
    assert "signature does not match" in files.verify(ckpt(run, 10)).reason()
    monkeypatch.delenv(digest.KEY_ENV)
    assert "set FTLAUNCH_HMAC_KEY" in files.verify(ckpt(run, 10)).reason()


class Opaque:
    """A value only the unsafe unpickler can rebuild."""

    def __init__(self, x):
        self.x = x


def test_non_tensor_values_are_loaded_with_the_safe_unpickler(tmp_path):
    m = manager(tmp_path / "run")
    state = {**make_state(10), "extra": Opaque(1)}
    m.save(10, state, make_info(10))
    tmpl = {**template(), "extra": None}
    with pytest.raises(CheckpointError, match="Unsupported global.*Opaque"):
        m.load(ckpt(tmp_path / "run", 10), tmpl)


def test_failed_commit_leaves_previous_state_and_raises(run, monkeypatch):
    before = meta_json(run).read_text()

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "write_manifest", broken)
    m = manager(run)
    with pytest.raises(CheckpointError, match="No space left on device"):
        m.save(40, make_state(40), make_info(40))
    assert not ckpt(run, 40).exists()
    assert meta_json(run).read_text() == before
    assert resolve(run) == ckpt(run, 30)


def test_unreadable_file_is_reported_not_raised(run):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    shard(run, 30).chmod(0)
    assert "unreadable" in files.verify(ckpt(run, 30)).reason()
