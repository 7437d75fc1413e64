"""The job store, every test against both backends (SQLite and a real PostgreSQL).

Unit tests of each JobStore method and each refusal; reaping; matching rules;
kills; history; query plans (structural: the match reads indexes, never the
queue); concurrency across processes (and threads) with exactly one winner
per job attempt; and, for SQLite, SIGKILL in the middle of work.
"""

from __future__ import annotations

import dataclasses
import datetime
import multiprocessing
import os
import pathlib
import re
import signal
import sqlite3
import tempfile
import threading
import time
from collections import Counter

import psycopg
import pytest
from pg import DATABASE, free_port, pg_server, pg_url  # noqa: F401  (fixtures)
from store_v1 import (
    make_postgres_v1,
    make_postgres_v4,
    make_postgres_v5,
    make_sqlite_v1,
    make_sqlite_v4,
    make_sqlite_v5,
)

from broker.lifecycle import TRANSITIONS, Actor, RequeueCause, allowed
from broker.store import open_store
from broker.store.base import (
    BadValue,
    InvalidTransition,
    LimitExceeded,
    NotYours,
    OfferRecord,
    OutOfOrderUpdate,
    OutputRecord,
    PilotNotYours,
    PilotRef,
    SeenToken,
    SlotOffer,
    StaleAttemptError,
    StoreError,
    StoreSettings,
    StoreUnavailable,
    TooManyJobs,
    UnknownBatch,
    UnknownJob,
)
from broker.store.schema import SCHEMA_VERSION, from_ms
from broker.store.sql import BATCH_ID_RE
from pilot.api.states import JobState
from pilot.errors import UsageError
from splitpilot.job.v1 import job_pb2

S = JobState
UTC = datetime.UTC
T0 = datetime.datetime(2026, 1, 1, tzinfo=UTC)
SITE = "SITE-A"
PILOT = PilotRef("pilot-1", SITE, "node-1", "CN=agent")
OTHER_PILOT = PilotRef("pilot-2", SITE, "node-2")
SETTINGS = StoreSettings(default_max_attempts=3, heartbeat_timeout=datetime.timedelta(minutes=5),
                         start_timeout=datetime.timedelta(minutes=10),
                         queue_timeout=datetime.timedelta(days=2), max_jobs_per_submit=10_000)


def at(seconds: float = 0) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


def spec(priority: int = 0, name: str = "", max_attempts: int = 0, **requirements) -> job_pb2.JobSpec:
    return job_pb2.JobSpec(executable="run.sh", arguments=["--n", "1"], name=name, priority=priority,
                           max_attempts=max_attempts, owner="forged",
                           requirements=job_pb2.Requirements(**requirements))


def slot(site: str = SITE, cores: int = 8, memory_mb: int = 32_000, disk_mb: int = 100_000,
         time_left_s: int = 86_400, platforms: tuple[str, ...] = ("el9",), containers: bool = True) -> SlotOffer:
    return SlotOffer(site, cores, memory_mb, disk_mb, time_left_s, platforms, containers)


# ---------------------------------------------------------------- fixtures

@pytest.fixture
def tmp_path():
    """A private directory removed after the test (pytest's own tmp_path keeps the last runs)."""
    with tempfile.TemporaryDirectory(prefix="splitpilot-store-") as directory:
        yield pathlib.Path(directory)


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(url):
    opened = open_store(url, SETTINGS)
    try:
        yield opened
    finally:
        opened.close()


def submit_one(store, when: float = 0, **kw) -> int:
    return store.submit("alice", [spec(**kw)], at(when))[0]


def start(store, job_id: int, when: float = 1, pilot: PilotRef = PILOT) -> int:
    """Match JOB_ID (the only waiting job that fits) and report STARTED; return the attempt."""
    assignment = store.match(slot(), pilot, at(when))
    assert assignment is not None and assignment.job_id == job_id
    store.job_update(job_id, assignment.attempt, S.STARTED, 1, "wrapper up", None, at(when))
    return assignment.attempt


def drive(store, job_id: int, attempt: int, states, when: float = 2, first_sequence: int = 2) -> int:
    """Report STATES in order from sequence FIRST_SEQUENCE; return the next sequence."""
    sequence = first_sequence
    for state in states:
        store.job_update(job_id, attempt, state, sequence, "", 0 if state.final else None, at(when))
        sequence += 1
    return sequence


def history_states(store, job_id: int) -> list[tuple[JobState, int]]:
    return [(event.state, event.attempt) for event in store.get(job_id).history]


# ------------------------------------------------------------ open_store

def test_open_store_urls(tmp_path, pg_url):  # noqa: F811
    for url in (f"sqlite:///{tmp_path}/a.db", str(tmp_path / "b.db"), f"sqlite:////{tmp_path}/c.db"):
        opened = open_store(url, SETTINGS)
        assert type(opened).__name__ == "SqliteStore"
        opened.close()
    assert {p.name for p in tmp_path.glob("*.db")} == {"a.db", "b.db", "c.db"}
    opened = open_store(pg_url, SETTINGS)
    assert type(opened).__name__ == "PostgresStore"
    opened.close()
    with pytest.raises(UsageError, match="unknown scheme"):
        open_store("mysql://x/y", SETTINGS)
    with pytest.raises(UsageError):
        open_store("sqlite://", SETTINGS)


def _pool_threads() -> list[str]:
    """Threads of the PostgreSQL stores' connection pools (psycopg_pool names them after the pool)."""
    return [t.name for t in threading.enumerate() if t.name.startswith("splitpilot-broker")]


def test_postgres_store_refuses_an_absent_server_at_once_with_the_drivers_words(pg_server):  # noqa: F811
    """A URL where no PostgreSQL listens fails open_store with the driver's own words (not a pool timeout
    without a cause), and leaves no pool thread behind."""
    port = free_port()
    with pytest.raises(StoreUnavailable) as info:
        open_store(f"postgresql://postgres@127.0.0.1:{port}/{DATABASE}", SETTINGS)
    assert f"(PostgreSQL: 'connection failed: connection to server at \"127.0.0.1\", port {port} failed" \
        in str(info.value) and "fix: retry later" in str(info.value)
    assert _pool_threads() == []


def test_postgres_store_busy_pool_is_unavailable_in_bounded_time_and_changes_nothing(pg_url):  # noqa: F811
    """Every connection held (a stuck call): the next call waits at most pool_timeout, then answers
    StoreUnavailable naming the busy pool and the fix (the services answer UNAVAILABLE: clients
    retry), and the refused submit stored nothing. Closed, the store refuses every call by name."""
    settings = dataclasses.replace(SETTINGS, extra={"pool_size": 1, "pool_timeout": 0.5})
    store = open_store(pg_url, settings)
    try:
        job_id = submit_one(store)
        with store._pool.connection():
            for call in (lambda: store.get(job_id), lambda: store.submit("mallory", [spec()], at())):
                with pytest.raises(StoreUnavailable, match="all 1 connections of this broker stayed busy for "
                                                           "0.5s .raise the store's pool_size"):
                    call()
        assert store.counts()[S.WAITING] == 1 and store.get(job_id).owner == "alice"
    finally:
        store.close()
    with pytest.raises(StoreError, match="the store is closed"):
        store.get(job_id)
    assert _pool_threads() == []


def test_postgres_store_refuses_a_forked_child(pg_url):  # noqa: F811
    """A child forked after the store was opened must not use the parent's connections (their
    sockets are shared): its call is refused with the fix; the parent's store keeps working."""
    store = open_store(pg_url, SETTINGS)
    try:
        job_id = submit_one(store)
        child = os.fork()
        if child == 0:  # pragma: no cover (runs in the child)
            code = 3
            try:
                store.get(job_id)
                code = 1
            except StoreError as exc:
                code = 0 if "open the store again after fork" in str(exc) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert store.get(job_id).state is S.WAITING
    finally:
        store.close()


def test_reopen_keeps_jobs(url):
    first = open_store(url, SETTINGS)
    ids = first.submit("alice", [spec(), spec(cores=2)], at())
    first.close()
    second = open_store(url, SETTINGS)
    try:
        assert [second.get(i).state for i in ids] == [S.WAITING, S.WAITING]
        assert second.submit("alice", [spec()], at())[0] > max(ids)
    finally:
        second.close()


# ------------------------------------------------------------------ submit

def test_submit_records_jobs(store):
    ids = store.submit("alice", [spec(name="a"), spec(name="b", max_attempts=7, priority=4)], at(5))
    assert len(ids) == 2 and ids[0] < ids[1]
    first, second = store.get(ids[0]), store.get(ids[1])
    assert first.owner == "alice" and first.spec.owner == "alice"  # the caller's, not the spec's
    assert first.max_attempts == 3 and first.spec.max_attempts == 3  # the default when 0
    assert second.max_attempts == 7 and second.spec.priority == 4 and second.spec.name == "b"
    assert first.state is S.WAITING and first.attempt == 0 and first.exit_code is None
    assert first.submitted == first.updated == at(5)
    assert [(e.state, e.attempt, e.time) for e in first.history] == [(S.WAITING, 0, at(5))]
    assert store.submit("alice", [], at()) == []
    assert store.counts()[S.WAITING] == 2


def test_submit_is_all_or_none(store, monkeypatch):
    small = StoreSettings(max_jobs_per_submit=3)
    monkeypatch.setattr(store, "settings", small)
    with pytest.raises(TooManyJobs) as refused:
        store.submit("alice", [spec()] * 4, at())
    assert (refused.value.count, refused.value.limit) == (4, 3)
    original = store._insert_jobs

    def insert_then_fail(cur, *args):
        original(cur, *args)
        raise RuntimeError("disk full")
    monkeypatch.setattr(store, "_insert_jobs", insert_then_fail)
    with pytest.raises(RuntimeError):
        store.submit("alice", [spec(), spec(cores=3)], at())
    monkeypatch.undo()
    assert sum(store.counts().values()) == 0
    assert store.match(slot(), PILOT, at(1)) is None


def test_naive_datetimes_are_refused(store):
    with pytest.raises(ValueError, match="naive"):
        store.submit("alice", [spec()], datetime.datetime(2026, 1, 1))


# ------------------------------------------------------------ get and list

def test_unknown_job_everywhere(store):
    calls = [
        lambda: store.get(99),
        lambda: store.kill(99, None, "", at()),
        lambda: store.job_update(99, 1, S.STARTED, 1, "", None, at()),
        lambda: store.job_heartbeat(99, 1, 0.0, 0, 0, at()),
        lambda: store.add_output(99, 1, OutputRecord("o", 1, "a" * 64), at()),
        lambda: store.attempt_failed(99, 1, PILOT, RequeueCause.WRAPPER, "", at()),
        lambda: store.requeue(99, RequeueCause.ADMIN, "", at()),
    ]
    for call in calls:
        with pytest.raises(UnknownJob) as refused:
            call()
        assert refused.value.job_id == 99


def test_list_and_counts(store):
    alice = store.submit("alice", [spec(name=str(i)) for i in range(5)], at())
    bob = store.submit("bob", [spec(name="b")], at())
    store.kill(alice[1], "alice", "no", at(1))
    assert [r.job_id for r in store.list(None)] == [bob[0], *reversed(alice)]
    assert [r.job_id for r in store.list("alice", limit=2)] == [alice[4], alice[3]]
    assert [r.job_id for r in store.list("alice", before_job_id=alice[3])] == [alice[2], alice[1], alice[0]]
    assert [r.job_id for r in store.list("alice", states=[S.KILLED])] == [alice[1]]
    assert [r.job_id for r in store.list(None, states=[S.WAITING, S.KILLED], limit=100)][:2] == [bob[0], alice[4]]
    assert store.list("carol") == []
    assert all(r.history == () for r in store.list(None))
    assert store.counts("alice")[S.WAITING] == 4 and store.counts("alice")[S.KILLED] == 1
    assert store.counts()[S.WAITING] == 5 and store.counts("bob")[S.KILLED] == 0
    assert set(store.counts()) == set(JobState)


# ---------------------------------------------------------------- matching

@pytest.mark.parametrize("requirement,refusing,offering", [
    ({"cores": 4}, {"cores": 3}, {"cores": 4}),
    ({"memory_mb": 4000}, {"memory_mb": 3999}, {"memory_mb": 4000}),
    ({"disk_mb": 9000}, {"disk_mb": 8999}, {"disk_mb": 9000}),
    ({"walltime_s": 7200}, {"time_left_s": 7199}, {"time_left_s": 7200}),
    ({"platform": "el8"}, {"platforms": ("el9",)}, {"platforms": ("el9", "el8")}),
    ({"container_image": "img.sif"}, {"containers": False}, {"containers": True}),
    ({"sites_allowed": ["SITE-B", "SITE-C"]}, {"site": SITE}, {"site": "SITE-C"}),
    ({"sites_denied": ["SITE-A"]}, {"site": SITE}, {"site": "SITE-B"}),
    ({"sites_allowed": ["SITE-B"], "sites_denied": ["SITE-B"]}, {"site": "SITE-B"}, None),
])
def test_match_checks_each_requirement(store, requirement, refusing, offering):
    job_id = submit_one(store, **requirement)
    assert store.match(slot(**refusing), PILOT, at(1)) is None
    assert store.get(job_id).state is S.WAITING
    if offering is None:
        return
    assignment = store.match(slot(**offering), PILOT, at(2))
    assert assignment is not None and (assignment.job_id, assignment.attempt) == (job_id, 1)
    assert assignment.owner == "alice" and assignment.spec.requirements == spec(**requirement).requirements


def test_zero_cores_means_one(store):
    submit_one(store, cores=0)
    assert store.match(slot(cores=0), PILOT, at(1)) is None
    assert store.match(slot(cores=1), PILOT, at(1)) is not None


def test_match_claims_and_records(store):
    job_id = submit_one(store)
    assignment = store.match(slot(), PILOT, at(10))
    record = store.get(job_id)
    assert (record.state, record.attempt, record.site, record.node, record.pilot_id) == \
        (S.ASSIGNED, 1, SITE, "node-1", "pilot-1")
    assert record.updated == at(10) and assignment.spec.executable == "run.sh"
    assert history_states(store, job_id) == [(S.WAITING, 0), (S.ASSIGNED, 1)]
    assert (store.get(job_id).state, store.get(job_id).attempt) == (S.ASSIGNED, 1)
    assert store.match(slot(), PILOT, at(11)) is None  # claimed once only
    assert store.stats()["matches_total"] == 1


def test_priority_then_age_across_classes(store):
    low_old = submit_one(store, 0, priority=1, cores=1)
    high = submit_one(store, 1, priority=5, cores=2)
    low_new = submit_one(store, 2, priority=1, cores=3)
    high_same_class_newer = submit_one(store, 3, priority=5, cores=2)
    mid = submit_one(store, 4, priority=3, memory_mb=10)
    too_big = submit_one(store, 5, priority=9, cores=64)
    order = [store.match(slot(), PILOT, at(10 + i)).job_id for i in range(5)]
    assert order == [high, high_same_class_newer, mid, low_old, low_new]
    assert store.match(slot(), PILOT, at(20)) is None
    assert store.get(too_big).state is S.WAITING


def test_site_states(store):
    job_id = submit_one(store)
    assert store.site_state(SITE) == "enabled"
    assert store.set_site_state(SITE, "draining", "maintenance", at(1)) == "enabled"
    assert store.site_state(SITE) == "draining"
    assert store.match(slot(), PILOT, at(2)) is None
    assert store.set_site_state(SITE, "disabled", "broken", at(3)) == "draining"
    assert store.match(slot(), PILOT, at(4)) is None
    assert store.match(slot(site="SITE-B"), PilotRef("p-b", "SITE-B", "n"), at(4)).job_id == job_id
    store.requeue(job_id, RequeueCause.ADMIN, "back", at(5))
    assert store.set_site_state(SITE, "enabled", "fixed", at(6)) == "disabled"
    assert store.match(slot(), PILOT, at(7)).job_id == job_id
    with pytest.raises(UsageError, match="not one of"):
        store.set_site_state(SITE, "paused", "", at(8))


def test_new_classes_seen_by_another_store(store, url):
    other = open_store(url, SETTINGS)
    try:
        assert other.match(slot(), PILOT, at()) is None  # its class cache is loaded (empty)
        job_id = store.submit("alice", [spec(cores=5, platform="el9")], at(1))[0]
        assignment = other.match(slot(), PILOT, at(2))
        assert assignment is not None and assignment.job_id == job_id
    finally:
        other.close()


# ------------------------------------------------------------------ kills

def test_kill_waiting_and_assigned_at_once(store):
    waiting, assigned = submit_one(store), submit_one(store, cores=2)
    assert store.kill(waiting, "alice", "typo", at(1)) is S.KILLED
    assert store.match(slot(), PILOT, at(2)).job_id == assigned
    assert store.kill(assigned, None, "admin cleanup", at(3)) is S.KILLED
    record = store.get(assigned)
    assert record.state is S.KILLED and "admin cleanup" in record.message and record.updated == at(3)
    assert history_states(store, assigned)[-1] == (S.KILLED, 1)
    with pytest.raises(StaleAttemptError):  # the attempt ended with the kill
        store.job_update(assigned, 1, S.STARTED, 1, "", None, at(4))
    assert store.pilot_heartbeat(PILOT, [(assigned, 1)], at(5)) == [(assigned, 1)]
    assert store.kill(assigned, "alice", "again", at(6)) is S.KILLED  # final: unchanged


def test_kill_running_is_requested(store):
    job_id = submit_one(store)
    attempt = start(store, job_id)
    drive(store, job_id, attempt, [S.RUNNING])
    assert store.job_heartbeat(job_id, attempt, 1.0, 10, 10, at(3)) is False
    assert store.kill(job_id, "alice", "wrong input", at(4)) is S.RUNNING
    record = store.get(job_id)
    assert record.kill_requested and record.state is S.RUNNING
    assert store.job_heartbeat(job_id, attempt, 2.0, 10, 10, at(5)) is True
    assert store.pilot_heartbeat(PILOT, [(job_id, attempt)], at(5)) == [(job_id, attempt)]
    assert store.job_update(job_id, attempt, S.KILLED, 3, "told to stop", 137, at(6)).state is S.KILLED
    assert store.get(job_id).exit_code == 137
    assert store.kill(job_id, "alice", "", at(7)) is S.KILLED


def test_kill_refusals(store):
    job_id = submit_one(store)
    with pytest.raises(NotYours):
        store.kill(job_id, "mallory", "", at(1))
    assert store.get(job_id).state is S.WAITING
    done = submit_one(store, priority=1)
    attempt = start(store, done)
    drive(store, done, attempt, [S.RUNNING, S.SAVING, S.DONE])
    assert store.kill(done, "alice", "", at(9)) is S.DONE


def test_killed_while_running_then_lost_is_not_requeued(store):
    job_id = submit_one(store)
    attempt = start(store, job_id, when=0)
    store.kill(job_id, "alice", "stop it", at(1))
    reaped = store.reap(at(301))
    assert [(r.job_id, r.cause, r.new_state) for r in reaped] == [(job_id, RequeueCause.LOST, S.KILLED)]
    assert history_states(store, job_id)[-2:] == [(S.WAITING, attempt), (S.KILLED, attempt)]


# -------------------------------------------------------------- job updates

def test_update_life_cycle_to_done(store):
    job_id = submit_one(store)
    attempt = start(store, job_id)
    assert store.job_update(job_id, attempt, S.RUNNING, 2, "payload", None, at(3)).state is S.RUNNING
    assert store.job_update(job_id, attempt, S.SAVING, 3, "", 0, at(4)).state is S.SAVING
    assert store.get(job_id).exit_code is None  # not final: no exit code yet
    result = store.job_update(job_id, attempt, S.DONE, 4, "all good", 0, at(5))
    assert result.state is S.DONE and not result.replay
    record = store.get(job_id)
    assert (record.state, record.exit_code, record.message, record.updated) == (S.DONE, 0, "all good", at(5))
    assert history_states(store, job_id) == [(S.WAITING, 0), (S.ASSIGNED, 1), (S.STARTED, 1), (S.RUNNING, 1),
                                             (S.SAVING, 1), (S.DONE, 1)]
    replay = store.job_update(job_id, attempt, S.DONE, 4, "all good", 0, at(6))
    assert replay.replay and replay.state is S.DONE
    assert len(store.get(job_id).history) == 6
    with pytest.raises(InvalidTransition):
        store.job_update(job_id, attempt, S.RUNNING, 5, "", None, at(7))


def test_update_sequence_rules(store):
    job_id = submit_one(store)
    assignment = store.match(slot(), PILOT, at(1))
    attempt = assignment.attempt
    with pytest.raises(OutOfOrderUpdate) as refused:
        store.job_update(job_id, attempt, S.STARTED, 2, "", None, at(2))
    assert (refused.value.sequence, refused.value.expected) == (2, 1)
    with pytest.raises(OutOfOrderUpdate):
        store.job_update(job_id, attempt, S.STARTED, 0, "", None, at(2))
    store.job_update(job_id, attempt, S.STARTED, 1, "", None, at(2))
    assert store.job_update(job_id, attempt, S.STARTED, 1, "", None, at(3)).replay
    with pytest.raises(OutOfOrderUpdate):  # same sequence, another state
        store.job_update(job_id, attempt, S.RUNNING, 1, "", None, at(3))
    with pytest.raises(OutOfOrderUpdate):
        store.job_update(job_id, attempt, S.RUNNING, 3, "", None, at(3))
    store.job_update(job_id, attempt, S.RUNNING, 2, "", None, at(4))
    with pytest.raises(OutOfOrderUpdate):  # an old one again
        store.job_update(job_id, attempt, S.STARTED, 1, "", None, at(5))
    assert store.get(job_id).state is S.RUNNING


def _reach(store, job_id: int, state: JobState) -> tuple[int, int]:
    """Bring a fresh job to STATE (one of the active states); return (attempt, next sequence)."""
    assignment = store.match(slot(), PILOT, at(1))
    assert assignment.job_id == job_id
    path = {S.ASSIGNED: [], S.STARTED: [S.STARTED], S.RUNNING: [S.STARTED, S.RUNNING],
            S.SAVING: [S.STARTED, S.RUNNING, S.SAVING]}[state]
    return assignment.attempt, drive(store, job_id, assignment.attempt, path, first_sequence=1)


def test_updates_follow_the_lifecycle_table(store):
    """Every (active state, reported state) pair: applied iff the table allows it for the job."""
    reportable = sorted({to for (_, to) in TRANSITIONS} | {S.WAITING, S.ASSIGNED, S.LOST}, key=int)
    checked = 0
    for current in (S.ASSIGNED, S.STARTED, S.RUNNING, S.SAVING):
        for target in reportable:
            job_id = submit_one(store)
            attempt, sequence = _reach(store, job_id, current)
            if allowed(current, target, Actor.JOB):
                assert store.job_update(job_id, attempt, target, sequence, "", 3, at(9)).state is target
                assert store.get(job_id).state is target
                checked += 1
            else:
                with pytest.raises(InvalidTransition) as refused:
                    store.job_update(job_id, attempt, target, sequence, "", None, at(9))
                assert (refused.value.current, refused.value.requested) == (current, target)
                assert store.get(job_id).state is current
            store.kill(job_id, None, "clean up", at(10))  # out of the way of the next match
    assert checked == sum(Actor.JOB in actors for actors in TRANSITIONS.values())


def test_heartbeat_refreshes_and_fences(store):
    job_id = submit_one(store)
    attempt = start(store, job_id, when=0)
    assert store.job_heartbeat(job_id, attempt, 5.0, 1 << 20, 1 << 10, at(200)) is False
    assert store.reap(at(450)) == []  # 250 s after the heartbeat: alive
    with pytest.raises(StaleAttemptError):
        store.job_heartbeat(job_id, attempt + 1, 5.0, 0, 0, at(201))


def test_heartbeat_usage_is_the_current_attempts_and_bounded(store):
    job_id = submit_one(store)
    attempt = start(store, job_id, when=0)
    assert store.get(job_id).usage is None  # no heartbeat yet
    store.job_heartbeat(job_id, attempt, 754.25, 300 << 20, 1 << 10, at(200))
    usage = store.get(job_id).usage
    assert (usage.cpu_seconds, usage.rss_bytes, usage.time) == (754.25, 300 << 20, at(200))
    # A hostile wrapper's figures are clamped, never an error: the heartbeat is liveness first.
    for cpu, rss in ((float("nan"), 2**64 - 1), (float("inf"), -5), (-3.0, 2**63)):
        assert store.job_heartbeat(job_id, attempt, cpu, rss, 0, at(201)) is False
        usage = store.get(job_id).usage
        assert usage.cpu_seconds == 0 and 0 <= usage.rss_bytes <= 2**62
    # A stale attempt's heartbeat changes nothing; the next attempt starts without figures.
    store.job_heartbeat(job_id, attempt, 10.0, 1000, 0, at(202))
    store.requeue(job_id, RequeueCause.ADMIN, "node drained", at(203))
    with pytest.raises(StaleAttemptError):
        store.job_heartbeat(job_id, attempt, 99.0, 99, 0, at(204))
    assert store.get(job_id).usage.cpu_seconds == 10.0
    assert start(store, job_id, when=205) == attempt + 1
    assert store.get(job_id).usage is None


# ---------------------------------------------------------------- outputs

def test_outputs_belong_to_the_attempt(store):
    job_id = submit_one(store)
    first = start(store, job_id)
    store.add_output(job_id, first, OutputRecord("out.root", 10, "a" * 64), at(2))
    assert [o.name for o in store.get(job_id).outputs] == ["out.root"]
    store.requeue(job_id, RequeueCause.ADMIN, "node drained", at(3))
    assert store.get(job_id).outputs == ()
    with pytest.raises(StaleAttemptError):
        store.add_output(job_id, first, OutputRecord("late.root", 1, "b" * 64), at(4))
    second = start(store, job_id, when=5)
    assert second == first + 1 and store.get(job_id).outputs == ()
    store.add_output(job_id, second, OutputRecord("out.root", 20, "c" * 64), at(6))
    store.add_output(job_id, second, OutputRecord("log.txt", 5, "d" * 64), at(6))
    store.add_output(job_id, second, OutputRecord("out.root", 21, "e" * 64), at(7))  # re-upload replaces
    drive(store, job_id, second, [S.RUNNING, S.SAVING, S.DONE], when=8)
    assert store.get(job_id).outputs == (OutputRecord("log.txt", 5, "d" * 64), OutputRecord("out.root", 21, "e" * 64))
    with pytest.raises(StaleAttemptError):  # final: nothing more to add
        store.add_output(job_id, second, OutputRecord("x", 1, "f" * 64), at(9))


# ------------------------------------------------------- agent reports

def test_attempt_failed_refusals(store):
    job_id = submit_one(store)
    attempt = start(store, job_id)
    with pytest.raises(NotYours):
        store.attempt_failed(job_id, attempt, OTHER_PILOT, RequeueCause.WRAPPER, "", at(2))
    with pytest.raises(StaleAttemptError) as refused:
        store.attempt_failed(job_id, attempt + 1, PILOT, RequeueCause.WRAPPER, "", at(2))
    assert (refused.value.attempt, refused.value.current) == (2, 1)
    assert store.attempt_failed(job_id, attempt, PILOT, RequeueCause.WRAPPER, "segfault", at(3)) is S.WAITING
    with pytest.raises(StaleAttemptError) as refused:
        store.attempt_failed(job_id, attempt, PILOT, RequeueCause.WRAPPER, "again", at(4))
    assert refused.value.current == 2


def test_attempt_failed_causes(store):
    limited = submit_one(store)
    attempt = start(store, limited)
    # A limit overrun has its own final state: KILLED is only ever the owner's or an admin's kill.
    assert store.attempt_failed(limited, attempt, PILOT, None, "memory 9 GB > 8 GB", at(2)) is S.FAILED_LIMIT
    record = store.get(limited)
    assert record.state is S.FAILED_LIMIT and record.state.final and "memory" in record.message
    assert [e.state for e in record.history][-1] is S.FAILED_LIMIT
    with pytest.raises(StaleAttemptError):
        store.job_update(limited, attempt, S.RUNNING, 2, "", None, at(3))

    broken = submit_one(store, max_attempts=2)
    states = []
    for round_ in range(2):
        attempt = start(store, broken, when=10 + round_)
        states.append(store.attempt_failed(broken, attempt, PILOT, RequeueCause.INFRASTRUCTURE, "", at(10)))
    assert states == [S.WAITING, S.FAILED_WRAPPER]
    assert store.get(broken).attempt == 2


def test_stops_do_not_use_up_attempts(store):
    job_id = submit_one(store, max_attempts=1)
    for round_ in range(3):
        attempt = start(store, job_id, when=round_)
        assert store.attempt_failed(job_id, attempt, PILOT, RequeueCause.STOPPED, "preempted", at(round_)) \
            is S.WAITING
    # Nor does a failure of the agent's own code: neither the job nor the node did anything wrong.
    attempt = start(store, job_id, when=4)
    assert store.attempt_failed(job_id, attempt, PILOT, RequeueCause.AGENT, "agent bug", at(4)) is S.WAITING
    attempt = start(store, job_id, when=5)
    assert attempt == 5
    assert store.attempt_failed(job_id, attempt, PILOT, RequeueCause.WRAPPER, "", at(6)) is S.FAILED_WRAPPER


# ------------------------------------------------------------------- pilots

def test_pilots(store):
    job_id = submit_one(store)
    assert store.pilot_heartbeat(PILOT, [], at(1)) == []
    store.match(slot(), PILOT, at(2))
    store.match(slot(), PILOT, at(3))  # nothing left, still a contact
    empty = PilotRef("pilot-empty", "SITE-B", "node-9")
    store.pilot_end(empty, 0, "idle", at(4))
    store.pilot_end(empty, 0, "idle", at(5))  # reported twice: counted once
    store.pilot_end(PILOT, 1, "lifetime", at(6))
    pilots = {p.pilot_id: p for p in store.list_pilots(at(0))}
    assert set(pilots) == {"pilot-1", "pilot-empty"}
    mine = pilots["pilot-1"]
    assert (mine.first_seen, mine.last_seen, mine.jobs_matched, mine.end_reason, mine.site, mine.node) == \
        (at(1), at(6), 1, "lifetime", SITE, "node-1")
    assert pilots["pilot-empty"].end_reason == "empty" and pilots["pilot-empty"].jobs_matched == 0
    assert [p.pilot_id for p in store.list_pilots(at(6))] == ["pilot-1"]
    assert [p.pilot_id for p in store.list_pilots(at(0))] == ["pilot-1", "pilot-empty"]  # most recent first
    stats = store.stats()
    assert (stats["pilots_seen"], stats["empty_pilots_total"], stats["matches_total"]) == (2, 1, 1)
    assert store.get(job_id).pilot_id == "pilot-1"


def test_a_pilots_end_ends_the_attempts_it_still_holds(store):
    """An agent killed by its payload: its guardian reports the pilot abandoned, and every attempt the
    pilot holds is ended at once as the reaper would (LOST, charged, re-queued), not minutes later;
    another pilot's job is not touched, and the old attempt is fenced."""
    held = submit_one(store, priority=3)
    attempt = start(store, held, when=1)
    assigned = submit_one(store, priority=2)
    assert store.match(slot(), PILOT, at(2)).job_id == assigned
    theirs = submit_one(store, priority=1)
    assert store.match(slot(), OTHER_PILOT, at(2)).job_id == theirs
    ended = store.pilot_end(PILOT, 2, "agent killed by SIGKILL", at(3), abandoned=True)
    assert sorted((r.job_id, r.new_state) for r in ended) == [(held, S.WAITING), (assigned, S.WAITING)]
    record = store.get(held)
    assert record.state is S.WAITING and "its agent died (agent killed by SIGKILL)" in record.history[-1].detail
    assert store.get(theirs).state is S.ASSIGNED
    with pytest.raises(StaleAttemptError):
        store.job_heartbeat(held, attempt, 1.0, 1, 1, at(4))
    assert store.stats()["lost_attempts_total"] == 2 and store.stats()["empty_pilots_total"] == 0
    assert store.pilot_end(PILOT, 2, "again", at(5), abandoned=True) == []  # nothing left to end


def test_the_slots_isolation_is_recorded_in_the_jobs_history(store):
    job_id = submit_one(store)
    assert store.match(SlotOffer(SITE, 8, 32_000, 100_000, 86_400, isolation="namespace"), PILOT, at(1))
    assert store.get(job_id).history[-1].detail.endswith("isolation: namespace")


def test_pilot_heartbeat_lists_what_to_stop(store):
    running, killed, requeued, theirs = (submit_one(store, priority=p) for p in (1, 2, 3, 4))
    for job_id in (theirs, requeued, killed, running):  # in priority order
        assignment = store.match(slot(), OTHER_PILOT if job_id == theirs else PILOT, at(1))
        assert assignment.job_id == job_id
        store.job_update(job_id, assignment.attempt, S.STARTED, 1, "", None, at(1))
    store.kill(killed, "alice", "", at(2))
    store.requeue(requeued, RequeueCause.ADMIN, "", at(2))
    reported = [(running, 1), (killed, 1), (requeued, 1), (theirs, 1), (424242, 1), (running, 7)]
    stop = store.pilot_heartbeat(PILOT, reported, at(3))
    assert sorted(stop) == sorted([(killed, 1), (requeued, 1), (theirs, 1), (424242, 1), (running, 7)])


def test_pilot_heartbeat_keeps_alive_only_its_own_current_attempts(store):
    """The agent vouches for its attempts (usage set): they stay alive as with their own heartbeat. An
    attempt of another pilot, a stale attempt, a killed one or an unknown id is refused silently: it is
    in the stop list and its row is unchanged (no heartbeat, no usage)."""
    mine, theirs, killed = (submit_one(store, priority=p) for p in (1, 2, 3))
    for job_id in (killed, theirs, mine):  # in priority order
        assignment = store.match(slot(), OTHER_PILOT if job_id == theirs else PILOT, at(0))
        assert assignment.job_id == job_id
        store.job_update(job_id, 1, S.STARTED, 1, "", None, at(10))
        drive(store, job_id, 1, [S.RUNNING], when=10)
    store.kill(killed, "alice", "", at(20))
    before = {job_id: store.get(job_id) for job_id in (theirs, killed)}
    usage = {(mine, 1): (12.5, 64 << 20), (theirs, 1): (1.0, 1), (killed, 1): (1.0, 1), (mine, 2): (1.0, 1),
             (424242, 1): (1.0, 1)}
    stop = store.pilot_heartbeat(PILOT, list(usage), at(200), usage)
    assert sorted(stop) == sorted([(theirs, 1), (killed, 1), (mine, 2), (424242, 1)])
    got = store.get(mine).usage
    assert (got.cpu_seconds, got.rss_bytes, got.time) == (12.5, 64 << 20, at(200))
    for job_id, was in before.items():
        now = store.get(job_id)
        assert (now.state, now.attempt, now.usage, now.updated) == (was.state, was.attempt, was.usage, was.updated)
    # 300 s after their last sign of life (10 s) the others are reaped; mine, vouched for at 200 s, is alive.
    reaped = store.reap(at(311))
    assert sorted(r.job_id for r in reaped) == sorted([theirs, killed])
    assert store.reap(at(499)) == []
    # A listed attempt without usage is not vouched for: mine is reaped 300 s after its last vouching.
    assert store.pilot_heartbeat(PILOT, [(mine, 1)], at(400)) == []
    assert [(r.job_id, r.attempt) for r in store.reap(at(501))] == [(mine, 1)]


def test_pilot_heartbeat_usage_is_clamped_like_the_jobs_own(store):
    job_id = submit_one(store)
    attempt = start(store, job_id, when=0)
    for cpu, rss in ((float("nan"), 2**64 - 1), (float("inf"), -5), (-3.0, 2**63)):
        assert store.pilot_heartbeat(PILOT, [(job_id, attempt)], at(100), {(job_id, attempt): (cpu, rss)}) == []
        usage = store.get(job_id).usage
        assert usage.cpu_seconds == 0 and 0 <= usage.rss_bytes <= 2**62


# ------------------------------------------------------------------ reaping

def test_lost_heartbeat_requeues_with_next_attempt(store):
    job_id = submit_one(store)
    attempt = start(store, job_id, when=0)
    drive(store, job_id, attempt, [S.RUNNING], when=10)
    assert store.reap(at(309)) == []  # 299 s after the last update: alive
    reaped = store.reap(at(311))
    assert [(r.job_id, r.attempt, r.cause, r.new_state) for r in reaped] == \
        [(job_id, 1, RequeueCause.LOST, S.WAITING)]
    record = store.get(job_id)
    assert record.state is S.WAITING and record.updated == at(311)
    assert (record.state, record.attempt) == (S.WAITING, 1)
    for refused in (lambda: store.job_update(job_id, 1, S.SAVING, 3, "", None, at(312)),
                    lambda: store.job_heartbeat(job_id, 1, 0.0, 0, 0, at(312)),
                    lambda: store.add_output(job_id, 1, OutputRecord("o", 1, "a" * 64), at(312))):
        with pytest.raises(StaleAttemptError) as stale:
            refused()
        assert (stale.value.attempt, stale.value.current) == (1, 2)
    assignment = store.match(slot(), OTHER_PILOT, at(320))
    assert (assignment.job_id, assignment.attempt) == (job_id, 2)
    with pytest.raises(StaleAttemptError):  # the old attempt stays fenced
        store.job_update(job_id, 1, S.SAVING, 3, "", None, at(321))
    assert store.stats()["lost_attempts_total"] == 1
    assert store.reap(at(330)) == []


def test_lost_every_attempt_ends_lost(store):
    job_id = submit_one(store, max_attempts=2)
    results = []
    for round_ in range(2):
        base = round_ * 1000
        start(store, job_id, when=base)
        results += [(r.attempt, r.new_state) for r in store.reap(at(base + 301))]
    assert results == [(1, S.WAITING), (2, S.LOST)]
    record = store.get(job_id)
    assert record.state is S.LOST and record.exit_code is None and "2 of 2" in record.message
    assert history_states(store, job_id)[-1] == (S.LOST, 2)
    assert store.match(slot(), PILOT, at(5000)) is None


def test_never_started_is_requeued(store):
    job_id = submit_one(store)
    store.match(slot(), PILOT, at(0))
    store.job_heartbeat(job_id, 1, 0.0, 0, 0, at(500))  # heartbeats do not count as a start
    assert store.reap(at(599)) == []
    reaped = store.reap(at(601))
    assert [(r.job_id, r.cause, r.new_state) for r in reaped] == [(job_id, RequeueCause.NEVER_STARTED, S.WAITING)]
    assert store.stats()["never_started_attempts_total"] == 1
    with pytest.raises(StaleAttemptError):
        store.job_update(job_id, 1, S.STARTED, 1, "", None, at(602))


def test_queue_timeout_expires(store):
    old = submit_one(store, when=0)
    young = submit_one(store, when=100_000, cores=2)
    reaped = store.reap(at(2 * 86_400 + 1))
    assert [(r.job_id, r.attempt, r.cause, r.new_state) for r in reaped] == [(old, 0, None, S.EXPIRED)]
    assert store.get(old).state is S.EXPIRED and store.get(young).state is S.WAITING
    assert history_states(store, old)[-1] == (S.EXPIRED, 0)
    with pytest.raises(UnknownJob):
        store.get(young + 1)


def test_no_queue_timeout_never_expires(url):
    opened = open_store(url, StoreSettings(queue_timeout=None))
    try:
        job_id = opened.submit("alice", [spec()], at())[0]
        assert opened.reap(at(10 ** 8)) == []
        assert opened.get(job_id).state is S.WAITING
    finally:
        opened.close()


def test_reap_many_in_batches(store):
    ids = store.submit("alice", [spec() for _ in range(1200)], at())
    for _ in ids:
        store.match(slot(), PILOT, at(1))
    reaped = store.reap(at(700))
    assert sorted(r.job_id for r in reaped) == ids
    assert store.counts()[S.WAITING] == 1200


# ------------------------------------------------------------------ requeue

def test_admin_requeue(store):
    job_id = submit_one(store, max_attempts=1)
    attempt = start(store, job_id)
    assert store.requeue(job_id, RequeueCause.ADMIN, "bad node", at(2)) == attempt + 1
    assert store.requeue(job_id, RequeueCause.ADMIN, "again", at(3)) == attempt + 1  # already waiting
    assert store.get(job_id).state is S.WAITING
    attempt = start(store, job_id, when=4)
    drive(store, job_id, attempt, [S.RUNNING, S.SAVING, S.DONE], when=5)
    with pytest.raises(InvalidTransition, match="DONE -> WAITING is not allowed"):
        store.requeue(job_id, RequeueCause.ADMIN, "", at(6))
    other = submit_one(store, max_attempts=1)
    attempt = start(store, other, when=7)
    with pytest.raises(InvalidTransition, match="used up"):
        store.requeue(other, RequeueCause.WRAPPER, "", at(8))
    assert store.get(other).state is S.FAILED_WRAPPER


# ------------------------------------------------------------------ history

def test_history_is_complete(store):
    job_id = submit_one(store)
    first = start(store, job_id, when=1)
    drive(store, job_id, first, [S.RUNNING], when=2)
    store.reap(at(400))
    second = start(store, job_id, when=401)
    store.attempt_failed(job_id, second, PILOT, RequeueCause.STOPPED, "slot end", at(402))
    third = start(store, job_id, when=403)
    drive(store, job_id, third, [S.RUNNING, S.SAVING, S.DONE], when=404)
    record = store.get(job_id)
    assert [(e.state, e.attempt) for e in record.history] == [
        (S.WAITING, 0), (S.ASSIGNED, 1), (S.STARTED, 1), (S.RUNNING, 1), (S.WAITING, 1),
        (S.ASSIGNED, 2), (S.STARTED, 2), (S.WAITING, 2),
        (S.ASSIGNED, 3), (S.STARTED, 3), (S.RUNNING, 3), (S.SAVING, 3), (S.DONE, 3)]
    times = [e.time for e in record.history]
    assert times == sorted(times) and record.history[-1].time == record.updated
    assert "lost" in record.history[4].detail and "stopped" in record.history[7].detail


# ------------------------------------------------------- trust boundaries

def agent_pilot(pilot_id: str, serial: str, *, site: str = SITE, subject: str = "glidein-a",
                not_after: float = 3600, node: str = "node-x") -> PilotRef:
    """A pilot as the broker sees an agent certificate's call."""
    return PilotRef(pilot_id, site, node, subject, serial, at(not_after))


def snapshot(store, *job_ids: int) -> tuple:
    """Everything a refused call must leave as it was."""
    return (tuple(store.get(j) for j in job_ids), tuple(store.list_pilots(at(-10))), store.stats(),
            store.counts())


def test_a_pilot_id_is_bound_to_the_certificate_of_its_first_call(store):
    """Another certificate naming a bound pilot id (another site; the same holder and site with another
    serial; the same serial under another holder name) is refused by every pilot call, before anything
    is written: no job claimed, re-queued or killed, no pilot record touched."""
    held, spare = submit_one(store, priority=2), submit_one(store, priority=1)
    mine = agent_pilot("pilot-a", "a1", node="node-a")
    assert store.match(slot(), mine, at(1)).job_id == held
    before = snapshot(store, held, spare)
    for thief in (agent_pilot("pilot-a", "b2", site="SITE-B", subject="glidein-b", not_after=7200),
                  agent_pilot("pilot-a", "a2", not_after=7200),
                  agent_pilot("pilot-a", "a1", subject="glidein-c")):
        with pytest.raises(PilotNotYours, match="pilot id 'pilot-a' belongs to another agent certificate"):
            store.match(slot(), thief, at(2))
        with pytest.raises(PilotNotYours):
            store.pilot_heartbeat(thief, [(held, 1)], at(2))
        with pytest.raises(PilotNotYours):
            store.pilot_end(thief, 0, "gone", at(2), abandoned=True)
        with pytest.raises(PilotNotYours):
            store.attempt_failed(held, 1, thief, None, "over the memory limit", at(2))
        with pytest.raises(PilotNotYours):
            store.attempt_failed(held, 1, thief, RequeueCause.WRAPPER, "died", at(2))
    assert snapshot(store, held, spare) == before
    assert store.pilot_expiry("pilot-a") == at(3600) and store.pilot_expiry("nobody") is None
    assert [p.certificate_serial for p in store.list_pilots(at(0))] == ["a1"]
    # The rightful certificate goes on; a node it does not send keeps the recorded one.
    assert store.pilot_heartbeat(mine, [(held, 1)], at(3)) == []
    assert store.attempt_failed(held, 1, agent_pilot("pilot-a", "a1", node=""), RequeueCause.STOPPED, "",
                                at(4)) is S.WAITING
    assert store.list_pilots(at(0))[0].node == "node-a"


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_version_1_database_is_migrated_in_place(backend, tmp_path, request):
    """A store file (or database) of the first release opens with this broker: the new tables and columns
    are added, the inputs of existing jobs become their owners' content, and an unbound pilot is bound by
    the next call from an agent certificate of the same holder and site (and no other)."""
    inputs, outputs = "1" * 64, "2" * 64
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path}/v1.db"
        make_sqlite_v1(str(tmp_path / "v1.db"), inputs, outputs)
        drop = None
    else:
        server = request.getfixturevalue("pg_server")
        with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS splitpilot_v1")
            conn.execute("CREATE DATABASE splitpilot_v1")
        url = server.url("splitpilot_v1")
        make_postgres_v1(url, inputs, outputs)

        def drop() -> None:
            with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
                conn.execute("DROP DATABASE IF EXISTS splitpilot_v1 WITH (FORCE)")
    try:
        for _ in range(2):  # the second opening finds the current version and changes nothing
            opened = open_store(url, SETTINGS)
            try:
                assert opened.claim_inputs("alice", [inputs, outputs], at(0)) == {inputs, outputs}
                assert opened.claim_inputs("bob", [inputs, outputs], at(0)) == set()
                assert opened.content_referenced(inputs) and opened.content_referenced(outputs)
            finally:
                opened.close()
        store = open_store(url, SETTINGS)
        try:
            stranger = agent_pilot("pilot-old", "5eed", subject="glidein-z")
            with pytest.raises(PilotNotYours):
                store.pilot_heartbeat(stranger, [], at(1))
            rightful = agent_pilot("pilot-old", "c0ffee")
            assert store.pilot_heartbeat(rightful, [], at(1)) == []
            assert [(p.pilot_id, p.certificate_serial, p.jobs_matched) for p in store.list_pilots(at(0))] == \
                [("pilot-old", "c0ffee", 1)]
            with pytest.raises(PilotNotYours):  # bound now: the same holder's other certificate is refused
                store.pilot_heartbeat(agent_pilot("pilot-old", "c0ffee2"), [], at(2))
            assert store.match(slot(), rightful, at(3)).job_id == 1
            assert store.submit("alice", [spec()], at(4)) == [3]
        finally:
            store.close()
        if backend == "sqlite":
            with sqlite3.connect(str(tmp_path / "v1.db")) as conn:
                version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        else:
            with psycopg.connect(url) as conn:
                version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        assert version == SCHEMA_VERSION == 6
    finally:
        if drop is not None:
            drop()


@pytest.fixture
def old_database(request, tmp_path):
    """make_old_database(builder_sqlite, builder_postgres) -> URL of a database of an older schema, on the
    backend of the test's parameter (PostgreSQL: a database of its own, dropped afterwards)."""
    made = []

    def make(backend: str, sqlite_builder, postgres_builder) -> str:
        if backend == "sqlite":
            sqlite_builder(str(tmp_path / "old.db"), "1" * 64, "2" * 64)
            return f"sqlite:///{tmp_path}/old.db"
        server = request.getfixturevalue("pg_server")
        with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS splitpilot_old")
            conn.execute("CREATE DATABASE splitpilot_old")
        made.append(server)
        postgres_builder(server.url("splitpilot_old"), "1" * 64, "2" * 64)
        return server.url("splitpilot_old")
    yield make
    for server in made:
        with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS splitpilot_old WITH (FORCE)")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_version_4_database_gains_batches_and_keeps_its_jobs_without_one(backend, old_database):
    """A database of schema version 4 (before batches) opens with this broker: its jobs are kept, with no
    batch (shown as "-"), listed and counted as before; they belong to no batch a listing names; new
    submissions get batches; a second opening changes nothing."""
    url = old_database(backend, make_sqlite_v4, make_postgres_v4)
    for _ in range(2):
        store = open_store(url, SETTINGS)
        try:
            assert [(j.job_id, j.state, j.batch) for j in store.list("alice")] == \
                [(2, S.DONE, None), (1, S.WAITING, None)]
            assert store.get(1).batch is None and store.list_batches("alice") == []
        finally:
            store.close()
    store = open_store(url, SETTINGS)
    try:
        batch, ids = store.submit_batch("alice", [spec(), spec()], at(1))
        assert ids == [3, 4] and [b.batch_id for b in store.list_batches("alice")] == [batch]
        assert [j.job_id for j in store.list("alice", batch=batch)] == [4, 3]
        assert store.counts("alice", batch) == {**{s: 0 for s in S}, S.WAITING: 2}
        assert store.counts("alice")[S.DONE] == 1
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_version_5_database_keeps_everything_and_lists_the_inputs_of_its_jobs(backend, old_database):
    """Schema 5 -> 6: jobs, outputs and owner rows are kept; the inputs of the jobs already stored are
    listed in job_inputs, so garbage collection keeps the waiting job's input (and the output, which an
    output row names) however old; a second opening changes nothing."""
    url = old_database(backend, make_sqlite_v5, make_postgres_v5)
    inputs, outputs = "1" * 64, "2" * 64
    for _ in range(2):
        store = open_store(url, SETTINGS)
        try:
            assert [(j.job_id, j.state) for j in store.list("alice")] == [(2, S.DONE), (1, S.WAITING)]
            assert store.get(2).outputs[0].sha256 == outputs
            assert store.claim_inputs("alice", [inputs, outputs], at(0)) == {inputs, outputs}
            assert store._read(lambda cur: cur.rows("SELECT job_id, sha256 FROM job_inputs")) == [(1, inputs)]
            # Everything is older than a cutoff far in the future: still, nothing is garbage.
            assert store.unreferenced_contents([inputs, outputs], at(10**6)) == []
        finally:
            store.close()
    store = open_store(url, SETTINGS)
    try:
        store.kill(1, "alice", "done with it", at(1))     # final now: its input is no longer needed
        assert store.unreferenced_contents([inputs, outputs], at(10**6)) == [inputs]
        assert store.unreferenced_contents([inputs, outputs], from_ms(0)) == []   # owner rows within the grace
    finally:
        store.close()


def test_history_retention_prunes_only_the_events_of_long_final_jobs(store):
    """prune_history deletes the events of jobs final since before the cutoff; their rows keep the final
    state and message; a waiting job's history and a recently finished job's are untouched."""
    old, recent, waiting = store.submit("alice", [spec(), spec(), spec()], at(0))
    store.kill(old, "alice", "old", at(1))
    store.kill(recent, "alice", "recent", at(100))
    assert store.prune_history(at(50)) == 2          # old: WAITING (submitted) and KILLED
    assert store.get(old).state is S.KILLED and store.get(old).history == ()
    assert len(store.get(recent).history) == 2 and len(store.get(waiting).history) == 1
    assert store.prune_history(at(50)) == 0          # nothing left to prune: idempotent


def test_a_batch_gets_appended_only_by_its_owner(store):
    """A submission is a batch with a random id; its owner may add to it (the client's requests of one big
    submission). Another user naming it, or anyone naming an unknown or malformed id, is refused with the
    same words (no oracle: the id is a handle, ownership the authority), and nothing is written: no job,
    no batch, no class."""
    batch, ids = store.submit_batch("alice", [spec(), spec()], at(0))
    assert re.fullmatch(r"b-[0-9a-f]{10}", batch)
    assert store.submit_batch("alice", [spec()], at(1), batch) == (batch, [ids[-1] + 1])
    assert store.batch_owner(batch) == "alice" and store.batch_owner("b-0000000000") is None
    before = (store.list(None), store.list_batches("alice"), store.list_batches("mallory"), store.counts())
    words = set()
    for thief, named in (("mallory", batch), ("mallory", "b-0000000000"), ("alice", "b-0000000000"),
                         ("mallory", "x" * 300), ("mallory", "b-5F3A9C0E1D"), ("mallory", "b-00000\x00000")):
        with pytest.raises(UnknownBatch) as refused:
            store.submit_batch(thief, [spec(cores=7)], at(2), named)   # cores=7: a class not seen before
        assert str(refused.value) == str(UnknownBatch(named))
        assert "fix: check the id with `splitpilot job batches`" in str(refused.value)
        if BATCH_ID_RE.fullmatch(named):
            words.add(str(refused.value).replace(named, "ID"))
    assert len(words) == 1, words   # one message for another's batch and for none at all
    assert (store.list(None), store.list_batches("alice"), store.list_batches("mallory"), store.counts()) == before
    assert all(b.owner == "alice" for b in store.list_batches("alice"))
    with pytest.raises(UnknownBatch):   # paging from another's batch: the same refusal
        store.list_batches("mallory", before=batch)


def test_batches_are_listed_newest_first_with_their_counts_and_paged(store):
    first, (a, _b) = store.submit_batch("alice", [spec(), spec()], at(0))
    second, _ = store.submit_batch("alice", [spec()], at(1))
    store.submit_batch("bob", [spec()], at(2))
    store.kill(a, "alice", "", at(3))
    listed = store.list_batches("alice")
    assert [(b.batch_id, b.jobs, b.counts, b.created) for b in listed] == \
        [(second, 1, {S.WAITING: 1}, at(1)), (first, 2, {S.WAITING: 1, S.KILLED: 1}, at(0))]
    assert [b.batch_id for b in store.list_batches("alice", limit=1)] == [second]
    assert [b.batch_id for b in store.list_batches("alice", before=second)] == [first]
    assert store.list_batches("alice", before=first) == []
    assert [j.batch for j in store.list("alice", batch=first)] == [first, first]
    assert store.list("bob", batch=first) == []   # the store filters; whose it is, the service checks
    labelled, _ = store.submit_batch("alice", [spec()], at(4), label="calib run 7")
    assert [(b.batch_id, b.label) for b in store.list_batches("alice", limit=2)] == \
        [(labelled, "calib run 7"), (second, "")]
    before = store.list(None), store.list_batches("alice")
    for label in ("\x00", "x" * 65, "-starts-badly", "tab\there"):
        with pytest.raises(BadValue, match="is not 1 to 64 letters"):
            store.submit_batch("alice", [spec()], at(5), label=label)
    assert (store.list(None), store.list_batches("alice")) == before


def test_a_newer_schema_is_refused_with_the_fix(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/new.db", SETTINGS)
    store.close()
    with sqlite3.connect(str(tmp_path / "new.db")) as conn:
        conn.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    with pytest.raises(Exception, match="schema version 99 is newer than this broker's.*fix:"):
        open_store(f"sqlite:///{tmp_path}/new.db", SETTINGS)


def test_output_reservations_hold_the_limit_for_concurrent_uploads(store):
    """Eight uploads of 30 bytes reserve at once against a 100-byte limit: three win, whatever the
    interleaving (threads on one store; on PostgreSQL, concurrent transactions)."""
    job_id = submit_one(store)
    attempt = start(store, job_id)
    barrier = threading.Barrier(8)
    won, refused = [], []

    def upload(n: int) -> None:
        barrier.wait(30)
        try:
            won.append(store.reserve_output(job_id, attempt, f"part-{n}", 30, 100, 1000, at(2)))
        except LimitExceeded as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=upload, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(won) == 3 and len(refused) == 5, (won, refused)
    assert all("over the broker's per-job output limit of 100 bytes" in r for r in refused)
    assert sum(size for _, _, size in store.pending_outputs(job_id)) == 90
    for reservation in won[:2]:
        store.release_reservation(reservation)
    # A replacement does not count the name it replaces; a recorded output does count.
    store.add_output(job_id, attempt, OutputRecord("big", 60, "a" * 64), at(3), reservation=won[2])
    assert store.pending_outputs(job_id) == []
    replace = store.reserve_output(job_id, attempt, "big", 90, 100, 1000, at(4))
    with pytest.raises(LimitExceeded):
        store.reserve_output(job_id, attempt, "small", 20, 100, 1000, at(4))
    assert store.add_output(job_id, attempt, OutputRecord("big", 90, "b" * 64), at(5), reservation=replace) == "a" * 64
    assert store.add_output(job_id, attempt, OutputRecord("big", 90, "b" * 64), at(5)) is None  # same content
    with pytest.raises(LimitExceeded, match="over the broker's limit of 1 per job"):
        store.reserve_output(job_id, attempt, "second", 1, 1000, 1, at(6))
    # Fencing: a later attempt's reservations do not see the old attempt's, and the old one may not reserve.
    store.requeue(job_id, RequeueCause.ADMIN, "test", at(7))
    with pytest.raises(StaleAttemptError):
        store.reserve_output(job_id, attempt, "late", 1, 100, 1000, at(8))
    assert store.pending_outputs(job_id) == []


def test_reaper_drops_reservations_of_a_broker_that_died(store):
    job_id = submit_one(store)
    attempt = start(store, job_id)
    store.reserve_output(job_id, attempt, "orphan", 10, 100, 10, at(2))
    store.reap(at(3))
    assert len(store.pending_outputs(job_id)) == 1
    store.reap(at(3) + SETTINGS.reservation_timeout + datetime.timedelta(seconds=1))
    assert store.pending_outputs(job_id) == []


def test_content_is_usable_by_its_owner_only(store):
    """Uploaded content is its uploader's; a job's output is its owner's, and becomes owned (kept alive)
    once a job of that owner takes it as an input."""
    uploaded, produced = "c" * 64, "d" * 64
    assert store.add_file_owner("alice", uploaded, 10, at(0)) is True
    assert store.add_file_owner("alice", uploaded, 10, at(1)) is False
    job_id = submit_one(store)
    attempt = start(store, job_id)
    store.add_output(job_id, attempt, OutputRecord("out", 5, produced), at(2))
    assert store.claim_inputs("bob", [uploaded, produced], at(3)) == set()
    assert store.claim_inputs("alice", [uploaded, produced, "e" * 64], at(3)) == {uploaded, produced}
    store.add_output(job_id, attempt, OutputRecord("out", 6, "f" * 64), at(4))  # the output is replaced...
    assert store.content_referenced(produced)  # ...but alice's claim keeps its old content referenced
    assert not store.content_referenced("f" * 63 + "0")


def test_revocations_are_recorded_once_per_serial(store):
    assert store.revocation_generation() == (0, 0) and store.revocations() == []
    first, already = store.revoke("ab12", "glidein-a", "agent", "stolen", "root", at(100), at(1))
    assert not already and (first.serial, first.subject, first.role, first.not_after) == ("ab12", "glidein-a",
                                                                                          "agent", at(100))
    again, already = store.revoke("ab12", "glidein-a", "agent", "again", "root", None, at(2))
    assert already and again == first
    holder, _ = store.revoke("", "alice", "user", "left", "root", None, at(3))
    later, already = store.revoke("", "alice", "user", "left again", "root", None, at(4))
    assert not already and later.id > holder.id  # a later holder revocation covers tokens issued since
    assert [r.reason for r in store.revocations()] == ["stolen", "left", "left again"]
    assert store.revocation_generation() == (later.id, 3)
    store.note_tokens([SeenToken("ab12", "agent", "glidein-a", at(100))], at(1))
    store.note_tokens([SeenToken("ab12", "user", "forged", at(200))], at(2))  # the first sighting is kept
    assert store.seen_token("ab12") == SeenToken("ab12", "agent", "glidein-a", at(100))
    assert store.seen_token("ffff") is None
    store.reap(at(101))  # expired certificates are forgotten
    assert store.seen_token("ab12") is None


# -------------------------------------------------------------- query plans

def _load_mix(store, count: int) -> None:
    specs = [spec(priority=i % 7, cores=1 + i % 4, memory_mb=1000 * (1 + i % 5),
                  sites_allowed=[SITE] if i % 3 == 0 else []) for i in range(count)]
    for begin in range(0, count, 5000):
        store.submit("alice", specs[begin:begin + 5000], at())


def test_plans_use_indexes(store, url):
    _load_mix(store, 6000)
    for _ in range(50):
        assignment = store.match(slot(), PILOT, at(1))
        store.job_update(assignment.job_id, assignment.attempt, S.STARTED, 1, "", None, at(2))
    if url.startswith("postgresql"):
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ANALYZE")
    plans = store.plans()
    assert {"claim", "lost heartbeats", "never started", "queue timeout", "owner's jobs", "history", "batch's jobs",
            "owner's batches"} <= set(plans)
    text = "\n".join(f"{name}: {plan}" for name, plan in plans.items())
    if url.startswith("sqlite"):
        assert "SCAN jobs" not in text and "SCAN events" not in text, text
        assert "SEARCH jobs USING INDEX jobs_waiting" in plans["class head"], text
        assert "TEMP B-TREE" not in plans["class head"], text  # the index gives the order
        assert plans["class heads"].count("SEARCH jobs USING INDEX jobs_waiting") == 3, text
        assert "jobs_alive" in plans["lost heartbeats"], text
        assert "jobs_batch" in plans["batch's jobs"] and "batches_owner" in plans["owner's batches"], text
    else:
        assert "Seq Scan on jobs" not in text and "Seq Scan on events" not in text, text
        assert "jobs_batch" in plans["batch's jobs"], text
        for name in ("match", "class heads", "claim"):
            assert "Index" in plans[name] and "jobs_waiting" in plans[name], text
        assert "Sort" not in plans["claim"], text
        assert "jobs_alive" in plans["lost heartbeats"], text


# -------------------------------------------------------------- concurrency

def _match_until_empty(url: str, worker: int, threads: int, start, results) -> None:
    """Runs in a child process: match with THREADS threads until nothing is left; put the claims in RESULTS."""
    try:
        store = open_store(url, StoreSettings(extra={"pool_size": threads}))
        claimed: list[tuple[int, int]] = []
        errors: list[BaseException] = []

        def loop(thread: int) -> None:
            pilot = PilotRef(f"pilot-{worker}-{thread}", SITE, f"node-{worker}")
            try:
                while True:
                    assignment = store.match(slot(), pilot, datetime.datetime.now(UTC))
                    if assignment is None:
                        return
                    claimed.append((assignment.job_id, assignment.attempt))
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                errors.append(exc)
        workers = [threading.Thread(target=loop, args=(t,)) for t in range(threads)]
        start.wait(120)  # every process ready: they all race from here
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        store.close()
        results.put((worker, repr(errors[0]) if errors else None, claimed))
    except BaseException as exc:  # noqa: BLE001
        results.put((worker, repr(exc), []))


def _run_matchers(url: str, processes: int, threads: int, jobs: int) -> None:
    setup = open_store(url, SETTINGS)
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(processes), context.Queue()
    children = [context.Process(target=_match_until_empty, args=(url, w, threads, start, results), daemon=True)
                for w in range(processes)]
    try:
        ids = []
        for begin in range(0, jobs, 1000):
            ids += setup.submit("alice", [spec(priority=i % 5, cores=1 + i % 3)
                                          for i in range(begin, min(jobs, begin + 1000))], at())
        for child in children:
            child.start()
        reports = [results.get(timeout=300) for _ in children]
        assert [error for _, error, _ in reports if error] == []
        claims = [claim for _, _, claimed in reports for claim in claimed]
        assert sorted(job for job, _ in claims) == sorted(ids)  # every job, and each once
        assert {attempt for _, attempt in claims} == {1}
        assert sum(1 for _, _, claimed in reports if claimed) >= 2, "the matchers did not overlap"
        assert setup.counts()[S.ASSIGNED] == jobs and setup.counts()[S.WAITING] == 0
        assert setup.stats()["matches_total"] == jobs
        for job_id in ids[:: max(1, jobs // 50)]:
            assert Counter(e.state for e in setup.get(job_id).history)[S.ASSIGNED] == 1
    finally:
        for child in children:
            child.join(10)
            if child.is_alive():
                child.kill()
                child.join()
        setup.close()


@pytest.mark.slow
def test_processes_match_each_job_once(url):
    _run_matchers(url, processes=8, threads=1, jobs=1500)


@pytest.mark.slow
def test_two_brokers_with_threads_match_each_job_once(pg_url):  # noqa: F811
    _run_matchers(pg_url, processes=2, threads=4, jobs=2000)


@pytest.mark.slow
def test_threads_of_one_store_match_each_job_once(store):
    ids = store.submit("alice", [spec(priority=i % 4, cores=1 + i % 2) for i in range(800)], at())
    claimed, errors = [], []

    def loop(thread: int) -> None:
        try:
            pilot = PilotRef(f"pilot-{thread}", SITE, "node")
            while (assignment := store.match(slot(), pilot, at(1))) is not None:
                claimed.append(assignment.job_id)
                store.job_update(assignment.job_id, assignment.attempt, S.STARTED, 1, "", None, at(2))
                store.job_heartbeat(assignment.job_id, assignment.attempt, 0.0, 0, 0, at(3))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
    threads = [threading.Thread(target=loop, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert sorted(claimed) == ids
    assert store.counts()[S.STARTED] == 800


# -------------------------------------------------------------- crash safety

def _busy_worker(path: str, ready) -> None:
    """Runs in a child process until SIGKILLed: match, update, fail, submit."""
    store = open_store(path, SETTINGS)
    pilot = PilotRef(f"pilot-{os.getpid()}", SITE, "node")
    step = 0
    while True:
        step += 1
        if step == 20:
            ready.set()
        now = datetime.datetime.now(UTC)
        assignment = store.match(slot(), pilot, now)
        if assignment is None:
            store.submit("alice", [spec(priority=i % 3, cores=1 + i % 2) for i in range(20)], now)
            continue
        job, attempt = assignment.job_id, assignment.attempt
        store.job_update(job, attempt, S.STARTED, 1, "", None, now)
        if step % 4 == 0:
            store.attempt_failed(job, attempt, pilot, RequeueCause.WRAPPER, "crash test", now)
        elif step % 4 == 1:
            store.job_update(job, attempt, S.RUNNING, 2, "", None, now)
            store.add_output(job, attempt, OutputRecord("o", 1, "a" * 64), now)
        else:
            for sequence, state in enumerate((S.RUNNING, S.SAVING, S.DONE), start=2):
                store.job_update(job, attempt, state, sequence, "", 0, now)


def test_pilot_listing_filters_by_site_and_state_and_shows_held_jobs(store):
    held = submit_one(store)
    assert start(store, held, when=1) == 1                    # pilot-1 (SITE-A) holds it, alive at 10 s
    store.pilot_heartbeat(PilotRef("pilot-b", "SITE-B", "node-b"), [], at(2))
    store.pilot_end(PilotRef("pilot-e", "SITE-B", "node-e"), 0, "idle", at(3))
    every = {p.pilot_id: p for p in store.list_pilots(at(0), now=at(10))}
    assert set(every) == {"pilot-1", "pilot-b", "pilot-e"}
    assert every["pilot-1"].alive and every["pilot-1"].current_job_ids == (held,)
    assert every["pilot-e"].ended == at(3) and not every["pilot-e"].alive and every["pilot-e"].jobs_run == 0
    assert [p.pilot_id for p in store.list_pilots(at(0), now=at(10), site="SITE-B")] == ["pilot-e", "pilot-b"]
    assert {p.pilot_id for p in store.list_pilots(at(0), now=at(10), state="alive")} == {"pilot-1", "pilot-b"}
    assert [p.pilot_id for p in store.list_pilots(at(0), now=at(10), state="ended")] == ["pilot-e"]
    # Silent for longer than the heartbeat timeout: no longer alive, though it never said goodbye.
    store.pilot_heartbeat(PILOT, [(held, 1)], at(200))
    later = at(2 + SETTINGS.heartbeat_timeout.total_seconds() + 1)
    assert [p.pilot_id for p in store.list_pilots(at(0), now=later, state="alive")] == ["pilot-1"]
    assert len(store.list_pilots(at(0), now=at(10), limit=1)) == 1
    with pytest.raises(BadValue, match="'asleep' is not one of alive, ended"):
        store.list_pilots(at(0), state="asleep")


def test_site_listing_counts_states_pilots_jobs_and_failures(store):
    store.set_site_state("SITE-D", "draining", "downtime", at(0))   # known from its state row only
    running = submit_one(store)
    start(store, running, when=1)                                  # SITE-A: 1 running, pilot-1 alive
    failed = submit_one(store, when=2)
    attempt = store.match(slot(), OTHER_PILOT, at(3)).attempt
    store.job_update(failed, attempt, S.STARTED, 1, "", None, at(3))
    store.job_update(failed, attempt, S.FAILED_EXECUTION, 2, "exit 1", 1, at(4))
    store.submit("bob", [spec(sites_allowed=["SITE-B"]), spec(sites_denied=["SITE-A"]), spec()], at(5))
    store.pilot_end(PilotRef("pilot-e", "SITE-B", "node-e"), 0, "idle", at(6))
    sites = {s.site: s for s in store.list_sites(at(10), at(0))}
    assert set(sites) == {"SITE-A", "SITE-B", "SITE-D"}
    a, b, d = sites["SITE-A"], sites["SITE-B"], sites["SITE-D"]
    assert (a.state, a.pilots_alive, a.jobs_running, a.jobs_waiting) == ("enabled", 2, 1, 1)
    assert a.failures == {S.FAILED_EXECUTION: 1} and a.empty_pilots == 0
    assert (b.pilots_alive, b.jobs_running, b.jobs_waiting, b.empty_pilots, b.failures) == (0, 0, 3, 1, {})
    assert (d.state, d.reason, d.state_updated, d.jobs_waiting) == ("draining", "downtime", at(0), 2)
    # Outside the window, the failure and the empty pilot are no longer counted.
    a_later = {s.site: s for s in store.list_sites(at(10), at(5))}
    assert a_later["SITE-A"].failures == {} and a_later["SITE-B"].empty_pilots == 1
    assert {s.site: s for s in store.list_sites(at(10), at(7))}["SITE-B"].empty_pilots == 0
    # 31 days on: SITE-B (known from its pilots only) is forgotten; A runs a job, D has a state.
    month = 31 * 86400
    assert [s.site for s in store.list_sites(at(month), at(month - 3600))] == ["SITE-A", "SITE-D"]


def test_job_listing_filters_by_owner_site_and_update_time(store):
    mine = submit_one(store, when=0)
    bobs = store.submit("bob", [spec()], at(5))[0]
    start(store, mine, when=6)
    assert [j.job_id for j in store.list("bob")] == [bobs]
    assert [j.job_id for j in store.list(None, site=SITE)] == [mine]
    assert [j.job_id for j in store.list(None, updated_since=at(6))] == [mine]
    assert [j.job_id for j in store.list(None, updated_since=at(5))] == [bobs, mine]
    assert store.list("bob", site=SITE) == []


def test_admin_requeue_of_a_killed_or_done_job_is_refused_naming_what_may_be(store):
    killed = submit_one(store)
    store.kill(killed, None, "gone", at(1))
    done = submit_one(store, when=2)
    drive(store, done, start(store, done, when=3), [S.RUNNING, S.SAVING, S.DONE], when=4)
    for job_id in (killed, done):
        before = store.get(job_id)
        with pytest.raises(InvalidTransition, match=r"only a job waiting, under way \(ASSIGNED to SAVING\) or "
                                                    r"ended in FAILED_INPUT, .*LOST, FAILED_LIMIT is re-queued, by "
                                                    r"an admin; fix: submit it again"):
            store.requeue(job_id, RequeueCause.ADMIN, "again", at(5))
        assert store.get(job_id) == before                      # not a row or an event more


def test_admin_requeue_gives_a_failed_job_a_fresh_set_of_attempts(store):
    job_id = submit_one(store, max_attempts=1)
    attempt = start(store, job_id)
    drive(store, job_id, attempt, [S.RUNNING, S.FAILED_EXECUTION], when=2)
    # Only an admin's requeue reopens it: a pilot's report of the old attempt is refused.
    with pytest.raises(InvalidTransition, match="FAILED_EXECUTION -> WAITING"):
        store.requeue(job_id, RequeueCause.WRAPPER, "", at(3))
    assert store.requeue(job_id, RequeueCause.ADMIN, "node had no /cvmfs", at(4)) == attempt + 1
    job = store.get(job_id)
    assert (job.state, job.exit_code, job.message) == (S.WAITING, None, "")
    assert job.history[-1].detail == "re-queued from FAILED_EXECUTION (node had no /cvmfs); 1 attempt(s) from now on"
    with pytest.raises(StaleAttemptError):                      # the old attempt's wrapper is fenced off
        store.job_heartbeat(job_id, attempt, 1.0, 1, 1, at(5))
    again = start(store, job_id, when=6)
    assert again == attempt + 1
    # The fresh attempt is charged as usual: one lost attempt fails it again (max_attempts 1).
    store.pilot_end(PILOT, 1, "gone", at(7), abandoned=True)
    assert store.get(job_id).state is S.LOST


def test_sigkill_leaves_a_consistent_sqlite_file(tmp_path):
    path = str(tmp_path / "crash.db")
    setup = open_store(path, SETTINGS)
    setup.submit("alice", [spec(priority=i % 3, cores=1 + i % 2) for i in range(300)], at())
    setup.close()
    context = multiprocessing.get_context("spawn")
    for delay in (0.0, 0.05, 0.13, 0.31, 0.5):
        ready = context.Event()
        child = context.Process(target=_busy_worker, args=(path, ready), daemon=True)
        child.start()
        try:
            assert ready.wait(60), "the worker did not get going"
            time.sleep(delay)
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.join(30)
        assert child.exitcode == -signal.SIGKILL

    reopened = open_store(path, SETTINGS)
    try:
        assert reopened.integrity_check() == "ok"
        total = sum(reopened.counts().values())
        assert reopened.stats()["matches_total"] > 0
    finally:
        reopened.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        jobs = db.execute("SELECT id, state, attempt, fenced, pilot_id FROM jobs").fetchall()
        assert len(jobs) == total == db.execute("SELECT value FROM meta WHERE key = 'last_job_id'").fetchone()[0]
        events = db.execute("SELECT job_id, state, attempt FROM events ORDER BY id").fetchall()
        by_job: dict[int, list[tuple[int, int]]] = {}
        for job_id, state, attempt in events:
            by_job.setdefault(job_id, []).append((state, attempt))
        assigned = Counter((job_id, attempt) for job_id, state, attempt in events if state == S.ASSIGNED)
        assert max(assigned.values()) == 1  # no attempt assigned twice
        assert sum(assigned.values()) == db.execute(
            "SELECT sum(value) FROM counters WHERE name = 'matches_total'").fetchone()[0]
        for job_id, state, attempt, fenced, pilot_id in jobs:
            history = by_job[job_id]
            assert history[0] == (S.WAITING, 0)
            assert history[-1][0] == state, (job_id, history, state)  # state and its event together
            assert attempt == max(a for _, a in history) == sum(1 for s, _ in history if s == S.ASSIGNED)
            if JobState(state).active:
                assert not fenced and pilot_id and history[-1][1] == attempt
            if state == S.WAITING:
                assert fenced
    finally:
        db.close()


# ------------------------------------------------------------------- ids, values and offers (issue 11)

@pytest.mark.parametrize("job_id", [0, 2**63, 2**64 - 1])
def test_ids_beyond_the_database_name_no_job(store, job_id):
    """Ids the database cannot hold are unknown jobs (NOT_FOUND), never a driver's overflow (INTERNAL)."""
    submit_one(store)
    for call in (lambda: store.get(job_id), lambda: store.kill(job_id, None, "", at(1)),
                 lambda: store.requeue(job_id, RequeueCause.ADMIN, "", at(1)),
                 lambda: store.attempt_failed(job_id, 1, PILOT, RequeueCause.WRAPPER, "", at(1)),
                 lambda: store.job_heartbeat(job_id, 1, 0, 0, 0, at(1)),
                 lambda: store.jobs_ahead(job_id)):
        with pytest.raises(UnknownJob):
            call()
    assert store.pilot_heartbeat(PILOT, [(job_id, 1)], at(1)) == [(job_id, 1)]  # not this pilot's: stop it
    assert [r.job_id for r in store.list(None, before_job_id=job_id)] == [1]  # every id is below (0: from the top)


def test_values_the_database_cannot_hold_are_bad_values(store):
    """A number beyond 64 bits, or a NUL in a text column (PostgreSQL refuses it): BadValue, which the broker
    answers INVALID_ARGUMENT (never INTERNAL), and nothing written."""
    job_id = submit_one(store)
    with pytest.raises(BadValue):
        store.job_update(job_id, 1, S.STARTED, 2**64, "", None, at(1))
    if type(store).__name__ == "PostgresStore":
        with pytest.raises(BadValue, match="NUL"):
            store.set_site_state("SITE-A", "draining", "nul\x00inside", at(1))
    assert store.site_states() == {} and store.get(job_id).state is S.WAITING


def test_offers_merge_per_site_and_bucket_and_old_buckets_go(url):
    """Two brokers on one database (two stores on one file or PostgreSQL database) each add their offers:
    the records are the field-wise maximum and the union of platforms, per site and bucket; buckets older
    than the broker keeps are dropped, all-time ones (bucket 0) never."""
    a, b = open_store(url, SETTINGS), open_store(url, SETTINGS)
    try:
        def offer(site, bucket, cores, platforms, last, memory=1000):
            return OfferRecord(site, bucket, cores, memory, 10, 3600, False, frozenset(platforms), last)
        a.merge_offers([offer("SITE-A", 0, 8, {"el9"}, 100), offer("SITE-A", 600_000, 8, {"el9"}, 100)], 0)
        b.merge_offers([offer("SITE-A", 0, 4, {"el8"}, 200, memory=64_000),
                        offer("SITE-A", 600_000, 16, {"el8"}, 50), offer("SITE-B", 0, 1, set(), 300)], 0)
        records = {(r.site, r.bucket): r for r in a.offers(0)}
        both = records[("SITE-A", 0)]
        assert (both.cores, both.memory_mb, both.platforms, both.last_offer) == (8, 64_000, {"el8", "el9"}, 200)
        assert records[("SITE-A", 600_000)].cores == 16 and ("SITE-B", 0) in records
        assert [(r.site, r.bucket) for r in a.offers(600_001)] == [("SITE-A", 0), ("SITE-B", 0)]
        b.merge_offers([offer("SITE-C", 1_200_000, 2, set(), 1_200_000)], drop_before_ms=1_000_000)
        assert sorted((r.site, r.bucket) for r in a.offers(0)) == [("SITE-A", 0), ("SITE-B", 0),
                                                                   ("SITE-C", 1_200_000)]
    finally:
        a.close()
        b.close()


def test_jobs_ahead_counts_only_the_same_requirements_before_it(store):
    first, second = submit_one(store, cores=2), submit_one(store, cores=2)
    urgent = submit_one(store, priority=5, cores=2)
    other = submit_one(store, cores=3)
    assert [store.jobs_ahead(j) for j in (urgent, first, second, other)] == [0, 1, 2, 0]
    start(store, urgent)
    assert store.jobs_ahead(second) == 1 and store.jobs_ahead(urgent) == 0  # matched: not waiting
