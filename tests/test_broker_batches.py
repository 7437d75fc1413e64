"""Batches against a real BrokerServer over mutual TLS (SQLite and PostgreSQL stores): a submission is
one batch, however many Submit requests the client needs for it; a batch id is a handle, ownership the
authority: another user naming a batch (to add to it, to list or filter by it, to page from it) is
refused exactly like an unknown id, and nothing changes."""

from __future__ import annotations

import grpc
import pytest
from pg import pg_server, pg_url  # noqa: F401  (fixtures: a private PostgreSQL server)
from test_broker_server import SLOT, WALLTIME, ca, ca_dir, match, raw_channel, rpc_error, start_server, tokens  # noqa: F401

import pilot.api.client
from broker.store.base import UnknownBatch
from pilot.api.client import AdminClient, AgentClient, BrokerClient, NotFound
from pilot.api.states import JobState
from pilot.errors import SplitpilotError
from splitpilot.broker.v1 import broker_pb2 as pb
from splitpilot.broker.v1 import broker_pb2_grpc as rpc_pb
from splitpilot.job.v1 import job_pb2

UNKNOWN = "b-0000000000"


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request, tmp_path, ca_dir):  # noqa: F811
    overrides = {"db_url": request.getfixturevalue("pg_url")} if request.param == "postgresql" else {}
    server = start_server(tmp_path, ca_dir, **overrides)
    yield server
    server.stop()


@pytest.fixture
def clients(server, tokens):  # noqa: F811
    made = {"alice": BrokerClient(server.address, tokens.alice), "bob": BrokerClient(server.address, tokens.bob),
            "admin": AdminClient(server.address, tokens.admin), "agent": AgentClient(server.address, tokens.agent)}
    yield made
    for client in made.values():
        client.close()


def specs(count: int, name: str = "j") -> list[job_pb2.JobSpec]:
    return [job_pb2.JobSpec(executable="run.sh", name=f"{name}-{i}", requirements=WALLTIME) for i in range(count)]


def everything(admin: AdminClient) -> tuple:
    """Every job of every owner, as the broker has it (what a refused call must leave as it was)."""
    listing = admin.list_all_jobs(limit=10_000)
    return tuple((j.job_id, j.owner, j.batch_id, j.state, j.attempt, j.message) for j in listing.jobs), \
        listing.counts


def test_one_submission_is_one_batch_however_many_requests_it_takes(server, clients, monkeypatch):
    """The client splits a submission of more than SUBMIT_BATCH jobs (5,000; 2 here) into several Submit
    requests: the first makes the batch, the others add to it. The next submission is another batch."""
    monkeypatch.setattr(pilot.api.client, "SUBMIT_BATCH", 2)
    alice = clients["alice"]
    submission = alice.submit_checked(specs(5))
    assert len(submission.job_ids) == 5 and submission.batch_id.startswith("b-")
    other = alice.submit_checked(specs(1, "later"))
    assert other.batch_id not in ("", submission.batch_id)
    listed = alice.list_batches()
    assert [(b.batch_id, b.jobs, b.counts, b.owner) for b in listed] == [
        (other.batch_id, 1, {JobState.WAITING: 1}, "alice"),
        (submission.batch_id, 5, {JobState.WAITING: 5}, "alice")]
    members = alice.batch_jobs(submission.batch_id)
    assert [j.job_id for j in members] == submission.job_ids
    assert {j.batch_id for j in members} == {submission.batch_id}
    assert alice.status(submission.job_ids[0]).batch_id == submission.batch_id
    # The filter goes with the others, and the counts are the batch's.
    page = alice.list(limit=2, batch_id=submission.batch_id)
    assert [j.job_id for j in page.jobs] == submission.job_ids[:-3:-1]
    assert page.counts[JobState.WAITING] == 5
    assert [b.batch_id for b in alice.list_batches(limit=1)] == [other.batch_id]
    assert [b.batch_id for b in alice.list_batches(before_batch_id=other.batch_id)] == [submission.batch_id]


def test_a_label_names_a_new_batch_and_a_bad_one_is_refused_before_anything_is_stored(server, clients):
    alice, admin = clients["alice"], clients["admin"]
    labelled = alice.submit_checked(specs(1), label="calib run 7")
    assert [(b.batch_id, b.label) for b in alice.list_batches()] == [(labelled.batch_id, "calib run 7")]
    before = everything(admin), alice.list_batches()
    for request, words in (
            (pb.SubmitRequest(jobs=specs(1), batch_label="\x1b[2J" + "x" * 100), "is not 1 to 64 letters"),
            (pb.SubmitRequest(jobs=specs(1), batch_label="x" * 65), "is not 1 to 64 letters"),
            (pb.SubmitRequest(jobs=specs(1), batch_label=" leading space"), "is not 1 to 64 letters"),
            (pb.SubmitRequest(jobs=specs(1), batch_label="other", batch_id=labelled.batch_id),
             "batch_label goes with a new batch only")):
        refused = rpc_error(alice._stub.Submit, request)
        assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT and words in refused.details()
        assert "fix:" in refused.details() and "\x1b" not in refused.details()
    assert (everything(admin), alice.list_batches()) == before


def test_a_client_that_sends_no_batch_still_submits_and_gets_one(server, tokens):  # noqa: F811
    """A SubmitRequest without batch_id (what a client older than batches sends) queues its jobs in a new
    batch, as before; the answer's batch_id is an extra field such a client ignores."""
    with raw_channel(server, tokens.alice) as channel:
        stub = rpc_pb.UserServiceStub(channel)
        old_request = pb.SubmitRequest(jobs=specs(2)).SerializeToString()   # field 1 only
        answer = stub.Submit(pb.SubmitRequest.FromString(old_request), timeout=30)
        assert len(answer.job_ids) == 2 and answer.batch_id.startswith("b-")
        listing = stub.ListJobs(pb.ListJobsRequest(), timeout=30)
        assert sorted(j.job_id for j in listing.jobs) == sorted(answer.job_ids)
        assert {j.batch_id for j in listing.jobs} == {answer.batch_id}


def test_another_users_batch_is_refused_like_an_unknown_one_and_nothing_changes(server, clients, tokens):  # noqa: F811
    """Bob knows alice's batch id (it is no secret: it shows in logs and listings). Adding jobs to it,
    listing by it, paging from it, killing or fetching outputs by it: each is NOT_FOUND with the words an
    unknown id gets (no oracle), and alice's jobs, the batches and the job count stay as they were."""
    alice, bob, admin = clients["alice"], clients["bob"], clients["admin"]
    theirs = alice.submit_checked(specs(2)).batch_id
    bob.submit(specs(1, "bobs"))
    before = everything(admin), alice.list_batches(), bob.list_batches()
    with raw_channel(server, tokens.bob) as channel:
        stub = rpc_pb.UserServiceStub(channel)
        for call, request in (
                (stub.Submit, lambda b: pb.SubmitRequest(jobs=specs(1, "planted"), batch_id=b)),
                (stub.ListJobs, lambda b: pb.ListJobsRequest(batch_id=b)),
                (stub.ListBatches, lambda b: pb.ListBatchesRequest(before_batch_id=b))):
            refused = rpc_error(call, request(theirs))
            unknown = rpc_error(call, request(UNKNOWN))
            assert refused.code() is unknown.code() is grpc.StatusCode.NOT_FOUND
            assert refused.details() == str(UnknownBatch(theirs)), refused.details()
            assert refused.details().replace(theirs, "ID") == unknown.details().replace(UNKNOWN, "ID")
            assert "fix: check the id with `splitpilot job batches`" in refused.details()
            assert "alice" not in refused.details()
    # Through the client, as `job kill|output --batch` use it: the refusal comes before any job is named.
    with pytest.raises(NotFound, match="no batch .* of yours"):
        bob.batch_jobs(theirs)
    assert (everything(admin), alice.list_batches(), bob.list_batches()) == before
    # Garbage in the batch field is an unknown batch, never INTERNAL or an echo of control characters.
    for garbage in ("x" * 5000, "b-\x00\x1b[2J", "b-5F3A9C0E1D"):
        refused = rpc_error(bob._stub.ListJobs, pb.ListJobsRequest(batch_id=garbage))
        assert refused.code() is grpc.StatusCode.NOT_FOUND and "\x1b" not in refused.details()
        assert len(refused.details()) < 300
    assert (everything(admin), alice.list_batches(), bob.list_batches()) == before


def test_admins_filter_any_owners_batch_and_unknown_is_not_found(server, clients):
    alice, admin = clients["alice"], clients["admin"]
    first = alice.submit_checked(specs(2))
    alice.submit(specs(1))
    listing = admin.list_all_jobs(batch_id=first.batch_id)
    assert sorted(j.job_id for j in listing.jobs) == first.job_ids and listing.counts[JobState.WAITING] == 2
    with pytest.raises(NotFound, match="no batch 'b-0000000000'"):
        admin.list_all_jobs(batch_id=UNKNOWN)


def test_a_batch_shows_its_jobs_states_as_they_move(server, clients):
    alice, agent = clients["alice"], clients["agent"]
    submission = alice.submit_checked(specs(3))
    matched = match(agent)
    with matched.job_client() as wrapper:
        wrapper.update_state(JobState.STARTED)
    alice.kill(submission.job_ids[2])
    (batch,) = alice.list_batches()
    assert batch.counts == {JobState.STARTED: 1, JobState.WAITING: 1, JobState.KILLED: 1} and batch.jobs == 3
    assert alice.list(states=[JobState.WAITING], batch_id=batch.batch_id).jobs[0].job_id == submission.job_ids[1]


def test_against_a_broker_that_ignores_the_batch_filter_nothing_is_acted_on(server, clients):
    """A broker older than batches drops ListJobsRequest.batch_id (an unknown field) and lists every job
    of the caller: `kill|output --batch` would then act on all of them. The client notices jobs of other
    batches in the answer and stops, naming the fix, before any job is named to a kill."""
    alice = clients["alice"]
    wanted = alice.submit_checked(specs(1)).batch_id
    alice.submit(specs(2, "other"))
    real = alice._stub.ListJobs

    def older_broker(request, **kwargs):
        request.ClearField("batch_id")   # what a broker without the field reads
        return real(request, **kwargs)
    alice._stub.ListJobs = older_broker
    with pytest.raises(SplitpilotError, match="does not filter by batch .*; fix: name the jobs by id"):
        alice.batch_jobs(wanted)
    alice._stub.ListJobs = real
    assert [j.state for j in alice.list().jobs] == [JobState.WAITING] * 3
