"""ftrun's command line: torchrun's flags, ftrun's defaults and checks (no process is started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.agent import cli


@pytest.fixture(autouse=True)
def _restore_env(monkeypatch):
    # torchrun's config_from_args sets OMP_NUM_THREADS in os.environ; keep it out of other tests.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def prepared(*argv: str):
    args = cli.build_parser().parse_args(list(argv))
    config, cmd, cmd_args = cli.prepare(args)
    return args, config, cmd, cmd_args


def test_torchrun_flags_and_ftrun_rendezvous_defaults():
    args, config, _, cmd_args = prepared(
        "--nnodes=1:2", "--nproc_per_node=2", "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:29400",
        "--rdzv_id=j1", "--rdzv_conf=last_call_timeout=7", "--monitor_interval=0.5",
        "train.py", "--run-dir", "runs/x")
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node, config.run_id) == (1, 2, 2, "j1")
    assert config.rdzv_configs["last_call_timeout"] == "7"  # the user's value wins
    assert config.rdzv_configs["keep_alive_interval"] == 1  # ftrun's default otherwise
    assert config.max_restarts == 3 and config.monitor_interval == 0.5
    options = cli.options_from_args(args, cmd_args)
    assert options.run_dir == Path("runs/x") and "{rank}" in options.progress_template


def test_warm_start_is_on_for_python_scripts_and_off_for_binaries():
    _, config, cmd, cmd_args = prepared("--standalone", "train.py", "--run-dir=runs/y")
    assert config.start_method == "forkserver" and cmd_args[0] == "train.py" and callable(cmd)
    _, config, cmd, _ = prepared("--standalone", "--no-python", "./train.sh")
    assert config.start_method == "spawn" and cmd == "./train.sh"
    _, config, _, _ = prepared("--standalone", "--no-warm-start", "train.py")
    assert config.start_method == "spawn"
    with pytest.raises(ValueError, match="--warm-start"):
        prepared("--standalone", "--warm-start", "--no-python", "./train.sh")


def test_run_dir_flag_wins_over_the_scripts():
    args, _, _, cmd_args = prepared("--standalone", "--run-dir", "/tmp/a", "train.py", "--run-dir", "/tmp/b")
    assert cli.options_from_args(args, cmd_args).run_dir == Path("/tmp/a")
