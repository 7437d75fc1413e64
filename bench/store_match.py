#!/usr/bin/env python3
"""The job store's own match ceiling: load a queue, then match + claim in process.

    python bench/store_match.py [--quick] [--sqlite-locking lock|immediate] [--pg-url URL | --no-pg]

For SQLite (a file in a temporary directory): load 10,000 waiting jobs and
measure, then grow the queue to 1,000,000 and measure again; for PostgreSQL
(a private server from tests/pg.py unless --pg-url is given): 10,000 and
100,000. The jobs are a realistic mix of 20 requirement classes (cores,
memory, walltime, platform, container, site lists) and priorities 0-9;
slots come from 5 sites and fit most classes.

Each measurement: MATCHES calls of `store.match` + claim, single thread, then
the same number shared by 4 threads; the rate, p50 and p99 latency; the
median of 3 rounds (2 x 3 x 1000 = 6,000 jobs claimed per queue size). Printed:
load times, each figure, the query plans at the largest size, and the ratio
of the rate at the large queue to the rate at 10,000 (1.0 means the queue
length does not matter). The gRPC path is measured elsewhere; this is the
store alone. The last line is `store_matches_per_s: N` (SQLite, 1M queue,
the better of 1 and 4 threads).
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from broker.store import open_store  # noqa: E402
from broker.store.base import PilotRef, SlotOffer, StoreSettings  # noqa: E402
from splitpilot.job.v1 import job_pb2  # noqa: E402

UTC = datetime.UTC
SITES = ("SITE-A", "SITE-B", "SITE-C", "SITE-D", "SITE-E")
BATCH = 10_000


def requirement_classes(count: int = 20) -> list[job_pb2.Requirements]:
    rng = random.Random(7)
    found: dict[bytes, job_pb2.Requirements] = {}
    while len(found) < count:
        requirements = job_pb2.Requirements(
            cores=rng.choice((1, 1, 1, 2, 4, 8)), memory_mb=rng.choice((2000, 2000, 4000, 8000, 16000)),
            disk_mb=rng.choice((5000, 10000, 20000)), walltime_s=rng.choice((3600, 4 * 3600, 24 * 3600)),
            platform=rng.choice(("", "", "el9")), container_image=rng.choice(("", "", "/cvmfs/img/el9.sif")))
        kind = rng.random()
        if kind < 0.2:
            requirements.sites_allowed.extend(rng.sample(SITES, 2))
        elif kind < 0.3:
            requirements.sites_denied.append(rng.choice(SITES))
        found[requirements.SerializeToString(deterministic=True)] = requirements
    return list(found.values())


def job_specs(count: int, classes: list[job_pb2.Requirements], rng: random.Random) -> list[job_pb2.JobSpec]:
    specs = []
    for i in range(count):
        spec = job_pb2.JobSpec(executable="bin/simulate", arguments=["--events", "1000", "--seed", str(i)],
                               output_patterns=["*.root", "log/*"], name=f"sim-{i}", priority=rng.randrange(10))
        spec.environment["RUN"] = "2026A"
        spec.input_files.add(name="config.json", size=2048, sha256="ab" * 32)
        spec.requirements.CopyFrom(rng.choice(classes))
        specs.append(spec)
    return specs


def load(store, total: int, classes, rng) -> float:
    """Submit TOTAL jobs in batches; return seconds."""
    now = datetime.datetime.now(UTC)
    begin = time.perf_counter()
    for start in range(0, total, BATCH):
        store.submit("bench", job_specs(min(BATCH, total - start), classes, rng), now)
    return time.perf_counter() - begin


def slot_for(i: int) -> SlotOffer:
    return SlotOffer(SITES[i % len(SITES)], cores=8, memory_mb=32_000, disk_mb=50_000, time_left_s=2 * 86_400,
                     platforms=("el9",), containers=True)


def measure(store, matches: int, threads: int) -> tuple[float, float, float, int]:
    """(matches per second, p50 ms, p99 ms, misses) for MATCHES calls over THREADS threads."""
    latencies: list[float] = []
    misses = [0]
    lock = threading.Lock()
    per_thread = matches // threads

    def run(thread: int) -> None:
        mine, missed = [], 0
        pilots = [PilotRef(f"bench-{thread}-{k}", SITES[k % len(SITES)], f"node-{k}") for k in range(50)]
        for i in range(per_thread):
            pilot = pilots[i % len(pilots)]
            slot = slot_for(i % len(pilots))
            t0 = time.perf_counter()
            assignment = store.match(slot, pilot, datetime.datetime.now(UTC))
            mine.append(time.perf_counter() - t0)
            missed += assignment is None
        with lock:
            latencies.extend(mine)
            misses[0] += missed

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    begin = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - begin
    latencies.sort()
    return (len(latencies) / elapsed, statistics.median(latencies) * 1000,
            latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, misses[0])


def report(label: str, store, matches: int, rounds: int) -> dict[int, float]:
    """Median of ROUNDS measurements (this machine is shared and noisy), per thread count."""
    rates = {}
    for threads in (1, 4):
        results = sorted((measure(store, matches, threads) for _ in range(rounds)), key=lambda r: r[0])
        rate, p50, p99, misses = results[len(results) // 2]
        rates[threads] = rate
        print(f"  {label} {threads} thread{'s' if threads > 1 else ' '}: {rate:8.0f} matches/s  "
              f"p50 {p50:6.3f} ms  p99 {p99:6.3f} ms  (no match: {misses})", flush=True)
    return rates


def run_backend(name: str, url: str, sizes: tuple[int, int], matches: int, rounds: int,
                settings: StoreSettings, show_plans: bool) -> tuple[dict[int, float], dict[int, float]]:
    rng = random.Random(1)
    classes = requirement_classes()
    store = open_store(url, settings)
    try:
        small, large = sizes
        seconds = load(store, small, classes, rng)
        print(f"{name}: loaded {small:,} jobs in {seconds:.2f} s ({small / seconds:,.0f} jobs/s)", flush=True)
        small_rates = report(f"{name} {small:>9,} queued", store, matches, rounds)
        seconds = load(store, large - small, classes, rng)
        print(f"{name}: loaded {large - small:,} more jobs in {seconds:.1f} s "
              f"({(large - small) / seconds:,.0f} jobs/s)", flush=True)
        large_rates = report(f"{name} {large:>9,} queued", store, matches, rounds)
        for threads in (1, 4):
            print(f"  {name} rate at {large:,} / rate at {small:,} ({threads} thread{'s' if threads > 1 else ''}): "
                  f"{large_rates[threads] / small_rates[threads]:.2f}")
        if show_plans:
            for query, plan in store.plans().items():
                print(f"  plan [{query}]: " + plan.replace("\n", "\n      "))
        return small_rates, large_rates
    finally:
        store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k instead of 1M for SQLite, fewer matches")
    parser.add_argument("--sqlite-locking", default="lock", choices=("lock", "immediate"))
    parser.add_argument("--matches", type=int, default=0, help="match calls per measurement (default 4000)")
    parser.add_argument("--pg-url", help="an empty PostgreSQL database (default: a private server)")
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    parser.add_argument("--pg-jobs", type=int, default=100_000)
    parser.add_argument("--plans", action="store_true", help="print the query plans at the largest size")
    args = parser.parse_args()
    matches = args.matches or (500 if args.quick else 1000)
    rounds = 3
    large = 100_000 if args.quick else 1_000_000

    with tempfile.TemporaryDirectory(prefix="splitpilot-bench-") as directory:
        settings = StoreSettings(extra={"sqlite_locking": args.sqlite_locking})
        print(f"SQLite ({args.sqlite_locking} locking), {matches} matches per measurement, median of {rounds}",
              flush=True)
        _, sqlite_large = run_backend("sqlite", os.path.join(directory, "bench.db"), (10_000, large), matches,
                                      rounds, settings, args.plans)
    if not args.no_pg:
        if args.pg_url:
            run_backend("postgres", args.pg_url, (10_000, args.pg_jobs), matches, rounds, StoreSettings(),
                        args.plans)
        else:
            sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
            from pg import PostgresCluster
            with PostgresCluster() as cluster:
                print(f"PostgreSQL (private server, fsync off), {matches} matches per measurement, median of {rounds}",
                      flush=True)
                run_backend("postgres", cluster.url(), (10_000, args.pg_jobs), matches, rounds,
                            StoreSettings(extra={"pool_size": 8}), args.plans)
    print(f"store_matches_per_s: {max(sqlite_large.values()):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
