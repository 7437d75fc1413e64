"""The job agent's main loop: match, run, watch, and leave in good order.

It offers what is free of its slot to the broker, runs several jobs at once
on a multi-core slot (partitioning cores, memory and disk) where the
launcher isolates jobs from each other, and one job at a time where nothing
does (the process launcher: then every process a job left behind is killed
and its folder removed before the job is reported and the next one starts),
backs off when nothing matches and leaves after a configured idle time
(reporting an empty pilot when it ran nothing), stops matching when the time
left cannot fit a job, and stops taking work after K consecutive failures of
the node (black-hole guard). On SIGTERM (HTCondor preempting or removing the
glidein) and at the slot's end it sends every job a Stop with a deadline;
stopped jobs are reported so that the broker re-queues them. When the
broker refuses its token (AgentTokenRefused, several calls in a row) it
stops its jobs, reports nothing (it cannot), says why and what to fix, and
leaves with exit code 4 (pilot.agent.exitcodes). Before each wrapper starts,
the software area is checked against what was verified at start
(pilot.launch.manifest); a change stops the agent (exit code 6) without
starting the wrapper.

Every decision is made by pilot.agent.policy.AgentPolicy, a pure object fed
with events and the time; this module is the thin shell that does the I/O:
broker calls, JobRun threads, signals. The main thread waits on a self-pipe
(pilot.agent.waker) that JobRun threads and signal handlers write to; the
signal handlers only set a flag and wake it (no lock, no print: the main
thread may hold either). Reports that fail because the broker is away are
retried by the policy with backoff until the agent token's end.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import queue
import shutil
import signal
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from pilot.agent import exitcodes, policy
from pilot.agent.brokerlink import AgentBroker, Offer, SlotRequest
from pilot.agent.jobrun import JobRun, Outcome, RunSettings
from pilot.agent.policy import AgentPolicy, CallFailure, Ending, PolicySettings
from pilot.agent.refusal import AgentTokenRefused
from pilot.agent.slot import SlotResources
from pilot.agent.waker import Waker
from pilot.launch.manifest import SoftwareAreaChanged
from pilot.pipe import messages as m
from pilot.pipe.enums import name_of

# splitpilot.broker.v1.AttemptFailure values by Ending (kept numeric: the agent does not import the broker schema)
ATTEMPT_FAILURE = policy.ATTEMPT_FAILURE

#: Broker error codes that mean "the broker is away or slow: try again later".
_TRANSIENT_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "CANCELLED"})
#: Codes that may be a broker restarting or a bug of the broker: tried a few times only.
_DOUBTFUL_CODES = frozenset({"INTERNAL", "UNKNOWN"})


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
    #: Unix time at which the agent token ends: reports to the broker are retried until then (None: an hour).
    token_not_after: float | None = None
    #: Backoff of reports that failed because the broker is away.
    report_first_delay_s: float = 1.0
    report_max_delay_s: float = 30.0


#: The agent's log lines (`agent: ...`); where they go is set once by the process (pilot.logconfig).
log = logging.getLogger("splitpilot.agent")
#: The broker's wrapper heartbeat interval when its Match answer names none (the wrapper's own default).
DEFAULT_BROKER_HEARTBEAT_S = 30


def call_failure(error: BaseException) -> CallFailure:
    """How a broker call failed, for the policy."""
    if isinstance(error, AgentTokenRefused):
        return CallFailure.REFUSED
    code = getattr(getattr(error, "code", None), "name", None)
    if code is None:
        return CallFailure.REJECTED      # not a broker error: a bug here; retrying would not help
    if code in _TRANSIENT_CODES:
        return CallFailure.TRANSIENT
    if code in _DOUBTFUL_CODES:
        return CallFailure.DOUBTFUL
    if code == "INVALID_ARGUMENT":
        return CallFailure.INVALID
    return CallFailure.REJECTED


class Agent:
    """One pilot's agent. `make_run(offer, on_done) -> JobRun` builds the
    per-job runner (the launcher and mounts live there).

    SOFTWARE (a pilot.launch.manifest.SoftwareGuard) is checked before every
    wrapper starts. KILL_LEFTOVERS, with one_job_at_a_time, is called after
    each job, before its sandbox is removed, before it is reported and before
    the next may start: it kills whatever the job left (the CLI passes
    pilot.procstat.kill_descendants, the agent being a child subreaper) and
    returns how many processes it killed."""

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
        self.refused: AgentTokenRefused | None = None   # the refusal the agent gave up on
        self.running: dict[tuple[int, int], JobRun] = {}   # the main thread's only
        self.outcomes: list[Outcome] = []
        self.waker = Waker()
        self.policy: AgentPolicy | None = None
        self._events: queue.SimpleQueue = queue.SimpleQueue()   # from JobRun threads and other threads
        self._signal: str | None = None                          # set by the signal handler only
        self._unusable: dict[tuple[int, int], tuple[bytes, bytes]] = {}   # tokens of jobs to report unusable
        self._clock_offset = 0.0                                 # time.time() - time.monotonic()

    # ---------------------------------------------------------------- signals

    def install_signal_handlers(self) -> None:
        def on_term(signum, _frame):
            # A flag and a wake-up, nothing else: the main thread may be inside a lock or a print.
            self._signal = signal.Signals(signum).name
            self.waker.wake()
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)

    def request_shutdown(self, reason: str, stop_reason: int = m.StopReason.STOP_REASON_AGENT_SHUTDOWN) -> None:
        """Stop every job and leave (thread-safe)."""
        self._events.put(("shutdown", (reason, stop_reason)))
        self.waker.wake()

    # ------------------------------------------------------------------ loop

    @property
    def jobs_run(self) -> int:
        return self.policy.jobs_run if self.policy else 0

    @property
    def black_hole(self) -> bool:
        return bool(self.policy and self.policy.black_hole)

    def _mono(self, unix: float) -> float:
        """A Unix time as monotonic time (what the policy works in)."""
        return unix - self._clock_offset

    @property
    def _policy(self) -> AgentPolicy:
        """The policy, made as run() starts (its settings need the clock then)."""
        if self.policy is None:
            raise RuntimeError("agent bug: the policy is used before run() made it")
        return self.policy

    def run(self) -> int:
        s = self.settings
        now = time.monotonic()
        self._clock_offset = time.time() - now
        token_end = s.token_not_after if s.token_not_after is not None else time.time() + 3600
        self.policy = AgentPolicy(PolicySettings(
            cores=self.slot.cores, memory_mb=self.slot.memory_mb, disk_mb=self.slot.disk_mb,
            slot_end=self._mono(self.slot.end_of_life), idle_timeout_s=s.idle_timeout_s,
            min_backoff_s=s.min_backoff_s, max_backoff_s=s.max_backoff_s, min_job_time_s=s.min_job_time_s,
            black_hole_failures=s.black_hole_failures, pilot_heartbeat_s=s.pilot_heartbeat_s,
            refusals_to_leave=s.refusals_to_leave, stop_deadline_s=s.run.stop_deadline_s,
            one_job_at_a_time=s.one_job_at_a_time, report_until=self._mono(token_end),
            report_first_delay_s=s.report_first_delay_s, report_max_delay_s=s.report_max_delay_s), now)
        log.info(f"pilot {s.pilot_id} on {s.node}: {self.slot.cores} cores, {self.slot.memory_mb} MiB, "
                 f"{self.slot.disk_mb} MiB disk, {self.slot.time_left():.0f} s left ({self.slot.source})")
        while True:
            self._take_events()
            for action in self.policy.actions(time.monotonic()):
                if isinstance(action, policy.Leave):
                    return self._leave(action)
                try:
                    self._execute(action)
                except Exception as exc:  # noqa: BLE001 - a bug in one action must not end the pilot
                    log.warning(f"error while doing {action!r}: {type(exc).__name__}: {exc}")
            wake = self.policy.wake_at(time.monotonic())
            if self._signal is None and self._events.empty():
                self.waker.wait(None if math.isinf(wake) else wake - time.monotonic())

    def _take_events(self) -> None:
        name, self._signal = self._signal, None
        if name is not None:
            log.info(f"received {name}: stopping {len(self.running)} job(s)")
            self._policy.signal(time.monotonic(), name)
        while True:
            try:
                kind, payload = self._events.get_nowait()
            except queue.Empty:
                return
            if kind == "ended":
                self._job_ended(*payload)
            elif kind == "shutdown":
                reason, stop_reason = payload
                self._policy.shutdown(time.monotonic(), reason, stop_reason)

    def _execute(self, action) -> None:
        if isinstance(action, policy.Match):
            self._match(action)
        elif isinstance(action, policy.StopJob):
            run = self.running.get(action.key)
            if run is not None:
                run.request_stop(action.reason, action.detail, action.deadline_s)
        elif isinstance(action, policy.PilotHeartbeat):
            self._pilot_heartbeat(action)
        elif isinstance(action, policy.RefreshToken):
            self._refresh(action.key)
        elif isinstance(action, policy.Log):
            log.log(action.level, action.text)
        elif isinstance(action, (policy.ReportAttempt, policy.ReportJobUnusable, policy.ReportPilotEnd)):
            self._report(action)
        else:
            log.warning(f"unknown action {action!r}: ignored")

    # ---------------------------------------------------------------- actions

    def _match(self, action: policy.Match) -> None:
        s = self.settings
        request = SlotRequest(action.cores, action.memory_mb, action.disk_mb, action.time_left_s, s.platforms,
                              self.containers, s.isolation)
        try:
            answer = self.broker.match(request, s.pilot_id, s.node)
        except AgentTokenRefused as exc:
            self._note_refusal(exc)
            self._policy.match_failed(time.monotonic(), CallFailure.REFUSED, exc.cause, exc.exit_code)
            return
        except Exception as exc:  # noqa: BLE001 - the broker may be down for a while: back off
            self._policy.match_failed(time.monotonic(), CallFailure.TRANSIENT, f"broker unreachable: {exc}")
            return
        if isinstance(answer, Offer):
            self._start(answer)
        else:
            self._policy.no_match(time.monotonic(), answer.reason, answer.retry_after_s, answer.leave)

    def _start(self, offer: Offer) -> None:
        key = (offer.job_id, offer.attempt)
        if self.software is not None:
            try:
                self.software.check()
            except SoftwareAreaChanged as exc:
                self.software_changed = exc
                detail = f"not started: the software area changed on this node ({exc.path} {exc.what})"
                log.warning(f"job {offer.job_id}.{offer.attempt} {detail}")
                self._policy.start_refused(time.monotonic(), key, detail,
                                          f"software area changed: {exc.path} {exc.what}", exitcodes.SOFTWARE_CHANGED)
                return
        limits = job_limits(offer.spec)
        token_deadline = self._mono(offer.token_not_after) if offer.token_not_after else math.inf
        try:
            run = self.make_run(offer, self._on_done)
        except Exception as exc:  # noqa: BLE001 - the job goes back; the pilot goes on
            ending = Ending.INFRASTRUCTURE if isinstance(exc, OSError) else Ending.AGENT_ERROR
            log.warning(f"job {offer.job_id}.{offer.attempt} could not be prepared: {type(exc).__name__}: {exc}")
            remove_job_folder(os.path.join(self.settings.work_dir, f"job-{offer.job_id}-{offer.attempt}"))
            now = time.monotonic()
            self._policy.matched(now, key, limits.cores, limits.memory_mb, limits.disk_mb, token_deadline)
            self._policy.job_ended(now, key, ending, f"the job could not be prepared on this node: "
                                                    f"{type(exc).__name__}: {exc}")
            return
        self.running[key] = run
        # The broker keeps this attempt alive from our heartbeats: they must come as often as its wrapper's would.
        liveness_s = float(offer.broker_heartbeat_s or DEFAULT_BROKER_HEARTBEAT_S) if offer.liveness_from_pilot else 0.0
        self._policy.matched(time.monotonic(), key, run.limits.cores, run.limits.memory_mb, run.limits.disk_mb,
                            token_deadline, liveness_s)
        alone = " (one job at a time)" if self.settings.one_job_at_a_time else ""
        log.info(f"job {offer.job_id}.{offer.attempt} matched ({offer.spec.name or offer.spec.executable[:80]}): "
                 f"{run.limits.cores} core(s), {run.limits.memory_mb} MiB; isolation: "
                 f"{self.settings.isolation or 'unknown'}{alone}")
        run.start()

    def _on_done(self, run: JobRun, outcome: Outcome) -> None:
        """Called in the job's thread: hand the end over to the main thread."""
        self._events.put(("ended", (run, outcome)))
        self.waker.wake()

    def _job_ended(self, run: JobRun, outcome: Outcome) -> None:
        key = (outcome.job_id, outcome.attempt)
        if self.settings.one_job_at_a_time and self.kill_leftovers is not None:
            # Before the sandbox goes, before the attempt is reported (the broker may give the job to another
            # pilot then) and before the next job may start: nothing of this one may still run.
            try:
                killed = self.kill_leftovers()
            except Exception as exc:  # noqa: BLE001 - said; the sandbox is still removed
                killed = 0
                log.warning(f"job {key[0]}.{key[1]}: killing what it left failed: {exc}")
            if killed:
                log.info(f"job {key[0]}.{key[1]} left {killed} process(es) behind: killed")
        remove_job_folder(os.path.dirname(run.sandbox_host))
        self.running.pop(key, None)
        self.outcomes.append(outcome)
        state = name_of(m.JobState, outcome.result.final_state, sender="the wrapper") if outcome.result \
            else "no result"
        log.info(f"job {key[0]}.{key[1]} ended: {outcome.ending.value} ({state}): {outcome.detail}")
        if outcome.ending is Ending.JOB_UNUSABLE:
            self._unusable[key] = (run.token_pem, run.key_pem)
        self._policy.job_ended(time.monotonic(), key, outcome.ending, outcome.detail)

    def _pilot_heartbeat(self, action: policy.PilotHeartbeat) -> None:
        s = self.settings
        try:
            stop, leave = self.broker.pilot_heartbeat(s.pilot_id, s.node, list(action.running), action.cores_in_use,
                                                      self._vouched(action.running))
        except Exception as exc:  # noqa: BLE001 - sorted for the policy
            failure = call_failure(exc)
            if isinstance(exc, AgentTokenRefused):   # (what call_failure calls REFUSED)
                self._note_refusal(exc)
            self._policy.heartbeat_failed(time.monotonic(), failure, getattr(exc, "cause", str(exc)),
                                         getattr(exc, "exit_code", exitcodes.TOKEN_REFUSED))
            return
        self._policy.heartbeat_answered(time.monotonic(), [(job_id, attempt) for job_id, attempt in stop], leave)

    def _vouched(self, keys) -> dict[tuple[int, int], tuple[float, int, int]]:
        """The attempts this heartbeat keeps alive at the broker, with their payload's figures: those matched
        with liveness from the pilot whose wrapper still runs (zeros before its first pipe heartbeat). A wrapper
        that died is not vouched for: the agent reports its end, or the broker reaps it."""
        vouched = {}
        for key in keys:
            run = self.running.get(key)
            if run is None or not run.offer.liveness_from_pilot or not run.wrapper_alive():
                continue
            beat = run.last_heartbeat
            vouched[key] = (beat.cpu_seconds, beat.rss_bytes, beat.sandbox_bytes) if beat else (0.0, 0, 0)
        return vouched

    def _refresh(self, key: tuple[int, int]) -> None:
        run = self.running.get(key)
        if run is None:
            return
        try:
            fresh = self.broker.refresh_job_token(run.token_pem, run.key_pem)
        except Exception as exc:  # noqa: BLE001 - sorted for the policy
            failure = call_failure(exc)
            self._policy.token_refresh_failed(time.monotonic(), key, failure, str(exc))
            return
        run.deliver_token(fresh.token_pem, fresh.private_key_pem, fresh.not_after)
        expires = datetime.datetime.fromtimestamp(fresh.not_after, datetime.UTC)
        log.info(f"job {key[0]}.{key[1]}: token refreshed, valid until {expires:%H:%M:%S}Z")
        self._policy.token_refreshed(time.monotonic(), key, self._mono(fresh.not_after))

    def _report(self, action) -> None:
        s = self.settings
        try:
            if isinstance(action, policy.ReportAttempt):
                self.broker.report_attempt_failure(action.key[0], action.key[1], action.failure, action.detail,
                                                   s.pilot_id)
            elif isinstance(action, policy.ReportJobUnusable):
                token_pem, key_pem = self._unusable[action.key]
                self.broker.report_job_unusable(token_pem, key_pem, action.detail)
            else:
                self.broker.report_pilot_end(s.pilot_id, s.node, action.jobs_run, action.reason)
        except Exception as exc:  # noqa: BLE001 - sorted for the policy
            failure = call_failure(exc)
            if isinstance(exc, AgentTokenRefused):   # (what call_failure calls REFUSED)
                self._note_refusal(exc)
            self._policy.report_failed(time.monotonic(), action.report_id, failure,
                                      getattr(exc, "cause", None) or str(exc),
                                      getattr(exc, "exit_code", exitcodes.TOKEN_REFUSED))
            return
        if isinstance(action, policy.ReportJobUnusable):
            self._unusable.pop(action.key, None)
        self._policy.report_done(time.monotonic(), action.report_id)

    def _note_refusal(self, exc: AgentTokenRefused) -> None:
        self.refused = exc

    def _leave(self, action: policy.Leave) -> int:
        log.info(f"leaving: {action.reason}; ran {self.jobs_run} job(s)")
        self.waker.close()
        if self._policy.refused_exit is not None and self.refused is not None:
            # Nothing was reported with a refused token; the last line says why and what to fix.
            log.error(f"{self.refused} (exit code {action.exit_code})")
        elif self.software_changed is not None:
            log.error(f"{self.software_changed} (exit code {action.exit_code})")
        return action.exit_code


def job_limits(spec: m.JobSpec) -> m.Limits:
    req = spec.requirements
    return m.Limits(cores=max(1, req.cores), memory_mb=req.memory_mb, disk_mb=req.disk_mb,
                    walltime_s=req.walltime_s)


#: What a job's folder in the work dir is called: job-<job id>-<attempt>.
JOB_FOLDER_PREFIX = "job-"
#: The runtime self-test's scratch folder (tempfile.mkdtemp's 8 random characters follow the prefix).
PROBE_FOLDER_PREFIX = "probe-"


def job_folder_name(name: str) -> bool:
    """Whether NAME is a job folder's name (job-<digits>-<digits>), the only folders the agent removes."""
    if not name.startswith(JOB_FOLDER_PREFIX):
        return False
    parts = name[len(JOB_FOLDER_PREFIX):].split("-")
    return len(parts) == 2 and all(part.isdigit() and part.isascii() for part in parts)


def probe_folder_name(name: str) -> bool:
    """Whether NAME is the runtime self-test's scratch folder (probe-XXXXXXXX), left when an agent is
    killed during its start-up probe."""
    rest = name[len(PROBE_FOLDER_PREFIX):]
    return (name.startswith(PROBE_FOLDER_PREFIX) and len(rest) == 8
            and all(c.isascii() and (c.isalnum() or c == "_") for c in rest))


def _make_writable_and_retry(function, path, _excinfo) -> None:
    """rmtree's error handler: a folder the payload made read-only is made writable (by its owner) again."""
    parent = os.path.dirname(path)
    if not os.path.islink(parent):
        os.chmod(parent, 0o700)
    function(path)


def remove_job_folder(path: str) -> None:
    """Remove a job's folder without following symbolic links (shutil.rmtree works from descriptors and
    refuses a link at the top), whatever the payload left in it (read-only folders included)."""
    try:
        if os.path.islink(path):
            os.unlink(path)   # the link only: never what it points at
            return
        shutil.rmtree(path, onerror=_make_writable_and_retry)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning(f"could not remove {path} entirely: {exc}")


def remove_stale_job_folders(work_dir: str) -> list[str]:
    """Remove the job folders (and runtime-probe folders) an earlier agent left in WORK_DIR (it was
    killed before cleaning up).

    Called with the work dir's lock held (no live agent uses it): only
    entries named like job or probe folders, never through a link."""
    removed = []
    with os.scandir(work_dir) as entries:
        for entry in entries:
            ours = job_folder_name(entry.name) or probe_folder_name(entry.name)
            if ours and (entry.is_dir(follow_symlinks=False) or entry.is_symlink()):
                remove_job_folder(entry.path)
                removed.append(entry.name)
    return sorted(removed)


def sandbox_for(work_dir: str, offer: Offer) -> str:
    path = os.path.join(work_dir, f"job-{offer.job_id}-{offer.attempt}", "sandbox")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path
