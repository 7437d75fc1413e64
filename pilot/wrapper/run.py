"""The job wrapper: one job, its token, the payload, and the pipe to the agent.

Phases, each reported to the agent (StateChange) and the broker:
STARTED (sandbox, inputs) -> RUNNING (payload) -> SAVING (outputs, logs) ->
final state, then Result on the pipe. The wrapper holds the job token in
memory only (on disk, 0600 inside the sandbox, only if the job asks) and
never the agent's token; it is non-dumpable from its first line (see
pilot.wrapper.cli), so its payload cannot read that memory. Stop notices,
token refreshes, pings and the agent's disappearance are handled while the
payload runs. When the payload's main process ends, every other process it
left is killed before SAVING starts, and outputs are opened from the
sandbox's descriptor and uploaded from the descriptor opened
(pilot.wrapper.outputs): nothing of the payload is left to swap a file
between the check and the upload.

Who is to blame (the Result's failure class) decides whether the job is
re-queued and whether the node is charged:

- the job's own mistakes (an executable that is neither an input nor on the
  PATH, a bad environment, arguments too large for exec, a missing or
  corrupt input) are input failures: final, the message names the cause;
- a broker that cannot be reached is never a final state: transfers and
  state reports are retried with backoff up to the job token's end (the
  agent refreshes the token; pilot.wrapper.broker_link.retry);
- a broker that refuses this attempt (FAILED_PRECONDITION: another attempt
  holds the job, or it ended there) stops the payload within seconds,
  nothing is saved, and the Result says FENCED (STOPPED to an agent of
  protocol minor 0): the agent reports nothing;
- a Stop for an exceeded limit ends as FAILED_LIMIT / LIMIT (minor 1; STOPPED
  before), any other Stop as STOPPED: the agent reports those;
- a full disk on the node: an input that cannot be written, or a payload that
  failed while the sandbox's file system was full although the job stayed
  within its disk limit, is the node's fault (INFRASTRUCTURE, re-queued); a
  job over its disk limit is a LIMIT.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import time
from dataclasses import dataclass
from typing import TypeVar

from pilot import __version__
from pilot.pipe import messages as m
from pilot.pipe.channel import WOKEN, PipeChannel, PipeTimeout
from pilot.pipe.enums import name_of
from pilot.pipe.errors import PeerClosed, UnsupportedVersion
from pilot.pipe.protocol import ConnectionClosed
from pilot.procstat import directory_bytes
from pilot.safefiles import write_private
from pilot.wrapper.broker_link import (
    DOUBTFUL,
    TRANSIENT,
    BrokerFactory,
    BrokerHeartbeat,
    Fenced,
    JobBroker,
    LazyBroker,
    Reporter,
    classify,
    connect_grpc,
    retry,
)
from pilot.wrapper.logs import LogTail
from pilot.wrapper.outputs import OutputRefused, find_outputs, open_output
from pilot.wrapper.payload import (
    STDERR_FILE,
    STDOUT_FILE,
    Payload,
    PayloadStartError,
    become_subreaper,
    spec_problem,
)

S = m.JobState
F = m.FailureClass
_T = TypeVar("_T")
TOKEN_FILE = ".job-token.pem"
#: Codes meaning the broker no longer accepts this job token (expired, revoked): not the job's fault.
_TOKEN_REFUSED = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED"})
#: A file system with less free space than this, under a failed payload, counts as full.
DISK_FULL_BYTES = 1 << 20


def sandbox_free_bytes(path: str) -> int | None:
    """Bytes an unprivileged writer may still use on PATH's file system (None when it cannot be asked)."""
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


MIB = 1 << 20


@dataclass(frozen=True)
class WrapperSettings:
    """Timing of the wrapper's loop."""

    tick_s: float = 1.0                 # heartbeats and log tails to the agent
    broker_heartbeat_s: float = 30.0    # heartbeats to the broker when JobStart.broker_heartbeat_s is 0
    default_stop_grace_s: float = 10.0  # SIGTERM -> SIGKILL when a Stop gives no deadline
    fenced_grace_s: float = 2.0         # SIGTERM -> SIGKILL when the broker ended the attempt
    log_chunk_limit: int = 64 * 1024
    retry_first_s: float = 0.5          # backoff of broker calls that failed transiently
    retry_max_s: float = 15.0
    retry_without_token_end_s: float = 600.0  # retry window when the token names no end


class Outcome(Exception):
    """Ends the job early with a final state (raised inside the phases).

    REPORT: whether the wrapper reports the state to the broker (False for the
    states only the agent reports: wrapper and infrastructure failures)."""

    def __init__(self, state: m.JobState, failure: m.FailureClass, message: str, *, report: bool = True) -> None:
        super().__init__(message)
        self.state, self.failure, self.message, self.report = state, failure, message, report


class Stopped(Exception):
    """The agent sent Stop, or went away, while the wrapper waited for the broker."""


#: The wrapper's lines (`wrapper: ...`): to stderr, the agent's job-N-A.wrapper.log; never to stdout, the pipe.
log = logging.getLogger("splitpilot.wrapper")


def _started(value: _T | None, what: str) -> _T:
    """VALUE, which is set as the job starts: reading it before is a wrapper bug."""
    if value is None:
        raise RuntimeError(f"wrapper bug: {what} used before the job started")
    return value


class Wrapper:
    def __init__(self, channel: PipeChannel, connect: BrokerFactory = connect_grpc,
                 settings: WrapperSettings = WrapperSettings()) -> None:
        self.channel = channel
        self.connect = connect
        self.settings = settings
        self.job: m.JobStart | None = None
        self.broker: JobBroker | None = None
        self.reporter: Reporter | None = None
        self.beat: BrokerHeartbeat | None = None
        self.payload: Payload | None = None
        self.stop: m.Stop | None = None
        self.kill_reason = ""
        self.agent_gone = False
        self.sandbox_fd = -1   # the sandbox as it was at the start, whatever is renamed later
        self._usage: tuple[float, int, int] = (0.0, 0, 0)   # cpu, rss, sandbox: what the heartbeat sends
        # The least free space seen on the sandbox's file system while the payload ran (None: never below
        # DISK_FULL_BYTES). A disk filled by someone else and freed again before the payload exits must still
        # count as the node's fault (the fault runner lost a job to a 5 s full disk that way).
        self._disk_full_free: int | None = None
        self._started = time.time()

    # The job's parts, set as it starts (None before, for run()'s cleanup); the phases read them here.
    @property
    def _job(self) -> m.JobStart:
        return _started(self.job, "the job")

    @property
    def _broker(self) -> JobBroker:
        return _started(self.broker, "the broker link")

    @property
    def _reporter(self) -> Reporter:
        return _started(self.reporter, "the reporter")

    @property
    def _payload(self) -> Payload:
        return _started(self.payload, "the payload")

    # ------------------------------------------------------------------ run

    def run(self) -> int:
        self.channel.send(m.make_ready(("log-chunks", "token-refresh", "stop"), f"splitpilot {__version__}"))
        try:
            job = self._await_job()
        except UnsupportedVersion as exc:
            self.channel.send(m.Error(code=m.ErrorCode.ERROR_CODE_VERSION, message=str(exc)))
            return 3
        if job is None:
            return 0  # probed: the agent only checked that we start
        problem = _check_job(job)
        if problem:
            self.channel.send(m.Error(code=m.ErrorCode.ERROR_CODE_BAD_JOB, message=problem))
            return 2
        self.job = job
        become_subreaper()
        self.sandbox_fd = os.open(job.sandbox_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            result = self._run_job(job)
        finally:
            if self.beat is not None:
                self.beat.stop()
            if self.reporter is not None:
                self.reporter.close()
            if self.payload is not None:
                self.payload.kill_everything()
            if self.broker is not None:
                self.broker.close()
            os.close(self.sandbox_fd)
        if not self.agent_gone:
            try:
                self.channel.send(result)
            except PeerClosed:
                pass
        return 0

    def _await_job(self) -> m.JobStart | None:
        self.channel.expect(m.Hello)
        while True:
            event = self.channel.receive()
            if event is ConnectionClosed:
                return None
            if isinstance(event, m.Ping):
                self.channel.send(m.Pong(nonce=event.nonce))
            else:
                return event

    def _run_job(self, job: m.JobStart) -> m.Result:
        try:
            self.broker = LazyBroker(self.connect, job)
            self.reporter = Reporter(self.broker, deadline=self._retry_deadline, log=log.warning,
                                     first_delay=self.settings.retry_first_s, max_delay=self.settings.retry_max_s)
            self._state(S.JOB_STATE_STARTED, f"wrapper pid {os.getpid()}, sandbox {job.sandbox_dir}")
            if not job.liveness_from_agent:
                # An older agent or broker: the job's liveness is this wrapper's own heartbeat. Otherwise the
                # agent's pilot heartbeats carry it (from our pipe heartbeats), and a kill or a fencing reaches
                # us as the agent's Stop.
                self.beat = BrokerHeartbeat(self.broker, job.broker_heartbeat_s or self.settings.broker_heartbeat_s,
                                            lambda: self._usage, log.warning)
                self.beat.start()
            problem = spec_problem(job.spec.executable, job.spec.arguments, job.spec.environment)
            if problem:
                raise Outcome(S.JOB_STATE_FAILED_INPUT, F.FAILURE_CLASS_INPUT, f"the job cannot be started: {problem}")
            self._fetch_inputs(job)
            self._expose_token(job)
            exit_status = self._run_payload(job)
            # Nothing the payload started may run on while its outputs are read (no swap after a check).
            self._payload.kill_everything()
            return self._finish(job, exit_status)
        except Outcome as outcome:
            return self._final(outcome.state, outcome.failure, outcome.message, report=outcome.report)
        except Fenced as fenced:
            return self._fenced(str(fenced))
        except Stopped:
            return self._stopped(None)
        except Exception as exc:  # noqa: BLE001 - a wrapper bug must still end in a Result
            return self._final(S.JOB_STATE_FAILED_WRAPPER, F.FAILURE_CLASS_WRAPPER,
                               f"wrapper error: {type(exc).__name__}: {exc}", report=False)

    # ------------------------------------------------------ waiting, retries

    def _retry_deadline(self) -> float:
        """Until when a broker call that fails transiently is retried: the job token's end (a refresh
        moves it), less a margin for the call itself; bounded by the job's deadline."""
        job = self._job
        end = job.token.not_after_unix - 5 if job.token.not_after_unix else \
            self._started + self.settings.retry_without_token_end_s
        if job.deadline_unix:
            end = min(end, job.deadline_unix)
        return end

    def _pause(self, seconds: float) -> None:
        """Wait SECONDS between retries while serving the agent (Stops, token refreshes, pings).

        Raises Stopped when the agent asks to stop or goes away, Fenced when the broker ended the attempt."""
        end = time.monotonic() + seconds
        while True:
            self._interrupted()
            left = end - time.monotonic()
            if left <= 0:
                return
            self._serve_agent(min(left, 0.5))

    def _interrupted(self) -> None:
        if self.stop is not None or self.agent_gone:
            raise Stopped()
        fenced = self._fencing()
        if fenced is not None:
            raise fenced

    def _fencing(self) -> Fenced | None:
        if self.beat is not None and self.beat.fenced is not None:
            return self.beat.fenced
        if self.reporter is not None and self.reporter.fenced is not None:
            return self.reporter.fenced
        return None

    def _call(self, what: str, call):
        """CALL with the broker, retried while the broker is away (see broker_link.retry)."""
        return retry(call, what, deadline=self._retry_deadline, pause=self._pause, log=log.warning,
                     first_delay=self.settings.retry_first_s, max_delay=self.settings.retry_max_s)

    def _not_the_jobs_fault(self, what: str, exc: BaseException) -> Outcome | None:
        """The Outcome for a failed transfer that is not the job's fault (broker away past the token's end,
        token refused, content the broker lost: DATA_LOSS), or None when it is (a checksum mismatch, an
        output refused)."""
        kind = classify(exc)
        code = getattr(getattr(exc, "code", None), "name", "")
        if kind in (TRANSIENT, DOUBTFUL):
            return Outcome(S.JOB_STATE_FAILED_WRAPPER, F.FAILURE_CLASS_INFRASTRUCTURE,
                           f"{what}: the broker could not be reached until the job token's end: {exc}", report=False)
        if code in _TOKEN_REFUSED:
            return Outcome(S.JOB_STATE_FAILED_WRAPPER, F.FAILURE_CLASS_INFRASTRUCTURE,
                           f"{what}: the broker refused the job token: {exc}", report=False)
        if code == "DATA_LOSS":
            # The broker lost (or holds damaged) content the job's record names: its fault, so the agent
            # ends the attempt as an infrastructure failure (re-queued while attempts remain), not FAILED_INPUT.
            return Outcome(S.JOB_STATE_FAILED_WRAPPER, F.FAILURE_CLASS_INFRASTRUCTURE,
                           f"{what}: not the job's fault: {exc}", report=False)
        return None

    # --------------------------------------------------------------- phases

    def _fetch_inputs(self, job: m.JobStart) -> None:
        for item in job.spec.input_files:
            destination = _inside(job.sandbox_dir, item.name)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            try:
                self._call(f"input {item.name!r}",
                           lambda n=item.name, d=destination: self._broker.get_input(n, d))
            except (Fenced, Stopped):
                raise
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise Outcome(S.JOB_STATE_FAILED_WRAPPER, F.FAILURE_CLASS_INFRASTRUCTURE,
                                  f"input {item.name!r} could not be written: this node's disk is full "
                                  f"({exc.strerror}); not the job's fault", report=False) from None
                raise Outcome(S.JOB_STATE_FAILED_INPUT, F.FAILURE_CLASS_INPUT,
                              f"input {item.name!r} could not be fetched: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - sorted: the job's fault or not
                raise self._not_the_jobs_fault(f"input {item.name!r}", exc) or \
                    Outcome(S.JOB_STATE_FAILED_INPUT, F.FAILURE_CLASS_INPUT,
                            f"input {item.name!r} could not be fetched: {exc}") from None

    def _expose_token(self, job: m.JobStart) -> None:
        if job.expose_token_to_payload:
            write_private(os.path.join(job.sandbox_dir, TOKEN_FILE),
                          job.token.certificate_pem + job.token.private_key_pem)

    def _run_payload(self, job: m.JobStart):
        env = dict(os.environ)
        env.update(job.spec.environment)
        env.update({"SPLITPILOT_JOB_ID": str(job.job_id), "SPLITPILOT_ATTEMPT": str(job.attempt),
                    "SPLITPILOT_SANDBOX": job.sandbox_dir, "HOME": job.sandbox_dir})
        if job.expose_token_to_payload:
            env["SPLITPILOT_JOB_TOKEN_FILE"] = os.path.join(job.sandbox_dir, TOKEN_FILE)
        try:
            self.payload = Payload([job.spec.executable, *job.spec.arguments], job.sandbox_dir, env)
        except PayloadStartError as exc:
            # The job's own mistake, found before anything ran: an input failure (legal from STARTED).
            raise Outcome(S.JOB_STATE_FAILED_INPUT, F.FAILURE_CLASS_INPUT,
                          f"the payload could not be started: {exc}") from None
        self._state(S.JOB_STATE_RUNNING, f"payload pid {self.payload.pid}")
        return self._watch(job)

    def _watch(self, job: m.JobStart):
        payload = self._payload
        tails = [LogTail(payload.stdout_path, m.LogStream.LOG_STREAM_STDOUT, self.settings.log_chunk_limit),
                 LogTail(payload.stderr_path, m.LogStream.LOG_STREAM_STDERR, self.settings.log_chunk_limit)]
        next_tick = time.monotonic()
        while payload.poll() is None:
            now = time.monotonic()
            if now >= next_tick:
                self._tick(job, tails)
                next_tick = now + self.settings.tick_s
            # The payload's exit wakes us at once (its pidfd); the 50 ms bound is for the flags other threads set.
            self._serve_agent(min(0.05, max(0.0, next_tick - time.monotonic())), wake_fd=payload.exit_fd)
            if self.beat is not None and self.beat.killed and not self.kill_reason:
                self.kill_reason = "killed at the broker (by its owner or an administrator)"
            if self._fencing() is not None:
                return payload.terminate(self.settings.fenced_grace_s)
            if self.stop is not None or self.kill_reason or self.agent_gone:
                grace = self.settings.default_stop_grace_s
                if self.stop is not None and self.stop.deadline_s:
                    grace = max(0.5, self.stop.deadline_s / 2)  # leave half for saving
                return payload.terminate(grace)
        self._tick(job, tails)
        return payload.wait()

    def _tick(self, job: m.JobStart, tails: list[LogTail]) -> None:
        usage = self._payload.usage()
        sandbox = directory_bytes(job.sandbox_dir)
        self._usage = (usage.cpu_seconds, usage.rss_bytes, sandbox)
        free = sandbox_free_bytes(job.sandbox_dir)
        if free is not None and free < DISK_FULL_BYTES:
            self._disk_full_free = free if self._disk_full_free is None else min(free, self._disk_full_free)
        if self.agent_gone:
            return
        batch = [m.Heartbeat(payload_pid=self._payload.pid, cpu_seconds=usage.cpu_seconds, rss_bytes=usage.rss_bytes,
                             sandbox_bytes=sandbox, wall_seconds=self._payload.wall_seconds,
                             processes=usage.processes, time_unix_ms=int(time.time() * 1000))]
        try:
            self.channel.send_many(batch)
            for tail in tails:
                new = tail.read_new()
                if new is not None:
                    offset, data, skipped = new
                    self.channel.send_log_chunk(data, stream=tail.stream, offset=offset, skipped_before=skipped)
        except PeerClosed:
            self.agent_gone = True

    def _serve_agent(self, timeout: float, wake_fd: int | None = None) -> None:
        try:
            event = self.channel.receive(timeout=timeout, wake_fd=wake_fd)
        except PipeTimeout:
            return
        except PeerClosed:
            self.agent_gone = True
            return
        if event is WOKEN:
            return
        if event is ConnectionClosed:
            self.agent_gone = True
        elif isinstance(event, m.Ping):
            self.channel.send(m.Pong(nonce=event.nonce))
        elif isinstance(event, m.Stop):
            if self.stop is None or (event.deadline_s and event.deadline_s < self.stop.deadline_s):
                self.stop = event
            name_of(m.StopReason, event.reason, sender="the agent")   # an unknown reason: a generic stop, said once
        elif isinstance(event, m.TokenRefresh):
            try:
                self._broker.replace_token(event.token.certificate_pem, event.token.private_key_pem)
            except Exception as exc:  # noqa: BLE001 - keep the old token; the agent will try again
                log.warning(f"the refreshed job token could not be used: {exc}")
                return
            self._job.token.CopyFrom(event.token)
            self._expose_token(self._job)

    def _finish(self, job: m.JobStart, status) -> m.Result:
        fenced = self._fencing()
        if fenced is not None:
            return self._fenced(str(fenced), status)
        self._state(S.JOB_STATE_SAVING, f"payload {status.describe()}")
        upload_error = self._upload_outputs(job)
        if self.stop is not None or self.agent_gone:
            return self._stopped(status)
        if self.kill_reason:
            return self._final(S.JOB_STATE_KILLED, F.FAILURE_CLASS_KILLED, self.kill_reason, status=status)
        if not status.success:
            full = self._full_disk(job, status)
            if full is not None:
                return full
            return self._final(S.JOB_STATE_FAILED_EXECUTION, F.FAILURE_CLASS_PAYLOAD,
                               f"payload failed: {status.describe()}", status=status)
        if upload_error:
            return self._final(S.JOB_STATE_FAILED_OUTPUT, F.FAILURE_CLASS_OUTPUT, upload_error, status=status)
        return self._final(S.JOB_STATE_DONE, F.FAILURE_CLASS_NONE, "payload succeeded", status=status)

    def _upload_outputs(self, job: m.JobStart) -> str:
        """Upload the logs and every file matching the output patterns; '' or what went wrong.

        Each file is opened from the sandbox's descriptor and uploaded from the
        descriptor opened (see pilot.wrapper.outputs); links, FIFOs, devices,
        hard-linked files are refused by name, the others still uploaded. An
        upload that fails because the broker is away is retried; Fenced and
        Stopped end the saving."""
        names = [STDOUT_FILE, STDERR_FILE, *find_outputs(self.sandbox_fd, job.spec.output_patterns)]
        refused: list[str] = []
        for name in dict.fromkeys(names):
            try:
                fd = open_output(self.sandbox_fd, name)
            except FileNotFoundError:
                continue  # a log the payload removed
            except OutputRefused as exc:
                refused.append(str(exc))
                continue
            try:
                self._call(f"output {name!r}", lambda f=fd, n=name: self._broker.put_output_fd(f, n))
            except Stopped:
                return f"output {name!r} not uploaded: the agent stopped the job"
            except Fenced:
                raise
            except Exception as exc:  # noqa: BLE001 - the job's fault (too large...) or not
                outcome = self._not_the_jobs_fault(f"output {name!r}", exc)
                if outcome is not None:
                    raise outcome from None
                return f"output {name!r} could not be uploaded: {exc}"
            finally:
                os.close(fd)
        if refused:
            return (f"output(s) refused: {'; '.join(refused)} (outputs must be regular files of the sandbox, with "
                    "one link only; nothing else is uploaded)")
        return ""

    def _full_disk(self, job: m.JobStart, status) -> m.Result | None:
        """The Result of a payload that failed on a full sandbox file system, or None when it was not full.

        Over its disk limit, the job filled it: a LIMIT. Within it, the node offered disk it did not have:
        INFRASTRUCTURE (re-queued; the black-hole guard counts it)."""
        free = sandbox_free_bytes(job.sandbox_dir)
        if free is None or free >= DISK_FULL_BYTES:
            if self._disk_full_free is None:
                return None
            free = self._disk_full_free    # full while it ran, freed since: still the disk it failed on
        used = max(directory_bytes(job.sandbox_dir), self._usage[2])
        limit = job.limits.disk_mb
        if limit and used > limit * MIB:
            message = (f"payload {status.describe()} after filling its sandbox: {used // MIB} MiB, over its disk "
                       f"limit of {limit} MiB")
            if self._peer_knows(S.JOB_STATE_FAILED_LIMIT, F.FAILURE_CLASS_LIMIT):
                return self._final(S.JOB_STATE_FAILED_LIMIT, F.FAILURE_CLASS_LIMIT, message, status=status,
                                   report=False)
            return self._final(S.JOB_STATE_FAILED_EXECUTION, F.FAILURE_CLASS_PAYLOAD, message, status=status)
        return self._final(S.JOB_STATE_FAILED_WRAPPER, F.FAILURE_CLASS_INFRASTRUCTURE,
                           f"payload {status.describe()} while the node's disk was full ({free} bytes free; the job "
                           f"used {used // MIB} MiB{f' of its {limit} MiB' if limit else ''}): not the job's fault",
                           status=status, report=False)

    # -------------------------------------------------------------- reports

    def _state(self, state: m.JobState, detail: str) -> None:
        self._reporter.report(state, detail)
        try:
            self.channel.send(m.StateChange(state=state, detail=detail, time_unix_ms=int(time.time() * 1000)))
        except PeerClosed:
            self.agent_gone = True

    def _peer_knows(self, state: int, failure: int) -> bool:
        return self.channel.conn.peer_knows("result", (("splitpilot.job.v1.JobState", state),
                                                       ("splitpilot.pipe.v1.FailureClass", failure)))

    def _stopped(self, status) -> m.Result:
        """The Result of a Stop (or of the agent's going away): the agent reports it."""
        if self.stop is None:
            what = "agent gone"
        else:
            reason = name_of(m.StopReason, self.stop.reason, sender="the agent")
            what = f"{reason}: {self.stop.detail}" if self.stop.detail else reason
        message = f"stopped ({what})" + (f"; payload {status.describe()}" if status is not None else "")
        if self.stop is not None and self.stop.reason == m.StopReason.STOP_REASON_LIMIT_EXCEEDED and \
                self._peer_knows(S.JOB_STATE_FAILED_LIMIT, F.FAILURE_CLASS_LIMIT):
            return self._final(S.JOB_STATE_FAILED_LIMIT, F.FAILURE_CLASS_LIMIT, message, status=status, report=False)
        return self._final(S.JOB_STATE_FAILED_WRAPPER, F.FAILURE_CLASS_STOPPED, message, status=status, report=False)

    def _fenced(self, detail: str, status=None) -> m.Result:
        """The broker ended this attempt: nothing saved, nothing reported (the broker would refuse it)."""
        log.warning(f"{detail}: the payload is stopped and nothing is saved")
        message = f"this attempt was ended at the broker ({detail}); payload stopped, nothing saved"
        failure = F.FAILURE_CLASS_FENCED if self._peer_knows(S.JOB_STATE_FAILED_WRAPPER, F.FAILURE_CLASS_FENCED) \
            else F.FAILURE_CLASS_STOPPED
        return self._final(S.JOB_STATE_FAILED_WRAPPER, failure, message, status=status, report=False)

    def _await_reports(self) -> None:
        """Wait until the reporter has sent (or given up on) everything, serving the agent meanwhile: a
        broker away for a while delays the Result, it does not change it."""
        while not self._reporter.idle:
            self._serve_agent(0.2)

    def _final(self, state: m.JobState, failure: m.FailureClass, message: str, *, status=None,
               report: bool = True) -> m.Result:
        """Report the final state to the broker (unless the agent does: stops, wrapper errors, fencing) and
        build the Result."""
        exit_code = status.exit_code if status is not None else None
        if report and self.reporter is not None:
            self.reporter.report(state, message, exit_code)
            self._await_reports()
            if self.reporter.fenced is not None:
                message += f" (then {self.reporter.fenced})"
                state, failure = S.JOB_STATE_FAILED_WRAPPER, (
                    F.FAILURE_CLASS_FENCED if self._peer_knows(S.JOB_STATE_FAILED_WRAPPER, F.FAILURE_CLASS_FENCED)
                    else F.FAILURE_CLASS_STOPPED)
            elif self.reporter.error is not None:
                message += f" (the broker did not take the state report: {self.reporter.error})"
                state, failure = S.JOB_STATE_FAILED_WRAPPER, F.FAILURE_CLASS_INFRASTRUCTURE
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = m.Result(final_state=state, failure_class=failure, message=message,
                          cpu_seconds=children.ru_utime + children.ru_stime,
                          wall_seconds=self.payload.wall_seconds if self.payload else 0.0,
                          max_rss_bytes=self.payload.max_rss if self.payload else 0)
        if status is not None:
            if status.signal is not None:
                result.signal = status.signal
            else:
                result.exit_code = status.exit_code
        return result


def _inside(sandbox: str, name: str) -> str:
    path = os.path.normpath(os.path.join(sandbox, name))
    if os.path.isabs(name) or not path.startswith(os.path.normpath(sandbox) + os.sep):
        raise Outcome(S.JOB_STATE_FAILED_INPUT, F.FAILURE_CLASS_INPUT, f"input name {name!r} leaves the sandbox")
    return path


def _check_job(job: m.JobStart) -> str:
    """Why JobStart cannot be run on this node, or '' (the job's own mistakes are checked later: input failures)."""
    if not job.sandbox_dir or not os.path.isdir(job.sandbox_dir):
        return f"sandbox {job.sandbox_dir!r} does not exist"
    if not os.access(job.sandbox_dir, os.W_OK):
        return f"sandbox {job.sandbox_dir!r} is not writable"
    if job.job_id == 0 or job.attempt == 0:
        return "JobStart lacks the job id or attempt"
    return ""
