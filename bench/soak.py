#!/usr/bin/env python3
"""Soak: one broker under a steady mixed load; do its resources stay bounded?

    python bench/soak.py [--minutes 30] [--rate 5] [--workers 4] [--pg] [--broker-arg=--file-grace=1m ...]

A real broker process (`splitpilot broker serve`, its own CA; SQLite in its
state folder, or with --pg a private PostgreSQL server from tests/pg.py)
gets, for --minutes, a steady production-like mix through the real APIs:
  - a user submits --rate jobs per second, each with its own 16 KiB input
    (uploaded: new content every time, so the content store grows unless
    garbage collection frees what no job needs any more);
  - --workers agent threads (each its own agent token and pilot) match jobs;
    each job runs through the job API as a wrapper would: STARTED, the input
    downloaded, RUNNING, a heartbeat, one 32 KiB output uploaded, SAVING,
    DONE;
  - the user fetches every tenth job's output.
Every 30 s (--every) the broker process is sampled from /proc (RSS, open
file descriptors, threads), with the database's size (SQLite: the file and
its WAL; PostgreSQL: pg_database_size and the pg_wal folder), the content
store's size on disk, and the jobs done so far; the samples go to a CSV
(--csv, default bench/results/soak-<time>.csv). Printed at the end: each
series' first, last and largest value and its slope over the second half
of the run (per hour), which is ~0 for what is bounded and stays positive
for what grows. Nothing is left behind (broker, PostgreSQL, folders).
The last line is `soak_rss_slope_second_half: N MiB/h`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from broker.ca import CertificateAuthority  # noqa: E402
from pilot.api.client import AgentClient, BrokerClient, MatchedJob  # noqa: E402
from pilot.api.states import JobState  # noqa: E402
from pilot.tokens import TokenRole  # noqa: E402
from splitpilot.job.v1 import job_pb2  # noqa: E402

BIN = pathlib.Path(sys.executable).parent / "splitpilot"
SLOT = {"cores": 1, "memory_mb": 4000, "disk_mb": 4000, "time_left_s": 86400}
COLUMNS = ("seconds", "rss_mib", "fds", "threads", "db_mib", "wal_mib", "files_mib", "submitted", "done",
           "errors")


class Load:
    """The load's counters, shared by its threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.submitted = self.done = self.fetched = self.errors = 0
        self.last_error = ""
        self.stop = threading.Event()

    def count(self, what: str) -> None:
        with self.lock:
            setattr(self, what, getattr(self, what) + 1)

    def failed(self, exc: BaseException) -> None:
        with self.lock:
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"


def submitter(address: str, user_token, rate: float, work: pathlib.Path, load: Load) -> None:
    with BrokerClient(address, user_token) as user:
        tick = time.monotonic()
        while not load.stop.is_set():
            try:
                path = work / "input.dat"
                path.write_bytes(os.urandom(16 * 1024))
                given = user.upload(str(path), "input.dat")
                spec = job_pb2.JobSpec(executable="run.sh", name="soak", output_patterns=["*.out"])
                spec.input_files.append(given)
                spec.requirements.walltime_s = 3600
                user.submit(spec)
                load.count("submitted")
            except Exception as exc:  # noqa: BLE001 (counted and shown: a soak reports, it does not stop)
                load.failed(exc)
            tick += 1.0 / rate
            load.stop.wait(max(0.0, tick - time.monotonic()))


def worker(address: str, ca: CertificateAuthority, index: int, user_token, work: pathlib.Path, load: Load) -> None:
    agent_token = ca.new_token(TokenRole.AGENT, f"soak-{index}", site="SITE-A", queue="default")
    sandbox = work / f"worker-{index}"
    sandbox.mkdir()
    with AgentClient(address, agent_token) as agent, BrokerClient(address, user_token) as user:
        while not load.stop.is_set():
            try:
                matched = agent.match(SLOT, f"pilot-{index}", "node-soak")
                if not isinstance(matched, MatchedJob):
                    load.stop.wait(0.2)   # the queue is empty: the submitter refills it
                    continue
                with matched.job_client() as wrapper:
                    wrapper.update_state(JobState.STARTED)
                    wrapper.get_input("input.dat", str(sandbox))
                    wrapper.update_state(JobState.RUNNING)
                    wrapper.heartbeat(cpu_seconds=1.0, rss_bytes=50 << 20)
                    output = sandbox / "result.out"
                    output.write_bytes(os.urandom(32 * 1024))
                    wrapper.put_output(str(output))
                    wrapper.update_state(JobState.SAVING)
                    wrapper.update_state(JobState.DONE, exit_code=0)
                load.count("done")
                if matched.job_id % 10 == 0:
                    fetched = sandbox / "fetched"
                    user.output(matched.job_id, str(fetched), force=True)
                    load.count("fetched")
            except Exception as exc:  # noqa: BLE001
                load.failed(exc)
                load.stop.wait(0.5)


def proc_figures(pid: int) -> tuple[float, int, int]:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_kib = int(fields["VmRSS"].split()[0])
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd")), int(fields["Threads"])


def folder_mib(path: pathlib.Path) -> float:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total / 2**20


def slope_per_hour(rows: list[dict], column: str) -> float:
    """Least-squares slope of COLUMN over the second half of ROWS, per hour."""
    half = rows[len(rows) // 2:]
    if len(half) < 2:
        return 0.0
    xs = [r["seconds"] for r in half]
    ys = [float(r[column]) for r in half]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var * 3600


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the run (default 30)")
    parser.add_argument("--rate", type=float, default=5.0, help="jobs submitted per second (default 5)")
    parser.add_argument("--workers", type=int, default=4, help="agent threads running jobs (default 4)")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between samples (default 30)")
    parser.add_argument("--pg", action="store_true", help="PostgreSQL (a private server) instead of SQLite")
    parser.add_argument("--broker-arg", action="append", default=[], metavar="ARG",
                        help="an extra option for `broker serve` (repeatable), e.g. --broker-arg=--reap-interval=2s")
    parser.add_argument("--csv", metavar="FILE", help="where the samples go (default bench/results/soak-TIME.csv)")
    args = parser.parse_args()
    csv_path = pathlib.Path(args.csv or os.path.join(
        REPO, "bench", "results", f"soak-{datetime.datetime.now():%Y%m%d-%H%M%S}.csv"))
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    load = Load()
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        work = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        state = work / "state"
        db_args: list[str] = []
        cluster = None
        if args.pg:
            sys.path.insert(0, os.path.join(REPO, "tests"))
            from pg import PostgresCluster
            cluster = stack.enter_context(PostgresCluster())
            db_args = ["--db", cluster.url()]
        log = open(work / "broker.log", "wb")
        stack.callback(log.close)
        broker = subprocess.Popen([str(BIN), "broker", "serve", "--state-dir", str(state), "--listen", "127.0.0.1:0",
                                   *db_args, *args.broker_arg], stdout=subprocess.DEVNULL, stderr=log)

        def stop_broker() -> None:
            broker.terminate()
            try:
                broker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                broker.kill()
                broker.wait()
        stack.callback(stop_broker)
        deadline = time.monotonic() + 60
        while not (state / "address").exists():   # written once it listens
            if broker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"soak: the broker did not start: {(work / 'broker.log').read_text()}")
            time.sleep(0.05)
        address = (state / "address").read_text().strip()
        ca = CertificateAuthority.load(str(state / "ca"))
        user_token = ca.new_token(TokenRole.USER, "soak-user")
        threads = [threading.Thread(target=submitter, args=(address, user_token, args.rate, work, load), daemon=True)]
        threads += [threading.Thread(target=worker, args=(address, ca, i, user_token, work, load), daemon=True)
                    for i in range(args.workers)]
        for thread in threads:
            thread.start()
        print(f"soak: {args.minutes:g} min, {args.rate:g} jobs/s, {args.workers} workers, "
              f"{'PostgreSQL' if args.pg else 'SQLite'}; samples every {args.every:g} s into {csv_path}",
              file=sys.stderr)
        started = time.monotonic()
        end = started + args.minutes * 60
        with open(csv_path, "w", newline="") as handle:
            out = csv.DictWriter(handle, fieldnames=COLUMNS)
            out.writeheader()
            while True:
                rss, fds, nthreads = proc_figures(broker.pid)
                if cluster is not None:
                    db = float(cluster_size(cluster))
                    wal = folder_mib(pathlib.Path(cluster.data) / "pg_wal")
                else:
                    db = sum(os.path.getsize(p) for p in state.glob("broker.db")) / 2**20
                    wal = sum(os.path.getsize(p) for p in state.glob("broker.db-wal")) / 2**20
                row = {"seconds": round(time.monotonic() - started, 1), "rss_mib": round(rss, 1), "fds": fds,
                       "threads": nthreads, "db_mib": round(db, 2), "wal_mib": round(wal, 2),
                       "files_mib": round(folder_mib(state / "files"), 2), "submitted": load.submitted,
                       "done": load.done, "errors": load.errors}
                rows.append(row)
                out.writerow(row)
                handle.flush()
                print("soak: " + ", ".join(f"{k} {v}" for k, v in row.items()), file=sys.stderr)
                if time.monotonic() >= end or broker.poll() is not None:
                    break
                time.sleep(min(args.every, max(0.0, end - time.monotonic())))
        load.stop.set()
        for thread in threads:
            thread.join(timeout=60)
    if load.last_error:
        print(f"soak: {load.errors} error(s); the last: {load.last_error}")
    print(f"soak: {load.submitted} jobs submitted, {load.done} DONE, {load.fetched} outputs fetched, "
          f"{len(rows)} samples")
    for column in COLUMNS[1:7]:
        values = [float(r[column]) for r in rows]
        print(f"  {column:10s} first {values[0]:9.1f}  last {values[-1]:9.1f}  max {max(values):9.1f}  "
              f"slope (2nd half) {slope_per_hour(rows, column):+9.1f}/h")
    print(f"soak_rss_slope_second_half: {slope_per_hour(rows, 'rss_mib'):.1f} MiB/h")
    return 0 if broker.returncode in (None, 0) and load.done else 1


def cluster_size(cluster) -> float:
    """The soak database's size in MiB (pg_database_size), asked through psql."""
    result = subprocess.run(cluster._command("psql", "-At", "-d", cluster.url(), "-c",
                                             "SELECT pg_database_size(current_database())"),
                            capture_output=True, text=True, timeout=60)
    return int(result.stdout.strip() or 0) / 2**20


if __name__ == "__main__":
    sys.exit(main())
