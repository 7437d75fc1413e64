"""One job on the agent's side: start its wrapper, feed it, watch it, end it.

Each JobRun is a thread holding the job's pipe. It sends Hello and JobStart
(with the job token and the key made on this node), reads the wrapper's
frames, samples the wrapper's process tree and sandbox every few seconds,
and enforces the job's limits: memory (cgroup memory.max where delegated,
else a watchdog), walltime and disk. On a stop request (slot end, SIGTERM
from HTCondor, a kill from the broker) it sends Stop with a deadline, waits,
then kills; a refreshed job token is passed on as TokenRefresh. Its
Outcome tells the agent what to report: a wrapper that ends without a
Result is a wrapper failure, never the payload's.

Every run ends with an Outcome, whatever is raised inside it: an exception
of the agent's own code is Ending.AGENT_ERROR (re-queued, never charged to
the node or the job). Whatever the wrapper sends is read tolerantly: an
enum value this side does not know (a newer wrapper's) is named UNKNOWN,
said once, and a Result or Error with one is re-queued without charging
the node (Ending.UNKNOWN_RESULT). A job whose JobStart cannot cross the pipe
(larger than the frame cap) never reaches a wrapper: Ending.JOB_UNUSABLE,
the job's own fault. The job's processes are killed here; what a job left
behind outside the wrapper's tree, and its sandbox, are the agent's to
remove before it reports the attempt (pilot.agent.agent).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import cast

from pilot import __version__
from pilot.agent.brokerlink import Offer
from pilot.agent.limits import CgroupLimit
from pilot.agent.policy import Ending
from pilot.agent.waker import Waker
from pilot.pipe import messages as m
from pilot.pipe.channel import WOKEN, PipeTimeout
from pilot.pipe.enums import known, name_of
from pilot.pipe.errors import ProtocolError
from pilot.pipe.framing import DEFAULT_MAX_FRAME_BYTES, encode_varint
from pilot.pipe.protocol import ConnectionClosed, State
from pilot.procstat import directory_bytes, tree_usage

log = logging.getLogger("splitpilot.agent")

F = m.FailureClass

__all__ = ["Ending", "JobRun", "Outcome", "RunSettings"]


@dataclass(frozen=True)
class Outcome:
    job_id: int
    attempt: int
    ending: Ending
    detail: str
    result: m.Result | None = None

    @property
    def counts_as_node_failure(self) -> bool:
        """For the black-hole guard (pilot.agent.policy.NODE_FAILURES)."""
        return self.ending in (Ending.WRAPPER_FAILED, Ending.INFRASTRUCTURE)


@dataclass(frozen=True)
class RunSettings:
    monitor_interval_s: float = 5.0
    ready_timeout_s: float = 120.0      # container start + wrapper imports
    stop_deadline_s: int = 30           # Stop's deadline on slot end / shutdown
    limit_stop_deadline_s: int = 10     # Stop's deadline when a limit is exceeded


class JobRun(threading.Thread):
    def __init__(self, offer: Offer, *, spawn_wrapper, sandbox_host: str, sandbox_inside: str,
                 software_inside: str, broker_address: str, ca_pem: bytes, agent_id: str,
                 limits: m.Limits, deadline_unix: int, settings: RunSettings, on_done,
                 cgroup_parent: str | None = None, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        super().__init__(name=f"job-{offer.job_id}.{offer.attempt}", daemon=True)
        self.offer = offer
        self.spawn_wrapper = spawn_wrapper   # () -> (Popen, PipeChannel)
        self.sandbox_host = sandbox_host
        self.sandbox_inside = sandbox_inside
        self.software_inside = software_inside
        self.broker_address = broker_address
        self.ca_pem = ca_pem
        self.agent_id = agent_id
        self.limits = limits
        self.deadline_unix = deadline_unix
        self.settings = settings
        self.on_done = on_done
        self.cgroup_parent = cgroup_parent
        self.max_frame_bytes = max_frame_bytes
        self.started_at = time.monotonic()
        self.state = m.JobState.JOB_STATE_ASSIGNED
        self.last_heartbeat: m.Heartbeat | None = None
        self._process = None      # the wrapper, once spawned
        self.peak_rss = 0
        # The job's current token (the agent refreshes it with this one: see deliver_token).
        self.token_pem, self.key_pem, self.token_not_after = offer.token_pem, offer.private_key_pem, \
            offer.token_not_after
        self._new_token = False
        self._stop_request: tuple[int, str, int] | None = None
        self._stop_sent_at: float | None = None
        self._stop_deadline = 0
        self._limit_detail = ""
        self._lock = threading.Lock()
        self._waker = Waker()

    # ------------------------------------------------------------ from outside

    def request_stop(self, reason: int, detail: str, deadline_s: int) -> None:
        """Ask the job to stop (thread-safe); the job thread sends the Stop at once."""
        with self._lock:
            if self._stop_request is None or deadline_s < self._stop_request[2]:
                self._stop_request = (reason, detail, deadline_s)
            self._waker.wake()   # under the lock: never into a descriptor closed (and reused) meanwhile

    def wrapper_alive(self) -> bool:
        """The wrapper was started and has not exited (thread-safe: Popen.poll takes its own lock)."""
        process = self._process
        return process is not None and process.poll() is None

    def deliver_token(self, token_pem: bytes, key_pem: bytes, not_after: int) -> None:
        """A refreshed job token (thread-safe): the job thread passes it on to the wrapper (TokenRefresh)."""
        with self._lock:
            self.token_pem, self.key_pem, self.token_not_after = token_pem, key_pem, not_after
            self._new_token = True
            self._waker.wake()

    # ---------------------------------------------------------------- thread

    def run(self) -> None:
        try:
            outcome = self._run()
        except BaseException as exc:  # noqa: BLE001 - whatever happens, the agent gets an Outcome
            log.exception(f"job {self.offer.job_id}.{self.offer.attempt}: error in the agent while running the job")
            outcome = self._outcome(Ending.AGENT_ERROR, f"error in the agent while running the job: "
                                                        f"{type(exc).__name__}: {exc}")
        with self._lock:
            self._waker.close()
        self.on_done(self, outcome)

    def job_start(self) -> m.JobStart:
        offer = self.offer
        with self._lock:
            token = m.JobToken(certificate_pem=self.token_pem, private_key_pem=self.key_pem,
                               not_after_unix=self.token_not_after)
            self._new_token = False
        return m.JobStart(
            job_id=offer.job_id, attempt=offer.attempt, spec=offer.spec, token=token,
            broker=m.BrokerEndpoint(address=self.broker_address, ca_pem=self.ca_pem),
            sandbox_dir=self.sandbox_inside, software_dir=self.software_inside, limits=self.limits,
            deadline_unix=self.deadline_unix, broker_heartbeat_s=offer.broker_heartbeat_s,
            liveness_from_agent=offer.liveness_from_pilot)

    def _run(self) -> Outcome:
        offer = self.offer
        job_start = self.job_start()
        problem = self._too_large(job_start)
        if problem:
            return self._outcome(Ending.JOB_UNUSABLE, problem)
        cgroup = CgroupLimit.create(self.cgroup_parent, f"job-{offer.job_id}-{offer.attempt}",
                                    self.limits.memory_mb) if self.limits.memory_mb else None
        try:
            try:
                process, channel = self.spawn_wrapper()
            except OSError as exc:
                return self._outcome(Ending.INFRASTRUCTURE, f"cannot start the wrapper: {exc}")
            self._process = process
            if cgroup is not None:
                cgroup.add(process.pid)
            try:
                return self._converse(process, channel, cgroup, job_start)
            finally:
                channel.close()
                self._kill(process)
        finally:
            if cgroup is not None:
                cgroup.remove()

    def _too_large(self, job_start: m.JobStart) -> str:
        """Why JOB_START cannot cross the pipe (larger than the frame cap), or ''."""
        size = job_start.ByteSize()
        frame = len(m.ENVELOPE_KEYS["job_start"]) + len(encode_varint(size)) + size
        if frame <= self.max_frame_bytes:
            return ""
        spec = self.offer.spec
        largest = max([("an argument", len(a.encode())) for a in spec.arguments] +
                      [(f"environment variable {k[:40]!r}", len(k.encode()) + len(v.encode()))
                       for k, v in spec.environment.items()] + [("the executable", len(spec.executable.encode()))],
                      key=lambda item: item[1])
        return (f"the job's description with its token takes {frame} bytes, over the pipe's frame cap of "
                f"{self.max_frame_bytes} bytes (largest part: {largest[0]}, {largest[1]} bytes); fix: pass large "
                "data in an input file, not in arguments or the environment")

    def _converse(self, process, channel, cgroup, job_start: m.JobStart) -> Outcome:
        try:
            channel.send(m.make_hello(self.agent_id, f"splitpilot {__version__}"))
            channel.send(job_start, timeout=30)
            channel.expect(m.Ready, timeout=self.settings.ready_timeout_s)
        except PipeTimeout:
            return self._outcome(Ending.INFRASTRUCTURE, "the wrapper did not start in time "
                                 f"({self.settings.ready_timeout_s:g} s): container runtime or image problem")
        except ProtocolError as exc:
            return self._outcome(Ending.WRAPPER_FAILED, f"wrapper start-up failed: {exc}")
        next_check = time.monotonic() + self.settings.monitor_interval_s
        while True:
            self._send_pending(channel)
            now = time.monotonic()
            wait = next_check - now
            if self._stop_sent_at is not None:
                left = self._stop_sent_at + self._stop_deadline - now
                if left <= 0:
                    self._kill(process)
                    return self._stopped_outcome(None, f"no Result within the Stop deadline ({self._stop_deadline} s)")
                wait = min(wait, left)
            try:
                event = channel.receive(timeout=max(0.0, wait), wake_fd=self._waker.read_fd)
            except PipeTimeout:
                event = None
            except ProtocolError as exc:
                self._kill(process)
                if self._stop_sent_at is not None:
                    return self._stopped_outcome(None, f"wrapper ended after Stop: {exc}")
                return self._outcome(Ending.WRAPPER_FAILED, f"wrapper ended without a result: {exc}")
            if event is WOKEN:
                self._waker.clear()
            elif event is ConnectionClosed:
                return self._outcome(Ending.WRAPPER_FAILED, "wrapper closed the pipe without a result")
            elif isinstance(event, m.Result):
                return self._after_result(event)
            elif isinstance(event, m.Error):
                return self._after_error(event)
            elif isinstance(event, m.StateChange):
                name_of(m.JobState, event.state, sender="the wrapper")   # an unknown state: said once, kept
                self.state = event.state
            elif isinstance(event, m.Heartbeat):
                self.last_heartbeat = event
            elif isinstance(event, m.LogChunk):
                name_of(m.LogStream, event.stream, sender="the wrapper")
            if time.monotonic() >= next_check:
                self._check_limits(process, cgroup)
                next_check = time.monotonic() + self.settings.monitor_interval_s

    # ---------------------------------------------------------------- limits

    def _check_limits(self, process, cgroup) -> None:
        host = tree_usage(process.pid)
        reported = self.last_heartbeat.rss_bytes if self.last_heartbeat else 0
        rss = max(host.rss_bytes, reported)  # a container's processes may not be our descendants
        self.peak_rss = max(self.peak_rss, rss)
        limits = self.limits
        problem = ""
        if cgroup is not None and cgroup.oom_killed():
            problem = f"memory limit {limits.memory_mb} MiB reached (cgroup OOM kill)"
        elif limits.memory_mb and rss > limits.memory_mb * 1024 * 1024:
            problem = f"memory {rss // (1024 * 1024)} MiB exceeds the limit of {limits.memory_mb} MiB"
        elif limits.walltime_s and time.monotonic() - self.started_at > limits.walltime_s:
            problem = f"walltime limit of {limits.walltime_s} s exceeded"
        elif limits.disk_mb:
            used = directory_bytes(self.sandbox_host)
            if used > limits.disk_mb * 1024 * 1024:
                problem = f"sandbox disk {used // (1024 * 1024)} MiB exceeds the limit of {limits.disk_mb} MiB"
        if problem and not self._limit_detail:
            self._limit_detail = problem
            self.request_stop(m.StopReason.STOP_REASON_LIMIT_EXCEEDED, problem, self.settings.limit_stop_deadline_s)

    def _send_pending(self, channel) -> None:
        """Send what other threads asked for: a Stop (or a shorter deadline), a refreshed token."""
        with self._lock:
            request = self._stop_request
            token = None
            if self._new_token and channel.conn.our_state in (State.JOB, State.STOPPING):
                token = m.JobToken(certificate_pem=self.token_pem, private_key_pem=self.key_pem,
                                   not_after_unix=self.token_not_after)
                self._new_token = False
        try:
            if token is not None:
                channel.send(m.TokenRefresh(token=token), timeout=5)
            if request is not None:
                reason, detail, deadline = request
                if self._stop_sent_at is None or deadline < self._stop_deadline:
                    # cast: protoc's .pyi types an enum field by its own int subclass; the policy's
                    # STOP_* numbers are the wire values.
                    channel.send(m.Stop(reason=cast(m.StopReason, reason), detail=detail, deadline_s=deadline),
                                 timeout=5)
        except ProtocolError:
            pass  # it is going away (the next receive says how); a Stop's deadline below still applies
        if request is not None and (self._stop_sent_at is None or request[2] < self._stop_deadline):
            if self._stop_sent_at is None:
                self._stop_sent_at = time.monotonic()
            self._stop_deadline = request[2]

    # --------------------------------------------------------------- endings

    def _after_result(self, result: m.Result) -> Outcome:
        failure, state = result.failure_class, result.final_state
        failure_name = name_of(F, failure, sender="the wrapper")
        state_name = name_of(m.JobState, state, sender="the wrapper")
        if not known(F, failure) or not known(m.JobState, state) or failure == F.FAILURE_CLASS_UNSPECIFIED:
            # A newer wrapper's ending: re-queued if the broker still holds the attempt, never charged.
            return self._outcome(Ending.UNKNOWN_RESULT, f"the wrapper ended with {state_name} / {failure_name}, "
                                 f"unknown to this agent: {result.message}", result)
        if failure == F.FAILURE_CLASS_FENCED:
            return self._outcome(Ending.FENCED, result.message, result)
        if failure == F.FAILURE_CLASS_STOPPED:
            return self._stopped_outcome(result, result.message)
        if failure == F.FAILURE_CLASS_LIMIT:
            return self._outcome(Ending.LIMIT, self._limit_detail or result.message, result)
        if failure in (F.FAILURE_CLASS_WRAPPER, F.FAILURE_CLASS_INFRASTRUCTURE) and \
                state == m.JobState.JOB_STATE_FAILED_WRAPPER:
            ending = Ending.WRAPPER_FAILED if failure == F.FAILURE_CLASS_WRAPPER else Ending.INFRASTRUCTURE
            return self._outcome(ending, result.message, result)
        return self._outcome(Ending.REPORTED, result.message, result)

    def _after_error(self, error: m.Error) -> Outcome:
        code = name_of(m.ErrorCode, error.code, sender="the wrapper")
        if not known(m.ErrorCode, error.code):
            return self._outcome(Ending.UNKNOWN_RESULT, f"wrapper error {code} (unknown to this agent): "
                                                        f"{error.message}")
        return self._outcome(Ending.WRAPPER_FAILED, f"wrapper error {code}: {error.message}")

    def _stopped_outcome(self, result: m.Result | None, detail: str) -> Outcome:
        if self._limit_detail:
            return self._outcome(Ending.LIMIT, self._limit_detail, result)
        return self._outcome(Ending.STOPPED, detail, result)

    def _outcome(self, ending: Ending, detail: str, result: m.Result | None = None) -> Outcome:
        return Outcome(self.offer.job_id, self.offer.attempt, ending, detail, result)

    @staticmethod
    def _kill(process) -> None:
        if process.poll() is not None:
            return
        for pid in reversed(tree_usage(process.pid).pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            process.wait(timeout=30)
        except Exception:  # noqa: BLE001, S110 - a process that will not die is reported by the OS
            pass
