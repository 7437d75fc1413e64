"""The embedded store: one SQLite file in WAL mode, nothing to install.

Locking (`StoreSettings.extra["sqlite_locking"]`):
  "lock" (default): one writer connection per process behind a
      threading.Lock; every write is `BEGIN IMMEDIATE ... COMMIT` on it, so
      threads of one process never meet SQLite's busy handler (which sleeps
      in steps of milliseconds). Reads use one connection per thread and
      run beside the writer (WAL).
  "immediate": every thread has its own connection and writes with
      BEGIN IMMEDIATE; contention is left to SQLite's busy timeout.
  Measured (match + update + heartbeat, 60k queued, 2 cores): equal within
  noise at 1-8 threads (GIL-bound); at 16 threads "lock" does ~28% more
  (2,560/s against 1,990/s): waiters wake when the lock is free instead of
  sleeping in the busy handler's 1-100 ms steps. bench/store_match.py
  --sqlite-locking chooses for the benchmark.
Several processes may open one file (the busy timeout then orders them),
which tests do; a broker normally owns its file alone.

Errors: a number SQLite cannot hold (beyond 64 bits) is BadValue; a database
locked beyond the busy timeout, full, or unreadable is StoreUnavailable (the
services answer UNAVAILABLE: retry). Anything else is a bug and stays itself.

Crash safety: every method is one transaction. In WAL mode a commit is in
the log before COMMIT returns, so a SIGKILL loses nothing committed
(synchronous=NORMAL only risks the last commits on a power cut) and an
interrupted transaction is rolled back when the file is next opened.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from broker.store.base import Assignment, BadValue, PilotRef, SlotOffer, StoreError, StoreSettings, StoreUnavailable
from broker.store.schema import ALIVE_STATES, ASSIGNED, SCHEMA_VERSION, SQLITE, WAITING, ddl, from_ms, to_ms
from broker.store.sql import (
    CLAIM_SET,
    EVENT_INSERT,
    HEAD_SQL,
    JOB_COLUMNS,
    JOB_INSERT_COLUMNS,
    JOB_INSERT_COUNT,
    SqlStore,
    matched_detail,
)
from pilot.api.states import JobState
from splitpilot.job.v1 import job_pb2

T = TypeVar("T")
BUSY_TIMEOUT_S = 60.0
_UNION_MAX = 200  # classes per statement (SQLite allows 500 terms in a compound SELECT)
#: sqlite3.OperationalError texts that mean "not now" (retry), not a bug in a statement.
_UNAVAILABLE = ("locked", "busy", "disk", "full", "unable to open", "readonly", "i/o")


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """Driver errors a caller's value or the machine caused, as the store's own errors."""
    try:
        yield
    except OverflowError as exc:  # "Python int too large to convert to SQLite INTEGER"
        raise BadValue(str(exc)) from None
    except sqlite3.DataError as exc:
        raise BadValue(str(exc)) from None
    except sqlite3.OperationalError as exc:
        if any(word in str(exc).lower() for word in _UNAVAILABLE):
            raise StoreUnavailable(f"SQLite: {exc}") from exc
        raise


@functools.lru_cache(maxsize=256)
def heads_sql(count: int) -> str:
    """The best head among COUNT classes: one index probe of jobs_waiting per class, in one statement
    (a third of the time of COUNT separate statements)."""
    return (" UNION ALL ".join([f"SELECT * FROM ({HEAD_SQL})"] * count)
            + " ORDER BY 1 DESC, 2 LIMIT 1")


class _Cursor:
    """The Cursor protocol of broker.store.sql on a sqlite3 connection."""

    __slots__ = ("conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self.conn.execute(sql, params).fetchall()

    def row(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        found = self.conn.execute(sql, params).fetchall()  # to the end: RETURNING statements must finish
        return found[0] if found else None

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.conn.execute(sql, params).rowcount

    def many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        self.conn.executemany(sql, params)


class SqliteStore(SqlStore):
    """JobStore in one SQLite file."""

    def __init__(self, path: str, settings: StoreSettings | None = None) -> None:
        super().__init__(settings or StoreSettings())
        self.path = os.path.abspath(path)
        self.locking = self.settings.extra.get("sqlite_locking", "lock")
        if self.locking not in ("lock", "immediate"):
            raise ValueError(f"sqlite_locking must be 'lock' or 'immediate', not {self.locking!r}")
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise StoreError(f"no directory {directory} for the store file {self.path}; fix: create it")
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self._writer = self._connect() if self.locking == "lock" else None
        self._write(self._create_schema)
        self._read(self._refresh_classes)

    # ----------------------------------------------------------- connections
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                               check_same_thread=False, cached_statements=256)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA cache_size = -65536")  # 64 MiB
        conn.execute("PRAGMA temp_store = MEMORY")
        with self._all_lock:
            self._all.append(conn)
        return conn

    def _check_process(self) -> None:
        if os.getpid() != self._pid:  # SQLite connections must not cross a fork
            raise StoreError("this store was opened in a parent process; fix: open the store again after fork")

    def _thread_connection(self) -> sqlite3.Connection:
        self._check_process()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise StoreError("the store is closed")
            conn = self._local.conn = self._connect()
        return conn

    @staticmethod
    def _transaction(conn: sqlite3.Connection, begin: str, fn: Callable[[_Cursor], T]) -> T:
        conn.execute(begin)
        try:
            result = fn(_Cursor(conn))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    def _write(self, fn: Callable[[_Cursor], T]) -> T:
        with _translated():
            if self._writer is None:
                return self._transaction(self._thread_connection(), "BEGIN IMMEDIATE", fn)
            self._check_process()
            with self._write_lock:
                if self._closed:
                    raise StoreError("the store is closed")
                return self._transaction(self._writer, "BEGIN IMMEDIATE", fn)

    def _read(self, fn: Callable[[_Cursor], T], snapshot: bool = False) -> T:
        with _translated():
            conn = self._thread_connection()
            return self._transaction(conn, "BEGIN", fn) if snapshot else fn(_Cursor(conn))

    def close(self) -> None:
        with self._write_lock:
            self._closed = True
            with self._all_lock:
                connections, self._all = self._all, []
            for conn in connections:
                conn.close()

    # ---------------------------------------------------------------- schema
    def _create_schema(self, cur: _Cursor) -> None:
        for statement in ddl(SQLITE):
            cur.run(statement)
        cur.run("INSERT INTO meta (key, value) VALUES ('schema_version', ?) ON CONFLICT (key) DO NOTHING",
                (SCHEMA_VERSION,))
        cur.run("INSERT INTO meta (key, value) VALUES ('last_job_id', 0) ON CONFLICT (key) DO NOTHING")
        self._migrate(cur)

    def _insert_jobs(self, cur: _Cursor, rows: list[list], events_detail: str, now_ms: int) -> list[int]:
        count = len(rows)
        last = cur.row("UPDATE meta SET value = value + ? WHERE key = 'last_job_id' RETURNING value", (count,))[0]
        ids = list(range(last - count + 1, last + 1))
        cur.many(f"INSERT INTO jobs ({JOB_INSERT_COLUMNS}) VALUES ({', '.join('?' * JOB_INSERT_COUNT)})",
                 [(job_id, *row) for job_id, row in zip(ids, rows, strict=True)])
        cur.many(EVENT_INSERT, [(job_id, now_ms, WAITING, 0, events_detail) for job_id in ids])
        return ids

    # -------------------------------------------------------------- matching
    def match(self, slot: SlotOffer, pilot: PilotRef, now: datetime.datetime) -> Assignment | None:
        ms = to_ms(now)

        def body(cur: _Cursor) -> Assignment | None:
            # First: a pilot id bound to another certificate is refused before anything is claimed.
            self._touch_pilot(cur, pilot, ms, 0)
            if self._site_state(cur, slot.site) != "enabled":
                return None
            self._refresh_classes(cur)
            fitting, best = self._classes.fitting(slot), None
            for begin in range(0, len(fitting), _UNION_MAX):
                chunk = fitting[begin:begin + _UNION_MAX]
                head = cur.row(heads_sql(len(chunk)), chunk)
                if head is not None and (best is None or head[0] > best[0]
                                         or (head[0] == best[0] and head[1] < best[1])):
                    best = head
            if best is None:
                return None
            job_id = best[1]
            attempt, owner, blob, submitted = cur.row(
                f"UPDATE jobs SET {CLAIM_SET} WHERE id = ? AND state = {WAITING} "
                "RETURNING attempt, owner, spec, submitted",
                (ms, ms, slot.site, pilot.node, pilot.pilot_id, job_id))
            self._event(cur, job_id, ms, JobState.ASSIGNED, attempt,
                        matched_detail(slot, pilot))
            self._bump(cur, "matches_total")
            cur.run("UPDATE pilots SET jobs_matched = jobs_matched + 1 WHERE pilot_id = ?", (pilot.pilot_id,))
            spec = job_pb2.JobSpec()
            spec.ParseFromString(blob)
            return Assignment(job_id=job_id, attempt=attempt, spec=spec, owner=owner, submitted=from_ms(submitted))
        return self._write(body)

    # ---------------------------------------------------------- diagnostics
    PLANNED_QUERIES = {
        "class head": (HEAD_SQL, (1,)),
        "class heads": (heads_sql(3), (1, 2, 3)),
        "claim": (f"UPDATE jobs SET {CLAIM_SET} WHERE id = ? AND state = {WAITING} RETURNING attempt",
                  (0, 0, "", "", "", 1)),
        "lost heartbeats": (f"SELECT id, attempt FROM jobs WHERE state IN {ALIVE_STATES} AND heartbeat < ?",
                            (0,)),
        "never started": (f"SELECT id, attempt FROM jobs WHERE state = {ASSIGNED} AND updated < ?", (0,)),
        "queue timeout": (f"SELECT id, attempt FROM jobs WHERE state = {WAITING} AND updated < ?", (0,)),
        "owner's jobs": (f"SELECT {JOB_COLUMNS} FROM jobs WHERE owner = ? ORDER BY id DESC LIMIT 10", ("x",)),
        "history": ("SELECT time, state, attempt, detail FROM events WHERE job_id = ? ORDER BY id", (1,)),
        "batch's jobs": (f"SELECT {JOB_COLUMNS} FROM jobs WHERE batch = ? ORDER BY id DESC LIMIT 10", ("b",)),
        "owner's batches": ("SELECT id, created FROM batches WHERE owner = ? ORDER BY seq DESC LIMIT 10", ("x",)),
    }

    def plans(self) -> dict[str, str]:
        """EXPLAIN QUERY PLAN of the queries that must use an index, one text per query."""
        return {name: "\n".join(row[-1] for row in self._read(lambda cur, s=sql, p=params: cur.rows(
                    "EXPLAIN QUERY PLAN " + s, p)))
                for name, (sql, params) in self.PLANNED_QUERIES.items()}

    def integrity_check(self) -> str:
        return "\n".join(row[0] for row in self._read(lambda cur: cur.rows("PRAGMA integrity_check")))

