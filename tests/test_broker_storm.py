"""The broker under a matching storm: agent processes, a SIGKILL, two brokers.

Real broker processes (`splitpilot broker serve`), real agent processes
(tests/storm_agent.py) matching over mTLS. Checks: every job attempt is won
by at most one agent, and no job is lost: each job is matched (possibly in a
later attempt, when the broker died between committing a claim and
answering, and the reaper re-queued the never-started attempt).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pg import pg_server, pg_url  # noqa: F401 (fixtures)

from broker.ca import CertificateAuthority
from pilot.api.client import BrokerClient
from pilot.tokens import TokenRole
from pilot.tokens.files import write_private
from splitpilot.job.v1 import job_pb2

HERE = Path(__file__).parent
JOBS = 400
AGENTS = 4

#: Every job names a walltime (the broker refuses one without).
WALLTIME = job_pb2.Requirements(walltime_s=3600)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_broker(state: Path, port: int, ca_dir: Path, db: str | None = None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "apps", "broker", "serve", "--state-dir", str(state), "--listen",
            f"127.0.0.1:{port}", "--ca", str(ca_dir), "--reap-interval", "1s", "--start-timeout", "3s",
            "--log-level", "warning"]
    if db:
        argv += ["--db", db]
    process = subprocess.Popen(argv, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process
        except OSError:
            if process.poll() is not None:
                raise AssertionError(process.stderr.read().decode()) from None
            time.sleep(0.1)
    process.kill()
    raise AssertionError("broker did not start")


class Storm:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ca_dir = tmp / "ca"
        self.ca = CertificateAuthority.init(str(self.ca_dir))
        self.stop_file = tmp / "STOP"
        self.brokers: list[subprocess.Popen] = []
        self.agents: list[subprocess.Popen] = []

    def token(self, role: TokenRole, name: str, **scope) -> Path:
        path = self.tmp / f"{name}.pem"
        write_private(str(path), self.ca.new_token(role, name, **scope).to_pem())
        return path

    def start_agents(self, addresses: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": f"{HERE.parent}{os.pathsep}{HERE}"}
        for n in range(AGENTS):
            token = self.token(TokenRole.AGENT, f"agent{n}", site="STORM", queue="default")
            self.agents.append(subprocess.Popen(
                [sys.executable, str(HERE / "storm_agent.py"), str(token), ",".join(addresses),
                 str(self.tmp / f"won-{n}.txt"), str(self.stop_file)], env=env, stderr=subprocess.DEVNULL))

    def wins(self) -> list[tuple[int, int]]:
        pairs = []
        for n in range(AGENTS):
            path = self.tmp / f"won-{n}.txt"
            if path.exists():
                pairs += [tuple(map(int, line.split())) for line in path.read_text().splitlines() if line]
        return pairs

    def wait_until(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.2)
        return False

    def close(self) -> None:
        self.stop_file.touch()
        for process in self.agents + self.brokers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.agents + self.brokers:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def storm(tmp_path):
    storm = Storm(tmp_path)
    yield storm
    storm.close()


def submit(address: str, storm: Storm) -> set[int]:
    user = storm.token(TokenRole.USER, "user")
    with BrokerClient(address, str(user)) as client:
        return set(client.submit([job_pb2.JobSpec(requirements=WALLTIME, executable="x", name=f"storm-{i}",
                                                  max_attempts=5) for i in range(JOBS)]))


def check(storm: Storm, ids: set[int]) -> None:
    wins = storm.wins()
    assert len(wins) == len(set(wins)), "a job attempt was given to two agents"
    assert {job for job, _ in wins} == ids, f"jobs never matched: {sorted(ids - {j for j, _ in wins})[:10]}"


def test_sigkill_the_broker_during_a_matching_storm(storm):
    port = free_port()
    state = storm.tmp / "broker"
    storm.brokers.append(start_broker(state, port, storm.ca_dir))
    address = f"127.0.0.1:{port}"
    ids = submit(address, storm)
    storm.start_agents([address])
    assert storm.wait_until(lambda: len(storm.wins()) >= JOBS // 4, 120)
    storm.brokers[0].send_signal(signal.SIGKILL)  # mid-storm
    storm.brokers[0].wait()
    matched_before = len(storm.wins())
    time.sleep(1)
    storm.brokers.append(start_broker(state, port, storm.ca_dir))  # same state, same port
    # Everything is matched in the end; claims the dead broker committed but
    # never answered come back through the reaper as a later attempt.
    assert storm.wait_until(lambda: {j for j, _ in storm.wins()} >= ids, 180), (matched_before, len(storm.wins()))
    check(storm, ids)
    assert matched_before < JOBS  # the kill really happened mid-storm


def test_two_brokers_share_one_postgresql_queue(storm, pg_url):  # noqa: F811
    ports = [free_port(), free_port()]
    for n, port in enumerate(ports):
        storm.brokers.append(start_broker(storm.tmp / f"broker{n}", port, storm.ca_dir, db=pg_url))
    addresses = [f"127.0.0.1:{port}" for port in ports]
    ids = submit(addresses[0], storm)
    storm.start_agents(addresses)  # each agent alternates between the two brokers
    assert storm.wait_until(lambda: {j for j, _ in storm.wins()} >= ids, 180), len(storm.wins())
    check(storm, ids)
    assert all(attempt == 1 for _, attempt in storm.wins())  # nobody died: no job needed a second attempt
