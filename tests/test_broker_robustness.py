"""The broker against careless users, hostile jobs and odd agents (issue 11, broker side), on a real
BrokerServer over mutual TLS, on SQLite and on a private PostgreSQL. Each refusal is checked for its
status code, its words (the field and the fix), and that nothing changed (rows, states, attempts).

  - a job no node could run is refused at submit, naming the field (never accepted, failed on a node,
    retried and charged to it), and a refused submission leaves no row behind;
  - limit overruns end FAILED_LIMIT, not KILLED; the agent's own failures are not charged to the job;
    an AttemptFailure or job state this broker does not know is handled as documented;
  - wrappers heartbeat at the interval the broker's timeout allows, and a timeout they cannot meet is
    refused;
  - why a job waits: per site, what no pilot offered; a job no site ever could run is flagged at submit;
  - a database that goes away is UNAVAILABLE (retry), never INTERNAL.
"""

from __future__ import annotations

import datetime
from types import SimpleNamespace

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pg import pg_server, pg_url  # noqa: F401  (fixtures: a private PostgreSQL server)

from broker.ca import CertificateAuthority
from broker.server import BrokerConfig, BrokerServer
from broker.services.base import heartbeat_interval
from broker.specs import MAX_ARG_BYTES
from broker.store.base import StoreSettings
from pilot.api.client import AdminClient, AgentClient, BrokerClient, BrokerUnavailable, InvalidRequest, MatchedJob
from pilot.api.states import JobState
from pilot.errors import UsageError
from pilot.pipe.framing import DEFAULT_MAX_FRAME_BYTES
from pilot.tokens import TokenRole
from pilot.tokens.files import certificate_pem, private_key_pem
from splitpilot.broker.v1 import broker_pb2 as pb
from splitpilot.broker.v1 import broker_pb2_grpc as rpc_pb
from splitpilot.job.v1 import job_pb2

HOUR = 3600
SLOT = {"cores": 8, "memory_mb": 16000, "disk_mb": 20000, "time_left_s": 86400, "platforms": ["el9-x86_64"]}


# ------------------------------------------------------------------ fixtures and helpers

@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("robust-ca") / "ca")
    CertificateAuthority.init(path)
    return path


@pytest.fixture(scope="module")
def tokens(ca_dir) -> SimpleNamespace:
    ca = CertificateAuthority.load(ca_dir)
    return SimpleNamespace(
        alice=ca.new_token(TokenRole.USER, "alice"), admin=ca.new_token(TokenRole.ADMIN, "root"),
        agent=ca.new_token(TokenRole.AGENT, "glidein-a", site="SITE-A", queue="default"),
        agent_b=ca.new_token(TokenRole.AGENT, "glidein-b", site="SITE-B", queue="default"))


def start(tmp_path, ca_dir, **overrides) -> BrokerServer:
    state = tmp_path / f"state-{len(list(tmp_path.iterdir()))}"
    settings = {"listen": "127.0.0.1:0", "reap_interval": 0, "grace": 1.0, **overrides}
    server = BrokerServer(BrokerConfig(state_dir=str(state), ca_dir=ca_dir, **settings))
    server.start()
    return server


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> dict:
    return {"db_url": request.getfixturevalue("pg_url")} if request.param == "postgresql" else {}


@pytest.fixture
def server(tmp_path, ca_dir, backend):
    server = start(tmp_path, ca_dir, **backend)
    yield server
    server.stop()


@pytest.fixture
def clients(server, tokens):
    made = SimpleNamespace(alice=BrokerClient(server.address, tokens.alice),
                           admin=AdminClient(server.address, tokens.admin),
                           agent=AgentClient(server.address, tokens.agent),
                           agent_b=AgentClient(server.address, tokens.agent_b))
    yield made
    for client in vars(made).values():
        client.close()


def spec(**fields) -> job_pb2.JobSpec:
    requirements = fields.pop("requirements", None) or job_pb2.Requirements(cores=1, memory_mb=1000, walltime_s=HOUR)
    return job_pb2.JobSpec(executable=fields.pop("executable", "run.sh"), requirements=requirements, **fields)


def rows(server: BrokerServer) -> dict[str, int]:
    """Rows per table that a submission, a report or a match writes."""
    return {table: server.store._read(lambda cur, t=table: cur.row(f"SELECT count(*) FROM {t}"))[0]
            for table in ("jobs", "classes", "events", "pilots")}


def user_stub(server: BrokerServer, token) -> tuple[grpc.Channel, rpc_pb.UserServiceStub]:
    channel = grpc.secure_channel(server.address, grpc.ssl_channel_credentials(
        server.ca_pem, private_key_pem(token.key), certificate_pem(list(token.chain[:1]))),
        options=[("grpc.max_send_message_length", 64 << 20)])
    return channel, rpc_pb.UserServiceStub(channel)


def refused_submit(server: BrokerServer, token, specs: list[job_pb2.JobSpec]) -> grpc.RpcError:
    channel, stub = user_stub(server, token)
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.Submit(pb.SubmitRequest(jobs=specs), timeout=60)
    finally:
        channel.close()
    return info.value


def matched(agent: AgentClient, pilot: str = "pilot-1", slot: dict | None = None) -> MatchedJob:
    result = agent.match(slot or SLOT, pilot, "node-1")
    assert isinstance(result, MatchedJob), result
    return result


# ------------------------------------------------------------------ 1. careless job descriptions

def _many_inputs() -> job_pb2.JobSpec:
    """10,000 inputs with 400-character names: a 4.5 MB description, over the pipe's 4 MiB frame cap."""
    return spec(input_files=[job_pb2.InputFile(name=f"{i:05d}-" + "x" * 400, size=1, sha256="0" * 64)
                             for i in range(10_000)])


CARELESS = [
    pytest.param(lambda: spec(executable="run\x00.sh"), "executable contains a NUL character", id="nul-executable"),
    pytest.param(lambda: spec(arguments=["ok", "a\x00b"]), "arguments[1] contains a NUL character", id="nul-argument"),
    pytest.param(lambda: spec(arguments=["x" * (5 << 20)]), f"arguments[0] is 5,242,880 bytes; Linux passes at most "
                 f"{MAX_ARG_BYTES:,} per argument", id="5MiB-argument"),
    pytest.param(lambda: spec(arguments=["x" * 100_000] * 11), "arguments and environment take", id="ARG_MAX"),
    pytest.param(lambda: spec(environment={"A=B": "1"}), "environment['A=B'] has '=' or NUL in its name",
                 id="equals-in-name"),
    pytest.param(lambda: spec(environment={"": "1"}), "environment holds an empty variable name", id="empty-name"),
    pytest.param(lambda: spec(environment={"NUL\x00": "1"}), "has '=' or NUL in its name", id="nul-in-name"),
    pytest.param(lambda: spec(environment={"OK": "v\x00"}), "environment['OK'] contains a NUL", id="nul-in-value"),
    pytest.param(lambda: spec(environment={"BIG": "x" * 200_000}), "environment['BIG'] is 200,004 bytes as "
                 "NAME=value", id="huge-variable"),
    pytest.param(_many_inputs, "input_files take 4,", id="over-the-frame-cap"),
    pytest.param(lambda: spec(requirements=job_pb2.Requirements(cores=1)), "requirements.walltime_s is 0: every job "
                 "needs a wall-clock limit", id="no-walltime"),
    pytest.param(lambda: spec(requirements=job_pb2.Requirements(walltime_s=2**64 - 1)),
                 "requirements.walltime_s 18446744073709551615 is out of range (1 to 31622400)", id="walltime-2^64"),
    pytest.param(lambda: spec(requirements=job_pb2.Requirements(walltime_s=HOUR, memory_mb=2**64 - 1)),
                 "requirements.memory_mb 18446744073709551615 is out of range", id="memory-2^64"),
    pytest.param(lambda: spec(requirements=job_pb2.Requirements(walltime_s=HOUR, cores=2**32 - 1)),
                 "requirements.cores 4294967295 is out of range (0 to 4096)", id="cores-2^32"),
    pytest.param(lambda: spec(max_attempts=101), "max_attempts 101 is out of range (0 to 100)", id="attempts"),
    pytest.param(lambda: spec(requirements=job_pb2.Requirements(walltime_s=HOUR, sites_allowed=["SITE\nA"])),
                 "requirements.sites_allowed[0] 'SITE\\nA' is not a site name", id="newline-in-site"),
    pytest.param(lambda: spec(requirements=job_pb2.Requirements(walltime_s=HOUR, platform="el9\x00")),
                 "requirements.platform 'el9\\x00' must be at most 256 printable characters", id="nul-platform"),
]


@pytest.mark.parametrize(("make", "words"), CARELESS)
def test_a_job_no_node_could_run_is_refused_at_submit_naming_the_field(server, tokens, make, words):
    """Each of these was accepted once and failed on a worker node, as a wrapper or infrastructure
    failure: retried, and counted against the node's black-hole guard. Now: INVALID_ARGUMENT at submit,
    naming the job, the field and the fix, and nothing stored."""
    before = rows(server)
    error = refused_submit(server, tokens.alice, [make()])
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details().startswith("jobs[0]: "), error.details()
    assert words in error.details() and "fix: " in error.details(), error.details()
    assert rows(server) == before


def test_the_frame_cap_check_matches_the_real_job_start(server):
    """The budget is not a guess: a spec that fits it makes a JobStart (with the largest token and
    paths) within the pipe's frame cap, and the broker's refusal starts just above it."""
    from splitpilot.pipe.v1 import pipe_pb2
    budget = server.broker.spec_budget
    room = budget.frame_cap - budget.overhead
    fitting = spec(arguments=["x" * 1000])
    fitting.output_patterns.append("y" * (room - fitting.ByteSize() - 8))
    budget.check(fitting)  # no SpecProblem
    # The largest token this broker issues: the longest owner name, the largest ids.
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = server.ca.issue(TokenRole.JOB, "o" * 64, key.public_key(), job_id=2**63 - 1, attempt=2**32 - 1)
    start = pipe_pb2.AgentMessage(job_start=pipe_pb2.JobStart(
        job_id=2**63 - 1, attempt=2**32 - 1, spec=fitting, sandbox_dir="/" + "s" * 4095,
        software_dir="/" + "w" * 4095, token=pipe_pb2.JobToken(
            certificate_pem=leaf.public_bytes(serialization.Encoding.PEM) + server.ca_pem,
            private_key_pem=private_key_pem(key), not_after_unix=2**40),
        broker=pipe_pb2.BrokerEndpoint(address="broker.example.org:7443", ca_pem=server.ca_pem),
        limits=pipe_pb2.Limits(cores=4096, memory_mb=2**40, disk_mb=2**40, walltime_s=31622400),
        deadline_unix=2**40, broker_heartbeat_s=30))
    assert start.ByteSize() <= DEFAULT_MAX_FRAME_BYTES
    fitting.output_patterns.append("z" * 64)
    with pytest.raises(ValueError, match="output_patterns take"):
        budget.check(fitting)


def test_a_batch_with_one_bad_job_queues_nothing_and_leaves_no_class(server, tokens, clients):
    """All or none: the good jobs before a bad one are not queued, and their new requirement class (created,
    before, in its own transaction) is not left behind. The bad site name with a line break once committed
    an orphan class row and then answered INTERNAL."""
    before = rows(server)
    good = spec(requirements=job_pb2.Requirements(cores=3, walltime_s=7 * HOUR, sites_allowed=["SITE-A"]))
    bad = spec(requirements=job_pb2.Requirements(cores=3, walltime_s=7 * HOUR, sites_allowed=["SITE-A\nSITE-B"]))
    error = refused_submit(server, tokens.alice, [good, good, bad])
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("jobs[2]: requirements.sites_allowed[0] 'SITE-A\\nSITE-B' is not a site name")
    assert rows(server) == before
    assert clients.alice.list().jobs == []
    # The same store, called directly (a bypass of the service's checks), refuses as well and writes nothing.
    with pytest.raises(Exception, match="site name holds a line break") as info:
        server.store.submit("alice", [good, bad], datetime.datetime.now(datetime.UTC))
    assert type(info.value).__name__ == "BadValue"
    assert rows(server) == before


# ------------------------------------------------------------------ 2. failure semantics

def test_limit_overruns_end_failed_limit_not_killed(server, clients):
    """The agent stops a job over its memory limit (ReportAttemptFailure LIMIT), or the wrapper reports it
    (UpdateState FAILED_LIMIT): its own final state, never KILLED (which means its owner asked), never
    re-queued. Metrics and listings know the state."""
    by_agent, by_wrapper = (clients.alice.submit([spec(name="by-agent"), spec(name="by-wrapper")]))
    first = matched(clients.agent, "pilot-1")
    assert first.job_id == by_agent
    state = clients.agent.report_attempt_failure(by_agent, 1, "limit", "rss 9 GB > 8 GB", "pilot-1")
    assert state is JobState.FAILED_LIMIT
    second = matched(clients.agent, "pilot-1")
    with second.job_client() as job:
        job.update_state(JobState.STARTED)
        job.update_state(JobState.RUNNING)
        assert job.update_state(JobState.FAILED_LIMIT, "walltime 3600 s exceeded").state is JobState.FAILED_LIMIT
    for job_id, words in ((by_agent, "stopped by the agent for exceeding a limit: rss 9 GB > 8 GB"),
                          (by_wrapper, "walltime 3600 s exceeded")):
        status = clients.alice.status(job_id)
        assert status.state is JobState.FAILED_LIMIT and status.final and status.attempt == 1
        assert words in status.message
        assert not any(e.state is JobState.KILLED for e in status.history)
    assert clients.alice.list().counts[JobState.FAILED_LIMIT] == 2
    assert 'splitpilot_jobs{state="FAILED_LIMIT"} 2.0' in server.render_metrics().splitlines()
    assert not isinstance(clients.agent.match(SLOT, "pilot-1", "node-1"), MatchedJob)  # neither was re-queued


def test_the_agents_own_failure_is_not_charged_and_unknown_classes_are_documented(server, clients, tokens):
    """ATTEMPT_FAILURE_AGENT re-queues without using up an attempt (a job with one attempt survives three
    agent failures); a class this broker does not know (a newer agent's) is taken as WRAPPER: re-queued
    and charged; UNSPECIFIED is a caller's mistake, refused with INVALID_ARGUMENT, changing nothing."""
    job_id = clients.alice.submit(spec(max_attempts=1))[0]
    for attempt in (1, 2, 3):
        assert matched(clients.agent).attempt == attempt
        assert clients.agent.report_attempt_failure(job_id, attempt, pb.ATTEMPT_FAILURE_AGENT, "agent bug",
                                                    "pilot-1") is JobState.WAITING
    assert matched(clients.agent).attempt == 4
    before = rows(server)
    with pytest.raises(InvalidRequest) as unset:
        clients.agent.report_attempt_failure(job_id, 4, pb.ATTEMPT_FAILURE_UNSPECIFIED, "", "pilot-1")
    assert unset.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "failure is not set; fix: send an AttemptFailure class" in unset.value.details
    assert rows(server) == before and clients.alice.status(job_id).state is JobState.ASSIGNED
    # A newer agent's class: the attempt ends now (the job's one attempt is used up: FAILED_WRAPPER).
    assert clients.agent.report_attempt_failure(job_id, 4, 42, "a failure class of the future", "pilot-1") is \
        JobState.FAILED_WRAPPER
    status = clients.alice.status(job_id)
    assert "1 of 1 attempts used" in status.message and "a failure class of the future" in status.message


def test_a_payload_that_cannot_start_is_the_owners_failure(server, clients):
    """A missing executable is found before the payload runs (STARTED): the wrapper reports
    FAILED_EXECUTION from there (it used to be refused, and turned into a wrapper failure that was
    retried and charged to the node). Final, not re-queued, the message kept."""
    job_id = clients.alice.submit(spec(executable="./not-there", max_attempts=3))[0]
    with matched(clients.agent).job_client() as job:
        job.update_state(JobState.STARTED)
        result = job.update_state(JobState.FAILED_EXECUTION, "cannot start './not-there': no such file", exit_code=127)
        assert result.state is JobState.FAILED_EXECUTION
    status = clients.alice.status(job_id)
    assert status.state is JobState.FAILED_EXECUTION and status.attempt == 1 and status.exit_code == 127
    assert not isinstance(clients.agent.match(SLOT, "pilot-1", "node-1"), MatchedJob)  # not re-queued


def test_a_state_this_broker_does_not_know_is_refused_naming_the_ones_it_takes(server, clients):
    """A newer wrapper reporting a state this broker lacks gets INVALID_ARGUMENT with the states it takes;
    the job is unchanged (its sequence too: the next update still fits)."""
    job_id = clients.alice.submit(spec())[0]
    with matched(clients.agent).job_client() as job:
        job.update_state(JobState.STARTED)
        with pytest.raises(InvalidRequest) as info:
            job.update_state(99, "a state of the future")
        assert "a job cannot report 99; fix: report one of" in info.value.details
        assert "FAILED_LIMIT" in info.value.details
        assert clients.alice.status(job_id).state is JobState.STARTED
    with pytest.raises(InvalidRequest, match="unknown state"):
        clients.alice.list(states=[99])


# ------------------------------------------------------------------ 3. the heartbeat interval

def _raw_match(server: BrokerServer, token) -> pb.MatchedJob:
    key = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    channel = grpc.secure_channel(server.address, grpc.ssl_channel_credentials(
        server.ca_pem, private_key_pem(token.key), certificate_pem(list(token.chain[:1]))))
    try:
        answer = rpc_pb.AgentServiceStub(channel).Match(pb.MatchRequest(
            slot=pb.Slot(cores=1, memory_mb=1000, time_left_s=86400), pilot_id="pilot-hb", node="n",
            job_public_key=key), timeout=30)
    finally:
        channel.close()
    assert answer.WhichOneof("result") == "job"
    return answer.job


@pytest.mark.parametrize(("timeout_s", "interval_s"), [(300, 30), (30, 10), (3, 1)])
def test_the_wrappers_heartbeat_follows_the_brokers_timeout(tmp_path, ca_dir, tokens, timeout_s, interval_s):
    """The broker says how often its wrappers must heartbeat (a third of its timeout, at most 30 s): with a
    hard-coded 30 s, every job longer than a 20 s timeout was reaped on healthy nodes."""
    server = start(tmp_path, ca_dir, store_settings=StoreSettings(
        heartbeat_timeout=datetime.timedelta(seconds=timeout_s)))
    try:
        with BrokerClient(server.address, tokens.alice) as alice:
            alice.submit(spec())
        assert _raw_match(server, tokens.agent).broker_heartbeat_s == interval_s
    finally:
        server.stop()
    assert interval_s * 3 <= timeout_s


def test_a_heartbeat_timeout_wrappers_cannot_meet_is_refused(tmp_path, ca_dir):
    state = tmp_path / "never"
    with pytest.raises(UsageError) as info:
        BrokerServer(BrokerConfig(state_dir=str(state), ca_dir=ca_dir, listen="127.0.0.1:0", reap_interval=0,
                                  store_settings=StoreSettings(heartbeat_timeout=datetime.timedelta(seconds=2)))
                     ).start()
    assert str(info.value).startswith("a heartbeat timeout of 2s is shorter than wrappers can meet")
    assert "fix: --heartbeat-timeout 3s or more" in str(info.value)
    assert not state.exists()  # refused before anything was created
    assert heartbeat_interval(datetime.timedelta(hours=2)) == 30


# ------------------------------------------------------------------ 4. why a job waits

def test_why_a_job_waits_per_site_and_a_never_runnable_job_is_flagged(server, clients):
    """condor_q -better-analyze for splitpilot: the waiting job's requirements that no pilot offered, per
    site. Before any pilot was seen nothing is known (no warning, said so); after, a job needing more than
    any site ever offered is queued with a warning naming what is missing."""
    unknown = clients.alice.submit_checked(spec(name="early"))
    assert unknown.warnings == []
    early = clients.alice.status(unknown.job_ids[0])
    assert early.wait is not None and early.wait.sites == () and not early.wait.never_runnable
    assert "no pilot has asked this broker for work yet" in early.wait.summary
    # Pilots of two sites ask (the early job goes to the first; the rest of the queue is empty).
    assert matched(clients.agent).job_id == early.job_id
    assert not isinstance(clients.agent_b.match({"cores": 2, "memory_mb": 500000, "disk_mb": 100,
                                                 "time_left_s": 600}, "pilot-b", "node-b"), MatchedJob)
    big = spec(name="big", requirements=job_pb2.Requirements(cores=64, memory_mb=1000, walltime_s=HOUR))
    fits = spec(name="fits", requirements=job_pb2.Requirements(cores=4, memory_mb=1000, walltime_s=HOUR,
                                                                 platform="el9-x86_64"))
    submission = clients.alice.submit_checked([fits, big, big])
    [warning] = submission.warnings
    assert warning.job_indexes == (1, 2)
    assert warning.message.startswith("jobs[1, 2]: no pilot of any site has ever offered what these jobs need: "
                                      "cores 64 (offered: 8 at SITE-A)")
    assert [u.requirement for u in warning.unmet] == ["cores"]
    # The fitting job waits for a free slot at SITE-A; SITE-B lacks the platform and the time.
    waiting = clients.alice.status(submission.job_ids[0]).wait
    assert waiting.summary.startswith("SITE-A offered everything this job needs in the last 1 h: it waits for a "
                                      "free slot there")
    sites = {s.site: s for s in waiting.sites}
    assert sites["SITE-A"].unmet == () and sites["SITE-A"].state == "enabled"
    assert {u.requirement: (u.wanted, u.offered) for u in sites["SITE-B"].unmet} == {
        "cores": ("4", "2"), "walltime_s": ("3600", "600"), "platform": ("el9-x86_64", "none")}
    hopeless = clients.alice.status(submission.job_ids[2]).wait
    assert hopeless.never_runnable and hopeless.jobs_ahead == 1  # the other big one is older
    assert hopeless.summary.startswith("no pilot of any site has ever offered what this job needs: cores 64")
    # A site an admin drains is shown with its state: the job waits for an enabled one.
    clients.admin.set_site_state("SITE-A", "draining", "maintenance")
    drained = clients.alice.status(submission.job_ids[0]).wait
    assert drained.summary.startswith("only SITE-A (draining) offered everything this job needs")
    # The broker's own rows: one per site and bucket, and all-time; the match path wrote none of them.
    offers = server.store.offers(0)
    assert {(o.site, o.bucket == 0) for o in offers} == {("SITE-A", True), ("SITE-A", False), ("SITE-B", True),
                                                          ("SITE-B", False)}


def test_a_waiting_job_of_another_owner_is_not_analysed_for_a_stranger(server, clients, tokens, ca_dir):
    job_id = clients.alice.submit(spec())[0]
    mallory = CertificateAuthority.load(ca_dir).new_token(TokenRole.USER, "mallory")
    with BrokerClient(server.address, mallory) as client:
        with pytest.raises(Exception, match="belongs to another user") as info:
            client.status(job_id)
    assert info.value.code is grpc.StatusCode.PERMISSION_DENIED and "alice" not in info.value.details


# ------------------------------------------------------------------ 5. the database goes away

def test_a_database_that_goes_away_is_unavailable_not_internal(tmp_path, ca_dir, tokens, pg_url, pg_server):  # noqa: F811
    """Every connection of the broker to PostgreSQL is cut (as a database restart does): the calls that
    meet a broken connection answer UNAVAILABLE, which clients retry, with the driver's words; never
    INTERNAL. The broker recovers by itself."""
    import psycopg
    server = start(tmp_path, ca_dir, db_url=pg_url)
    try:
        with BrokerClient(server.address, tokens.alice) as alice:
            job_id = alice.submit(spec())[0]
            for _ in range(3):  # fill the pool with connections
                alice.status(job_id)
            with psycopg.connect(pg_url, autocommit=True) as admin:
                cut = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = "
                                    "'splitpilot-broker'").fetchall()
            assert cut
            seen = set()
            for _ in range(20):
                try:
                    alice.status(job_id)
                    seen.add("OK")
                    if "UNAVAILABLE" in seen:
                        break
                except BrokerUnavailable as exc:
                    seen.add(exc.code.name)
                    assert "the broker's database is unavailable (PostgreSQL: " in exc.details
                    assert "fix: retry later" in exc.details
            assert seen == {"UNAVAILABLE", "OK"}
            assert alice.status(job_id).state is JobState.WAITING
    finally:
        server.stop()
