"""``FtAgent``: torch's ``LocalElasticAgent`` with hang detection and an explicit restart policy.

Everything torch's agent does well is kept: rendezvous (``DynamicRendezvousHandler``),
rank assignment, worker start-up and environment, the exit barrier, signal forwarding.
What changes, and why:

* ``_invoke_run`` (the monitor loop) asks :class:`~launcher.agent.policy.RestartPolicy` what
  to do with each monitor result instead of branching inline, so budget, back-off, crash-loop
  guard and "do not restart" exit codes are decided in one pure, tested place.
* ``_monitor_workers`` also reads the ranks' progress reports and reports a worker group with
  a rank that made no progress for ``--hang-timeout`` as ``UNHEALTHY`` (torch's agent only
  sees processes that exit; a rank stuck in a collective is alive forever).
* ``_stop_workers`` kills with SIGKILL. Torch sends SIGTERM and waits up to 30 s; when the agent
  itself decides to restart (a hang, a node joining) there is nothing a worker could save that
  the latest verified checkpoint does not hold. When a worker *fails*, torch's process context
  sends the survivors SIGTERM (a teardown request, see ``launcher/preempt.py``); ftrun bounds
  that wait to ``AgentOptions.teardown_grace`` (5 s) instead of 30 s, so a worker that cannot
  end at once (one blocked in an NCCL collective with the dead peer) costs seconds, not 30.
* Survivors of a failure may be writing a just-in-time snapshot of the step they hold
  (``launcher/snapshot.py``; they say so in their progress report). Before any stop, ftrun
  waits for those, up to ``AgentOptions.snapshot_grace`` (``--snapshot-grace``, 60 s), and
  records the wait (``snapshot_wait`` in ``events.jsonl``); the others are not waited for.
* A hung group is inspected without being disturbed (:mod:`.hang`): a stopped process is
  reported as stopped and never continued. Before acting on the decision, the workers' real
  exit states are read again: a group whose workers all finished meanwhile is a success.
* Failures, restarts and recoveries go to ``RUN_DIR/events.jsonl`` (:mod:`.report`).

Worker states are torch's ``WorkerState``: ``HEALTHY`` -> ``FAILED`` (a worker exited non-zero),
``UNHEALTHY`` (a hang, found here), ``SUCCEEDED``; the agent's own phase is
:class:`~launcher.agent.policy.Phase`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from torch.distributed.elastic.agent.server.api import DEFAULT_ROLE, RunResult, WorkerGroup, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

from launcher.agent import console, hang
from launcher.agent.policy import Action, Decision, Observation, PolicyConfig, RestartPolicy, Seen
from launcher.agent.progress import ProgressMonitor, wait_for_survivors
from launcher.agent.report import Recorder

log = logging.getLogger("ftrun")

PROGRESS_ENV = "FTRUN_PROGRESS_FILE"  # read by the workers through launcher/env.py


@dataclass
class AgentOptions:
    """What ftrun adds to torchrun's launch config."""

    run_dir: Path | None  # where events.jsonl, progress reports and stack dumps go (None: a temp dir)
    progress_template: str  # per-rank progress file, containing "{rank}"
    script: str = ""  # the user's training script (or module), as given on the command line
    hang_timeout: float = 600.0  # --hang-timeout: seconds without progress before a rank counts as hung
    long_activity_factor: float = 3.0  # saves and evaluations may take this many times longer
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    stop_timeout: int = 10  # seconds to wait for killed workers to be reaped
    stack_dump_wait: float = 0.5  # seconds to let faulthandler write a running hung worker's stacks
    teardown_grace: int = 5  # after a worker failed: seconds the survivors get to end on SIGTERM, then SIGKILL
    snapshot_grace: float = 60.0  # ... or, while one writes a snapshot of its step, up to this many seconds


class FtAgent(LocalElasticAgent):
    """A ``LocalElasticAgent`` whose monitor loop is driven by :class:`RestartPolicy`."""

    def __init__(self, spec, logs_specs, options: AgentOptions, recorder: Recorder | None = None, **kwargs):
        super().__init__(spec, logs_specs, **kwargs)
        self.options = options
        self.policy = RestartPolicy(options.policy)
        self.progress = ProgressMonitor(options.progress_template, options.hang_timeout,
                                        options.long_activity_factor)
        self.recorder = recorder or Recorder(options.run_dir)
        self.final: Decision | None = None
        self._hung: dict[int, str] = {}
        self._hang_states: dict[int, hang.ProcessState] = {}

    # ------------------------------------------------------------------ loop

    def _invoke_run(self, role: str = DEFAULT_ROLE) -> RunResult:
        wg = self._worker_group
        log.info("ftrun: starting workers for %s (hang timeout %.0f s, %d restarts allowed)",
                 self.options.script or wg.spec.get_entrypoint_name(), self.options.hang_timeout,
                 self.options.policy.max_restarts)
        self._initialize_workers(wg)
        while True:
            time.sleep(wg.spec.monitor_interval)
            result = self._monitor_workers(wg)
            if result.state is WorkerState.UNHEALTHY:
                self._inspect_hang(wg)
                result = self._recheck(wg, result)
            wg.state = result.state
            decision = self.policy.decide(self._observe(result))
            if decision.action is Action.CONTINUE:
                continue
            if decision.action is Action.SUCCEED:
                self.final = decision
                self._exit_barrier()
                return result
            self._record(result, decision)
            if decision.action is Action.STOP:
                log.error("ftrun: stopping: %s", decision.reason)
                self._stop_workers(wg)
                wg.state = WorkerState.FAILED
                self.final = decision
                self.recorder.stopped(decision.reason, decision.exit_code or 1)
                return result
            self._restart(wg, decision)

    def _observe(self, result: RunResult) -> Observation:
        state = result.state
        if state is WorkerState.SUCCEEDED:
            return Observation(Seen.SUCCEEDED)
        if state is WorkerState.UNHEALTHY:
            return Observation(Seen.HUNG, progressed=self.progress.progressed)
        if state is WorkerState.HEALTHY:
            waiting = self._worker_group.spec.rdzv_handler.num_nodes_waiting()
            return Observation(Seen.NODE_WAITING if waiting > 0 else Seen.HEALTHY)
        codes = tuple(f.exitcode for f in result.failures.values()) or (1,)
        return Observation(Seen.FAILED, exit_codes=codes, progressed=self.progress.progressed)

    def _restart(self, wg: WorkerGroup, decision: Decision) -> None:
        # Workers read TORCHELASTIC_RESTART_COUNT from this (torch computes it from the budget).
        self._remaining_restarts = wg.spec.max_restarts - self.policy.restarts
        self.recorder.restart(self.policy.restarts, decision.reason, decision.delay, decision.counts)
        if decision.counts:
            last = self.recorder.failures[-1] if self.recorder.failures else {}
            what = console.worker_failure(last.get("ranks") or []) if "ranks" in last and "exit_code" in last \
                else decision.reason
            log.warning("ftrun: %s", console.restart_line(what, self.policy.restarts, wg.spec.max_restarts,
                                                          decision.delay))
        else:
            log.warning("ftrun: %s", decision.reason)
        self._stop_workers(wg)
        self.recorder.workers_stopped(self.progress)
        wg.state = WorkerState.STOPPED
        if decision.delay:
            time.sleep(decision.delay)
        self._initialize_workers(wg)

    def _record(self, result: RunResult, decision: Decision) -> None:
        restarts = self.policy.restarts
        if result.state is WorkerState.HEALTHY:  # a node waits to join
            self.recorder.failure("membership", self.progress, restarts, detail=decision.reason)
        elif result.state is WorkerState.UNHEALTHY:
            self.recorder.failure("hang", self.progress, restarts, ranks=sorted(self._hung),
                                  detail=list(self._hung.values()), stacks=str(self._stacks_dir()),
                                  states={r: st.describe() for r, st in self._hang_states.items()},
                                  stopped=sorted(r for r, st in self._hang_states.items() if st.stopped))
        else:
            ranks = [{"rank": r, "exit_code": f.exitcode, "signal": f.signal_name() if f.exitcode < 0 else None}
                     for r, f in sorted(result.failures.items())]
            self.recorder.failure("worker_exit", self.progress, restarts, ranks=ranks,
                                  exit_code=ranks[0]["exit_code"] if ranks else None,
                                  signal=ranks[0]["signal"] if ranks else None)

    # ------------------------------------------------------------------ torch hooks

    def _initialize_workers(self, worker_group: WorkerGroup) -> None:
        super()._initialize_workers(worker_group)
        self._say_membership(worker_group)
        self._bound_teardown()
        self.progress.start_attempt({w.global_rank: w.id for w in worker_group.workers})
        self.recorder.group_rank = worker_group.group_rank
        self.policy.restarted()
        self._hung, self._hang_states = {}, {}

    def _bound_teardown(self) -> None:
        """Shorten torch's wait for survivors after a worker failed from 30 s to ``teardown_grace``,
        or up to ``snapshot_grace`` while one writes a snapshot.

        torch's process context closes itself when it sees a failed worker, with ``close()`` and
        no arguments: SIGTERM, then SIGKILL after 30 s. Explicit calls (``_stop_workers``, the
        forwarding of a signal to ftrun with ``--shutdown_timeout``) pass their own and are kept.
        """
        pcontext = self._pcontext
        if pcontext is None:
            return
        close = pcontext.close

        def bounded_close(death_sig=None, timeout: int = 30) -> None:
            if death_sig is None:
                self._let_survivors_end(pcontext, signal.SIGTERM)
                timeout = 1  # what is left now gets torch's SIGTERM, then SIGKILL
            close(death_sig, timeout)

        pcontext.close = bounded_close

    def _let_survivors_end(self, pcontext, sig: int | None) -> None:
        """Send ``sig`` (if any) to the live workers and wait for them to end: ``teardown_grace``
        seconds with ``sig`` (none without), up to ``snapshot_grace`` while one writes a snapshot."""
        try:
            pids = dict(pcontext.pids())
        except (AssertionError, AttributeError):  # not started
            return
        ranks = {w.id: w.global_rank for w in self._worker_group.workers if w.id is not None}
        live = {pid for pid in pids.values() if not hang.read_state(pid).gone}
        for pid in live if sig is not None else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        wait = wait_for_survivors(
            lambda: {ranks.get(pid, -1) for pid in pids.values() if not hang.read_state(pid).gone},
            self.progress.snapshotting, self.options.teardown_grace if sig is not None else 0.0,
            self.options.snapshot_grace)
        if wait.snapshotting:
            self.recorder.snapshot_wait(sorted(wait.snapshotting), wait.seconds, sorted(wait.left))
            line = console.snapshot_wait_line(sorted(wait.snapshotting), wait.seconds, sorted(wait.left))
            (log.warning if wait.left else log.info)("ftrun: %s", line)

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        result = super()._monitor_workers(worker_group)
        # Read progress whatever the state: workers that finish (or fail again) within one
        # monitor interval of their first new step have still recovered from the last failure.
        self.progress.poll()
        self.recorder.check_recovered(self.progress, self.policy.restarts)
        if result.state is not WorkerState.HEALTHY:
            return result
        pids = {w.global_rank: w.id for w in worker_group.workers}
        # A rank whose process has exited (it finished) is not hung, whatever its last report says.
        self._hung = {r: line for r, line in self.progress.hung().items()
                      if r not in pids or not hang.read_state(pids[r]).gone}
        if self._hung:
            for line in self._hung.values():
                log.error("ftrun: hang: %s", line)
            return RunResult(state=WorkerState.UNHEALTHY)
        return result

    def _say_membership(self, worker_group: WorkerGroup) -> None:
        """After each rendezvous: which nodes left or joined since the last one, in one line."""
        nodes = console.participants(worker_group.spec.rdzv_handler)
        before = self.recorder.nodes  # kept by the recorder: a new agent after a lost store knows them too
        if nodes is not None and before is not None:
            line = console.membership_line(before, nodes)
            if line:
                log.warning("ftrun: %s; this node is node %d", line, worker_group.group_rank)
        self.recorder.nodes = nodes

    def _setup_local_watchdog(self, envs: dict[int, dict[str, str]]) -> None:
        # torch's hook for adding variables to each worker's environment (it adds its timer
        # file here). Not os.environ: a warm-start fork server keeps the environment it was
        # started with, and workers forked from it would not report progress.
        super()._setup_local_watchdog(envs)
        for worker_env in envs.values():
            worker_env[PROGRESS_ENV] = self.options.progress_template

    def _stop_workers(self, worker_group: WorkerGroup) -> None:
        if self._pcontext is not None:  # a survivor of a failure may still be writing its snapshot
            self._let_survivors_end(self._pcontext, None)
        self._shutdown(signal.SIGKILL, timeout=self.options.stop_timeout)

    # ------------------------------------------------------------------ hangs

    def _stacks_dir(self) -> Path:
        return (self.options.run_dir or Path(self.options.progress_template).parent) / "stacks"

    def _inspect_hang(self, wg: WorkerGroup) -> None:
        """Record what each local worker of a hung group is doing, without continuing a stopped one.

        Written to ``RUN_DIR/stacks/hang-<time>-rank<N>.txt`` (:func:`.hang.report`). Running ranks
        that report progress are also asked for their Python stacks by SIGUSR2 (faulthandler, on
        their stderr) when py-spy is not installed; a stopped process cannot answer, so it gets none.
        """
        out_dir = self._stacks_dir()
        out_dir.mkdir(parents=True, exist_ok=True)
        reported, asked = self.progress.reported_pids(), False
        self._hang_states = {}
        for w in wg.workers:
            if w.id is None:
                continue
            st = hang.read_state(w.id)
            self._hang_states[w.global_rank] = st
            stacks = hang.python_stacks(w.id) if not st.gone else None
            path = out_dir / f"hang-{int(time.time())}-rank{w.global_rank}.txt"
            path.write_text(hang.report(w.global_rank, st, stacks))
            log.error("ftrun: hung group: rank %d (pid %d) is %s; details in %s", w.global_rank, w.id,
                      st.describe(), path)
            if stacks is None and not (st.stopped or st.gone) and w.id in reported:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.id, signal.SIGUSR2)  # faulthandler (launcher/heartbeat.py): stacks on stderr
                    asked = True
        if asked:
            time.sleep(self.options.stack_dump_wait)

    def _recheck(self, wg: WorkerGroup, result: RunResult) -> RunResult:
        """The workers' real exit states now: a hung group whose workers all finished meanwhile succeeded."""
        again = super()._monitor_workers(wg)
        if again.state is WorkerState.SUCCEEDED:
            log.warning("ftrun: the workers judged hung have all finished meanwhile: the job succeeded")
            return again
        return result
