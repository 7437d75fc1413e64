"""The job agent's main loop: match, run, watch, and leave in good order.

It offers what is free of its slot to the broker, runs several jobs at once
on a multi-core slot (partitioning cores, memory and disk) where the
launcher isolates jobs from each other, and one job at a time where nothing
does (the process launcher: then every process a job left behind is killed
and its folder removed before the next one starts), backs off when
nothing matches and leaves after a configured idle time (reporting an empty
pilot when it ran nothing), stops matching when the time left cannot fit a
job, and stops taking work after K consecutive wrapper or infrastructure
failures (black-hole guard). On SIGTERM (HTCondor preempting or removing the
glidein) and at the slot's end it sends every job a Stop with a deadline;
stopped jobs are reported so that the broker re-queues them. When the
broker refuses its token (AgentTokenRefused, several calls in a row) it
stops its jobs, reports nothing (it cannot), says why and what to fix, and
leaves with exit code 4 (pilot.agent.exitcodes). Before each wrapper starts,
the software area is checked against what was verified at start
(pilot.launch.manifest); a change stops the agent (exit code 6) without
starting the wrapper.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from pilot.agent import exitcodes
from pilot.agent.brokerlink import AgentBroker, NoOffer, Offer, SlotRequest
from pilot.agent.jobrun import Ending, JobRun, Outcome, RunSettings
from pilot.agent.refusal import AgentTokenRefused
from pilot.agent.slot import SlotResources
from pilot.launch.manifest import SoftwareAreaChanged
from pilot.pipe import messages as m

# splitpilot.broker.v1.AttemptFailure values (kept numeric: the agent does not import the broker schema)
ATTEMPT_FAILURE = {Ending.WRAPPER_FAILED: 1, Ending.INFRASTRUCTURE: 2, Ending.STOPPED: 3, Ending.LIMIT: 4}


@dataclass(frozen=True)
class AgentSettings:
    work_dir: str
    pilot_id: str = field(default_factory=lambda: f"pilot-{uuid.uuid4().hex[:12]}")
    node: str = field(default_factory=socket.gethostname)
    idle_timeout_s: float = 300.0
    min_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    min_job_time_s: float = 60.0        # do not match when less time than this is left
    black_hole_failures: int = 3
    pilot_heartbeat_s: float = 60.0
    platforms: tuple[str, ...] = ()
    #: Leave (exit 4) after this many broker calls in a row refused the token (one may be a transient).
    refusals_to_leave: int = 3
    run: RunSettings = RunSettings()
    #: The isolation the launcher gives each job (Slot.isolation; pilot.launch.isolation).
    isolation: str = ""
    #: Never two wrappers at once (nothing isolates jobs from each other): the whole slot goes to one job.
    one_job_at_a_time: bool = False


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} agent: {message}", file=sys.stderr, flush=True)


class Agent:
    """One pilot's agent. `make_run(offer, free_share) -> JobRun` builds the
    per-job runner (the launcher and mounts live there).

    SOFTWARE (a pilot.launch.manifest.SoftwareGuard) is checked before every
    wrapper starts. KILL_LEFTOVERS, with one_job_at_a_time, is called after
    each job and before the next may start: it kills whatever the job left
    (the CLI passes pilot.procstat.kill_descendants, the agent being a child
    subreaper) and returns how many processes it killed."""

    def __init__(self, broker: AgentBroker, slot: SlotResources, settings: AgentSettings,
                 make_run: Callable[[Offer, Callable], JobRun], containers: bool, *, software=None,
                 kill_leftovers: Callable[[], int] | None = None) -> None:
        self.broker = broker
        self.slot = slot
        self.settings = settings
        self.make_run = make_run
        self.containers = containers
        self.software = software
        self.kill_leftovers = kill_leftovers
        self.software_changed: SoftwareAreaChanged | None = None
        self.running: dict[tuple[int, int], JobRun] = {}
        self.outcomes: list[Outcome] = []
        self.jobs_run = 0
        self.consecutive_failures = 0
        self.black_hole = False
        self.refusals = 0                               # broker calls in a row that refused the token
        self.refused: AgentTokenRefused | None = None   # set when the agent gives up on its token
        self.shutdown = threading.Event()
        self.shutdown_reason = ""
        self._wake = threading.Event()
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- signals

    def install_signal_handlers(self) -> None:
        def on_term(signum, _frame):
            self.request_shutdown(f"signal {signal.Signals(signum).name}", m.StopReason.STOP_REASON_PREEMPTED)
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)

    def request_shutdown(self, reason: str, stop_reason: int = m.StopReason.STOP_REASON_AGENT_SHUTDOWN) -> None:
        if not self.shutdown.is_set():
            self.shutdown_reason = reason
            self.shutdown.set()
            log(f"shutting down ({reason}): stopping {len(self.running)} job(s)")
            with self._lock:
                runs = list(self.running.values())
            for run in runs:
                run.request_stop(stop_reason, reason, self.settings.run.stop_deadline_s)
            self._wake.set()

    # ------------------------------------------------------------------ loop

    def run(self) -> int:
        log(f"pilot {self.settings.pilot_id} on {self.settings.node}: {self.slot.cores} cores, "
            f"{self.slot.memory_mb} MiB, {self.slot.disk_mb} MiB disk, {self.slot.time_left():.0f} s left "
            f"({self.slot.source})")
        idle_since = time.monotonic()
        backoff = self.settings.min_backoff_s
        next_pilot_heartbeat = time.monotonic() + self.settings.pilot_heartbeat_s
        end_reason = ""
        while True:
            if self.shutdown.is_set():
                end_reason = end_reason or self.shutdown_reason
                break
            if self.slot.time_left() <= self.settings.run.stop_deadline_s:
                self.request_shutdown("the slot's lifetime ends", m.StopReason.STOP_REASON_SLOT_END)
                continue
            if time.monotonic() >= next_pilot_heartbeat:
                self._pilot_heartbeat()
                next_pilot_heartbeat = time.monotonic() + self.settings.pilot_heartbeat_s
            wait = backoff
            if self._may_match():
                offer = self._match()
                if isinstance(offer, Offer):
                    self._start(offer)
                    idle_since, backoff, wait = time.monotonic(), self.settings.min_backoff_s, 0.0
                elif offer is not None:
                    if offer.leave:
                        end_reason = f"the broker says leave: {offer.reason}"
                        self.request_shutdown(end_reason)
                        continue
                    wait = backoff = min(self.settings.max_backoff_s, max(offer.retry_after_s, backoff * 2))
            with self._lock:
                busy = bool(self.running)
            if busy:
                idle_since = time.monotonic()
            elif self.black_hole:
                end_reason = f"black hole: {self.consecutive_failures} consecutive wrapper/infrastructure failures"
                break
            elif time.monotonic() - idle_since > self.settings.idle_timeout_s:
                end_reason = "idle" if self.jobs_run else "idle: no job matched (empty pilot)"
                break
            elif self.slot.time_left() < self.settings.min_job_time_s:
                end_reason = "too little time left for any job"
                break
            # Never sleep past the idle deadline or the slot's end: both are checked above.
            wait = min(wait, max(0.0, idle_since + self.settings.idle_timeout_s - time.monotonic()) + 0.01,
                       max(0.0, self.slot.time_left() - self.settings.run.stop_deadline_s))
            self._wake.wait(wait)
            self._wake.clear()
        self._drain()
        log(f"leaving: {end_reason}; ran {self.jobs_run} job(s)")
        if self.refused is not None:
            # Nothing can be reported with a refused token; the last line says why and what to fix.
            log(f"{self.refused} (exit code {self.refused.exit_code})")
            return self.refused.exit_code
        try:
            self.broker.report_pilot_end(self.settings.pilot_id, self.settings.node, self.jobs_run, end_reason)
        except Exception as exc:  # noqa: BLE001 - leaving anyway
            log(f"could not report the pilot's end: {exc}")
        if self.software_changed is not None:
            log(f"{self.software_changed} (exit code {exitcodes.SOFTWARE_CHANGED})")
            return exitcodes.SOFTWARE_CHANGED
        return exitcodes.BLACK_HOLE if self.black_hole else exitcodes.LEFT

    def _may_match(self) -> bool:
        if self.shutdown.is_set() or self.black_hole:
            return False
        if self.settings.one_job_at_a_time:
            with self._lock:
                if self.running:
                    return False
        free = self._free()
        return free.cores >= 1 and free.time_left_s >= self.settings.min_job_time_s

    def _free(self) -> SlotRequest:
        with self._lock:
            runs = list(self.running.values())
        cores = self.slot.cores - sum(max(1, r.limits.cores) for r in runs)
        memory = self.slot.memory_mb - sum(r.limits.memory_mb for r in runs)
        disk = self.slot.disk_mb - sum(r.limits.disk_mb for r in runs)
        time_left = int(self.slot.time_left() - self.settings.run.stop_deadline_s)
        return SlotRequest(max(0, cores), max(0, memory), max(0, disk), max(0, time_left),
                           self.settings.platforms, self.containers, self.settings.isolation)

    def _match(self) -> Offer | NoOffer | None:
        try:
            answer = self.broker.match(self._free(), self.settings.pilot_id, self.settings.node)
        except AgentTokenRefused as exc:
            self._refused(exc, "match")
            return NoOffer(f"token refused: {exc.cause}", self.settings.min_backoff_s * 2)
        except Exception as exc:  # noqa: BLE001 - the broker may be down for a while: back off
            self.refusals = 0
            log(f"match failed: {exc}")
            return NoOffer(f"broker unreachable: {exc}", self.settings.min_backoff_s * 4)
        self.refusals = 0
        return answer

    def _refused(self, exc: AgentTokenRefused, call: str) -> None:
        """A broker call refused the token: count it; after refusals_to_leave in a row, give up and leave."""
        self.refusals += 1
        limit = max(1, self.settings.refusals_to_leave)
        if self.refusals < limit:
            log(f"{call}: the broker refused this agent token ({exc.cause}); {self.refusals} of {limit} "
                "refusals in a row before leaving")
            return
        if self.refused is None:
            self.refused = exc
            log(f"{call}: {exc}")
            self.request_shutdown(f"the broker refused this agent token {self.refusals} times in a row")

    def _start(self, offer: Offer) -> None:
        if self.software is not None:
            try:
                self.software.check()
            except SoftwareAreaChanged as exc:
                self._refuse_to_start(offer, exc)
                return
        run = self.make_run(offer, self._on_done)
        with self._lock:
            self.running[(offer.job_id, offer.attempt)] = run
        self.jobs_run += 1
        alone = " (one job at a time)" if self.settings.one_job_at_a_time else ""
        log(f"job {offer.job_id}.{offer.attempt} matched ({offer.spec.name or offer.spec.executable}): "
            f"{run.limits.cores} core(s), {run.limits.memory_mb} MiB; isolation: "
            f"{self.settings.isolation or 'unknown'}{alone}")
        run.start()

    def _refuse_to_start(self, offer: Offer, exc: SoftwareAreaChanged) -> None:
        """The software area changed: no wrapper from it, the job back to the broker, no more work."""
        self.software_changed = exc
        detail = f"not started: the software area changed on this node ({exc.path} {exc.what})"
        log(f"job {offer.job_id}.{offer.attempt} {detail}")
        try:
            self.broker.report_attempt_failure(offer.job_id, offer.attempt, ATTEMPT_FAILURE[Ending.INFRASTRUCTURE],
                                               detail, self.settings.pilot_id)
        except Exception as error:  # noqa: BLE001 - the broker's reaper re-queues it later anyway
            log(f"could not report job {offer.job_id}.{offer.attempt}: {error}")
        self.request_shutdown(f"software area changed: {exc.path} {exc.what}",
                              m.StopReason.STOP_REASON_AGENT_SHUTDOWN)

    def _on_done(self, run: JobRun, outcome: Outcome) -> None:
        if self.settings.one_job_at_a_time:
            # Before this job leaves `running` (the next may start then): nothing of it may stay.
            killed = self.kill_leftovers() if self.kill_leftovers is not None else 0
            shutil.rmtree(os.path.dirname(run.sandbox_host), ignore_errors=True)
            if killed:
                log(f"job {outcome.job_id}.{outcome.attempt} left {killed} process(es) behind: killed")
        with self._lock:
            self.running.pop((outcome.job_id, outcome.attempt), None)
            self.outcomes.append(outcome)
        state = m.JobState.Name(outcome.result.final_state) if outcome.result else "no result"
        log(f"job {outcome.job_id}.{outcome.attempt} ended: {outcome.ending.value} ({state}): {outcome.detail}")
        if outcome.ending in ATTEMPT_FAILURE and self.refused is not None:
            log(f"job {outcome.job_id}.{outcome.attempt} not reported (the broker refuses this agent's token): "
                "the broker re-queues it when its heartbeats stop")
        elif outcome.ending in ATTEMPT_FAILURE:
            try:
                self.broker.report_attempt_failure(outcome.job_id, outcome.attempt, ATTEMPT_FAILURE[outcome.ending],
                                                   outcome.detail, self.settings.pilot_id)
            except Exception as exc:  # noqa: BLE001 - the broker's reaper re-queues it later anyway
                log(f"could not report job {outcome.job_id}.{outcome.attempt}: {exc}")
        if outcome.counts_as_node_failure:
            self.consecutive_failures += 1
            if self.consecutive_failures >= self.settings.black_hole_failures and not self.black_hole:
                self.black_hole = True
                log(f"black-hole guard: {self.consecutive_failures} consecutive failures of this node; "
                    "taking no more work")
        elif outcome.ending is Ending.REPORTED:
            self.consecutive_failures = 0
        self._wake.set()

    def _pilot_heartbeat(self) -> None:
        with self._lock:
            running = list(self.running)
        try:
            stop, leave = self.broker.pilot_heartbeat(self.settings.pilot_id, self.settings.node, running,
                                                      self.slot.cores - self._free().cores)
        except AgentTokenRefused as exc:
            self._refused(exc, "pilot heartbeat")
            return
        except Exception as exc:  # noqa: BLE001 - next time
            log(f"pilot heartbeat failed: {exc}")
            return
        self.refusals = 0
        for key in stop:
            with self._lock:
                run = self.running.get(tuple(key))
            if run is not None:
                run.request_stop(m.StopReason.STOP_REASON_KILLED, "killed at the broker", 10)
        if leave:
            self.request_shutdown("the site is drained or disabled")

    def _drain(self) -> None:
        """Wait for every job to end (their Stop deadlines bound this)."""
        while True:
            with self._lock:
                runs = list(self.running.values())
            if not runs:
                return
            for run in runs:
                run.join(timeout=1.0)


def job_limits(spec: m.JobSpec) -> m.Limits:
    req = spec.requirements
    return m.Limits(cores=max(1, req.cores), memory_mb=req.memory_mb, disk_mb=req.disk_mb,
                    walltime_s=req.walltime_s)


def sandbox_for(work_dir: str, offer: Offer) -> str:
    path = os.path.join(work_dir, f"job-{offer.job_id}-{offer.attempt}", "sandbox")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path
