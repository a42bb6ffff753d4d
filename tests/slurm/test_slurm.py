"""Real SLURM: scripts/slurm/train.sbatch on a two-node test cluster on this machine.

``scripts/slurm/testcluster.sh up`` starts munged, slurmctld and two slurmd daemons posing as
nodes n1 and n2; the session fixture takes it down again, stopping only the daemons it
started. It installs nothing: where SLURM is not installed the tests are skipped, with a
reason that names the set-up step (``bash scripts/setup.sh --slurm``); CI runs that step and
turns such a skip into a failure (FTLAUNCH_REQUIRE_SLURM=1, tests/conftest.py).

* the recipe in docs/slurm.md, copied as written and run without an activated venv, runs the
  project's ftrun and writes its job output into the run directory;
* an ``sbatch -N2`` job trains the encoder to completion (the reference run);
* the same job, sent ``scancel --signal=USR1 --batch`` twice, checkpoints, requeues itself,
  resumes with SLURM_RESTART_COUNT 1 and then 2, loses no step, and ends bit-equal to the reference;
* SIGKILL of node n2's workers inside a running job is recovered within the allocation by
  ftrun and ends bit-equal too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from helpers import FAST, REPO, assert_bit_equal, checkpoint_tensors, child_env, free_port, tail, wait_for

pytestmark = pytest.mark.slurm

CLUSTER = REPO / "scripts" / "slurm" / "testcluster.sh"
DOC = REPO / "docs" / "slurm.md"
SBATCH = REPO / "scripts" / "slurm" / "train.sbatch"
MAX_STEPS = 60  # long enough that two signals land before the end, short enough for the budget
ARGS = [a if a != "train.max_steps=24" else f"train.max_steps={MAX_STEPS}" for a in FAST["encoder"]]
UNAVAILABLE = 3  # testcluster.sh's exit code for "SLURM cannot be installed here"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def launcher() -> tuple[dict[str, str], str]:
    """(environment for train.sbatch, what it runs): by default the job script's own choice, the
    ftrun of this interpreter's environment; ``FTLAUNCH_TEST_LAUNCHER=torchrun`` asks it for
    stock torchrun (to test that path)."""
    if os.environ.get("FTLAUNCH_TEST_LAUNCHER", "ftrun") == "torchrun":
        return {"LAUNCHER": "torchrun"}, "stock torchrun (--max_restarts)"
    return {}, "ftrun (the project's agent)"


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    # Free ports rather than the script's 17000-17002, which a developer's own test cluster may hold.
    ports: list[int] = []
    while len(ports) < 3:
        port = free_port()
        ports += [port] if port not in ports else []
    env = {**os.environ, "SLURM_TEST_DIR": str(state), "SLURMCTLD_PORT": str(ports[0]),
           "SLURMD_PORTS": f"{ports[1]} {ports[2]}"}
    up = subprocess.run(["bash", str(CLUSTER), "up"], env=env, capture_output=True, text=True, timeout=240)
    if up.returncode == UNAVAILABLE:
        # testcluster.sh's last line names what is missing and the set-up step that installs it.
        reason = (up.stderr.strip().splitlines() or ["SLURM is not installed"])[-1].removeprefix("testcluster: ")
        if "setup.sh --slurm" not in reason:
            reason += " (run `bash scripts/setup.sh --slurm` once to install it)"
        print(reason)
        pytest.skip(reason)
    try:
        assert up.returncode == 0, f"testcluster.sh up failed ({up.returncode}):\n{up.stdout}\n{up.stderr}"
        yield {"SLURM_CONF": str(state / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(CLUSTER), "down"], env=env, timeout=60)


@dataclass
class Job:
    """One sbatch submission and the files it writes."""

    id: str
    run_dir: Path
    out: Path
    env: dict

    def scontrol(self, *args: str) -> str:
        return subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True,
                              timeout=30).stdout

    def fields(self) -> dict[str, str]:
        text = self.scontrol("show", "job", "-o", self.id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def events(self, kind: str) -> list[dict]:
        path = self.run_dir / "events.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("kind") == kind:
                out.append(record)
        return out

    def last_step(self) -> int:
        """Highest step in metrics.jsonl (records past a resume point are dropped on resume)."""
        path = self.run_dir / "metrics.jsonl"
        steps = [0]
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    steps.append(int(json.loads(line)["step"]))
                except (ValueError, KeyError):
                    continue
        return max(steps)

    def wait_state(self, states: set[str], timeout: float) -> dict[str, str]:
        seen: dict[str, str] = {}

        def done() -> bool:
            seen.update(self.fields())
            return seen.get("JobState") in states

        try:
            wait_for(done, timeout, interval=0.5, what=f"job {self.id} to reach {sorted(states)}")
        except AssertionError as e:
            raise AssertionError(f"{e}; last state {seen.get('JobState')}\n{self.log()}") from None
        return seen

    def log(self) -> str:
        return f"--- {self.out} ---\n{tail(self.out, 80)}"

    def cancel(self) -> None:
        subprocess.run(["scancel", self.id], env=self.env, timeout=30)


def submit(cluster: dict, tmp: Path, name: str) -> Job:
    run_dir, out = tmp / name, tmp / f"{name}.out"
    env = child_env(**cluster, **launcher()[0], PYTHON=sys.executable, RUN_DIR=str(run_dir),
                    MAX_RESTARTS="2", STOP_TIMEOUT="60")
    res = subprocess.run(["sbatch", "--parsable", "-N2", f"--job-name={name}", f"--chdir={REPO}",
                          f"--output={out}", str(SBATCH), *ARGS],
                         env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, f"sbatch failed: {res.stderr}"
    return Job(id=res.stdout.strip().split(";")[0], run_dir=run_dir, out=out, env=env)


def docs_recipe() -> str:
    """The `sbatch` line of the local-test-cluster recipe in docs/slurm.md, as written there."""
    text = DOC.read_text()
    section = text[text.index("## The local test cluster"):]
    block = section[section.index("```bash"):section.index("```", section.index("```bash") + 3)]
    lines = [line for line in block.splitlines() if line.lstrip().startswith(("sbatch ", "PYTHON="))
             and "scripts/slurm/train.sbatch" in line]
    assert len(lines) == 1, f"expected one train.sbatch line in the recipe of {DOC}, found {lines}"
    return lines[0]


def bare_env(cluster: dict) -> dict[str, str]:
    """A login shell's environment without a virtualenv: no VIRTUAL_ENV, PYTHON, LAUNCHER, and no
    PATH entry inside a virtualenv (this session's .venv/bin among them)."""
    path = [d for d in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
            if d and not (Path(d).parent / "pyvenv.cfg").exists()]
    return {"PATH": os.pathsep.join(path), "HOME": os.environ.get("HOME", "/root"), **cluster}


@pytest.mark.timeout(200)
def test_docs_recipe_runs_the_projects_ftrun_and_scancel_stops_it_without_a_requeue(cluster):
    venv = REPO / ".venv" / "bin"
    if not (venv / "ftrun").exists():
        pytest.skip(f"the recipe needs the project's .venv ({venv}/ftrun): run `bash scripts/setup.sh`")
    recipe = docs_recipe()
    res = subprocess.run(["bash", "-c", recipe], cwd=REPO, env=bare_env(cluster), capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, f"{recipe!r} failed: {res.stdout}{res.stderr}"
    job_id = re.search(r"Submitted batch job (\d+)", res.stdout).group(1)
    run_dir = REPO / "runs" / f"ftlaunch-{job_id}"  # the script's default RUN_DIR from the repo root
    job = Job(id=job_id, run_dir=run_dir, out=run_dir / f"slurm-{job_id}.out", env={**os.environ, **cluster})
    try:
        wait_for(lambda: job.last_step() >= 5 or job.fields().get("JobState") in ENDED, 120, interval=0.2,
                 what=f"job {job_id} to train past step 5")
        # By default the job output is in the run directory, and its first lines name the launcher.
        assert job.out.exists(), f"no job output in the run directory; in the repo: {list(REPO.glob('*.out'))}"
        lines = job.out.read_text().splitlines()
        says = f"launcher: ftrun ({venv}/ftrun); python: {venv}/python (the project's .venv)"
        assert any(says in line for line in lines[:2]), lines[:3]
        assert not [line for line in lines if "WARNING" in line and "torchrun" in line], job.log()
        assert not list(REPO.glob(f"*-{job_id}.out")), "job output landed in the repo root"
        # Only ftrun asks its workers for progress reports: ftrun, not torchrun, started them.
        progress = sorted(p.name for p in (run_dir / "ftrun" / "progress").glob("rank*.json"))
        assert progress == ["rank0.json", "rank1.json"], progress

        assert job.fields().get("JobState") == "RUNNING", f"the job ended before the scancel\n{job.log()}"
        subprocess.run(["scancel", job_id], env=job.env, check=True, timeout=30)
        f = job.wait_state(ENDED, 60)
        wait_for(lambda: "not requeueing" in job.out.read_text(), 30, what="the script's last word")
        f = job.fields()  # a requeue issued while the job was completing would show by now
        assert (f["JobState"], f["Restarts"]) == ("CANCELLED", "0"), f"{f}\n{job.log()}"
        stops = job.events("preempted")
        meta = json.loads((run_dir / "checkpoints" / "meta.json").read_text())
        assert [e["signal"] for e in stops] == ["SIGTERM"] and meta["step"] == stops[0]["step"], (stops, meta)
        print(f"\n$ {recipe}\njob {job_id}: " + "\n".join(lines[:1]) +
              f"\nscancel {job_id}: checkpoint at step {meta['step']}, JobState={f['JobState']}, "
              f"Restarts={f['Restarts']}")
    finally:
        job.cancel()
        shutil.rmtree(run_dir, ignore_errors=True)


def final_state(job: Job) -> dict:
    return checkpoint_tensors(job.run_dir / "checkpoints" / f"step_{MAX_STEPS:08d}")


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """The unpreempted 2-node run. The preemption test (first in this file) asks for it, so
    the two jobs run side by side, and the 2-node test after it finds it finished."""
    job = submit(cluster, tmp_path_factory.mktemp("reference"), "reference")
    yield job
    job.cancel()


def preempt_once(job: Job, attempt: int, resume_step: int) -> dict:
    """Signal the batch shell once training has moved on; return what the preemption left."""
    wait_for(lambda: job.last_step() >= resume_step + 6 or job.fields().get("JobState") in ENDED,
             150, interval=0.2, what=f"attempt {attempt} of job {job.id} to train past step {resume_step + 6}")
    assert job.fields().get("JobState") == "RUNNING", f"job ended before preemption {attempt + 1}\n{job.log()}"
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], env=job.env, check=True, timeout=30)
    wait_for(lambda: len(job.events("preempted")) > attempt, 90, interval=0.1,
             what=f"preemption {attempt + 1} of job {job.id} to be checkpointed")
    # The requeued attempt cannot start for cred_expire (5 s), and truncates metrics only
    # once it has resumed: what metrics.jsonl holds now is everything this attempt trained.
    reached = job.last_step()
    event = job.events("preempted")[attempt]
    meta = json.loads((job.run_dir / "checkpoints" / "meta.json").read_text())
    return {"reached": reached, "checkpoint": event["step"], "meta_step": meta["step"],
            "slurm_restart_count": event["slurm_restart_count"]}


@pytest.mark.timeout(280)
def test_preempted_twice_requeues_resumes_and_ends_bit_equal(cluster, reference, tmp_path):
    job = submit(cluster, tmp_path, "preempted")
    try:
        lost, resume_step, restarts_seen = [], 0, []
        for attempt in range(2):
            p = preempt_once(job, attempt, resume_step)
            assert p["slurm_restart_count"] == attempt, p
            assert p["meta_step"] == p["checkpoint"], f"meta.json not published for the preemption checkpoint: {p}"
            wait_for(lambda n=attempt + 1: len(job.events("worker_start")) > n, 120, interval=0.2,
                     what=f"job {job.id} to be requeued and resume (attempt {attempt + 1})")
            start = job.events("worker_start")[attempt + 1]
            assert start["slurm_restart_count"] == attempt + 1, start
            assert start["step"] == p["checkpoint"] and start["checkpoint"] == f"step_{p['checkpoint']:08d}", start
            restarts_seen.append(job.fields().get("Restarts"))
            lost.append(p["reached"] - start["step"])
            resume_step = start["step"]
            print(f"\npreemption {attempt + 1}: trained to step {p['reached']}, checkpoint step {p['checkpoint']}, "
                  f"resumed at step {start['step']} with SLURM_RESTART_COUNT={start['slurm_restart_count']}, "
                  f"scontrol Restarts={restarts_seen[-1]}, steps lost {lost[-1]}")
        f = job.wait_state(ENDED, 150)
        assert f["JobState"] == "COMPLETED" and f["ExitCode"] == "0:0", job.log()
        assert restarts_seen == ["1", "2"] and f["Restarts"] == "2", (restarts_seen, f["Restarts"])
        assert lost == [0, 0], f"steps lost per preemption: {lost}\n{job.log()}"
        assert "SLURM_RESTART_COUNT=2" in job.out.read_text(), job.log()

        assert reference.wait_state(ENDED, 150)["JobState"] == "COMPLETED", reference.log()
        compared = assert_bit_equal(final_state(reference), final_state(job))
        print(f"job {job.id}: COMPLETED after Restarts={f['Restarts']}; {compared} tensors bit-equal to "
              f"reference job {reference.id}")
    finally:
        job.cancel()


def test_two_node_job_trains_to_completion(reference):
    f = reference.wait_state(ENDED, 200)
    assert f["JobState"] == "COMPLETED" and f["ExitCode"] == "0:0", reference.log()
    assert f["NumNodes"] == "2", f
    starts = reference.events("worker_start")
    assert [(s["world_size"], s["slurm_restart_count"], s["job_id"]) for s in starts] == [(2, 0, reference.id)]
    meta = json.loads((reference.run_dir / "checkpoints" / "meta.json").read_text())
    assert meta["step"] == MAX_STEPS, meta
    # PYTHON names the environment (not activated): the job runs the ftrun installed beside it.
    chosen, _ = launcher()
    python = Path(sys.executable)
    says = (f"launcher: ftrun ({python.parent}/ftrun); python: {python} (PYTHON)" if not chosen else
            f"launcher: stock torchrun ({python} -m torch.distributed.run; LAUNCHER=torchrun")
    assert says in reference.out.read_text(), reference.log()
    print(f"\nreference job {reference.id}: COMPLETED on {f['NodeList']}, Restarts={f['Restarts']}, "
          f"{MAX_STEPS} steps, world size 2; {says}")


def node_workers(job: Job, node: str) -> list[psutil.Process]:
    """This job's training workers on ``node``: processes under that node's launcher (whose pid
    train.sbatch records) that hold a rank log of the run open. Found this way, not by command
    line, because ftrun's workers are forked from a fork server and share its command line."""
    pidfile = job.run_dir / ".slurm" / f"launcher-{job.id}-0-{node}.pid"
    logs = str(job.run_dir / "logs")
    found = []
    try:
        launcher_proc = psutil.Process(int(pidfile.read_text()))
        descendants = launcher_proc.children(recursive=True)
    except (OSError, ValueError, psutil.NoSuchProcess):
        return []
    for proc in descendants:
        try:
            if any(f.path.startswith(logs) for f in proc.open_files()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.mark.timeout(240)
def test_hard_kill_of_one_node_recovers_within_the_allocation(cluster, reference, tmp_path):
    chosen, which = launcher()
    if chosen:
        # Seen twice on this 2-node cluster: after the kill, stock torchrun's restarted ranks
        # failed Gloo connectFullMesh (connection refused: a previous round's address) until
        # --max_restarts was spent. ftrun gives each rendezvous round a fresh worker store.
        pytest.skip("stock torchrun does not recover a killed node inside the allocation here (stale "
                    "worker-store addresses after the restart); this test runs with ftrun")
    job = submit(cluster, tmp_path, "killed")
    try:
        wait_for(lambda: job.last_step() >= 10 or job.fields().get("JobState") in ENDED, 150,
                 interval=0.2, what=f"job {job.id} to train past step 10")
        victims = node_workers(job, "n2")
        assert victims and job.fields().get("JobState") == "RUNNING", f"no workers of n2 to kill\n{job.log()}"
        killed_at = job.last_step()
        for proc in victims:
            proc.send_signal(signal.SIGKILL)
        f = job.wait_state(ENDED, 200)
        assert f["JobState"] == "COMPLETED" and f["ExitCode"] == "0:0", job.log()
        assert f["Restarts"] == "0", f"recovered by a requeue, not within the allocation: {f['Restarts']}"
        starts = job.events("worker_start")
        assert len(starts) >= 2 and starts[-1]["restart_count"] >= 1, starts
        assert all(s["slurm_restart_count"] == 0 for s in starts), starts
        compared = assert_bit_equal(final_state(reference), final_state(job))
        print(f"\njob {job.id}: SIGKILLed {len(victims)} worker(s) on n2 at step {killed_at}; {which} restarted "
              f"the workers (restart_count {starts[-1]['restart_count']}, resumed at step {starts[-1]['step']}); "
              f"COMPLETED with Restarts={f['Restarts']}; {compared} tensors bit-equal to the reference")
    finally:
        job.cancel()
