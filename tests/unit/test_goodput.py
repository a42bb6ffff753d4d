"""Goodput (launcher/goodput.py): one definition, and the same figure wherever it is printed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from launcher import goodput, summary
from launcher.agent.report import Recorder, format_summary


def write_lines(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_kept_step_seconds_skips_start_up_gaps():
    recs = [{"step": s, "loss": 1.0, "time": float(s)} for s in range(1, 6)]
    recs += [{"step": s, "loss": 1.0, "time": 100.0 + s} for s in range(6, 9)]  # resumed after a restart
    kept = goodput.kept_step_seconds(recs, breaks=[50.0], intervals=[(0.0, 200.0)])
    assert kept == pytest.approx(8 * 1.0)  # 6 gaps of 1 s, and two first steps at the median 1 s


def test_time_between_a_deliberate_stop_and_the_next_start_is_not_wall_time():
    evs = [{"kind": "worker_start", "time": 10.0, "launched": 5.0}, {"kind": "run_end", "time": 40.0},
           # the next morning: a rerun (its process started at 1000)
           {"kind": "worker_start", "time": 1003.0, "launched": 1000.0}, {"kind": "run_end", "time": 1020.0}]
    assert goodput.up_intervals(evs, now=5000.0) == [(5.0, 40.0), (1000.0, 1020.0)]
    # a job killed outright is down until it is restarted: no stop, no pause
    killed = [{"kind": "agent_start", "time": 0.0}, {"kind": "agent_start", "time": 500.0}]
    assert goodput.up_intervals(killed, now=600.0) == [(0.0, 600.0)]


def fake_ftrun_run(run_dir: Path) -> None:
    """Two agents; node 1 lost at t=20 and replaced at t=24; steps of 1 s; the run ends at t=60."""
    evs = [{"kind": "agent_start", "time": 0.0, "node": "n0"}, {"kind": "agent_start", "time": 0.5, "node": "n1"},
           {"kind": "worker_start", "time": 5.0, "step": 0},
           {"kind": "failure", "time": 20.5, "node": "n0", "restart_count": 0, "failure_kind": "worker_exit"},
           {"kind": "restart", "time": 20.6, "node": "n0", "restart_count": 1, "counts": True},
           {"kind": "agent_start", "time": 24.0, "node": "n1"},
           {"kind": "worker_start", "time": 28.0, "step": 10},
           {"kind": "recovered", "time": 29.5, "node": "n0", "restart_count": 1, "steps_lost": 4,
            "recovery_seconds": 9.0},
           {"kind": "run_end", "time": 60.0, "status": "finished"}]
    write_lines(run_dir / "events.jsonl", evs)
    recs = [{"step": s, "loss": 1.0, "time": 5.0 + s} for s in range(1, 11)]  # steps 11-14 were redone
    recs += [{"step": s, "loss": 1.0, "time": 19.0 + s} for s in range(11, 41)]
    write_lines(run_dir / "metrics.jsonl", recs)


def test_summary_json_the_printed_summary_and_every_ftrun_box_show_one_figure(tmp_path):
    fake_ftrun_run(tmp_path)
    # rank 0 builds summary.json right after run_end; each agent prints its box a little later
    built = summary.build(tmp_path, {"status": "finished", "step": 40, "total_steps": 40}, now=60.2)
    boxes = [Recorder(tmp_path, node=n, clock=lambda t=t: t, started=s).summary("succeeded")
             for n, s, t in (("n0", 0.0, 61.0), ("n1", 24.0, 63.5))]
    expected = 40 / 60  # 40 kept steps of 1 s over the 60 s from the first agent start to run_end
    assert built["goodput"] == pytest.approx(expected, abs=1e-4)
    assert all(b["goodput"] == pytest.approx(expected) for b in boxes)
    shown = {re.search(r"goodput\s+(\d+\.\d) %", text).group(1)
             for text in [summary.format_text(built), *(format_summary(b) for b in boxes)]}
    assert shown == {"66.7"}
    # and the other figures agree too: the run's record, not each agent's own memory
    assert {(b["failures"], b["restarts"], b["steps_lost"]) for b in boxes} == {(1, 1, 4)}
    assert built["agent"]["steps_lost"] == 4 and built["wall_seconds"] == pytest.approx(60.0)
