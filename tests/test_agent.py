"""The agent's loop with a fake broker and real wrapper processes.

The wrapper processes are real (`tests/fake_job_broker.py`: the Wrapper with
a file-backed broker link), so every job really runs: partitioning, limits,
stops, failures and the black-hole guard are exercised end to end on the
agent's side. The broker-facing calls are recorded by FakeAgentBroker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pilot.agent.agent import Agent, AgentSettings, job_limits, sandbox_for
from pilot.agent.brokerlink import NoOffer, Offer
from pilot.agent.jobrun import JobRun, RunSettings
from pilot.agent.slot import SlotResources
from pilot.pipe import messages as m
from pilot.pipe.channel import spawn_with_channel

HERE = Path(__file__).parent


class FakeAgentBroker:
    address = "127.0.0.1:1"
    ca_pem = b"CA"

    def __init__(self, specs: list[m.JobSpec]) -> None:
        self.queue = list(specs)
        self.matched: list[tuple[int, int]] = []
        self.slots = []
        self.failures: list[tuple[int, int, int, str]] = []
        self.ends: list[tuple[int, str]] = []
        self.unusable: list[tuple[bytes, str]] = []
        self.refreshed: list[bytes] = []
        self.token_life = 3600
        self._lock = threading.Lock()
        self._next = 100

    def match(self, slot, pilot_id, node):
        with self._lock:
            self.slots.append(slot)
            for index, spec in enumerate(self.queue):
                req = spec.requirements
                if max(1, req.cores) <= slot.cores and req.memory_mb <= slot.memory_mb:
                    self.queue.pop(index)
                    self._next += 1
                    self.matched.append((self._next, 1))
                    return Offer(self._next, 1, spec, b"CERT", b"KEY", int(time.time()) + self.token_life)
        return NoOffer("queue empty", 0.2)

    def pilot_heartbeat(self, pilot_id, node, running, cores_in_use, usage=None):
        return [], False

    def report_pilot_end(self, pilot_id, node, jobs_run, reason):
        self.ends.append((jobs_run, reason))

    def report_attempt_failure(self, job_id, attempt, failure, detail, pilot_id):
        self.failures.append((job_id, attempt, failure, detail))

    def report_job_unusable(self, token_pem, private_key_pem, detail):
        self.unusable.append((token_pem, detail))

    def refresh_job_token(self, token_pem, private_key_pem):
        from pilot.agent.brokerlink import RefreshedToken

        self.refreshed.append(token_pem)
        return RefreshedToken(token_pem + b"+", private_key_pem + b"+", int(time.time()) + 3600)

    def close(self):
        pass


def script_spec(script: str, tmp: Path, *, cores=1, memory_mb=500, name="job") -> m.JobSpec:
    inputs = tmp / "broker" / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    path = inputs / f"{name}.sh"
    path.write_text(script)
    sums_file = tmp / "broker" / "inputs.json"
    sums = json.loads(sums_file.read_text()) if sums_file.exists() else {}
    sums[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    sums_file.write_text(json.dumps(sums))
    return m.JobSpec(executable=f"./{path.name}", name=name, input_files=[m.InputFile(name=path.name)],
                     requirements=m.Requirements(cores=cores, memory_mb=memory_mb, disk_mb=100, walltime_s=600))


def make_agent(tmp: Path, broker, *, cores=2, memory_mb=2000, lifetime=600, idle=1.5, wrapper=None,
               black_hole=3, monitor=0.3, isolation="", one_job_at_a_time=False, software=None,
               kill_leftovers=None, started=None):
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    slot = SlotResources(cores, memory_mb, 10_000, time.time() + lifetime, "test")
    settings = AgentSettings(work_dir=str(work), idle_timeout_s=idle, min_backoff_s=0.1, max_backoff_s=0.3,
                             min_job_time_s=5, black_hole_failures=black_hole,
                             run=RunSettings(monitor_interval_s=monitor, ready_timeout_s=30, stop_deadline_s=3,
                                             limit_stop_deadline_s=2),
                             isolation=isolation, one_job_at_a_time=one_job_at_a_time)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": f"{HERE.parent}{os.pathsep}{HERE}"}
    argv = wrapper or [sys.executable, str(HERE / "fake_job_broker.py"), str(tmp / "broker")]

    def make_run(offer, on_done):
        sandbox = sandbox_for(str(work), offer)
        if started is not None:
            started.append(f"start {offer.job_id}")
        return JobRun(offer, spawn_wrapper=lambda: spawn_with_channel(argv, env=env, stderr=subprocess.DEVNULL),
                      sandbox_host=sandbox, sandbox_inside=sandbox, software_inside="", broker_address="x",
                      ca_pem=b"CA", agent_id=settings.pilot_id, limits=job_limits(offer.spec),
                      deadline_unix=0, settings=settings.run, on_done=on_done)
    return Agent(broker, slot, settings, make_run, containers=False, software=software,
                 kill_leftovers=kill_leftovers)


def states(tmp: Path) -> list[int]:
    path = tmp / "broker" / "states.jsonl"
    return [json.loads(line)["state"] for line in path.read_text().splitlines()] if path.exists() else []


def test_runs_jobs_concurrently_then_leaves_idle(tmp_path):
    specs = [script_spec("#!/bin/sh\nsleep 1\n", tmp_path, name=f"j{i}") for i in range(4)]
    broker = FakeAgentBroker(specs)
    agent = make_agent(tmp_path, broker, cores=2)
    assert agent.run() == 0
    assert len(broker.matched) == 4 and broker.queue == []
    assert broker.ends == [(4, "idle")]
    assert states(tmp_path).count(m.JobState.JOB_STATE_DONE) == 4
    # Partitioning: with 2 cores, never more than 2 one-core jobs at once.
    assert min(s.cores for s in broker.slots) >= 0 and max(s.cores for s in broker.slots) == 2
    assert all(s.cores > 0 for s in broker.slots)  # it does not ask when nothing is free
    assert not os.listdir(tmp_path / "work")  # sandboxes removed


def test_empty_pilot_leaves_and_says_so(tmp_path):
    broker = FakeAgentBroker([])
    agent = make_agent(tmp_path, broker, idle=0.5)
    assert agent.run() == 0
    assert broker.ends == [(0, "idle: no job matched (empty pilot)")]


def test_shutdown_stops_jobs_with_a_deadline_and_reports_them(tmp_path):
    broker = FakeAgentBroker([script_spec("#!/bin/sh\ntrap '' TERM\nsleep 1000\n", tmp_path)])
    agent = make_agent(tmp_path, broker, idle=30)
    thread = threading.Thread(target=agent.run)
    thread.start()
    deadline = time.monotonic() + 30
    while m.JobState.JOB_STATE_RUNNING not in states(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    agent.request_shutdown("test: SIGTERM from HTCondor", m.StopReason.STOP_REASON_PREEMPTED)
    thread.join(timeout=60)
    assert not thread.is_alive()
    (job_id, attempt, failure, detail), = broker.failures
    assert failure == 3 and "STOP_REASON_PREEMPTED" in detail  # STOPPED: the broker re-queues it
    assert broker.ends[0][1].startswith("test: SIGTERM")


def test_memory_hog_is_killed_with_the_reason(tmp_path):
    hog = ("#!/bin/sh\nexec python3 -c 'import time; x = bytearray(400 << 20); "
           "x[::4096] = b\"x\" * len(x[::4096]); time.sleep(100)'\n")
    broker = FakeAgentBroker([script_spec(hog, tmp_path, memory_mb=100)])
    agent = make_agent(tmp_path, broker, idle=0.5)
    agent.run()
    (job_id, attempt, failure, detail), = broker.failures
    assert failure == 4 and "exceeds the limit of 100 MiB" in detail


def test_wrapper_crashes_trip_the_black_hole_guard(tmp_path):
    specs = [script_spec("#!/bin/sh\ntrue\n", tmp_path, name=f"j{i}") for i in range(5)]
    broker = FakeAgentBroker(specs)
    crashing = [sys.executable, "-c", "import os; os._exit(1)"]
    agent = make_agent(tmp_path, broker, cores=1, wrapper=crashing, black_hole=2, idle=30)
    assert agent.run() == 3
    assert [f[2] for f in broker.failures] == [1, 1]  # WRAPPER: re-queued, never blamed on the payload
    assert len(broker.matched) == 2 and len(broker.queue) == 3  # stopped taking work
    assert broker.ends[0][1].startswith("black hole")


def test_no_match_when_time_left_cannot_fit_a_job(tmp_path):
    broker = FakeAgentBroker([script_spec("#!/bin/sh\ntrue\n", tmp_path)])
    agent = make_agent(tmp_path, broker, lifetime=7, idle=30)  # 7 s - 3 s stop deadline < 5 s minimum
    assert agent.run() == 0
    assert broker.matched == [] and broker.ends[0][1] in ("too little time left for any job",
                                                         "the slot's lifetime ends")


# ---------------------------------------------------------------------------
# A refused agent token: told apart from a broker that is down, and the agent leaves (exit 4)

class RefusingBroker(FakeAgentBroker):
    """Refuses the token on the first REFUSALS match calls (all of them with None), then behaves."""

    def __init__(self, specs, refusals=None):
        super().__init__(specs)
        self.refusals = refusals
        self.calls = 0

    def match(self, slot, pilot_id, node):
        from pilot.agent.refusal import AgentTokenRefused

        self.calls += 1
        if self.refusals is None or self.calls <= self.refusals:
            raise AgentTokenRefused("TLS handshake: test")
        return super().match(slot, pilot_id, node)


def test_refused_token_ends_the_agent_with_exit_4_reporting_nothing(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="splitpilot")
    broker = RefusingBroker([])
    agent = make_agent(tmp_path, broker, idle=60)    # without the refusal rule it would sit for 60 s
    assert agent.run() == 4
    assert broker.calls == agent.settings.refusals_to_leave == 3
    assert broker.ends == [] and broker.failures == []   # nothing reported with a refused token
    err = caplog.text
    assert "the broker refused this agent token (TLS handshake: test); fix:" in err and "exit code 4" in err
    assert ("splitpilot.agent", logging.ERROR) in {(r.name, r.levelno) for r in caplog.records
                                                   if "exit code 4" in r.getMessage()}


def test_a_transient_refusal_does_not_end_the_pilot(tmp_path):
    broker = RefusingBroker([script_spec("#!/bin/sh\ntrue\n", tmp_path)], refusals=2)
    # The idle timeout well above the two refusals' backoffs (0.2 s + 0.3 s): at 0.5 s it raced them.
    agent = make_agent(tmp_path, broker, idle=3)
    assert agent.run() == 0
    assert len(broker.matched) == 1 and broker.ends == [(1, "idle")]
    assert states(tmp_path).count(m.JobState.JOB_STATE_DONE) == 1


def test_refusal_while_a_job_runs_stops_it_and_reports_nothing(tmp_path):
    class RefuseAfterFirst(RefusingBroker):
        def match(self, slot, pilot_id, node):
            from pilot.agent.refusal import AgentTokenRefused

            if self.matched:
                self.calls += 1
                raise AgentTokenRefused("PERMISSION_DENIED: test")
            return FakeAgentBroker.match(self, slot, pilot_id, node)

    broker = RefuseAfterFirst([script_spec("#!/bin/sh\nsleep 1000\n", tmp_path)])
    agent = make_agent(tmp_path, broker, cores=2, idle=60)
    assert agent.run() == 4
    assert len(broker.matched) == 1 and broker.calls >= 3
    assert broker.failures == [] and broker.ends == []
    assert m.JobState.JOB_STATE_RUNNING in states(tmp_path)


class FakeError(Exception):
    """Shaped like pilot.api.client.BrokerError: a grpc.StatusCode and details."""

    def __init__(self, code, details):
        super().__init__(details)
        self.code, self.details = code, details


#: What grpcio 1.85 reports for a token from another CA, verified against the CA of its own chain.
FOREIGN_CA_DETAILS = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:32445: Tls handshake "
                      "failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
                      "CERTIFICATE_VERIFY_FAILED: self signed certificate in certificate chain: OK")


def test_refusal_classification():
    import grpc

    from pilot.agent.refusal import refusal_of

    probed = []

    def probe(answer):
        def run():
            probed.append(answer)
            return answer
        return run

    code = grpc.StatusCode
    refused = refusal_of(FakeError(code.PERMISSION_DENIED, "an user token cannot do this"), probe(None))
    assert refused.exit_code == 4 and "PERMISSION_DENIED: an user token" in str(refused) and "fix:" in str(refused)
    assert refusal_of(FakeError(code.UNAUTHENTICATED, "expired"), probe(None)).exit_code == 4
    foreign = refusal_of(FakeError(code.UNAVAILABLE, FOREIGN_CA_DETAILS), probe(None))
    assert "self signed certificate in certificate chain" in foreign.cause and "different CAs" in foreign.cause
    assert probed == []                                                   # the details were enough
    alert = refusal_of(FakeError(code.UNAVAILABLE, "Tls handshake failed: SSL routines:OPENSSL_internal:"
                                                   "TLSV1_ALERT_UNKNOWN_CA"), probe(None))
    assert "TLSV1_ALERT_UNKNOWN_CA" in alert.cause
    # "Socket closed": only the probe can tell a refused certificate from a dropped connection.
    closed = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed"
    assert refusal_of(FakeError(code.UNAVAILABLE, closed), probe("closed after the handshake")).cause == \
        "closed after the handshake"
    down = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Failed to connect to "
            "remote host: Connection refused")
    assert refusal_of(FakeError(code.UNAVAILABLE, down), probe(None)) is None
    assert refusal_of(FakeError(code.DEADLINE_EXCEEDED, "Deadline Exceeded"), probe("x")) is None
    assert refusal_of(FakeError(code.NOT_FOUND, "no such job"), probe("x")) is None
    assert refusal_of(FakeError(code.INTERNAL, "boom"), probe("x")) is None
    assert probed == ["closed after the handshake", None]                 # UNAVAILABLE only


def test_real_broker_refusals_are_told_from_a_broker_down(tmp_path):
    """A real broker (mTLS): the errors the agent gets for each credential problem, and for a broker down."""
    import datetime

    from broker.ca import CertificateAuthority
    from broker.server import BrokerConfig, BrokerServer
    from pilot.agent.brokerlink import GrpcAgentBroker, SlotRequest
    from pilot.agent.refusal import AgentTokenRefused
    from pilot.api.client import BrokerError
    from pilot.tokens import TokenRole

    slot = SlotRequest(1, 100, 100, 1000)
    server = BrokerServer(BrokerConfig(state_dir=str(tmp_path / "broker"), listen="127.0.0.1:0"))
    server.start()
    ca = server.ca
    foreign = CertificateAuthority.create()
    agent_token = ca.new_token(TokenRole.AGENT, "good", site="S", queue="default")
    cases = {
        # The glidein's way: the CA is the last certificate of the token's chain (here the foreign one).
        "foreign CA": (foreign.new_token(TokenRole.AGENT, "f", site="S", queue="default"), None),
        # The broker's CA given (--ca-cert), the token from another: the broker closes after the handshake.
        "foreign token, broker's CA": (foreign.new_token(TokenRole.AGENT, "g", site="S", queue="default"),
                                       server.ca_pem),
        "expired": (ca.new_token(TokenRole.AGENT, "e", site="S", queue="default",
                                 ttl=datetime.timedelta(seconds=1)), None),
        "user token": (ca.new_token(TokenRole.USER, "u"), None),
    }
    time.sleep(1.5)   # the expired one
    try:
        with_good = GrpcAgentBroker(server.address, agent_token)
        assert not isinstance(with_good.match(slot, "p", "n"), Offer)    # accepted: no job waiting
        assert with_good.probe() is None
        with_good.close()
        causes = {}
        for name, (token, ca_pem) in cases.items():
            broker = GrpcAgentBroker(server.address, token, ca_pem)
            try:
                with pytest.raises(AgentTokenRefused) as info:
                    broker.match(slot, "p", "n")
            finally:
                broker.close()
            assert info.value.exit_code == 4 and "fix:" in str(info.value)
            causes[name] = info.value.cause
        print("\n".join(f"{name}: {cause}" for name, cause in causes.items()))
        assert "cannot verify the broker's certificate" in causes["foreign CA"]
        assert "different CAs" in causes["foreign CA"]
        assert "closed the connection" in causes["foreign token, broker's CA"]
        assert "closed the connection" in causes["expired"]
        assert causes["user token"].startswith("PERMISSION_DENIED")
    finally:
        server.stop()
    # The broker down: an ordinary error (the agent backs off), not a refusal.
    broker = GrpcAgentBroker(server.address, agent_token)
    try:
        with pytest.raises(BrokerError) as info:
            broker.match(slot, "p", "n")
        assert not isinstance(info.value, AgentTokenRefused) and info.value.code.name == "UNAVAILABLE"
        assert broker.probe() is None
    finally:
        broker.close()


def test_cli_refuses_expired_and_wrong_role_tokens_with_their_codes(tmp_path):
    import datetime

    from broker.ca import CertificateAuthority
    from pilot.tokens import TokenRole

    ca = CertificateAuthority.create()
    tokens = {5: ca.new_token(TokenRole.AGENT, "e", site="S", queue="default", ttl=datetime.timedelta(seconds=1)),
              4: ca.new_token(TokenRole.USER, "u")}
    time.sleep(1.5)
    for code, token in tokens.items():
        path = tmp_path / f"token-{code}.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(token.to_pem())
        (tmp_path / "software").mkdir(exist_ok=True)
        result = subprocess.run([sys.executable, "-m", "pilot", "agent", "--broker", "127.0.0.1:1", "--token",
                                 str(path), "--work-dir", str(tmp_path / "work"), "--software-dir",
                                 str(tmp_path / "software")], capture_output=True, text=True, timeout=60,
                                cwd=HERE.parent)
        assert result.returncode == code, result.stderr
        assert "fix:" in result.stderr and not path.exists()
        if code == 5:
            assert "the agent token has expired (valid until" in result.stderr
        else:
            assert "the broker refused this agent token (a user token" in result.stderr


# ---------------------------------------------------------------------------
# Without isolation: one job at a time; a changed software area: no wrapper, exit 6


def test_without_isolation_the_whole_slot_goes_to_one_job_at_a_time(tmp_path):
    specs = [script_spec("#!/bin/sh\nsleep 0.5\n", tmp_path, name=f"j{i}") for i in range(3)]
    broker = FakeAgentBroker(specs)
    events: list[str] = []

    def kill_leftovers():
        events.append("leftovers")
        return 0
    agent = make_agent(tmp_path, broker, cores=2, isolation="none", one_job_at_a_time=True,
                       kill_leftovers=kill_leftovers, started=events)
    assert agent.run() == 0
    assert len(broker.matched) == 3 and states(tmp_path).count(m.JobState.JOB_STATE_DONE) == 3
    # Each job's leftovers are dealt with before the next job may start: never two at once.
    assert events == [e for job_id, _ in broker.matched for e in (f"start {job_id}", "leftovers")], events
    assert all(slot.cores == 2 and slot.isolation == "none" for slot in broker.slots)  # the whole slot, said so
    assert not os.listdir(tmp_path / "work")


def test_with_isolation_jobs_share_the_slot_and_say_how_they_are_isolated(tmp_path):
    specs = [script_spec("#!/bin/sh\nsleep 1\n", tmp_path, name=f"j{i}") for i in range(2)]
    broker = FakeAgentBroker(specs)
    agent = make_agent(tmp_path, broker, cores=2, isolation="namespace")
    assert agent.run() == 0
    assert any(slot.cores == 1 for slot in broker.slots)     # the second job was offered what the first left
    assert {slot.isolation for slot in broker.slots} == {"namespace"}


def test_a_changed_software_area_stops_the_agent_before_the_next_wrapper(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="splitpilot")
    from pilot.launch.manifest import SoftwareGuard, write_manifest

    area = tmp_path / "sw"
    (area / "lib").mkdir(parents=True)
    (area / "lib" / "run.py").write_text("print('the wrapper')\n")
    write_manifest(area)
    guard = SoftwareGuard.verify(area)
    patch = script_spec(f"#!/bin/sh\necho 'steal()' >> {area}/lib/run.py\n", tmp_path, name="patch")
    victim = script_spec("#!/bin/sh\necho victim ran > victim.out\n", tmp_path, name="victim")
    broker = FakeAgentBroker([patch, victim])
    agent = make_agent(tmp_path, broker, cores=1, idle=30, software=guard, isolation="none",
                       one_job_at_a_time=True, kill_leftovers=lambda: 0)
    assert agent.run() == 6
    (first, _), (second, _) = broker.matched
    assert states(tmp_path).count(m.JobState.JOB_STATE_DONE) == 1           # only the patching job ran
    assert not (tmp_path / "broker" / "outputs" / "victim.out").exists()
    (job_id, attempt, failure, detail), = broker.failures
    assert (job_id, attempt, failure) == (second, 1, 2)                     # INFRASTRUCTURE: re-queued
    assert detail.startswith("not started: the software area changed on this node (lib/run.py was modified")
    (jobs_run, reason), = broker.ends
    assert jobs_run == 1 and reason.startswith("software area changed: lib/run.py was modified")
    err = caplog.text
    assert f"job {second}.1 not started" in err and "(exit code 6)" in err


@pytest.mark.parametrize("runtime,policy,expected", [
    ("process", "require", ["# isolation: none", "#   other jobs:    NOT isolated",
                            "#   software area: WRITABLE by the payload",
                            "# jobs run one at a time (nothing separates them)"]),
    ("bubblewrap", "off", ["# isolation: namespace", "#   the agent:     separated: not visible",
                           "#   network:       NOT isolated: the host's network",
                           "#   capabilities:  none: every set emptied", "# jobs share the slot"]),
])
def test_dry_run_states_what_is_and_is_not_isolated(tmp_path, runtime, policy, expected):
    from pilot.launch import build_software_area

    software = build_software_area(tmp_path / "sw")
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('[job]\nname = "probe"\nexecutable = "/bin/true"\n[job.requirements]\ncores = 1\n'
                    'memory_mb = 100\nwalltime = "1m"\n')
    result = subprocess.run([sys.executable, "-m", "pilot", "agent", "--dry-run", str(jobs), "--work-dir",
                             str(tmp_path / "work"), "--software-dir", str(software), "--runtimes", runtime,
                             "--container-policy", policy], capture_output=True, text=True, timeout=120,
                            cwd=HERE.parent)
    assert result.returncode == 0, result.stderr
    for line in expected:
        assert line in result.stdout, result.stdout
    assert "# job 1 (probe)" in result.stdout


# ---------------------------------------------------------------------------
# Issue 11: every run ends with an outcome; what is not the node's fault is never counted


def test_a_job_whose_jobstart_cannot_cross_the_pipe_is_the_jobs_own_failure(tmp_path):
    """A 5 MiB argument: the JobStart is over the pipe's 4 MiB frame cap. The old agent failed to send it and
    called it a wrapper failure (re-queued, counted: two such jobs made a fresh pilot a black hole)."""
    huge = [script_spec("#!/bin/sh\ntrue\n", tmp_path, name=f"huge{i}") for i in range(2)]
    for spec in huge:
        spec.arguments.append("x" * (5 << 20))
    good = script_spec("#!/bin/sh\ntrue\n", tmp_path, name="good")
    broker = FakeAgentBroker([*huge, good])
    agent = make_agent(tmp_path, broker, cores=1, black_hole=1, idle=0.5)
    assert agent.run() == 0
    assert broker.failures == [] and len(broker.unusable) == 2
    for token, detail in broker.unusable:
        assert token == b"CERT"                                    # with the job's own token
        assert "over the pipe's frame cap of 4194304 bytes (largest part: an argument, 5242880 bytes)" in detail
        assert "fix: pass large data in an input file" in detail
    assert states(tmp_path).count(m.JobState.JOB_STATE_DONE) == 1 and broker.ends == [(3, "idle")]
    assert not os.listdir(tmp_path / "work")


def test_an_error_in_the_agents_own_code_ends_the_run_and_is_never_charged(tmp_path):
    """Whatever raises inside a JobRun (here: its wrapper start raises a non-OSError) ends it with an Outcome:
    reported as ATTEMPT_FAILURE_AGENT (re-queued), not counted by the black-hole guard; the slot is freed."""
    specs = [script_spec("#!/bin/sh\ntrue\n", tmp_path, name=f"j{i}") for i in range(3)]
    broker = FakeAgentBroker(specs)
    agent = make_agent(tmp_path, broker, cores=1, black_hole=1, idle=0.5)
    original, calls = agent.make_run, []

    def flaky(offer, on_done):
        calls.append(offer.job_id)
        if len(calls) == 2:
            raise KeyError("a bug while preparing the run")
        run = original(offer, on_done)
        if len(calls) == 1:
            def broken():
                raise RuntimeError("a bug inside the run")
            run.spawn_wrapper = broken
        return run
    agent.make_run = flaky
    assert agent.run() == 0
    assert [(f[0], f[2]) for f in broker.failures] == [(calls[0], 5), (calls[1], 5)]
    assert "RuntimeError: a bug inside the run" in broker.failures[0][3]
    assert "KeyError" in broker.failures[1][3]
    assert states(tmp_path).count(m.JobState.JOB_STATE_DONE) == 1 and broker.ends == [(3, "idle")]
    assert not os.listdir(tmp_path / "work")


def test_a_job_outliving_its_token_gets_a_fresh_one_over_the_pipe(tmp_path):
    broker = FakeAgentBroker([script_spec("#!/bin/sh\nsleep 4\n", tmp_path)])
    broker.token_life = 3                                       # refreshed after 2 s
    agent = make_agent(tmp_path, broker, cores=1, idle=0.5)
    assert agent.run() == 0
    assert broker.refreshed[:1] == [b"CERT"]                     # refreshed with the job's current token
    assert states(tmp_path).count(m.JobState.JOB_STATE_DONE) == 1
    delivered = (tmp_path / "broker" / "token-refreshes").read_bytes().split(b"\n")
    assert delivered[0] == b"CERT+"                              # the wrapper switched to the new token


def test_the_walltime_limit_ends_the_job_as_a_limit(tmp_path):
    spec = script_spec("#!/bin/sh\nexec sleep 300\n", tmp_path)
    spec.requirements.walltime_s = 1
    broker = FakeAgentBroker([spec])
    agent = make_agent(tmp_path, broker, idle=0.5)
    assert agent.run() == 0
    (job_id, attempt, failure, detail), = broker.failures
    assert failure == 4 and detail == "walltime limit of 1 s exceeded"   # LIMIT: final, not KILLED


def test_leftovers_are_killed_before_the_sandbox_goes_and_before_the_report(tmp_path):
    """Without isolation, a wrapper that died leaves its payload running (own session, re-parented to the
    agent): it must be dead before its folder is removed and before the broker hears of the attempt (which
    may then give the job to another pilot)."""
    broker = FakeAgentBroker([script_spec("#!/bin/sh\ntrue\n", tmp_path)])
    events = []
    broker.report_attempt_failure = lambda job_id, *rest: events.append("report")
    crashing = [sys.executable, "-c", "import os; os._exit(1)"]

    def kill_leftovers():
        (folder,) = os.listdir(tmp_path / "work")
        events.append(f"leftovers killed, {folder} still there")
        return 0
    agent = make_agent(tmp_path, broker, cores=1, wrapper=crashing, idle=0.5, isolation="none",
                       one_job_at_a_time=True, kill_leftovers=kill_leftovers)
    assert agent.run() == 0
    assert events == [f"leftovers killed, job-{broker.matched[0][0]}-1 still there", "report"]
    assert not os.listdir(tmp_path / "work")


def test_stale_job_folders_are_removed_without_following_links(tmp_path):
    from pilot.agent.agent import remove_stale_job_folders

    work, outside = tmp_path / "work", tmp_path / "outside"
    (work / "job-12-1" / "sandbox" / "deep").mkdir(parents=True)
    (work / "job-12-1" / "sandbox" / "deep" / "f").write_text("x")
    os.chmod(work / "job-12-1" / "sandbox" / "deep", 0o500)
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    (work / "job-13-2").symlink_to(outside)
    (work / "job-14-1" / "sandbox").mkdir(parents=True)
    (work / "job-14-1" / "sandbox" / "link").symlink_to(outside)
    for keep in ("software", "job-x-1", "job-1-2-3", "jobs"):
        (work / keep).mkdir()
    (work / "job-12-1.wrapper.log").write_text("kept for diagnosis")
    # An agent killed during its runtime self-test leaves its probe folder (found by the fault runner).
    (work / "probe-cv6b9dd5" / "x").mkdir(parents=True)
    (work / "probe-link0001").symlink_to(outside)
    for keep in ("probe-", "probe-toolongname", "probes"):
        (work / keep).mkdir()
    assert remove_stale_job_folders(str(work)) == ["job-12-1", "job-13-2", "job-14-1", "probe-cv6b9dd5",
                                                   "probe-link0001"]
    assert sorted(os.listdir(work)) == ["job-1-2-3", "job-12-1.wrapper.log", "job-x-1", "jobs", "probe-",
                                        "probe-toolongname", "probes", "software"]
    assert (outside / "precious").read_text() == "keep me"


def test_two_agents_never_share_a_work_dir(tmp_path):
    from pilot.agent.cli import lock_work_dir
    from pilot.errors import UsageError

    fd = lock_work_dir(str(tmp_path))
    try:
        probe = subprocess.run([sys.executable, "-c", "import sys; from pilot.agent.cli import lock_work_dir\n"
                                "try:\n    lock_work_dir(sys.argv[1])\nexcept Exception as e:\n    print(e)\n",
                                str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=HERE.parent)
        assert "is in use by another agent; fix: give each agent its own --work-dir" in probe.stdout, probe
    finally:
        os.close(fd)
    assert UsageError   # the refusal's type (exit code 2)
