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
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

from pilot import __version__
from pilot.pipe import messages as m
from pilot.pipe.channel import PipeChannel, PipeTimeout
from pilot.pipe.errors import PeerClosed
from pilot.pipe.protocol import ConnectionClosed
from pilot.procstat import directory_bytes
from pilot.safefiles import write_private
from pilot.wrapper.broker_link import BrokerFactory, JobBroker, LazyBroker, Reporter, connect_grpc
from pilot.wrapper.logs import LogTail
from pilot.wrapper.outputs import OutputRefused, find_outputs, open_output
from pilot.wrapper.payload import STDERR_FILE, STDOUT_FILE, Payload, PayloadStartError, become_subreaper

S = m.JobState
F = m.FailureClass
TOKEN_FILE = ".job-token.pem"


@dataclass(frozen=True)
class WrapperSettings:
    """Timing of the wrapper's loop."""

    tick_s: float = 1.0                 # heartbeats and log tails to the agent
    broker_heartbeat_s: float = 30.0    # heartbeats to the broker
    default_stop_grace_s: float = 10.0  # SIGTERM -> SIGKILL when a Stop gives no deadline
    log_chunk_limit: int = 64 * 1024


class Outcome(Exception):
    """Ends the job early with a final state (raised inside the phases)."""

    def __init__(self, state: int, failure: int, message: str) -> None:
        super().__init__(message)
        self.state, self.failure, self.message = state, failure, message


class Wrapper:
    def __init__(self, channel: PipeChannel, connect: BrokerFactory = connect_grpc,
                 settings: WrapperSettings = WrapperSettings()) -> None:
        self.channel = channel
        self.connect = connect
        self.settings = settings
        self.job: m.JobStart | None = None
        self.broker: JobBroker | None = None
        self.reporter: Reporter | None = None
        self.payload: Payload | None = None
        self.stop: m.Stop | None = None
        self.kill_reason = ""
        self.agent_gone = False
        self.sandbox_fd = -1   # the sandbox as it was at the start, whatever is renamed later

    # ------------------------------------------------------------------ run

    def run(self) -> int:
        self.channel.send(m.make_ready(("log-chunks", "token-refresh", "stop"), f"splitpilot {__version__}"))
        job = self._await_job()
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
            self.reporter = Reporter(self.broker)
            self._state(S.JOB_STATE_STARTED, f"wrapper pid {os.getpid()}, sandbox {job.sandbox_dir}")
            self._fetch_inputs(job)
            self._expose_token(job)
            exit_status = self._run_payload(job)
            # Nothing the payload started may run on while its outputs are read (no swap after a check).
            self.payload.kill_everything()
            return self._finish(job, exit_status)
        except Outcome as outcome:
            return self._final(outcome.state, outcome.failure, outcome.message)
        except Exception as exc:  # noqa: BLE001 - a wrapper bug must still end in a Result
            return self._final(S.JOB_STATE_FAILED_WRAPPER, F.FAILURE_CLASS_WRAPPER,
                               f"wrapper error: {type(exc).__name__}: {exc}", report=False)

    # --------------------------------------------------------------- phases

    def _fetch_inputs(self, job: m.JobStart) -> None:
        for item in job.spec.input_files:
            destination = _inside(job.sandbox_dir, item.name)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            try:
                self.broker.get_input(item.name, destination)
            except Exception as exc:  # noqa: BLE001 - any failure here is an input failure
                raise Outcome(S.JOB_STATE_FAILED_INPUT, F.FAILURE_CLASS_INPUT,
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
            raise Outcome(S.JOB_STATE_FAILED_EXECUTION, F.FAILURE_CLASS_PAYLOAD, str(exc)) from None
        self._state(S.JOB_STATE_RUNNING, f"payload pid {self.payload.pid}")
        return self._watch(job)

    def _watch(self, job: m.JobStart):
        payload = self.payload
        tails = [LogTail(payload.stdout_path, m.LogStream.LOG_STREAM_STDOUT, self.settings.log_chunk_limit),
                 LogTail(payload.stderr_path, m.LogStream.LOG_STREAM_STDERR, self.settings.log_chunk_limit)]
        next_tick = time.monotonic()
        next_broker = time.monotonic() + self.settings.broker_heartbeat_s
        while payload.poll() is None:
            now = time.monotonic()
            if now >= next_tick:
                self._tick(job, tails, broker=now >= next_broker)
                next_tick = now + self.settings.tick_s
                if now >= next_broker:
                    next_broker = now + self.settings.broker_heartbeat_s
            self._serve_agent(min(0.05, max(0.0, next_tick - time.monotonic())))
            if self.stop is not None or self.kill_reason or self.agent_gone:
                grace = self.settings.default_stop_grace_s
                if self.stop is not None and self.stop.deadline_s:
                    grace = max(0.5, self.stop.deadline_s / 2)  # leave half for saving
                return payload.terminate(grace)
        self._tick(job, tails, broker=False)
        return payload.wait()

    def _tick(self, job: m.JobStart, tails: list[LogTail], *, broker: bool) -> None:
        usage = self.payload.usage()
        sandbox = directory_bytes(job.sandbox_dir)
        if self.agent_gone:
            return
        batch = [m.Heartbeat(payload_pid=self.payload.pid, cpu_seconds=usage.cpu_seconds, rss_bytes=usage.rss_bytes,
                             sandbox_bytes=sandbox, wall_seconds=self.payload.wall_seconds,
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
            return
        if broker:
            try:
                if self.broker.heartbeat(usage.cpu_seconds, usage.rss_bytes, sandbox):
                    self.kill_reason = "killed at the broker (by its owner or an administrator)"
            except Exception:  # noqa: BLE001, S110 - a missed heartbeat is retried next time
                pass

    def _serve_agent(self, timeout: float) -> None:
        try:
            event = self.channel.receive(timeout=timeout)
        except PipeTimeout:
            return
        except PeerClosed:
            self.agent_gone = True
            return
        if event is ConnectionClosed:
            self.agent_gone = True
        elif isinstance(event, m.Ping):
            self.channel.send(m.Pong(nonce=event.nonce))
        elif isinstance(event, m.Stop):
            self.stop = event
        elif isinstance(event, m.TokenRefresh):
            self.broker.replace_token(event.token.certificate_pem, event.token.private_key_pem)
            self.job.token.CopyFrom(event.token)
            self._expose_token(self.job)

    def _finish(self, job: m.JobStart, status) -> m.Result:
        self._state(S.JOB_STATE_SAVING, f"payload {status.describe()}")
        upload_error = self._upload_outputs(job)
        if self.stop is not None or self.agent_gone:
            reason = m.StopReason.Name(self.stop.reason) if self.stop else "agent gone"
            detail = f": {self.stop.detail}" if self.stop and self.stop.detail else ""
            return self._final(S.JOB_STATE_FAILED_WRAPPER, F.FAILURE_CLASS_STOPPED,
                               f"stopped ({reason}{detail}); payload {status.describe()}", status=status, report=False)
        if self.kill_reason:
            return self._final(S.JOB_STATE_KILLED, F.FAILURE_CLASS_KILLED, self.kill_reason, status=status)
        if not status.success:
            return self._final(S.JOB_STATE_FAILED_EXECUTION, F.FAILURE_CLASS_PAYLOAD,
                               f"payload failed: {status.describe()}", status=status)
        if upload_error:
            return self._final(S.JOB_STATE_FAILED_OUTPUT, F.FAILURE_CLASS_OUTPUT, upload_error, status=status)
        return self._final(S.JOB_STATE_DONE, F.FAILURE_CLASS_NONE, "payload succeeded", status=status)

    def _upload_outputs(self, job: m.JobStart) -> str:
        """Upload the logs and every file matching the output patterns; '' or what went wrong.

        Each file is opened from the sandbox's descriptor and uploaded from the
        descriptor opened (see pilot.wrapper.outputs); links, FIFOs, devices,
        hard-linked files are refused by name, the others still uploaded."""
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
                self.broker.put_output_fd(fd, name)
            except Exception as exc:  # noqa: BLE001 - reported as an output failure
                return f"output {name!r} could not be uploaded: {exc}"
            finally:
                os.close(fd)
        if refused:
            return (f"output(s) refused: {'; '.join(refused)} (outputs must be regular files of the sandbox, with "
                    "one link only; nothing else is uploaded)")
        return ""

    # -------------------------------------------------------------- reports

    def _state(self, state: int, detail: str) -> None:
        self.reporter.report(state, detail)
        try:
            self.channel.send(m.StateChange(state=state, detail=detail, time_unix_ms=int(time.time() * 1000)))
        except PeerClosed:
            self.agent_gone = True

    def _final(self, state: int, failure: int, message: str, *, status=None, report: bool = True) -> m.Result:
        """Report the final state to the broker (unless the agent does: stops,
        wrapper errors) and build the Result."""
        exit_code = status.exit_code if status is not None else None
        if report and self.reporter is not None:
            self.reporter.report(state, message, exit_code)
        if self.reporter is not None:
            error = self.reporter.flush()
            if error is not None and report:
                message += f" (the broker did not take the state report: {error})"
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
    """Why JobStart cannot be run, or ''."""
    if not job.sandbox_dir or not os.path.isdir(job.sandbox_dir):
        return f"sandbox {job.sandbox_dir!r} does not exist"
    if not os.access(job.sandbox_dir, os.W_OK):
        return f"sandbox {job.sandbox_dir!r} is not writable"
    if not job.spec.executable:
        return "the job names no executable"
    if job.job_id == 0 or job.attempt == 0:
        return "JobStart lacks the job id or attempt"
    return ""
