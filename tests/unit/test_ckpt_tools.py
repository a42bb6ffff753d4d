"""The ``python -m launcher.ckpt`` tools on real small checkpoints, plus staging and failpoint parsing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from ckpt_testing import ckpt, make_info, make_run, make_state, manager, shard

from launcher import ckpt as tool
from launcher.checkpoint import digest, faults, files, layout, meta
from launcher.checkpoint.staging import Stager, assign_owners, tensor_signatures

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("tools") / "run"
    make_run(run, steps=(10, 20, 30, 40), losses=(0.5, 0.2, 0.4, 0.45))
    return run


@pytest.fixture
def run(pristine, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(pristine, out)
    return out


def call(capsys, *argv) -> tuple[int, str, str]:
    code = tool.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list_shows_step_epoch_size_verified_best(run, capsys):
    shard(run, 40).write_bytes(b"corrupt")
    code, out, _ = call(capsys, "list", run)
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(lines) == {layout.checkpoint_name(s) for s in (10, 20, 30, 40)}
    assert "NO" in lines["step_00000040"] and "truncated" in lines["step_00000040"]
    assert " yes " in lines["step_00000030"] and " 3 " in lines["step_00000030"]  # epoch 30 // 10
    assert "best" in lines["step_00000020"] and "KB" in lines["step_00000020"]


def test_verify_exit_codes_and_names_bad_file(run, capsys):
    assert call(capsys, "verify", run)[0] == 0
    assert call(capsys, "verify", ckpt(run, 10))[0] == 0
    (ckpt(run, 30) / ".metadata").unlink()
    code, out, _ = call(capsys, "verify", run)
    assert code == 3
    assert "BAD  " + str(ckpt(run, 30)) in out and ".metadata: missing file" in out
    assert call(capsys, "verify", ckpt(run, 30))[0] == 3
    code, _, err = call(capsys, "verify", run / "nope")
    assert code == 2 and "no such file" in err


def test_inspect_shows_step_losses_config_world_size(run, capsys):
    code, out, _ = call(capsys, "inspect", run)
    assert code == 0
    assert str(ckpt(run, 40)) in out and "world_size  1" in out and "val_loss" in out
    assert "lr: 0.1" in out
    code, out, _ = call(capsys, "inspect", "--json", ckpt(run, 20))
    assert code == 0 and json.loads(out)["metrics"]["val_loss"] == 0.2


def test_export_writes_model_weights_only(run, tmp_path, capsys):
    out = tmp_path / "weights.pt"
    code, text, _ = call(capsys, "export", ckpt(run, 30), out)
    assert code == 0, text
    weights = torch.load(out, weights_only=True)
    assert set(weights) == {"w", "b"}
    assert torch.equal(weights["w"], make_state(30)["model"]["w"])
    code, _, err = call(capsys, "export", ckpt(run, 30), out)
    assert code == 2 and "--force" in err
    code, _, err = call(capsys, "export", ckpt(run, 30), tmp_path / "w.safetensors")
    assert code == 2 and ".pt" in err
    shard(run, 30).write_bytes(b"")
    code, _, err = call(capsys, "export", ckpt(run, 30), tmp_path / "bad.pt", "--force")
    assert code == 3 and "does not verify" in err and not (tmp_path / "bad.pt").exists()


def test_set_lr_writes_a_new_verified_checkpoint(run, capsys):
    before = {p.name: p.read_bytes() for p in ckpt(run, 40).iterdir()}
    code, out, err = call(capsys, "set-lr", ckpt(run, 40), "0.005")
    assert code == 0, err
    new = run / "checkpoints" / "step_00000040-lr0.005"
    assert files.verify(new).ok
    assert "schedule base lr 0.05" in out  # schedule factor 0.01 / 0.1: base 0.005 / 0.1
    from helpers import checkpoint_tensors, flatten
    a, b = checkpoint_tensors(ckpt(run, 40)), checkpoint_tensors(new)
    assert b["optim"]["param_groups"][0]["lr"] == 0.005
    assert b["lr_scheduler"]["base_lrs"] == [0.05] and b["lr_scheduler"]["_last_lr"] == [0.005]
    fa, fb = flatten(a), flatten(b)
    tensors = [k for k, v in fa.items() if isinstance(v, torch.Tensor)]
    assert tensors and all(torch.equal(fa[k], fb[k]) for k in tensors)
    assert {p.name: p.read_bytes() for p in ckpt(run, 40).iterdir()} == before  # source untouched
    info = json.loads((new / files.INFO).read_text())
    assert info["config"]["optim"]["lr"] == 0.1 and "set-lr" in info["change"]  # the config it was trained with
    assert layout.step_of(new.name) is None  # never picked by --resume auto nor by retention
    assert call(capsys, "set-lr", ckpt(run, 40), "0.005")[0] == 2  # exists already
    assert call(capsys, "set-lr", ckpt(run, 40), "-1")[0] == 2


def test_prune_keeps_newest_verified_and_best(run, capsys):
    code, out, _ = call(capsys, "prune", run, "--keep-last", "2", "--dry-run")
    assert code == 0 and "would delete" in out and len(layout.scan(run / "checkpoints")) == 4
    shard(run, 40).write_bytes(b"")  # newest is bad: counting starts from 30
    code, out, _ = call(capsys, "prune", run, "--keep-last", "2")
    assert code == 0, out
    # 40: newer than the newest verified (30); 30 and 20: the two newest verified (20 is also the best)
    assert layout.scan(run / "checkpoints") == ["step_00000040", "step_00000030", "step_00000020"]
    (ckpt(run, 20) / files.DCP_METADATA).write_bytes(b"x")  # the best, now unverifiable: kept, but not counted
    code, out, _ = call(capsys, "prune", run, "--keep-last", "2", "--keep-every", "0")
    assert code == 0 and "nothing to delete" in out
    m = json.loads((run / "checkpoints" / meta.META).read_text())
    assert all(n in layout.scan(run / "checkpoints") for n in m["verified"])
    for bad in ("1", "0"):
        code, _, err = call(capsys, "prune", run, "--keep-last", bad)
        assert code == 2 and "--keep-last must be >= 2" in err


def test_prune_refuses_a_run_a_live_job_holds(run, capsys):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from filelock import FileLock
        lock = FileLock(sys.argv[1]); lock.acquire(timeout=5); print("locked", flush=True); time.sleep(60)
    """), str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = call(capsys, "prune", run, "--keep-last", "2")
        assert code == 3 and "in use by a live job" in err
        assert len(layout.scan(run / "checkpoints")) == 4
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_diff_shows_config_and_metric_differences(run, tmp_path, capsys):
    other = manager(tmp_path / "other")
    other.save(20, make_state(20), make_info(20, 0.2, lr=0.01))
    other.close()
    code, out, _ = call(capsys, "diff", ckpt(run, 20), ckpt(tmp_path / "other", 20))
    assert code == 0 and "optim.lr: 0.1 -> 0.01" in out
    code, out, _ = call(capsys, "diff", ckpt(run, 20), ckpt(run, 30))
    assert code == 0 and "config: identical" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("val_loss"))
    assert row.split()[1:] == ["0.2", "0.4", "+0.2"]


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    code, _, err = call(capsys, "list", tmp_path)
    assert code == 2 and "not a run directory" in err
    with pytest.raises(SystemExit) as e:
        tool.main(["frobnicate"])
    assert e.value.code == 2


def test_every_subcommand_is_registered_and_has_help(capsys):
    assert {"list", "verify", "inspect", "export", "set-lr", "prune", "diff"} <= set(tool.COMMANDS)
    for name in tool.COMMANDS:
        with pytest.raises(SystemExit) as e:
            tool.main([name, "--help"])
        assert e.value.code == 0 and name in capsys.readouterr().out


# ---------------------------------------------------------------- staging (async snapshot)

def test_owners_split_replicated_bytes_and_keep_rank_specific_tensors():
    state = {"a": torch.zeros(100), "b": torch.zeros(60), "c": torch.zeros(50), "d": torch.zeros(10)}
    rank0 = {**tensor_signatures(state), "rng.rank0.": ((1,), "torch.int64", 8)}
    rank1 = {**tensor_signatures(state), "rng.rank1.": ((1,), "torch.int64", 8)}
    owners = assign_owners([rank0, rank1])
    assert owners["a."] == {0} and owners["b."] == {1} and owners["c."] == {1} and owners["d."] == {0}
    assert owners["rng.rank0."] == {0} and owners["rng.rank1."] == {1}
    rank1["d."] = ((11,), "torch.float32", 44)  # differs between ranks: not replicated, both keep it
    assert assign_owners([rank0, rank1])["d."] == {0, 1}


def test_stager_copies_kept_tensors_into_reused_buffers():
    stager = Stager()
    state = {"m": {"w": torch.ones(3), "b": torch.ones(2)}, "groups": [{"lr": 0.1}], "s": "text"}
    staged = stager.stage(state, keep={"m.w."})
    assert set(staged["m"]) == {"w"} and staged["groups"] == [{"lr": 0.1}] and staged["s"] == "text"
    state["m"]["w"].add_(1)
    assert torch.equal(staged["m"]["w"], torch.ones(3))  # a copy, not a view
    again = stager.stage(state, keep=None)
    assert again["m"]["w"].data_ptr() == staged["m"]["w"].data_ptr() and torch.equal(again["m"]["w"], 2 * torch.ones(3))


def test_failpoint_parsing():
    assert faults.parse("") is None
    fp = faults.parse("after_manifest:20:1")
    assert fp.matches("after_manifest", 20, 1) and not fp.matches("after_manifest", 20, 0)
    assert faults.parse("mid_shard").matches("mid_shard", 7, 3)
    for bad in ("nowhere", "after_meta:x", "after_meta:1:2:3"):
        with pytest.raises(ValueError, match=faults.ENV):
            faults.parse(bad)


@pytest.mark.parametrize("keyed", [False, True])
def test_streaming_and_read_back_digests_agree(tmp_path, keyed):
    """A digest taken while writing (save) equals the one read back (verify); without a key it is
    zlib's CRC32 of the file; with one it depends on the key and on every byte."""
    import os
    import zlib

    scheme = digest.Scheme.keyed(b"k" * 32) if keyed else digest.Scheme()
    paths = []
    for n in (0, 1, 1023, 4321, 3 * 2**20 + 7):
        paths.append(tmp_path / f"f{n}")
        paths[-1].write_bytes(os.urandom(n))
    sums = digest.digest_files(paths, scheme, workers=3)
    for p in paths:
        data = p.read_bytes()
        stream = digest.StreamDigest(scheme)
        for i in range(0, len(data), 70_000):
            stream.update(memoryview(data)[i:i + 70_000])
        assert sums[p] == stream.result() == (len(data), digest.digest_bytes(scheme, data))
        if not keyed:
            assert sums[p][1] == f"{zlib.crc32(data):08x}"
    if keyed:
        data = paths[-1].read_bytes()
        assert digest.digest_bytes(digest.Scheme.keyed(b"j" * 32), data) != sums[paths[-1]][1]
        assert digest.digest_bytes(scheme, data[:-1] + bytes([data[-1] ^ 1])) != sums[paths[-1]][1]
        assert scheme.sign(b"x") != digest.digest_bytes(scheme, b"x")  # separate keys for files and manifests
