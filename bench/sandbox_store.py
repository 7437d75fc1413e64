#!/usr/bin/env python3
"""Sandbox transfer throughput: the PostgreSQL and XRootD file stores against the local folder, in one run.

    python bench/sandbox_store.py [--size MiB] [--rounds N]

A real broker (BrokerServer over mutual TLS, its own CA) runs once with
SQLite and the local folder (`--file-store local`), once on a private
PostgreSQL server (tests/pg.py: fsync off, as in every store benchmark here)
with the database store (`--file-store database`), then on the same
PostgreSQL with a private XRootD server (tests/xrootd.py: sss authentication,
Debian's xrootd 5.5.3, the `xrootd` PyPI client) as the store
(`--file-store xrootd://...`). For each round a fresh
random file of --size MiB (default 256) is uploaded with the user API
(BrokerClient.upload: hashing, streaming, the broker's staging, digest check
and commit) and downloaded as a job input (JobClient.get_input of a matched
job: the broker reads and checks each chunk; the client verifies the digest
and writes the file atomically). Printed: MiB/s per round and the medians;
the last line is `sandbox_db_download_mib_s: N MiB/s` (the database store's
median download), just before it `sandbox_xrootd_download_mib_s: N MiB/s`.

Measured (2 cores shared with other work, load average 12-15; 256 MiB, medians of 3):
local folder 67 MiB/s up, 76 MiB/s down; PostgreSQL store 42 MiB/s up, 66 MiB/s down.
With the XRootD store (load average ~3; 256 MiB, medians of 3): local folder 107 up, 108 down;
PostgreSQL store 39 up, 78 down; XRootD store 53 MiB/s up, 153 MiB/s down.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from broker.ca import CertificateAuthority  # noqa: E402
from broker.server import BrokerConfig, BrokerServer  # noqa: E402
from pilot.api.client import AgentClient, BrokerClient, MatchedJob  # noqa: E402
from pilot.api.states import JobState  # noqa: E402
from pilot.tokens import TokenRole  # noqa: E402
from splitpilot.job.v1 import job_pb2  # noqa: E402

MiB = 1 << 20
SLOT = {"cores": 1, "memory_mb": 1000, "disk_mb": 1 << 20, "time_left_s": 86400}


def random_file(path: str, size: int) -> None:
    with open(path, "wb") as out:
        for _ in range(size // MiB):
            out.write(os.urandom(MiB))


def measure(directory: str, ca_dir: str, label: str, size: int, rounds: int, **config) -> tuple[list, list]:
    ca = CertificateAuthority.load(ca_dir)
    user = ca.new_token(TokenRole.USER, "bench")
    agent_token = ca.new_token(TokenRole.AGENT, "bench-agent", site="BENCH", queue="default")
    state = os.path.join(directory, f"state-{label}")
    server = BrokerServer(BrokerConfig(state_dir=state, ca_dir=ca_dir, listen="127.0.0.1:0", reap_interval=0,
                                       max_file_size=size + MiB, max_job_bytes=size + MiB, **config))
    server.start()
    ups, downs = [], []
    try:
        print(f"{label}: file store {server.broker.files.kind}", flush=True)
        with BrokerClient(server.address, user) as client, AgentClient(server.address, agent_token) as agent:
            for round_ in range(rounds):
                source = os.path.join(directory, "source.dat")
                random_file(source, size)
                started = time.perf_counter()
                uploaded = client.upload(source, "data.dat")
                ups.append(size / MiB / (time.perf_counter() - started))
                client.submit(job_pb2.JobSpec(executable="x", requirements=job_pb2.Requirements(walltime_s=60),
                                              input_files=[uploaded]))
                matched = agent.match(SLOT, f"pilot-{round_}", "node")
                assert isinstance(matched, MatchedJob), matched
                with matched.job_client() as job:
                    job.update_state(JobState.STARTED)
                    target = os.path.join(directory, "fetched.dat")
                    started = time.perf_counter()
                    job.get_input("data.dat", target)
                    downs.append(size / MiB / (time.perf_counter() - started))
                    job.update_state(JobState.FAILED_INPUT, "benchmark done")
                os.unlink(target)
                os.unlink(source)
                print(f"  round {round_ + 1}: upload {ups[-1]:.0f} MiB/s, download {downs[-1]:.0f} MiB/s", flush=True)
    finally:
        server.stop()
    return ups, downs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="MiB per file (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per store (default: %(default)s)")
    args = parser.parse_args()
    size = args.size * MiB
    from pg import PostgresCluster
    from xrootd import XRootDServer
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-") as directory:
        ca_dir = os.path.join(directory, "ca")
        CertificateAuthority.init(ca_dir)
        local = measure(directory, ca_dir, "local", size, args.rounds, file_store="local")
        with PostgresCluster() as cluster:
            database = measure(directory, ca_dir, "database", size, args.rounds, db_url=cluster.url(),
                               file_store="database")
            with XRootDServer() as xrootd:
                cluster.reset()
                on_xrootd = measure(directory, ca_dir, "xrootd", size, args.rounds, db_url=cluster.url(),
                                    file_store=xrootd.url("bench"))
    print(f"{args.size} MiB file, median of {args.rounds}:")
    for label, (ups, downs) in (("local folder (SQLite)", local), ("PostgreSQL store", database),
                                ("XRootD store", on_xrootd)):
        print(f"  {label:22s} upload {statistics.median(ups):6.0f} MiB/s   download {statistics.median(downs):6.0f} "
              "MiB/s")
    print(f"sandbox_xrootd_download_mib_s: {statistics.median(on_xrootd[1]):.0f} MiB/s")
    print(f"sandbox_db_download_mib_s: {statistics.median(database[1]):.0f} MiB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
