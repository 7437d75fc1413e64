#!/usr/bin/env python3
"""Control-plane capacity: connected job wrappers per broker process.

    python bench/control_plane.py [--quick] [--sizes 1000,5000,10000,20000] [--interval 30]
                                  [--sweep 10000:10,5,2] [--no-pg] [--profile]

Every simulated wrapper is what a real one is to the broker: a job matched
through the agent API (Match with a P-256 key made for it; the broker signs
the job token in the call), then its own gRPC channel with its own TLS
connection authenticated by its own job token, STARTED and RUNNING reported
through UpdateState, then a Heartbeat every INTERVAL seconds (each wrapper at
its own phase), and at the end SAVING and DONE. The broker runs as a separate
process (`python -m apps broker serve --ca`, as bench/broker_match.py starts
it) on SQLite, then two brokers on one PostgreSQL (tests/pg.py: a private
server, fsync off); the load generators are separate processes (grpc.aio,
many channels per process). RLIMIT_NOFILE is raised here before anything is
started, so the broker and the generators inherit it.

Per size N, the broker's CPU (all its threads, /proc/<pid>/task), resident
memory and open descriptors are read for the broker PID only, around each
phase:
  match     N Match calls (job token issuance): CPU per match
  connect   N TLS handshakes (channel_ready): CPU per connection
  start     2N UpdateState (STARTED, RUNNING): CPU per state update
  idle      a few seconds with N channels open and nothing sent: RSS per channel = (RSS now - RSS before
            connect) / N, descriptors
  beat      the measured window: every wrapper heartbeats every INTERVAL s, while jobs end and start in the
            proportions of a production day (N / JOB_LENGTH per second: SAVING + DONE + channel closed, a new
            Match, a new channel, STARTED + RUNNING): CPU per heartbeat (window CPU minus the churn's share at
            the per-operation costs above, over the heartbeats), p50/p99/max heartbeat latency as the wrapper
            sees it (and how late the generator sent, so that a saturated generator is not mistaken for a
            fast broker)
  end       2N UpdateState (SAVING, DONE)
--sweep N:I1,I2,.. repeats the window for N channels at shorter intervals (more heartbeats per second) to find
the rate at which the broker saturates one core or p99 passes 1 s. The generators' own CPU is printed: the
two cores of this machine are shared between the broker, the generators (and PostgreSQL).

The model (printed, and in docs/broker.md "Capacity"): with c_hb the broker CPU per heartbeat, c_job the CPU
of one job's control-plane life apart from heartbeats (match + handshake + 4 updates), I the heartbeat
interval and L the job length, one wrapper costs u = c_hb / I + c_job / L core-seconds per second, so one
core holds 1 / u wrappers (as long as the process is not limited by memory or latency first). The last line is
`wrappers_per_broker_core: N` (from the SQLite run at the largest size, 30 s heartbeats, 1 h jobs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pickle
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(1, os.path.join(REPO, "bench"))

from broker_match import (  # noqa: E402
    _WATCHDOG,
    CLK_TCK,
    SHAPES,
    BrokerProcess,
    _children_of,
    _die_with_parent,
    _machine,
    _proc_stat,
    _quantile,
    _tail,
    _threads,
    summarise_profile,
)

SITES = ("SITE-A", "SITE-B")
TARGET_PER_CORE = 20_000
TARGET_CHANNEL_KB = 50.0
TARGET_P99_S = 1.0
NOFILE = 262_144
PAGE = os.sysconf("SC_PAGE_SIZE")
#: Handshakes in flight per generator process (a thundering herd of 20k handshakes is not what a site does).
CONNECT_CONCURRENCY = 64
#: Match calls in flight per generator process (as many agents).
AGENTS_PER_PROCESS = 8


# ====================================================================== generator (child process)

def worker_main(spec_path: str) -> int:
    with open(spec_path) as handle:
        spec = json.load(handle)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    return asyncio.run(Generator(spec).main())


class Wrapper:
    """One simulated job wrapper: its token, its channel, its sequence of state updates."""

    __slots__ = ("job_id", "attempt", "token", "key", "channel", "stub", "sequence")

    def __init__(self, job_id: int, attempt: int, token: bytes, key: bytes) -> None:
        self.job_id, self.attempt, self.token, self.key = job_id, attempt, token, key
        self.channel = self.stub = None
        self.sequence = 1


class Pilot:
    """One simulated pilot (design "pilot"): its own channel with the agent token, the jobs it runs."""

    __slots__ = ("pilot_id", "channel", "stub", "jobs")

    def __init__(self, pilot_id: str) -> None:
        self.pilot_id = pilot_id
        self.channel = self.stub = None
        self.jobs: list[Wrapper] = []


class Generator:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        #: "wrapper": every wrapper holds a channel and heartbeats; "pilot": the pilot's heartbeat carries its
        #: jobs' liveness (RunningAttempt.usage) and a wrapper connects only for its state reports.
        self.design = spec.get("design", "wrapper")
        self.per_pilot = int(spec.get("per_pilot", 1))
        self.pilots: list[Pilot] = []
        self.wrappers: list[Wrapper] = []
        self.errors: dict[str, int] = {}
        self.first_error = ""

    def error(self, what: str, exc: BaseException) -> None:
        import grpc
        name = f"{what}: {exc.code().name}" if isinstance(exc, grpc.aio.AioRpcError) else f"{what}: {exc!r}"
        self.errors[name] = self.errors.get(name, 0) + 1
        if not self.first_error:
            self.first_error = f"{name} {exc.details() if isinstance(exc, grpc.aio.AioRpcError) else ''}"

    async def main(self) -> int:
        import grpc
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        from pilot.api.base import CLIENT_OPTIONS, leaf_pem
        from pilot.tokens.files import certificate_pem, parse_token_pem, private_key_pem
        from splitpilot.broker.v1 import broker_pb2 as pb
        from splitpilot.broker.v1 import broker_pb2_grpc as rpc_pb
        from splitpilot.job.v1 import job_pb2

        self.grpc, self.pb, self.rpc_pb, self.job_pb2 = grpc, pb, rpc_pb, job_pb2
        spec = self.spec
        address = spec["address"]
        with open(spec["agent_token"], "rb") as handle:
            agent = parse_token_pem(handle.read(), spec["agent_token"])
        self.root = certificate_pem([agent.chain[-1]])
        self.options = [*CLIENT_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        agent_channel = grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(
            root_certificates=self.root, private_key=private_key_pem(agent.key),
            certificate_chain=certificate_pem([agent.chain[0]])), options=self.options)
        self.agent = rpc_pb.AgentServiceStub(agent_channel)
        der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        self.slot = pb.Slot(**SHAPES[0])
        self.leaf_pem = leaf_pem

        async def match_one(pilot_id: str = spec["pilot"]) -> Wrapper | None:
            key = ec.generate_private_key(ec.SECP256R1())
            request = pb.MatchRequest(slot=self.slot, pilot_id=pilot_id, node=spec["node"],
                                      job_public_key=key.public_key().public_bytes(der, spki))
            for _ in range(5):
                try:
                    response = await self.agent.Match(request, timeout=60)
                except grpc.aio.AioRpcError as exc:
                    self.error("Match", exc)
                    await asyncio.sleep(0.2)
                    continue
                if response.WhichOneof("result") != "job":
                    self.errors["Match: no job"] = self.errors.get("Match: no job", 0) + 1
                    return None
                job = response.job
                return Wrapper(job.job_id, job.attempt, job.job_token_pem, private_key_pem(key))
            return None

        self.match_one = match_one
        self.agent_credentials = grpc.ssl_channel_credentials(
            root_certificates=self.root, private_key=private_key_pem(agent.key),
            certificate_chain=certificate_pem([agent.chain[0]]))
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
            if not line or line[0] == "quit":
                break
            began_cpu, began = time.process_time(), time.monotonic()
            result = await getattr(self, f"phase_{line[0]}")(*line[1:])
            result = dict(result or {}, cpu=time.process_time() - began_cpu, seconds=time.monotonic() - began,
                          errors=dict(self.errors), first_error=self.first_error, channels=self.live())
            self.errors.clear()
            path = f"{spec['result']}.{line[0]}"
            with open(path, "wb") as handle:
                pickle.dump(result, handle)
            print(f"done {path}", flush=True)
        for holder in [*self.wrappers, *self.pilots]:
            if holder.channel is not None:
                await holder.channel.close()
        await agent_channel.close()
        return 0

    def live(self) -> int:
        return sum(1 for w in [*self.wrappers, *self.pilots] if w.channel is not None)

    # ------------------------------------------------------------ phases

    async def phase_match(self, count: str) -> dict:
        count = int(count)
        done: list[Wrapper] = []
        if self.design == "pilot":
            # Each job is matched under the pilot that will carry its liveness (PER_PILOT jobs each).
            self.pilots = [Pilot(f"{self.spec['pilot']}-{i}") for i in range(-(-count // self.per_pilot))]
            owners = [p for p in self.pilots for _ in range(self.per_pilot)][:count]
        else:
            owners = [None] * count
        todo = list(reversed(owners))

        async def agent() -> None:
            while todo:
                pilot = todo.pop()
                wrapper = await (self.match_one(pilot.pilot_id) if pilot is not None else self.match_one())
                if wrapper is None:
                    return
                done.append(wrapper)
                if pilot is not None:
                    pilot.jobs.append(wrapper)

        await asyncio.gather(*(agent() for _ in range(AGENTS_PER_PROCESS)))
        self.wrappers.extend(done[:count])
        return {"matched": len(done)}

    async def open(self, wrapper: Wrapper) -> bool:
        grpc = self.grpc
        credentials = grpc.ssl_channel_credentials(root_certificates=self.root, private_key=wrapper.key,
                                                   certificate_chain=self.leaf_pem(wrapper.token, "job token"))
        # Its own subchannel pool: one TLS connection per wrapper, as real wrappers (one per process) have.
        channel = grpc.aio.secure_channel(self.spec["address"], credentials, options=self.options)
        try:
            await asyncio.wait_for(channel.channel_ready(), 60)
        except TimeoutError as exc:
            self.error("connect", exc)
            await channel.close()
            return False
        wrapper.channel, wrapper.stub = channel, self.rpc_pb.JobServiceStub(channel)
        return True

    async def open_pilot(self, pilot: Pilot) -> bool:
        channel = self.grpc.aio.secure_channel(self.spec["address"], self.agent_credentials, options=self.options)
        try:
            await asyncio.wait_for(channel.channel_ready(), 60)
        except TimeoutError as exc:
            self.error("connect", exc)
            await channel.close()
            return False
        pilot.channel, pilot.stub = channel, self.rpc_pb.AgentServiceStub(channel)
        return True

    async def phase_connect(self) -> dict:
        limit = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one(holder) -> None:
            async with limit:
                await (self.open_pilot(holder) if isinstance(holder, Pilot) else self.open(holder))

        holders = self.pilots if self.design == "pilot" else self.wrappers
        await asyncio.gather(*(one(h) for h in holders if h.channel is None))
        return {}

    async def report(self, wrapper: Wrapper, states: tuple[int, ...]) -> bool:
        """Design "pilot": the wrapper connects for its reports and closes its channel after them."""
        if not await self.open(wrapper):
            return False
        try:
            for state in states:
                if not await self.update(wrapper, state):
                    return False
            return True
        finally:
            await wrapper.channel.close()
            wrapper.channel = wrapper.stub = None

    async def update(self, wrapper: Wrapper, state: int) -> bool:
        request = self.pb.UpdateStateRequest(state=state, sequence=wrapper.sequence)
        for _ in range(3):
            try:
                await wrapper.stub.UpdateState(request, timeout=60)
                wrapper.sequence += 1
                return True
            except self.grpc.aio.AioRpcError as exc:
                self.error("UpdateState", exc)
                if exc.code() not in (self.grpc.StatusCode.UNAVAILABLE, self.grpc.StatusCode.DEADLINE_EXCEEDED):
                    return False
        return False

    async def _updates(self, states: tuple[int, ...]) -> None:
        limit = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one(wrapper: Wrapper) -> None:
            async with limit:
                if self.design == "pilot":
                    await self.report(wrapper, states)
                    return
                for state in states:
                    if not await self.update(wrapper, state):
                        return

        live = {id(w) for p in self.pilots for w in p.jobs}
        await asyncio.gather(*(one(w) for w in self.wrappers
                               if (id(w) in live if self.design == "pilot" else w.stub is not None)))

    async def phase_start(self) -> dict:
        js = self.job_pb2
        await self._updates((js.JOB_STATE_STARTED, js.JOB_STATE_RUNNING))
        return {}

    async def phase_end(self) -> dict:
        js = self.job_pb2
        await self._updates((js.JOB_STATE_SAVING, js.JOB_STATE_DONE))
        return {}

    async def phase_beat(self, t0: str, measure: str, interval: str, churn_rate: str) -> dict:
        """Heartbeats from every wrapper at its own phase from T0; jobs ending and starting at CHURN_RATE/s."""
        t0, measure, interval, churn_rate = float(t0), float(measure), float(interval), float(churn_rate)
        end = t0 + measure
        records: list[tuple[float, float, float]] = []   # (done, latency, lateness)
        churned = [0]
        slots = list(self.wrappers)
        rng = random.Random(os.getpid())
        pb = self.pb
        js = self.job_pb2

        async def beat(index: int, phase: float) -> None:
            scheduled = t0 + phase
            while scheduled < end:
                delay = scheduled - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                wrapper = slots[index]
                if wrapper.stub is None:
                    return
                started = time.monotonic()
                try:
                    await wrapper.stub.Heartbeat(pb.HeartbeatRequest(cpu_seconds=1.0, rss_bytes=1 << 28),
                                                 timeout=30)
                except self.grpc.aio.AioRpcError as exc:
                    self.error("Heartbeat", exc)
                else:
                    done = time.monotonic()
                    records.append((done, done - started, started - scheduled))
                scheduled += interval

        async def churn() -> None:
            # One job ends and another starts every 1 / CHURN_RATE s (Poisson), as in a steady production day.
            if churn_rate <= 0:
                return
            await asyncio.sleep(max(0.0, t0 - time.monotonic()))
            while True:
                await asyncio.sleep(rng.expovariate(churn_rate))
                if time.monotonic() >= end:
                    return
                index = rng.randrange(len(slots))
                old = slots[index]
                new = await self.match_one()
                if new is None or not await self.open(new):
                    continue
                if not (await self.update(new, js.JOB_STATE_STARTED) and await self.update(new, js.JOB_STATE_RUNNING)):
                    continue
                self.wrappers.append(new)
                slots[index] = new          # its heartbeats go on through the new job's channel
                if old.stub is not None:
                    await self.update(old, js.JOB_STATE_SAVING)
                    await self.update(old, js.JOB_STATE_DONE)
                    # A heartbeat of the old job may still be in flight on its channel: let it finish.
                    await old.channel.close(grace=30)
                    old.channel = old.stub = None
                churned[0] += 1

        if self.design == "pilot":
            return await self.pilot_beat(t0, end, interval, churn_rate, rng)
        tasks = [beat(i, rng.uniform(0, interval)) for i in range(len(slots))]
        await asyncio.gather(churn(), *tasks)
        return {"records": records, "churned": churned[0]}

    async def pilot_beat(self, t0: float, end: float, interval: float, churn_rate: float,
                         rng: random.Random) -> dict:
        """Design "pilot": each pilot's heartbeat lists its jobs with their usage; churn as in beat."""
        records: list[tuple[float, float, float]] = []
        churned = [0]
        pb, js = self.pb, self.job_pb2
        usage = pb.AttemptUsage(cpu_seconds=1.0, rss_bytes=1 << 28, sandbox_bytes=1 << 20)

        async def beat(pilot: Pilot, phase: float) -> None:
            scheduled = t0 + phase
            while scheduled < end:
                delay = scheduled - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                request = pb.PilotHeartbeatRequest(
                    pilot_id=pilot.pilot_id, node=self.spec["node"], cores_in_use=len(pilot.jobs),
                    running=[pb.RunningAttempt(job_id=w.job_id, attempt=w.attempt, usage=usage) for w in pilot.jobs])
                started = time.monotonic()
                try:
                    answer = await pilot.stub.PilotHeartbeat(request, timeout=30)
                except self.grpc.aio.AioRpcError as exc:
                    self.error("PilotHeartbeat", exc)
                else:
                    done = time.monotonic()
                    records.append((done, done - started, started - scheduled))
                    if answer.stop:
                        self.errors["PilotHeartbeat: told to stop"] = \
                            self.errors.get("PilotHeartbeat: told to stop", 0) + len(answer.stop)
                scheduled += interval

        async def churn() -> None:
            if churn_rate <= 0:
                return
            await asyncio.sleep(max(0.0, t0 - time.monotonic()))
            while True:
                await asyncio.sleep(rng.expovariate(churn_rate))
                if time.monotonic() >= end:
                    return
                pilot = rng.choice(self.pilots)
                index = rng.randrange(len(pilot.jobs))
                old = pilot.jobs[index]
                new = await self.match_one(pilot.pilot_id)
                if new is None or not await self.report(new, (js.JOB_STATE_STARTED, js.JOB_STATE_RUNNING)):
                    continue
                self.wrappers.append(new)
                pilot.jobs[index] = new
                await self.report(old, (js.JOB_STATE_SAVING, js.JOB_STATE_DONE))
                churned[0] += 1

        tasks = [beat(p, rng.uniform(0, interval)) for p in self.pilots if p.stub is not None]
        await asyncio.gather(churn(), *tasks)
        return {"records": records, "churned": churned[0]}

    async def phase_idle(self) -> dict:
        return {}


# ====================================================================== the benchmark (parent)

def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Probe:
    """CPU ticks of a set of processes (brokers, PostgreSQL and its children) and the machine."""

    def __init__(self, brokers: list[BrokerProcess], db_pid: int | None) -> None:
        self.brokers, self.db_pid = brokers, db_pid

    def sample(self) -> dict:
        # The process's own counters: they keep the time of threads that have ended (gRPC's event-engine
        # pool and the store's thread pools grow and shrink; a sum over live threads would lose theirs).
        brokers = [_proc_stat(f"/proc/{b.proc.pid}/stat")[1] for b in self.brokers]
        threads = [_threads(b.proc.pid) for b in self.brokers]
        db = {}
        if self.db_pid:
            for pid in [self.db_pid, *_children_of(self.db_pid)]:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    db[pid] = _proc_stat(f"/proc/{pid}/stat")[1]
        return {"t": time.monotonic(), "brokers": brokers, "db": db, "machine": _machine(), "threads": threads[0]}

    @staticmethod
    def delta(a: dict, b: dict) -> dict:
        seconds = b["t"] - a["t"]
        brokers = [(y - x) / CLK_TCK for x, y in zip(a["brokers"], b["brokers"], strict=True)]
        db = sum(t - a["db"][p] for p, t in b["db"].items() if p in a["db"]) / CLK_TCK
        busy, total = (y - x for x, y in zip(a["machine"], b["machine"], strict=True))
        used: dict[str, float] = {}
        for tid, (name, ticks) in b["threads"].items():
            spent = (ticks - a["threads"].get(tid, (name, 0))[1]) / CLK_TCK / seconds
            used[name] = used.get(name, 0.0) + spent
        return {"threads": sorted(used.items(), key=lambda item: -item[1])[:4],
                "seconds": seconds, "brokers": brokers, "broker": sum(brokers), "db": db,
                "machine_cores": busy / total * (os.cpu_count() or 1) if total else 0.0}


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: str) -> None:
        from broker.ca import CertificateAuthority
        from pilot.tokens import TokenRole
        from pilot.tokens.files import write_private
        self.args, self.workdir = args, workdir
        os.makedirs(os.path.join(workdir, "logs"))
        os.makedirs(os.path.join(workdir, "tokens"))
        self.ca_dir = os.path.join(workdir, "ca")
        ca = CertificateAuthority.init(self.ca_dir)
        self.agent_tokens = []
        for g in range(args.processes):
            token = ca.new_token(TokenRole.AGENT, f"bench-agent-{g}", site=SITES[g % len(SITES)], queue="default")
            path = os.path.join(workdir, "tokens", f"agent-{g}.pem")
            write_private(path, token.to_pem())
            self.agent_tokens.append(path)
        self.rows: list[dict] = []
        self.run_count = 0
        self.profile_text = ""

    def queue(self, store, count: int) -> None:
        import datetime

        from splitpilot.job.v1 import job_pb2
        now = datetime.datetime.now(datetime.UTC)
        for start in range(0, count, 10_000):
            specs = [job_pb2.JobSpec(executable="bin/simulate", arguments=["--seed", str(start + i)],
                                     name=f"cp-{start + i}", output_patterns=["*.root"])
                     for i in range(min(10_000, count - start))]
            store.submit("bench", specs, now)

    # ------------------------------------------------------------ one size

    def measure(self, label: str, brokers: list[BrokerProcess], db_pid: int | None, store, size: int,
                intervals: list[float]) -> list[dict]:
        a = self.args
        self.run_count += 1
        probe = Probe(brokers, db_pid)
        windows = [(iv, self.window_for(iv)) for iv in intervals]
        churn_total = a.churn_scale * size / a.job_length          # jobs ending and starting per second
        extra = int(sum(churn_total * (w + 5) for _, w in windows) * 1.5) + 50
        self.queue(store, size + extra)
        procs = min(a.processes, max(1, size // 500))
        workers = []
        rows: list[dict] = []
        try:
            for p in range(procs):
                broker = brokers[p % len(brokers)]
                spec = {"address": broker.address, "agent_token": self.agent_tokens[p],
                        "pilot": f"cp-{self.run_count}-{p}", "node": f"wn{p:03d}.bench",
                        "design": a.design, "per_pilot": a.jobs_per_pilot,
                        "result": os.path.join(self.workdir, f"result-{self.run_count}-{p}")}
                spec_path = os.path.join(self.workdir, f"spec-{self.run_count}-{p}.json")
                with open(spec_path, "w") as handle:
                    json.dump(spec, handle)
                log = open(os.path.join(self.workdir, "logs", f"gen-{self.run_count}-{p}.log"), "wb")  # noqa: SIM115
                proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", spec_path],
                                        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                        text=True, start_new_session=True, preexec_fn=_die_with_parent())
                workers.append((proc, log))
            for proc, log in workers:
                if proc.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"a generator failed to start:\n{_tail(log.name)}")
            shares = [size // procs + (1 if p < size % procs else 0) for p in range(procs)]

            def phase(name: str, *params) -> tuple[dict, list[dict]]:
                before = probe.sample()
                for (proc, _log), share in zip(workers, shares, strict=True):
                    words = [name, *(str(x) for x in params)] if name != "match" else [name, str(share)]
                    proc.stdin.write(" ".join(words) + "\n")
                    proc.stdin.flush()
                results = []
                for proc, log in workers:
                    line = proc.stdout.readline().split()
                    if not line or line[0] != "done":
                        raise RuntimeError(f"a generator failed in {name}:\n{_tail(log.name)}")
                    with open(line[1], "rb") as handle:
                        results.append(pickle.load(handle))
                return Probe.delta(before, probe.sample()), results

            rss0 = [_rss(b.proc.pid) for b in brokers]
            fds0 = [_fds(b.proc.pid) for b in brokers]
            cost: dict[str, float] = {}
            match, results = phase("match")
            matched = sum(r["matched"] for r in results)
            cost["match"] = match["broker"] / max(1, matched)
            rss_matched = [_rss(b.proc.pid) for b in brokers]
            connect, results = phase("connect")
            channels = sum(r["channels"] for r in results)
            cost["connect"] = connect["broker"] / max(1, channels)
            time.sleep(3)
            rss_connected = [_rss(b.proc.pid) for b in brokers]
            start, results = phase("start")
            pilot_design = a.design == "pilot"
            if pilot_design:   # each wrapper opened its own channel for STARTED + RUNNING, then closed it
                cost["update"] = max(0.0, start["broker"] - matched * cost["connect"]) / max(1, 2 * matched)
            else:
                cost["update"] = start["broker"] / max(1, 2 * channels)
            errors = _errors(results)
            time.sleep(3)   # let the broker settle: what stays resident is what idle channels hold
            rss1 = [_rss(b.proc.pid) for b in brokers]
            fds1 = [_fds(b.proc.pid) for b in brokers]
            # What N idle channels cost with nothing sent (keepalive pings, the reaper, revocation refreshes):
            # taken out of the heartbeat window's CPU and counted in the model on its own.
            idle_before = probe.sample()
            time.sleep(5 if a.quick else 15)
            idle = Probe.delta(idle_before, probe.sample())
            cost["idle_cores"] = idle["broker"] / idle["seconds"]
            cost["idle_db_cores"] = idle["db"] / idle["seconds"]
            # Design pilot: the channels are the pilots' (measured right after they connected); per job is
            # everything the running jobs added, the allocator's high-water mark of the wrappers' short
            # connections included.
            per_channel = (sum(rss_connected if pilot_design else rss1) - sum(rss_matched)) / max(1, channels)
            per_job = (sum(rss1) - sum(rss_matched)) / max(1, matched)
            print(f"{label}, {size:,} wrappers in {procs} generator processes: matched {matched:,} "
                  f"({matched / match['seconds']:,.0f}/s, broker {cost['match'] * 1e3:.2f} ms CPU each), "
                  f"{channels:,} channels connected in {connect['seconds']:.1f} s (broker "
                  f"{cost['connect'] * 1e3:.2f} ms CPU per TLS handshake), STARTED+RUNNING "
                  f"{start['seconds']:.1f} s ({cost['update'] * 1e3:.2f} ms CPU per update); broker RSS "
                  f"{sum(rss0) / 2**20:,.0f} MiB at start, {sum(rss_matched) / 2**20:,.0f} after matching, "
                  f"{sum(rss1) / 2**20:,.0f} with the channels: {per_channel / 1024:.1f} KiB per channel, "
                  f"{per_job / 1024:.1f} KiB per running job; fds "
                  f"{sum(fds0)} -> {sum(fds1)}; idle with the channels open: broker {cost['idle_cores']:.3f} cores"
                  + (f", PostgreSQL {cost['idle_db_cores']:.3f}" if db_pid else "")
                  + (f"; errors {errors}" if errors else ""), flush=True)
            for interval, window in windows:
                churn = churn_total / len(workers)
                t0 = time.monotonic() + 1.0
                before_cpu = None
                for proc, _log in workers:
                    proc.stdin.write(f"beat {t0} {window} {interval} {churn}\n")
                    proc.stdin.flush()
                time.sleep(max(0.0, t0 - time.monotonic()))
                before_cpu = probe.sample()
                spy = None
                if a.profile and len(brokers) == 1 and size == max(a.sizes) and interval == windows[0][0]:
                    spy = self.start_profile(brokers[0], window)
                time.sleep(max(0.0, t0 + window - time.monotonic()))
                after_cpu = probe.sample()
                results = []
                for proc, log in workers:
                    line = proc.stdout.readline().split()
                    if not line or line[0] != "done":
                        raise RuntimeError(f"a generator failed in beat:\n{_tail(log.name)}")
                    with open(line[1], "rb") as handle:
                        results.append(pickle.load(handle))
                beat = Probe.delta(before_cpu, after_cpu)
                if spy is not None:
                    self.finish_profile(spy)
                row = self.beat_row(label, size, len(brokers), interval, beat, results, cost, per_channel,
                                    sum(fds1), sum(rss1), per_job)
                rows.append(row)
            end, results = phase("end")
            if pilot_design:
                cost["end_update"] = max(0.0, end["broker"] - matched * cost["connect"]) / max(1, 2 * matched)
            else:
                cost["end_update"] = end["broker"] / max(1, 2 * channels)
            for row in rows:
                row["end_update"] = cost["end_update"]
            for proc, _log in workers:
                proc.stdin.write("quit\n")
                proc.stdin.flush()
            for proc, log in workers:
                if proc.wait(timeout=120) != 0:
                    raise RuntimeError(f"a generator failed ({proc.returncode}):\n{_tail(log.name)}")
        finally:
            for proc, log in workers:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                log.close()
        self.rows.extend(rows)
        return rows

    def window_for(self, interval: float) -> float:
        """Measured seconds: two rounds of heartbeats (one with --quick), at least 10 s."""
        return max(10.0, interval * (1 if self.args.quick else 2))

    def beat_row(self, label: str, size: int, nbrokers: int, interval: float, beat: dict, results: list[dict],
                 cost: dict, per_channel: float, fds: int, rss: int, per_job: float) -> dict:
        records = sorted(r for result in results for r in result["records"])
        latencies = sorted(r[1] for r in records)
        late = sorted(r[2] for r in records)
        heartbeats = len(records)
        churned = sum(r["churned"] for r in results)
        seconds = beat["seconds"]
        handshakes = 2 if self.args.design == "pilot" else 1   # design pilot: a channel for the start, one for the end
        churn_cpu = churned * (cost["match"] + handshakes * cost["connect"] + 4 * cost["update"])
        idle_cpu = cost["idle_cores"] * seconds
        per_hb = max(0.0, beat["broker"] - churn_cpu - idle_cpu) / max(1, heartbeats)
        db_per_hb = max(0.0, beat["db"] - cost["idle_db_cores"] * seconds) / max(1, heartbeats)
        gen_cpu = sum(r["cpu"] for r in results) / max(1e-9, max(r["seconds"] for r in results))
        senders = -(-size // self.args.jobs_per_pilot) if self.args.design == "pilot" else size
        row = {"label": label, "size": size, "brokers": nbrokers, "interval": interval,
               "hb_rate": heartbeats / seconds, "churn_rate": churned / seconds, "expected_rate": senders / interval,
               "broker_cores": beat["broker"] / seconds, "per_broker_cores": [c / seconds for c in beat["brokers"]],
               "db_cores": beat["db"] / seconds, "gen_cores": gen_cpu, "machine_cores": beat["machine_cores"],
               "cpu_per_hb": per_hb, "db_per_hb": db_per_hb,
               "p50": _quantile(latencies, 0.5), "p99": _quantile(latencies, 0.99),
               "max": latencies[-1] if latencies else float("nan"), "late_p99": _quantile(late, 0.99),
               "per_channel": per_channel, "per_job": per_job, "fds": fds, "rss": rss, "errors": _errors(results),
               **{f"c_{k}": v for k, v in cost.items()}}
        print(f"  {label}, {size:,} jobs, heartbeat every {interval:g} s: {row['hb_rate']:,.0f} heartbeats/s "
              f"(offered {row['expected_rate']:,.0f}/s), {row['churn_rate']:.2f} jobs/s churned; broker "
              f"{row['broker_cores']:.3f} cores" + (f" ({' + '.join(f'{c:.3f}' for c in row['per_broker_cores'])})"
                                                     if nbrokers > 1 else "")
              + f" = {per_hb * 1e6:,.0f} us per heartbeat"
              + (f", PostgreSQL {row['db_cores']:.3f} cores ({row['db_per_hb'] * 1e6:,.0f} us per heartbeat)"
                 if row["db_cores"] else "")
              + f"; latency p50 {row['p50'] * 1e3:.1f} ms, p99 {row['p99'] * 1e3:.1f} ms, max "
              f"{row['max'] * 1e3:.0f} ms (sends late by {row['late_p99'] * 1e3:.0f} ms at p99); generators "
              f"{gen_cpu:.2f} cores, machine {row['machine_cores']:.2f} of {os.cpu_count()} cores busy; broker threads "
              + ", ".join(f"{name} {cores:.3f}" for name, cores in beat["threads"])
              + (f"; errors {row['errors']}" if row["errors"] else ""), flush=True)
        return row

    # ------------------------------------------------------------ py-spy

    def start_profile(self, broker: BrokerProcess, seconds: float):
        spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        if not os.access(spy, os.X_OK):
            self.profile_text = "  (py-spy not found: pip install py-spy into the venv)"
            return None
        out = os.path.join(self.workdir, "profile.txt")
        proc = subprocess.Popen([spy, "record", "--pid", str(broker.proc.pid), "--duration", str(int(seconds)),
                                 "--rate", "100", "--format", "raw", "--output", out, "--nonblocking"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, preexec_fn=_die_with_parent())
        return proc, out

    def finish_profile(self, spy) -> None:
        proc, out = spy
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if not os.path.exists(out):
            self.profile_text = f"  (py-spy failed: {err.strip()[-500:]})"
            return
        self.profile_text = summarise_profile(out, None)
        if self.args.keep_profile:
            shutil.copy(out, self.args.keep_profile)

    # ------------------------------------------------------------ scenarios

    def broker(self, name: str, db_url: str) -> BrokerProcess:
        # Nothing here heartbeats while thousands of jobs are matched and started (several minutes at 50k):
        # the reaper must not end the first ones meanwhile. The interval the broker advertises stays 30 s.
        broker = BrokerProcess(name, self.workdir, db_url, self.ca_dir, extra=("--heartbeat-timeout", "2h"))
        broker.wait_ready()
        return broker

    def scenario_sqlite(self, stack: contextlib.ExitStack) -> None:
        from broker.store import open_store
        a = self.args
        path = os.path.join(self.workdir, "cp.db")
        store = stack.enter_context(contextlib.closing(open_store(path)))
        broker = self.broker("sqlite", f"sqlite://{path}")
        stack.callback(broker.stop)
        print(f"broker pid {broker.proc.pid} (SQLite), RSS {_rss(broker.proc.pid) / 2**20:.0f} MiB", flush=True)
        for size in a.sizes:
            intervals = [a.interval]
            if a.sweep and a.sweep[0] == size:
                intervals += a.sweep[1]
            self.measure("sqlite, 1 broker", [broker], None, store, size, intervals)

    def scenario_pg(self, stack: contextlib.ExitStack) -> None:
        from broker.store import open_store
        from broker.store.base import StoreSettings
        sys.path.insert(0, os.path.join(REPO, "tests"))
        from pg import MissingPostgres, PostgresCluster
        a = self.args
        try:
            cluster = stack.enter_context(PostgresCluster())
        except MissingPostgres as exc:
            print(f"PostgreSQL: skipped ({exc})")
            return
        with open(os.path.join(cluster.data, "postmaster.pid")) as handle:
            postmaster = int(handle.readline())
        url = cluster.url()
        store = stack.enter_context(contextlib.closing(open_store(url, StoreSettings(extra={"pool_size": 2}))))
        pair = [self.broker(f"pg-{x}", url) for x in "ab"]
        for broker in pair:
            stack.callback(broker.stop)
        for size in a.pg_sizes:
            self.measure("postgres, 2 brokers", pair, postmaster, store, size, [a.interval])

    # ------------------------------------------------------------ report and model

    def report(self) -> int:
        a = self.args
        print()
        print(f"{'run':<22} {'wrappers':>8} {'I s':>4} {'hb/s':>6} {'broker':>6} {'us/hb':>6} {'pg':>5} "
              f"{'p50 ms':>7} {'p99 ms':>7} {'late99':>6} {'KiB/ch':>6} {'fds':>6} {'RSS MiB':>7} {'match':>6} "
              f"{'tls':>6} {'upd':>6} {'gen':>5} {'KiB/job':>7}")
        for r in self.rows:
            db = f"{r['db_cores']:.2f}" if r["db_cores"] else "-"
            print(f"{r['label']:<22} {r['size']:>8,} {r['interval']:>4g} {r['hb_rate']:>6,.0f} "
                  f"{r['broker_cores']:>6.3f} {r['cpu_per_hb'] * 1e6:>6,.0f} "
                  f"{db:>5} "
                  f"{r['p50'] * 1e3:>7.1f} {r['p99'] * 1e3:>7.1f} {r['late_p99'] * 1e3:>6.0f} "
                  f"{r['per_channel'] / 1024:>6.1f} {r['fds']:>6,} {r['rss'] / 2**20:>7,.0f} "
                  f"{r['c_match'] * 1e3:>6.2f} {r['c_connect'] * 1e3:>6.2f} {r['c_update'] * 1e3:>6.2f} "
                  f"{r['gen_cores']:>5.2f} {r['per_job'] / 1024:>7.1f}")
        print("  (broker: cores used by the broker process(es) in the window; us/hb: broker CPU per heartbeat, the "
              "churn's share taken out; pg: PostgreSQL cores; late99: how late the generators sent, p99 ms; "
              "KiB/ch: broker RSS per idle connected channel; match/tls/upd: broker CPU ms per Match, per TLS "
              "handshake, per UpdateState; gen: the generators' cores)")
        sqlite = [r for r in self.rows if r["brokers"] == 1 and r["interval"] == a.interval]
        if not sqlite:
            return 1
        model = sqlite[-1]
        pilot_design = a.design == "pilot"
        per_hb_jobs = a.jobs_per_pilot if pilot_design else 1    # jobs whose liveness one heartbeat carries
        c_hb = model["cpu_per_hb"] / per_hb_jobs
        c_job = (model["c_match"] + (2 if pilot_design else 1) * model["c_connect"] + 2 * model["c_update"]
                 + 2 * model["end_update"])
        c_idle = model["c_idle_cores"] / model["size"]      # core-seconds per second per running job
        per_wrapper = c_idle + c_hb / a.interval + c_job / a.job_length
        per_core = int(1 / per_wrapper) if per_wrapper > 0 else 0
        if self.profile_text:
            print("\nWhere the broker's event-loop thread spends its time (py-spy, heartbeat window):")
            print(self.profile_text)
        if pilot_design:
            print(f"\nDesign 'pilot': {a.jobs_per_pilot} jobs per pilot; one heartbeat carries them all (c_hb below "
                  f"is per job: {model['cpu_per_hb'] * 1e6:,.0f} us per pilot heartbeat / {a.jobs_per_pilot}); "
                  "each job's wrapper opens a channel for its start and one for its end.")
        print(f"\nModel (SQLite, {model['size']:,} jobs): one running job costs c_idle + c_hb / I + c_job / L = "
              f"{c_idle * 1e6:.1f} us/s + {c_hb * 1e6:,.0f} us / {a.interval:g} s + {c_job * 1e3:.2f} ms / "
              f"{a.job_length:,.0f} s = "
              f"{per_wrapper * 1e6:.1f} us of broker CPU per second, so one core holds {per_core:,} wrappers "
              f"(c_job = match {model['c_match'] * 1e3:.2f} + {2 if pilot_design else 1} x TLS handshake "
              f"{model['c_connect'] * 1e3:.2f} + "
              f"2 x {model['c_update'] * 1e3:.2f} + 2 x {model['end_update'] * 1e3:.2f} ms).")
        sweep = [r for r in self.rows if r["brokers"] == 1 and r["size"] == model["size"]]
        ok = [r for r in self.rows if r["brokers"] == 1 and r["p99"] < TARGET_P99_S and r["late_p99"] < 0.5]
        if ok:
            best = max(ok, key=lambda r: r["hb_rate"])
            print(f"Highest heartbeat rate measured with p99 < 1 s: {best['hb_rate']:,.0f}/s ({best['size']:,} "
                  f"wrappers every {best['interval']:g} s) at {best['broker_cores']:.2f} broker cores: "
                  f"{best['hb_rate'] * a.interval * per_hb_jobs:,.0f} running jobs at {a.interval:g} s heartbeats.")
        if len(sweep) > 1:
            print("Sweep at " + f"{model['size']:,} wrappers: " + "; ".join(
                f"I={r['interval']:g} s: {r['hb_rate']:,.0f}/s, {r['broker_cores']:.2f} cores, "
                f"{r['cpu_per_hb'] * 1e6:,.0f} us/hb, p99 {r['p99'] * 1e3:.0f} ms" for r in sweep))
        jobs = 150_000
        hb_rate, starts = jobs / a.interval, jobs / a.job_length
        cores = jobs * per_wrapper
        pg_rows = [r for r in self.rows if r["brokers"] > 1]
        print(f"150k running jobs of {a.job_length / 3600:g} h at {a.interval:g} s heartbeats: {hb_rate:,.0f} "
              f"heartbeats/s, {starts:.0f} starts/s ({4 * starts:.0f} state updates/s): {cores:.1f} broker cores "
              f"at the SQLite figure")
        if pg_rows:
            p = pg_rows[-1]
            pg_hb = p["cpu_per_hb"]
            per_wrapper_pg = p["c_idle_cores"] / p["size"] + pg_hb / a.interval + c_job / a.job_length
            writes = hb_rate + 4 * starts + starts  # heartbeat + updates + the match's claim
            print(f"  on PostgreSQL (2 brokers, {p['size']:,} wrappers: {p['cpu_per_hb'] * 1e6:,.0f} us of broker "
                  f"CPU and {p['db_per_hb'] * 1e6:,.0f} us of PostgreSQL CPU per heartbeat): "
                  f"{jobs * per_wrapper_pg:.1f} broker cores (brokers at 70% of a core each: "
                  f"{jobs * per_wrapper_pg / 0.7:.0f} processes), PostgreSQL {writes:,.0f} write transactions/s "
                  f"and {hb_rate * p['db_per_hb']:.1f} cores for the heartbeats alone")
        print("\nTargets:")
        mem = max(r["per_channel"] for r in self.rows) / 1024
        per_job_mem = max(r["per_job"] for r in self.rows) / 1024
        print(f"  >= {TARGET_PER_CORE:,} wrappers per broker core at {a.interval:g} s: {per_core:,} "
              f"{'met' if per_core >= TARGET_PER_CORE else 'MISSED'}")
        print(f"  <= {TARGET_CHANNEL_KB:.0f} KB broker memory per idle channel: {mem:.1f} KiB (worst size) "
              f"{'met' if mem * 1.024 <= TARGET_CHANNEL_KB else 'MISSED'}; per running job (what the target "
              f"is for: one channel per {per_hb_jobs} job(s)): {per_job_mem:.1f} KiB "
              f"{'met' if per_job_mem * 1.024 <= TARGET_CHANNEL_KB else 'MISSED'}")
        print(f"wrappers_per_broker_core: {per_core}")
        return 0


def _errors(results: list[dict]) -> dict:
    errors: dict[str, int] = {}
    for result in results:
        for name, n in result["errors"].items():
            errors[name] = errors.get(name, 0) + n
    return errors


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker_main(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1,000 wrappers, 10 s heartbeats, short "
                                                             "windows, no PostgreSQL")
    parser.add_argument("--sizes", default="1000,5000,10000,19000", help="wrapper counts (SQLite)")
    parser.add_argument("--pg-sizes", default="5000,10000", help="wrapper counts (2 brokers on PostgreSQL)")
    parser.add_argument("--interval", type=float, default=30.0, help="heartbeat interval, s (default 30)")
    parser.add_argument("--sweep", default="", metavar="N:I1,I2",
                        help="also run N wrappers at these shorter intervals (e.g. 20000:10,5,2)")
    parser.add_argument("--job-length", type=float, default=3600.0, help="job length, s (churn: N / L per s)")
    parser.add_argument("--churn-scale", type=float, default=1.0, help="multiply the churn rate (0: none)")
    parser.add_argument("--processes", type=int, default=4, help="generator processes (default 4)")
    parser.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--design", choices=("wrapper", "pilot"), default="wrapper",
                        help="wrapper: every wrapper holds a channel and heartbeats (brokers before liveness from "
                             "the pilot, and older agents); pilot: pilot heartbeats carry their jobs' liveness and "
                             "wrappers connect only for their state reports (default: wrapper)")
    parser.add_argument("--jobs-per-pilot", type=int, default=8,
                        help="design pilot: jobs one pilot runs (an 8-core slot of 1-core jobs: 8; default 8)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the broker during the first window of the largest SQLite size "
                             "(pip install py-spy)")
    parser.add_argument("--keep-profile", metavar="FILE", help="copy py-spy's raw (collapsed) stacks to FILE")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs) at the end")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.pg_sizes = [int(s) for s in args.pg_sizes.split(",") if s]
    if args.quick:
        args.sizes, args.interval, args.no_pg = [1000], 10.0, True
    if args.sweep:
        size, _, intervals = args.sweep.partition(":")
        args.sweep = (int(size), [float(i) for i in intervals.split(",") if i])
    # Every channel is a socket on both sides: the broker and the generators inherit this limit.
    # (Up to the hard limit: raising that needs CAP_SYS_RESOURCE, which a container may not have; a size
    # that does not fit is refused here rather than failing mid-run.)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    wanted = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    # A connection per wrapper, or per pilot (design pilot: wrappers connect only for their reports).
    per = args.jobs_per_pilot if args.design == "pilot" else 1
    too_big = [n for n in args.sizes if n // per + 500 > wanted] + \
        [n for n in args.pg_sizes if n // per // 2 + 500 > wanted]
    if too_big:
        parser.error(f"sizes {too_big} need more descriptors than RLIMIT_NOFILE allows here ({wanted}; the hard "
                     "limit can only be raised with CAP_SYS_RESOURCE): use smaller sizes")

    def terminate(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    workdir = tempfile.mkdtemp(prefix="splitpilot-cp-bench-")
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, workdir], stdin=subprocess.PIPE,
                                start_new_session=True)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; sizes {args.sizes}, heartbeat "
          f"every {args.interval:g} s, jobs of {args.job_length:,.0f} s; work directory {workdir}", flush=True)
    began = time.monotonic()
    try:
        bench = Bench(args, workdir)
        scenarios = ["sqlite"] + ([] if args.no_pg else ["pg"])
        for name in scenarios:
            with contextlib.ExitStack() as stack:
                getattr(bench, f"scenario_{name}")(stack)
        print(f"\n(all runs took {time.monotonic() - began:.0f} s; load average {os.getloadavg()[0]:.2f} at end)")
        return bench.report()
    except KeyboardInterrupt:
        print("\ninterrupted: brokers, generators and PostgreSQL stopped, temporary files removed", file=sys.stderr)
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
