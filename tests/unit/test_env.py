"""launcher/env.py: what each environment (torchrun, SLURM, both, single process) tells a worker."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest

from launcher.env import DEFAULT_PREEMPT_SIGNALS, detect, expand_slurm_nodelist, parse_signals

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
            "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "node-a", "MASTER_PORT": "29501",
            "TORCHELASTIC_RESTART_COUNT": "2", "TORCHELASTIC_RUN_ID": "rdzv-7"}
# What sbatch + srun set in a task of a 2-node job, on its second node, after two requeues.
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2",
         "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
         "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "1", "SLURMD_NODENAME": "gpu08",
         "SLURM_RESTART_COUNT": "2"}


def test_single_process():
    env = detect({})
    assert (env.kind, env.rank, env.world_size, env.node_rank, env.num_nodes) == ("single", 0, 1, 0, 1)
    assert (env.job_id, env.nodes, env.restart_count, env.requeue_count) == ("", (), 0, 0)
    assert env.needs_free_port and env.node_name == socket.gethostname()
    assert env.preempt_signals == DEFAULT_PREEMPT_SIGNALS == ("SIGTERM", "SIGUSR1")


def test_torchrun_outside_slurm():
    env = detect(TORCHRUN)
    assert (env.kind, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("torchrun", 3, 4, 1, 2)
    assert (env.node_rank, env.num_nodes, env.master_addr, env.master_port) == (1, 2, "node-a", 29501)
    assert (env.restart_count, env.requeue_count, env.job_id, env.nodes) == (2, 0, "rdzv-7", ())
    assert not env.needs_free_port


def test_torchrun_node_rank_without_group_rank_comes_from_rank():
    env = detect({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"})
    assert (env.node_rank, env.num_nodes) == (1, 1)


def test_srun_tasks_without_torchrun():
    env = detect(SLURM)
    assert (env.kind, env.rank, env.world_size, env.local_rank, env.node_rank) == ("slurm", 1, 2, 0, 1)
    assert (env.job_id, env.nodes, env.num_nodes, env.node_name) == ("4242", ("gpu07", "gpu08"), 2, "gpu08")
    assert (env.requeue_count, env.restart_count) == (2, 0)
    assert (env.master_addr, env.master_port) == ("gpu07", 29500)


def test_torchrun_inside_slurm_takes_ranks_from_torchrun_and_job_from_slurm():
    env = detect({**SLURM, **TORCHRUN, "SLURM_NTASKS": "2"})
    assert (env.kind, env.rank, env.world_size, env.node_rank, env.num_nodes) == ("torchrun", 3, 4, 1, 2)
    assert (env.job_id, env.nodes, env.node_name) == ("4242", ("gpu07", "gpu08"), "gpu08")
    assert (env.requeue_count, env.restart_count) == (2, 2)


def test_slurm_batch_step_with_one_task_is_a_single_process():
    env = detect({"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"})
    assert (env.kind, env.rank, env.world_size, env.job_id, env.nodes) == ("slurm", 0, 1, "9", ("n1",))
    assert env.needs_free_port


def test_job_array_task_has_its_own_job_id():
    env = detect({**SLURM, "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "3"})
    assert env.job_id == "4240_3"


@pytest.mark.parametrize("text, hosts", [
    ("n1", ["n1"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("gpu[07-10,12],cpu01", ["gpu07", "gpu08", "gpu09", "gpu10", "gpu12", "cpu01"]),
    ("rack1-n[1-2]-ib", ["rack1-n1-ib", "rack1-n2-ib"]),
    ("a[1,3],b", ["a1", "a3", "b"]),
])
def test_nodelist_expansion(text, hosts):
    assert expand_slurm_nodelist(text) == hosts


@pytest.mark.slurm
@pytest.mark.skipif(shutil.which("scontrol") is None,
                    reason="scontrol is not installed (run `bash scripts/setup.sh --slurm` once to install SLURM)")
@pytest.mark.parametrize("text", ["n[1-3]", "gpu[07-10,12],cpu01", "a[1,3],b"])
def test_nodelist_expansion_matches_scontrol(text, tmp_path):
    conf = tmp_path / "slurm.conf"  # scontrol reads a config even to expand a host list
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\n")
    out = subprocess.run(["scontrol", "show", "hostnames", text], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "SLURM_CONF": str(conf)})
    assert out.returncode == 0, out.stderr
    assert expand_slurm_nodelist(text) == out.stdout.split()


def test_preempt_signals_from_the_environment():
    assert detect({"FTLAUNCH_PREEMPT_SIGNALS": "usr2, SIGTERM,USR2"}).preempt_signals == ("SIGUSR2", "SIGTERM")
    assert detect({"FTLAUNCH_PREEMPT_SIGNALS": " "}).preempt_signals == DEFAULT_PREEMPT_SIGNALS


@pytest.mark.parametrize("text, bad",
                         [("SIGKILL", "SIGKILL"), ("TERM,FOO", "FOO"), ("STOP", "STOP"), (",", "no signal")])
def test_bad_preempt_signals_are_named(text, bad):
    with pytest.raises(ValueError, match="FTLAUNCH_PREEMPT_SIGNALS") as e:
        parse_signals(text)
    assert bad in str(e.value)


def test_bad_integer_names_the_variable():
    with pytest.raises(ValueError, match="SLURM_RESTART_COUNT='x'"):
        detect({"SLURM_RESTART_COUNT": "x"})
