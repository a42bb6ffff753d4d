"""The agent's restart policy and hang rule, driven by scripted observations and a fake clock."""

from __future__ import annotations

import json

import pytest

from launcher import exit_codes
from launcher.agent.policy import Action, Observation, Phase, PolicyConfig, RestartPolicy, Seen
from launcher.agent.progress import ProgressMonitor, Report

CRASH = Observation(Seen.FAILED, exit_codes=(1,), progressed=True)
CRASH_AT_ONCE = Observation(Seen.FAILED, exit_codes=(1,), progressed=False)


def policy(**kw) -> RestartPolicy:
    return RestartPolicy(PolicyConfig(**{"max_restarts": 10, "backoff_base": 1.0, "backoff_cap": 5.0,
                                         "crash_loop": 3, **kw}))


def test_healthy_continues_and_success_ends():
    p = policy()
    assert p.decide(Observation(Seen.HEALTHY)).action is Action.CONTINUE
    d = p.decide(Observation(Seen.SUCCEEDED))
    assert (d.action, d.exit_code, p.phase) == (Action.SUCCEED, 0, Phase.SUCCEEDED)


def test_crash_after_progress_restarts_at_once_and_spends_budget():
    p = policy(max_restarts=2)
    for expected_restarts in (1, 2):
        d = p.decide(CRASH)
        assert (d.action, d.delay, d.counts) == (Action.RESTART, 0.0, True)
        assert p.restarts == expected_restarts and p.phase is Phase.RESTARTING
        p.restarted()
    d = p.decide(CRASH)
    assert d.action is Action.STOP and "budget" in d.reason and d.exit_code == 1


def test_membership_change_does_not_spend_budget():
    p = policy(max_restarts=1)
    for _ in range(5):
        d = p.decide(Observation(Seen.NODE_WAITING))
        assert d.action is Action.RESTART and not d.counts
    assert p.remaining == 1


@pytest.mark.parametrize("code", sorted(exit_codes.NO_RESTART))
def test_no_restart_exit_codes_stop_with_the_workers_code(code):
    d = policy().decide(Observation(Seen.FAILED, exit_codes=(1, code), progressed=True))
    assert (d.action, d.exit_code) == (Action.STOP, code)


def test_backoff_doubles_without_progress_up_to_the_cap_and_resets_after_progress():
    p = policy(crash_loop=100)
    delays = []
    for _ in range(5):
        delays.append(p.decide(CRASH_AT_ONCE).delay)
        p.restarted()
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert p.decide(CRASH).delay == 0.0


def test_crash_loop_stops_after_n_restarts_without_a_new_step():
    p = policy(crash_loop=3, max_restarts=100)
    actions = []
    for _ in range(5):
        actions.append(p.decide(CRASH_AT_ONCE).action)
        p.restarted()
    # first attempt + 3 restarts fail at once: stop instead of the 4th restart
    assert actions[:4] == [Action.RESTART] * 3 + [Action.STOP]
    assert "crash loop" in p.history[-1].reason and p.restarts == 3


def test_progress_between_failures_resets_the_crash_loop_count():
    p = policy(crash_loop=2, max_restarts=100)
    for obs in [CRASH_AT_ONCE, CRASH_AT_ONCE, CRASH, CRASH_AT_ONCE, CRASH_AT_ONCE]:
        assert p.decide(obs).action is Action.RESTART
        p.restarted()
    assert p.decide(CRASH_AT_ONCE).action is Action.STOP


def test_hang_counts_like_a_failure():
    p = policy(max_restarts=0)
    d = p.decide(Observation(Seen.HUNG, progressed=True))
    assert d.action is Action.STOP and "hung" in d.reason


def test_bad_policy_config_names_every_problem():
    with pytest.raises(ValueError) as e:
        PolicyConfig(max_restarts=-1, backoff_base=2.0, backoff_cap=1.0, crash_loop=0)
    msg = str(e.value)
    assert "max_restarts" in msg and "backoff_cap" in msg and "crash_loop" in msg


# ---------------------------------------------------------------- hang rule


class FakeFiles:
    def __init__(self):
        self.reports: dict[str, Report] = {}

    def write(self, rank, step, activity, time, pid, first_step=0):
        self.reports[f"/p/rank{rank}.json"] = Report(rank, step, activity, time, pid, first_step)

    def read(self, path):
        return self.reports.get(path)


def monitor(clock, files, timeout=10.0):
    return ProgressMonitor("/p/rank{rank}.json", timeout, long_activity_factor=3.0,
                           clock=lambda: clock[0], reader=files.read)


def test_no_reports_means_no_hang_detection():
    clock, files = [0.0], FakeFiles()
    m = monitor(clock, files)
    m.start_attempt({0: 100})
    clock[0] = 1e6
    m.poll()
    assert m.hung() == {}


def test_a_rank_without_progress_is_hung_after_the_timeout():
    clock, files = [0.0], FakeFiles()
    m = monitor(clock, files)
    m.start_attempt({0: 100, 1: 101})
    files.write(0, 5, "training", 1.0, 100, first_step=5)
    files.write(1, 5, "training", 1.0, 101, first_step=5)
    m.poll()
    for t in range(2, 11):
        clock[0] = float(t)
        files.write(0, 5 + t, "training", float(t), 100, first_step=5)  # rank 0 progresses, rank 1 stops
        m.poll()
    assert m.hung() == {}
    clock[0] = 11.5
    m.poll()
    assert list(m.hung()) == [1] and "rank 1" in m.hung()[1]
    assert m.progressed and m.resumed_from == 5 and m.last_step == 15


def test_saving_gets_the_longer_allowance():
    clock, files = [0.0], FakeFiles()
    m = monitor(clock, files)
    m.start_attempt({0: 100})
    files.write(0, 20, "saving", 1.0, 100)
    m.poll()
    clock[0] = 25.0
    assert m.hung() == {}
    clock[0] = 31.5
    assert list(m.hung()) == [0]


def test_reports_from_an_earlier_attempt_are_ignored():
    clock, files = [0.0], FakeFiles()
    m = monitor(clock, files)
    m.start_attempt({0: 100})
    files.write(0, 3, "training", 0.5, 100)
    m.poll()
    clock[0] = 50.0
    m.start_attempt({0: 200})  # restarted: pid 100's file is stale
    m.poll()
    assert m.last_step is None and not m.progressed
    clock[0] = 50.0 + 29.0  # starting: allowance 3 x 10 s from the attempt start
    assert m.hung() == {}
    clock[0] = 50.0 + 31.0
    assert list(m.hung()) == [0] and "starting" in m.hung()[0]


def test_progress_needs_a_step_beyond_the_resume_point():
    clock, files = [0.0], FakeFiles()
    m = monitor(clock, files)
    m.start_attempt({0: 100})
    files.write(0, 40, "training", 1.0, 100, first_step=40)
    m.poll()
    assert not m.progressed
    files.write(0, 41, "training", 1.5, 100, first_step=40)
    m.poll()
    assert m.progressed and m.first_progress_time == 1.5


# ---------------------------------------------------------------- events and summary


class FakeMonitor:
    def __init__(self, last_step=None, resumed_from=None, first_progress_time=None):
        self.last_step, self.resumed_from, self.first_progress_time = last_step, resumed_from, first_progress_time

    @property
    def progressed(self):
        return self.first_progress_time is not None


def test_recorder_writes_failure_and_recovery_with_steps_lost_and_downtime(tmp_path):
    from launcher import events
    from launcher.agent.report import Recorder, format_summary

    clock = [1000.0]
    rec = Recorder(tmp_path, node="n0", clock=lambda: clock[0])
    rec.agent_started()  # the run's wall time starts here
    metrics = [{"step": s, "loss": 1.0, "time": 1000.0 + s} for s in range(1, 13)]  # steps 1..12, 1 s each
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics) + '{"step": 13, "lo')
    clock[0] = 1013.0
    rec.failure("worker_exit", FakeMonitor(last_step=11), restart_count=1, exit_code=-9, signal="SIGKILL")
    rec.restart(1, "worker exit codes [-9]", 0.0, True)
    # resumed from the checkpoint at step 10; rank 0 truncated metrics and completed step 11 at t=1030
    kept = metrics[:10] + [{"step": 11, "loss": 1.0, "time": 1030.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in kept))
    clock[0] = 1031.0
    rec.check_recovered(FakeMonitor(last_step=10, resumed_from=10), restart_count=1)  # no new step seen yet
    assert rec.pending is not None
    rec.check_recovered(FakeMonitor(last_step=11, resumed_from=10, first_progress_time=1030.4), restart_count=1)
    got = {e["kind"]: e for e in events.read(tmp_path)}
    assert got["failure"]["last_step"] == 12  # from metrics.jsonl, the torn line ignored
    assert got["failure"]["signal"] == "SIGKILL" and got["failure"]["node"] == "n0"
    assert got["recovered"]["steps_lost"] == 2 and got["recovered"]["resumed_from"] == 10
    assert got["recovered"]["recovery_seconds"] == pytest.approx(17.0)  # metrics time, not the report's
    clock[0] = 1040.0
    s = rec.summary("succeeded")
    assert (s["restarts"], s["steps_lost"], s["unrecovered"]) == (1, 2, False)
    assert s["downtime_seconds"] == pytest.approx(17.0)
    assert s["goodput"] == pytest.approx(11 / 40)  # 11 kept steps of 1 s in 40 s of wall time
    assert "goodput" in format_summary(s) and "steps lost      2" in format_summary(s)


def test_heartbeat_throttles_but_always_writes_the_first_completed_step(tmp_path, monkeypatch):
    from launcher import heartbeat
    from launcher.agent.progress import read_report

    now = [100.0]
    monkeypatch.setattr(heartbeat.time, "time", lambda: now[0])
    hb = heartbeat.Heartbeat(str(tmp_path / "rank{rank}.json"), rank=3, min_interval=0.5)
    path = str(tmp_path / "rank3.json")
    hb.report(40)  # resumed at step 40
    now[0] += 0.01
    hb.report(41)  # first new step: written although within the throttle interval
    rep = read_report(path)
    assert (rep.step, rep.first_step, rep.rank) == (41, 40, 3)
    now[0] += 0.01
    hb.report(42)  # throttled
    assert read_report(path).step == 41
    hb.report(42, "saving")  # a new activity is always written
    assert read_report(path).activity == "saving"
    now[0] += 1.0
    hb.report(43)
    assert read_report(path).step == 43
