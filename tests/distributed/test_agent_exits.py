"""ftrun end to end on one node, with tiny scripts: the exit-code rules and the crash-loop guard."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import PY, child_env, run, tail

from launcher import events

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

# Fails the same way every time, before any step: a bug, which must not be restarted until the budget is spent.
CRASHER = """
import sys
sys.path.insert(0, {repo!r})
from launcher import env
from launcher.heartbeat import Heartbeat
Heartbeat(env.detect().agent_progress_file, env.detect().rank).report(0)
sys.exit({code})
"""


def ftrun(tmp_path: Path, script: Path, *flags: str) -> tuple[int, str]:
    log = tmp_path / "ftrun.log"
    cmd = [PY, "-m", "launcher", "--standalone", "--nproc_per_node=1", "--monitor_interval=0.2", *flags,
           str(script), "--run-dir", str(tmp_path / "run")]
    code = run(cmd, log, timeout=180, env=child_env())
    return code, tail(log, 200)


def crasher(tmp_path: Path, code: int) -> Path:
    path = tmp_path / "crash.py"
    path.write_text(CRASHER.format(repo=str(Path(__file__).resolve().parents[2]), code=code))
    return path


def test_crash_loop_stops_early_with_a_clear_report(tmp_path):
    code, log = ftrun(tmp_path, crasher(tmp_path, 1), "--max_restarts=50", "--crash-loop=2", "--backoff-base=0.1")
    assert code == 1, log
    stops = [e for e in events.read(tmp_path / "run") if e["kind"] == "agent_stop"]
    assert len(stops) == 1 and "crash loop" in stops[0]["reason"], log
    restarts = [e for e in events.read(tmp_path / "run") if e["kind"] == "restart"]
    assert len(restarts) == 2, restarts  # the first attempt and 2 restarts failed; the budget of 50 is untouched
    assert [r["delay"] for r in restarts] == [0.1, 0.2]
    assert "ftrun summary" in log and "crash loop" in log


@pytest.mark.parametrize("exit_code", [75])  # 2 and 3: same path, covered by the policy unit tests
def test_no_restart_exit_codes_pass_through(tmp_path, exit_code):
    code, log = ftrun(tmp_path, crasher(tmp_path, exit_code), "--max_restarts=5")
    assert code == exit_code, log
    assert not [e for e in events.read(tmp_path / "run") if e["kind"] == "restart"], log


def test_bad_ftrun_flags_are_named(tmp_path):
    log = tmp_path / "bad.log"
    code = run([PY, "-m", "launcher", "--hang-timeout=0", "--crash-loop=0", sys.executable], log, timeout=120)
    text = tail(log)
    assert code == 2 and "--hang-timeout" in text and "crash_loop" in text, text
