"""The restart policy: what the agent does after each look at its workers. Pure, no I/O.

The agent's monitor loop turns what it saw into an :class:`Observation` and asks
:meth:`RestartPolicy.decide` for a :class:`Decision`. All restart rules live here, so they
can be tested in one process with scripted observations (``tests/unit/test_agent_policy.py``):

* **Budget** (``--max_restarts``): failures and hangs spend one restart each; membership
  changes (a node joining) do not, as in torch's agent.
* **Back-off**: after the n-th consecutive attempt that failed without a new step, the
  restart waits ``min(backoff_base * 2**(n-1), backoff_cap)`` seconds; a restart after an
  attempt that completed steps waits nothing, so an ordinary crash costs no extra time.
* **Crash-loop guard**: after ``crash_loop`` consecutive restarts whose attempts failed
  before completing a single new step, stop. A worker that dies the same way every time is
  a bug (bad data, a code error after resume), not a fault; restarting it would only burn
  the budget and hide the first error under many identical ones.
* **No local restart** for exit codes in :data:`launcher.exit_codes.NO_RESTART`: a config or
  checkpoint error repeats on restart, and a preempted job is requeued by its job script.

States (``Phase``) and transitions::

    RUNNING --failure/hang, budget left, no crash loop--> RESTARTING --rendezvous--> RUNNING
    RUNNING --node waiting to join--> RESTARTING (budget unchanged)
    RUNNING --all workers exited 0--> SUCCEEDED
    RUNNING --failure--> STOPPED  (exit code in NO_RESTART, budget spent, or crash loop)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from launcher import exit_codes


class Phase(enum.Enum):
    RUNNING = "running"
    RESTARTING = "restarting"
    SUCCEEDED = "succeeded"
    STOPPED = "stopped"


class Seen(enum.Enum):
    """What one look at the local workers found."""

    HEALTHY = "healthy"  # all alive and (if they report progress) progressing
    SUCCEEDED = "succeeded"  # all exited 0
    FAILED = "failed"  # at least one exited non-zero or was killed by a signal
    HUNG = "hung"  # alive, but no progress for longer than the hang timeout
    NODE_WAITING = "node_waiting"  # healthy, and a node waits to join the rendezvous


class Action(enum.Enum):
    CONTINUE = "continue"
    RESTART = "restart"
    SUCCEED = "succeed"
    STOP = "stop"


@dataclass(frozen=True)
class Observation:
    """One monitor result, plus the progress facts the policy needs."""

    seen: Seen
    exit_codes: tuple[int, ...] = ()  # non-zero exit codes of failed local workers (negative: signal)
    progressed: bool = False  # this attempt completed at least one new step


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""
    delay: float = 0.0  # seconds to wait before the restart (back-off)
    counts: bool = False  # spends one restart from the budget
    exit_code: int | None = None  # for STOP: the code the agent should exit with


@dataclass
class PolicyConfig:
    """Restart rules; each maps to one ftrun flag."""

    max_restarts: int = 3  # --max_restarts: failures and hangs tolerated
    backoff_base: float = 1.0  # --backoff-base: first wait after a restart that made no progress (s)
    backoff_cap: float = 30.0  # --backoff-cap: longest wait between restarts (s)
    crash_loop: int = 3  # --crash-loop: consecutive restarts without a new step before giving up

    def __post_init__(self) -> None:
        problems = []
        if self.max_restarts < 0:
            problems.append(f"max_restarts must be >= 0, got {self.max_restarts}")
        if self.backoff_base < 0:
            problems.append(f"backoff_base must be >= 0 seconds, got {self.backoff_base}")
        if self.backoff_cap < self.backoff_base:
            problems.append(f"backoff_cap ({self.backoff_cap}) must be >= backoff_base ({self.backoff_base})")
        if self.crash_loop < 1:
            problems.append(f"crash_loop must be >= 1, got {self.crash_loop}")
        if problems:
            raise ValueError("invalid restart policy: " + "; ".join(problems))


@dataclass
class RestartPolicy:
    """The state machine. Call :meth:`decide` once per monitor result."""

    config: PolicyConfig
    phase: Phase = Phase.RUNNING
    restarts: int = 0  # restarts spent from the budget
    no_progress_streak: int = 0  # consecutive restarts whose attempt then failed without a new step
    history: list[Decision] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return self.config.max_restarts - self.restarts

    def decide(self, obs: Observation) -> Decision:
        decision = self._decide(obs)
        if decision.action is not Action.CONTINUE:
            self.history.append(decision)
        self.phase = {Action.CONTINUE: Phase.RUNNING, Action.RESTART: Phase.RESTARTING,
                      Action.SUCCEED: Phase.SUCCEEDED, Action.STOP: Phase.STOPPED}[decision.action]
        return decision

    def restarted(self) -> None:
        """The workers are running again (after the rendezvous)."""
        self.phase = Phase.RUNNING

    def _decide(self, obs: Observation) -> Decision:
        if obs.seen is Seen.HEALTHY:
            return Decision(Action.CONTINUE)
        if obs.seen is Seen.SUCCEEDED:
            return Decision(Action.SUCCEED, "all workers finished", exit_code=exit_codes.OK)
        if obs.seen is Seen.NODE_WAITING:
            return Decision(Action.RESTART, "a node is waiting to join: re-forming the job at the new size")
        return self._after_failure(obs)

    def _after_failure(self, obs: Observation) -> Decision:
        final = sorted({c for c in obs.exit_codes if c in exit_codes.NO_RESTART})
        if final:
            return Decision(Action.STOP, f"worker exit code {final[0]} means do not restart here "
                                         f"(see launcher/exit_codes.py)", exit_code=final[0])
        # A restart followed by a failure with no new step extends the streak; the first
        # attempt is not a restart, so a job that crashes at once stops after crash_loop restarts.
        self.no_progress_streak = 0 if obs.progressed else self.no_progress_streak + 1
        what = "a worker hung" if obs.seen is Seen.HUNG else f"worker exit codes {list(obs.exit_codes)}"
        if self.no_progress_streak > self.config.crash_loop:
            return Decision(Action.STOP, f"crash loop: {self.config.crash_loop} consecutive restarts failed before "
                                         f"completing a new step ({what}). This is a bug, not a fault: read the "
                                         f"first failure's traceback", exit_code=1)
        if self.remaining <= 0:
            return Decision(Action.STOP, f"restart budget spent ({self.config.max_restarts} restarts); last: {what}",
                            exit_code=1)
        self.restarts += 1
        streak = self.no_progress_streak
        delay = 0.0 if streak == 0 else min(self.config.backoff_base * 2 ** (streak - 1), self.config.backoff_cap)
        return Decision(Action.RESTART, what, delay=delay, counts=True)
