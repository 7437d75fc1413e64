"""One job on the agent's side: start its wrapper, feed it, watch it, end it.

Each JobRun is a thread holding the job's pipe. It sends Hello and JobStart
(with the job token and the key made on this node), reads the wrapper's
frames, samples the wrapper's process tree and sandbox every few seconds,
and enforces the job's limits: memory (cgroup memory.max where delegated,
else a watchdog), walltime and disk. On a stop request (slot end, SIGTERM
from HTCondor, a kill from the broker) it sends Stop with a deadline, waits,
then kills. Its Outcome tells the agent what to report: a wrapper that ends
without a Result is a wrapper failure, never the payload's.
"""

from __future__ import annotations

import enum
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass

from pilot import __version__
from pilot.agent.brokerlink import Offer
from pilot.agent.limits import CgroupLimit
from pilot.pipe import messages as m
from pilot.pipe.channel import PipeTimeout
from pilot.pipe.errors import ProtocolError
from pilot.pipe.protocol import ConnectionClosed
from pilot.procstat import directory_bytes, tree_usage

F = m.FailureClass


class Ending(enum.Enum):
    """How a job ended, from the agent's point of view."""

    REPORTED = "reported by the wrapper"       # the wrapper told the broker itself
    STOPPED = "stopped"                        # re-queue (slot end, preemption, agent shutdown)
    LIMIT = "limit exceeded"                   # killed by the agent: final KILLED
    WRAPPER_FAILED = "wrapper failed"          # no Result, protocol error, wrapper error: re-queue
    INFRASTRUCTURE = "infrastructure failed"   # the runtime or node: re-queue


@dataclass(frozen=True)
class Outcome:
    job_id: int
    attempt: int
    ending: Ending
    detail: str
    result: m.Result | None = None

    @property
    def counts_as_node_failure(self) -> bool:
        """For the black-hole guard."""
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
                 cgroup_parent: str | None = None) -> None:
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
        self.started_at = time.monotonic()
        self.state = m.JobState.JOB_STATE_ASSIGNED
        self.last_heartbeat: m.Heartbeat | None = None
        self.peak_rss = 0
        self._stop_request: tuple[int, str, int] | None = None
        self._stop_sent_at: float | None = None
        self._stop_deadline = 0
        self._limit_detail = ""
        self._lock = threading.Lock()

    # ------------------------------------------------------------ from outside

    def request_stop(self, reason: int, detail: str, deadline_s: int) -> None:
        """Ask the job to stop (thread-safe); the job thread sends the Stop."""
        with self._lock:
            if self._stop_request is None or deadline_s < self._stop_request[2]:
                self._stop_request = (reason, detail, deadline_s)

    # ---------------------------------------------------------------- thread

    def run(self) -> None:
        outcome = self._run()
        self.on_done(self, outcome)

    def _run(self) -> Outcome:
        offer = self.offer
        cgroup = CgroupLimit.create(self.cgroup_parent, f"job-{offer.job_id}-{offer.attempt}",
                                    self.limits.memory_mb) if self.limits.memory_mb else None
        try:
            process, channel = self.spawn_wrapper()
        except OSError as exc:
            return self._outcome(Ending.INFRASTRUCTURE, f"cannot start the wrapper: {exc}")
        if cgroup is not None:
            cgroup.add(process.pid)
        try:
            return self._converse(process, channel, cgroup)
        finally:
            channel.close()
            self._kill(process)
            if cgroup is not None:
                cgroup.remove()
            shutil.rmtree(os.path.dirname(self.sandbox_host), ignore_errors=True)

    def _converse(self, process, channel, cgroup) -> Outcome:
        offer = self.offer
        try:
            channel.send(m.make_hello(self.agent_id, f"splitpilot {__version__}"))
            channel.send(m.JobStart(
                job_id=offer.job_id, attempt=offer.attempt, spec=offer.spec,
                token=m.JobToken(certificate_pem=offer.token_pem, private_key_pem=offer.private_key_pem,
                                 not_after_unix=offer.token_not_after),
                broker=m.BrokerEndpoint(address=self.broker_address, ca_pem=self.ca_pem),
                sandbox_dir=self.sandbox_inside, software_dir=self.software_inside, limits=self.limits,
                deadline_unix=self.deadline_unix), timeout=30)
            channel.expect(m.Ready, timeout=self.settings.ready_timeout_s)
        except PipeTimeout:
            return self._outcome(Ending.INFRASTRUCTURE, "the wrapper did not start in time "
                                 f"({self.settings.ready_timeout_s:g} s): container runtime or image problem")
        except ProtocolError as exc:
            return self._outcome(Ending.WRAPPER_FAILED, f"wrapper start-up failed: {exc}")
        next_check = time.monotonic() + self.settings.monitor_interval_s
        while True:
            self._maybe_send_stop(channel)
            if self._stop_sent_at is not None and time.monotonic() > self._stop_sent_at + self._stop_deadline:
                self._kill(process)
                return self._stopped_outcome(None, f"no Result within the Stop deadline ({self._stop_deadline} s)")
            try:
                event = channel.receive(timeout=max(0.05, next_check - time.monotonic()))
            except PipeTimeout:
                event = None
            except ProtocolError as exc:
                self._kill(process)
                if self._stop_sent_at is not None:
                    return self._stopped_outcome(None, f"wrapper ended after Stop: {exc}")
                return self._outcome(Ending.WRAPPER_FAILED, f"wrapper ended without a result: {exc}")
            if event is ConnectionClosed:
                return self._outcome(Ending.WRAPPER_FAILED, "wrapper closed the pipe without a result")
            if isinstance(event, m.Result):
                return self._after_result(event)
            if isinstance(event, m.Error):
                return self._outcome(Ending.WRAPPER_FAILED, f"wrapper error {m.ErrorCode.Name(event.code)}: "
                                     f"{event.message}")
            if isinstance(event, m.StateChange):
                self.state = event.state
            elif isinstance(event, m.Heartbeat):
                self.last_heartbeat = event
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

    def _maybe_send_stop(self, channel) -> None:
        with self._lock:
            request = self._stop_request
        if request is None:
            return
        reason, detail, deadline = request
        if self._stop_sent_at is None or deadline < self._stop_deadline:
            try:
                channel.send(m.Stop(reason=reason, detail=detail, deadline_s=deadline), timeout=5)
            except ProtocolError:
                pass  # it is going away anyway: the deadline below still applies
            if self._stop_sent_at is None:
                self._stop_sent_at = time.monotonic()
            self._stop_deadline = deadline

    # --------------------------------------------------------------- endings

    def _after_result(self, result: m.Result) -> Outcome:
        if result.failure_class == F.FAILURE_CLASS_STOPPED:
            return self._stopped_outcome(result, result.message)
        if result.failure_class in (F.FAILURE_CLASS_WRAPPER, F.FAILURE_CLASS_INFRASTRUCTURE) and \
                result.final_state == m.JobState.JOB_STATE_FAILED_WRAPPER:
            ending = Ending.WRAPPER_FAILED if result.failure_class == F.FAILURE_CLASS_WRAPPER else Ending.INFRASTRUCTURE
            return self._outcome(ending, result.message, result)
        return self._outcome(Ending.REPORTED, result.message, result)

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
