# ruff: noqa: F811  (pytest fixtures imported from test_broker_trust, pg and xrootd are parameters here)
"""The shared sandbox store: two real brokers (BrokerServer over mutual TLS) on one real PostgreSQL database,
content in the database (broker.dbfiles) or on a real XRootD server (broker.xrdfiles, where marked:
shared_two, the collection tests; tests/test_broker_xrootd.py has the rest), and garbage collection on
every file store.

Each test attacks one promise: a job runs through the other broker with its inputs and outputs byte-exact;
the per-owner rule holds across brokers; damaged or lost content is reported as the broker's fault and never
served; garbage collection never takes content a queued job needs (raced against submissions); an interrupted
upload leaves no row.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import random
import threading

import grpc
import psycopg
import pytest
from pg import pg_server, pg_url  # noqa: F401  (fixtures: a private PostgreSQL server)
from test_broker_trust import (  # noqa: F401  (fixtures)
    WALLTIME,
    ca,
    ca_dir,
    header,
    match,
    running,
    start_server,
    submit_one,
    tokens,
    upload_raw,
    user_channel,
    write,
)
from test_pilot_e2e import wait_for
from xrootd import xrootd_server, xrootd_url  # noqa: F401  (fixtures: a private XRootD server)

from broker.dbfiles import DatabaseFileStore
from broker.files import FileStore
from broker.services.base import utcnow
from broker.xrdfiles import XRootDFileStore
from pilot.api.base import BrokerError
from pilot.api.client import AgentClient, BrokerClient, PreconditionFailed
from pilot.api.states import JobState
from splitpilot.broker.v1 import broker_pb2 as pb
from splitpilot.broker.v1 import broker_pb2_grpc as rpc_pb
from splitpilot.job.v1 import job_pb2

MiB = 1 << 20
DAY = __import__("datetime").timedelta(days=1)


@pytest.fixture
def two(tmp_path, ca_dir, pg_url):
    """Brokers A and B on one PostgreSQL database (each its own state folder), default file store."""
    a = start_server(tmp_path, ca_dir, db_url=pg_url)
    b = start_server(tmp_path, ca_dir, db_url=pg_url)
    yield a, b
    b.stop()
    a.stop()


@pytest.fixture(params=["database", "xrootd"])
def shared_two(request, tmp_path, ca_dir, pg_url):
    """Brokers A and B on one PostgreSQL database, with each shared file store: the database, an XRootD server."""
    store = {"file_store": request.getfixturevalue("xrootd_url")} if request.param == "xrootd" else {}
    a = start_server(tmp_path, ca_dir, db_url=pg_url, **store)
    b = start_server(tmp_path, ca_dir, db_url=pg_url, **store)
    yield a, b
    b.stop()
    a.stop()


def store_overrides(kind: str, request) -> dict:
    """BrokerConfig overrides for a KIND of the parametrised collection tests."""
    if kind == "local-sqlite":
        return {}
    overrides = {"db_url": request.getfixturevalue("pg_url")}
    if kind.startswith("xrootd"):
        overrides["file_store"] = request.getfixturevalue("xrootd_url")
    return overrides


STORE_TYPES = {"local-sqlite": FileStore, "database-postgresql": DatabaseFileStore,
               "xrootd-postgresql": XRootDFileStore}


def rows(url: str, sql: str, params=()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description is not None else []


def content_state(url: str) -> tuple:
    """Everything the store keeps about content: catalogue, chunks, owner rows, jobs."""
    return (rows(url, "SELECT sha256, size FROM contents ORDER BY sha256"),
            rows(url, "SELECT sha256, seq, digest FROM chunks ORDER BY sha256, seq"),
            rows(url, "SELECT owner, sha256 FROM file_owners ORDER BY owner, sha256"),
            rows(url, "SELECT id, owner, state FROM jobs ORDER BY id"))


def test_a_job_submitted_through_one_broker_runs_through_another_byte_exact(two, tokens, tmp_path, pg_url):
    """Alice uploads a 2.5 MiB input through A and submits there; B's agent is matched through B, the job
    downloads its input from B and saves its output to B; Alice fetches the output through A: every byte
    as sent. The content is in the database once (no copy in either state folder)."""
    a, b = two
    assert isinstance(a.broker.files, DatabaseFileStore) and isinstance(b.broker.files, DatabaseFileStore)
    data = os.urandom(5 * MiB // 2)
    result = os.urandom(3 * MiB // 2 + 7)
    with BrokerClient(a.address, tokens.alice) as alice, AgentClient(b.address, tokens.agent) as agent:
        uploaded = alice.upload(write(tmp_path / "in.dat", data))
        job_id = submit_one(alice, input_files=[uploaded])
        matched = match(agent)
        assert matched.job_id == job_id
        with running(matched) as job:
            job.get_input("in.dat", tmp_path / "sandbox" / "in.dat")
            assert (tmp_path / "sandbox" / "in.dat").read_bytes() == data
            job.put_output(write(tmp_path / "sandbox" / "out.dat", result), "out.dat")
            job.update_state(JobState.SAVING)
            job.update_state(JobState.DONE, exit_code=0)
        paths = alice.output(job_id, tmp_path / "fetched")
        assert pathlib.Path(paths[0]).read_bytes() == result
    assert rows(pg_url, "SELECT sha256, size FROM contents ORDER BY size") == [
        (hashlib.sha256(result).hexdigest(), len(result)), (uploaded.sha256, len(data))]
    assert rows(pg_url, "SELECT count(*) FROM chunks")[0][0] == 3 + 2   # at most 1 MiB per chunk
    for server in (a, b):
        assert not os.path.exists(os.path.join(server.state_dir, "files"))
        assert os.listdir(os.path.join(server.state_dir, "staging")) == []


def test_a_user_of_the_other_broker_cannot_name_content_uploaded_through_the_first(
        two, tokens, tmp_path, pg_url):
    """Bob, on broker B, knows the digest and size of what Alice uploaded through A. Naming it gets exactly
    the words of content that was never uploaded, and nothing changes (no job, no owner row, no content);
    sending all the bytes himself makes them his, as on one broker."""
    a, b = two
    secret = b"alice's input, through broker A\n" * 100
    with BrokerClient(a.address, tokens.alice) as alice, BrokerClient(b.address, tokens.bob) as bob:
        uploaded = alice.upload(write(tmp_path / "secret.dat", secret))
        before = content_state(pg_url)

        def refused(sha: str, size: int) -> str:
            with pytest.raises(PreconditionFailed) as info:
                bob.submit(job_pb2.JobSpec(requirements=WALLTIME, executable="x", input_files=[
                    job_pb2.InputFile(name="in.dat", size=size, sha256=sha)]))
            assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION
            return info.value.details.replace(sha, "SHA")

        baseline = refused(hashlib.sha256(b"never uploaded").hexdigest(), len(secret))
        assert "is not in the broker's file store; fix: upload the file first" in baseline
        for size in (len(secret), len(secret) + 1):
            assert refused(uploaded.sha256, size) == baseline
        assert bob.find_files([uploaded.sha256]) == {}
        assert content_state(pg_url) == before
        mine = upload_raw(b, tokens.bob, "bob.dat", secret)
        assert mine.sha256 == uploaded.sha256 and not mine.already_present   # not "Alice has it"
        assert submit_one(bob, input_files=[job_pb2.InputFile(name="in.dat", size=len(secret), sha256=mine.sha256)])
    assert rows(pg_url, "SELECT count(*) FROM contents")[0][0] == 1       # stored once


def test_damaged_or_lost_content_is_the_brokers_fault_and_never_served(two, tokens, tmp_path, pg_url):
    """A chunk changed in the database (a bit flipped on disk, a bad restore) is detected when read: the
    job's download fails with DATA_LOSS saying the content is damaged and that it is the broker's fault,
    and the damaged chunk's bytes are never handed out. Content gone altogether says the same kind of
    thing, never "upload it first" (the job's owner did upload it)."""
    a, b = two
    data = os.urandom(3 * MiB)
    with BrokerClient(a.address, tokens.alice) as alice, AgentClient(b.address, tokens.agent) as agent:
        uploaded = alice.upload(write(tmp_path / "in.dat", data))
        submit_one(alice, input_files=[uploaded])
        submit_one(alice, input_files=[uploaded])
        rows(pg_url, "UPDATE chunks SET data = overlay(data placing '\\x00'::bytea from 100) "
                     "WHERE sha256 = %s AND seq = 1 RETURNING seq", (uploaded.sha256,))
        channel = None
        with running(match(agent)) as job:
            with pytest.raises(BrokerError) as info:
                job.get_input("in.dat", tmp_path / "sandbox" / "in.dat")
            assert info.value.code is grpc.StatusCode.DATA_LOSS
            assert "is damaged in the broker's database (chunk 1 fails its checksum)" in info.value.details
            assert "the broker's fault, not the job's" in info.value.details
            # What a client that keeps reading gets: chunk 0 only, never the damaged chunk 1.
            channel = grpc.secure_channel(b.address, grpc.ssl_channel_credentials(
                b.ca_pem, job.key_pem, job.token_pem))
            got = []
            with pytest.raises(grpc.RpcError) as raw:
                for message in rpc_pb.JobServiceStub(channel).GetInput(pb.GetInputRequest(name="in.dat"), timeout=30):
                    got.append(message)
            assert raw.value.code() is grpc.StatusCode.DATA_LOSS
            assert [m.WhichOneof("kind") for m in got] == ["header", "data"] and got[1].data == data[:MiB]
            channel.close()
        rows(pg_url, "DELETE FROM chunks WHERE sha256 = %s", (uploaded.sha256,))
        rows(pg_url, "DELETE FROM contents WHERE sha256 = %s", (uploaded.sha256,))
        with running(match(agent, pilot="pilot-2")) as job:
            with pytest.raises(BrokerError) as info:
                job.get_input("in.dat", tmp_path / "sandbox2" / "in.dat")
            assert info.value.code is grpc.StatusCode.DATA_LOSS
            assert "is no longer in the broker's file store: the broker's fault" in info.value.details
            assert "upload it first" not in info.value.details


def test_an_upload_interrupted_mid_stream_leaves_no_row(two, tokens, pg_url):
    """A client that stops after 2 of 4 MiB (its stream broken, or ended early) leaves nothing: no content,
    no chunk, no owner row, no staged file, in either broker."""
    a, b = two
    data = os.urandom(4 * MiB)

    class Gone(Exception):
        pass

    def broken():
        yield header("big.dat", data)
        yield pb.UploadFileRequest(data=data[:MiB])
        yield pb.UploadFileRequest(data=data[MiB:2 * MiB])
        raise Gone("the client died")

    def short():
        yield header("big.dat", data)
        yield pb.UploadFileRequest(data=data[:MiB])

    for stream in (broken, short):
        channel = user_channel(a, tokens.alice)
        with pytest.raises((grpc.RpcError, Gone)):
            rpc_pb.UserServiceStub(channel).UploadFile(stream(), timeout=30)
        channel.close()
    wait_for(lambda: os.listdir(os.path.join(a.state_dir, "staging")) == [], 30, "the staged upload to go")
    assert content_state(pg_url) == ([], [], [], [])


def test_collection_never_removes_content_a_submission_names(shared_two, tokens, tmp_path, pg_url):
    """Garbage collection on B runs flat out (its cutoff in the future: everything unreferenced is
    garbage at once) while Alice, on A, uploads, submits a job naming the content, and kills it (which
    makes it garbage again). Every submission either is refused (the content went first) or its job's
    input is present while the job waits; the collector did remove content meanwhile (the race ran)."""
    a, b = shared_two
    data = b"raced content\n" * 1000
    stop = threading.Event()
    removed = []

    def collector() -> None:
        pace = random.Random(7)
        while not stop.is_set():
            removed.append(b.collect_once(utcnow() + 2 * DAY)[0])
            # Jitter, not synchronisation: flat out, on an idle machine the collector removed every upload
            # before its submission (40 of 40 refused: the property went untested); a pause of 0-20 ms
            # lets both orders happen.
            stop.wait(pace.uniform(0, 0.02))

    thread = threading.Thread(target=collector)
    thread.start()
    accepted = refused = 0
    try:
        with BrokerClient(a.address, tokens.alice) as alice:
            for _ in range(200):   # until both orders were seen a few times (at most 200 rounds)
                if accepted >= 5 and refused >= 1:
                    break
                uploaded = alice.upload(write(tmp_path / "in.dat", data))
                try:
                    job_id = submit_one(alice, input_files=[uploaded])
                except PreconditionFailed as exc:
                    assert "not in the broker's file store" in exc.details
                    refused += 1
                    continue
                accepted += 1
                assert alice.status(job_id).state is JobState.WAITING
                assert rows(pg_url, "SELECT size FROM contents WHERE sha256 = %s", (uploaded.sha256,)) == \
                    [(len(data),)], "a waiting job's input vanished"
                b.collect_once(utcnow() + 2 * DAY)
                with a.broker.files.open(uploaded.sha256) as stored:   # every byte still there, checked
                    assert stored.read(len(data)) == data and stored.read() == b""
                alice.kill(job_id)
    finally:
        stop.set()
        thread.join()
    assert accepted > 0 and sum(removed) > 0, (accepted, refused, sum(removed))


@pytest.mark.parametrize("kind", ["local-sqlite", "database-postgresql", "xrootd-postgresql"])
def test_collection_removes_only_old_content_nothing_refers_to(kind, tmp_path, ca_dir, tokens, request):
    """On both file stores: an upload never used is kept within the grace period and removed after it
    (with its owner row: naming it again says "upload it first"); a waiting job's input and a finished
    job's output are kept however old; the input goes once its job is final. The freed files and bytes
    are counted in the metrics."""
    server = start_server(tmp_path, ca_dir, **store_overrides(kind, request))
    try:
        files = server.broker.files
        assert isinstance(files, STORE_TYPES[kind])
        unused, needed, output = b"never used\n" * 10, b"a waiting job's input\n" * 10, b"an output\n" * 10
        with BrokerClient(server.address, tokens.alice) as alice, \
                AgentClient(server.address, tokens.agent) as agent:
            lone = alice.upload(write(tmp_path / "unused", unused))
            done_job = submit_one(alice)
            with running(match(agent)) as job:
                made = job.put_output(write(tmp_path / "out", output), "out")
                job.update_state(JobState.SAVING)
                job.update_state(JobState.DONE, exit_code=0)
            kept = alice.upload(write(tmp_path / "needed", needed))
            waiting = submit_one(alice, input_files=[kept])
            assert server.collect_once(utcnow()) == (0, 0, 0)           # all within the grace period
            assert server.collect_once(utcnow() + 2 * DAY) == (1, len(unused), 0)
            assert files.size_of(lone.sha256) is None
            assert files.size_of(kept.sha256) == len(needed) and files.size_of(made.sha256) == len(output)
            with pytest.raises(PreconditionFailed) as info:
                submit_one(alice, input_files=[lone])
            assert "fix: upload the file first" in info.value.details
            alice.kill(waiting)
            assert server.collect_once(utcnow() + 2 * DAY) == (1, len(needed), 0)
            assert files.size_of(made.sha256) == len(output)
            assert alice.output(done_job, tmp_path / "fetched")
        metrics = server.render_metrics()
        assert "splitpilot_gc_files_freed_total 2.0" in metrics
        assert f"splitpilot_gc_bytes_freed_total {float(len(unused) + len(needed))}" in metrics
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["local-sqlite", "database-postgresql", "xrootd-postgresql"])
def test_output_retention_forgets_old_outputs_and_their_content_goes(kind, tmp_path, ca_dir, tokens, request):
    """--output-retention: the outputs of a job final for longer are forgotten (the job keeps its final
    state) and their content is collected in the same pass; a recent job's outputs, and a running job's,
    are untouched; without the setting nothing is forgotten however old."""
    server = start_server(tmp_path, ca_dir, output_retention=DAY, **store_overrides(kind, request))
    try:
        files = server.broker.files
        assert isinstance(files, STORE_TYPES[kind])
        old, recent = b"an old output\n" * 10, b"a recent output\n" * 10
        with BrokerClient(server.address, tokens.alice) as alice, \
                AgentClient(server.address, tokens.agent) as agent:
            old_job, recent_job = submit_one(alice), submit_one(alice)
            made = {}
            for data, name in ((old, "old"), (recent, "recent")):
                with running(match(agent)) as job:
                    made[name] = job.put_output(write(tmp_path / name, data), "out")
                    job.update_state(JobState.SAVING)
                    job.update_state(JobState.DONE, exit_code=0)
            busy = submit_one(alice)
            with running(match(agent)) as job:
                busy_output = job.put_output(write(tmp_path / "busy", b"still running\n"), "out")
                # Two days on: both finished jobs are past the retention (a day) and their content past the grace.
                assert server.collect_once(utcnow() + 2 * DAY)[:2] == (2, len(old) + len(recent))
                assert files.size_of(made["old"].sha256) is None and files.size_of(made["recent"].sha256) is None
                assert files.size_of(busy_output.sha256) is not None          # a running job's: untouched
                for job_id in (old_job, recent_job):
                    status = alice.status(job_id)
                    assert status.state is JobState.DONE and not status.outputs
                assert [o.name for o in alice.status(busy).outputs] == ["out"]
        metrics = server.render_metrics()
        assert "splitpilot_outputs_pruned_total 2.0" in metrics
    finally:
        server.stop()


def test_without_output_retention_outputs_are_kept_however_old(tmp_path, ca_dir, tokens):
    server = start_server(tmp_path, ca_dir)
    try:
        assert server.config.output_retention is None
        with BrokerClient(server.address, tokens.alice) as alice, \
                AgentClient(server.address, tokens.agent) as agent:
            job_id = submit_one(alice)
            with running(match(agent)) as job:
                made = job.put_output(write(tmp_path / "out", b"kept\n"), "out")
                job.update_state(JobState.SAVING)
                job.update_state(JobState.DONE, exit_code=0)
            assert server.collect_once(utcnow() + 3650 * DAY)[:2] == (0, 0)   # (its history is pruned)
            assert server.broker.files.size_of(made.sha256) == len(b"kept\n")
            assert [o.name for o in alice.status(job_id).outputs] == ["out"]
    finally:
        server.stop()


def test_content_of_a_broker_that_kept_it_in_its_folder_is_copied_into_the_database(tmp_path, ca_dir, tokens,
                                                                                   pg_url):
    """A PostgreSQL broker of before (content in STATE/files) restarted with the database store: its waiting
    job's input is copied into the database at start (checked against its digest; a damaged file is not
    copied) and served to an agent of another broker; a second start copies nothing."""
    data = os.urandom(MiB + 5)
    old = start_server(tmp_path, ca_dir, db_url=pg_url, file_store="local")
    state = old.state_dir
    try:
        with BrokerClient(old.address, tokens.alice) as alice:
            uploaded = alice.upload(write(tmp_path / "in.dat", data))
            damaged = alice.upload(write(tmp_path / "other.dat", b"to be damaged\n"))
            job_id = submit_one(alice, input_files=[uploaded])
    finally:
        old.stop()
    victim = pathlib.Path(state) / "files" / damaged.sha256[:2] / damaged.sha256[2:]
    victim.chmod(0o600)
    victim.write_bytes(b"to be damagEd\n")
    assert rows(pg_url, "SELECT count(*) FROM contents") == [(0,)]
    from broker.server import BrokerConfig, BrokerServer
    restarted = BrokerServer(BrokerConfig(state_dir=state, ca_dir=ca_dir, listen="127.0.0.1:0", reap_interval=0,
                                          db_url=pg_url, grace=1.0))
    restarted.start()
    other = start_server(tmp_path, ca_dir, db_url=pg_url)
    try:
        assert rows(pg_url, "SELECT sha256, size FROM contents") == [(uploaded.sha256, len(data))]
        with AgentClient(other.address, tokens.agent) as agent, running(match(agent)) as job:
            assert job.job_id == job_id
            job.get_input("in.dat", tmp_path / "sandbox" / "in.dat")
            assert (tmp_path / "sandbox" / "in.dat").read_bytes() == data
        assert restarted.broker.files.import_folder(os.path.join(state, "files")) == (0, 0)
    finally:
        other.stop()
        restarted.stop()


def test_a_submission_whose_input_went_after_its_check_stores_nothing(two, tokens, tmp_path, pg_url):
    """The race's losing order made certain: the input check passed, then broker B's collector removed the
    content, then the submission's transaction runs: it finds the content row gone (it locks it shared)
    and is refused with the fix, storing no job, no batch and no job_inputs row."""
    from broker.store.base import MissingContent
    a, b = two
    with BrokerClient(a.address, tokens.alice) as alice:
        uploaded = alice.upload(write(tmp_path / "in.dat", b"soon gone\n"))
    assert b.collect_once(utcnow() + 2 * DAY)[0] == 1
    before = (rows(pg_url, "SELECT count(*) FROM jobs"), rows(pg_url, "SELECT count(*) FROM batches"),
              rows(pg_url, "SELECT count(*) FROM job_inputs"))
    spec = job_pb2.JobSpec(executable="x", requirements=WALLTIME, input_files=[uploaded])
    with pytest.raises(MissingContent) as info:
        a.store.submit_batch("alice", [spec], utcnow())
    assert "not in the broker's file store" in str(info.value) and "fix: upload the file again" in str(info.value)
    assert (rows(pg_url, "SELECT count(*) FROM jobs"), rows(pg_url, "SELECT count(*) FROM batches"),
            rows(pg_url, "SELECT count(*) FROM job_inputs")) == before


def test_a_real_agent_and_wrapper_of_broker_b_run_a_job_submitted_through_broker_a(shared_two, tokens, tmp_path):
    """The issue's failure, end to end with real processes: Alice submits through A a job with a 3 MiB
    input; a real agent (bubblewrap) connected to B only runs it: its wrapper downloads the input from B
    and uploads the output to B; the job is DONE (it was FAILED_INPUT before), and Alice fetches the
    output through A, byte-exact."""
    import tempfile

    from test_pilot_e2e import agent_command, wait_final

    from pilot.launch import build_software_area
    a, b = shared_two
    base = pathlib.Path(tempfile.mkdtemp(prefix="splitpilot-shared-"))
    try:
        os.chmod(base, 0o755)
        build_software_area(base / "software")
        world = {"server": b, "base": base, "software": base / "software"}
        data = os.urandom(3 * MiB)
        script = write(tmp_path / "copy.sh", b"#!/bin/sh\nset -e\ncat data.bin data.bin > doubled.out\n")
        with BrokerClient(a.address, tokens.alice) as alice:
            inputs = [alice.upload(script, "copy.sh"), alice.upload(write(tmp_path / "data.bin", data), "data.bin")]
            job_id = alice.submit(job_pb2.JobSpec(
                name="shared", executable="./copy.sh", input_files=inputs, output_patterns=["*.out"],
                requirements=job_pb2.Requirements(cores=1, memory_mb=512, disk_mb=2048, walltime_s=600)))[0]
            argv, env, token = agent_command(world, "b", "bubblewrap")
            import subprocess
            result = subprocess.run(argv, input=token, capture_output=True, timeout=240, env=env)
            assert result.returncode == 0, result.stderr.decode()[-3000:]
            status = wait_final(alice, job_id)
            assert status.state is JobState.DONE, (status, result.stderr.decode()[-3000:])
            paths = alice.output(job_id, tmp_path / "fetched", ["doubled.out"])
            assert [pathlib.Path(p).read_bytes() for p in paths] == [data + data]
    finally:
        import shutil
        shutil.rmtree(base, ignore_errors=True)


def test_an_upload_through_b_racing_a_free_through_a_never_loses_its_content(shared_two, tokens, tmp_path,
                                                                            pg_url):
    """A job on broker A saves output X and replaces it at once by Y (A frees X unless referenced), while
    Bob uploads the same bytes X through broker B, both started together, 12 times with new bytes. Bob's
    upload succeeds each time, so his owner row names X: X must be in the store afterwards, every time.
    At the end no owner or output row names content the store lacks."""
    a, b = shared_two
    with BrokerClient(a.address, tokens.alice) as alice, AgentClient(a.address, tokens.agent) as agent, \
            BrokerClient(b.address, tokens.bob) as bob:
        submit_one(alice)
        with running(match(agent)) as job:
            for round_ in range(12):
                x = write(tmp_path / f"x{round_}", os.urandom(256 * 1024) + b"%d" % round_)
                y = write(tmp_path / f"y{round_}", b"replacement %d\n" % round_)
                barrier = threading.Barrier(2)
                failures = []

                def replace(x=x, y=y, barrier=barrier, failures=failures) -> None:
                    try:
                        barrier.wait(10)
                        job.put_output(x, "o")
                        job.put_output(y, "o")
                    except Exception as exc:  # noqa: BLE001 (reported by the main thread)
                        failures.append(exc)

                thread = threading.Thread(target=replace)
                thread.start()
                barrier.wait(10)
                uploaded = bob.upload(x, "x.dat")
                thread.join()
                assert failures == []
                assert rows(pg_url, "SELECT size FROM contents WHERE sha256 = %s", (uploaded.sha256,)) == \
                    [(uploaded.size,)], f"round {round_}: Bob's upload lost its content"
                with b.broker.files.open(uploaded.sha256) as stored:   # the bytes too, not only the row
                    assert stored.read(MiB) == pathlib.Path(x).read_bytes(), f"round {round_}: bytes lost"
    assert rows(pg_url, "SELECT sha256 FROM file_owners UNION SELECT sha256 FROM outputs "
                        "EXCEPT SELECT sha256 FROM contents") == []


@pytest.mark.parametrize("choice, words", [
    ("database", 'file_store = "database" needs a PostgreSQL store (the content is shared through it); '
                 "fix: --db postgresql://..., or --file-store local"),
    ("xrootd", "file store 'xrootd' is not one of local, database, xrootd://HOST:PORT/PATH; fix: --file-store "
               "local, --file-store database or --file-store xrootd://..."),
    ("xrootd://127.0.0.1:1094/store", "an xrootd file store needs a PostgreSQL store (its catalogue and locks "
                                      "are there); fix: --db postgresql://..., or --file-store local")])
def test_a_file_store_the_database_cannot_hold_is_refused_at_start(tmp_path, ca_dir, choice, words):
    """SQLite cannot share content between brokers: asking for the database store there (or for a store
    that does not exist) stops the start with the fix, before anything listens; nothing is left running."""
    from broker.server import BrokerStartError
    with pytest.raises(BrokerStartError) as info:
        start_server(tmp_path, ca_dir, file_store=choice)
    assert words in str(info.value)


def test_one_broker_of_the_database_collects_at_a_time(two, tokens, tmp_path, pg_url):
    """While one broker's collection holds the collector lock (taken here by hand, as a pass of broker A
    would hold it), broker B's pass removes and prunes nothing and does not wait; once it is free, B's
    pass collects."""
    a, b = two
    with BrokerClient(a.address, tokens.alice) as alice:
        alice.upload(write(tmp_path / "unused", b"unused\n"))
    with psycopg.connect(pg_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (0x5350_0003,))
        assert b.collect_once(utcnow() + 2 * DAY) == (0, 0, 0)
        assert rows(pg_url, "SELECT count(*) FROM contents") == [(1,)]
        holder.execute("SELECT pg_advisory_unlock(%s)", (0x5350_0003,))
    assert b.collect_once(utcnow() + 2 * DAY) == (1, len(b"unused\n"), 0)
