"""A database of schema version 1 (the first release), made the way that broker made it, for the
migration tests: its CREATE statements are frozen here (copied from broker/store/schema.py at version 1)."""

from __future__ import annotations

import sqlite3

from broker.store.classes import CLASS_INSERT_COLUMNS, RequirementClass
from broker.store.schema import ALIVE_STATES, POSTGRES, SQLITE, WAITING, Dialect
from pilot.api.states import JobState
from splitpilot.job.v1 import job_pb2

V1_DDL = """
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
    spec {blob} NOT NULL
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
    ended BIGINT
);
CREATE INDEX IF NOT EXISTS pilots_last_seen ON pilots (last_seen);
CREATE TABLE IF NOT EXISTS sites (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    updated BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT NOT NULL,
    shard INTEGER NOT NULL,
    value BIGINT NOT NULL,
    PRIMARY KEY (name, shard)
);
"""


def v1_statements(dialect: Dialect) -> list[str]:
    text = V1_DDL.format(id_column=dialect.id_column, blob=dialect.blob, waiting=WAITING, alive=ALIVE_STATES)
    return [statement.strip() for statement in text.split(";") if statement.strip()]


def fill_v1(execute, input_sha256: str, output_sha256: str) -> None:
    """A version-1 store's rows: alice's waiting job 1 (an input), her finished job 2 (an output), a pilot."""
    execute("INSERT INTO meta (key, value) VALUES ('schema_version', 1)")
    execute("INSERT INTO meta (key, value) VALUES ('last_job_id', 2)")
    requirement = RequirementClass.of(job_pb2.Requirements())
    execute(f"INSERT INTO classes (id, {CLASS_INSERT_COLUMNS}) VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
            requirement.row())
    waiting = job_pb2.JobSpec(executable="run.sh", owner="alice", max_attempts=3,
                              input_files=[job_pb2.InputFile(name="in.dat", size=5, sha256=input_sha256)])
    done = job_pb2.JobSpec(executable="run.sh", owner="alice", max_attempts=3)
    for job_id, state, spec in ((1, WAITING, waiting), (2, int(JobState.DONE), done)):
        execute("INSERT INTO jobs (id, class_id, owner, priority, state, attempt, charged, max_attempts, fenced, seq, "
                "kill_requested, submitted, updated, heartbeat, site, node, pilot_id, exit_code, message, spec) "
                "VALUES (?, 1, 'alice', 0, ?, ?, 0, 3, ?, 0, 0, 0, 0, 0, '', '', '', NULL, '', ?)",
                (job_id, state, 0 if state == WAITING else 1, 0 if state == WAITING else 1, spec.SerializeToString()))
    execute("INSERT INTO outputs (job_id, attempt, name, size, sha256, time) VALUES (2, 1, 'out.txt', 7, ?, 0)",
            (output_sha256,))
    execute("INSERT INTO pilots (pilot_id, site, node, subject, first_seen, last_seen, jobs_matched, jobs_run, "
            "end_reason, ended) VALUES ('pilot-old', 'SITE-A', 'node-1', 'glidein-a', 0, 0, 1, 1, '', NULL)")


def make_sqlite_v1(path: str, input_sha256: str, output_sha256: str) -> None:
    conn = sqlite3.connect(path)
    try:
        for statement in v1_statements(SQLITE):
            conn.execute(statement)
        fill_v1(conn.execute, input_sha256, output_sha256)
        conn.commit()
    finally:
        conn.close()


def make_postgres_v1(url: str, input_sha256: str, output_sha256: str) -> None:
    import psycopg
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in v1_statements(POSTGRES):
            conn.execute(statement)
        fill_v1(lambda sql, params=(): conn.execute(sql.replace("?", "%s"), params), input_sha256, output_sha256)
        for table, last in (("jobs", 2), ("classes", 1)):  # as if the ids had come from the sequences
            conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {last})")


#: A database of schema version 4 (before batches): version 1's tables with the columns versions 2 to 4
#: added (frozen copies of those migrations); the tables those versions added come from the store's own
#: CREATE statements when it opens it, as they did then.
V4_ALTERS = (
    "ALTER TABLE pilots ADD COLUMN cert_serial TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE pilots ADD COLUMN cert_not_after BIGINT NOT NULL DEFAULT 0",
    "ALTER TABLE jobs ADD COLUMN usage_cpu_ms BIGINT NOT NULL DEFAULT 0",
    "ALTER TABLE jobs ADD COLUMN usage_rss BIGINT NOT NULL DEFAULT 0",
    "ALTER TABLE jobs ADD COLUMN usage_time BIGINT NOT NULL DEFAULT 0",
)


def make_sqlite_v4(path: str, input_sha256: str, output_sha256: str) -> None:
    conn = sqlite3.connect(path)
    try:
        for statement in (*v1_statements(SQLITE), *V4_ALTERS):
            conn.execute(statement)
        fill_v1(conn.execute, input_sha256, output_sha256)
        conn.execute("UPDATE meta SET value = 4 WHERE key = 'schema_version'")
        conn.commit()
    finally:
        conn.close()


def make_postgres_v4(url: str, input_sha256: str, output_sha256: str) -> None:
    import psycopg
    make_postgres_v1(url, input_sha256, output_sha256)
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in V4_ALTERS:
            conn.execute(statement)
        conn.execute("UPDATE meta SET value = 4 WHERE key = 'schema_version'")


#: A database of schema version 5 (before the shared content store): version 4 plus the batch column and the
#: tables of versions 2 to 5 that the test rows use (frozen copies), with alice owning her input and output.
V5_STATEMENTS = (
    "ALTER TABLE jobs ADD COLUMN batch TEXT",
    "CREATE TABLE IF NOT EXISTS file_owners (owner TEXT NOT NULL, sha256 TEXT NOT NULL, size BIGINT NOT NULL, "
    "time BIGINT NOT NULL, PRIMARY KEY (owner, sha256))",
)


def _fill_v5(execute, input_sha256: str, output_sha256: str) -> None:
    execute("INSERT INTO file_owners (owner, sha256, size, time) VALUES ('alice', ?, 5, 0)", (input_sha256,))
    execute("INSERT INTO file_owners (owner, sha256, size, time) VALUES ('alice', ?, 7, 0)", (output_sha256,))
    execute("UPDATE meta SET value = 5 WHERE key = 'schema_version'")


def make_sqlite_v5(path: str, input_sha256: str, output_sha256: str) -> None:
    make_sqlite_v4(path, input_sha256, output_sha256)
    conn = sqlite3.connect(path)
    try:
        for statement in V5_STATEMENTS:
            conn.execute(statement)
        _fill_v5(conn.execute, input_sha256, output_sha256)
        conn.commit()
    finally:
        conn.close()


def make_postgres_v5(url: str, input_sha256: str, output_sha256: str) -> None:
    import psycopg
    make_postgres_v4(url, input_sha256, output_sha256)
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in V5_STATEMENTS:
            conn.execute(statement)
        _fill_v5(lambda sql, params=(): conn.execute(sql.replace("?", "%s"), params), input_sha256, output_sha256)
