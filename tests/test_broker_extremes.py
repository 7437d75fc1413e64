"""Every RPC of the broker, called by a careless or hostile client with extreme values, on a real
BrokerServer over mutual TLS, on SQLite and on a private PostgreSQL: no answer is ever INTERNAL (or
UNKNOWN). A caller's mistake is INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION or PERMISSION_DENIED
with a message, the broker keeps serving, and no refused call leaves a row behind.

Each request starts from a valid one (so that a mutation reaches the code behind the first check)
and changes one field, at any depth, to one extreme: 0, 2^63, 2^64-1, the int32 ends, NaN, an enum
value nobody knows, an empty, huge or control-character string, huge bytes, a list of 5,000 items.
Then the same with an invalid UTF-8 string on the wire (which protobuf cannot even decode).
"""

from __future__ import annotations

import datetime
import hashlib
import math
from types import SimpleNamespace

import grpc
import pytest
from google.protobuf import descriptor as d
from pg import pg_server, pg_url  # noqa: F401  (fixtures: a private PostgreSQL server)

from broker.ca import CertificateAuthority
from broker.server import BrokerConfig, BrokerServer
from pilot.api.client import AgentClient, BrokerClient, JobClient, MatchedJob
from pilot.api.states import JobState
from pilot.tokens import TokenRole
from pilot.tokens.files import certificate_pem, private_key_pem
from splitpilot.broker.v1 import broker_pb2 as pb
from splitpilot.job.v1 import job_pb2

HOUR = job_pb2.Requirements(walltime_s=3600)
SLOT = {"cores": 4, "memory_mb": 8000, "disk_mb": 10000, "time_left_s": 86400}
BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
MiB = 1 << 20

INTEGERS = {
    d.FieldDescriptor.TYPE_UINT64: (0, 1, 2**63 - 1, 2**63, 2**64 - 1),
    d.FieldDescriptor.TYPE_UINT32: (0, 2**31, 2**32 - 1),
    d.FieldDescriptor.TYPE_INT64: (-(2**63), -1, 2**63 - 1),
    d.FieldDescriptor.TYPE_INT32: (-(2**31), -1, 2**31 - 1),
    d.FieldDescriptor.TYPE_DOUBLE: (math.nan, math.inf, -math.inf, 1e308),
    d.FieldDescriptor.TYPE_BOOL: (True,),
}
STRINGS = ("", "a" * MiB, "\x00", "nul\x00inside", "two\nlines", "\x1b[31mred", "evil\u202etxt", "../../etc/passwd",
           "/", "☃" * 1000)
BYTES = (b"", b"\x00" * MiB, bytes(range(256)))


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("extremes-ca") / "ca")
    CertificateAuthority.init(path)
    return path


@pytest.fixture(scope="module")
def tokens(ca_dir) -> SimpleNamespace:
    ca = CertificateAuthority.load(ca_dir)
    return SimpleNamespace(
        user=ca.new_token(TokenRole.USER, "alice"), admin=ca.new_token(TokenRole.ADMIN, "root"),
        agent=ca.new_token(TokenRole.AGENT, "glidein-a", site="SITE-A", queue="default"))


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request, tmp_path, ca_dir):
    extra = {"db_url": request.getfixturevalue("pg_url")} if request.param == "postgresql" else {}
    server = BrokerServer(BrokerConfig(state_dir=str(tmp_path / "state"), ca_dir=ca_dir, listen="127.0.0.1:0",
                                       reap_interval=0, grace=1.0, **extra))
    server.start()
    yield server
    server.stop()


def channel(server: BrokerServer, chain_pem: bytes, key_pem: bytes) -> grpc.Channel:
    return grpc.secure_channel(server.address, grpc.ssl_channel_credentials(server.ca_pem, key_pem, chain_pem),
                               options=[("grpc.max_send_message_length", 64 * MiB),
                                        ("grpc.max_receive_message_length", 64 * MiB)])


def token_channel(server: BrokerServer, token) -> grpc.Channel:
    return channel(server, certificate_pem(list(token.chain[:1])), private_key_pem(token.key))


# ------------------------------------------------------------------ request variants

def scalar_values(field: d.FieldDescriptor) -> tuple:
    if field.type == d.FieldDescriptor.TYPE_ENUM:
        return (2**31 - 1, 99, -5)
    if field.type == d.FieldDescriptor.TYPE_STRING:
        return STRINGS
    if field.type == d.FieldDescriptor.TYPE_BYTES:
        return BYTES
    return INTEGERS.get(field.type, ())


def variants(base, depth: int = 0):
    """(description, request) for BASE with one field changed to one extreme value, at any depth."""
    for field in base.DESCRIPTOR.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            for key, value in (("", "v"), ("A=B", "v"), ("NUL\x00", "v"), ("BIG", "x" * MiB), ("OK", "\x00")):
                changed = type(base)()
                changed.CopyFrom(base)
                getattr(changed, field.name)[key] = value
                yield f"{field.name}[{key[:8]!r}]", changed
            continue
        if field.type == d.FieldDescriptor.TYPE_MESSAGE:
            if depth >= 3:
                continue
            inner = getattr(base, field.name)
            if field.is_repeated:
                template = inner[0] if len(inner) else field.message_type._concrete_class()
                for description, changed_item in variants(template, depth + 1):
                    changed = type(base)()
                    changed.CopyFrom(base)
                    del getattr(changed, field.name)[:]
                    getattr(changed, field.name).add().CopyFrom(changed_item)
                    yield f"{field.name}[0].{description}", changed
                many = type(base)()
                many.CopyFrom(base)
                getattr(many, field.name).extend([template] * 5000)
                yield f"{field.name} x 5000", many
            else:
                for description, changed_inner in variants(inner, depth + 1):
                    changed = type(base)()
                    changed.CopyFrom(base)
                    getattr(changed, field.name).CopyFrom(changed_inner)
                    yield f"{field.name}.{description}", changed
            continue
        for value in scalar_values(field):
            changed = type(base)()
            changed.CopyFrom(base)
            if field.is_repeated:
                getattr(changed, field.name).append(value)
                shown = f"{field.name}[+{value!r:.20}]"
            else:
                setattr(changed, field.name, value)
                shown = f"{field.name}={value!r:.20}"
            yield shown, changed
        if field.is_repeated and scalar_values(field):
            many = type(base)()
            many.CopyFrom(base)
            getattr(many, field.name).extend([scalar_values(field)[-1]] * 5000)
            yield f"{field.name} x 5000", many


def invalid_utf8(base) -> list[tuple[str, bytes]]:
    """BASE serialised, with each top-level string field set (last value wins) to bytes that are not UTF-8."""
    found = []
    for field in base.DESCRIPTOR.fields:
        if field.type == d.FieldDescriptor.TYPE_STRING and not field.is_repeated:
            tag = (field.number << 3) | 2
            found.append((f"{field.name}=<not UTF-8>",
                          base.SerializeToString() + _varint(tag) + bytes([4]) + b"\xff\xfe\xc3\x28"))
    return found


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# ------------------------------------------------------------------ calling

class Caller:
    """Calls one RPC with raw requests and records any answer that is INTERNAL or UNKNOWN."""

    def __init__(self, channel: grpc.Channel, service: str) -> None:
        self.channel = channel
        self.service = pb.DESCRIPTOR.services_by_name[service]
        self.bad: list[str] = []
        self.calls = 0

    def __call__(self, method_name: str, request: bytes, description: str, *, wrap=None) -> None:
        method = self.service.methods_by_name[method_name]
        path = f"/{self.service.full_name}/{method_name}"
        self.calls += 1
        try:
            if method.client_streaming:
                messages = wrap(request) if wrap else [request]
                self.channel.stream_unary(path, lambda b: b, lambda b: b)(iter(messages), timeout=60)
            elif method.server_streaming:
                list(self.channel.unary_stream(path, lambda b: b, lambda b: b)(request, timeout=60))
            else:
                self.channel.unary_unary(path, lambda b: b, lambda b: b)(request, timeout=60)
        except grpc.RpcError as exc:
            if exc.code() in BAD_CODES or not exc.details():
                self.bad.append(f"{method_name} {description}: {exc.code().name} {exc.details()!r}")

    def sweep(self, method_name: str, base) -> None:
        for description, request in variants(base):
            self(method_name, request.SerializeToString(), description)
        for description, raw in invalid_utf8(base):
            self(method_name, raw, description)


def file_stream(header_message_type):
    """A client stream for a serialised FileHeader: the header, then one data chunk."""
    def wrap(header_bytes: bytes) -> list[bytes]:
        header = pb.FileHeader.FromString(header_bytes) if _decodes(header_bytes) else None
        first = header_message_type(header=header).SerializeToString() if header is not None else \
            _varint((1 << 3) | 2) + _varint(len(header_bytes)) + header_bytes
        return [first, header_message_type(data=b"data").SerializeToString()]
    return wrap


def _decodes(raw: bytes) -> bool:
    try:
        pb.FileHeader.FromString(raw)
    except Exception:  # noqa: BLE001
        return False
    return True


def test_no_rpc_answers_internal_to_extreme_values(server, tokens, tmp_path):
    data = b"input data"
    digest = hashlib.sha256(data).hexdigest()
    with BrokerClient(server.address, tokens.user) as alice, AgentClient(server.address, tokens.agent) as agent:
        (tmp_path / "in.dat").write_bytes(data)
        uploaded = alice.upload(str(tmp_path / "in.dat"))
        spec = job_pb2.JobSpec(executable="run.sh", arguments=["a"], environment={"A": "1"}, name="base",
                               input_files=[uploaded], output_patterns=["*.out"], max_attempts=3, priority=1,
                               requirements=job_pb2.Requirements(cores=1, memory_mb=100, disk_mb=100, walltime_s=3600,
                                                                 platform="el9", sites_allowed=["SITE-A"]))
        job_ids = alice.submit([spec, spec])
        matched = agent.match({**SLOT, "platforms": ["el9"]}, "pilot-x", "node-x")
        assert isinstance(matched, MatchedJob)
        with JobClient(server.address, matched.token_pem, matched.key_pem) as job:
            job.update_state(JobState.STARTED)
        job_id = matched.job_id
    channels = [token_channel(server, tokens.user), token_channel(server, tokens.agent),
                token_channel(server, tokens.admin), channel(server, matched.token_pem, matched.key_pem)]
    user, agent_, admin, job_ = (Caller(channels[0], "UserService"), Caller(channels[1], "AgentService"),
                                 Caller(channels[2], "AdminService"), Caller(channels[3], "JobService"))
    try:
        user.sweep("Submit", pb.SubmitRequest(jobs=[spec]))
        user.sweep("GetJob", pb.GetJobRequest(job_id=job_ids[1]))
        user.sweep("ListJobs", pb.ListJobsRequest(states=[JobState.WAITING], limit=10, before_job_id=99))
        user.sweep("KillJob", pb.KillJobRequest(job_id=2**62, reason="r"))
        user.sweep("DownloadOutput", pb.DownloadOutputRequest(job_id=job_id, name="x.out"))
        for description, header in variants(pb.FileHeader(name="f.dat", size=len(data), sha256=digest)):
            user("UploadFile", header.SerializeToString(), f"header.{description}",
                 wrap=file_stream(pb.UploadFileRequest))
        key = _der(matched)
        agent_.sweep("Match", pb.MatchRequest(slot=pb.Slot(**SLOT, platforms=["el9"], isolation="none"),
                                              pilot_id="pilot-y", node="n", job_public_key=key))
        agent_.sweep("PilotHeartbeat", pb.PilotHeartbeatRequest(pilot_id="pilot-x", node="n", cores_in_use=1,
                                                                running=[pb.RunningAttempt(job_id=job_id, attempt=1)]))
        agent_.sweep("ReportAttemptFailure", pb.ReportAttemptFailureRequest(
            job_id=2**62, attempt=1, failure=pb.ATTEMPT_FAILURE_WRAPPER, detail="d", pilot_id="pilot-x"))
        agent_.sweep("ReportPilotEnd", pb.ReportPilotEndRequest(pilot_id="pilot-z", node="n", jobs_run=0,
                                                                reason="idle"))
        job_.sweep("Heartbeat", pb.HeartbeatRequest(cpu_seconds=1.0, rss_bytes=1, sandbox_bytes=1))
        job_.sweep("GetInput", pb.GetInputRequest(name="in.dat"))
        job_.sweep("RefreshToken", pb.RefreshTokenRequest(public_key=key, time_left_s=3600))
        for description, header in variants(pb.FileHeader(name="o.out", size=len(data), sha256=digest)):
            job_("PutOutput", header.SerializeToString(), f"header.{description}",
                 wrap=file_stream(pb.PutOutputRequest))
        job_.sweep("UpdateState", pb.UpdateStateRequest(state=JobState.RUNNING, detail="d", sequence=2))
        admin.sweep("SetSiteState", pb.SetSiteStateRequest(site="SITE-Z", state=pb.SITE_STATE_ENABLED, reason="r"))
        admin.sweep("ListPilots", pb.ListPilotsRequest(seen_within_s=60))
        admin.sweep("Requeue", pb.RequeueRequest(job_id=2**62, reason="r"))
        admin.sweep("ListAllJobs", pb.ListAllJobsRequest(states=[JobState.WAITING], limit=10))
        admin.sweep("RevokeToken", pb.RevokeTokenRequest(serial="ffff", reason="r"))
        admin.sweep("RevokeToken", pb.RevokeTokenRequest(holder=pb.TokenHolder(subject="nobody-here", role="user"),
                                                         reason="r"))
        admin.sweep("ListRevoked", pb.ListRevokedRequest())
        bad = user.bad + agent_.bad + job_.bad + admin.bad
        calls = user.calls + agent_.calls + job_.calls + admin.calls
        assert not bad, f"{len(bad)} of {calls} calls answered INTERNAL/UNKNOWN:\n" + "\n".join(bad[:40])
        assert calls > 600
        # Still serving, and no submission, refused or not, left a requirement class without a job.
        with BrokerClient(server.address, tokens.user) as alice:
            assert alice.status(job_ids[1]).job_id == job_ids[1]
        assert server.store._read(lambda cur: cur.row(
            "SELECT count(*) FROM classes WHERE id NOT IN (SELECT class_id FROM jobs)"))[0] == 0
    finally:
        for c in channels:
            c.close()


def _der(matched: MatchedJob) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return matched.key.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)


def test_refresh_token_with_a_huge_time_left_is_capped_not_internal(server, tokens):
    """RefreshToken(time_left_s=10^12) once answered INTERNAL: now the token is capped by the pilot's."""
    with BrokerClient(server.address, tokens.user) as alice, AgentClient(server.address, tokens.agent) as agent:
        alice.submit(job_pb2.JobSpec(executable="x", requirements=HOUR))
        matched = agent.match(SLOT, "pilot-r", "n")
        with matched.job_client() as job:
            for huge in (10**12, 2**64 - 1):
                not_after = job.refresh_token(time_left_s=huge)
                assert not_after <= tokens.agent.certificate.not_valid_after_utc
                assert not_after > datetime.datetime.now(datetime.UTC)
