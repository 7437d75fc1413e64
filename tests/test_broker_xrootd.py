# ruff: noqa: F811  (pytest fixtures imported from test_broker_trust, pg and xrootd are parameters here)
"""The XRootD sandbox store (broker.xrdfiles): real brokers (BrokerServer over mutual TLS) on a real
PostgreSQL database, the content on a real xrootd server (tests/xrootd.py) that requires sss.

Each test attacks one promise: content round-trips byte-exact through two brokers and is on the server
once, under its digest, with nothing half-written left; an object damaged on the server (truncated,
altered, deleted) is the broker's fault (DATA_LOSS) and its last chunk is never served; a client without
the broker's key can neither read, list, write nor delete anything; a keytab others could read stops the
broker at start; a bad URL is refused with the fix.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import threading
from urllib.parse import urlsplit

import grpc
import psycopg
import pytest
from pg import pg_server, pg_url  # noqa: F401  (fixtures: a private PostgreSQL server)
from test_broker_sharedstore import content_state, rows
from test_broker_trust import (  # noqa: F401  (fixtures)
    ca,
    ca_dir,
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
from xrootd import XRootDServer, make_keytab, xrootd_server, xrootd_url  # noqa: F401  (fixtures: a private XRootD server)

from broker.services.base import utcnow
from broker.store.base import StoreError
from broker.xrdfiles import XRootDFileStore, parse_url
from pilot.api.base import BrokerError
from pilot.api.client import AgentClient, BrokerClient
from pilot.api.states import JobState
from splitpilot.broker.v1 import broker_pb2 as pb
from splitpilot.broker.v1 import broker_pb2_grpc as rpc_pb

MiB = 1 << 20
DAY = datetime.timedelta(days=1)


def base_of(url: str) -> str:
    return urlsplit(url).path.strip("/")


def on_server(server, url: str) -> dict[str, bytes]:
    """Every file under the test's folder on the server's disk: relative path -> bytes."""
    root = server.local(base_of(url))
    found = {}
    for directory, _dirs, files in os.walk(root):
        for entry in files:
            path = os.path.join(directory, entry)
            found[os.path.relpath(path, root)] = pathlib.Path(path).read_bytes()
    return found


@pytest.fixture
def two(tmp_path, ca_dir, pg_url, xrootd_url):
    """Brokers A and B on one PostgreSQL database, both with the same XRootD file store."""
    a = start_server(tmp_path, ca_dir, db_url=pg_url, file_store=xrootd_url)
    b = start_server(tmp_path, ca_dir, db_url=pg_url, file_store=xrootd_url)
    yield a, b
    b.stop()
    a.stop()


def test_content_round_trips_through_two_brokers_byte_exact_and_is_on_the_server_once(
        two, tokens, tmp_path, pg_url, xrootd_server, xrootd_url):
    """Alice uploads 2.5 MiB through A (twice: stored once) and submits there; B's agent is matched through B,
    the job downloads its input from B and saves its output to B; Alice fetches the output through A: every
    byte as sent. The server holds exactly the two objects, each under its digest with its bytes, and no
    temporary object; the database holds their catalogue rows and no chunk; no staged file is left."""
    a, b = two
    assert isinstance(a.broker.files, XRootDFileStore) and isinstance(b.broker.files, XRootDFileStore)
    data = os.urandom(5 * MiB // 2)
    result = os.urandom(3 * MiB // 2 + 7)
    with BrokerClient(a.address, tokens.alice) as alice, AgentClient(b.address, tokens.agent) as agent:
        uploaded = alice.upload(write(tmp_path / "in.dat", data))
        again = alice.upload(write(tmp_path / "in.dat", data))
        assert again.sha256 == uploaded.sha256
        job_id = submit_one(alice, input_files=[uploaded])
        matched = match(agent)
        assert matched.job_id == job_id
        with running(matched) as job:
            job.get_input("in.dat", tmp_path / "sandbox" / "in.dat")
            assert (tmp_path / "sandbox" / "in.dat").read_bytes() == data
            made = job.put_output(write(tmp_path / "sandbox" / "out.dat", result), "out.dat")
            job.update_state(JobState.SAVING)
            job.update_state(JobState.DONE, exit_code=0)
        paths = alice.output(job_id, tmp_path / "fetched")
        assert pathlib.Path(paths[0]).read_bytes() == result
    assert on_server(xrootd_server, xrootd_url) == {uploaded.sha256: data, made.sha256: result}
    assert hashlib.sha256(result).hexdigest() == made.sha256
    assert rows(pg_url, "SELECT sha256, size FROM contents ORDER BY size") == [
        (made.sha256, len(result)), (uploaded.sha256, len(data))]
    assert rows(pg_url, "SELECT count(*) FROM chunks") == [(0,)]
    assert a.broker.files.remote_temp_files() == []
    for server in (a, b):
        assert os.listdir(os.path.join(server.state_dir, "staging")) == []


def test_an_object_damaged_on_the_server_is_the_brokers_fault_and_its_last_chunk_never_served(
        two, tokens, tmp_path, xrootd_server, xrootd_url):
    """Someone with the server's disk alters a byte of a 3 MiB input (same size), then truncates it, then
    deletes it. Each time the job's download fails with DATA_LOSS naming the damage and saying it is the
    broker's fault (never "upload it first"); a client that keeps reading the altered object gets the
    first two chunks and never the third."""
    a, b = two
    data = os.urandom(3 * MiB)
    with BrokerClient(a.address, tokens.alice) as alice, AgentClient(b.address, tokens.agent) as agent:
        uploaded = alice.upload(write(tmp_path / "in.dat", data))
        for _ in range(3):
            submit_one(alice, input_files=[uploaded])
        path = pathlib.Path(xrootd_server.local(base_of(xrootd_url), uploaded.sha256))
        assert path.read_bytes() == data
        path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])

        def refused(pilot: str, words: str) -> None:
            with running(match(agent, pilot=pilot)) as job:
                with pytest.raises(BrokerError) as info:
                    job.get_input("in.dat", tmp_path / pilot / "in.dat")
                assert info.value.code is grpc.StatusCode.DATA_LOSS
                assert words in info.value.details
                assert "the broker's fault, not the job's" in info.value.details
                assert "upload it first" not in info.value.details
                return job

        job = refused("pilot-1", "is damaged on the broker's XRootD server (the content fails its checksum)")
        channel = grpc.secure_channel(b.address, grpc.ssl_channel_credentials(b.ca_pem, job.key_pem, job.token_pem))
        got = []
        with pytest.raises(grpc.RpcError) as raw:
            for message in rpc_pb.JobServiceStub(channel).GetInput(pb.GetInputRequest(name="in.dat"), timeout=30):
                got.append(message)
        channel.close()
        assert raw.value.code() is grpc.StatusCode.DATA_LOSS
        assert [m.WhichOneof("kind") for m in got] == ["header", "data", "data"]
        assert b"".join(m.data for m in got[1:]) == data[:100] + bytes([data[100] ^ 1]) + data[101:2 * MiB]

        path.write_bytes(data[:MiB])
        refused("pilot-2", f"is damaged on the broker's XRootD server ({MiB} bytes instead of {3 * MiB})")
        path.unlink()
        refused("pilot-3", "is no longer on the broker's XRootD server")


# What another local user (or a job) can try against the server: the xrootd client, with no key or a key
# of its own. Run as a separate process: the XRootD client takes its keytab from the process environment.
_ATTACK = r"""
import json, sys
from XRootD import client
from XRootD.client.flags import OpenFlags
server, base, sha = sys.argv[1:4]
fs = client.FileSystem(server)
out = {}
f = client.File()
out["read"] = f.open(f"{server}/{base}/{sha}", timeout=20)[0].message
out["stat"] = fs.stat(f"{base}/{sha}", timeout=20)[0].message
out["list"] = fs.dirlist(base, timeout=20)[0].message
w = client.File()
out["write"] = w.open(f"{server}/{base}/planted", OpenFlags.NEW, timeout=20)[0].message
out["overwrite"] = client.File().open(f"{server}/{base}/{sha}", OpenFlags.DELETE, timeout=20)[0].message
out["delete"] = fs.rm(f"{base}/{sha}", timeout=20)[0].message
out["rename"] = fs.mv(f"{base}/{sha}", f"{base}/moved", timeout=20)[0].message
print(json.dumps(out))
"""


@pytest.mark.parametrize("credentials", ["none", "own-key", "unix"])
def test_a_client_without_the_brokers_key_can_neither_read_nor_change_anything(
        credentials, tmp_path, ca_dir, pg_url, xrootd_server, xrootd_url, tokens):
    """A curious local user points the xrootd client at the broker's server: without credentials, with a
    sss key of its own (made with xrdsssadmin, same key name and user), or offering `unix` identity. Reading,
    stat, listing, creating, truncating, deleting and renaming are all refused at authentication, and the
    broker's object and folder are exactly as before."""
    server = start_server(tmp_path, ca_dir, db_url=pg_url, file_store=xrootd_url)
    try:
        secret = b"alice's private input\n" * 1000
        with BrokerClient(server.address, tokens.alice) as alice:
            uploaded = alice.upload(write(tmp_path / "secret.dat", secret))
        before = on_server(xrootd_server, xrootd_url)
        assert before == {uploaded.sha256: secret}
        env = {key: value for key, value in os.environ.items() if not key.startswith("XrdSec")}
        if credentials == "own-key":
            mine = str(tmp_path / "mine.keytab")
            make_keytab(mine)
            env.update(XrdSecPROTOCOL="sss", XrdSecSSSKT=mine)
        elif credentials == "unix":
            env.update(XrdSecPROTOCOL="unix")
        host, base, _keytab = parse_url(xrootd_url, "")
        done = subprocess.run([sys.executable, "-c", _ATTACK, host, base, uploaded.sha256], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        answers = json.loads(done.stdout)
        assert set(answers) == {"read", "stat", "list", "write", "overwrite", "delete", "rename"}
        for what, message in answers.items():
            assert "[FATAL] Auth failed" in message, (what, message)
        assert on_server(xrootd_server, xrootd_url) == before
        with BrokerClient(server.address, tokens.alice) as alice:   # the broker still has its content
            assert alice.find_files([uploaded.sha256])
        assert server.broker.files.open(uploaded.sha256).read() == secret
    finally:
        server.stop()


@pytest.mark.parametrize("problem, words", [
    ("readable", "is readable or writable by others (mode 640)"),
    ("foreign", "not to the broker's user"),
    ("missing", "cannot be read (No such file or directory)"),
])
def test_a_keytab_others_could_use_stops_the_broker_at_start(problem, words, tmp_path, ca_dir, pg_url,
                                                              xrootd_server):
    """The broker refuses to start with a keytab another user could read (or that is not its own, or is
    absent), naming the file, the problem and the fix; nothing is written to the server."""
    keytab = tmp_path / "broker.keytab"
    make_keytab(str(keytab))
    if problem == "readable":
        keytab.chmod(0o640)
    elif problem == "foreign":
        os.chown(keytab, 65534, 65534)
    else:
        keytab.unlink()
    url = f"xrootd://127.0.0.1:{xrootd_server.port}/refused?keytab={keytab}"
    with pytest.raises(StoreError) as info:
        start_server(tmp_path, ca_dir, db_url=pg_url, file_store=url)
    assert f"the XRootD keytab {keytab} " in str(info.value) and words in str(info.value)
    assert "fix: create it with `xrdsssadmin" in str(info.value) and "chmod 600" in str(info.value)
    assert not os.path.exists(xrootd_server.local("refused"))


@pytest.mark.parametrize("url, words", [
    ("xrootd://127.0.0.1:1094", "is not an XRootD URL; fix: xrootd://HOST:PORT/PATH"),
    ("xrootd://u:p@127.0.0.1:1094/x", "holds a user or password"),
    ("xrootd://127.0.0.1:1094/x?key=1", "option(s) key unknown"),
])
def test_a_bad_xrootd_url_is_refused_with_the_fix(url, words, tmp_path, ca_dir, pg_url):
    with pytest.raises(StoreError) as info:
        start_server(tmp_path, ca_dir, db_url=pg_url, file_store=url)
    assert words in str(info.value)


def test_content_state_is_unchanged_by_a_refused_upload(two, tokens, pg_url, xrootd_server, xrootd_url):
    """An upload whose bytes do not match its header is refused before anything reaches the server or the
    database."""
    a, _b = two
    before = content_state(pg_url)
    data = b"x" * 1000
    request = [pb.UploadFileRequest(header=pb.FileHeader(name="x", size=len(data),
                                                         sha256=hashlib.sha256(b"other").hexdigest())),
               pb.UploadFileRequest(data=data)]
    channel = user_channel(a, tokens.alice)
    with pytest.raises(grpc.RpcError) as info:
        rpc_pb.UserServiceStub(channel).UploadFile(iter(request), timeout=30)
    channel.close()
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert content_state(pg_url) == before
    assert on_server(xrootd_server, xrootd_url) == {}


def test_collection_deletes_objects_on_the_server_and_keeps_what_jobs_need(
        tmp_path, ca_dir, pg_url, xrootd_server, xrootd_url, tokens):
    """On the server's disk: an upload never used stays within the grace and goes after it; a waiting job's
    input and a finished job's output stay however old; the input goes once its job is final. An object
    the server cannot delete (its folder made read-only) keeps its catalogue row, so the content is never
    named but missing, and goes on the next pass once the server can delete it; an object already gone
    from the server only loses its row."""
    server = start_server(tmp_path, ca_dir, db_url=pg_url, file_store=xrootd_url)
    folder = pathlib.Path(xrootd_server.local(base_of(xrootd_url)))
    try:
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
            everything = {lone.sha256: unused, kept.sha256: needed, made.sha256: output}
            assert server.collect_once(utcnow()) == (0, 0, 0)
            assert on_server(xrootd_server, xrootd_url) == everything

            folder.chmod(0o500)   # the server (its own user) can no longer unlink in its folder
            try:
                assert server.collect_once(utcnow() + 2 * DAY)[:2] == (0, 0)
                assert on_server(xrootd_server, xrootd_url) == everything
                assert server.broker.files.size_of(lone.sha256) == len(unused)   # still catalogued
            finally:
                folder.chmod(0o750)
            assert server.collect_once(utcnow() + 2 * DAY)[:2] == (1, len(unused))
            del everything[lone.sha256]
            assert on_server(xrootd_server, xrootd_url) == everything

            alice.kill(waiting)
            (folder / kept.sha256).unlink()   # gone from the server already: only its row is left to drop
            assert server.collect_once(utcnow() + 2 * DAY)[:2] == (1, len(needed))
            assert on_server(xrootd_server, xrootd_url) == {made.sha256: output}
            assert rows(pg_url, "SELECT sha256 FROM contents") == [(made.sha256,)]
            assert alice.output(done_job, tmp_path / "fetched")
    finally:
        server.stop()


def test_a_server_outage_is_unavailable_and_changes_nothing(tmp_path, ca_dir, pg_url, xrootd_server, tokens):
    """The XRootD server goes down (a private one, sharing the session's key). An upload is UNAVAILABLE with
    the fix (retry later) and leaves no row and no staged file; a job's download is UNAVAILABLE (not
    DATA_LOSS: nothing is lost); a collection pass removes nothing and keeps every row (not "gone")."""
    with XRootDServer(keytab=xrootd_server.keytab) as own:
        server = start_server(tmp_path, ca_dir, db_url=pg_url, file_store=own.url("outage"))
        try:
            data = b"a waiting job's input\n" * 100
            with BrokerClient(server.address, tokens.alice) as alice, \
                    AgentClient(server.address, tokens.agent) as agent:
                kept = alice.upload(write(tmp_path / "in", data))
                alice.upload(write(tmp_path / "garbage", b"garbage\n"))
                submit_one(alice, input_files=[kept])
                job = running(match(agent))
                own.pause()
                before = content_state(pg_url)
                with pytest.raises(grpc.RpcError) as info:
                    upload_raw(server, tokens.alice, "new.dat", b"new bytes\n")
                assert info.value.code() is grpc.StatusCode.UNAVAILABLE
                assert "the broker's XRootD file store is unavailable" in info.value.details()
                assert "fix: retry later" in info.value.details()
                with pytest.raises(BrokerError) as failed:
                    job.get_input("in", tmp_path / "sandbox" / "in")
                assert failed.value.code is grpc.StatusCode.UNAVAILABLE, failed.value.details
                assert server.collect_once(utcnow() + 2 * DAY)[:2] == (0, 0)
                assert content_state(pg_url) == before
                assert os.listdir(os.path.join(server.state_dir, "staging")) == []
        finally:
            server.stop()


def test_an_upload_never_sends_before_it_holds_its_row_so_a_collection_cannot_orphan_it(
        two, tokens, tmp_path, pg_url, xrootd_server, xrootd_url):
    """The race the design exists for, made deterministic: a collection (here by hand, as a pass of broker A
    does it) holds content X's row FOR UPDATE and is about to delete X's object and row, when Bob uploads the
    same bytes through broker B. B's upload must wait for the row before it touches the server (had it sent
    first, the collection would delete the object Bob's new row then names: content lost). After the
    collection commits, Bob's upload stores X again: row and object, byte-exact."""
    a, b = two
    data = os.urandom(300 * 1024)
    with BrokerClient(a.address, tokens.alice) as alice:
        x = alice.upload(write(tmp_path / "x", data))
    path = pathlib.Path(xrootd_server.local(base_of(xrootd_url), x.sha256))
    with psycopg.connect(pg_url) as collector:
        assert collector.execute("SELECT sha256 FROM contents WHERE sha256 = %s FOR UPDATE",
                                 (x.sha256,)).fetchall() == [(x.sha256,)]
        done, failures = [], []

        def bob_uploads() -> None:
            try:
                done.append(upload_raw(b, tokens.bob, "x.dat", data))
            except Exception as exc:  # noqa: BLE001 (reported by the main thread)
                failures.append(exc)
        thread = threading.Thread(target=bob_uploads)
        thread.start()
        try:
            wait_for(lambda: rows(pg_url, "SELECT count(*) FROM pg_locks WHERE NOT granted")[0][0] > 0, 60,
                     "Bob's upload to wait for the collected row")
            assert path.read_bytes() == data and not done
            # The collection: object first (under the row lock), then the rows; commit.
            assert a.broker.files._remove([x.sha256]) == [x.sha256]
            collector.execute("DELETE FROM file_owners WHERE sha256 = %s", (x.sha256,))
            collector.execute("DELETE FROM contents WHERE sha256 = %s", (x.sha256,))
            collector.commit()
        finally:
            thread.join(120)
    assert failures == [] and len(done) == 1 and not done[0].already_present
    assert rows(pg_url, "SELECT sha256, size FROM contents") == [(x.sha256, len(data))]
    assert path.read_bytes() == data, "Bob's row names an object the collection deleted"
    with b.broker.files.open(x.sha256) as stored:
        assert stored.read(len(data)) == data


def test_a_crashed_uploads_temporary_object_is_removed_at_start_and_a_fresh_one_kept(
        tmp_path, ca_dir, pg_url, xrootd_server, xrootd_url):
    """A broker that died mid-upload left PATH/tmp/<name> on the server. The next start of a broker removes
    such objects once older than 6 hours, and keeps a fresh one (another broker's upload in flight)."""
    first = start_server(tmp_path, ca_dir, db_url=pg_url, file_store=xrootd_url)
    first.stop()
    folder = pathlib.Path(xrootd_server.local(base_of(xrootd_url), "tmp"))
    stale, fresh = folder / "0123456789abcdef.stale", folder / "0123456789abcdef.fresh"
    for path in (stale, fresh):
        path.write_bytes(b"half an upload")
    day_ago = datetime.datetime.now().timestamp() - 86400
    os.utime(stale, (day_ago, day_ago))
    server = start_server(tmp_path, ca_dir, db_url=pg_url, file_store=xrootd_url)
    try:
        assert sorted(p.name for p in folder.iterdir()) == [fresh.name]
        assert server.broker.files.remote_temp_files() == [fresh.name]
    finally:
        server.stop()
