"""Forward compatibility of the broker API, with a "next minor" of broker.proto and job.proto made in
the test run (tests/next_minor.py: a new job state, fields, a Match answer of a new kind, new enum
values, a new RPC):

  - a newer broker (a stand-in servicer on the newer schemas, in a subprocess, over mutual TLS)
    against this version's clients and CLI: a state they do not know reads UNKNOWN(15), is logged
    once, and breaks nothing (status, listing, kill, `splitpilot job status`); a Match answer of a new
    kind is an empty match with a pause, not a busy loop;
  - a newer client (a subprocess on the newer schemas) against this broker: new enum values are
    refused with INVALID_ARGUMENT or handled as broker.proto documents, a new RPC is UNIMPLEMENTED,
    unknown fields are kept; never INTERNAL.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
from next_minor import make_next_minor

from broker.ca import CertificateAuthority
from broker.server import BrokerConfig, BrokerServer
from pilot.api import states
from pilot.api.client import AgentClient, BrokerClient, NoMatch
from pilot.api.states import JobState
from pilot.tokens import TokenRole
from pilot.tokens.files import certificate_pem, private_key_pem, write_private

BIN = pathlib.Path(sys.executable).parent / "splitpilot"

NEWER_BROKER = r'''
import sys
from concurrent import futures

import grpc
from splitpilot.broker.v1 import broker_pb2 as pb
from splitpilot.broker.v1 import broker_pb2_grpc as rpc
from splitpilot.job.v1 import job_pb2

key, chain, ca = (open(path, "rb").read() for path in sys.argv[1:4])
PAUSED = job_pb2.JOB_STATE_PAUSED


def info(job_id):
    spec = job_pb2.JobSpec(executable="run.sh", name="newer", owner="alice", accounting_group="physics")
    return pb.JobInfo(job_id=job_id, spec=spec, state=PAUSED, attempt=1, queue="long", message="held", history=[
        pb.JobEvent(state=job_pb2.JOB_STATE_WAITING, attempt=0, detail="submitted"),
        pb.JobEvent(state=PAUSED, attempt=1, detail="held by its owner")])


class User(rpc.UserServiceServicer):
    def GetJob(self, request, context):
        return pb.GetJobResponse(job=info(request.job_id))

    def ListJobs(self, request, context):
        return pb.ListJobsResponse(jobs=[info(7)], counts_by_state={"JOB_STATE_PAUSED": 3, "JOB_STATE_WAITING": 1})

    def KillJob(self, request, context):
        return pb.KillJobResponse(state=PAUSED)


class Agent(rpc.AgentServiceServicer):
    def Match(self, request, context):
        return pb.MatchResponse(drain=pb.Drain(reason="leave when done"))


server = grpc.server(futures.ThreadPoolExecutor(4))
rpc.add_UserServiceServicer_to_server(User(), server)
rpc.add_AgentServiceServicer_to_server(Agent(), server)
port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, chain)], root_certificates=ca,
                                                                          require_client_auth=True))
server.start()
print(port, flush=True)
sys.stdin.read()  # until the test closes our stdin
server.stop(0)
'''

NEWER_CLIENT = r'''
import json
import sys

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from splitpilot.broker.v1 import broker_pb2 as pb
from splitpilot.broker.v1 import broker_pb2_grpc as rpc
from splitpilot.job.v1 import job_pb2

address, ca_path, user_path, agent_path, admin_path = sys.argv[1:6]
ca = open(ca_path, "rb").read()


def channel(pem):
    key = pem[pem.index(b"-----BEGIN " b"PRIVATE KEY-----"):]
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca, key, pem[:pem.index(b"-----BEGIN PRIVATE")]))


results = {}


def call(name, method, request):
    try:
        answer = method(request, timeout=30)
    except grpc.RpcError as exc:
        results[name] = [exc.code().name, exc.details()]
        return None
    results[name] = ["OK", ""]
    return answer


user = rpc.UserServiceStub(channel(open(user_path, "rb").read()))
agent = rpc.AgentServiceStub(channel(open(agent_path, "rb").read()))
admin = rpc.AdminServiceStub(channel(open(admin_path, "rb").read()))
spec = job_pb2.JobSpec(executable="run.sh", accounting_group="physics",
                       requirements=job_pb2.Requirements(walltime_s=60))
job_id = call("Submit", user.Submit, pb.SubmitRequest(jobs=[spec])).job_ids[0]
results["kept"] = user.GetJob(pb.GetJobRequest(job_id=job_id), timeout=30).job.spec.accounting_group
call("ListJobs(PAUSED)", user.ListJobs, pb.ListJobsRequest(states=[job_pb2.JOB_STATE_PAUSED]))
call("HoldJob", user.HoldJob, pb.HoldJobRequest(job_id=job_id))
call("SetSiteState(TESTING)", admin.SetSiteState, pb.SetSiteStateRequest(site="SITE-A", state=pb.SITE_STATE_TESTING))
key = ec.generate_private_key(ec.SECP256R1())
der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
matched = call("Match", agent.Match, pb.MatchRequest(slot=pb.Slot(cores=1, memory_mb=100, time_left_s=3600),
                                                      pilot_id="pilot-new", node="n", job_public_key=der)).job
key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
job = rpc.JobServiceStub(grpc.secure_channel(address, grpc.ssl_channel_credentials(ca, key_pem, matched.job_token_pem)))
call("UpdateState(PAUSED)", job.UpdateState, pb.UpdateStateRequest(state=job_pb2.JOB_STATE_PAUSED, sequence=1))
answer = call("ReportAttemptFailure(SELF_PREEMPTED)", agent.ReportAttemptFailure, pb.ReportAttemptFailureRequest(
    job_id=matched.job_id, attempt=matched.attempt, failure=pb.ATTEMPT_FAILURE_SELF_PREEMPTED,
    detail="a failure class of the future", pilot_id="pilot-new"))
results["after the report"] = job_pb2.JobState.Name(answer.state) if answer else None
results["job"] = job_id
print(json.dumps(results))
'''


@pytest.fixture(scope="module")
def next_minor(tmp_path_factory) -> pathlib.Path:
    return make_next_minor(tmp_path_factory.mktemp("next-minor"))


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> CertificateAuthority:
    return CertificateAuthority.init(str(tmp_path_factory.mktemp("compat-ca") / "ca"))


def newer(gen: pathlib.Path) -> dict[str, str]:
    """The environment of a process on the next minor's code (its splitpilot package comes first)."""
    return {**os.environ, "PYTHONPATH": str(gen), "GRPC_VERBOSITY": "NONE"}


def token_file(path: pathlib.Path, token) -> str:
    write_private(str(path), token.to_pem())
    return str(path)


def test_this_client_reads_a_newer_brokers_answers(next_minor, ca, tmp_path, caplog):
    host = ca.new_token(TokenRole.HOST, "localhost", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    files = [tmp_path / name for name in ("host.key", "host.crt", "ca.crt")]
    write_private(str(files[0]), private_key_pem(host.key))
    files[1].write_bytes(certificate_pem(list(host.chain)))
    files[2].write_bytes(certificate_pem([ca.certificate]))
    process = subprocess.Popen([sys.executable, "-c", NEWER_BROKER, *map(str, files)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=newer(next_minor), cwd=tmp_path)
    try:
        address = f"127.0.0.1:{int(process.stdout.readline())}"
        alice = ca.new_token(TokenRole.USER, "alice")
        states._unknown.pop(15, None)  # so that "logged once" is this test's to see
        with caplog.at_level(logging.WARNING, logger="splitpilot"), BrokerClient(address, alice) as client:
            for _ in range(3):
                status = client.status(7)
            assert status.state.name == "UNKNOWN(15)" and int(status.state) == 15
            assert not status.state.known and not status.final and status.state is not JobState.WAITING
            assert [e.state.name for e in status.history] == ["WAITING", "UNKNOWN(15)"]
            assert (status.spec.name, status.message) == ("newer", "held")
            listing = client.list()
            assert listing.counts == {JobState.WAITING: 1} and listing.other_counts == {"JOB_STATE_PAUSED": 3}
            assert [j.state.name for j in listing.jobs] == ["UNKNOWN(15)"]
            assert client.kill(7).name == "UNKNOWN(15)"
        logged = [r for r in caplog.records if "job state 15 is unknown" in r.getMessage()]
        assert len(logged) == 1
        with AgentClient(address, ca.new_token(TokenRole.AGENT, "g", site="SITE-A", queue="q")) as agent:
            answer = agent.match({"cores": 1, "time_left_s": 60}, "pilot-1", "node")
        assert isinstance(answer, NoMatch) and not answer.leave and answer.retry_after_s == 30
        assert "does not know" in answer.reason
        # The command line too: no traceback, the unknown state by its number.
        token = token_file(tmp_path / "alice.pem", alice)
        one = subprocess.run([str(BIN), "job", "status", "7", "--broker", address, "--token", token],
                             capture_output=True, text=True, timeout=120)
        assert one.returncode == 0, one.stderr
        assert "state:     UNKNOWN(15)" in one.stdout
        assert re.search(r"attempt 1  UNKNOWN\(15\) +held by its owner", one.stdout), one.stdout
        table = subprocess.run([str(BIN), "job", "status", "--broker", address, "--token", token],
                               capture_output=True, text=True, timeout=120)
        assert table.returncode == 0, table.stderr
        assert "UNKNOWN(15)" in table.stdout and "3 JOB_STATE_PAUSED (unknown to this version)" in table.stdout
        assert "Traceback" not in one.stderr + table.stderr
    finally:
        process.stdin.close()
        process.wait(timeout=60)


def test_a_newer_client_against_this_broker_is_never_internal(next_minor, tmp_path):
    server = BrokerServer(BrokerConfig(state_dir=str(tmp_path / "state"), listen="127.0.0.1:0", reap_interval=0))
    server.start()
    try:
        tokens = SimpleNamespace(
            user=token_file(tmp_path / "u.pem", server.ca.new_token(TokenRole.USER, "alice")),
            agent=token_file(tmp_path / "a.pem", server.ca.new_token(TokenRole.AGENT, "g", site="SITE-A",
                                                                     queue="q")),
            admin=token_file(tmp_path / "r.pem", server.ca.new_token(TokenRole.ADMIN, "root")))
        ca_file = tmp_path / "broker-ca.crt"
        ca_file.write_bytes(server.ca_pem)
        done = subprocess.run([sys.executable, "-c", NEWER_CLIENT, server.address, str(ca_file), tokens.user,
                               tokens.agent, tokens.admin], capture_output=True, text=True, timeout=120,
                              env=newer(next_minor), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        results = json.loads(done.stdout)
        codes = {name: value[0] for name, value in results.items() if isinstance(value, list)}
        assert codes == {"Submit": "OK", "ListJobs(PAUSED)": "INVALID_ARGUMENT", "HoldJob": "UNIMPLEMENTED",
                         "SetSiteState(TESTING)": "INVALID_ARGUMENT", "Match": "OK",
                         "UpdateState(PAUSED)": "INVALID_ARGUMENT", "ReportAttemptFailure(SELF_PREEMPTED)": "OK"}
        assert "holds an unknown state" in results["ListJobs(PAUSED)"][1]
        assert results["UpdateState(PAUSED)"][1].startswith("a job cannot report 15; fix: report one of")
        assert "state 4 is not one this broker takes" in results["SetSiteState(TESTING)"][1]
        # The broker kept the field it does not know, and took the new failure class as WRAPPER (re-queued).
        assert results["kept"] == "physics"
        assert results["after the report"] == "JOB_STATE_WAITING"
        with BrokerClient(server.address, tokens.user) as alice:
            status = alice.status(results["job"])
        assert status.state is JobState.WAITING and status.attempt == 1
        assert "a failure class of the future" in status.history[-1].detail
        assert server.store.site_states() == {}  # the refused site state changed nothing
    finally:
        server.stop()
