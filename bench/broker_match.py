#!/usr/bin/env python3
"""End-to-end match rate of the broker: agent processes matching over mTLS.

    python bench/broker_match.py [--quick] [--no-pg] [--scenarios sqlite,ratio,pg] [--profile] [--pin]

The broker runs as a subprocess (`python -m pilot broker serve`, the real
CLI, its own GIL) on a state directory in a temporary directory, with a CA
made here (`--ca`). Its queue is loaded directly through the store
(`open_store`, batches of 10,000 JobSpecs) before it starts: the mix of
bench/store_match.py, 20 requirement classes (cores, memory, walltime,
platform, container, site lists) and priorities 0-9. Between runs the queue
is topped up through the store again (the broker is idle then), so that the
queue holds the target depth in the middle of each measured window; the
depth at the start and end of the window is printed.

Agents are separate processes (default 4), each running several agents as
concurrent grpc.aio calls (4 x 16 = 64). Every agent has its own agent token
(role agent, its own subject, a site among the 5 the jobs name, queue
default), its own TLS connection and pilot id, and one slot shape (3 of 4
whole-node slots, 1 of 4 half-node slots, so 9-16 classes fit). Each Match
carries the public half of a P-256 key generated for it (as AgentClient.match
does; the key is made before the call's clock starts), and the broker issues
the job token in the call. Latency is the Match RPC as the agent sees it.
Each run: a warm-up (excluded), then a measured window; matches/s is the
number of matches completed in the window over its length (also the median
of its one-second buckets), p50/p99 over those calls. The run also records
the broker's CPU (and its busiest thread), the clients' CPU, the machine's
busy share and the broker's own mean Match handler time (its metrics).
Every (job id, attempt) any agent received is checked: no job id twice per
database, every attempt 1, and as many ASSIGNED jobs in the store.

Scenarios:
  sqlite   SQLite, 100,000 waiting: 64 agents (the headline), 8 agents,
           and 64 agents paced (open loop) to 1,000 matches/s in total and
           to half the headline rate: with 64 agents always in flight the
           mean latency is 64 / rate (Little's law), so the paced runs show
           the service time apart from that queueing
  ratio    SQLite, 10,000 against 1,000,000 waiting, alternating rounds
           (short windows: 10,000 jobs last only a few seconds), medians
  pg       PostgreSQL 100,000 waiting (a private server from tests/pg.py,
           fsync off): one broker, then two brokers on one database with the
           agent processes split between them

Targets (2 cores): >= 1,000 matches/s with token issuance, p99 <= 50 ms at
64 agents, the rate at 1,000,000 waiting within 20% of the rate at 10,000.
The clients run on the same two cores as the broker (and PostgreSQL): their
CPU is printed, it is part of the picture (--pin puts the broker alone on
one CPU and the agents on the other). --profile samples the broker with
py-spy during the headline window (pip install py-spy) and splits the busy
time of its event-loop thread (the serial part) per match. Nothing is left behind: brokers, agents and PostgreSQL
are stopped and the temporary directory removed on success, failure, Ctrl-C
or SIGTERM (and, if this process is killed, by parent-death signals and a
watchdog). The last line is `matches_per_s: N` (SQLite, 100,000 waiting, 64
agents).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import datetime
import json
import os
import pickle
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(1, os.path.join(REPO, "bench"))

from store_match import SITES, job_specs, requirement_classes  # noqa: E402

BATCH = 10_000
#: Slot shapes (agent g gets SHAPES[1] when g % 4 == 3, else SHAPES[0]).
SHAPES = (
    dict(cores=8, memory_mb=32_000, disk_mb=50_000, time_left_s=2 * 86_400, platforms=["el9"], containers=True),
    dict(cores=4, memory_mb=16_000, disk_mb=20_000, time_left_s=36 * 3600, platforms=["el9"], containers=True),
)
TARGET_RATE = 1000.0
TARGET_P99_MS = 50.0
TARGET_RATIO = 0.8
CLK_TCK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1

_WATCHDOG = r"""
import shutil, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.stdin.buffer.read()     # EOF: the benchmark ended or died
time.sleep(3)               # its children got SIGTERM from the kernel (parent-death signal)
shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


def _die_with_parent(cpus: set[int] | None = None):
    """A preexec_fn: SIGTERM this child when the benchmark process dies (Linux); pin it to CPUS if given."""
    def prepare() -> None:
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass
        if cpus:
            os.sched_setaffinity(0, cpus)
    return prepare


def pinning(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(broker CPUs, agent CPUs) for --pin: the broker alone on the first CPU, the agents on the others."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


# ====================================================================== agent worker (child process)

def worker_main(spec_path: str) -> int:
    with open(spec_path) as handle:
        spec = json.load(handle)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    return asyncio.run(_worker(spec))


async def _worker(spec: dict) -> int:
    import grpc
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from pilot.api.client import CLIENT_OPTIONS
    from pilot.tokens.files import certificate_pem, parse_token_pem, private_key_pem
    from splitpilot.broker.v1 import broker_pb2 as pb
    from splitpilot.broker.v1 import broker_pb2_grpc as rpc_pb

    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    agents = []
    for n, agent in enumerate(spec["agents"]):
        with open(agent["token"], "rb") as handle:
            token = parse_token_pem(handle.read(), agent["token"])
        credentials = grpc.ssl_channel_credentials(
            root_certificates=certificate_pem([token.chain[-1]]), private_key=private_key_pem(token.key),
            certificate_chain=certificate_pem([token.chain[0]]))
        # Its own subchannel pool: every agent has its own TLS connection, as pilots do.
        options = [*CLIENT_OPTIONS, ("grpc.use_local_subchannel_pool", 1), ("splitpilot.bench.agent", n)]
        channel = grpc.aio.secure_channel(agent["address"], credentials, options=options)
        agents.append((agent, channel, rpc_pb.AgentServiceStub(channel)))
    await asyncio.wait_for(asyncio.gather(*(channel.channel_ready() for _, channel, _ in agents)), 60)
    print("ready", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    t0, warm, measure = (float(x) for x in line.split())
    window = (t0 + warm, t0 + warm + measure)
    interval = spec["interval"]
    cpu: list[float] = []
    records: list[tuple] = []  # (t_done, latency_s, job_id, attempt, lateness_s)
    outcomes: collections.Counter = collections.Counter()
    first_error: list[str] = []

    async def cpu_at(when: float) -> None:
        await asyncio.sleep(max(0.0, when - time.monotonic()))
        cpu.append(time.process_time())

    async def run(agent: dict, stub) -> None:
        slot = pb.Slot(**agent["slot"])
        scheduled = t0 + agent["phase"]
        await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        while True:
            if interval:
                delay = scheduled - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            if time.monotonic() >= window[1]:
                return
            lateness = max(0.0, time.monotonic() - scheduled) if interval else 0.0
            scheduled += interval
            key = ec.generate_private_key(ec.SECP256R1())
            request = pb.MatchRequest(slot=slot, pilot_id=agent["pilot"], node=agent["node"],
                                      job_public_key=key.public_key().public_bytes(der, spki))
            started = time.monotonic()
            try:
                response = await stub.Match(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                outcomes[exc.code().name] += 1
                if not first_error:
                    first_error.append(f"{exc.code().name}: {exc.details()}")
                await asyncio.sleep(0.1)
                continue
            done = time.monotonic()
            if response.WhichOneof("result") == "job":
                outcomes["matched"] += 1
                records.append((done, done - started, response.job.job_id, response.job.attempt, lateness))
            else:
                outcomes["no match"] += 1
                if not first_error:
                    first_error.append(f"no match: {response.no_match.reason}")
                await asyncio.sleep(0.05)

    await asyncio.gather(cpu_at(window[0]), cpu_at(window[1]),
                         *(run(agent, stub) for agent, _, stub in agents))
    for _, channel, _ in agents:
        await channel.close()
    with open(spec["result"], "wb") as handle:
        pickle.dump({"records": records, "cpu": cpu, "outcomes": dict(outcomes), "first_error": first_error},
                    handle)
    return 0


# ====================================================================== /proc sampling

def _proc_stat(path: str) -> tuple[str, int, int]:
    """(name, cpu ticks, ppid) of /proc/<pid>[/task/<tid>]/stat."""
    with open(path) as handle:
        data = handle.read()
    name = data[data.index("(") + 1:data.rindex(")")]
    rest = data[data.rindex(")") + 2:].split()
    return name, int(rest[11]) + int(rest[12]), int(rest[1])


def _threads(pid: int) -> dict[int, tuple[str, int]]:
    found = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                name, ticks, _ = _proc_stat(f"/proc/{pid}/task/{tid}/stat")
                found[int(tid)] = (name, ticks)
    return found


def _children_of(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if _proc_stat(f"/proc/{entry}/stat")[2] == parent:
                    found.append(int(entry))
    return found


def _machine() -> tuple[int, int]:
    """(busy, total) ticks of all CPUs."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return total - idle, total


@dataclasses.dataclass
class Sample:
    """CPU counters at one moment of a run."""

    brokers: list[dict[int, tuple[str, int]]]
    machine: tuple[int, int]
    db_ticks: dict[int, int]
    metrics: list[tuple[float, int]]


# ====================================================================== broker and PostgreSQL

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class BrokerProcess:
    """`python -m pilot broker serve` on its own state directory."""

    def __init__(self, name: str, workdir: str, db_url: str, ca_dir: str, cpus: set[int] | None = None,
                 extra: Sequence[str] = ()) -> None:
        self.name = name
        self.state_dir = os.path.join(workdir, "brokers", name)
        self.log_path = os.path.join(workdir, "logs", f"broker-{name}.log")
        self.metrics_port = free_port()
        argv = [sys.executable, "-m", "apps", "broker", "serve", "--state-dir", self.state_dir, "--db", db_url,
                "--listen", "127.0.0.1:0", "--ca", ca_dir, "--metrics", f"127.0.0.1:{self.metrics_port}",
                # Nothing here starts a job: the reaper must not re-queue matched jobs during the run.
                "--start-timeout", "1h", "--grace", "1s", *extra]
        os.makedirs(self.state_dir, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.state_dir, "address"))
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent(cpus))
        self.address = ""

    def wait_ready(self, timeout: float = 90) -> str:
        path = os.path.join(self.state_dir, "address")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(FileNotFoundError):
                with open(path) as handle:
                    address = handle.read().strip()
                if address:
                    self.address = address
                    return address
            time.sleep(0.1)
        raise RuntimeError(f"broker {self.name} did not start within {timeout:.0f} s:\n{self.log_tail()}")

    def match_handler(self) -> tuple[float, int]:
        """(seconds, calls) in the Match handler so far, from the metrics endpoint."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        seconds = calls = 0
        for line in text.splitlines():
            if line.startswith('splitpilot_rpc_duration_seconds_sum{method="Match"}'):
                seconds = float(line.split()[-1])
            elif line.startswith('splitpilot_rpc_duration_seconds_count{method="Match"}'):
                calls = int(float(line.split()[-1]))
        return seconds, calls

    def log_tail(self) -> str:
        try:
            with open(self.log_path, errors="replace") as handle:
                return handle.read()[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# ====================================================================== results

@dataclasses.dataclass
class Run:
    label: str
    agents: int
    brokers: int
    window_s: float
    matched: int = 0
    rate: float = 0.0
    bucket_median: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    max_ms: float = 0.0
    late_p99_ms: float = 0.0
    depth: tuple[int, int] = (0, 0)
    outcomes: dict = dataclasses.field(default_factory=dict)
    first_error: str = ""
    broker_cores: float = 0.0
    busiest_thread: tuple[str, float] = ("", 0.0)
    client_cores: float = 0.0
    db_cores: float = 0.0
    machine_busy: float = 0.0
    handler_ms: float = 0.0
    pace: float = 0.0
    other_cores: float = 0.0
    per_broker: list[float] = dataclasses.field(default_factory=list)

    @property
    def problems(self) -> int:
        return sum(n for k, n in self.outcomes.items() if k != "matched")


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


# ====================================================================== the benchmark

class Bench:
    def __init__(self, args: argparse.Namespace, workdir: str) -> None:
        self.args = args
        self.workdir = workdir
        self.procs = args.processes
        self.classes = requirement_classes()
        self.rng = random.Random(1)
        self.runs: list[Run] = []
        self.checks: list[tuple[str, bool, str]] = []
        self.est_rate = 1400.0  # matches/s guess for sizing top-ups; replaced by each 64-agent measurement
        self.run_count = 0
        self.profile_text = ""
        self.profile_path = ""
        self.broker_cpus, self.agent_cpus = pinning(args.pin)
        os.makedirs(os.path.join(workdir, "logs"))
        os.makedirs(os.path.join(workdir, "tokens"))
        from broker.ca import CertificateAuthority
        from pilot.tokens import TokenRole
        from pilot.tokens.files import write_private
        self.ca_dir = os.path.join(workdir, "ca")
        ca = CertificateAuthority.init(self.ca_dir)
        self.tokens = []
        for g in range(args.agents):
            token = ca.new_token(TokenRole.AGENT, f"bench-agent-{g}", site=SITES[g % len(SITES)], queue="default")
            path = os.path.join(workdir, "tokens", f"agent-{g}.pem")
            write_private(path, token.to_pem())
            self.tokens.append(path)

    # ------------------------------------------------------------ queue

    def load(self, store, count: int) -> float:
        now = datetime.datetime.now(datetime.UTC)
        begin = time.perf_counter()
        for start in range(0, count, BATCH):
            store.submit("bench", job_specs(min(BATCH, count - start), self.classes, self.rng), now)
        return time.perf_counter() - begin

    def top_up(self, store, target: int) -> int:
        """Bring the store to TARGET waiting jobs (more are never removed); return the count."""
        from pilot.api.states import JobState
        waiting = store.counts().get(JobState.WAITING, 0)
        if waiting < target:
            self.load(store, target - waiting)
            waiting = target
        return waiting

    def depth_for(self, target: int, warm: float, measure: float, rate: float) -> int:
        """Jobs to queue so that TARGET are waiting in the middle of the window."""
        return target + int(rate * (warm + measure / 2))

    # ------------------------------------------------------------ one run

    def run(self, label: str, brokers: list[BrokerProcess], store, *, target: int, agents: int, warm: float,
            measure: float, pace: float = 0.0, db_pids: tuple[int, ...] = (), profile: bool = False,
            matched_ids: list | None = None) -> Run:
        self.run_count += 1
        per_proc = [list(range(p, agents, self.procs)) for p in range(self.procs)]
        per_proc = [p for p in per_proc if p]
        rate_guess = pace or self.est_rate * (1.0 if agents >= 32 else 0.7)
        waiting = self.top_up(store, self.depth_for(target, warm, measure, rate_guess))
        interval = agents / pace if pace else 0.0
        workers = []
        try:
            for index, members in enumerate(per_proc):
                broker = brokers[index % len(brokers)]
                spec = {"interval": interval,
                        "result": os.path.join(self.workdir, f"result-{self.run_count}-{index}.pickle"),
                        "agents": [{"address": broker.address, "token": self.tokens[g],
                                    "pilot": f"bench-{self.run_count}-{g}", "node": f"wn{g:03d}.bench",
                                    "slot": SHAPES[1 if g % 4 == 3 else 0],
                                    "phase": (g / agents) * interval} for g in members]}
                spec_path = os.path.join(self.workdir, f"spec-{self.run_count}-{index}.json")
                with open(spec_path, "w") as handle:
                    json.dump(spec, handle)
                log_path = os.path.join(self.workdir, "logs", f"agents-{self.run_count}-{index}.log")
                log = open(log_path, "wb")  # noqa: SIM115 (closed in the finally below)
                proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", spec_path],
                                        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                        text=True, start_new_session=True,
                                        preexec_fn=_die_with_parent(self.agent_cpus))
                workers.append((proc, spec, log))
            for proc, _spec, log in workers:
                if proc.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"an agent process failed to start:\n{_tail(log.name)}")
            t0 = time.monotonic() + 0.3
            for proc, _spec, _log in workers:
                proc.stdin.write(f"{t0} {warm} {measure}\n")
                proc.stdin.close()
            window = (t0 + warm, t0 + warm + measure)
            spy = None
            time.sleep(max(0.0, window[0] - time.monotonic()))
            first = self._sample(brokers, db_pids)
            if profile:
                spy = self._start_profile(brokers[0], measure)
            time.sleep(max(0.0, window[1] - time.monotonic()))
            last = self._sample(brokers, db_pids)
            results = []
            for proc, spec, log in workers:
                if proc.wait(timeout=warm + measure + 90) != 0:
                    raise RuntimeError(f"an agent process failed ({proc.returncode}):\n{_tail(log.name)}")
                with open(spec["result"], "rb") as handle:
                    results.append(pickle.load(handle))
            if spy is not None:
                self.profile_path = self._finish_profile(spy)
        finally:
            for proc, _spec, log in workers:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                log.close()
        run = self._summarise(label, agents, len(brokers), window, waiting, results, first, last)
        if len(brokers) > 1:
            counts = [0] * len(brokers)
            for index, result in enumerate(results):
                counts[index % len(brokers)] += sum(1 for r in result["records"] if window[0] <= r[0] <= window[1])
            run.per_broker = [n / run.window_s for n in counts]
        run.pace = pace
        if matched_ids is not None:
            for result in results:
                matched_ids.extend((r[2], r[3]) for r in result["records"])
        if agents == self.args.agents and not pace and run.rate > 0:
            self.est_rate = run.rate
        self.runs.append(run)
        self._print_run(run)
        return run

    def _sample(self, brokers: list[BrokerProcess], db_pids: tuple[int, ...]) -> Sample:
        db_ticks = {}
        for pid in db_pids:
            for child in [pid, *_children_of(pid)]:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    db_ticks[child] = _proc_stat(f"/proc/{child}/stat")[1]
        metrics = []
        for broker in brokers:
            try:
                metrics.append(broker.match_handler())
            except OSError:
                metrics.append((0.0, 0))
        return Sample([_threads(b.proc.pid) for b in brokers], _machine(), db_ticks, metrics)

    def _summarise(self, label: str, agents: int, nbrokers: int, window: tuple[float, float], waiting: int,
                   results: list[dict], first: Sample, last: Sample) -> Run:
        length = window[1] - window[0]
        run = Run(label, agents, nbrokers, length)
        latencies, late, before, in_window = [], [], 0, 0
        buckets = [0] * max(1, int(round(length)))
        outcomes: collections.Counter = collections.Counter()
        for result in results:
            outcomes.update(result["outcomes"])
            if result["first_error"] and not run.first_error:
                run.first_error = result["first_error"][0]
            for done, latency, _job, _attempt, lateness in result["records"]:
                if done < window[0]:
                    before += 1
                elif done <= window[1]:
                    in_window += 1
                    latencies.append(latency)
                    late.append(lateness)
                    buckets[min(len(buckets) - 1, int(done - window[0]))] += 1
        latencies.sort()
        late.sort()
        run.outcomes = dict(outcomes)
        run.matched = in_window
        run.rate = in_window / length
        run.bucket_median = statistics.median(buckets) / (length / len(buckets))
        run.p50_ms = _quantile(latencies, 0.50) * 1000
        run.p99_ms = _quantile(latencies, 0.99) * 1000
        run.mean_ms = statistics.fmean(latencies) * 1000 if latencies else float("nan")
        run.max_ms = latencies[-1] * 1000 if latencies else float("nan")
        run.late_p99_ms = _quantile(late, 0.99) * 1000
        run.depth = (waiting - before, waiting - before - in_window)
        # CPU over the window
        total_broker, busiest = 0, ("", 0)
        for start, end in zip(first.brokers, last.brokers, strict=True):
            for tid, (name, ticks) in end.items():
                used = ticks - start.get(tid, (name, 0))[1]
                total_broker += used
                if used > busiest[1]:
                    busiest = (name, used)
        run.broker_cores = total_broker / CLK_TCK / length
        run.busiest_thread = (busiest[0], busiest[1] / CLK_TCK / length)
        run.client_cores = sum(r["cpu"][1] - r["cpu"][0] for r in results if len(r["cpu"]) == 2) / length
        run.db_cores = sum(t - first.db_ticks[p] for p, t in last.db_ticks.items()
                           if p in first.db_ticks) / CLK_TCK / length
        busy, total = (b - a for a, b in zip(first.machine, last.machine, strict=True))
        run.machine_busy = busy / total if total else 0.0
        cpus = os.cpu_count() or 1
        run.other_cores = max(0.0, run.machine_busy * cpus - run.broker_cores - run.client_cores - run.db_cores)
        seconds = sum(b[0] - a[0] for a, b in zip(first.metrics, last.metrics, strict=True))
        calls = sum(b[1] - a[1] for a, b in zip(first.metrics, last.metrics, strict=True))
        run.handler_ms = seconds / calls * 1000 if calls else float("nan")
        return run

    def _print_run(self, run: Run) -> None:
        extra = f", {run.problems} not matched ({run.first_error})" if run.problems else ""
        if run.per_broker:
            extra += " (per broker: " + " + ".join(f"{r:,.0f}" for r in run.per_broker) + " matches/s)"
        pace = f", paced to {run.pace:,.0f}/s (p99 lateness of sends {run.late_p99_ms:.1f} ms)" if run.pace else ""
        print(f"  {run.label}: {run.rate:,.0f} matches/s (1-s median {run.bucket_median:,.0f}), p50 {run.p50_ms:.1f} "
              f"ms, p99 {run.p99_ms:.1f} ms, max {run.max_ms:.0f} ms; queue {run.depth[0]:,} -> {run.depth[1]:,}; "
              f"broker {run.broker_cores:.2f} cores (busiest thread {run.busiest_thread[0]} "
              f"{run.busiest_thread[1]:.2f}), handler {run.handler_ms:.2f} ms/match, clients "
              f"{run.client_cores:.2f} cores" + (f", PostgreSQL {run.db_cores:.2f} cores" if run.db_cores else "")
              + f", other {run.other_cores:.2f} cores, machine {run.machine_busy:.0%} busy{pace}{extra}", flush=True)

    # ------------------------------------------------------------ py-spy

    def _start_profile(self, broker: BrokerProcess, seconds: float):
        spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        if not os.access(spy, os.X_OK):
            self.profile_text = "  (py-spy not found: pip install py-spy into the venv)"
            return None
        out = os.path.join(self.workdir, "profile.txt")
        proc = subprocess.Popen([spy, "record", "--pid", str(broker.proc.pid), "--duration", str(int(seconds)),
                                 "--rate", "200", "--format", "raw", "--output", out, *self.args.py_spy_args.split()],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, preexec_fn=_die_with_parent())
        return proc, out

    def _finish_profile(self, spy) -> str:
        proc, out = spy
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if not os.path.exists(out):
            self.profile_text = f"  (py-spy failed: {err.strip()[-500:]})"
            return ""
        return out

    # ------------------------------------------------------------ checks

    def check_unique(self, label: str, ids: list[tuple[int, int]], store) -> None:
        from pilot.api.states import JobState
        job_ids = [j for j, _ in ids]
        distinct = len(set(job_ids))
        attempts = collections.Counter(a for _, a in ids)
        assigned = store.counts().get(JobState.ASSIGNED, 0)
        ok = distinct == len(job_ids) and set(attempts) <= {1} and assigned == len(job_ids)
        detail = (f"{len(job_ids):,} matches, {distinct:,} distinct job ids, attempts {dict(attempts)}, "
                  f"store ASSIGNED {assigned:,}")
        self.checks.append((label, ok, detail))
        print(f"  no job matched twice ({label}): {'OK' if ok else 'FAILED'}: {detail}", flush=True)

    # ------------------------------------------------------------ scenarios

    def scenario_sqlite(self, stack: contextlib.ExitStack) -> None:
        from broker.store import open_store
        a = self.args
        path = os.path.join(self.workdir, "sqlite-100k.db")
        store = stack.enter_context(contextlib.closing(open_store(path)))
        warm, measure = (3, 6) if a.quick else (10, 20)
        count = self.depth_for(100_000, warm, measure, self.est_rate)
        seconds = self.load(store, count)
        print(f"SQLite 100k: loaded {count:,} jobs in {seconds:.1f} s ({count / seconds:,.0f} jobs/s)", flush=True)
        broker = BrokerProcess("sqlite-100k", self.workdir, f"sqlite://{path}", self.ca_dir, self.broker_cpus)
        stack.callback(broker.stop)
        broker.wait_ready()
        ids: list = []
        common = dict(target=100_000, matched_ids=ids)
        self.run(f"sqlite 100k, {a.agents} agents", [broker], store, agents=a.agents, warm=warm, measure=measure,
                 profile=a.profile, **common)
        self.run("sqlite 100k, 8 agents", [broker], store, agents=8, warm=2 if a.quick else 3,
                 measure=4 if a.quick else 12, **common)
        # Open loop: the target rate, and half of what the closed loop did (service time without queueing).
        for pace in (TARGET_RATE, max(100.0, round(self.est_rate / 2, -2))):
            self.run(f"sqlite 100k, {a.agents} agents paced {pace:,.0f}/s", [broker], store, agents=a.agents,
                     pace=pace, warm=2 if a.quick else 5, measure=4 if a.quick else 15, **common)
        broker.stop()
        self.check_unique("SQLite 100k", ids, store)

    def scenario_ratio(self, stack: contextlib.ExitStack) -> None:
        from broker.store import open_store
        a = self.args
        large = 200_000 if a.quick else 1_000_000
        rounds = 1 if a.quick else 3
        warm, measure = (2, 3) if a.quick else (4, 5)
        sizes = {"10k": 10_000, f"{large // 1000}k" if large < 1_000_000 else "1M": large}
        setups = {}
        for name, size in sizes.items():
            path = os.path.join(self.workdir, f"sqlite-{name}.db")
            store = stack.enter_context(contextlib.closing(open_store(path)))
            count = self.depth_for(size, warm, measure, self.est_rate)
            seconds = self.load(store, count)
            print(f"SQLite {name}: loaded {count:,} jobs in {seconds:.1f} s ({count / seconds:,.0f} jobs/s, "
                  f"file {os.path.getsize(path) / 1e6:,.0f} MB)", flush=True)
            broker = BrokerProcess(f"sqlite-{name}", self.workdir, f"sqlite://{path}", self.ca_dir, self.broker_cpus)
            stack.callback(broker.stop)
            setups[name] = (size, store, broker, [])
        for _, _, broker, _ in setups.values():
            broker.wait_ready()
        rates: dict[str, list[Run]] = {name: [] for name in setups}
        for round_ in range(rounds):
            for name, (size, store, broker, ids) in setups.items():
                run = self.run(f"sqlite {name}, {a.agents} agents, round {round_ + 1}", [broker], store, target=size,
                               agents=a.agents, warm=warm, measure=measure, matched_ids=ids)
                rates[name].append(run)
        for name, (_size, store, broker, ids) in setups.items():
            broker.stop()
            self.check_unique(f"SQLite {name}", ids, store)
        self.ratio = {name: (statistics.median(r.rate for r in runs), statistics.median(r.p99_ms for r in runs))
                      for name, runs in rates.items()}

    def scenario_pg(self, stack: contextlib.ExitStack) -> None:
        from broker.store import open_store
        from broker.store.base import StoreSettings
        a = self.args
        sys.path.insert(0, os.path.join(REPO, "tests"))
        from pg import MissingPostgres, PostgresCluster
        try:
            cluster = stack.enter_context(PostgresCluster())
        except MissingPostgres as exc:
            print(f"PostgreSQL: skipped ({exc})")
            return
        with open(os.path.join(cluster.data, "postmaster.pid")) as handle:
            postmaster = int(handle.readline())
        url = cluster.url()
        store = stack.enter_context(contextlib.closing(open_store(url, StoreSettings(extra={"pool_size": 2}))))
        warm, measure = (2, 5) if a.quick else (5, 15)
        count = self.depth_for(100_000, warm, measure, self.est_rate)
        seconds = self.load(store, count)
        print(f"PostgreSQL 100k: loaded {count:,} jobs in {seconds:.1f} s ({count / seconds:,.0f} jobs/s)",
              flush=True)
        with contextlib.closing(cluster_conn(url)) as conn:
            conn.execute("VACUUM ANALYZE")
        ids: list = []
        one = BrokerProcess("pg-1", self.workdir, url, self.ca_dir, self.broker_cpus)
        stack.callback(one.stop)
        one.wait_ready()
        self.run(f"postgres 100k, {a.agents} agents, 1 broker", [one], store, target=100_000, agents=a.agents,
                 warm=warm, measure=measure, db_pids=(postmaster,), matched_ids=ids)
        one.stop()
        if not a.one_pg_broker:
            pair = [BrokerProcess(f"pg-2{x}", self.workdir, url, self.ca_dir, self.broker_cpus) for x in "ab"]
            for broker in pair:
                stack.callback(broker.stop)
            for broker in pair:
                broker.wait_ready()
            self.run(f"postgres 100k, {a.agents} agents, 2 brokers", pair, store, target=100_000,
                     agents=a.agents, warm=warm, measure=measure, db_pids=(postmaster,), matched_ids=ids)
            for broker in pair:
                broker.stop()
        self.check_unique("PostgreSQL 100k", ids, store)

    # ------------------------------------------------------------ report

    def report(self) -> int:
        a = self.args
        print()
        print(f"{'run':<40} {'matches/s':>9} {'1-s med':>8} {'p50 ms':>7} {'p99 ms':>7} {'mean ms':>7} "
              f"{'queue in window':>17} {'broker':>6} {'thread':>6} {'hdlr ms':>7} {'clients':>7} {'pg':>5} "
              f"{'other':>5}")
        for r in self.runs:
            print(f"{r.label:<40} {r.rate:>9,.0f} {r.bucket_median:>8,.0f} {r.p50_ms:>7.1f} {r.p99_ms:>7.1f} "
                  f"{r.mean_ms:>7.1f} {f'{r.depth[0]:,}->{r.depth[1]:,}':>17} {r.broker_cores:>6.2f} "
                  f"{r.busiest_thread[1]:>6.2f} {r.handler_ms:>7.2f} {r.client_cores:>7.2f} "
                  f"{(f'{r.db_cores:.2f}' if r.db_cores else '-'):>5} {r.other_cores:>5.2f}")
        print(f"  (broker/thread/clients/pg/other: CPU cores used in the window, of {os.cpu_count()}; thread: the "
              "broker's busiest thread; other: the rest of the machine (e.g. a concurrent test run); hdlr: the "
              "broker's mean time inside its Match handler, from its metrics)")
        headline = next((r for r in self.runs if r.label == f"sqlite 100k, {a.agents} agents"), None)
        low = next((r for r in self.runs if r.label == "sqlite 100k, 8 agents"), None)
        paced = [r for r in self.runs if r.pace and r.label.startswith("sqlite 100k")]
        print()
        if headline is not None:
            little = a.agents / headline.rate * 1000 if headline.rate else float("nan")
            print(f"At {a.agents} agents every agent always has a call in flight, so the mean latency is "
                  f"{a.agents} / rate = {little:.1f} ms (measured {headline.mean_ms:.1f} ms): latency there is "
                  "throughput seen from the queue.")
            if low is not None:
                print(f"At 8 agents: {low.rate:,.0f} matches/s, p50 {low.p50_ms:.1f} ms, p99 {low.p99_ms:.1f} ms.")
            for run in paced:
                kept_up = run.rate >= 0.95 * run.pace and run.late_p99_ms < 20
                print(f"Offered {run.pace:,.0f}/s from {run.agents} agents (open loop): {run.rate:,.0f}/s served, "
                      f"p50 {run.p50_ms:.1f} ms, p99 {run.p99_ms:.1f} ms; "
                      + ("the broker kept up: this is service time plus short queues."
                         if kept_up else f"the broker did NOT keep up (sends {run.late_p99_ms:.0f} ms late at "
                         "p99): it is saturated at this rate here, and the latency is queueing."))
            if headline.p99_ms > TARGET_P99_MS and headline.mean_ms > 0:
                spread = headline.p99_ms / headline.mean_ms
                needed = a.agents / (TARGET_P99_MS / spread / 1000)
                print(f"p99/mean at {a.agents} agents is {spread:.2f}; with that spread, p99 <= {TARGET_P99_MS:.0f} "
                      f"ms at {a.agents} agents needs ~{needed:,.0f} matches/s (mean <= "
                      f"{TARGET_P99_MS / spread:.0f} ms).")
        if self.profile_path:
            self.profile_text = summarise_profile(self.profile_path, headline)
        if self.profile_text:
            print("\nWhere the broker's event-loop thread spends its time (py-spy, headline window):")
            print(self.profile_text)
        print("\nTargets:")
        ok_all = True

        def target(text: str, ok: bool | None, detail: str) -> None:
            nonlocal ok_all
            verdict = "n/a" if ok is None else ("met" if ok else "MISSED")
            ok_all &= ok is not False
            print(f"  {text:<52} {detail:<44} {verdict}")

        if headline is not None:
            target(f">= {TARGET_RATE:,.0f} matches/s (SQLite 100k, {a.agents} agents)", headline.rate >= TARGET_RATE,
                   f"{headline.rate:,.0f}/s ({headline.rate / TARGET_RATE:.2f}x)")
            target(f"p99 <= {TARGET_P99_MS:.0f} ms at {a.agents} agents", headline.p99_ms <= TARGET_P99_MS,
                   f"{headline.p99_ms:.1f} ms ({headline.p99_ms / TARGET_P99_MS:.2f}x the limit)")
        ratio = getattr(self, "ratio", None)
        if ratio:
            (small_name, (small, small_p99)), (large_name, (large, large_p99)) = list(ratio.items())
            value = large / small if small else float("nan")
            target(f"rate at {large_name} within 20% of the rate at {small_name}", value >= TARGET_RATIO,
                   f"{large:,.0f} / {small:,.0f} = {value:.2f} (medians)")
            print(f"    (p99 medians: {small_name} {small_p99:.1f} ms, {large_name} {large_p99:.1f} ms)")
        for label, ok, _detail in self.checks:
            target(f"no job matched twice: {label}", ok, "")
        for r in self.runs:
            if r.problems:
                print(f"  note: {r.label}: {r.problems} calls not matched: {r.outcomes} ({r.first_error})")
        if headline is not None:
            print(f"matches_per_s: {headline.rate:.0f}")
        return 0 if all(ok for _, ok, _ in self.checks) else 1


def cluster_conn(url: str):
    import psycopg
    return psycopg.connect(url, autocommit=True)


def summarise_profile(path: str, run: Run | None) -> str:
    """py-spy raw (collapsed) stacks, grouped by what the broker was doing.

    The event-loop thread (the stacks through BrokerServer._run_loop) runs every
    handler and the Cython gRPC server, and is the serial part: its busy time is
    split into categories and, with its measured CPU and the match rate, into
    microseconds per match. C code shows at the Python line calling it (SQLite at
    the store's cursor, the signature at CertificateBuilder.sign); the Cython gRPC
    server and protobuf are invisible to py-spy and show as self time of asyncio's
    Handle._run.
    """
    categories = (
        ("store: SQLite claim transaction (broker/store)", ("broker/store/",)),
        ("job token issuance (CA.issue: build + ECDSA sign)", ("broker/ca.py",)),
        ("job public key parsing (DER SPKI)", ("job_public_key",)),
        ("identify caller (auth cache)", ("broker/auth.py",)),
        ("metrics counters", ("broker/metrics.py",)),
        ("Match handler: request/response objects, rest", ("broker/services/agent.py", "broker/services/base.py")),
        ("protobuf (Python side)", ("google/protobuf",)),
        ("gRPC aio (Python parts)", ("grpc/aio", "grpc/_")),
        ("asyncio loop bookkeeping (select, scheduling)", ("asyncio/", "selectors.py")),
    )
    cython = "gRPC aio server in Cython + protobuf (de)serialisation (Handle._run self time)"
    totals: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    loop_samples = other_samples = 0
    with open(path) as handle:
        for line in handle:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            if "BrokerServer._run_loop" not in stack:
                other_samples += n
                continue
            loop_samples += n
            frames = stack.split(";")
            leaves[frames[-1]] += n
            if frames[-1].startswith("Handle._run "):
                totals[cython] += n
                continue
            chosen = "other"
            for frame in reversed(frames):
                hit = next((name for name, needles in categories if any(x in frame for x in needles)), None)
                if hit:
                    chosen = hit
                    break
            totals[chosen] += n
    if not loop_samples:
        return "  (no samples of the event-loop thread)"
    per_match = None
    if run is not None and run.rate:
        per_match = run.busiest_thread[1] / run.rate * 1e6  # busy microseconds of the loop thread per match
    lines = [f"  {loop_samples:,} samples of the event-loop thread (busy only; {other_samples:,} of other threads)"
             + (f"; it used {run.busiest_thread[1]:.2f} cores at {run.rate:,.0f} matches/s = "
                f"{per_match:,.0f} us per match" if per_match else "")]
    for name, n in totals.most_common():
        share = n / loop_samples
        lines.append(f"  {share:6.1%}" + (f" {share * per_match:5.0f} us" if per_match else "") + f"  {name}")
    lines.append("  top lines (self):")
    lines += [f"  {n / loop_samples:6.1%}  {frame[:110]}" for frame, n in leaves.most_common(10)]
    return "\n".join(lines)


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as handle:
            return handle.read()[-3000:]
    except OSError:
        return ""


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker_main(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (short windows, 200k not 1M, "
                                                             "one ratio round)")
    parser.add_argument("--scenarios", default="sqlite,ratio,pg", help="comma list of sqlite, ratio, pg")
    parser.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--one-pg-broker", action="store_true", help="skip the two-broker PostgreSQL run")
    parser.add_argument("--agents", type=int, default=64, help="concurrent agents (default 64)")
    parser.add_argument("--processes", type=int, default=4, help="agent processes (default 4)")
    parser.add_argument("--profile", action="store_true", help="py-spy the broker during the headline window")
    parser.add_argument("--py-spy-args", default="--nonblocking", metavar="ARGS",
                        help="extra py-spy record options (default: %(default)s, which does not pause the broker; "
                             "--gil: only the thread holding the GIL; --native: C frames, pauses and perturbs)")
    parser.add_argument("--pin", action="store_true",
                        help="pin the broker to the first CPU and the agent processes to the others (as if the "
                             "agents ran elsewhere; PostgreSQL is not pinned)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs) at the end")
    args = parser.parse_args()
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if args.no_pg and "pg" in scenarios:
        scenarios.remove("pg")
    unknown = set(scenarios) - {"sqlite", "ratio", "pg"}
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}")

    def terminate(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)  # also when started in the background with SIGINT ignored
    workdir = tempfile.mkdtemp(prefix="splitpilot-broker-bench-")
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, workdir], stdin=subprocess.PIPE,
                                start_new_session=True)
    print(f"{os.cpu_count()} CPUs, {args.agents} agents in {args.processes} processes"
          + (" (broker pinned to one CPU, agents to the others)" if args.pin else "") + ", load average "
          f"{os.getloadavg()[0]:.2f} at start; work directory {workdir}", flush=True)
    began = time.monotonic()
    try:
        bench = Bench(args, workdir)
        for name in scenarios:
            with contextlib.ExitStack() as stack:
                getattr(bench, f"scenario_{name}")(stack)
        print(f"\n(all runs took {time.monotonic() - began:.0f} s; load average {os.getloadavg()[0]:.2f} at end)")
        return bench.report()
    except KeyboardInterrupt:
        print("\ninterrupted: brokers, agents and PostgreSQL stopped, temporary files removed", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            watchdog.kill()
            watchdog.wait()
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            watchdog.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                watchdog.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
