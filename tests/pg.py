"""A private PostgreSQL server for the tests (and bench/store_match.py).

`PostgresCluster` finds the server binaries (/usr/lib/postgresql/*/bin, the
highest version), runs `initdb` into a fresh temporary directory owned by
the `postgres` OS user (initdb refuses root, so as root it runs through
`runuser -u postgres --`), and starts the server on a free 127.0.0.1 port
with its socket in that directory, trust authentication and fsync=off
(tests only: durability is not what they check). A Debian cluster that apt
may have started (port 5432, /var/run/postgresql) is never touched: ours has
its own port, socket directory and data directory, and PG* environment
variables are dropped.

Nothing is left behind: `stop()` runs `pg_ctl stop -m fast` (then
`immediate`, then SIGKILL of the postmaster) and removes the directory; a
watchdog process does the same if the test run itself dies (it waits for
EOF on a pipe only this process holds).

Fixtures: `pg_server` (session scope) is the cluster; `pg_url` gives each
test an empty database: the tables of a previous test are truncated, which
is several times faster than CREATE DATABASE.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

INSTALL_HINT = ("PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin; "
                "`make test` installs the `postgresql` package (scripts/install-system-deps.sh), "
                "or run: apt-get install -y postgresql")
OS_USER = "postgres"
DATABASE = "splitpilot_test"

_WATCHDOG = r"""
import json, os, shutil, signal, subprocess, sys, time
spec = json.loads(sys.argv[1])
signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.stdin.buffer.read()            # EOF: the owner closed the pipe or died
if os.path.exists(os.path.join(spec["data"], "postmaster.pid")):
    subprocess.run(spec["stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
shutil.rmtree(spec["dir"], ignore_errors=True)
"""


class MissingPostgres(RuntimeError):
    pass


def find_bindir() -> str:
    """The bin directory of the highest PostgreSQL version installed."""
    candidates = [path for path in glob.glob("/usr/lib/postgresql/*/bin")
                  if os.access(os.path.join(path, "initdb"), os.X_OK)
                  and os.access(os.path.join(path, "pg_ctl"), os.X_OK)]
    if not candidates:
        raise MissingPostgres(INSTALL_HINT)

    def version(path: str) -> tuple[int, ...]:
        name = os.path.basename(os.path.dirname(path))
        return tuple(int(part) for part in re.findall(r"\d+", name)) or (0,)
    return max(candidates, key=version)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _clean_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


class PostgresCluster:
    """A throw-away PostgreSQL server; a context manager."""

    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.as_root = os.geteuid() == 0
        self.dir = ""
        self.port = 0
        self._options = ""
        self._watchdog: subprocess.Popen | None = None

    # paths
    @property
    def data(self) -> str:
        return os.path.join(self.dir, "data")

    @property
    def socket_dir(self) -> str:
        return os.path.join(self.dir, "sock")

    @property
    def log(self) -> str:
        return os.path.join(self.dir, "server.log")

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _command(self, tool: str, *args: str) -> list[str]:
        argv = [os.path.join(self.bindir, tool), *args]
        return ["runuser", "-u", OS_USER, "--", *argv] if self.as_root else argv

    def _run(self, tool: str, *args: str, timeout: float = 120) -> None:
        done = subprocess.run(self._command(tool, *args), env=_clean_env(), cwd=self.dir, timeout=timeout,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({done.returncode}):\n{done.stdout}"
                               + self._log_tail())

    def _log_tail(self) -> str:
        try:
            with open(self.log, errors="replace") as handle:
                return "\n--- server log ---\n" + handle.read()[-3000:]
        except OSError:
            return ""

    # life cycle
    def start(self) -> PostgresCluster:
        self.dir = tempfile.mkdtemp(prefix="splitpilot-pg-")
        os.mkdir(self.socket_dir)
        if self.as_root:
            try:
                import pwd
                entry = pwd.getpwnam(OS_USER)
            except KeyError as exc:
                raise MissingPostgres(f"no `{OS_USER}` OS user to run the server as; " + INSTALL_HINT) from exc
            for path in (self.dir, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._start_watchdog()
        self._run("initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C",
                  "--no-sync")
        for attempt in range(5):
            self.port = free_port()
            options = (f"-k {self.socket_dir} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300 "
                       "-c shared_buffers=128MB")
            self._options = options
            try:
                self._run("pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "-o", options, "start")
                break
            except RuntimeError:
                if attempt == 4 or os.path.exists(os.path.join(self.data, "postmaster.pid")):
                    raise
        self._psql(f"CREATE DATABASE {DATABASE}", database="postgres")
        return self

    def pause(self) -> None:
        """Stop the server as an outage would, keeping data, port and directory (resume() restarts it)."""
        self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop", timeout=90)

    def resume(self) -> None:
        """Start a paused server again, on the same port."""
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "-o", self._options, "start")

    def _start_watchdog(self) -> None:
        spec = {"dir": self.dir, "data": self.data,
                "stop": self._command("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")}
        self._watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, json.dumps(spec)],
                                          stdin=subprocess.PIPE, start_new_session=True, env=_clean_env())

    def _psql(self, sql: str, database: str = DATABASE) -> None:
        import psycopg
        with psycopg.connect(self.url(database), autocommit=True) as conn:
            conn.execute(sql)

    def stop(self) -> None:
        if not self.dir:
            return
        pidfile = os.path.join(self.data, "postmaster.pid")
        for mode in ("fast", "immediate"):
            if not os.path.exists(pidfile):
                break
            try:
                self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "30", "stop", timeout=60)
            except (RuntimeError, subprocess.TimeoutExpired):
                continue
        if os.path.exists(pidfile):  # last resort: the postmaster by its pid
            try:
                with open(pidfile) as handle:
                    os.kill(int(handle.readline()), signal.SIGKILL)
                time.sleep(0.5)
            except (OSError, ValueError):
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
        if self._watchdog is not None:
            self._watchdog.stdin.close()
            try:
                self._watchdog.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                self._watchdog.wait()
            self._watchdog = None
        self.dir = ""

    def __enter__(self) -> PostgresCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # per-test databases
    def reset(self, database: str = DATABASE) -> str:
        """Empty every table of DATABASE (keeping the schema); return its URL."""
        import psycopg
        with psycopg.connect(self.url(database), autocommit=True) as conn:
            conn.execute("SET lock_timeout = '20s'")
            tables = [row[0] for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()]
            if tables:
                conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY")
        return self.url(database)


@pytest.fixture(scope="session")
def pg_server():
    """The test session's PostgreSQL server (fails, never skips, when PostgreSQL is missing)."""
    missing = ""
    try:
        cluster = PostgresCluster()
    except MissingPostgres as exc:
        missing = str(exc)
    else:
        try:
            cluster.start()
        except MissingPostgres as exc:
            cluster.stop()
            missing = str(exc)
        except BaseException:
            cluster.stop()
            raise
    if missing:
        pytest.fail(missing, pytrace=False)  # outside the except: no chained traceback
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_server) -> str:
    """An empty database for one test."""
    return pg_server.reset()
