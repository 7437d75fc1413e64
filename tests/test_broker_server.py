"""The broker as a real gRPC server over mutual TLS, driven through its clients.

Each test gets a fresh broker (state directory, database, file store) on
127.0.0.1 with a free port; the CA is created once per module. Nothing here
asserts on timing: waits poll for a state with a generous deadline.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pg import pg_server, pg_url  # noqa: F401  (fixtures: a private PostgreSQL server)
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from broker.ca import CertificateAuthority
from broker.files import FileStore
from broker.server import BrokerConfig, BrokerServer, BrokerStartError
from broker.services.base import ServiceSettings
from broker.store.base import StoreSettings
from pilot.api.client import (
    AccessDenied,
    AdminClient,
    AgentClient,
    BrokerClient,
    InvalidRequest,
    JobClient,
    MatchedJob,
    NoMatch,
    NotFound,
    PreconditionFailed,
    TokenUnusable,
    WrongBroker,
)
from pilot.api.files import ChecksumMismatch
from pilot.api.states import JobState
from pilot.errors import UsageError
from pilot.pipe import messages as m
from pilot.tokens import Expectation, TokenRole, TokenVerifier, parse_identity
from pilot.tokens.files import certificate_pem, load_certificates, private_key_pem
from splitpilot.broker.v1 import broker_pb2 as pb
from splitpilot.broker.v1 import broker_pb2_grpc as rpc_pb
from splitpilot.job.v1 import job_pb2

#: Every job names a walltime (the broker refuses one without).
WALLTIME = job_pb2.Requirements(walltime_s=3600)
SLOT = {"cores": 4, "memory_mb": 8000, "disk_mb": 10000, "time_left_s": 86400}
KiB = 1024


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("broker-ca") / "ca")
    CertificateAuthority.init(path)
    return path


@pytest.fixture(scope="module")
def ca(ca_dir) -> CertificateAuthority:
    return CertificateAuthority.load(ca_dir)


@pytest.fixture(scope="module")
def tokens(ca) -> SimpleNamespace:
    return SimpleNamespace(
        alice=ca.new_token(TokenRole.USER, "alice"),
        bob=ca.new_token(TokenRole.USER, "bob"),
        admin=ca.new_token(TokenRole.ADMIN, "root"),
        # Shorter than a job token's lifetime: the job token must be capped by it.
        agent=ca.new_token(TokenRole.AGENT, "glidein-a", site="SITE-A", queue="default",
                           ttl=datetime.timedelta(hours=6)),
        agent_b=ca.new_token(TokenRole.AGENT, "glidein-b", site="SITE-B", queue="default"),
        job=ca.new_token(TokenRole.JOB, "alice", job_id=424242, attempt=1),
        host=ca.new_token(TokenRole.HOST, "localhost", dns_names=["localhost"], ip_addresses=["127.0.0.1"]),
    )


def start_server(tmp_path, ca_dir, **overrides) -> BrokerServer:
    state = tmp_path / f"state-{len(list(tmp_path.iterdir()))}"
    settings = {"listen": "127.0.0.1:0", "metrics": "127.0.0.1:0", "reap_interval": 0, "grace": 1.0, **overrides}
    config = BrokerConfig(state_dir=str(state), ca_dir=ca_dir, **settings)
    server = BrokerServer(config)
    server.start()
    return server


@pytest.fixture
def server(tmp_path, ca_dir):
    server = start_server(tmp_path, ca_dir)
    yield server
    server.stop()


@pytest.fixture
def small_server(tmp_path, ca_dir):
    """Tight file limits: 64 KiB per file, 100 KiB per job."""
    server = start_server(tmp_path, ca_dir, max_file_size=64 * KiB, max_job_bytes=100 * KiB)
    yield server
    server.stop()


@pytest.fixture
def clients(server, tokens):
    made = SimpleNamespace(
        alice=BrokerClient(server.address, tokens.alice), bob=BrokerClient(server.address, tokens.bob),
        admin=AdminClient(server.address, tokens.admin), agent=AgentClient(server.address, tokens.agent),
        agent_b=AgentClient(server.address, tokens.agent_b))
    yield made
    for client in vars(made).values():
        client.close()


def write(path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def submit_one(client: BrokerClient, **fields) -> int:
    fields.setdefault("requirements", WALLTIME)
    spec = job_pb2.JobSpec(executable="run.sh", name=fields.pop("name", "t"), **fields)
    return client.submit(spec)[0]


def match(agent: AgentClient, pilot: str = "pilot-1") -> MatchedJob:
    result = agent.match(SLOT, pilot, "node-1.example")
    assert isinstance(result, MatchedJob), result
    return result


def raw_channel(server: BrokerServer, token) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(server.ca_pem, private_key_pem(token.key),
                                               certificate_pem(list(token.chain[:1])))
    return grpc.secure_channel(server.address, credentials)


def job_stub(server: BrokerServer, matched: MatchedJob) -> tuple[grpc.Channel, rpc_pb.JobServiceStub]:
    credentials = grpc.ssl_channel_credentials(server.ca_pem, matched.key_pem, matched.token_pem)
    channel = grpc.secure_channel(server.address, credentials)
    return channel, rpc_pb.JobServiceStub(channel)


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = fn(*args, timeout=30, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    return info.value


# ------------------------------------------------------------------ TLS and roles

ALLOWED = {"UserService": {"user", "admin"}, "AgentService": {"agent"}, "JobService": {"job"},
           "AdminService": {"admin"}}
NEEDS = {"UserService": "user or admin token", "AgentService": "agent token", "JobService": "job token",
         "AdminService": "admin token"}


def _call_method(channel: grpc.Channel, service: str, method) -> None:
    path = f"/splitpilot.broker.v1.{service}/{method.name}"
    request = getattr(pb, method.input_type.name)()
    identity = (lambda m: m.SerializeToString(), lambda b: b)
    if method.client_streaming:
        channel.stream_unary(path, *identity)(iter([request]), timeout=30)
    elif method.server_streaming:
        list(channel.unary_stream(path, *identity)(request, timeout=30))
    else:
        channel.unary_unary(path, *identity)(request, timeout=30)


def test_every_rpc_refuses_every_wrong_role(server, tokens):
    roles = {"user": tokens.alice, "admin": tokens.admin, "agent": tokens.agent, "job": tokens.job}
    checked = 0
    for role, token in roles.items():
        channel = raw_channel(server, token)
        try:
            for service, allowed in ALLOWED.items():
                if role in allowed:
                    continue
                for method in pb.DESCRIPTOR.services_by_name[service].methods:
                    with pytest.raises(grpc.RpcError) as info:
                        _call_method(channel, service, method)
                    error = info.value
                    assert error.code() is grpc.StatusCode.PERMISSION_DENIED, (role, service, method.name,
                                                                               error.details())
                    assert NEEDS[service] in error.details(), error.details()
                    assert f"{service}.{method.name}" in error.details()
                    checked += 1
        finally:
            channel.close()
    assert checked == 64  # 24 RPCs; each role is refused by the services not its own
    # ... and the broker still serves.
    with BrokerClient(server.address, tokens.alice) as alice:
        assert alice.list().jobs == []


def test_host_token_cannot_be_a_client(server, tokens):
    # Its extended key usage is serverAuth only: refused in the TLS handshake.
    channel = raw_channel(server, tokens.host)
    try:
        error = rpc_error(rpc_pb.UserServiceStub(channel).ListJobs, pb.ListJobsRequest())
        assert error.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()


def test_client_without_certificate_fails_the_handshake(server, tokens):
    channel = grpc.secure_channel(server.address, grpc.ssl_channel_credentials(server.ca_pem))
    try:
        error = rpc_error(rpc_pb.UserServiceStub(channel).ListJobs, pb.ListJobsRequest())
        assert error.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()
    with BrokerClient(server.address, tokens.alice) as alice:
        assert alice.list().jobs == []


def test_certificate_of_another_ca_is_refused(server, tokens):
    stranger = CertificateAuthority.create().new_token(TokenRole.USER, "alice")
    # The broker refuses it in the TLS handshake (a client that does not check first sees UNAVAILABLE) ...
    channel = raw_channel(server, stranger)
    try:
        error = rpc_error(rpc_pb.UserServiceStub(channel).ListJobs, pb.ListJobsRequest())
    finally:
        channel.close()
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    # ... and the client says what is wrong, before connecting, instead of "cannot reach the broker".
    with pytest.raises(TokenUnusable) as info:
        BrokerClient(server.address, stranger, server.ca_pem)
    message = str(info.value)
    assert message.startswith("your user token (alice) is not from this broker's CA: it was issued by ")
    assert "fix: use a token issued by the broker's CA" in message and "cannot reach" not in message
    # Trusting the token's own CA, the broker's certificate is the foreign one: said as such.
    with BrokerClient(server.address, stranger) as client:
        with pytest.raises(WrongBroker) as wrong:
            client.list()
    assert "presented a certificate that is not from the CA this client trusts" in str(wrong.value)
    assert "fix: use a token issued by the broker's CA" in str(wrong.value)


def test_expired_token_is_refused(server, ca):
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3)
    expired = ca.new_token(TokenRole.USER, "alice", ttl=datetime.timedelta(hours=1), now=long_ago)
    channel = raw_channel(server, expired)
    try:  # refused by the broker in the TLS handshake
        assert rpc_error(rpc_pb.UserServiceStub(channel).ListJobs, pb.ListJobsRequest()).code() is \
            grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()
    with pytest.raises(TokenUnusable) as info:  # the client knows before connecting
        BrokerClient(server.address, expired)
    ends = expired.certificate.not_valid_after_utc
    assert str(info.value).startswith(f"your user token (alice) expired at {ends:%Y-%m-%d %H:%M:%S}Z (now ")
    assert "fix: ask the broker's operator for a new token" in str(info.value)
    assert info.value.code is grpc.StatusCode.UNAUTHENTICATED and info.value.exit_code == 1


def test_certificate_of_our_ca_that_is_no_token_is_unauthenticated(server, ca):
    # Signed by the CA, so TLS accepts it; not a splitpilot token, so the verifier does not.
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    hour = datetime.timedelta(hours=1)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "elsewhere"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "mallory")])
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(ca.certificate.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - hour).not_valid_after(now + hour)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                   .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("urn:x:mallory")]),
                                  critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                                  critical=False)
                   .sign(ca.key, hashes.SHA256()))
    credentials = grpc.ssl_channel_credentials(server.ca_pem, private_key_pem(key), certificate_pem([certificate]))
    channel = grpc.secure_channel(server.address, credentials)
    try:
        error = rpc_error(rpc_pb.UserServiceStub(channel).ListJobs, pb.ListJobsRequest())
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "not a splitpilot token name" in error.details() and "fix:" in error.details()
    finally:
        channel.close()


def test_client_refuses_a_broker_of_another_ca(server, tokens):
    other_ca = certificate_pem([CertificateAuthority.create().certificate])
    # TLS itself refuses a broker whose certificate is not from the CA the client trusts ...
    credentials = grpc.ssl_channel_credentials(other_ca, private_key_pem(tokens.alice.key),
                                               certificate_pem(list(tokens.alice.chain[:1])))
    channel = grpc.secure_channel(server.address, credentials)
    try:
        error = rpc_error(rpc_pb.UserServiceStub(channel).ListJobs, pb.ListJobsRequest())
    finally:
        channel.close()
    assert error.code() is grpc.StatusCode.UNAVAILABLE and "CERTIFICATE_VERIFY_FAILED" in error.details()
    # ... and the client, told to trust another CA than its token's, says so before connecting.
    with pytest.raises(TokenUnusable, match="is not from this broker's CA"):
        BrokerClient(server.address, tokens.alice, other_ca)


# ------------------------------------------------------------------ the life cycle

def test_full_life_cycle(server, clients, tokens, ca, tmp_path):
    alice, agent = clients.alice, clients.agent
    data = os.urandom(300 * KiB) + b"end"
    uploaded = alice.upload(write(tmp_path / "in" / "input.dat", data))
    assert uploaded.sha256 == hashlib.sha256(data).hexdigest() and uploaded.size == len(data)
    job_id = alice.submit(job_pb2.JobSpec(requirements=WALLTIME, executable="run.sh", name="life",
                                          input_files=[uploaded], output_patterns=["*.out"]))[0]
    assert alice.status(job_id).state is JobState.WAITING

    matched = match(agent)
    assert (matched.job_id, matched.attempt) == (job_id, 1)
    assert matched.spec.owner == "alice" and matched.spec.input_files[0].name == "input.dat"
    # The job token binds the job and attempt in DN and SAN, for the key made by the agent,
    # and never outlives the agent's token.
    leaf = load_certificates(matched.token_pem)[0]
    identity = TokenVerifier([ca.certificate]).verify(
        matched.token_pem, Expectation.role(TokenRole.JOB, job_id=job_id, attempt=1))
    assert (identity.subject, identity.job_id, identity.attempt) == ("alice", job_id, 1)
    assert f"CN=job={job_id}" in leaf.subject.rfc4514_string() and "CN=attempt=1" in leaf.subject.rfc4514_string()
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"urn:splitpilot:job:{job_id}:1"]
    assert leaf.public_key().public_numbers() == matched.key.public_key().public_numbers()
    agent_not_after = tokens.agent.certificate.not_valid_after_utc
    assert leaf.not_valid_after_utc <= agent_not_after
    assert leaf.not_valid_after_utc == agent_not_after  # capped: the job token's own limit is 2 days
    assert matched.not_after == leaf.not_valid_after_utc

    (tmp_path / "sandbox").mkdir()
    with matched.job_client() as job:
        assert job.update_state(JobState.STARTED).state is JobState.STARTED
        path = job.get_input("input.dat", str(tmp_path / "sandbox"))
        assert open(path, "rb").read() == data
        assert job.update_state(JobState.RUNNING, "payload started").state is JobState.RUNNING
        assert job.heartbeat(cpu_seconds=1.5, rss_bytes=10 << 20, sandbox_bytes=1 << 20) is False
        output = job.put_output(write(tmp_path / "sandbox" / "result.out", b"42\n" * 1000))
        assert output.size == 3000
        job.put_output(write(tmp_path / "sandbox" / "logs" / "run.log", b"log line\n"), "logs/run.log")
        assert job.update_state(JobState.SAVING).state is JobState.SAVING
        done = job.update_state(JobState.DONE, "all good", exit_code=0)
        assert done.state is JobState.DONE and not done.replay

    status = alice.status(job_id)
    assert status.state is JobState.DONE and status.exit_code == 0 and status.attempt == 1
    assert [e.state for e in status.history] == [JobState.WAITING, JobState.ASSIGNED, JobState.STARTED,
                                                 JobState.RUNNING, JobState.SAVING, JobState.DONE]
    assert status.site == "SITE-A" and status.node == "node-1.example" and status.pilot_id == "pilot-1"
    assert {o.name for o in status.outputs} == {"result.out", "logs/run.log"}
    written = alice.output(job_id, str(tmp_path / "results"))
    assert sorted(os.path.relpath(p, tmp_path / "results") for p in written) == ["logs/run.log", "result.out"]
    assert (tmp_path / "results" / "result.out").read_bytes() == b"42\n" * 1000
    # The owner's listing, with counts.
    listing = alice.list()
    assert [j.job_id for j in listing.jobs] == [job_id] and listing.counts[JobState.DONE] == 1
    assert clients.bob.list().jobs == []
    assert [j.job_id for j in clients.admin.list_all_jobs().jobs] == [job_id]


def test_job_files_are_uploaded_and_submitted(server, clients, tmp_path):
    write(tmp_path / "data" / "input.txt", b"hello\n")
    job_file = tmp_path / "jobs.toml"
    job_file.write_text('[job]\nname = "hello-{index}"\nexecutable = "run.sh"\ncount = 3\n'
                        'arguments = ["--seed", "{index}"]\n[[job.inputs]]\npath = "data/input.txt"\n'
                        '[job.requirements]\nwalltime = "1h"\n')
    ids = clients.alice.submit(str(job_file))
    assert len(ids) == 3
    jobs = [clients.alice.status(i) for i in ids]
    assert [j.name for j in jobs] == ["hello-0", "hello-1", "hello-2"]
    assert [list(j.spec.arguments) for j in jobs] == [["--seed", "0"], ["--seed", "1"], ["--seed", "2"]]
    assert jobs[0].spec.input_files[0].sha256 == hashlib.sha256(b"hello\n").hexdigest()


def test_exactly_one_winner_per_job_under_concurrent_matching(server, clients, ca):
    ids = set(clients.alice.submit([job_pb2.JobSpec(requirements=WALLTIME, executable="x", name=str(i))
                                    for i in range(30)]))
    won: list[tuple[int, int]] = []
    lock = threading.Lock()

    def agent_loop(n: int) -> None:
        token = ca.new_token(TokenRole.AGENT, f"g{n}", site="SITE-A", queue="default")
        with AgentClient(server.address, token) as agent:
            while isinstance(result := agent.match(SLOT, f"pilot-{n}", "node"), MatchedJob):
                with lock:
                    won.append((result.job_id, result.attempt))

    threads = [threading.Thread(target=agent_loop, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(j for j, _ in won) == sorted(ids)
    assert {a for _, a in won} == {1}


@pytest.mark.parametrize("backend", ["sqlite-offloaded", "postgresql"])
def test_store_calls_in_threads_and_on_postgresql(backend, request, tmp_path, ca_dir, ca, tokens):
    """The path a PostgreSQL store takes (every store call in the thread pool), end to end."""
    if backend == "postgresql":
        server = start_server(tmp_path, ca_dir, db_url=request.getfixturevalue("pg_url"))
        assert server.broker.settings.offload_store
    else:
        server = start_server(tmp_path, ca_dir, service=ServiceSettings(offload_store=True))
    try:
        with BrokerClient(server.address, tokens.alice) as alice:
            uploaded = alice.upload(write(tmp_path / "in.txt", b"data"))
            ids = set(alice.submit([job_pb2.JobSpec(requirements=WALLTIME, executable="x", input_files=[uploaded])
                                    for _ in range(12)]))
            won: list[int] = []

            def agent_loop(n: int) -> None:
                token = ca.new_token(TokenRole.AGENT, f"g{n}", site="SITE-A", queue="default")
                with AgentClient(server.address, token) as agent:
                    while isinstance(result := agent.match(SLOT, f"pilot-{n}", "node"), MatchedJob):
                        won.append(result.job_id)
                        with result.job_client() as job:
                            job.update_state(JobState.STARTED)
                            job.get_input("in.txt", str(tmp_path / f"in-{result.job_id}"))
                            job.update_state(JobState.RUNNING)
                            job.put_output(write(tmp_path / f"o{result.job_id}" / "o.out", b"out"))
                            job.update_state(JobState.SAVING)
                            job.update_state(JobState.DONE, exit_code=0)

            threads = [threading.Thread(target=agent_loop, args=(n,)) for n in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            assert sorted(won) == sorted(ids)
            listing = alice.list()
            assert listing.counts[JobState.DONE] == 12
            assert alice.output(min(ids), str(tmp_path / "res"))
    finally:
        server.stop()


# ------------------------------------------------------------------ updates, replays, fencing

def test_replayed_and_out_of_order_updates(server, clients):
    job_id = submit_one(clients.alice)
    matched = match(clients.agent)
    channel, stub = job_stub(server, matched)
    try:
        def update(state, sequence, **kw):
            return stub.UpdateState(pb.UpdateStateRequest(state=state, sequence=sequence, **kw), timeout=30)

        first = update(job_pb2.JOB_STATE_STARTED, 1)
        assert first.state == job_pb2.JOB_STATE_STARTED and not first.replay
        again = update(job_pb2.JOB_STATE_STARTED, 1)
        assert again.state == job_pb2.JOB_STATE_STARTED and again.replay
        skipped = rpc_error(stub.UpdateState, pb.UpdateStateRequest(state=job_pb2.JOB_STATE_RUNNING, sequence=3))
        assert skipped.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "update 3 arrived, expected 2" in skipped.details()
        illegal = rpc_error(stub.UpdateState, pb.UpdateStateRequest(state=job_pb2.JOB_STATE_DONE, sequence=2))
        assert illegal.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "STARTED -> DONE is not allowed" in illegal.details()
        assert update(job_pb2.JOB_STATE_RUNNING, 2).state == job_pb2.JOB_STATE_RUNNING
        stale_replay = rpc_error(stub.UpdateState, pb.UpdateStateRequest(state=job_pb2.JOB_STATE_STARTED, sequence=1))
        assert stale_replay.code() is grpc.StatusCode.FAILED_PRECONDITION
        not_reportable = rpc_error(stub.UpdateState, pb.UpdateStateRequest(state=job_pb2.JOB_STATE_WAITING,
                                                                           sequence=3))
        assert not_reportable.code() is grpc.StatusCode.INVALID_ARGUMENT and "cannot report" in not_reportable.details()
        zero = rpc_error(stub.UpdateState, pb.UpdateStateRequest(state=job_pb2.JOB_STATE_SAVING, sequence=0))
        assert zero.code() is grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()
    assert clients.alice.status(job_id).state is JobState.RUNNING


def test_stale_job_token_is_fenced_after_reap(server, clients, tmp_path):
    uploaded = clients.alice.upload(write(tmp_path / "in.txt", b"input"))
    job_id = submit_one(clients.alice, input_files=[uploaded])
    first = match(clients.agent)
    old = first.job_client()
    old.update_state(JobState.STARTED)
    old.update_state(JobState.RUNNING)
    # No heartbeat for a day: the reaper gives the attempt up and re-queues the job.
    reaped = server.reap_once(datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1))
    assert [(r.job_id, r.attempt, r.new_state) for r in reaped] == [(job_id, 1, JobState.WAITING)]
    assert clients.alice.status(job_id).state is JobState.WAITING

    def refused(fn, *args):
        with pytest.raises(PreconditionFailed) as info:
            fn(*args)
        assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION
        assert f"job {job_id}: token of attempt 1, but the job is at attempt 2" in info.value.details
        return info.value

    refused(old.heartbeat)
    refused(old.update_state, JobState.SAVING)
    refused(old.get_input, "in.txt", str(tmp_path))
    refused(old.put_output, write(tmp_path / "late.out", b"late"))
    refused(old.refresh_token)

    second = match(clients.agent, "pilot-2")
    assert (second.job_id, second.attempt) == (job_id, 2)
    refused(old.heartbeat)
    with second.job_client() as new:
        assert new.update_state(JobState.STARTED).state is JobState.STARTED
        assert new.heartbeat() is False
        # An admin requeue fences attempt 2 the same way.
        assert clients.admin.requeue(job_id, "testing") >= 2
        with pytest.raises(PreconditionFailed, match="attempt 2"):
            new.heartbeat()
    old.close()
    history = clients.alice.status(job_id).history
    assert any("lost" in e.detail for e in history)


def test_reaper_thread_requeues_lost_attempts(tmp_path, ca_dir, tokens):
    settings = StoreSettings(heartbeat_timeout=datetime.timedelta(seconds=3),  # the shortest wrappers can meet
                             start_timeout=datetime.timedelta(seconds=1))
    server = start_server(tmp_path, ca_dir, reap_interval=0.1, store_settings=settings)
    try:
        with BrokerClient(server.address, tokens.alice) as alice, AgentClient(server.address, tokens.agent) as agent:
            job_id = submit_one(alice)
            match(agent)  # never started
            deadline = time.monotonic() + 60
            while alice.status(job_id).state is not JobState.WAITING and time.monotonic() < deadline:
                time.sleep(0.1)
            status = alice.status(job_id)
            assert status.state is JobState.WAITING
            assert any("never started" in e.detail for e in status.history)
    finally:
        server.stop()


def test_refresh_token_gives_a_working_token_never_outliving_the_agent(server, clients, tokens):
    submit_one(clients.alice)
    matched = match(clients.agent)
    with matched.job_client() as job:
        old_serial = job.identity.serial
        job.update_state(JobState.STARTED)
        not_after = job.refresh_token(time_left_s=3600)
        assert job.identity.serial != old_serial and job.identity.attempt == 1
        assert not_after <= tokens.agent.certificate.not_valid_after_utc
        assert not_after <= datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=3601)
        assert job.update_state(JobState.RUNNING).state is JobState.RUNNING  # the sequence carries on
        # A token refreshed elsewhere (the agent, over the pipe) replaces the one in use.
        with JobClient(server.address, certificate_pem=matched.token_pem, private_key_pem=matched.key_pem,
                       first_sequence=3) as other:
            other.replace_token(job.token_pem, job.key_pem)
            assert other.identity.serial == job.identity.serial
            assert other.heartbeat() is False
            assert other.update_state(JobState.SAVING).state is JobState.SAVING
            stranger = clients.alice.submit(job_pb2.JobSpec(requirements=WALLTIME, executable="x"))[0]
            stranger_token = match(clients.agent, "pilot-2")
            assert stranger_token.job_id == stranger
            with pytest.raises(UsageError, match="not job"):
                other.replace_token(stranger_token.token_pem, stranger_token.key)


def test_a_wrapper_handed_the_agents_token_as_its_job_token_refuses_it(server, clients, tokens):
    """A JobStart carrying the agent's own token (a confused or rogue agent): the wrapper's link refuses it
    before connecting, naming the fix; the job at the broker is untouched. An RSA key is named too."""
    from pilot.pipe import messages as m
    from pilot.wrapper.broker_link import connect_grpc

    job_id = submit_one(clients.alice)
    matched = match(clients.agent)
    before = clients.alice.status(job_id)
    start = m.JobStart(job_id=matched.job_id, attempt=matched.attempt, spec=matched.spec,
                       token=m.JobToken(certificate_pem=certificate_pem(list(tokens.agent.chain)),
                                        private_key_pem=private_key_pem(tokens.agent.key)),
                       broker=m.BrokerEndpoint(address=server.address, ca_pem=server.ca_pem))
    with pytest.raises(UsageError, match="a job client needs a job token, got the agent token of glidein-a") as err:
        connect_grpc(start)
    assert "fix: use the job token that came with the match" in str(err.value)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(UsageError, match="the job token key is a .*RSAPrivateKey.*, not an elliptic-curve key"):
        JobClient(server.address, matched.token_pem, private_key_pem(rsa_key))
    after = clients.alice.status(job_id)
    assert (after.state, after.attempt, len(after.history)) == (before.state, before.attempt, len(before.history))


def test_the_wrappers_broker_link_talks_to_the_real_broker(server, clients):
    """pilot.wrapper.broker_link.connect_grpc builds a JobClient from the pipe's JobStart."""
    from pilot.wrapper.broker_link import connect_grpc

    job_id = submit_one(clients.alice)
    matched = match(clients.agent)
    start = m.JobStart(job_id=matched.job_id, attempt=matched.attempt, spec=matched.spec,
                       token=m.JobToken(certificate_pem=matched.token_pem, private_key_pem=matched.key_pem,
                                        not_after_unix=int(matched.not_after.timestamp())),
                       broker=m.BrokerEndpoint(address=server.address, ca_pem=server.ca_pem))
    link = connect_grpc(start)
    try:
        link.update_state(int(JobState.STARTED))
        assert link.heartbeat(0.0, 0, 0) is False
    finally:
        link.close()
    assert clients.alice.status(job_id).state is JobState.STARTED


#: A wrapper's broker link in a fresh interpreter: the JobStart and a refreshed token on stdin (never argv).
WRAPPER_LINK = r"""
import json, os, sys, tempfile
from pilot.api.states import JobState
from pilot.errors import UsageError
from pilot.pipe import messages as m
import pilot.wrapper.run
from pilot.wrapper.broker_link import connect_grpc

given = json.load(sys.stdin)
start = m.JobStart.FromString(bytes.fromhex(given["start"]))
link = connect_grpc(start)
done = {}
link.update_state(int(JobState.STARTED))
sandbox = tempfile.mkdtemp()
link.get_input("in.txt", os.path.join(sandbox, "in.txt"))
done["input"] = open(os.path.join(sandbox, "in.txt")).read()
link.replace_token(given["refreshed"].encode(), given["refreshed_key"].encode())
assert link.heartbeat(0.0, 0, 0) is False
fd = os.open(os.path.join(sandbox, "in.txt"), os.O_RDONLY)
link.put_output_fd(fd, "out.txt")
try:
    link.replace_token(given["stranger"].encode(), given["stranger_key"].encode())
except UsageError as exc:
    done["refused"] = str(exc)
link.close()
done["loaded"] = sorted({name.split(".")[0] for name in sys.modules} & {"cryptography", "grpc", "pilot"})
print(json.dumps(done))
"""


def test_the_wrappers_broker_link_never_loads_cryptography(server, clients, tmp_path):
    """A real wrapper's broker link in its own interpreter, against the real broker: a state, an input, a
    token refresh, a heartbeat with the new token, an output; a refreshed token for another job (a confused
    or hostile agent) refused, the link keeping its own; and `cryptography` never imported (its ~10 MiB)."""
    source = tmp_path / "in.txt"
    source.write_text("payload input")
    job_id = submit_one(clients.alice, input_files=[clients.alice.upload(source, "in.txt")])
    matched = match(clients.agent)
    with matched.job_client() as agent_side:
        agent_side.refresh_token()   # as the agent does: its new token goes to the wrapper over the pipe
        refreshed, refreshed_key = agent_side.token_pem, agent_side.key_pem
    submit_one(clients.alice)
    stranger = match(clients.agent, "pilot-2")
    start = m.JobStart(job_id=matched.job_id, attempt=matched.attempt, spec=matched.spec,
                       token=m.JobToken(certificate_pem=matched.token_pem, private_key_pem=matched.key_pem,
                                        not_after_unix=int(matched.not_after.timestamp())),
                       broker=m.BrokerEndpoint(address=server.address, ca_pem=server.ca_pem))
    given = {"start": start.SerializeToString().hex(), "refreshed": refreshed.decode(),
             "refreshed_key": refreshed_key.decode(), "stranger": stranger.token_pem.decode(),
             "stranger_key": stranger.key_pem.decode()}
    child = subprocess.run([sys.executable, "-c", WRAPPER_LINK], input=json.dumps(given), capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-3000:]
    done = json.loads(child.stdout)
    assert done["input"] == "payload input"
    assert done["refused"] == (f"the new token is for job {stranger.job_id} attempt 1, not job {job_id} attempt 1")
    assert done["loaded"] == ["grpc", "pilot"], "the wrapper's broker link loaded cryptography"
    status = clients.alice.status(job_id)
    assert status.state is JobState.STARTED
    assert [o.name for o in status.outputs] == ["out.txt"]
    assert clients.alice.status(stranger.job_id).state is not JobState.STARTED   # nothing done to the other job


def test_kill_of_a_running_job_reaches_it_through_heartbeats(server, clients):
    job_id = submit_one(clients.alice)
    matched = match(clients.agent)
    with matched.job_client() as job:
        job.update_state(JobState.STARTED)
        job.update_state(JobState.RUNNING)
        assert job.heartbeat() is False
        with pytest.raises(AccessDenied):
            clients.bob.kill(job_id)
        assert clients.alice.kill(job_id, "wrong input") is JobState.RUNNING
        assert job.heartbeat() is True
        answer = clients.agent.pilot_heartbeat("pilot-1", "node-1.example", [(job_id, 1)])
        assert answer.stop == [(job_id, 1)] and not answer.leave
        assert job.update_state(JobState.KILLED, "told by heartbeat").state is JobState.KILLED
    status = clients.alice.status(job_id)
    assert status.state is JobState.KILLED
    assert any("kill requested" in e.detail for e in status.history)


def test_kill_of_a_waiting_job_is_immediate(server, clients):
    job_id = submit_one(clients.alice)
    assert clients.alice.kill(job_id) is JobState.KILLED
    assert isinstance(clients.agent.match(SLOT, "pilot-1", "n"), NoMatch)
    assert clients.alice.kill(job_id) is JobState.KILLED  # already final: unchanged


def test_agent_reports_and_site_states(server, clients):
    job_id = submit_one(clients.alice)
    matched = match(clients.agent)
    with pytest.raises(AccessDenied):  # another pilot (and site) does not hold the attempt
        clients.agent_b.report_attempt_failure(job_id, 1, "wrapper", "not mine", "pilot-b")
    assert clients.agent.report_attempt_failure(job_id, 1, "wrapper", "segfault", "pilot-1") is JobState.WAITING
    with pytest.raises(PreconditionFailed):
        matched.job_client().heartbeat()
    assert clients.admin.set_site_state("SITE-A", "draining", "maintenance") == "enabled"
    answer = clients.agent.match(SLOT, "pilot-1", "n")
    assert isinstance(answer, NoMatch) and answer.leave and "draining" in answer.reason
    assert clients.agent.pilot_heartbeat("pilot-1", "n").leave
    assert isinstance(clients.agent_b.match(SLOT, "pilot-b", "n"), MatchedJob)  # SITE-B still matches
    clients.agent.report_pilot_end("pilot-1", "n", 1, "drained")
    assert {p.pilot_id for p in clients.admin.list_pilots()} == {"pilot-1", "pilot-b"}
    empty = clients.agent.match(SLOT, "pilot-9", "n")
    assert isinstance(empty, NoMatch) and empty.leave


def test_admin_reads_sites_pilots_and_filtered_jobs(server, clients):
    running = submit_one(clients.alice)
    bobs = submit_one(clients.bob)
    held = match(clients.agent)
    assert held.job_id == running
    with held.job_client() as wrapper:
        wrapper.update_state(JobState.STARTED)
    clients.agent_b.report_pilot_end("pilot-b", "node-b", 0, "idle")
    clients.admin.set_site_state("SITE-C", "disabled", "broken cooling")
    sites = {s.site: s for s in clients.admin.list_sites()}
    assert set(sites) == {"SITE-A", "SITE-B", "SITE-C"}
    assert (sites["SITE-A"].state, sites["SITE-A"].pilots_alive, sites["SITE-A"].jobs_running,
            sites["SITE-A"].jobs_waiting) == ("enabled", 1, 1, 1)
    assert (sites["SITE-B"].pilots_alive, sites["SITE-B"].empty_pilots) == (0, 1)
    assert (sites["SITE-C"].state, sites["SITE-C"].reason) == ("disabled", "broken cooling")
    alive = clients.admin.list_pilots(state="alive")
    assert [(p.pilot_id, p.current_job_ids, p.alive) for p in alive] == [("pilot-1", (running,), True)]
    ended = clients.admin.list_pilots(site="SITE-B", state="ended")
    assert [(p.pilot_id, p.end_reason, p.jobs_run, p.ended is not None) for p in ended] == \
        [("pilot-b", "empty", 0, True)]
    assert [j.job_id for j in clients.admin.list_all_jobs(owner="bob").jobs] == [bobs]
    assert [j.job_id for j in clients.admin.list_all_jobs(site="SITE-A").jobs] == [running]


def test_admin_requeue_of_a_failed_job_fences_its_old_token_and_refuses_a_killed_one(server, clients):
    failed = submit_one(clients.alice)
    matched = match(clients.agent)
    with matched.job_client() as wrapper:
        wrapper.update_state(JobState.STARTED)
        wrapper.update_state(JobState.RUNNING)
        wrapper.update_state(JobState.FAILED_EXECUTION, exit_code=127)
    assert clients.admin.requeue(failed, "the node lacked /cvmfs") == 2
    status = clients.alice.status(failed)
    assert status.state is JobState.WAITING and status.exit_code is None
    assert "re-queued from FAILED_EXECUTION (the node lacked /cvmfs)" in status.history[-1].detail
    with pytest.raises(PreconditionFailed), matched.job_client() as old:   # the failed attempt's token
        old.heartbeat()
    killed = submit_one(clients.alice)
    clients.alice.kill(killed)
    before = clients.alice.status(killed)
    with pytest.raises(PreconditionFailed) as info:
        clients.admin.requeue(killed, "again")
    assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert "KILLED -> WAITING is not allowed" in info.value.details and "fix: submit it again" in info.value.details
    assert clients.alice.status(killed) == before                        # not an event more


@pytest.mark.parametrize(("call", "field"), [
    (lambda admin: admin.list_pilots(state="sleeping"), "state 'sleeping' is not a pilot state"),
    (lambda admin: admin.list_pilots(site="../etc"), "site: site '../etc' is not a valid name"),
    (lambda admin: admin.list_all_jobs(owner="a b"), "owner: owner 'a b' is not a valid name"),
    (lambda admin: admin.list_all_jobs(site="x" * 65), "site: site 'xxx"),
    (lambda admin: admin.list_sites(failures_within_s=30 * 86400), "failures_within_s 2592000 is longer"),
    (lambda admin: admin.list_all_jobs(updated_since=datetime.datetime(9999, 12, 31, 23, 59, 59, 1000,
                                                                       tzinfo=datetime.UTC)),
     "updated_since_unix_ms 253402300799001 is not a time between 1970 and 9999"),
])
def test_admin_queries_refuse_bad_filters_naming_the_field(server, clients, call, field):
    submit_one(clients.alice)
    with pytest.raises(InvalidRequest) as info:
        call(clients.admin)
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT and field in info.value.details
    assert "fix:" in info.value.details
    assert clients.admin.list_all_jobs().counts[JobState.WAITING] == 1  # and the broker still serves


def test_admin_queries_refuse_other_roles_through_the_client(server, tokens):
    """A user, an agent or a job token presented to the admin client: PERMISSION_DENIED, nothing set."""
    for token in (tokens.alice, tokens.agent, tokens.job):
        with AdminClient(server.address, token) as intruder:
            for attempt in (intruder.list_sites, intruder.list_pilots,
                            lambda i=intruder: i.set_site_state("SITE-A", "disabled", "mine now")):
                with pytest.raises(AccessDenied) as info:
                    attempt()
                assert info.value.code is grpc.StatusCode.PERMISSION_DENIED
                assert "admin token" in info.value.details
    with AdminClient(server.address, tokens.admin) as admin:
        assert admin.list_sites() == []  # no site state was written


# ------------------------------------------------------------------ bad requests and error codes

def test_store_and_input_errors_map_to_codes(server, clients, tokens, tmp_path):
    with pytest.raises(NotFound) as info:
        clients.alice.status(987654)
    assert info.value.code is grpc.StatusCode.NOT_FOUND and "no job 987654" in info.value.details
    job_id = submit_one(clients.alice)
    with pytest.raises(AccessDenied) as info:
        clients.bob.status(job_id)
    assert info.value.code is grpc.StatusCode.PERMISSION_DENIED and "belongs to another user" in info.value.details
    assert "alice" not in info.value.details  # a user guessing ids learns no other user's name
    assert clients.admin.list_all_jobs().jobs[0].job_id == job_id
    with BrokerClient(server.address, tokens.admin) as admin_as_user:  # admins may use UserService on any job
        assert admin_as_user.status(job_id).owner == "alice"
    with pytest.raises(InvalidRequest, match="executable is empty"):
        clients.alice.submit(job_pb2.JobSpec(requirements=WALLTIME, executable=""))
    missing = job_pb2.InputFile(name="x.dat", size=3, sha256="ab" * 32)
    with pytest.raises(PreconditionFailed, match="upload the file first"):
        clients.alice.submit(job_pb2.JobSpec(requirements=WALLTIME, executable="x", input_files=[missing]))
    uploaded = clients.alice.upload(write(tmp_path / "a.txt", b"abc"))
    wrong_size = job_pb2.InputFile(name="a.txt", size=4, sha256=uploaded.sha256)
    with pytest.raises(InvalidRequest, match="size 4 differs"):
        clients.alice.submit(job_pb2.JobSpec(requirements=WALLTIME, executable="x", input_files=[wrong_size]))
    with pytest.raises(InvalidRequest, match="'..'"):
        clients.alice.submit(job_pb2.JobSpec(requirements=WALLTIME, executable="x", output_patterns=["../etc/*"]))
    with pytest.raises(NotFound, match="no output named"):
        clients.alice.output(job_id, str(tmp_path / "o"), ["nothing.out"])
    assert clients.alice.list().counts[JobState.WAITING] == 1  # every refused batch queued nothing


def test_match_refuses_bad_keys_and_keeps_serving(server, clients, tokens):
    submit_one(clients.alice)
    channel = raw_channel(server, tokens.agent)
    stub = rpc_pb.AgentServiceStub(channel)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        for key, words in ((b"", "empty"), (b"garbage", "not a certificate request or public key"),
                           (rsa_key.public_bytes(*der), "P-256"), (p384.public_bytes(*der), "P-256")):
            error = rpc_error(stub.Match, pb.MatchRequest(slot=pb.Slot(**SLOT), pilot_id="p", node="n",
                                                          job_public_key=key))
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and words in error.details(), error.details()
        no_pilot = rpc_error(stub.Match, pb.MatchRequest(slot=pb.Slot(**SLOT), job_public_key=p384.public_bytes(*der)))
        assert no_pilot.code() is grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()
    assert clients.alice.status(1).state is JobState.WAITING  # nothing was claimed by the refused calls
    assert isinstance(clients.agent.match(SLOT, "p", "n"), MatchedJob)


# ------------------------------------------------------------------ files

def _upload_raw(server, token, chunks):
    channel = raw_channel(server, token)
    try:
        return rpc_pb.UserServiceStub(channel).UploadFile(iter(chunks), timeout=30)
    finally:
        channel.close()


def _header(name: str, data: bytes, *, size: int | None = None,
            sha256: str | None = None) -> pb.UploadFileRequest:
    return pb.UploadFileRequest(header=pb.FileHeader(name=name, size=len(data) if size is None else size,
                                             sha256=sha256 or hashlib.sha256(data).hexdigest()))


def _files(server) -> FileStore:
    return server.broker.files


def test_oversized_upload_is_refused_on_the_header(small_server, tokens):
    consumed = 0

    def endless():
        nonlocal consumed
        yield _header("huge.bin", b"", size=10 << 30, sha256="0" * 64)
        while consumed < 20_000:
            consumed += 1
            yield pb.UploadFileRequest(data=b"\0" * (1 << 20))

    with pytest.raises(grpc.RpcError) as info:
        _upload_raw(small_server, tokens.alice, endless())
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "10 GiB exceeds the broker's per-file limit of 64 KiB" in info.value.details()
    assert consumed < 100  # refused on the header, not after 10 GiB
    assert _files(small_server).usage() == (0, 0) and _files(small_server).temp_files() == []


def test_oversized_upload_through_the_client(small_server, tokens, tmp_path):
    with BrokerClient(small_server.address, tokens.alice) as alice:
        with pytest.raises(InvalidRequest, match="per-file limit") as info:
            alice.upload(write(tmp_path / "big.bin", b"x" * (65 * KiB)))
        assert info.value.exit_code == 2
        assert alice.upload(write(tmp_path / "ok.bin", b"x" * (64 * KiB))).size == 64 * KiB


def test_per_job_output_limit(small_server, tokens, tmp_path):
    with BrokerClient(small_server.address, tokens.alice) as alice, \
            AgentClient(small_server.address, tokens.agent) as agent:
        submit_one(alice)
        with match(agent).job_client() as job:
            job.update_state(JobState.STARTED)
            job.update_state(JobState.RUNNING)
            job.put_output(write(tmp_path / "a.out", b"a" * (60 * KiB)))
            job.put_output(write(tmp_path / "a.out", b"b" * (60 * KiB)))  # replaces a.out: still 60 KiB
            with pytest.raises(InvalidRequest, match="per-job output limit"):
                job.put_output(write(tmp_path / "b.out", b"c" * (60 * KiB)))


def test_corrupted_upload_is_refused_and_nothing_stored(server, tokens):
    data = b"the real content\n" * 100
    before = _files(server).usage()
    with pytest.raises(grpc.RpcError) as info:
        _upload_raw(server, tokens.alice, [_header("c.txt", data, sha256=hashlib.sha256(b"other").hexdigest()),
                                           pb.UploadFileRequest(data=data)])
    error = info.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "nothing was stored" in error.details()
    for chunks, words in (
            ([_header("short.txt", data), pb.UploadFileRequest(data=data[:10])], "arrived"),
            ([_header("long.txt", data[:10]), pb.UploadFileRequest(data=data)], "were sent"),
            ([pb.UploadFileRequest(data=data)], "header"),
            ([], "header"),
            ([_header("../escape", data), pb.UploadFileRequest(data=data)], "'..'"),
            ([_header("big-chunk", b"x" * ((1 << 20) + 1)), pb.UploadFileRequest(data=b"x" * ((1 << 20) + 1))],
             "1 MiB"),
            ([_header("twice", data), _header("twice", data)], "only the first"),
            ([_header("bad-sha", data, sha256="XYZ")], "64 lower-case hexadecimal")):
        with pytest.raises(grpc.RpcError) as info:
            _upload_raw(server, tokens.alice, chunks)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (words, info.value.details())
        assert words in info.value.details(), info.value.details()
    assert _files(server).usage() == before and _files(server).temp_files() == []
    good = _upload_raw(server, tokens.alice, [_header("c.txt", data), pb.UploadFileRequest(data=data)])
    again = _upload_raw(server, tokens.alice, [_header("c.txt", data), pb.UploadFileRequest(data=data)])
    assert not good.already_present and again.already_present and again.sha256 == good.sha256
    assert _files(server).usage() == (before[0] + 1, before[1] + len(data))


def test_job_client_verifies_inputs(server, clients, tmp_path):
    data = b"precious input\n"
    uploaded = clients.alice.upload(write(tmp_path / "p.txt", data))
    submit_one(clients.alice, input_files=[uploaded])
    # Damage the broker's copy: the job client must refuse it and keep nothing.
    stored = _files(server).path(uploaded.sha256)
    os.chmod(stored, 0o600)
    with open(stored, "wb") as handle:
        handle.write(b"precious inpuT\n")
    (tmp_path / "sandbox").mkdir()
    with match(clients.agent).job_client() as job:
        job.update_state(JobState.STARTED)
        with pytest.raises(ChecksumMismatch):
            job.get_input("p.txt", str(tmp_path / "sandbox"))
        assert not (tmp_path / "sandbox" / "p.txt").exists()
        assert os.listdir(tmp_path / "sandbox") == []
        with pytest.raises(NotFound, match="no input named"):
            job.get_input("other.txt", str(tmp_path / "sandbox"))


# ------------------------------------------------------------------ metrics, start-up

def scrape(port: int) -> tuple[str, dict[str, str], dict[tuple[str, tuple], float]]:
    """GET /metrics: (content type, {family: type}, {(sample name, sorted labels): value}), parsed by
    prometheus_client's own parser (a malformed exposition fails here)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        content_type, text = response.headers["Content-Type"], response.read().decode()
    families = list(text_string_to_metric_families(text))
    types = {family.name: family.type for family in families}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families for s in family.samples}
    return content_type, types, samples


def test_metrics_endpoint(server, clients):
    """A real scrape, parsed by prometheus_client: the store's figures at scrape time, this process's
    counters, and the call durations as a histogram (not `_sum`/`_count` typed as counters)."""
    two_cores = job_pb2.Requirements(cores=2, walltime_s=3600)
    submit_one(clients.alice, requirements=two_cores)
    submit_one(clients.alice, requirements=two_cores)
    match(clients.agent)
    assert isinstance(clients.agent_b.match({"cores": 1, "time_left_s": 3600}, "pilot-b", "n"), NoMatch)
    clients.agent_b.report_pilot_end("pilot-b", "n", 0, "idle")
    with pytest.raises(NotFound):
        clients.alice.status(999)
    content_type, types, samples = scrape(server.metrics_port)
    assert content_type.startswith("text/plain; version=0.0.4")
    expected = {("splitpilot_jobs", (("state", "WAITING"),)): 1, ("splitpilot_jobs", (("state", "ASSIGNED"),)): 1,
                ("splitpilot_jobs", (("state", "DONE"),)): 0,
                ("splitpilot_matches_total", ()): 1, ("splitpilot_broker_matches_total", ()): 1,
                ("splitpilot_lost_attempts_total", ()): 0, ("splitpilot_pilots_seen", ()): 2,
                ("splitpilot_empty_pilots_total", ()): 1,
                ("splitpilot_match_requests_total", (("result", "empty"),)): 1,
                ("splitpilot_match_requests_total", (("result", "refused"),)): 0,
                ("splitpilot_rpc_requests_total", (("code", "OK"), ("method", "Match"))): 2,
                ("splitpilot_rpc_requests_total", (("code", "NOT_FOUND"), ("method", "GetJob"))): 1,
                ("splitpilot_rpc_errors_total", (("method", "GetJob"),)): 1,
                ("splitpilot_rpc_duration_seconds_count", (("method", "Match"),)): 2,
                ("splitpilot_rpc_duration_seconds_bucket", (("le", "+Inf"), ("method", "Match"))): 2}
    assert {key: samples.get(key) for key in expected} == expected
    assert ("splitpilot_rpc_errors_total", (("method", "Match"),)) not in samples  # only calls that failed
    assert samples[("splitpilot_identity_cache_misses_total", ())] >= 2  # two agents, each verified once
    assert types["splitpilot_matches"] == "counter" and types["splitpilot_jobs"] == "gauge"
    assert types["splitpilot_pilots_seen"] == "gauge" and types["splitpilot_rpc_duration_seconds"] == "histogram"
    assert not [name for name, kind in types.items() if kind == "counter" and name.endswith(("_sum", "_count"))]
    url = f"http://127.0.0.1:{server.metrics_port}"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{url}/other", timeout=30)
    assert info.value.code == 404


def test_each_broker_counts_its_own_calls(tmp_path, ca_dir, tokens):
    """Two brokers in one process (tests, embedding programs): each registry holds its own counters,
    so a call to one never shows in the other's scrape, and neither leaks into the global registry."""
    first, second = start_server(tmp_path, ca_dir), start_server(tmp_path, ca_dir)
    try:
        with BrokerClient(first.address, tokens.alice) as alice, pytest.raises(NotFound):
            alice.status(999)
        key = ("splitpilot_rpc_requests_total", (("code", "NOT_FOUND"), ("method", "GetJob")))
        assert scrape(first.metrics_port)[2].get(key) == 1
        assert key not in scrape(second.metrics_port)[2]
        assert REGISTRY.get_sample_value("splitpilot_rpc_requests_total",
                                         {"method": "GetJob", "code": "NOT_FOUND"}) is None
    finally:
        first.stop()
        second.stop()


def test_state_dir_is_locked_and_host_token_reused(tmp_path, ca_dir):
    first = start_server(tmp_path, ca_dir)
    try:
        with pytest.raises(BrokerStartError, match="another broker is running"):
            BrokerServer(BrokerConfig(state_dir=first.state_dir, ca_dir=ca_dir, listen="127.0.0.1:0",
                                      reap_interval=0)).start()
        with pytest.raises(BrokerStartError, match="cannot listen"):
            start_server(tmp_path, ca_dir, listen=f"127.0.0.1:{first.port}")
        host_pem = open(os.path.join(first.state_dir, "host.pem"), "rb").read()
        address = open(os.path.join(first.state_dir, "address")).read().strip()
        assert address == first.address
    finally:
        first.stop()
    again = BrokerServer(BrokerConfig(state_dir=first.state_dir, ca_dir=ca_dir, listen="127.0.0.1:0",
                                      reap_interval=0))
    again.start()
    again.stop()
    assert open(os.path.join(first.state_dir, "host.pem"), "rb").read() == host_pem
    renamed = BrokerServer(BrokerConfig(state_dir=first.state_dir, ca_dir=ca_dir, listen="127.0.0.1:0",
                                        reap_interval=0, host_names=("broker.example.org",)))
    renamed.start()
    renamed.stop()
    identity = parse_identity(load_certificates(open(os.path.join(first.state_dir, "host.pem"), "rb").read())[0])
    assert "broker.example.org" in identity.dns_names


def test_first_start_creates_the_ca(tmp_path, tokens):
    state = tmp_path / "fresh"
    with BrokerServer(BrokerConfig(state_dir=str(state), listen="127.0.0.1:0", reap_interval=0)) as server:
        assert (state / "ca" / "ca.key").exists() and (state / "ca" / "ca.crt").exists()
        user = server.ca.new_token(TokenRole.USER, "carol")
        with BrokerClient(server.address, user) as client:
            assert client.list().jobs == []
        # A token of another CA (the module's) is not this new broker's: said before connecting.
        with pytest.raises(TokenUnusable, match="is not from this broker's CA"):
            BrokerClient(server.address, tokens.alice, server.ca_pem)


# ------------------------------------------------------------------ a pilot's end and its isolation

def test_an_abandoned_pilot_gives_its_jobs_back_at_once_and_only_its_own(server, clients):
    """The guardian of an agent killed by its payload reports the pilot abandoned: the broker re-queues
    the jobs that pilot holds within the call (not at the reaper's timeout) and records the slot's
    isolation it was matched with; a badly formed isolation is the caller's mistake, not INTERNAL."""
    mine, theirs = submit_one(clients.alice), submit_one(clients.alice)
    with pytest.raises(InvalidRequest) as refused:
        clients.agent.match({**SLOT, "isolation": "none\x1b[31m"}, "pilot-1", "node-1.example")
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT and "isolation" in refused.value.details
    assert clients.alice.status(mine).state is JobState.WAITING  # the refusal claimed nothing
    first = clients.agent.match({**SLOT, "isolation": "namespace"}, "pilot-1", "node-1.example")
    second = clients.agent.match(SLOT, "pilot-2", "node-2.example")
    assert {first.job_id, second.job_id} == {mine, theirs}
    clients.agent.report_pilot_end("pilot-1", "node-1.example", 1, "agent killed by SIGKILL", abandoned=True)
    gone = clients.alice.status(first.job_id)
    assert gone.state is JobState.WAITING
    assert "isolation: namespace" in gone.history[1].detail
    assert "its agent died (agent killed by SIGKILL)" in gone.history[-1].detail
    assert clients.alice.status(second.job_id).state is JobState.ASSIGNED
