"""The JobStore logic both SQL stores share, written once against a tiny cursor API.

`SqlStore` implements every JobStore method as one transaction run through
`_write(fn)` / `_read(fn)`, which a backend provides (SQLite: a process lock
and BEGIN IMMEDIATE; PostgreSQL: a pooled connection, row locks and retries
on deadlock). The SQL text uses `?` placeholders; the PostgreSQL cursor
turns them into `%s`. What differs lives in the backends: connections,
bulk loading, class creation and the matching claim.

Rules every method follows:
  - a state is written with its `updated` time and its history event in the
    same transaction, after the job row is locked (`FOR UPDATE` on
    PostgreSQL; SQLite has one writer at a time);
  - fencing: an attempt may act only while it is the job's attempt and the
    broker has not ended it (`fenced` = 0); `fenced` is set whenever the
    broker ends an attempt (re-queue, reap, kill before start, agent report);
  - update sequences start at 1 per attempt (seq = 0 after a match);
  - attempts charged against max_attempts exclude stops, admin re-queues and
    the agent's own failures (`charged`), as lifecycle.requeue_target says;
  - a job id outside the database's range (1 .. 2^63-1) is an unknown job;
  - a submission's new requirement classes are written in the transaction
    that inserts its jobs: a refused submission leaves no row behind;
  - a pilot id is bound to the agent certificate of its first call (serial,
    subject, site: `_touch_pilot`), checked before anything else is written,
    so a call naming another certificate's pilot changes nothing.
"""

from __future__ import annotations

import abc
import datetime
import hashlib
import math
import re
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from broker.lifecycle import ADMIN_REQUEUABLE_FINAL, FREE_CAUSES, Actor, RequeueCause, allowed, requeue_target
from broker.store.base import (
    FAILURE_STATES,
    PILOT_STATES,
    BadValue,
    BatchRecord,
    InvalidTransition,
    JobEventRecord,
    JobRecord,
    JobStore,
    LimitExceeded,
    MissingContent,
    NotYours,
    OfferRecord,
    OutOfOrderUpdate,
    OutputRecord,
    PilotNotYours,
    PilotRecord,
    PilotRef,
    Reaped,
    Revocation,
    SeenToken,
    SiteRecord,
    SlotOffer,
    StaleAttemptError,
    StoreError,
    StoreSettings,
    TooManyJobs,
    UnknownBatch,
    UnknownJob,
    UpdateResult,
    Usage,
)
from broker.store.classes import CLASS_COLUMNS, CLASS_INSERT_COLUMNS, SEPARATOR, ClassCache, RequirementClass
from broker.store.schema import (
    AFTER_MIGRATIONS,
    ALIVE_STATES,
    ASSIGNED,
    COUNTERS,
    MIGRATIONS,
    SCHEMA_VERSION,
    SITE_STATES,
    WAITING,
    duration_ms,
    from_ms,
    to_ms,
)
from pilot.api.files import format_size
from pilot.api.states import ACTIVE_STATES, FINAL_STATES, JobState
from pilot.errors import UsageError
from splitpilot.job.v1 import job_pb2

T = TypeVar("T")

#: The final states, literally (SQL text): their jobs' inputs are no longer needed.
_FINAL = "(" + ", ".join(str(int(state)) for state in sorted(FINAL_STATES)) + ")"


class Cursor(Protocol):
    """What the shared code needs from a database connection inside a transaction."""

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]: ...

    def row(self, sql: str, params: Sequence[Any] = ()) -> tuple | None: ...

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Execute; return the number of rows changed."""

    def many(self, sql: str, params: Sequence[Sequence[Any]]) -> None: ...


JOB_COLUMNS = ("id, spec, owner, state, attempt, max_attempts, submitted, updated, site, node, pilot_id, "
               "exit_code, message, kill_requested, usage_cpu_ms, usage_rss, usage_time, batch")
JOB_INSERT_COLUMNS = ("id, class_id, owner, priority, state, attempt, charged, max_attempts, fenced, seq, "
                      "kill_requested, submitted, updated, heartbeat, site, node, pilot_id, exit_code, message, spec, "
                      "batch")
#: Columns of JOB_INSERT_COLUMNS (the backends' placeholders and COPY rows).
JOB_INSERT_COUNT = JOB_INSERT_COLUMNS.count(",") + 1
EVENT_INSERT = "INSERT INTO events (job_id, time, state, attempt, detail) VALUES (?, ?, ?, ?, ?)"
#: The head of one class: the only read a match makes per class (jobs_waiting).
HEAD_SQL = (f"SELECT priority, id FROM jobs WHERE class_id = ? AND state = {WAITING} "
            "ORDER BY priority DESC, id LIMIT 1")
#: The claim's SET list; parameters: now, now, site, node, pilot_id.
CLAIM_SET = (f"state = {ASSIGNED}, attempt = attempt + 1, fenced = 0, seq = 0, updated = ?, heartbeat = ?, "
             "site = ?, node = ?, pilot_id = ?, exit_code = NULL, message = '', usage_time = 0")
REAP_BATCH = 500
#: The largest id the databases hold (BIGINT); larger (or 0) ids name no job.
MAX_ID = 2**63 - 1
OFFER_COLUMNS = "site, bucket, cores, memory_mb, disk_mb, time_left_s, containers, platforms, last_offer"
#: A pilot row bound to the calling certificate; parameters: pilot_id, serial, subject, site.
PILOT_BOUND = "pilot_id = ? AND cert_serial = ? AND subject = ? AND site = ?"
#: A contact of a bound pilot; parameters: now, matched, node, then PILOT_BOUND's. An empty node
#: (ReportAttemptFailure sends none) keeps the recorded one.
PILOT_TOUCH = ("UPDATE pilots SET last_seen = ?, jobs_matched = jobs_matched + ?, "
               f"node = coalesce(nullif(?, ''), node) WHERE {PILOT_BOUND}")
REVOKED_COLUMNS = "id, serial, subject, role, reason, revoked, revoked_by, not_after"
_IN_CHUNK = 500  # values per IN (...) list
#: Why a final job is not re-queued (the states come from lifecycle.ADMIN_REQUEUABLE_FINAL).
REQUEUE_REFUSAL = ("only a job waiting, under way (ASSIGNED to SAVING) or ended in "
                   + ", ".join(s.name for s in sorted(ADMIN_REQUEUABLE_FINAL))
                   + " is re-queued, by an admin; fix: submit it again")
#: A site whose last pilot was seen longer ago than this (and that has no admin state, no job under
#: way and no recent failure) is no longer listed by list_sites.
SITE_MEMORY_MS = 30 * 86_400_000


#: Batch ids: "b-" and 10 random hex digits (40 bits), e.g. "b-5f3a9c0e1d". Random rather than a
#: sequence: short enough to read and type, unique per broker (the table's key; a clash is drawn
#: again), and it tells nobody how many batches others submitted. It is a handle, not a secret:
#: every use checks that the caller owns the batch, and another user's batch is refused exactly
#: like an unknown one.
BATCH_ID_RE = re.compile(r"b-[0-9a-f]{10}")


#: Batch labels: a name for people (DIRAC's job group), shown, never used as a key.
BATCH_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ -]{0,63}")
BATCH_LABEL_FORM = ("1 to 64 letters, digits, '.', '_', '-' or spaces, starting with a letter or digit; fix: "
                    "choose such a label, or none")


def new_batch_id() -> str:
    return "b-" + secrets.token_hex(5)


def known_batch(batch: str) -> str:
    """BATCH, if it has the form of a batch id; else UnknownBatch (NOT_FOUND: the same as any unknown id)."""
    if not BATCH_ID_RE.fullmatch(batch):
        raise UnknownBatch(batch)
    return batch


def pilot_key(pilot: PilotRef) -> tuple[str, str, str, str]:
    """PILOT_BOUND's parameters."""
    return pilot.pilot_id, pilot.serial, pilot.subject, pilot.site


def _revocation(row: Sequence) -> Revocation:
    rid, serial, subject, role, reason, revoked, by, not_after = row
    return Revocation(int(rid), serial, subject, role, reason, from_ms(revoked), by,
                      from_ms(not_after) if not_after else None)


def known_id(job_id: int) -> int:
    """JOB_ID, if the database can hold it; else UnknownJob (NOT_FOUND), never a driver's overflow."""
    if not 0 < job_id <= MAX_ID:
        raise UnknownJob(job_id)
    return job_id


def _offer(row: Sequence) -> OfferRecord:
    site, bucket, cores, memory_mb, disk_mb, time_left_s, containers, platforms, last_offer = row
    return OfferRecord(site, int(bucket), int(cores), int(memory_mb), int(disk_mb), int(time_left_s),
                       bool(containers), frozenset(platforms.split(SEPARATOR)) if platforms else frozenset(),
                       int(last_offer))


def _offer_row(offer: OfferRecord) -> tuple:
    return (offer.site, offer.bucket, offer.cores, offer.memory_mb, offer.disk_mb, offer.time_left_s,
            int(offer.containers), SEPARATOR.join(sorted(offer.platforms)), offer.last_offer)


def _chunks(values: Sequence, size: int = _IN_CHUNK):
    for begin in range(0, len(values), size):
        yield values[begin:begin + size]


def record(row: Sequence, history: Sequence[tuple] = (), outputs: Sequence[tuple] = ()) -> JobRecord:
    """A JobRecord from a row of JOB_COLUMNS."""
    spec = job_pb2.JobSpec()
    spec.ParseFromString(bytes(row[1]))
    return JobRecord(
        job_id=int(row[0]), spec=spec, owner=row[2], state=JobState(row[3]), attempt=int(row[4]),
        max_attempts=int(row[5]), submitted=from_ms(row[6]), updated=from_ms(row[7]), site=row[8],
        node=row[9], pilot_id=row[10], exit_code=row[11], message=row[12], kill_requested=bool(row[13]),
        history=tuple(JobEventRecord(from_ms(t), JobState(s), int(a), d) for t, s, a, d in history),
        outputs=tuple(OutputRecord(n, int(size), sha) for n, size, sha in outputs),
        usage=Usage(int(row[14]) / 1000, int(row[15]), from_ms(row[16])) if row[16] else None,
        batch=row[17])


#: Bounds of what a heartbeat's figures are stored as (a wrapper's garbage is clamped, never refused:
#: the heartbeat is liveness first): 100 years of CPU time, 2**62 bytes.
MAX_CPU_MS = 100 * 366 * 86400 * 1000
MAX_RSS = 2**62


def usage_values(cpu_seconds: float, rss_bytes: int) -> tuple[int, int]:
    """(CPU milliseconds, RSS bytes) to store: NaN, infinities and negatives become 0, the rest is
    bounded so that the database can hold it."""
    cpu_ms = cpu_seconds * 1000 if math.isfinite(cpu_seconds) and cpu_seconds > 0 else 0
    return int(min(cpu_ms, MAX_CPU_MS)), int(min(max(rss_bytes, 0), MAX_RSS))


def matched_detail(slot: SlotOffer, pilot: PilotRef) -> str:
    """The ASSIGNED event's detail: who took the job, where, and how it will be isolated there."""
    return (f"matched to pilot {pilot.pilot_id} at {slot.site} on {pilot.node}; "
            f"isolation: {slot.isolation or 'not stated'}")


def shown_attempt(state: int, attempt: int) -> int:
    """The attempt a job is at, for refusals: a waiting job is at its next one."""
    return attempt + 1 if state == WAITING else attempt


class SqlStore(JobStore):
    """JobStore on SQL; subclasses provide connections and the claim."""

    #: Appended to a SELECT of one job row that will be changed.
    FOR_UPDATE = ""
    #: Same, for the reaper: rows a concurrent call holds are left for later.
    FOR_UPDATE_SKIP = ""
    #: Several broker processes may share this store (and so the database file store).
    SHARED = False
    #: Appended to a SELECT of rows that must not be deleted before the commit.
    FOR_SHARE = ""

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self._classes = ClassCache()

    # ----------------------------------------------------------- backend hooks
    @abc.abstractmethod
    def _write(self, fn: Callable[[Cursor], T]) -> T:
        """Run FN in a write transaction (committed when FN returns, rolled back when it raises)."""

    @abc.abstractmethod
    def _read(self, fn: Callable[[Cursor], T], snapshot: bool = False) -> T:
        """Run FN outside any write transaction; SNAPSHOT: all its statements see one consistent state
        (without it, each statement sees the latest commits: enough for one-statement reads)."""

    def _lock_classes(self, cur: Cursor) -> None:
        """Called before new classes are inserted, in the submission's transaction: PostgreSQL holds a
        lock to the commit, so that class ids become visible in increasing order (the cache fetches
        only the ids above the highest it has); SQLite has one writer at a time anyway."""

    @abc.abstractmethod
    def _insert_jobs(self, cur: Cursor, rows: list[list], events_detail: str, now_ms: int) -> list[int]:
        """Insert job rows (JOB_INSERT_COLUMNS without the id) and their WAITING events; return ids."""

    def _shard(self) -> int:
        return 0

    # --------------------------------------------------------------- helpers
    def _bump(self, cur: Cursor, name: str, amount: int = 1) -> None:
        cur.run("INSERT INTO counters (name, shard, value) VALUES (?, ?, ?) "
                "ON CONFLICT (name, shard) DO UPDATE SET value = counters.value + excluded.value",
                (name, self._shard(), amount))

    def _event(self, cur: Cursor, job_id: int, ms: int, state: JobState | int, attempt: int, detail: str) -> None:
        cur.run(EVENT_INSERT, (job_id, ms, int(state), attempt, detail))

    def _touch_pilot(self, cur: Cursor, pilot: PilotRef, ms: int, matched: int) -> None:
        """Record a contact from PILOT, binding its id to the calling certificate on first contact.

        Raises PilotNotYours, having written nothing, when the id is bound to another certificate:
        every caller runs this first in its transaction."""
        touch = (ms, matched, pilot.node, *pilot_key(pilot))
        if cur.run(PILOT_TOUCH, touch):  # the common case: a known pilot, its own certificate
            return
        not_after = to_ms(pilot.not_after) if pilot.not_after is not None else 0
        if cur.run("INSERT INTO pilots (pilot_id, site, node, subject, first_seen, last_seen, jobs_matched, "
                   "jobs_run, end_reason, ended, cert_serial, cert_not_after) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, 0, '', NULL, ?, ?) ON CONFLICT (pilot_id) DO NOTHING",
                   (pilot.pilot_id, pilot.site, pilot.node, pilot.subject, ms, ms, matched, pilot.serial,
                    not_after)):
            self._bump(cur, "pilots_seen")
            return
        # A pilot recorded before binding existed (schema version 1) is bound by the next call from an
        # agent certificate of the same holder and site.
        if cur.run("UPDATE pilots SET cert_serial = ?, cert_not_after = ?, last_seen = ?, "
                   "jobs_matched = jobs_matched + ?, node = coalesce(nullif(?, ''), node) "
                   "WHERE pilot_id = ? AND cert_serial = '' AND subject = ? AND site = ?",
                   (pilot.serial, not_after, ms, matched, pilot.node, pilot.pilot_id, pilot.subject, pilot.site)):
            return
        if cur.run(PILOT_TOUCH, touch):  # a concurrent first call of the same certificate inserted it
            return
        raise PilotNotYours(pilot.pilot_id)

    def _refresh_classes(self, cur: Cursor) -> None:
        newest = cur.row("SELECT max(id) FROM classes")[0]
        if newest is not None and newest > self._classes.max_id:
            self._classes.add(cur.rows(f"SELECT {CLASS_COLUMNS} FROM classes WHERE id > ?",
                                       (self._classes.max_id,)))

    def _site_state(self, cur: Cursor, site: str) -> str:
        row = cur.row("SELECT state FROM sites WHERE name = ?", (site,))
        return row[0] if row else "enabled"

    def _lock_job(self, cur: Cursor, job_id: int, columns: str) -> tuple:
        row = cur.row(f"SELECT {columns} FROM jobs WHERE id = ?{self.FOR_UPDATE}", (known_id(job_id),))
        if row is None:
            raise UnknownJob(job_id)
        return row

    def _end_attempt(self, cur: Cursor, job_id: int, attempt: int, charged: int, max_attempts: int,
                     kill_requested: bool, cause: RequeueCause, detail: str, ms: int) -> JobState:
        """End the job's current attempt for CAUSE: re-queue it, or fail it when its attempts are used up.

        A job whose owner asked for a kill is not run again: WAITING, then KILLED.
        """
        if cause not in FREE_CAUSES:
            charged += 1
        target = requeue_target(cause, charged, max_attempts)
        why = f"attempt {attempt} ended: {cause.value}" + (f" ({detail})" if detail else "")
        if target is JobState.WAITING:
            cur.run(f"UPDATE jobs SET state = {WAITING}, fenced = 1, charged = ?, updated = ?, "
                    "kill_requested = 0 WHERE id = ?", (charged, ms, job_id))
            self._event(cur, job_id, ms, JobState.WAITING, attempt, f"{why}; re-queued")
            if not kill_requested:
                return target
            target, why = JobState.KILLED, "killed: its owner asked while it ran"
        else:
            why = f"{why}; {charged} of {max_attempts} attempts used"
        cur.run("UPDATE jobs SET state = ?, fenced = 1, charged = ?, updated = ?, exit_code = NULL, message = ? "
                "WHERE id = ?", (int(target), charged, ms, why, job_id))
        self._event(cur, job_id, ms, target, attempt, why)
        return target

    def _migrate(self, cur: Cursor) -> None:
        """Take the database from its recorded schema version to SCHEMA_VERSION (after the CREATE
        statements, in the same transaction as them)."""
        version = int(cur.row("SELECT value FROM meta WHERE key = 'schema_version'")[0])
        if version > SCHEMA_VERSION:
            raise StoreError(f"store schema version {version} is newer than this broker's ({SCHEMA_VERSION}); "
                             "fix: run a broker of that version or newer on this database")
        while version < SCHEMA_VERSION:
            for statement in MIGRATIONS[version]:
                cur.run(statement)
            if version == 1:
                self._own_existing_inputs(cur)
            if version == 5:
                self._record_existing_inputs(cur)
            version += 1
            cur.run("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))
        for statement in AFTER_MIGRATIONS:
            cur.run(statement)

    @staticmethod
    def _own_existing_inputs(cur: Cursor) -> None:
        """Version 2 records who may use which content; the inputs of the jobs already queued are
        their owners' (and stay referenced, so that a replaced output never frees them)."""
        ms = int(time.time() * 1000)
        last = 0
        while rows := cur.rows("SELECT id, owner, spec FROM jobs WHERE id > ? ORDER BY id LIMIT 2000", (last,)):
            owned = {}
            for job_id, owner, blob in rows:
                last = job_id
                spec = job_pb2.JobSpec()
                spec.ParseFromString(bytes(blob))
                for item in spec.input_files:
                    owned[(owner, item.sha256)] = item.size
            cur.many("INSERT INTO file_owners (owner, sha256, size, time) VALUES (?, ?, ?, ?) "
                     "ON CONFLICT (owner, sha256) DO NOTHING", [(o, s, size, ms) for (o, s), size in owned.items()])

    @staticmethod
    def _record_existing_inputs(cur: Cursor) -> None:
        """Version 6 lists every job's inputs in job_inputs (what garbage collection keeps): filled from
        the specs of the jobs already stored."""
        last = 0
        while rows := cur.rows("SELECT id, spec FROM jobs WHERE id > ? ORDER BY id LIMIT 2000", (last,)):
            inputs = set()
            for job_id, blob in rows:
                last = job_id
                spec = job_pb2.JobSpec()
                spec.ParseFromString(bytes(blob))
                inputs.update((job_id, item.sha256) for item in spec.input_files)
            cur.many("INSERT INTO job_inputs (job_id, sha256) VALUES (?, ?) ON CONFLICT (job_id, sha256) DO NOTHING",
                     sorted(inputs))

    # ------------------------------------------------------------------ users
    def submit_batch(self, owner: str, specs: Sequence[job_pb2.JobSpec], now: datetime.datetime,
                     batch: str = "", label: str = "") -> tuple[str, list[int]]:
        if batch:
            known_batch(batch)
        if label and not BATCH_LABEL_RE.fullmatch(label):
            raise BadValue(f"batch label {label[:64]!r} is not {BATCH_LABEL_FORM}")
        if len(specs) > self.settings.max_jobs_per_submit:
            raise TooManyJobs(len(specs), self.settings.max_jobs_per_submit)
        if not specs:
            return batch, []
        ms = to_ms(now)
        requirements = [RequirementClass.of(spec.requirements) for spec in specs]
        for requirement in requirements:
            if any(SEPARATOR in site for site in requirement.sites_allowed | requirement.sites_denied):
                raise BadValue("a site name holds a line break")
        prepared = []
        for spec in specs:
            stored = job_pb2.JobSpec()
            stored.CopyFrom(spec)
            stored.owner = owner
            stored.max_attempts = spec.max_attempts or self.settings.default_max_attempts
            prepared.append((stored.priority, stored.max_attempts, stored.SerializeToString()))
        inputs = [sorted({item.sha256 for item in spec.input_files}) for spec in specs]
        wanted = sorted({sha for digests in inputs for sha in digests})
        new_classes = False

        def body(cur: Cursor) -> tuple[str, list[int]]:
            nonlocal new_classes
            # First, so that a refused batch leaves nothing behind (the whole body is one transaction).
            batch_id = self._own_batch(cur, batch, owner) if batch else self._new_batch(cur, owner, ms, label)
            if wanted and self.contents_in_database:
                # Locked (shared) to the commit: garbage collection (which locks a content row for update
                # and then re-checks job_inputs) either removed it before (refused here) or sees our rows.
                self._lock_contents(cur, wanted)
            ids = {r.key: self._classes.id_of(r.key) for r in requirements}
            missing = {r.key: r for r in requirements if ids[r.key] is None}
            if missing:  # in this transaction: a refused submission leaves no class behind
                ids.update(self._add_classes(cur, list(missing.values()), ms))
                new_classes = True
            rows = [[ids[requirement.key], owner, priority, WAITING, 0, 0, max_attempts, 1, 0, 0, ms, ms, ms,
                     "", "", "", None, "", blob, batch_id]
                    for requirement, (priority, max_attempts, blob) in zip(requirements, prepared, strict=True)]
            job_ids = self._insert_jobs(cur, rows, f"submitted by {owner} in batch {batch_id}", ms)
            cur.many("INSERT INTO job_inputs (job_id, sha256) VALUES (?, ?)",
                     [(job_id, sha) for job_id, digests in zip(job_ids, inputs, strict=True) for sha in digests])
            return batch_id, job_ids
        batch_id, job_ids = self._write(body)
        if new_classes:
            self._read(self._refresh_classes)  # after the commit: the cache never holds a rolled-back class
        return batch_id, job_ids

    def _lock_contents(self, cur: Cursor, sha256s: Sequence[str]) -> None:
        """Lock the contents rows of SHA256S against removal to the commit; MissingContent if any is gone."""
        present: set[str] = set()
        for chunk in _chunks(sha256s):
            present.update(row[0] for row in cur.rows(
                f"SELECT sha256 FROM contents WHERE sha256 IN ({', '.join('?' * len(chunk))}) "
                f"ORDER BY sha256{self.FOR_SHARE}", chunk))
        missing = [sha for sha in sha256s if sha not in present]
        if missing:
            raise MissingContent(missing)

    def _own_batch(self, cur: Cursor, batch: str, owner: str) -> str:
        """BATCH, locked for the append, if OWNER's; UnknownBatch otherwise (another's or none: the same)."""
        row = cur.row(f"SELECT owner FROM batches WHERE id = ?{self.FOR_UPDATE}", (batch,))
        if row is None or row[0] != owner:
            raise UnknownBatch(batch)
        return batch

    def _new_batch(self, cur: Cursor, owner: str, ms: int, label: str = "") -> str:
        for _ in range(8):   # 40 random bits: a clash is rare; a few draws make it vanishingly so
            batch_id = new_batch_id()
            if cur.run("INSERT INTO batches (id, owner, created, label) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT (id) DO NOTHING", (batch_id, owner, ms, label)):
                return batch_id
        raise StoreError("no free batch id was found; fix: submit again")

    def batch_owner(self, batch: str) -> str | None:
        if not BATCH_ID_RE.fullmatch(batch):
            return None
        row = self._read(lambda cur: cur.row("SELECT owner FROM batches WHERE id = ?", (batch,)))
        return row[0] if row else None

    def list_batches(self, owner: str, limit: int = 1000, before: str = "") -> list[BatchRecord]:
        if before:
            known_batch(before)

        def body(cur: Cursor) -> list[BatchRecord]:
            where, params = "owner = ?", [owner]
            if before:
                row = cur.row("SELECT seq FROM batches WHERE id = ? AND owner = ?", (before, owner))
                if row is None:
                    raise UnknownBatch(before)
                where += " AND seq < ?"
                params.append(row[0])
            rows = cur.rows(f"SELECT id, created, label FROM batches WHERE {where} ORDER BY seq DESC LIMIT ?",
                            (*params, max(0, limit)))
            counts: dict[str, dict[JobState, int]] = {}
            for chunk in _chunks([batch_id for batch_id, _, _ in rows]):
                for batch_id, state, count in cur.rows(
                        f"SELECT batch, state, count(*) FROM jobs WHERE batch IN ({', '.join('?' * len(chunk))}) "
                        "GROUP BY batch, state", chunk):
                    counts.setdefault(batch_id, {})[JobState(state)] = int(count)
            return [BatchRecord(batch_id, owner, from_ms(created), counts.get(batch_id, {}), label)
                    for batch_id, created, label in rows]
        return self._read(body, snapshot=True)

    def _add_classes(self, cur: Cursor, classes: Sequence[RequirementClass], ms: int) -> dict[str, int]:
        """Insert CLASSES (unless present) in CUR's transaction; return their ids by key."""
        self._lock_classes(cur)
        cur.many(f"INSERT INTO classes ({CLASS_INSERT_COLUMNS}) VALUES ({', '.join('?' * 10)}) "
                 "ON CONFLICT (key) DO NOTHING", [(*c.row(), ms) for c in classes])
        found: dict[str, int] = {}
        keys = [c.key for c in classes]
        for chunk in _chunks(keys):
            found.update((key, int(class_id)) for class_id, key in cur.rows(
                f"SELECT id, key FROM classes WHERE key IN ({', '.join('?' * len(chunk))})", chunk))
        if len(found) != len(set(keys)):
            raise StoreError("a requirement class could not be recorded; fix: submit again")
        return found

    def get(self, job_id: int, *, with_history: bool = True) -> JobRecord:
        known_id(job_id)

        def body(cur: Cursor) -> JobRecord:
            row = cur.row(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
            if row is None:
                raise UnknownJob(job_id)
            history = cur.rows("SELECT time, state, attempt, detail FROM events WHERE job_id = ? ORDER BY id",
                               (job_id,)) if with_history else ()
            outputs = () if row[3] == WAITING else cur.rows(
                "SELECT name, size, sha256 FROM outputs WHERE job_id = ? AND attempt = ? ORDER BY name",
                (job_id, row[4]))
            return record(row, history, outputs)
        return self._read(body, snapshot=True)

    def list(self, owner: str | None, states: Sequence[JobState] = (), limit: int = 1000,
             before_job_id: int | None = None, *, site: str = "",
             updated_since: datetime.datetime | None = None, batch: str = "") -> list[JobRecord]:
        where: list[str] = []
        params: list[Any] = []
        if batch:
            where.append("batch = ?")
            params.append(batch)
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        if site:
            where.append("site = ?")
            params.append(site)
        if updated_since is not None:
            where.append("updated >= ?")
            params.append(to_ms(updated_since))
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params.extend(int(s) for s in states)
        if before_job_id and before_job_id <= MAX_ID:  # beyond: every id is lower
            where.append("id < ?")
            params.append(before_job_id)
        sql = (f"SELECT {JOB_COLUMNS} FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY id DESC LIMIT ?")
        return [record(row) for row in self._read(lambda cur: cur.rows(sql, (*params, max(0, limit))))]

    def counts(self, owner: str | None = None, batch: str = "") -> dict[JobState, int]:
        where = [(column, value) for column, value in (("owner", owner), ("batch", batch or None)) if value is not None]
        sql = ("SELECT state, count(*) FROM jobs" + (" WHERE " + " AND ".join(f"{c} = ?" for c, _ in where)
                                                      if where else "") + " GROUP BY state")
        params = tuple(value for _, value in where)
        found = dict(self._read(lambda cur: cur.rows(sql, params)))
        return {state: int(found.get(int(state), 0)) for state in JobState}

    def kill(self, job_id: int, owner: str | None, reason: str, now: datetime.datetime) -> JobState:
        ms = to_ms(now)

        def body(cur: Cursor) -> JobState:
            job_owner, state, attempt, kill_requested = self._lock_job(
                cur, job_id, "owner, state, attempt, kill_requested")
            if owner is not None and owner != job_owner:
                raise NotYours(f"job {job_id} belongs to another user; fix: kill your own jobs "
                               "(`splitpilot job status` lists them), or ask an admin")
            state = JobState(state)
            by = f"killed by {owner or 'an admin'}" + (f": {reason}" if reason else "")
            if state.final:
                return state
            if allowed(state, JobState.KILLED, Actor.OWNER):
                cur.run("UPDATE jobs SET state = ?, fenced = 1, updated = ?, exit_code = NULL, message = ? "
                        "WHERE id = ?", (int(JobState.KILLED), ms, by, job_id))
                self._event(cur, job_id, ms, JobState.KILLED, attempt, by)
                return JobState.KILLED
            if not kill_requested:
                cur.run("UPDATE jobs SET kill_requested = 1 WHERE id = ?", (job_id,))
                self._event(cur, job_id, ms, state, attempt, f"kill requested ({by}); the job is told to stop")
            return state
        return self._write(body)

    # ----------------------------------------------------------------- agents
    def pilot_heartbeat(self, pilot: PilotRef, running: Sequence[tuple[int, int]], now: datetime.datetime,
                        usage: Mapping[tuple[int, int], tuple[float, int]] | None = None) -> list[tuple[int, int]]:
        ms = to_ms(now)

        def body(cur: Cursor) -> list[tuple[int, int]]:
            self._touch_pilot(cur, pilot, ms, 0)
            ids = sorted({int(job_id) for job_id, _ in running if 0 < job_id <= MAX_ID})
            if not ids:
                return list(running)  # ids the database cannot hold name no job of this pilot
            jobs = {row[0]: row[1:] for row in cur.rows(
                "SELECT id, state, attempt, fenced, kill_requested, pilot_id FROM jobs "
                f"WHERE id IN ({', '.join('?' * len(ids))})", ids)}
            stop = []
            for job_id, attempt in running:
                job = jobs.get(job_id)
                if (job is None or job[1] != attempt or job[2] or job[3] or job[4] != pilot.pilot_id
                        or JobState(job[0]) not in ACTIVE_STATES):
                    stop.append((job_id, attempt))
                elif usage and (job_id, attempt) in usage:
                    # The job heartbeat's conditional UPDATE, also bound to this pilot: a reaper or a kill
                    # that fenced the attempt since the SELECT above makes it change nothing.
                    cpu_ms, rss = usage_values(*usage[(job_id, attempt)])
                    cur.run("UPDATE jobs SET heartbeat = ?, usage_cpu_ms = ?, usage_rss = ?, usage_time = ? "
                            "WHERE id = ? AND attempt = ? AND fenced = 0 AND pilot_id = ?",
                            (ms, cpu_ms, rss, ms, job_id, attempt, pilot.pilot_id))
            return stop
        return self._write(body)

    def pilot_end(self, pilot: PilotRef, jobs_run: int, reason: str, now: datetime.datetime, *,
                  abandoned: bool = False) -> list[Reaped]:
        ms = to_ms(now)

        def body(cur: Cursor) -> list[Reaped]:
            self._touch_pilot(cur, pilot, ms, 0)
            why = "empty" if jobs_run == 0 and not abandoned else reason or "ended"
            ended = cur.run("UPDATE pilots SET end_reason = ?, jobs_run = ?, ended = ? "
                            "WHERE pilot_id = ? AND ended IS NULL", (why, jobs_run, ms, pilot.pilot_id))
            if ended and jobs_run == 0 and not abandoned:  # counted once, however often the end is reported
                self._bump(cur, "empty_pilots_total")
            # Whatever it still holds is lost now: no wrapper of a gone pilot reports again.
            detail = (f"its agent died ({reason})" if abandoned else f"its pilot ended ({why})")
            held = cur.rows(f"SELECT id, attempt, state, charged, max_attempts, kill_requested FROM jobs "
                            f"WHERE pilot_id = ? AND fenced = 0 AND state IN ({ASSIGNED}, "
                            f"{ALIVE_STATES[1:-1]}){self.FOR_UPDATE}", (pilot.pilot_id,))
            reaped = []
            for job_id, attempt, _state, charged, max_attempts, kill_requested in held:
                new_state = self._end_attempt(cur, job_id, attempt, charged, max_attempts, bool(kill_requested),
                                              RequeueCause.LOST, f"pilot {pilot.pilot_id}: {detail}", ms)
                self._bump(cur, "lost_attempts_total")
                reaped.append(Reaped(job_id, attempt, RequeueCause.LOST, new_state))
            return reaped
        return self._write(body)

    def attempt_failed(self, job_id: int, attempt: int, pilot: PilotRef, cause: RequeueCause | None,
                       detail: str, now: datetime.datetime) -> JobState:
        ms = to_ms(now)

        def body(cur: Cursor) -> JobState:
            self._touch_pilot(cur, pilot, ms, 0)  # first: another certificate's pilot id changes nothing
            state, current, fenced, holder, charged, max_attempts, kill_requested = self._lock_job(
                cur, job_id, "state, attempt, fenced, pilot_id, charged, max_attempts, kill_requested")
            if attempt != current or attempt < 1:
                raise StaleAttemptError(job_id, attempt, shown_attempt(state, current))
            if holder != pilot.pilot_id:
                raise NotYours(f"job {job_id} attempt {attempt} runs on another pilot, not {pilot.pilot_id}")
            if fenced or JobState(state) not in ACTIVE_STATES:
                raise StaleAttemptError(job_id, attempt, shown_attempt(state, current))
            if cause is not None:
                return self._end_attempt(cur, job_id, attempt, charged, max_attempts, bool(kill_requested),
                                         cause, f"reported by pilot {pilot.pilot_id}: {detail}", ms)
            why = f"stopped by the agent for exceeding a limit: {detail}"
            cur.run("UPDATE jobs SET state = ?, fenced = 1, updated = ?, exit_code = NULL, message = ? "
                    "WHERE id = ?", (int(JobState.FAILED_LIMIT), ms, why, job_id))
            self._event(cur, job_id, ms, JobState.FAILED_LIMIT, attempt, why)
            return JobState.FAILED_LIMIT
        return self._write(body)

    def site_state(self, site: str) -> str:
        return self._read(lambda cur: self._site_state(cur, site))

    def site_states(self) -> dict[str, str]:
        return dict(self._read(lambda cur: cur.rows("SELECT name, state FROM sites")))

    # -------------------------------------------------------- why jobs wait
    def merge_offers(self, offers: Sequence[OfferRecord], drop_before_ms: int) -> None:
        ordered = sorted(offers, key=lambda o: (o.site, o.bucket))  # one lock order for every broker

        def body(cur: Cursor) -> None:
            for offer in ordered:
                if cur.run(f"INSERT INTO site_offers ({OFFER_COLUMNS}) VALUES ({', '.join('?' * 9)}) "
                           "ON CONFLICT (site, bucket) DO NOTHING", _offer_row(offer)):
                    continue
                row = cur.row(f"SELECT {OFFER_COLUMNS} FROM site_offers WHERE site = ? AND bucket = ?"
                              f"{self.FOR_UPDATE}", (offer.site, offer.bucket))
                merged = _offer(row).merged(offer)
                cur.run("UPDATE site_offers SET cores = ?, memory_mb = ?, disk_mb = ?, time_left_s = ?, "
                        "containers = ?, platforms = ?, last_offer = ? WHERE site = ? AND bucket = ?",
                        (*_offer_row(merged)[2:], offer.site, offer.bucket))
            cur.run("DELETE FROM site_offers WHERE bucket > 0 AND bucket < ?", (drop_before_ms,))
        self._write(body)

    def offers(self, since_ms: int) -> list[OfferRecord]:
        return [_offer(row) for row in self._read(lambda cur: cur.rows(
            f"SELECT {OFFER_COLUMNS} FROM site_offers WHERE bucket = 0 OR bucket >= ? ORDER BY site, bucket",
            (since_ms,)))]

    def jobs_ahead(self, job_id: int) -> int:
        known_id(job_id)

        def body(cur: Cursor) -> int:
            row = cur.row("SELECT class_id, priority, state FROM jobs WHERE id = ?", (job_id,))
            if row is None or row[2] != WAITING:
                return 0
            class_id, priority, _ = row
            # Through jobs_waiting (the predicate repeats the index's literally).
            return int(cur.row(f"SELECT count(*) FROM jobs WHERE class_id = ? AND state = {WAITING} "
                               "AND (priority > ? OR (priority = ? AND id < ?))",
                               (class_id, priority, priority, job_id))[0])
        return self._read(body, snapshot=True)

    # ------------------------------------------------------------------- jobs
    def job_update(self, job_id: int, attempt: int, state: JobState, sequence: int, detail: str,
                   exit_code: int | None, now: datetime.datetime) -> UpdateResult:
        ms, state = to_ms(now), JobState(state)
        if sequence > MAX_ID:
            raise BadValue(f"update sequence {sequence} is out of range")

        def body(cur: Cursor) -> UpdateResult:
            current_state, current, fenced, seq = self._lock_job(cur, job_id, "state, attempt, fenced, seq")
            current_state = JobState(current_state)
            if attempt != current or fenced or attempt < 1:
                raise StaleAttemptError(job_id, attempt, shown_attempt(current_state, current))
            if sequence == seq and seq > 0 and state == current_state:
                cur.run("UPDATE jobs SET heartbeat = ? WHERE id = ?", (ms, job_id))
                return UpdateResult(current_state, replay=True)
            if sequence != seq + 1:
                raise OutOfOrderUpdate(job_id, attempt, sequence, seq + 1)
            if not allowed(current_state, state, Actor.JOB):
                raise InvalidTransition(job_id, current_state, state, "not a transition the job may report")
            if state.final:
                cur.run("UPDATE jobs SET state = ?, updated = ?, heartbeat = ?, seq = ?, exit_code = ?, "
                        "message = ? WHERE id = ?", (int(state), ms, ms, sequence, exit_code, detail, job_id))
            else:
                cur.run("UPDATE jobs SET state = ?, updated = ?, heartbeat = ?, seq = ? WHERE id = ?",
                        (int(state), ms, ms, sequence, job_id))
            self._event(cur, job_id, ms, state, attempt, detail)
            return UpdateResult(state)
        return self._write(body)

    def job_heartbeat(self, job_id: int, attempt: int, cpu_seconds: float, rss_bytes: int,
                      sandbox_bytes: int, now: datetime.datetime) -> bool:
        ms = to_ms(now)
        known_id(job_id)
        cpu_ms, rss = usage_values(cpu_seconds, rss_bytes)

        def body(cur: Cursor) -> bool:
            # One conditional statement: a reaper that ended the attempt first makes it change nothing.
            row = cur.row("UPDATE jobs SET heartbeat = ?, usage_cpu_ms = ?, usage_rss = ?, usage_time = ? "
                          "WHERE id = ? AND attempt = ? AND fenced = 0 RETURNING state, kill_requested",
                          (ms, cpu_ms, rss, ms, job_id, attempt))
            if row is None:
                found = cur.row("SELECT state, attempt FROM jobs WHERE id = ?", (job_id,))
                if found is None:
                    raise UnknownJob(job_id)
                raise StaleAttemptError(job_id, attempt, shown_attempt(*found))
            return bool(row[1]) or JobState(row[0]).final
        return self._write(body)

    def _lock_current(self, cur: Cursor, job_id: int, attempt: int) -> None:
        """Lock the job row; StaleAttemptError unless ATTEMPT is its current, active, unfenced attempt."""
        state, current, fenced = self._lock_job(cur, job_id, "state, attempt, fenced")
        if attempt != current or fenced or JobState(state) not in ACTIVE_STATES:
            raise StaleAttemptError(job_id, attempt, shown_attempt(state, current))

    def reserve_output(self, job_id: int, attempt: int, name: str, size: int, max_bytes: int, max_files: int,
                       now: datetime.datetime) -> int:
        ms = to_ms(now)

        def body(cur: Cursor) -> int:
            # Under the job's row lock: every upload of the job reserves one after the other.
            self._lock_current(cur, job_id, attempt)
            recorded = cur.rows("SELECT name, size FROM outputs WHERE job_id = ? AND attempt = ?", (job_id, attempt))
            reserved = cur.rows("SELECT name, size FROM reservations WHERE job_id = ? AND attempt = ?",
                                (job_id, attempt))
            total = sum(s for n, s in recorded if n != name) + sum(s for _, s in reserved) + size
            if total > max_bytes:
                raise LimitExceeded(job_id, name, (
                    f"{format_size(size)} would bring the job's outputs (recorded and being uploaded) to "
                    f"{format_size(total)}, over the broker's per-job output limit of {format_size(max_bytes)}; "
                    "nothing was stored; fix: save less, or ask the broker's operator to raise --max-job-size"))
            names = {n for n, _ in recorded} | {n for n, _ in reserved} | {name}
            if len(names) > max_files:
                raise LimitExceeded(job_id, name, (
                    f"the job would have {len(names)} outputs, over the broker's limit of {max_files} per job; "
                    "nothing was stored; fix: pack small files into one archive (tar) before saving them, or "
                    "ask the broker's operator to raise --max-outputs"))
            return int(cur.row("INSERT INTO reservations (job_id, attempt, name, size, time) VALUES (?, ?, ?, ?, ?) "
                               "RETURNING id", (job_id, attempt, name, size, ms))[0])
        return self._write(body)

    def release_reservation(self, reservation: int) -> None:
        self._write(lambda cur: cur.run("DELETE FROM reservations WHERE id = ?", (reservation,)))

    def pending_outputs(self, job_id: int) -> list[tuple[int, str, int]]:
        known_id(job_id)
        return [(int(a), n, int(s)) for a, n, s in self._read(lambda cur: cur.rows(
            "SELECT attempt, name, size FROM reservations WHERE job_id = ? ORDER BY id", (job_id,)))]

    def add_output(self, job_id: int, attempt: int, output: OutputRecord, now: datetime.datetime, *,
                   reservation: int | None = None) -> str | None:
        ms = to_ms(now)

        def body(cur: Cursor) -> str | None:
            self._lock_current(cur, job_id, attempt)
            if reservation is not None:
                cur.run("DELETE FROM reservations WHERE id = ?", (reservation,))
            old = cur.row("SELECT sha256 FROM outputs WHERE job_id = ? AND attempt = ? AND name = ?",
                          (job_id, attempt, output.name))
            cur.run("INSERT INTO outputs (job_id, attempt, name, size, sha256, time) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (job_id, attempt, name) DO UPDATE SET size = excluded.size, "
                    "sha256 = excluded.sha256, time = excluded.time",
                    (job_id, attempt, output.name, output.size, output.sha256, ms))
            return old[0] if old is not None and old[0] != output.sha256 else None
        return self._write(body)

    # ------------------------------------------------------ content ownership
    def add_file_owner(self, owner: str, sha256: str, size: int, now: datetime.datetime) -> bool:
        ms = to_ms(now)

        def body(cur: Cursor) -> bool:
            # An upload again refreshes the time: garbage collection keeps content uploaded within its grace
            # period, so that a user who uploads again never sees it vanish before their submission.
            if cur.run("UPDATE file_owners SET time = ? WHERE owner = ? AND sha256 = ?", (ms, owner, sha256)):
                return False
            return bool(cur.run("INSERT INTO file_owners (owner, sha256, size, time) VALUES (?, ?, ?, ?) "
                                "ON CONFLICT (owner, sha256) DO NOTHING", (owner, sha256, size, ms)))
        return self._write(body)

    def claim_inputs(self, owner: str, sha256s: Sequence[str], now: datetime.datetime) -> set[str]:
        wanted = sorted(set(sha256s))

        def owned(cur: Cursor) -> set[str]:
            found: set[str] = set()
            for chunk in _chunks(wanted):
                found.update(row[0] for row in cur.rows(
                    f"SELECT sha256 FROM file_owners WHERE owner = ? AND sha256 IN ({', '.join('?' * len(chunk))})",
                    (owner, *chunk)))
            return found

        found = self._read(owned)
        rest = [s for s in wanted if s not in found]
        if not rest:
            return found

        def produced(cur: Cursor) -> set[str]:
            made: dict[str, int] = {}
            for chunk in _chunks(rest):
                made.update(cur.rows(
                    "SELECT o.sha256, max(o.size) FROM outputs o JOIN jobs j ON j.id = o.job_id WHERE j.owner = ? "
                    f"AND o.sha256 IN ({', '.join('?' * len(chunk))}) GROUP BY o.sha256", (owner, *chunk)))
            cur.many("INSERT INTO file_owners (owner, sha256, size, time) VALUES (?, ?, ?, ?) "
                     "ON CONFLICT (owner, sha256) DO NOTHING",
                     [(owner, sha, int(size), to_ms(now)) for sha, size in made.items()])
            return set(made)
        return found | self._write(produced)

    def content_referenced(self, sha256: str) -> bool:
        return self._read(lambda cur: cur.row(
            "SELECT 1 FROM outputs WHERE sha256 = ? UNION ALL SELECT 1 FROM file_owners WHERE sha256 = ? LIMIT 1",
            (sha256, sha256))) is not None

    # ------------------------------------------------ content in the database
    #: True once a database file store uses this store: a submission then locks the contents rows of its
    #: inputs in its transaction (MissingContent if gone), so garbage collection never races it.
    contents_in_database = False

    def transaction(self, fn: Callable[[Cursor], T]) -> T:
        """FN(cursor) in one write transaction; the store's own methods called by FN (on the same thread)
        join it where the backend supports that (PostgreSQL), so that content and the row naming it are
        committed together."""
        return self._write(fn)

    def put_content(self, cur: Cursor, sha256: str, size: int, chunks: Callable[[], Iterator[bytes]],
                    ms: int) -> bool:
        """In CUR's transaction: store content SHA256 of SIZE bytes from CHUNKS() unless present, and
        lock its row (shared) to the commit, so that no free or collection removes it meanwhile. True if it
        was present already."""
        while True:
            if cur.row("INSERT INTO contents (sha256, size, created) VALUES (?, ?, ?) ON CONFLICT (sha256) "
                       "DO NOTHING RETURNING sha256", (sha256, size, ms)) is not None:
                for seq, data in enumerate(chunks()):
                    cur.run("INSERT INTO chunks (sha256, seq, digest, data) VALUES (?, ?, ?, ?)",
                            (sha256, seq, hashlib.sha256(data).digest(), data))
                return False
            if cur.row(f"SELECT size FROM contents WHERE sha256 = ?{self.FOR_SHARE}", (sha256,)) is not None:
                return True
            # Removed between our insert attempt and the lock (a free or a collection committed): again.

    def content_size(self, sha256: str) -> int | None:
        row = self._read(lambda cur: cur.row("SELECT size FROM contents WHERE sha256 = ?", (sha256,)))
        return None if row is None else int(row[0])

    def content_chunk(self, sha256: str, seq: int) -> tuple[bytes, bytes] | None:
        """(SHA-256 digest, data) of chunk SEQ of content SHA256, or None."""
        row = self._read(lambda cur: cur.row("SELECT digest, data FROM chunks WHERE sha256 = ? AND seq = ?",
                                             (sha256, seq)))
        return None if row is None else (bytes(row[0]), bytes(row[1]))

    def free_content(self, sha256: str, remove: Callable[[Sequence[str]], list[str]] | None = None) -> bool:
        """Remove content SHA256 from the database unless an output or owner row refers to it (checked
        under the content row's lock, in one transaction: a concurrent upload of the same bytes either
        committed its row first, seen here, or waits and stores the content again). REMOVE: deletes the
        bytes kept outside the database (broker.xrdfiles), under that lock; the shas it deleted."""
        def body(cur: Cursor) -> bool:
            if cur.row(f"SELECT 1 FROM contents WHERE sha256 = ?{self.FOR_UPDATE}", (sha256,)) is None:
                return False
            if cur.row("SELECT 1 FROM outputs WHERE sha256 = ? UNION ALL SELECT 1 FROM file_owners "
                       "WHERE sha256 = ? LIMIT 1", (sha256, sha256)) is not None:
                return False
            if remove is not None and not remove([sha256]):
                return False
            cur.run("DELETE FROM chunks WHERE sha256 = ?", (sha256,))
            cur.run("DELETE FROM contents WHERE sha256 = ?", (sha256,))
            return True
        return self._write(body)

    def content_usage(self) -> tuple[int, int]:
        count, total = self._read(lambda cur: cur.row("SELECT count(*), coalesce(sum(size), 0) FROM contents"))
        return int(count), int(total)

    # ------------------------------------------------------ garbage collection
    @staticmethod
    def _unreferenced(column: str) -> str:
        """SQL: content COLUMN is garbage: no output row names it, no owner row newer than the cutoff
        (parameter) does, and no job that is not final takes it as an input."""
        return (f"NOT EXISTS (SELECT 1 FROM outputs o WHERE o.sha256 = {column}) "
                f"AND NOT EXISTS (SELECT 1 FROM file_owners f WHERE f.sha256 = {column} AND f.time >= ?) "
                f"AND NOT EXISTS (SELECT 1 FROM job_inputs i JOIN jobs j ON j.id = i.job_id "
                f"WHERE i.sha256 = {column} AND j.state NOT IN {_FINAL})")

    def _try_collector_lock(self, cur: Cursor) -> bool:
        """One collector at a time over the whole database (PostgreSQL: an advisory lock; SQLite: one
        writer anyway)."""
        return True

    def collect_contents(self, cutoff: datetime.datetime, limit: int = 100,
                         remove: Callable[[Sequence[str]], list[str]] | None = None) -> list[tuple[str, int]]:
        """Remove up to LIMIT unreferenced contents (database file store) created before CUTOFF, with their
        owner rows; return (sha256, size) of each removed. Empty when another broker is collecting.
        REMOVE: deletes the bytes kept outside the database (broker.xrdfiles) while the rows are locked;
        returns the shas it deleted (the others keep their rows)."""
        ms = to_ms(cutoff)

        def body(cur: Cursor) -> list[tuple[str, int]]:
            if not self._try_collector_lock(cur):
                return []
            candidates = cur.rows(f"SELECT sha256, size FROM contents WHERE created < ? AND "
                                  f"{self._unreferenced('contents.sha256')} ORDER BY created, sha256 LIMIT ?"
                                  f"{self.FOR_UPDATE_SKIP}", (ms, ms, limit))
            if not candidates:
                return []
            # Locked now: checked again by a new statement, which sees every reference committed before
            # the lock (a submission or upload that holds the row shared was skipped, or has committed).
            sizes = dict(candidates)
            gone = self._still_unreferenced(cur, sorted(sizes), ms)
            if remove is not None and gone:
                gone = remove(gone)
            for chunk in _chunks(gone):
                marks = ", ".join("?" * len(chunk))
                cur.run(f"DELETE FROM chunks WHERE sha256 IN ({marks})", chunk)
                cur.run(f"DELETE FROM contents WHERE sha256 IN ({marks})", chunk)
                cur.run(f"DELETE FROM file_owners WHERE sha256 IN ({marks})", chunk)
            return [(sha, int(sizes[sha])) for sha in gone]
        return self._write(body)

    def _still_unreferenced(self, cur: Cursor, sha256s: Sequence[str], ms: int) -> list[str]:
        return [sha for sha in sha256s
                if cur.row(f"SELECT 1 WHERE {self._unreferenced('?')}", (sha, sha, ms, sha)) is not None]

    def unreferenced_contents(self, sha256s: Sequence[str], cutoff: datetime.datetime) -> list[str]:
        """Which of SHA256S (files of the local file store, older than CUTOFF) nothing refers to any more."""
        ms = to_ms(cutoff)
        found: list[str] = []

        def body(cur: Cursor) -> None:
            found.extend(self._still_unreferenced(cur, sha256s, ms))
        self._read(body, snapshot=True)
        return found

    def forget_contents(self, sha256s: Sequence[str]) -> None:
        """Drop the owner rows of contents the local file store is about to remove."""
        def body(cur: Cursor) -> None:
            for chunk in _chunks(sha256s):
                cur.run(f"DELETE FROM file_owners WHERE sha256 IN ({', '.join('?' * len(chunk))})", chunk)
        self._write(body)

    def prune_history(self, cutoff: datetime.datetime, limit: int = 5000) -> int:
        """Delete the events of up to LIMIT jobs final since before CUTOFF (their rows keep their final
        state, message and outputs); return the number of events deleted."""
        ms = to_ms(cutoff)

        def body(cur: Cursor) -> int:
            if not self._try_collector_lock(cur):
                return 0
            deleted = 0
            for chunk in _chunks(self._final_jobs_with(cur, "events", ms, limit)):
                marks = ", ".join("?" * len(chunk))
                deleted += cur.run(f"DELETE FROM events WHERE job_id IN ({marks})", chunk)
                cur.run(f"DELETE FROM job_inputs WHERE job_id IN ({marks})", chunk)
            return deleted
        return self._write(body)

    @staticmethod
    def _final_jobs_with(cur: Cursor, table: str, ms: int, limit: int) -> list[int]:
        """Up to LIMIT ids of jobs final since before MS that still have rows in TABLE (a retention's work)."""
        return [row[0] for row in cur.rows(
            f"SELECT id FROM jobs WHERE state IN {_FINAL} AND updated < ? AND EXISTS "
            f"(SELECT 1 FROM {table} t WHERE t.job_id = jobs.id) ORDER BY id LIMIT ?", (ms, limit))]

    def prune_outputs(self, cutoff: datetime.datetime, limit: int = 5000) -> int:
        """Forget the output rows of up to LIMIT jobs final since before CUTOFF (output retention); their
        content, referenced by nothing else, is then collected like any other after the grace period.
        Returns the number of output rows deleted."""
        ms = to_ms(cutoff)

        def body(cur: Cursor) -> int:
            if not self._try_collector_lock(cur):
                return 0
            deleted = 0
            for chunk in _chunks(self._final_jobs_with(cur, "outputs", ms, limit)):
                deleted += cur.run(f"DELETE FROM outputs WHERE job_id IN ({', '.join('?' * len(chunk))})", chunk)
            return deleted
        return self._write(body)

    # ------------------------------------------------------ admins and reaper
    def set_site_state(self, site: str, state: str, reason: str, now: datetime.datetime) -> str:
        if state not in SITE_STATES:
            raise UsageError(f"site state {state!r} is not one of {', '.join(SITE_STATES)}")
        ms = to_ms(now)

        def body(cur: Cursor) -> str:
            previous = self._site_state(cur, site)
            cur.run("INSERT INTO sites (name, state, reason, updated) VALUES (?, ?, ?, ?) ON CONFLICT (name) "
                    "DO UPDATE SET state = excluded.state, reason = excluded.reason, updated = excluded.updated",
                    (site, state, reason, ms))
            return previous
        return self._write(body)

    def list_pilots(self, seen_since: datetime.datetime, *, now: datetime.datetime | None = None, site: str = "",
                    state: str = "", limit: int = 1000) -> list[PilotRecord]:
        if state not in ("", *PILOT_STATES):
            raise BadValue(f"pilot state {state[:40]!r} is not one of {', '.join(PILOT_STATES)}")
        alive_since = to_ms(now or datetime.datetime.now(datetime.UTC)) - duration_ms(
            self.settings.heartbeat_timeout)
        alive = f"(ended IS NULL AND last_seen >= {int(alive_since)})"
        where, params = ["last_seen >= ?"], [to_ms(seen_since)]
        if site:
            where.append("site = ?")
            params.append(site)
        if state:
            where.append(alive if state == "alive" else f"NOT {alive}")

        def body(cur: Cursor) -> list[PilotRecord]:
            rows = cur.rows(
                f"SELECT pilot_id, site, node, first_seen, last_seen, jobs_matched, end_reason, cert_serial, "
                f"{alive}, jobs_run, ended FROM pilots WHERE {' AND '.join(where)} "
                "ORDER BY last_seen DESC, pilot_id LIMIT ?", (*params, max(0, limit)))
            held: dict[str, list[int]] = {}
            for chunk in _chunks([row[0] for row in rows]):
                for pilot_id, job_id in cur.rows(
                        f"SELECT pilot_id, id FROM jobs WHERE fenced = 0 AND state IN ({ASSIGNED}, "
                        f"{ALIVE_STATES[1:-1]}) AND pilot_id IN ({', '.join('?' * len(chunk))}) ORDER BY id",
                        chunk):
                    held.setdefault(pilot_id, []).append(int(job_id))
            return [PilotRecord(p, s, n, from_ms(f), from_ms(last), int(m), e, c, bool(a), int(r),
                                tuple(held.get(p, ())), from_ms(ended) if ended is not None else None)
                    for p, s, n, f, last, m, e, c, a, r, ended in rows]
        return self._read(body, snapshot=True)

    def list_sites(self, now: datetime.datetime, failures_since: datetime.datetime) -> list[SiteRecord]:
        alive_since = to_ms(now) - duration_ms(self.settings.heartbeat_timeout)
        since = to_ms(failures_since)
        failed = ", ".join(str(int(s)) for s in FAILURE_STATES)

        def body(cur: Cursor) -> list[SiteRecord]:
            states = {name: (state, reason, updated) for name, state, reason, updated in
                      cur.rows("SELECT name, state, reason, updated FROM sites")}
            alive = dict(cur.rows("SELECT site, count(*) FROM pilots WHERE ended IS NULL AND last_seen >= ? "
                                  "GROUP BY site", (alive_since,)))
            empty = dict(cur.rows("SELECT site, count(*) FROM pilots WHERE ended >= ? AND jobs_run = 0 "
                                  "AND end_reason = 'empty' GROUP BY site", (since,)))
            # Pilot records are kept for ever: a site is known from the recent ones (an index range).
            known = set(states) | {row[0] for row in cur.rows("SELECT DISTINCT site FROM pilots WHERE last_seen >= ?",
                                                              (to_ms(now) - SITE_MEMORY_MS,))}
            running = dict(cur.rows(f"SELECT site, count(*) FROM jobs WHERE fenced = 0 AND state IN ({ASSIGNED}, "
                                    f"{ALIVE_STATES[1:-1]}) GROUP BY site"))
            failures: dict[str, dict[JobState, int]] = {}
            for site, state, count in cur.rows(f"SELECT site, state, count(*) FROM jobs WHERE state IN ({failed}) "
                                               "AND updated >= ? AND site <> '' GROUP BY site, state", (since,)):
                failures.setdefault(site, {})[JobState(state)] = int(count)
            known |= set(running) | set(failures)
            # Waiting jobs per requirement class, then per site by the class's site lists: one row per class.
            waiting_classes = cur.rows(
                f"SELECT c.sites_allowed, c.sites_denied, count(*) FROM jobs j JOIN classes c ON c.id = j.class_id "
                f"WHERE j.state = {WAITING} GROUP BY c.sites_allowed, c.sites_denied")
            records = []
            for site in sorted(known):
                waiting = 0
                for may, may_not, count in waiting_classes:
                    if (may and site not in may.split(SEPARATOR)) or (may_not and site in may_not.split(SEPARATOR)):
                        continue
                    waiting += int(count)
                state, reason, updated = states.get(site, ("enabled", "", None))
                records.append(SiteRecord(site, state, reason, from_ms(updated) if updated is not None else None,
                                          int(alive.get(site, 0)), int(running.get(site, 0)), waiting,
                                          failures.get(site, {}), int(empty.get(site, 0))))
            return records
        return self._read(body, snapshot=True)

    def pilot_expiry(self, pilot_id: str) -> datetime.datetime | None:
        row = self._read(lambda cur: cur.row("SELECT cert_not_after FROM pilots WHERE pilot_id = ?", (pilot_id,)))
        return from_ms(row[0]) if row is not None and row[0] else None

    # ---------------------------------------------------------------- revocation
    def revoke(self, serial: str, subject: str, role: str, reason: str, revoked_by: str,
               not_after: datetime.datetime | None, now: datetime.datetime) -> tuple[Revocation, bool]:
        ms = to_ms(now)

        def body(cur: Cursor) -> tuple[Revocation, bool]:
            if serial:  # one certificate: revoking it twice adds nothing
                row = cur.row(f"SELECT {REVOKED_COLUMNS} FROM revoked WHERE serial = ? ORDER BY id LIMIT 1",
                              (serial,))
                if row is not None:
                    return _revocation(row), True
            # A holder revocation is never a duplicate: a later one also covers the tokens issued since.
            row = cur.row(f"INSERT INTO revoked (serial, subject, role, reason, revoked, revoked_by, not_after) "
                          f"VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING {REVOKED_COLUMNS}",
                          (serial, subject, role, reason, ms, revoked_by,
                           to_ms(not_after) if not_after is not None else 0))
            return _revocation(row), False
        return self._write(body)

    def revocations(self, after_id: int = 0, limit: int | None = None) -> list[Revocation]:
        page = "" if limit is None else f" LIMIT {int(limit)}"
        return [_revocation(row) for row in self._read(lambda cur: cur.rows(
            f"SELECT {REVOKED_COLUMNS} FROM revoked WHERE id > ? ORDER BY id{page}", (after_id,)))]

    def revocation_generation(self) -> tuple[int, int]:
        newest, count = self._read(lambda cur: cur.row("SELECT coalesce(max(id), 0), count(*) FROM revoked"))
        return int(newest), int(count)

    def note_tokens(self, tokens: Sequence[SeenToken], now: datetime.datetime) -> None:
        if tokens:
            self._write(lambda cur: cur.many(
                "INSERT INTO tokens (serial, role, subject, not_after, first_seen) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (serial) DO NOTHING",
                [(t.serial, t.role, t.subject, to_ms(t.not_after), to_ms(now)) for t in tokens]))

    def seen_token(self, serial: str) -> SeenToken | None:
        row = self._read(lambda cur: cur.row("SELECT serial, role, subject, not_after FROM tokens WHERE serial = ?",
                                             (serial,)))
        return SeenToken(row[0], row[1], row[2], from_ms(row[3])) if row is not None else None

    def requeue(self, job_id: int, cause: RequeueCause, detail: str, now: datetime.datetime) -> int:
        ms = to_ms(now)

        def body(cur: Cursor) -> tuple[JobState, JobState, int]:
            state, attempt, charged, max_attempts, kill_requested = self._lock_job(
                cur, job_id, "state, attempt, charged, max_attempts, kill_requested")
            state = JobState(state)
            if state.final and not (cause is RequeueCause.ADMIN and state in ADMIN_REQUEUABLE_FINAL):
                raise InvalidTransition(job_id, state, JobState.WAITING, REQUEUE_REFUSAL)
            if state.final:  # an admin's second chance: a new attempt, the attempts counted afresh
                cur.run(f"UPDATE jobs SET state = {WAITING}, fenced = 1, charged = 0, kill_requested = 0, "
                        "updated = ?, exit_code = NULL, message = '' WHERE id = ?", (ms, job_id))
                self._event(cur, job_id, ms, JobState.WAITING, attempt,
                            f"re-queued from {state.name}" + (f" ({detail})" if detail else "")
                            + f"; {max_attempts} attempt(s) from now on")
                return state, JobState.WAITING, attempt + 1
            if kill_requested:
                raise InvalidTransition(job_id, state, JobState.WAITING, "its owner asked to kill it")
            if state is JobState.WAITING:
                return state, state, attempt + 1
            after = self._end_attempt(cur, job_id, attempt, charged, max_attempts, False, cause, detail, ms)
            return state, after, attempt + 1

        before, after, attempt = self._write(body)
        if after is not JobState.WAITING:  # committed: the attempt ended and used up the last one
            raise InvalidTransition(job_id, before, JobState.WAITING, f"attempts used up; the job is {after.name}")
        return attempt

    def reap(self, now: datetime.datetime) -> list[Reaped]:
        ms = to_ms(now)
        reaped: list[Reaped] = []
        lost = ms - duration_ms(self.settings.heartbeat_timeout)
        self._reap_kind(reaped, f"state IN {ALIVE_STATES} AND heartbeat < ?", lost, RequeueCause.LOST, ms)
        unstarted = ms - duration_ms(self.settings.start_timeout)
        self._reap_kind(reaped, f"state = {ASSIGNED} AND updated < ?", unstarted, RequeueCause.NEVER_STARTED, ms)
        if self.settings.queue_timeout is not None:
            expired = ms - duration_ms(self.settings.queue_timeout)
            self._reap_kind(reaped, f"state = {WAITING} AND updated < ?", expired, None, ms)
        stale = ms - duration_ms(self.settings.reservation_timeout)

        def tidy(cur: Cursor) -> None:
            cur.run("DELETE FROM reservations WHERE time < ?", (stale,))  # uploads of a broker that died
            cur.run("DELETE FROM tokens WHERE not_after < ?", (ms,))      # expired: nothing left to revoke
        self._write(tidy)
        return reaped

    def _reap_kind(self, reaped: list[Reaped], condition: str, cutoff: int, cause: RequeueCause | None,
                   ms: int) -> None:
        """Reap the jobs matching CONDITION in batches; each job is re-checked under its row lock
        (the CONDITION again, plus its attempt), so a heartbeat or update that landed first wins."""
        while True:
            candidates = self._read(lambda cur: cur.rows(
                f"SELECT id, attempt FROM jobs WHERE {condition} LIMIT {REAP_BATCH}", (cutoff,)))
            if not candidates:
                return
            def batch(cur: Cursor, candidates: list[tuple] = candidates) -> list[Reaped]:
                found = (self._reap_one(cur, job_id, attempt, condition, cutoff, cause, ms)
                         for job_id, attempt in candidates)
                return [r for r in found if r is not None]
            done = self._write(batch)
            reaped.extend(done)
            if not done or len(candidates) < REAP_BATCH:
                return

    def _reap_one(self, cur: Cursor, job_id: int, attempt: int, condition: str, cutoff: int,
                  cause: RequeueCause | None, ms: int) -> Reaped | None:
        row = cur.row(f"SELECT state, charged, max_attempts, kill_requested FROM jobs "
                      f"WHERE id = ? AND attempt = ? AND {condition}{self.FOR_UPDATE_SKIP}",
                      (job_id, attempt, cutoff))
        if row is None:
            return None
        state, charged, max_attempts, kill_requested = row
        if cause is None:
            why = "waited longer than the queue timeout"
            cur.run("UPDATE jobs SET state = ?, updated = ?, message = ? WHERE id = ?",
                    (int(JobState.EXPIRED), ms, why, job_id))
            self._event(cur, job_id, ms, JobState.EXPIRED, attempt, why)
            return Reaped(job_id, attempt, None, JobState.EXPIRED)
        detail = "no heartbeat" if cause is RequeueCause.LOST else "the wrapper never reported STARTED"
        new_state = self._end_attempt(cur, job_id, attempt, charged, max_attempts, bool(kill_requested),
                                      cause, detail, ms)
        self._bump(cur, "lost_attempts_total" if cause is RequeueCause.LOST else "never_started_attempts_total")
        return Reaped(job_id, attempt, cause, new_state)

    # ---------------------------------------------------------------- metrics
    def stats(self) -> dict[str, int]:
        found = dict(self._read(lambda cur: cur.rows("SELECT name, sum(value) FROM counters GROUP BY name")))
        return {name: int(found.get(name) or 0) for name in COUNTERS}
