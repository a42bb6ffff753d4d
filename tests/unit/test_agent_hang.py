"""Reading a hung worker's state from /proc (a fake one here) and reporting it without continuing it."""

from __future__ import annotations

from pathlib import Path

from launcher.agent import hang


def fake_proc(root: Path, pid: int, state: str, wchan: str = "0", stack: str | None = None) -> Path:
    d = root / str(pid)
    d.mkdir(parents=True)
    # The command name may contain spaces and parentheses: the state follows the last ')'.
    (d / "stat").write_text(f"{pid} (python (x) y) {state} 1 {pid} {pid} 0 -1 4194560 1234\n")
    (d / "wchan").write_text(wchan)
    if stack is not None:
        (d / "stack").write_text(stack)
    return root


def test_a_stopped_process_is_reported_as_stopped_and_not_continued(tmp_path):
    proc = fake_proc(tmp_path, 41, "T", "do_signal_stop", "[<0>] do_signal_stop+0x16f/0x210\n")
    st = hang.read_state(41, proc)
    assert st.stopped and not st.gone
    assert st.describe() == "stopped (SIGSTOP/SIGTSTP), waiting in do_signal_stop"
    text = hang.report(3, st, stacks=None)
    assert text.startswith("rank 3, pid 41: stopped")
    assert "NOT continued" in text and "do_signal_stop+0x16f" in text
    assert "install py-spy" in text  # a stopped process cannot run its faulthandler


def test_a_running_process_in_a_collective_and_its_stacks(tmp_path):
    proc = fake_proc(tmp_path, 42, "S", "futex_do_wait")  # no readable kernel stack (not root)
    st = hang.read_state(42, proc)
    assert not st.stopped and not st.gone
    text = hang.report(0, st, stacks="Thread 42 (idle): MainThread\n    all_gather (...)")
    assert "sleeping, waiting in futex_do_wait" in text
    assert "(unreadable: needs root)" in text and "all_gather" in text and "NOT continued" not in text


def test_an_exited_or_missing_process_is_gone(tmp_path):
    assert hang.read_state(43, fake_proc(tmp_path, 43, "Z")).gone
    st = hang.read_state(44, tmp_path)  # no such process
    assert st.gone and st.describe() == "gone"


def test_a_running_process_has_no_wchan(tmp_path):
    st = hang.read_state(45, fake_proc(tmp_path, 45, "R", "0"))
    assert st.wchan == "" and st.describe() == "running"
