"""What a hung worker is doing, found out without disturbing it.

Read from ``/proc/<pid>``: the scheduler state (a process stopped by SIGSTOP or a debugger is
reported as *stopped*, never continued: continuing it would let it run on, finish steps and
even the job, while the agent has already decided to restart), the kernel function it waits
in (``wchan``) and, where readable (root), its kernel stack. Python stacks come from
``py-spy dump --nonblocking`` when py-spy is on the PATH (it reads the process's memory and
works on a stopped process too), else from the worker's own faulthandler on SIGUSR2
(``launcher/heartbeat.py``), which only a running process can answer.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

STATES = {"R": "running", "S": "sleeping", "D": "in uninterruptible sleep (I/O or a device)",
          "T": "stopped (SIGSTOP/SIGTSTP)", "t": "stopped by a debugger", "Z": "exited, not yet reaped",
          "X": "exited", "I": "idle", "": "gone"}


@dataclass(frozen=True)
class ProcessState:
    pid: int
    state: str  # /proc/<pid>/stat's state letter; "" if the process is gone
    wchan: str  # kernel function it waits in ("" if running or unreadable)
    kernel_stack: str | None  # /proc/<pid>/stack, None if unreadable (needs root)

    @property
    def stopped(self) -> bool:
        return self.state in ("T", "t")

    @property
    def gone(self) -> bool:
        return self.state in ("", "Z", "X")

    def describe(self) -> str:
        what = STATES.get(self.state, f"state {self.state}")
        return f"{what}" + (f", waiting in {self.wchan}" if self.wchan else "")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:  # gone, or not readable by this user
        return None


def read_state(pid: int, proc: Path = Path("/proc")) -> ProcessState:
    """The process's state from ``proc`` (a fake directory in tests)."""
    stat = _read(proc / str(pid) / "stat") or ""
    # The command name may hold spaces and parentheses: the state follows the last ')'.
    rest = stat[stat.rfind(")") + 1:].split() if ")" in stat else []
    state = rest[0] if rest else ""
    wchan = (_read(proc / str(pid) / "wchan") or "").strip()
    return ProcessState(pid=pid, state=state, wchan="" if wchan == "0" else wchan,
                        kernel_stack=_read(proc / str(pid) / "stack"))


def find_pyspy() -> str | None:
    """py-spy on the PATH, or next to this Python (installed into the venv, which need not be activated)."""
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


def python_stacks(pid: int, timeout: float = 10.0) -> str | None:
    """All threads' Python stacks by ``py-spy dump --nonblocking``, or None if py-spy is not installed."""
    pyspy = find_pyspy()
    if not pyspy:
        return None
    try:
        out = subprocess.run([pyspy, "dump", "--nonblocking", "--pid", str(pid)], capture_output=True, text=True,
                             timeout=timeout)
        return out.stdout + (f"\n(py-spy: {out.stderr.strip()})" if out.returncode else "")
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"py-spy failed: {e}"


def report(rank: int, st: ProcessState, stacks: str | None) -> str:
    """The text written to ``RUN_DIR/stacks/`` for one rank of a hung group."""
    lines = [f"rank {rank}, pid {st.pid}: {st.describe()}"]
    if st.stopped:
        lines.append("It was stopped by a signal or a debugger and was NOT continued (SIGCONT would let it "
                     "run on while the group restarts). Its peers wait for it in a collective.")
    lines.append("kernel stack:\n" + (st.kernel_stack.rstrip() if st.kernel_stack else "(unreadable: needs root)"))
    if stacks is not None:
        lines.append("Python stacks (py-spy dump --nonblocking):\n" + stacks.rstrip())
    elif st.stopped:
        lines.append("Python stacks: not available (a stopped process cannot run faulthandler; install py-spy "
                     "to read them)")
    else:
        lines.append("Python stacks: on the worker's stderr (faulthandler, SIGUSR2)")
    return "\n".join(lines) + "\n"
