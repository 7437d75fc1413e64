"""The agent's decisions, without threads, I/O or clocks (the h11 lesson applied to the agent).

`AgentPolicy` is told what happened (a match's answer, a job's end, a
signal, a pilot heartbeat's answer, a report that failed...) with the time
it happened, and says what to do (`actions(now)`): ask for a job, stop jobs,
report attempts and the pilot's end, refresh job tokens, heartbeat, leave.
`wake_at(now)` says when to ask again if nothing happens before. It never
sleeps, reads a clock, starts a thread or calls the broker: the agent's shell
(pilot.agent.agent) does that and feeds the results back, so every decision
is unit-tested with plain calls and made-up times (tests/test_agent_policy.py).

Times are monotonic seconds. Decisions:

- match: only with room (cores, memory, disk; one job at a time without
  isolation), time for a job (min_job_time_s), not leaving, not a black hole,
  and not before the backoff after an empty match or a broker error;
- leave: idle for idle_timeout_s (an empty pilot says so), too little time
  left, the slot's end (jobs get Stop SLOT_END), a signal (Stop PREEMPTED),
  the broker's "leave" (drained or disabled site), the black-hole guard once
  its jobs ended, or a refused token; running jobs get a Stop with the stop
  deadline and the agent leaves once they all ended and were reported;
- report: every attempt the wrapper did not end itself, by its Ending (see
  ATTEMPT_FAILURE): retried with backoff while the broker is away, until
  the agent token's end; a refusal of the report itself drops it (the
  attempt was already over); then the pilot's end, likewise;
- black hole: only failures of the node (wrapper crash, runtime,
  infrastructure) count; the job's own faults, an error of the agent's own
  code, a fencing, a limit or an unknown result from a newer wrapper never do;
- token refresh: each job's token when two thirds of its life are gone, again
  after a failure, until the refreshed token ends no later than the old one
  (capped by the pilot's own certificate).
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass, field

Key = tuple[int, int]   # (job id, attempt)

# splitpilot.pipe.v1.StopReason values (kept numeric: the policy imports no schema)
STOP_SLOT_END, STOP_PREEMPTED, STOP_KILLED, STOP_AGENT_SHUTDOWN = 1, 2, 3, 5
# splitpilot.broker.v1.AttemptFailure values
FAILURE_WRAPPER, FAILURE_INFRASTRUCTURE, FAILURE_STOPPED, FAILURE_LIMIT, FAILURE_AGENT = 1, 2, 3, 4, 5

LEFT, BLACK_HOLE_EXIT = 0, 3


class Ending(enum.Enum):
    """How a job ended, from the agent's point of view."""

    REPORTED = "reported by the wrapper"       # the wrapper told the broker itself
    STOPPED = "stopped"                        # re-queue (slot end, preemption, agent shutdown)
    LIMIT = "limit exceeded"                   # stopped by the agent: final FAILED_LIMIT at the broker
    WRAPPER_FAILED = "wrapper failed"          # no Result, protocol error, wrapper error: re-queue
    INFRASTRUCTURE = "infrastructure failed"   # the runtime or node: re-queue
    AGENT_ERROR = "agent error"                # the agent's own code raised: re-queue, never charged
    UNKNOWN_RESULT = "unknown result"          # a newer wrapper's final state or class: re-queue, not charged
    FENCED = "ended at the broker"             # the broker ended the attempt: nothing to report
    JOB_UNUSABLE = "job unusable"              # the job cannot be handed to a wrapper: the job's fault, final


#: Ending -> the AttemptFailure the agent reports (Endings absent here: nothing, or see JOB_UNUSABLE).
ATTEMPT_FAILURE: dict[Ending, int] = {
    Ending.WRAPPER_FAILED: FAILURE_WRAPPER, Ending.INFRASTRUCTURE: FAILURE_INFRASTRUCTURE,
    Ending.STOPPED: FAILURE_STOPPED, Ending.LIMIT: FAILURE_LIMIT, Ending.AGENT_ERROR: FAILURE_AGENT,
    Ending.UNKNOWN_RESULT: FAILURE_WRAPPER,
}
#: Endings the black-hole guard counts: failures of this node.
NODE_FAILURES = frozenset({Ending.WRAPPER_FAILED, Ending.INFRASTRUCTURE})


class CallFailure(enum.Enum):
    """How a broker call failed, as the shell sorts it."""

    TRANSIENT = "transient"   # the broker is away or slow: retry later
    DOUBTFUL = "doubtful"     # INTERNAL, UNKNOWN: maybe a broker restarting, maybe a bug: retried a few times
    REFUSED = "refused"       # the broker refuses the agent token (AgentTokenRefused)
    REJECTED = "rejected"     # the broker refused this request (e.g. the attempt is already over): drop it
    INVALID = "invalid"       # INVALID_ARGUMENT: e.g. an older broker that lacks a new AttemptFailure value


# ------------------------------------------------------------------ actions

@dataclass(frozen=True)
class Match:
    """Ask the broker for a job fitting what is free."""

    cores: int
    memory_mb: int
    disk_mb: int
    time_left_s: int


@dataclass(frozen=True)
class StopJob:
    key: Key
    reason: int        # a StopReason value
    detail: str
    deadline_s: int


@dataclass(frozen=True)
class ReportAttempt:
    """ReportAttemptFailure (with the agent token)."""

    report_id: int
    key: Key
    failure: int       # an AttemptFailure value
    detail: str


@dataclass(frozen=True)
class ReportJobUnusable:
    """The job cannot be run as described: reported as an input failure with the job's own token."""

    report_id: int
    key: Key
    detail: str


@dataclass(frozen=True)
class ReportPilotEnd:
    report_id: int
    jobs_run: int
    reason: str


@dataclass(frozen=True)
class PilotHeartbeat:
    running: tuple[Key, ...]
    cores_in_use: int


@dataclass(frozen=True)
class RefreshToken:
    key: Key


@dataclass(frozen=True)
class Log:
    text: str
    level: int = logging.INFO     # a logging level: a failure the agent lives with is a WARNING


@dataclass(frozen=True)
class Leave:
    exit_code: int
    reason: str


Report = ReportAttempt | ReportJobUnusable | ReportPilotEnd


# ----------------------------------------------------------------- settings

@dataclass(frozen=True)
class PolicySettings:
    cores: int
    memory_mb: int
    disk_mb: int
    slot_end: float                      # monotonic time at which the slot ends
    idle_timeout_s: float = 300.0
    min_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    min_job_time_s: float = 60.0         # do not match when less time than this is left
    black_hole_failures: int = 3
    pilot_heartbeat_s: float = 60.0
    refusals_to_leave: int = 3
    stop_deadline_s: int = 30            # Stop's deadline on slot end, signals, leaving
    kill_deadline_s: int = 10            # Stop's deadline for an attempt the broker says to stop
    one_job_at_a_time: bool = False
    report_until: float = math.inf       # monotonic time after which reports are given up (the agent token's end)
    report_first_delay_s: float = 1.0
    report_max_delay_s: float = 30.0
    refresh_at: float = 2 / 3            # refresh a job token when this fraction of its life is gone
    refresh_retry_s: float = 30.0


@dataclass
class _Job:
    cores: int
    memory_mb: int
    disk_mb: int
    token_deadline: float
    token_issued: float
    next_refresh: float = math.inf
    refreshing: bool = False
    stopping: bool = False
    liveness_s: float = 0.0     # >0: the broker keeps this job alive from pilot heartbeats at least this often


#: How many times a report failing with CallFailure.DOUBTFUL is tried.
DOUBTFUL_TRIES = 5


@dataclass
class _Pending:
    action: Report
    next_try: float
    delay: float
    in_flight: bool = False
    doubtful: int = 0


@dataclass
class AgentPolicy:
    settings: PolicySettings
    now: float                           # when the agent started
    jobs: dict[Key, _Job] = field(default_factory=dict)
    jobs_run: int = 0
    consecutive_failures: int = 0
    black_hole: bool = False
    refusals: int = 0
    refused_exit: int | None = None      # the exit code once the agent gave up on its token
    leaving: str | None = None           # why the agent leaves, once it decided to
    exit_code: int = LEFT
    left: bool = False

    def __post_init__(self) -> None:
        s = self.settings
        self.idle_since = self.now
        self.backoff = s.min_backoff_s
        self.next_match_at = self.now
        self.next_heartbeat_at = self.now + s.pilot_heartbeat_s
        self._pending_actions: list = []
        self._reports: dict[int, _Pending] = {}
        self._next_report_id = 1
        self._end_report: int | None = None     # the pilot end report's id once queued
        self._end_resolved = False

    # ================================================================ events

    def matched(self, now: float, key: Key, cores: int, memory_mb: int, disk_mb: int, token_deadline: float,
                liveness_s: float = 0.0) -> None:
        """A job was matched and its run started (KEY's resources are taken). LIVENESS_S > 0: the broker
        keeps the attempt alive from this pilot's heartbeats, which must then come at least that often."""
        self._answered()
        self.jobs[key] = job = _Job(max(1, cores), memory_mb, disk_mb, token_deadline, now,
                                    liveness_s=max(0.0, liveness_s))
        if job.liveness_s:
            self.next_heartbeat_at = min(self.next_heartbeat_at, now + job.liveness_s)
        job.next_refresh = self._refresh_time(job, now)
        self.jobs_run += 1
        self.idle_since = now
        self.backoff = self.settings.min_backoff_s
        self.next_match_at = now      # more room? ask again at once
        if self.leaving is not None:  # matched while a leave was decided (cannot happen in the shell): stop it
            self._stop(key, STOP_AGENT_SHUTDOWN, self.leaving, self.settings.stop_deadline_s)

    def no_match(self, now: float, reason: str, retry_after_s: float, leave: bool) -> None:
        self._answered()
        if leave:
            self._begin_leave(f"the broker says leave: {reason}", STOP_AGENT_SHUTDOWN)
            return
        self._back_off(now, retry_after_s)

    def match_failed(self, now: float, failure: CallFailure, detail: str, exit_code: int = 4) -> None:
        """The match call failed (the broker is down, or refused the token: EXIT_CODE is the refusal's)."""
        if failure is CallFailure.REFUSED:
            self._token_refused("match", detail, exit_code)
            self._back_off(now, self.settings.min_backoff_s * 2)
            return
        self.refusals = 0
        self._log(f"match failed: {detail}", logging.WARNING)
        self._back_off(now, self.settings.min_backoff_s * 4)

    def start_refused(self, now: float, key: Key, detail: str, reason: str, exit_code: int) -> None:
        """A matched job was not started (the software area changed): report it, take no more work, leave."""
        self._answered()
        self._queue_report(now, lambda rid: ReportAttempt(rid, key, FAILURE_INFRASTRUCTURE, detail))
        self._begin_leave(reason, STOP_AGENT_SHUTDOWN, exit_code)

    def job_ended(self, now: float, key: Key, ending: Ending, detail: str) -> None:
        """KEY's run ended (its processes are gone and its sandbox removed)."""
        self.jobs.pop(key, None)
        self.idle_since = now
        self.next_match_at = min(self.next_match_at, now)   # room again: no need to wait for a backoff
        failure = ATTEMPT_FAILURE.get(ending)
        if (failure is not None or ending is Ending.JOB_UNUSABLE) and self.refused_exit is not None:
            self._log(f"job {key[0]}.{key[1]} not reported (the broker refuses this agent's token): the broker "
                      "re-queues it when its heartbeats stop", logging.WARNING)
        elif failure is not None:
            self._queue_report(now, lambda rid: ReportAttempt(rid, key, failure, detail))
        elif ending is Ending.JOB_UNUSABLE:
            self._queue_report(now, lambda rid: ReportJobUnusable(rid, key, detail))
        if ending in NODE_FAILURES:
            self.consecutive_failures += 1
            if self.consecutive_failures >= self.settings.black_hole_failures and not self.black_hole:
                self.black_hole = True
                self._log(f"black-hole guard: {self.consecutive_failures} consecutive failures of this node; "
                          "taking no more work", logging.ERROR)
        elif ending is Ending.REPORTED:
            self.consecutive_failures = 0

    def heartbeat_answered(self, now: float, stop: list[Key], leave: bool) -> None:
        self._answered()
        for key in stop:
            if key in self.jobs:
                self._stop(key, STOP_KILLED, "killed at the broker", self.settings.kill_deadline_s)
        if leave:
            self._begin_leave("the site is drained or disabled", STOP_AGENT_SHUTDOWN)

    def heartbeat_failed(self, now: float, failure: CallFailure, detail: str, exit_code: int = 4) -> None:
        if failure is CallFailure.REFUSED:
            self._token_refused("pilot heartbeat", detail, exit_code)
        else:
            self._log(f"pilot heartbeat failed: {detail}", logging.WARNING)

    def report_done(self, now: float, report_id: int) -> None:
        self._answered()
        self._resolve(report_id)

    def report_failed(self, now: float, report_id: int, failure: CallFailure, detail: str,
                      exit_code: int = 4) -> None:
        pending = self._reports.get(report_id)
        if pending is None:
            return
        pending.in_flight = False
        action = pending.action
        what = _describe(action)
        if failure is CallFailure.REFUSED:
            self._token_refused(what, detail, exit_code)
            if self.refused_exit is not None:
                self._log(f"{what} dropped: the broker refuses this agent's token", logging.WARNING)
                self._resolve(report_id)
                return
        elif failure is CallFailure.INVALID and isinstance(action, ReportAttempt) and action.failure == FAILURE_AGENT:
            # A broker older than ATTEMPT_FAILURE_AGENT: the nearest it knows (re-queued, and charged to
            # the wrapper instead of the agent: the best it can do).
            pending.action = ReportAttempt(action.report_id, action.key, FAILURE_WRAPPER, action.detail)
            pending.next_try = now
            return
        elif failure in (CallFailure.REJECTED, CallFailure.INVALID):
            self._log(f"{what} refused by the broker ({detail}): dropped", logging.WARNING)
            self._resolve(report_id)
            return
        elif failure is CallFailure.DOUBTFUL:
            pending.doubtful += 1
            if pending.doubtful >= DOUBTFUL_TRIES:
                self._log(f"{what} failed {pending.doubtful} times ({detail}): dropped", logging.WARNING)
                self._resolve(report_id)
                return
        if now >= self.settings.report_until:
            self._log(f"{what} given up: the broker could not be reached before this agent's token ended "
                      f"({detail}); the broker's reaper ends what the report would have", logging.WARNING)
            self._resolve(report_id)
            return
        pending.next_try = min(now + pending.delay, self.settings.report_until)   # a last try at the token's end
        self._log(f"{what} failed ({detail}); retrying in {pending.next_try - now:.0f} s", logging.WARNING)
        pending.delay = min(self.settings.report_max_delay_s, pending.delay * 2)

    def token_refreshed(self, now: float, key: Key, token_deadline: float) -> None:
        self._answered()
        job = self.jobs.get(key)
        if job is None:
            return
        job.refreshing = False
        if token_deadline <= job.token_deadline + 1:
            # Capped at the pilot's own certificate: refreshing again gives nothing more.
            job.next_refresh = math.inf
            return
        job.token_deadline, job.token_issued = token_deadline, now
        job.next_refresh = self._refresh_time(job, now)

    def token_refresh_failed(self, now: float, key: Key, failure: CallFailure, detail: str,
                             exit_code: int = 4) -> None:
        job = self.jobs.get(key)
        if job is None:
            return
        job.refreshing = False
        if failure is CallFailure.REFUSED:
            self._token_refused(f"job {key[0]}.{key[1]}'s token refresh", detail, exit_code)
        self._log(f"job {key[0]}.{key[1]}: token refresh failed ({detail})", logging.WARNING)
        left = job.token_deadline - now
        job.next_refresh = now + min(self.settings.refresh_retry_s, max(1.0, left / 4)) if left > 0 else math.inf

    def signal(self, now: float, name: str) -> None:
        """SIGTERM/SIGINT (the batch system preempts or removes the glidein)."""
        if self.leaving is not None:
            self._log(f"{name} received: already leaving ({self.leaving})")
            return
        self._begin_leave(f"signal {name}", STOP_PREEMPTED)

    def shutdown(self, now: float, reason: str, stop_reason: int = STOP_AGENT_SHUTDOWN) -> None:
        if self.leaving is None:
            self._begin_leave(reason, stop_reason)

    # ============================================================= decisions

    def free(self, now: float) -> Match:
        """What the slot has free now (what a Match would offer)."""
        s = self.settings
        jobs = self.jobs.values()
        return Match(max(0, s.cores - sum(j.cores for j in jobs)),
                     max(0, s.memory_mb - sum(j.memory_mb for j in jobs)),
                     max(0, s.disk_mb - sum(j.disk_mb for j in jobs)),
                     max(0, int(s.slot_end - now - s.stop_deadline_s)))

    def actions(self, now: float) -> list:
        """What to do now. Match and report actions are answered by events before the next call."""
        s = self.settings
        out, self._pending_actions = self._pending_actions, []
        if self.left:
            return out
        if self.leaving is None:
            time_left = s.slot_end - now
            if time_left <= s.stop_deadline_s:
                self._begin_leave("the slot's lifetime ends", STOP_SLOT_END)
            elif not self.jobs and not self._may_match(now):   # a match due first: its answer may be a job
                if self.black_hole:
                    self._begin_leave(f"black hole: {self.consecutive_failures} consecutive wrapper/infrastructure "
                                      "failures", STOP_AGENT_SHUTDOWN, BLACK_HOLE_EXIT)
                elif now - self.idle_since > s.idle_timeout_s:
                    self._begin_leave("idle" if self.jobs_run else "idle: no job matched (empty pilot)",
                                      STOP_AGENT_SHUTDOWN)
                elif time_left < s.min_job_time_s:
                    self._begin_leave("too little time left for any job", STOP_AGENT_SHUTDOWN)
        if self._heartbeating() and now >= self.next_heartbeat_at:
            out.append(PilotHeartbeat(tuple(self.jobs), sum(j.cores for j in self.jobs.values())))
            self.next_heartbeat_at = now + self.heartbeat_interval()
        if self.refused_exit is None:
            for key, job in self.jobs.items():
                if not job.refreshing and not job.stopping and now >= job.next_refresh:
                    job.refreshing = True
                    out.append(RefreshToken(key))
        for pending in self._reports.values():
            if not pending.in_flight and now >= pending.next_try:
                pending.in_flight = True
                out.append(pending.action)
        if self._may_match(now):
            out.append(self.free(now))
            self.next_match_at = math.inf   # until the answer
        if self.leaving is not None and not self.jobs:
            out += self._leave_when_done(now, self.leaving)
        out += self._pending_actions
        self._pending_actions = []
        return out

    def wake_at(self, now: float) -> float:
        """The next time `actions` has something to do if no event comes first."""
        s = self.settings
        if self._pending_actions:
            return now
        if self.left:
            return math.inf
        times = [math.inf]
        if self.leaving is None:
            times.append(s.slot_end - s.stop_deadline_s)
            if not self.jobs:
                times += [self.idle_since + s.idle_timeout_s + 0.001, s.slot_end - s.min_job_time_s]
            if self._could_match(now):
                times.append(self.next_match_at)
        if self._heartbeating():
            times.append(self.next_heartbeat_at)
        if self.jobs:
            times += [j.next_refresh for j in self.jobs.values() if not j.refreshing and not j.stopping]
        times += [p.next_try for p in self._reports.values() if not p.in_flight]
        if self.leaving is not None and not self.jobs and not self._reports:
            times.append(now)
        return max(now, min(times))

    # ============================================================= internals

    def heartbeat_interval(self) -> float:
        """Seconds between pilot heartbeats: the pilot's own interval, shorter while a job's liveness rides
        on them (its wrapper sends no heartbeat of its own)."""
        return min([self.settings.pilot_heartbeat_s, *(j.liveness_s for j in self.jobs.values() if j.liveness_s)])

    def _heartbeating(self) -> bool:
        """Pilot heartbeats go out while jobs run, and while idle (the broker sees the pilot live), not once
        the agent is leaving with nothing left to run, nor with a refused token."""
        return self.refused_exit is None and (bool(self.jobs) or self.leaving is None)

    def _answered(self) -> None:
        self.refusals = 0

    def _log(self, text: str, level: int = logging.INFO) -> None:
        self._pending_actions.append(Log(text, level))

    def _refresh_time(self, job: _Job, now: float) -> float:
        life = job.token_deadline - job.token_issued
        if not math.isfinite(life) or life <= 0:
            return math.inf
        return job.token_issued + life * self.settings.refresh_at

    def _back_off(self, now: float, retry_after_s: float) -> None:
        s = self.settings
        self.backoff = min(s.max_backoff_s, max(retry_after_s, self.backoff * 2))
        self.next_match_at = now + self.backoff

    def _token_refused(self, call: str, detail: str, exit_code: int) -> None:
        self.refusals += 1
        limit = max(1, self.settings.refusals_to_leave)
        if self.refusals < limit:
            self._log(f"{call}: the broker refused this agent token ({detail}); {self.refusals} of {limit} "
                      "refusals in a row before leaving", logging.WARNING)
            return
        if self.refused_exit is None:
            self.refused_exit = exit_code
            self._log(f"{call}: {detail}", logging.ERROR)
            self.leaving = None    # a refusal overrides any other reason to leave
            self._begin_leave(f"the broker refused this agent token {self.refusals} times in a row",
                              STOP_AGENT_SHUTDOWN)
            for pending in self._reports.values():   # nothing can be reported with a refused token
                self._log(f"{_describe(pending.action)} dropped: the broker refuses this agent's token",
                          logging.WARNING)
            self._reports.clear()

    def _could_match(self, now: float) -> bool:
        """Everything but the backoff allows a match."""
        s = self.settings
        if self.leaving is not None or self.black_hole or self.refused_exit is not None:
            return False
        if s.one_job_at_a_time and self.jobs:
            return False
        free = self.free(now)
        return free.cores >= 1 and free.time_left_s >= s.min_job_time_s

    def _may_match(self, now: float) -> bool:
        return self._could_match(now) and now >= self.next_match_at

    def _stop(self, key: Key, reason: int, detail: str, deadline_s: int) -> None:
        job = self.jobs.get(key)
        if job is not None:
            job.stopping = True
            self._pending_actions.append(StopJob(key, reason, detail, deadline_s))

    def _begin_leave(self, reason: str, stop_reason: int, exit_code: int = LEFT) -> None:
        if self.leaving is not None:
            return
        self.leaving = reason
        if self.refused_exit is not None:
            self.exit_code = self.refused_exit
        elif exit_code != LEFT:
            self.exit_code = exit_code
        elif self.black_hole:
            self.exit_code = BLACK_HOLE_EXIT
        self._log(f"leaving ({reason})" + (f": stopping {len(self.jobs)} job(s)" if self.jobs else ""))
        for key, job in list(self.jobs.items()):
            if not job.stopping:   # one already told to stop (a kill) keeps its own, shorter, deadline
                self._stop(key, stop_reason, reason, self.settings.stop_deadline_s)

    def _queue_report(self, now: float, make) -> int:
        report_id = self._next_report_id
        self._next_report_id += 1
        self._reports[report_id] = _Pending(make(report_id), now, self.settings.report_first_delay_s)
        return report_id

    def _resolve(self, report_id: int) -> None:
        self._reports.pop(report_id, None)
        if report_id == self._end_report:
            self._end_resolved = True

    def _leave_when_done(self, now: float, reason: str) -> list:
        """Once every job ended and its report is resolved: report the pilot's end (leaving for REASON),
        then leave."""
        if any(not isinstance(p.action, ReportPilotEnd) for p in self._reports.values()):
            return []
        if self._end_report is None:
            if self.refused_exit is not None:
                self._end_resolved = True   # nothing can be reported with a refused token
            else:
                self._end_report = self._queue_report(now, lambda rid: ReportPilotEnd(rid, self.jobs_run,
                                                                                      reason))
                pending = self._reports[self._end_report]
                pending.in_flight = True
                return [pending.action]
        if not self._end_resolved:
            return []
        self.left = True
        return [Leave(self.exit_code, reason)]


def _describe(action: Report) -> str:
    if isinstance(action, ReportPilotEnd):
        return "the pilot's end report"
    return f"job {action.key[0]}.{action.key[1]}'s report"
