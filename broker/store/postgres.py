"""The shared store: PostgreSQL through psycopg 3, for several broker processes.

Each process keeps a pool of connections (psycopg_pool; `extra["pool_size"]`,
default 8, grown on demand; `extra["pool_timeout"]`, default 10 s, bounds the
wait for one) in autocommit mode; a method's transaction is an explicit
`conn.transaction()` at READ COMMITTED, which locks the job row first
(`SELECT ... FOR UPDATE`) and is retried on a deadlock or serialization
failure (`_retry`: psycopg_pool has no such retry, and only the store knows
that its transactions are safe to run again).

Matching is one statement, atomic on its own, in the common case:

    WITH site AS (the site's admin state, the newest class id, and whether
                  the pilot id is bound to the calling agent certificate),
         best AS (the head of every fitting class -- a LATERAL join over the
                  class ids, each side an index probe of jobs_waiting --
                  ordered by priority, then age; the first; none at all
                  unless the pilot is bound to the caller),
         claimed AS (UPDATE jobs SET state = ASSIGNED, attempt = attempt + 1, ...
                     WHERE id = (SELECT id FROM jobs WHERE class_id = <best's class>
                                 AND state = WAITING ORDER BY priority DESC, id
                                 LIMIT 1 FOR UPDATE SKIP LOCKED)
                       AND state = WAITING RETURNING ...),
         history AS (INSERT INTO events ... FROM claimed),
         counted AS (INSERT INTO counters ... FROM claimed ON CONFLICT ...),
         seen AS (UPDATE the pilot's row, if bound to the caller, RETURNING 1)
    SELECT ...

A pilot id not yet bound (its first call) claims nothing: the binding is made
(or refused: PilotNotYours) in its own transaction and the match repeated, so
a call naming another certificate's pilot never claims a job.

Errors: psycopg's DataError (a number beyond BIGINT, a NUL in a text) is
BadValue; its OperationalError (the server is down, restarting, or the
connection broke) is StoreUnavailable, which the services answer with
UNAVAILABLE so that clients retry. Anything else is a bug and stays itself.

SKIP LOCKED makes concurrent matchers take the next job of a class instead
of waiting; the re-check `state = WAITING` under the row lock makes exactly
one of them win a job attempt. When every waiting job of the best class is
being claimed by others, the other classes are tried, best first (HEADS_SQL,
then CLAIM_SQL per class). When the newest class id is above what this
process caches, the cache is refreshed and the match repeated.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from psycopg import errors as pgerrors

from broker.store.base import Assignment, BadValue, PilotRef, SlotOffer, StoreError, StoreSettings, StoreUnavailable
from broker.store.schema import ALIVE_STATES, ASSIGNED, POSTGRES, SCHEMA_VERSION, WAITING, ddl, from_ms, to_ms
from broker.store.sql import CLAIM_SET, JOB_COLUMNS, JOB_INSERT_COLUMNS, SqlStore, matched_detail
from splitpilot.job.v1 import job_pb2

T = TypeVar("T")

#: Advisory lock keys (arbitrary, fixed): schema creation, class creation.
_LOCK_SCHEMA = 0x5350_0001
_LOCK_CLASSES = 0x5350_0002
_LOCK_COLLECTOR = 0x5350_0003
_COUNTER_SHARDS = 8
_RETRIES = 8
#: What every connection of the store is opened with.
_CONNECT: dict[str, Any] = {"autocommit": True, "application_name": "splitpilot-broker"}


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """Driver errors a caller's value or the database's absence caused, as the store's own errors."""
    try:
        yield
    except psycopg.DataError as exc:
        raise BadValue(str(exc).strip()) from None
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(f"PostgreSQL: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}"
                               ) from exc


def _named(sql: str, names: Sequence[str]) -> str:
    """Replace the `?` placeholders of SQL, in order, by %(name)s."""
    parts = sql.split("?")
    assert len(parts) == len(names) + 1, sql
    return parts[0] + "".join(f"%({name})s{part}" for name, part in zip(names, parts[1:], strict=True))


#: The best head of each fitting class (each an index probe of jobs_waiting), best first.
_HEADS = (
    "SELECT head.class_id, head.priority, head.id FROM unnest(%(classes)s::bigint[]) AS c(class_id) "
    "CROSS JOIN LATERAL (SELECT j.class_id, j.priority, j.id FROM jobs j "
    f"WHERE j.class_id = c.class_id AND j.state = {WAITING} ORDER BY j.priority DESC, j.id LIMIT 1) AS head")
HEADS_SQL = _HEADS + " ORDER BY head.priority DESC, head.id"


#: The pilot row bound to the calling certificate (broker.store.sql.PILOT_BOUND).
_BOUND = ("pilot_id = %(pilot)s AND cert_serial = %(serial)s AND subject = %(subject)s "
          "AND site = %(pilot_site)s")


def _claim(class_expression: str) -> str:
    """CTEs that claim the best unlocked waiting job of one class, record it, count it and touch the pilot."""
    return (
        f"claimed AS (UPDATE jobs SET {_named(CLAIM_SET, ('now', 'now', 'site', 'node', 'pilot'))} "
        f"  WHERE id = (SELECT id FROM jobs WHERE class_id = {class_expression} AND state = {WAITING} "
        "               ORDER BY priority DESC, id LIMIT 1 FOR UPDATE SKIP LOCKED) "
        f"    AND state = {WAITING} RETURNING id, attempt, owner, spec, submitted), "
        "history AS (INSERT INTO events (job_id, time, state, attempt, detail) "
        f"  SELECT id, %(now)s, {ASSIGNED}, attempt, %(detail)s FROM claimed), "
        "counted AS (INSERT INTO counters (name, shard, value) SELECT 'matches_total', %(shard)s, 1 FROM claimed "
        "  ON CONFLICT (name, shard) DO UPDATE SET value = counters.value + 1), "
        "seen AS (UPDATE pilots SET last_seen = %(now)s, "
        "  jobs_matched = jobs_matched + (SELECT count(*) FROM claimed), node = coalesce(nullif(%(node)s, ''), node) "
        f"  WHERE {_BOUND} RETURNING 1) ")


#: The whole match in one round trip: the site's state, the newest class id (is
#: the cache current?), whether the pilot id is bound to the calling certificate
#: (if not, nothing is claimed: `best` is empty), the best head among the
#: fitting classes, and its claim.
MATCH_SQL = (
    "WITH site AS (SELECT coalesce((SELECT state FROM sites WHERE name = %(site)s), 'enabled') AS state, "
    "                     (SELECT max(id) FROM classes) AS newest, "
    f"                    EXISTS (SELECT 1 FROM pilots WHERE {_BOUND}) AS bound), "
    f"best AS ({_HEADS} WHERE (SELECT state FROM site) = 'enabled' AND (SELECT bound FROM site) "
    "         ORDER BY head.priority DESC, head.id LIMIT 1), "
    + _claim("(SELECT class_id FROM best)") +
    "SELECT site.state, site.newest, site.bound, (SELECT count(*) FROM best), "
    "       claimed.id, claimed.attempt, claimed.owner, claimed.spec, claimed.submitted "
    "FROM site LEFT JOIN claimed ON true")

#: Claim from one given class (after MATCH_SQL lost its best class to concurrent matchers).
CLAIM_SQL = (
    "WITH " + _claim("%(class_id)s") +
    "SELECT (SELECT count(*) FROM seen), claimed.id, claimed.attempt, claimed.owner, claimed.spec, "
    "       claimed.submitted "
    "FROM (SELECT 1) AS one LEFT JOIN claimed ON true")

_PLACEHOLDERS: dict[str, str] = {}


def _pg(sql: str) -> str:
    """The shared `?` placeholders as psycopg's `%s` (the shared SQL has no other `?` or `%`)."""
    converted = _PLACEHOLDERS.get(sql)
    if converted is None:
        converted = _PLACEHOLDERS[sql] = sql.replace("?", "%s")
    return converted


class _Cursor:
    """The Cursor protocol of broker.store.sql on a psycopg connection."""

    __slots__ = ("conn",)

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self.conn.execute(_pg(sql), params).fetchall()

    def row(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        return self.conn.execute(_pg(sql), params).fetchone()

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.conn.execute(_pg(sql), params).rowcount

    def many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        with self.conn.cursor() as cursor:
            cursor.executemany(_pg(sql), params)


class _Pool:
    """psycopg_pool's ConnectionPool (autocommit connections, at most SIZE, grown on demand), with what
    the broker adds: a first connection made directly, so that a wrong URL or an absent server fails
    the start at once with the driver's words (the pool itself would retry in the background and time
    out without them); a refusal after fork (a child must not share the parent's sockets); and the
    pool's own errors as the store's (closed: StoreError; no connection in time: StoreUnavailable
    naming whether the server is gone or every connection busy)."""

    def __init__(self, url: str, size: int, timeout: float) -> None:
        self.url, self.size, self.timeout = url, size, timeout
        self._pid = os.getpid()
        with _translated():
            psycopg.connect(url, **_CONNECT).close()
        self._pool = psycopg_pool.ConnectionPool(url, kwargs=_CONNECT, min_size=1, max_size=size, timeout=timeout,
                                                 name="splitpilot-broker", open=False)
        self._pool.open()

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        if os.getpid() != self._pid:
            raise StoreError("this store was opened in a parent process; fix: open the store again after fork")
        try:
            conn = self._pool.getconn()
        except psycopg_pool.PoolClosed:
            raise StoreError("the store is closed") from None
        except psycopg_pool.PoolTimeout:
            raise self._no_connection() from None
        try:
            yield conn
        finally:
            # The pool rolls back a transaction left open and drops a broken connection (making a new
            # one in the background).
            self._pool.putconn(conn)

    def _no_connection(self) -> StoreUnavailable:
        """Why no connection came within the timeout: the driver's words if the server cannot be reached."""
        try:
            psycopg.connect(self.url, connect_timeout=max(2, int(self.timeout)), **_CONNECT).close()
        except psycopg.OperationalError as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            return StoreUnavailable(f"PostgreSQL: {detail}")
        return StoreUnavailable(f"PostgreSQL: all {self.size} connections of this broker stayed busy for "
                                f"{self.timeout:g}s (raise the store's pool_size if this persists)")

    def close(self) -> None:
        self._pool.close()


class PostgresStore(SqlStore):
    """JobStore in a PostgreSQL database (URL postgresql://...)."""

    FOR_UPDATE = " FOR UPDATE"
    FOR_UPDATE_SKIP = " FOR UPDATE SKIP LOCKED"
    FOR_SHARE = " FOR SHARE"
    SHARED = True

    def __init__(self, url: str, settings: StoreSettings | None = None) -> None:
        super().__init__(settings or StoreSettings())
        self.url = url
        self._thread = threading.local()
        self._pool = _Pool(url, int(self.settings.extra.get("pool_size", 8)),
                           float(self.settings.extra.get("pool_timeout", 10.0)))
        try:
            self._write(self._create_schema)
            self._job_sequence = self._read(lambda cur: cur.row(
                "SELECT pg_get_serial_sequence('jobs', 'id')"))[0]
            self._read(self._refresh_classes)
        except BaseException:
            self._pool.close()
            raise

    # ----------------------------------------------------------- connections
    def _write(self, fn: Callable[[_Cursor], T]) -> T:
        joined = getattr(self._thread, "cursor", None)
        if joined is not None:  # inside transaction(): part of it (retried with it as a whole)
            return fn(joined)
        with _translated(), self._pool.connection() as conn:
            return self._transact(conn, fn)

    def transaction(self, fn: Callable[[_Cursor], T]) -> T:
        """FN(cursor) in one transaction that the store's methods FN calls on this thread join (their
        writes commit or roll back with FN's); retried as a whole after a deadlock."""
        if getattr(self._thread, "cursor", None) is not None:
            return fn(self._thread.cursor)

        def joined(cur: _Cursor) -> T:
            self._thread.cursor = cur
            try:
                return fn(cur)
            finally:
                self._thread.cursor = None
        with _translated(), self._pool.connection() as conn:
            return self._transact(conn, joined)

    def content_chunk(self, sha256: str, seq: int) -> tuple[bytes, bytes] | None:
        # Binary results: a 1 MiB bytea comes as its bytes, not as 2 MiB of hex text to decode.
        with _translated(), self._pool.connection() as conn:
            row = conn.execute("SELECT digest, data FROM chunks WHERE sha256 = %s AND seq = %s", (sha256, seq),
                               binary=True).fetchone()
        return None if row is None else (bytes(row[0]), bytes(row[1]))

    def _try_collector_lock(self, cur) -> bool:
        # Held to the commit: one broker collects (contents, history) at a time; the others skip the pass.
        return bool(cur.row("SELECT pg_try_advisory_xact_lock(?)", (_LOCK_COLLECTOR,))[0])

    def _transact(self, conn: psycopg.Connection, fn: Callable[[_Cursor], T]) -> T:
        """FN in a transaction on CONN, retried after a deadlock or serialization failure."""
        def once() -> T:
            with conn.transaction():
                return fn(_Cursor(conn))
        return self._retry(once)

    def _read(self, fn: Callable[[_Cursor], T], snapshot: bool = False) -> T:
        with _translated(), self._pool.connection() as conn:
            if not snapshot:
                return fn(_Cursor(conn))
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                result = fn(_Cursor(conn))
            except BaseException:
                if not conn.broken:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

    def _shard(self) -> int:
        """This thread's counter shard: fixed per thread, so that a transaction touches one shard per
        counter (no lock-order cycles between shards) and threads rarely share one."""
        shard = getattr(self._thread, "shard", None)
        if shard is None:
            shard = self._thread.shard = random.randrange(_COUNTER_SHARDS)
        return shard

    def close(self) -> None:
        self._pool.close()

    # ---------------------------------------------------------------- schema
    def _create_schema(self, cur: _Cursor) -> None:
        cur.run("SELECT pg_advisory_xact_lock(?)", (_LOCK_SCHEMA,))  # brokers starting (or migrating) together
        for statement in ddl(POSTGRES):
            cur.run(statement)
        # Sandbox content is mostly compressed already: stored as is, no compression attempt per chunk.
        cur.run("ALTER TABLE chunks ALTER COLUMN data SET STORAGE EXTERNAL")
        cur.run("INSERT INTO meta (key, value) VALUES ('schema_version', ?) ON CONFLICT (key) DO NOTHING",
                (SCHEMA_VERSION,))
        self._migrate(cur)

    def _lock_classes(self, cur: _Cursor) -> None:
        # Held to the commit: class ids become visible in increasing order, which
        # lets every process's cache fetch just the ids above the highest it has.
        cur.run("SELECT pg_advisory_xact_lock(?)", (_LOCK_CLASSES,))

    def _insert_jobs(self, cur: _Cursor, rows: list[list], events_detail: str, now_ms: int) -> list[int]:
        ids = sorted(row[0] for row in cur.rows(
            "SELECT nextval(?::regclass) FROM generate_series(1, ?)", (self._job_sequence, len(rows))))
        with cur.conn.cursor() as cursor:
            with cursor.copy(f"COPY jobs ({JOB_INSERT_COLUMNS}) FROM STDIN") as copy:
                for job_id, row in zip(ids, rows, strict=True):
                    copy.write_row((job_id, *row))
            with cursor.copy("COPY events (job_id, time, state, attempt, detail) FROM STDIN") as copy:
                for job_id in ids:
                    copy.write_row((job_id, now_ms, WAITING, 0, events_detail))
        return ids

    # -------------------------------------------------------------- matching
    def match(self, slot: SlotOffer, pilot: PilotRef, now: datetime.datetime) -> Assignment | None:
        with _translated():
            return self._match(slot, pilot, now)

    def _match(self, slot: SlotOffer, pilot: PilotRef, now: datetime.datetime) -> Assignment | None:
        ms = to_ms(now)
        params = {"site": slot.site, "now": ms, "node": pilot.node, "pilot": pilot.pilot_id,
                  "pilot_site": pilot.site, "serial": pilot.serial, "subject": pilot.subject,
                  "shard": self._shard(), "detail": matched_detail(slot, pilot)}
        with self._pool.connection() as conn:
            for _ in range(3):
                params["classes"] = list(self._classes.fitting(slot))
                site_state, newest, bound, heads, job_id, attempt, owner, blob, submitted = self._retry(
                    lambda: conn.execute(MATCH_SQL, params).fetchone())
                if not bound:
                    # First contact (or another certificate's pilot id): nothing was claimed. Bind the
                    # id to this certificate, or refuse with PilotNotYours, then match again.
                    self._transact(conn, lambda cur: self._touch_pilot(cur, pilot, ms, 0))
                    continue
                stale_cache = newest is not None and newest > self._classes.max_id
                if stale_cache:
                    self._refresh_classes(_Cursor(conn))
                if job_id is not None or not stale_cache or site_state != "enabled":
                    break
            if job_id is None and heads and bound:
                # The best class's waiting jobs were all being claimed: try the others, best first.
                for class_id, _, _ in conn.execute(HEADS_SQL, params).fetchall():
                    params["class_id"] = class_id
                    _seen, job_id, attempt, owner, blob, submitted = self._retry(
                        lambda: conn.execute(CLAIM_SQL, params).fetchone())
                    if job_id is not None:
                        break
        if job_id is None:
            return None
        spec = job_pb2.JobSpec()
        spec.ParseFromString(blob)
        return Assignment(job_id=job_id, attempt=attempt, spec=spec, owner=owner, submitted=from_ms(submitted))

    @staticmethod
    def _retry(fn: Callable[[], T]) -> T:
        for attempt in range(_RETRIES):
            try:
                return fn()
            except (pgerrors.DeadlockDetected, pgerrors.SerializationFailure):
                if attempt == _RETRIES - 1:
                    raise
                time.sleep(random.uniform(0.001, 0.01) * (attempt + 1))
        raise AssertionError("unreachable")

    # ---------------------------------------------------------- diagnostics
    PLANNED_QUERIES = {
        "match": (MATCH_SQL, {"site": "", "classes": [1, 2, 3], "now": 0, "node": "", "pilot": "",
                              "pilot_site": "", "serial": "", "subject": "", "shard": 0, "detail": ""}),
        "class heads": (HEADS_SQL, {"classes": [1, 2, 3]}),
        "claim": (CLAIM_SQL, {"class_id": 1, "now": 0, "node": "", "pilot": "", "site": "", "pilot_site": "",
                              "serial": "", "subject": "", "shard": 0, "detail": ""}),
        "lost heartbeats": (f"SELECT id, attempt FROM jobs WHERE state IN {ALIVE_STATES} AND heartbeat < %s",
                            (0,)),
        "never started": (f"SELECT id, attempt FROM jobs WHERE state = {ASSIGNED} AND updated < %s", (0,)),
        "queue timeout": (f"SELECT id, attempt FROM jobs WHERE state = {WAITING} AND updated < %s", (0,)),
        "owner's jobs": (f"SELECT {JOB_COLUMNS} FROM jobs WHERE owner = %s ORDER BY id DESC LIMIT 10", ("x",)),
        "history": ("SELECT time, state, attempt, detail FROM events WHERE job_id = %s ORDER BY id", (1,)),
        "batch's jobs": (f"SELECT {JOB_COLUMNS} FROM jobs WHERE batch = %s ORDER BY id DESC LIMIT 10", ("b",)),
        "owner's batches": ("SELECT id, created FROM batches WHERE owner = %s ORDER BY seq DESC LIMIT 10", ("x",)),
    }

    def plans(self) -> dict[str, str]:
        """EXPLAIN of the queries that must use an index, one text per query."""
        result = {}
        with self._pool.connection() as conn:
            for name, (sql, params) in self.PLANNED_QUERIES.items():
                result[name] = "\n".join(row[0] for row in conn.execute("EXPLAIN " + sql, params).fetchall())
        return result
