"""The tables and indexes of both SQL stores, and how times are stored.

One schema, written once, rendered for SQLite or PostgreSQL (they differ in
the id column, the blob type and little else). Times are integer
milliseconds since the Unix epoch; the API takes and returns aware UTC
datetimes (`to_ms`, `from_ms`).

The tables:
  classes   one row per requirement class (identical cores, memory, disk,
            walltime, platform, container image and site lists); never
            deleted, so a process may cache them and fetch only new ids.
  jobs      one row per job: the current (or last) attempt, its fencing and
            sequence state, and the JobSpec as protobuf bytes.
  events    the history: one row per state change of every attempt.
  outputs   files uploaded, per attempt.
  reservations  bytes announced by output uploads in progress (header read,
            data not yet recorded): the per-job output limit counts them, so
            parallel uploads cannot overrun it.
  file_owners  who may use which content: (owner, sha256), written when a
            user uploads it and when a job of the owner takes it as an input.
  pilots    first/last contact, jobs matched, end reason, and the agent
            certificate (serial, subject, site, not_after) the pilot id is
            bound to by its first call.
  sites     admin states ('enabled' when absent).
  revoked   token revocations (by serial, or by holder and role).
  tokens    non-job certificates some broker has verified (serial, role,
            subject, not_after): what RevokeToken by serial knows.
  site_offers  per site and time bucket (bucket 0: all time), the most its
            pilots' slots offered (cores, memory, disk, time left, container
            runtime, platforms): why a waiting job has not matched. Written
            every few seconds from each broker's memory, never by a match.
  counters  the metrics, split into shards so that concurrent PostgreSQL
            transactions rarely wait on the same row.
  batches   one row per submission (a batch): its public id, owner, creation time and label; jobs.batch
            names it (NULL for jobs queued before version 5).
  job_inputs  (job_id, sha256) of every input of every job (written with the jobs): which content
            a job not yet final still needs (garbage collection keeps it).
  contents  the database file store's content catalogue (sha256, size, created); its bytes are in
  chunks    (sha256, seq): at most 1 MiB each with the chunk's own SHA-256 (checked on every read).
            Both are empty with the local file store (content in the broker's state folder).
  meta      schema version and, for SQLite, the next job id.

The indexes exist for one query each (see `PLANNED_QUERIES` in the stores):
  jobs_waiting  (class_id, priority DESC, id) WHERE state = WAITING: the head
                of a class, the only index matching reads;
  jobs_state    (state, updated): start and queue timeouts, counts;
  jobs_alive    (state, heartbeat) WHERE state IN (STARTED, RUNNING, SAVING): lost
                heartbeats, an index as small as the running set;
  jobs_owner    (owner, id): a user's jobs, newest first;
  jobs_batch    (batch, id): a batch's jobs, newest first, and its counts (made after the
                migrations: AFTER_MIGRATIONS, since a version-4 table has no batch column yet);
  batches_owner (owner, seq): a user's batches, newest first;
  events_job    (job_id, id): a job's history in order;
  outputs_sha256, file_owners_sha256: is this content still referenced
                (before a replaced output's content is freed).

Versions: 1 (first release); 2 adds pilot binding (pilots.cert_serial,
cert_not_after), reservations, file_owners, revoked, tokens; 3 adds
site_offers; 4 adds the heartbeat's usage columns; 5 adds batches and jobs.batch;
6 adds job_inputs (filled from the specs of the jobs already queued), contents and chunks. `MIGRATIONS`
takes a database of an older version forward in place (new tables come from the CREATE statements).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from pilot.api.states import JobState

SCHEMA_VERSION = 6

UTC = datetime.UTC
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=UTC)
_MS = datetime.timedelta(milliseconds=1)

#: Literal state numbers for SQL text: partial indexes are only used when the
#: query repeats the index's predicate literally (never as a parameter).
WAITING = int(JobState.WAITING)
ASSIGNED = int(JobState.ASSIGNED)
ALIVE_STATES = f"({int(JobState.STARTED)}, {int(JobState.RUNNING)}, {int(JobState.SAVING)})"

SITE_STATES = ("enabled", "draining", "disabled")

#: Names of the counters `stats()` reports (always present, 0 by default).
COUNTERS = ("matches_total", "lost_attempts_total", "never_started_attempts_total",
            "pilots_seen", "empty_pilots_total")


def to_ms(when: datetime.datetime) -> int:
    """Milliseconds since the epoch of an aware datetime (naive ones are refused)."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"naive datetime {when!r}: the store takes aware UTC datetimes "
                         "(e.g. datetime.now(timezone.utc))")
    return (when - _EPOCH) // _MS


def from_ms(ms: int) -> datetime.datetime:
    return _EPOCH + datetime.timedelta(milliseconds=ms)


def duration_ms(delta: datetime.timedelta) -> int:
    return delta // _MS


@dataclass(frozen=True)
class Dialect:
    """What differs between the two databases in the DDL."""

    name: str
    id_column: str
    blob: str


SQLITE = Dialect("sqlite", "INTEGER PRIMARY KEY", "BLOB")
POSTGRES = Dialect("postgresql", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", "BYTEA")


_DDL = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS classes (
    id {id_column},
    key TEXT NOT NULL UNIQUE,
    cores INTEGER NOT NULL,
    memory_mb BIGINT NOT NULL,
    disk_mb BIGINT NOT NULL,
    walltime_s BIGINT NOT NULL,
    platform TEXT NOT NULL,
    container_image TEXT NOT NULL,
    sites_allowed TEXT NOT NULL,
    sites_denied TEXT NOT NULL,
    created BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id {id_column},
    class_id BIGINT NOT NULL,
    owner TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state SMALLINT NOT NULL,
    attempt INTEGER NOT NULL,
    charged INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    fenced SMALLINT NOT NULL,
    seq BIGINT NOT NULL,
    kill_requested SMALLINT NOT NULL,
    submitted BIGINT NOT NULL,
    updated BIGINT NOT NULL,
    heartbeat BIGINT NOT NULL,
    site TEXT NOT NULL,
    node TEXT NOT NULL,
    pilot_id TEXT NOT NULL,
    exit_code INTEGER,
    message TEXT NOT NULL,
    spec {blob} NOT NULL,
    usage_cpu_ms BIGINT NOT NULL DEFAULT 0,
    usage_rss BIGINT NOT NULL DEFAULT 0,
    usage_time BIGINT NOT NULL DEFAULT 0,
    batch TEXT
);
CREATE INDEX IF NOT EXISTS jobs_waiting ON jobs (class_id, priority DESC, id) WHERE state = {waiting};
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, updated);
CREATE INDEX IF NOT EXISTS jobs_alive ON jobs (state, heartbeat) WHERE state IN {alive};
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, id);
CREATE TABLE IF NOT EXISTS events (
    id {id_column},
    job_id BIGINT NOT NULL,
    time BIGINT NOT NULL,
    state SMALLINT NOT NULL,
    attempt INTEGER NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, id);
CREATE TABLE IF NOT EXISTS outputs (
    job_id BIGINT NOT NULL,
    attempt INTEGER NOT NULL,
    name TEXT NOT NULL,
    size BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    time BIGINT NOT NULL,
    PRIMARY KEY (job_id, attempt, name)
);
CREATE INDEX IF NOT EXISTS outputs_sha256 ON outputs (sha256);
CREATE TABLE IF NOT EXISTS reservations (
    id {id_column},
    job_id BIGINT NOT NULL,
    attempt INTEGER NOT NULL,
    name TEXT NOT NULL,
    size BIGINT NOT NULL,
    time BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_job ON reservations (job_id, attempt);
CREATE TABLE IF NOT EXISTS file_owners (
    owner TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    time BIGINT NOT NULL,
    PRIMARY KEY (owner, sha256)
);
CREATE INDEX IF NOT EXISTS file_owners_sha256 ON file_owners (sha256);
CREATE TABLE IF NOT EXISTS revoked (
    id {id_column},
    serial TEXT NOT NULL,
    subject TEXT NOT NULL,
    role TEXT NOT NULL,
    reason TEXT NOT NULL,
    revoked BIGINT NOT NULL,
    revoked_by TEXT NOT NULL,
    not_after BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    serial TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    subject TEXT NOT NULL,
    not_after BIGINT NOT NULL,
    first_seen BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS pilots (
    pilot_id TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    node TEXT NOT NULL,
    subject TEXT NOT NULL,
    first_seen BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    jobs_matched BIGINT NOT NULL,
    jobs_run BIGINT NOT NULL,
    end_reason TEXT NOT NULL,
    ended BIGINT,
    cert_serial TEXT NOT NULL DEFAULT '',
    cert_not_after BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS pilots_last_seen ON pilots (last_seen);
CREATE TABLE IF NOT EXISTS sites (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    updated BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS site_offers (
    site TEXT NOT NULL,
    bucket BIGINT NOT NULL,
    cores BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    disk_mb BIGINT NOT NULL,
    time_left_s BIGINT NOT NULL,
    containers SMALLINT NOT NULL,
    platforms TEXT NOT NULL,
    last_offer BIGINT NOT NULL,
    PRIMARY KEY (site, bucket)
);
CREATE TABLE IF NOT EXISTS batches (
    seq {id_column},
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    created BIGINT NOT NULL,
    label TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS batches_owner ON batches (owner, seq);
CREATE TABLE IF NOT EXISTS job_inputs (
    job_id BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (job_id, sha256)
);
CREATE INDEX IF NOT EXISTS job_inputs_sha256 ON job_inputs (sha256);
CREATE TABLE IF NOT EXISTS contents (
    sha256 TEXT PRIMARY KEY,
    size BIGINT NOT NULL,
    created BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS contents_created ON contents (created);
CREATE TABLE IF NOT EXISTS chunks (
    sha256 TEXT NOT NULL,
    seq INTEGER NOT NULL,
    digest {blob} NOT NULL,
    data {blob} NOT NULL,
    PRIMARY KEY (sha256, seq)
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT NOT NULL,
    shard INTEGER NOT NULL,
    value BIGINT NOT NULL,
    PRIMARY KEY (name, shard)
);
"""


def ddl(dialect: Dialect) -> list[str]:
    """The CREATE statements (idempotent) for DIALECT, one per list item."""
    text = _DDL.format(id_column=dialect.id_column, blob=dialect.blob, waiting=WAITING, alive=ALIVE_STATES)
    return [statement.strip() for statement in text.split(";") if statement.strip()]


#: Version 1 -> 2, run after the CREATE statements above (which add the new tables and indexes):
#: the pilot binding columns. Existing pilots stay unbound (cert_serial '') until their next call,
#: which binds them if it comes from an agent certificate of the same subject and site.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE pilots ADD COLUMN cert_serial TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE pilots ADD COLUMN cert_not_after BIGINT NOT NULL DEFAULT 0"),
    2: (),  # site_offers: a new table only
    # Version 3 -> 4: the payload's CPU time and memory from the current attempt's last heartbeat
    # (usage_time 0: none since the attempt began; `job status ID` of a running job shows them).
    3: ("ALTER TABLE jobs ADD COLUMN usage_cpu_ms BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN usage_rss BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN usage_time BIGINT NOT NULL DEFAULT 0"),
    # Version 4 -> 5: each submission is a batch (the batches table comes from the CREATE statements);
    # jobs queued before have none (NULL, shown as "-").
    4: ("ALTER TABLE jobs ADD COLUMN batch TEXT",),
    # Version 5 -> 6: job_inputs, contents, chunks are new tables; job_inputs is filled from the jobs'
    # specs by SqlStore._migrate (contents stay empty: the content of a version-5 broker is in its folder).
    5: (),
}

#: Run after the migrations (idempotent): indexes on columns a migration may just have added.
AFTER_MIGRATIONS: tuple[str, ...] = (
    "CREATE INDEX IF NOT EXISTS jobs_batch ON jobs (batch, id)",
)
