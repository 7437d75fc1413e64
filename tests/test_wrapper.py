"""The job wrapper as a real process, with a file-backed fake broker.

Each test starts `tests/fake_job_broker.py` (a real Wrapper whose broker
link is the fake), speaks the pipe protocol to it as the agent does, and
checks the frames, the broker reports, the sandbox and that nothing of the
payload survives.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pilot.pipe import messages as m
from pilot.pipe.channel import spawn_with_channel
from pilot.pipe.protocol import ConnectionClosed

S = m.JobState
F = m.FailureClass
HERE = Path(__file__).parent


class Run:
    """One wrapper process and everything it reported."""

    def __init__(self, tmp_path: Path, script: str, *, inputs: dict[str, bytes] | None = None,
                 patterns=("*.out",), expose_token=False, corrupt_input=False, log_level: str = "info") -> None:
        self.broker_dir = tmp_path / "broker"
        self.sandbox = tmp_path / "sandbox"
        self.broker_dir.mkdir()
        self.sandbox.mkdir(exist_ok=True)   # it may be a mount point (small_disk)
        (self.broker_dir / "inputs").mkdir()
        sums = {}
        for name, data in (inputs or {}).items():
            (self.broker_dir / "inputs" / name).write_bytes(data)
            sums[name] = hashlib.sha256(data + (b"x" if corrupt_input else b"")).hexdigest()
        (self.broker_dir / "inputs.json").write_text(json.dumps(sums))
        (self.broker_dir / "inputs" / "payload.sh").write_text(textwrap.dedent(script))
        sums["payload.sh"] = hashlib.sha256((self.broker_dir / "inputs" / "payload.sh").read_bytes()).hexdigest()
        (self.broker_dir / "inputs.json").write_text(json.dumps(sums))
        spec = m.JobSpec(executable="./payload.sh", arguments=["a b", "$(touch /tmp/pwned)"],
                         environment={"JOB_MODE": "test"}, output_patterns=list(patterns),
                         input_files=[m.InputFile(name=n, sha256=s) for n, s in sums.items()])
        self.job = m.JobStart(job_id=11, attempt=1, spec=spec, sandbox_dir=str(self.sandbox),
                              token=m.JobToken(certificate_pem=b"JOB-CERT", private_key_pem=b"JOB-KEY"),
                              expose_token_to_payload=expose_token)
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(HERE.parent) + os.pathsep + str(HERE)}
        self.process, self.channel = spawn_with_channel([sys.executable, str(HERE / "fake_job_broker.py"),
                                                         str(self.broker_dir), log_level], env=env,
                                                        stderr=subprocess.PIPE)
        self.events: list = []

    def start(self, hello: m.Hello | None = None) -> m.Ready:
        self.channel.send(hello or m.make_hello("test-agent"))
        self.channel.send(self.job)
        return self.channel.expect(m.Ready, timeout=30)

    def until(self, predicate, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            event = self.channel.receive(timeout=deadline - time.monotonic())
            self.events.append(event)
            if predicate(event):
                return event
        raise AssertionError(f"condition not met; events: {[type(e).__name__ for e in self.events]}")

    def result(self, timeout: float = 60) -> m.Result:
        return self.until(lambda e: isinstance(e, m.Result), timeout)

    def finish(self) -> None:
        try:
            assert self.channel.receive(timeout=30) is ConnectionClosed
            self.channel.close_write()
            self.process.wait(timeout=30)
        finally:
            self.channel.close()
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()

    def states(self) -> list[int]:
        path = self.broker_dir / "states.jsonl"
        return [json.loads(line)["state"] for line in path.read_text().splitlines()] if path.exists() else []

    def reported(self) -> list[dict]:
        return [json.loads(line) for line in (self.broker_dir / "states.jsonl").read_text().splitlines()]

    def log(self, stream: int) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, m.LogChunk) and e.stream == stream)


@pytest.fixture
def run_job(tmp_path):
    runs = []

    def make(script: str, **kwargs) -> Run:
        run = Run(tmp_path, script, **kwargs)
        runs.append(run)
        return run
    yield make
    for run in runs:
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()
        run.channel.close()


def test_successful_job(run_job):
    run = run_job("""\
        #!/bin/sh
        echo "args: $1|$2"
        echo "mode $JOB_MODE job $SPLITPILOT_JOB_ID" >&2
        cat data.txt > copy.out
        """, inputs={"data.txt": b"hello input\n"})
    ready = run.start()
    assert "stop" in ready.capabilities
    result = run.result()
    assert result.final_state == S.JOB_STATE_DONE and result.failure_class == F.FAILURE_CLASS_NONE
    assert result.WhichOneof("termination") == "exit_code" and result.exit_code == 0
    run.finish()
    changes = [e.state for e in run.events if isinstance(e, m.StateChange)]
    assert changes == [S.JOB_STATE_STARTED, S.JOB_STATE_RUNNING, S.JOB_STATE_SAVING]
    assert run.states() == [S.JOB_STATE_STARTED, S.JOB_STATE_RUNNING, S.JOB_STATE_SAVING, S.JOB_STATE_DONE]
    outputs = run.broker_dir / "outputs"
    assert (outputs / "copy.out").read_bytes() == b"hello input\n"
    # argv reached the payload verbatim, no shell interpretation of $(...)
    assert (outputs / "payload.stdout").read_bytes() == b"args: a b|$(touch /tmp/pwned)\n"
    assert (outputs / "payload.stderr").read_bytes() == b"mode test job 11\n"
    assert b"args: a b" in run.log(m.LogStream.LOG_STREAM_STDOUT)
    assert run.process.returncode == 0


def test_payload_failure_is_a_payload_failure(run_job):
    run = run_job("#!/bin/sh\necho failing >&2\nexit 3\n")
    run.start()
    result = run.result()
    assert (result.final_state, result.failure_class, result.exit_code) == (
        S.JOB_STATE_FAILED_EXECUTION, F.FAILURE_CLASS_PAYLOAD, 3)
    run.finish()
    assert run.reported()[-1] == {"state": S.JOB_STATE_FAILED_EXECUTION, "detail": "payload failed: exit code 3",
                                  "exit_code": 3}
    assert (run.broker_dir / "outputs" / "payload.stderr").read_bytes() == b"failing\n"


def test_corrupt_input_is_an_input_failure(run_job):
    run = run_job("#!/bin/sh\ntrue\n", inputs={"data.txt": b"abc"}, corrupt_input=True)
    run.start()
    result = run.result()
    assert result.final_state == S.JOB_STATE_FAILED_INPUT and result.failure_class == F.FAILURE_CLASS_INPUT
    assert "checksum mismatch" in result.message
    assert result.WhichOneof("termination") is None  # the payload never ran
    run.finish()


BIG = "x" * (1 << 20)   # one argument over Linux's 128 KiB per string: exec fails with E2BIG


@pytest.mark.parametrize("change,cause", [
    ({"executable": "no-such-program-anywhere"}, "'no-such-program-anywhere' is neither an input in the sandbox "
                                                 "nor on the PATH"),
    ({"environment": {"A=B": "1"}}, "environment variable name 'A=B' is empty or contains '=' or a NUL"),
    ({"environment": {"A\0B": "1"}}, "environment variable name 'A\\x00B' is empty or contains '='"),
    ({"environment": {"GOOD": "a\0b"}}, "the value of environment variable 'GOOD' contains a NUL character"),
    ({"arguments": ["fine", "bad\0arg"]}, "argument 2 contains a NUL character"),
    ({"arguments": [BIG]}, "Argument list too long; the job's arguments and environment exceed what one program"),
    ({"executable": "./data.txt"}, "cannot start './data.txt': Exec format error; fix: give a script a '#!' line"),
])
def test_the_jobs_own_mistakes_are_input_failures_naming_the_cause(run_job, change, cause):
    """Issue 11: a job spec no payload can start with used to end as a wrapper or infrastructure failure (the
    broker refused FAILED_EXECUTION from STARTED, the wrapper blamed the node): re-queued and charged to the
    node. Now: FAILED_INPUT from STARTED (a legal transition), final, naming the cause and the fix."""
    run = run_job("#!/bin/sh\ntouch ran.out\n", inputs={"data.txt": b"not a program\n"})
    spec = run.job.spec
    for field, value in change.items():
        if field == "environment":
            spec.environment.clear()
            spec.environment.update(value)
        elif field == "arguments":
            del spec.arguments[:]
            spec.arguments.extend(value)
        else:
            setattr(spec, field, value)
    run.start()
    result = run.result()
    run.finish()
    assert (result.final_state, result.failure_class) == (S.JOB_STATE_FAILED_INPUT, F.FAILURE_CLASS_INPUT), \
        result.message
    assert cause in result.message and "fix:" in result.message, result.message
    assert result.WhichOneof("termination") is None                     # nothing ran
    assert run.states() == [S.JOB_STATE_STARTED, S.JOB_STATE_FAILED_INPUT]  # reported, legal at the broker
    assert not (run.broker_dir / "outputs" / "ran.out").exists() and run.process.returncode == 0


# ---------------------------------------------------------------------------
# The broker away, or ending the attempt: retries within the token's life, and a fenced payload stopped


def test_a_broker_away_during_inputs_reports_and_outputs_costs_nothing(run_job):
    """Issue 11: get_input/put_output turned any error (UNAVAILABLE too) into a final FAILED_INPUT/OUTPUT and
    state reports gave up after ~3.5 s. Each call now retries with backoff within the token's life."""
    run = run_job("#!/bin/sh\ncat data.txt > copy.out\n", inputs={"data.txt": b"hello input\n"})
    run.job.token.not_after_unix = int(time.time()) + 3600
    (run.broker_dir / "unavailable.json").write_text(json.dumps({"get_input": 4, "update_state": 5,
                                                                 "put_output": 3}))
    run.start()
    result = run.result()
    run.finish()
    assert (result.final_state, result.failure_class) == (S.JOB_STATE_DONE, F.FAILURE_CLASS_NONE), result.message
    failed = (run.broker_dir / "unavailable.log").read_text().split()
    assert sorted(set(failed)) == ["get_input", "put_output", "update_state"] and len(failed) == 12
    assert run.states() == [S.JOB_STATE_STARTED, S.JOB_STATE_RUNNING, S.JOB_STATE_SAVING, S.JOB_STATE_DONE]
    assert (run.broker_dir / "outputs" / "copy.out").read_bytes() == b"hello input\n"


def test_an_input_the_broker_lost_is_not_the_jobs_fault(run_job):
    """GetInput answered DATA_LOSS (the broker's store lost or holds damaged content): the wrapper ends the
    attempt as an infrastructure failure for the agent to report (re-queued while attempts remain), never
    FAILED_INPUT, and says whose fault it is."""
    run = run_job("#!/bin/sh\ntrue\n", inputs={"data.txt": b"x"})
    (run.broker_dir / "LOST_INPUT").write_text("")
    run.start()
    result = run.result()
    run.finish()
    assert (result.final_state, result.failure_class) == (S.JOB_STATE_FAILED_WRAPPER,
                                                          F.FAILURE_CLASS_INFRASTRUCTURE), result.message
    assert "not the job's fault" in result.message and "the broker's fault" in result.message
    assert S.JOB_STATE_FAILED_INPUT not in run.states()


def test_a_broker_away_past_the_tokens_end_is_a_requeue_never_a_final_state(run_job):
    run = run_job("#!/bin/sh\ntrue\n", inputs={"data.txt": b"x"})
    run.job.token.not_after_unix = int(time.time()) + 7        # retried until 5 s before the token's end
    (run.broker_dir / "unavailable.json").write_text(json.dumps({"get_input": 10_000}))
    run.start()
    result = run.result()
    run.finish()
    assert (result.final_state, result.failure_class) == (S.JOB_STATE_FAILED_WRAPPER,
                                                          F.FAILURE_CLASS_INFRASTRUCTURE), result.message
    assert "could not be reached until the job token's end" in result.message
    assert S.JOB_STATE_FAILED_INPUT not in run.states()                 # never the job's fault
    assert len((run.broker_dir / "unavailable.log").read_text().split()) > 1


@pytest.mark.parametrize("payload", ["keeps running", "ends at once"])
def test_an_attempt_the_broker_ended_stops_its_payload_and_saves_nothing(run_job, tmp_path, payload):
    """Issue 11: the wrapper swallowed the broker's refusal of its heartbeats and state reports, and a fenced
    attempt's payload ran on to its end beside the new attempt. The payload makes the broker refuse this
    attempt (DIR/FENCED); the refused heartbeat or SAVING report stops everything at once."""
    marker = tmp_path / "payload.pid"
    tail = "trap '' TERM\nexec sleep 300" if payload == "keeps running" else "exit 0"
    run = run_job(f"#!/bin/sh\necho $$ > {marker}\necho result > result.out\ntouch {tmp_path}/broker/FENCED\n"
                  f"{tail}\n")
    run.start()
    result = run.result(timeout=60)
    run.finish()
    assert (result.final_state, result.failure_class) == (S.JOB_STATE_FAILED_WRAPPER, F.FAILURE_CLASS_FENCED)
    assert "this attempt was ended at the broker" in result.message and "attempt 1 is over" in result.message
    assert not os.path.exists(f"/proc/{int(marker.read_text())}")       # stopped (SIGKILL after 1 s)
    assert not list((run.broker_dir / "outputs").iterdir())             # nothing saved
    assert S.JOB_STATE_SAVING not in run.states() and S.JOB_STATE_DONE not in run.states()


def test_the_broker_heartbeat_interval_comes_from_jobstart(run_job):
    """The broker says how often (JobStart.broker_heartbeat_s, from its heartbeat timeout); 0: the default
    (here 0.2 s, the test wrapper's)."""
    counts = {}
    for interval in (0, 1):
        run = run_job("#!/bin/sh\nsleep 3.5\n")
        run.job.broker_heartbeat_s = interval
        run.start()
        assert run.result().final_state == S.JOB_STATE_DONE
        run.finish()
        counts[interval] = len((run.broker_dir / "heartbeats").read_text().splitlines())
        for leftover in run.broker_dir.parent.iterdir():
            if leftover.name in ("broker", "sandbox"):
                subprocess.run(["rm", "-rf", str(leftover)], check=True)
    assert 2 <= counts[1] <= 4 and counts[0] >= 10, counts


@pytest.mark.parametrize("minor", [0, 1])
def test_a_limit_stop_ends_as_a_limit_for_an_agent_that_knows_it(run_job, minor):
    """FAILED_LIMIT / FAILURE_CLASS_LIMIT came with minor 1: an agent of minor 0 gets STOPPED instead (it
    then reports the limit itself, as it always did)."""
    run = run_job("#!/bin/sh\nexec sleep 300\n")
    run.start(m.Hello(protocol_major=1, protocol_minor=minor, agent_id="agent"))
    run.until(lambda e: isinstance(e, m.StateChange) and e.state == S.JOB_STATE_RUNNING)
    run.channel.send(m.Stop(reason=m.StopReason.STOP_REASON_LIMIT_EXCEEDED, detail="memory 900 MiB exceeds the "
                            "limit of 500 MiB", deadline_s=4))
    result = run.result()
    run.finish()
    expected = {0: (S.JOB_STATE_FAILED_WRAPPER, F.FAILURE_CLASS_STOPPED),
                1: (S.JOB_STATE_FAILED_LIMIT, F.FAILURE_CLASS_LIMIT)}[minor]
    assert (result.final_state, result.failure_class) == expected
    assert "STOP_REASON_LIMIT_EXCEEDED: memory 900 MiB exceeds" in result.message
    assert run.states() == [S.JOB_STATE_STARTED, S.JOB_STATE_RUNNING, S.JOB_STATE_SAVING]   # the agent reports


def test_an_agent_of_minor_0_gets_stopped_for_a_fenced_attempt(run_job, tmp_path):
    run = run_job(f"#!/bin/sh\ntouch {tmp_path}/broker/FENCED\nexec sleep 300\n")
    run.start(m.Hello(protocol_major=1, protocol_minor=0, agent_id="old agent"))
    result = run.result(timeout=60)
    run.finish()
    assert (result.final_state, result.failure_class) == (S.JOB_STATE_FAILED_WRAPPER, F.FAILURE_CLASS_STOPPED)


def test_upload_failure_is_an_output_failure(run_job):
    run = run_job("#!/bin/sh\necho x > a.out\n")
    (run.broker_dir / "FAIL_UPLOAD").touch()
    run.start()
    result = run.result()
    assert result.final_state == S.JOB_STATE_FAILED_OUTPUT and result.failure_class == F.FAILURE_CLASS_OUTPUT
    run.finish()


def test_stop_terminates_even_a_stubborn_payload_and_keeps_logs(run_job):
    run = run_job("""\
        #!/bin/sh
        trap 'echo ignoring TERM' TERM
        echo partial > partial.out
        sleep 1000 &
        while true; do sleep 0.1; done
        """)
    run.start()
    run.until(lambda e: isinstance(e, m.StateChange) and e.state == S.JOB_STATE_RUNNING)
    time.sleep(0.5)
    sent = time.monotonic()
    run.channel.send(m.Stop(reason=m.StopReason.STOP_REASON_PREEMPTED, detail="glidein removed", deadline_s=4))
    result = run.result()
    assert time.monotonic() - sent < 4 + 2  # the deadline (plus saving) was honoured
    assert result.failure_class == F.FAILURE_CLASS_STOPPED and "STOP_REASON_PREEMPTED" in result.message
    assert result.signal == 9  # ignored SIGTERM, got SIGKILL
    run.finish()
    assert (run.broker_dir / "outputs" / "partial.out").read_bytes() == b"partial\n"
    assert S.JOB_STATE_DONE not in run.states()  # the agent reports stops; the wrapper does not


def test_kill_at_the_broker_reaches_the_payload(run_job):
    run = run_job("#!/bin/sh\nsleep 1000\n")
    run.start()
    run.until(lambda e: isinstance(e, m.StateChange) and e.state == S.JOB_STATE_RUNNING)
    (run.broker_dir / "KILL").touch()
    result = run.result()
    assert result.final_state == S.JOB_STATE_KILLED and result.failure_class == F.FAILURE_CLASS_KILLED
    run.finish()
    assert run.states()[-1] == S.JOB_STATE_KILLED


def test_daemons_are_killed_and_descriptors_are_not_inherited(run_job, tmp_path):
    marker = tmp_path / "daemon.pid"
    run = run_job(f"""\
        #!/bin/sh
        ls /proc/self/fd > fds.out
        # a double-forked, setsid daemon that would outlive a naive wrapper
        setsid sh -c 'echo $$ > {marker}; exec sleep 1000' < /dev/null > /dev/null 2>&1 &
        sleep 0.5
        exec 1>&- 2>&-   # closes its stdout/stderr: must not disturb the protocol
        exit 0
        """)
    run.start()
    result = run.result()
    assert result.final_state == S.JOB_STATE_DONE
    run.finish()
    daemon = int(marker.read_text())
    time.sleep(0.2)
    assert not os.path.exists(f"/proc/{daemon}") or "Z" in Path(f"/proc/{daemon}/stat").read_text().split()[2]
    fds = (run.broker_dir / "outputs" / "fds.out").read_text().split()
    assert set(fds) <= {"0", "1", "2", "3"}  # 3: ls's own directory handle


def test_flood_of_output_does_not_reach_the_pipe(run_job):
    run = run_job("#!/bin/sh\nhead -c 1100000000 /dev/zero | tr '\\0' 'x'\necho done-marker\n")
    run.start()
    result = run.result(timeout=120)
    assert result.final_state == S.JOB_STATE_DONE
    run.finish()
    chunks = [e for e in run.events if isinstance(e, m.LogChunk)]
    assert sum(len(c.data) for c in chunks) < 10 * 1024 * 1024  # bounded tails, not 1.1 GB
    assert any(c.skipped_before for c in chunks)
    assert os.path.getsize(run.broker_dir / "outputs" / "payload.stdout") == 1_100_000_000 + len("done-marker\n")


def test_token_exposed_only_when_asked(run_job):
    script = "#!/bin/sh\nenv > env.out\ncat \"$SPLITPILOT_JOB_TOKEN_FILE\" > seen.out 2>/dev/null\ntrue\n"
    run = run_job(script, expose_token=True)
    run.start()
    assert run.result().final_state == S.JOB_STATE_DONE
    run.finish()
    token_file = run.sandbox / ".job-token.pem"
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    assert (run.broker_dir / "outputs" / "seen.out").read_bytes() == b"JOB-CERTJOB-KEY"
    assert not (run.broker_dir / "outputs" / ".job-token.pem").exists()  # never uploaded


def test_token_not_on_disk_or_in_env_by_default(run_job):
    run = run_job("#!/bin/sh\nenv > env.out\nls -a > ls.out\n")
    run.start()
    assert run.result().final_state == S.JOB_STATE_DONE
    run.finish()
    outputs = run.broker_dir / "outputs"
    assert b"JOB-KEY" not in (outputs / "env.out").read_bytes()
    assert ".job-token.pem" not in (outputs / "ls.out").read_text()


def test_a_wrapper_logging_at_debug_puts_nothing_but_frames_on_stdout(run_job):
    """The wrapper's stdout is the pipe: with every log line on (DEBUG: each frame's kind and size), a payload
    writing to its stdout and stderr, and the broker away for a while (retry warnings), the agent's side
    decodes every byte of the wrapper's stdout as frames up to a clean end (a stray byte is a protocol
    error), and the log lines, with the job token in neither, are on stderr."""
    script = "#!/bin/sh\necho payload-stdout\necho payload-stderr >&2\ncat data.txt > copy.out\n"
    run = run_job(script, inputs={"data.txt": b"hello\n"}, log_level="debug")
    run.job.token.not_after_unix = int(time.time()) + 3600
    (run.broker_dir / "unavailable.json").write_text(json.dumps({"get_input": 1}))
    run.start()
    result = run.result()
    run.finish()                     # ConnectionClosed: the stream ended on a frame boundary
    assert (result.final_state, result.failure_class) == (S.JOB_STATE_DONE, F.FAILURE_CLASS_NONE), result.message
    err = run.process.stderr.read().decode()
    assert "DEBUG pipe: wrapper received JobStart" in err and "DEBUG pipe: wrapper sends Result" in err, err
    assert "WARNING wrapper: " in err, err     # the broker's absence: a retry warning
    assert "JOB-KEY" not in err and "JOB-CERT" not in err
    assert b"payload-stdout" in run.log(m.LogStream.LOG_STREAM_STDOUT)   # the payload's output: in LogChunks only


def test_the_wrapper_command_at_debug_logs_to_stderr_only(tmp_path):
    """`python3 -m pilot.wrapper --log-level debug`, the command the agent runs at DEBUG: its stdout holds
    frames only (read here raw, to its end), its stderr the DEBUG lines."""
    from pilot.pipe.protocol import NEED_DATA, Connection, Role

    job = m.JobStart(job_id=3, attempt=1, sandbox_dir="/nonexistent/sandbox", spec=m.JobSpec(executable="/bin/true"),
                     token=m.JobToken(certificate_pem=b"JOB-CERT", private_key_pem=b"JOB-KEY"))
    agent = Connection(Role.AGENT)
    frames = b"".join(b"".join(agent.send_parts(message)) for message in (m.make_hello("a"), job))
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(HERE.parent)}
    done = subprocess.run([sys.executable, "-m", "pilot.wrapper", "--log-level", "debug"], input=frames,
                          capture_output=True, env=env, timeout=60)
    assert done.returncode == 2, done.stderr
    agent.receive_data(done.stdout)
    agent.receive_data(b"")
    received = []
    while (event := agent.next_event()) is not ConnectionClosed:
        assert event is not NEED_DATA, f"the stream ended inside a frame after {received}"
        received.append(type(event).__name__)
    assert received == ["Ready", "Error"]             # every byte a frame, then a clean end
    err = done.stderr.decode()
    assert "DEBUG pipe: wrapper received JobStart" in err and "DEBUG pipe: wrapper sends Error" in err, err
    assert "JOB-KEY" not in err and "JOB-CERT" not in err


def test_bad_job_start_gets_an_error(run_job):
    run = run_job("#!/bin/sh\n")
    run.job.sandbox_dir = "/nonexistent/sandbox"
    run.channel.send(m.make_hello("a"))
    run.channel.send(run.job)
    run.channel.expect(m.Ready, timeout=30)
    error = run.channel.expect(m.Error, timeout=30)
    assert error.code == m.ErrorCode.ERROR_CODE_BAD_JOB and "does not exist" in error.message
    run.finish()
    assert run.process.returncode == 2


def test_agent_disappearing_stops_the_payload(run_job, tmp_path):
    marker = tmp_path / "payload.pid"
    run = run_job(f"#!/bin/sh\necho $$ > {marker}\nsleep 1000\n")
    run.start()
    run.until(lambda e: isinstance(e, m.StateChange) and e.state == S.JOB_STATE_RUNNING)
    # RUNNING is reported once the payload is spawned, which may be before its shell wrote the marker.
    deadline = time.monotonic() + 30
    while not (marker.exists() and marker.read_text().strip()):
        assert time.monotonic() < deadline, "the payload never wrote its pid"
        time.sleep(0.02)
    run.channel.close()  # the agent died
    run.process.wait(timeout=30)
    pid = int(marker.read_text())
    assert not os.path.exists(f"/proc/{pid}")


# ---------------------------------------------------------------------------
# Outputs: what is uploaded is what the payload left in its sandbox, never a file it points at


def test_outputs_cannot_be_swapped_after_the_payload_exits(run_job):
    """A daemon left by the payload flips result.out and env.out between the original files and links to
    /etc/passwd and to the wrapper's /proc/self/environ, from the moment the payload's main process is gone:
    a wrapper that checks a name and then opens it again uploads whatever the link points at."""
    run = run_job("""\
        #!/bin/sh
        echo original > result.out
        echo original-env > env.out
        setsid sh -c '
            while kill -0 '$$' 2>/dev/null; do :; done
            while true; do
                echo original > keep.tmp && mv -f keep.tmp result.out
                echo original-env > keep2.tmp && mv -f keep2.tmp env.out
                ln -sfn /etc/passwd swap.tmp && mv -f swap.tmp result.out
                ln -sfn /proc/self/environ swap2.tmp && mv -f swap2.tmp env.out
            done' < /dev/null > /dev/null 2>&1 &
        exit 0
        """)
    run.start()
    result = run.result()
    run.finish()
    outputs = run.broker_dir / "outputs"
    stored = {name: (outputs / name).read_bytes() for name in ("result.out", "env.out") if (outputs / name).exists()}
    for name, data in stored.items():
        assert data == (b"original\n" if name == "result.out" else b"original-env\n"), (name, data)
    assert b"root:" not in b"".join(stored.values())
    refused = {"result.out", "env.out"} - set(stored)
    if refused:   # the daemon won the race against the kill: the link is refused, never followed
        assert result.final_state == S.JOB_STATE_FAILED_OUTPUT, result.message
        assert all(f"'{name}' is a symbolic link" in result.message for name in refused), result.message
    else:
        assert result.final_state == S.JOB_STATE_DONE, result.message
    assert not _running_in(run.sandbox)   # the daemon was killed before SAVING, not after


def _running_in(directory: Path) -> list[int]:
    """PIDs of processes whose working directory is DIRECTORY."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/cwd") == str(directory):
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_a_hard_link_to_a_file_outside_the_sandbox_is_refused(run_job, tmp_path):
    secret = tmp_path / "agent-work" / "agent-state.txt"
    secret.parent.mkdir()
    secret.write_text("agent secret\n")
    run = run_job(f"#!/bin/sh\necho fine > good.out\nln {secret} stolen.out\n")
    run.start()
    result = run.result()
    run.finish()
    assert result.final_state == S.JOB_STATE_FAILED_OUTPUT and result.failure_class == F.FAILURE_CLASS_OUTPUT
    assert "'stolen.out' has 2 hard links" in result.message, result.message
    outputs = run.broker_dir / "outputs"
    assert not (outputs / "stolen.out").exists()
    assert (outputs / "good.out").read_bytes() == b"fine\n"   # the others are still uploaded
    assert secret.read_text() == "agent secret\n"


def test_a_fifo_or_device_named_like_an_output_does_not_hang_the_wrapper(run_job):
    device = "mknod dev.out c 1 3" if os.geteuid() == 0 else "true"
    run = run_job(f"#!/bin/sh\nmkfifo fifo.out\n{device}\nmkdir sub\nln -s /etc sub/link.out\n",
                  patterns=("*.out", "**/*.out"))
    run.start()
    result = run.result(timeout=30)
    run.finish()
    assert result.final_state == S.JOB_STATE_FAILED_OUTPUT, result.message
    assert "'fifo.out' is a FIFO" in result.message
    assert "'sub/link.out' is a symbolic link" in result.message
    if os.geteuid() == 0:
        assert "'dev.out' is a character device" in result.message
    assert not [p for p in (run.broker_dir / "outputs").iterdir() if p.name.endswith(".out")]


def test_output_patterns_follow_glob_rules_without_following_links(tmp_path):
    from pilot.wrapper.outputs import find_outputs

    for name in ("a.out", ".hidden.out", "sub/b.out", "sub/deep/c.out", ".job-token.pem", "x.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "evil.out").write_text("x")
    (tmp_path / "linked").symlink_to(outside)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert find_outputs(fd, ["*.out"]) == ["a.out"]
        assert find_outputs(fd, ["**/*.out"]) == ["a.out", "sub/b.out", "sub/deep/c.out"]
        assert find_outputs(fd, ["sub/*.out"]) == ["sub/b.out"]
        assert find_outputs(fd, ["*", ".job-token*"]) == ["a.out", "linked", "x.txt"]  # never the token
        assert find_outputs(fd, ["linked/*.out", "../*", "/etc/passwd"]) == []
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# A full disk on the node is the node's fault, unless the job went over its own disk limit


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs mounted where the next Run puts its sandbox (unmounted afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root; run the tests as root")
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(sandbox)], check=True)
    try:
        yield sandbox
    finally:
        subprocess.run(["umount", "-l", str(sandbox)], check=True)


@pytest.mark.parametrize("disk_mb,expected", [
    (0, (S.JOB_STATE_FAILED_WRAPPER, F.FAILURE_CLASS_INFRASTRUCTURE, "while the node's disk was full")),
    (100, (S.JOB_STATE_FAILED_WRAPPER, F.FAILURE_CLASS_INFRASTRUCTURE, "of its 100 MiB): not the job's fault")),
    (1, (S.JOB_STATE_FAILED_LIMIT, F.FAILURE_CLASS_LIMIT, "MiB, over its disk limit of 1 MiB")),
])
def test_a_payload_failing_on_a_full_disk_is_the_nodes_fault_unless_over_its_limit(run_job, small_disk, disk_mb,
                                                                                   expected):
    run = run_job("#!/bin/sh\nhead -c 8000000 /dev/zero > big.out\n")
    run.job.limits.disk_mb = disk_mb
    run.start()
    result = run.result()
    run.finish()
    assert (result.final_state, result.failure_class) == expected[:2], result.message
    assert expected[2] in result.message and result.exit_code != 0
    assert S.JOB_STATE_FAILED_EXECUTION not in run.states()       # never reported as the payload's failure


def test_a_disk_full_while_the_payload_ran_and_freed_before_it_failed_is_still_the_nodes_fault(run_job, small_disk,
                                                                                               tmp_path):
    """The fault runner lost a job this way: the node's disk was full for 5 s, the payload failed on it, and
    by the time it exited there was room again, so the failure was charged to the job (final)."""
    go = tmp_path / "go"
    run = run_job(f"""\
        #!/bin/sh
        head -c 8000000 /dev/zero > big.out 2>/dev/null
        while [ ! -e {go} ]; do sleep 0.05; done
        rm -f big.out
        exit 1
        """)
    run.job.limits.disk_mb = 100
    run.start()
    # The wrapper looked at the disk while it was full: its heartbeat carries the filled sandbox.
    run.until(lambda e: isinstance(e, m.Heartbeat) and e.sandbox_bytes >= 3 * (1 << 20))
    go.touch()
    result = run.result()
    run.finish()
    assert (result.final_state, result.failure_class) == (S.JOB_STATE_FAILED_WRAPPER,
                                                          F.FAILURE_CLASS_INFRASTRUCTURE), result.message
    assert "while the node's disk was full" in result.message and "not the job's fault" in result.message
    assert os.statvfs(small_disk).f_bavail > 0        # freed: the judgement came from what was seen meanwhile


def test_an_input_that_does_not_fit_the_nodes_disk_is_not_the_jobs_fault(run_job, small_disk):
    run = run_job("#!/bin/sh\ntrue\n", inputs={"big.dat": b"x" * (6 << 20)})
    run.start()
    result = run.result()
    run.finish()
    assert (result.final_state, result.failure_class) == (S.JOB_STATE_FAILED_WRAPPER,
                                                          F.FAILURE_CLASS_INFRASTRUCTURE), result.message
    assert "this node's disk is full" in result.message and S.JOB_STATE_FAILED_INPUT not in run.states()


def test_the_payloads_exit_wakes_the_wrapper_through_its_pidfd(tmp_path):
    """The wrapper's loop waits on the payload's pidfd (with the pipe) instead of finding its exit at the next
    50 ms poll: the descriptor is readable once the payload exits, and closed once the exit is collected."""
    import select

    from pilot.wrapper.payload import Payload

    payload = Payload(["/bin/sh", "-c", "while [ ! -e go ]; do sleep 0.05; done; exit 3"], str(tmp_path),
                      {"PATH": os.defpath})
    fd = payload.exit_fd
    assert fd is not None, "no pidfd: os.pidfd_open needs Linux >= 5.3"
    assert select.select([fd], [], [], 0.2)[0] == []          # still running: not readable
    (tmp_path / "go").touch()
    assert select.select([fd], [], [], 60)[0] == [fd]         # readable at its exit, before anyone polled
    assert payload.poll().exit_code == 3 and payload.exit_fd is None
