"""The agent's loop with a fake broker and real wrapper processes.

The wrapper processes are real (`tests/fake_job_broker.py`: the Wrapper with
a file-backed broker link), so every job really runs: partitioning, limits,
stops, failures and the black-hole guard are exercised end to end on the
agent's side. The broker-facing calls are recorded by FakeAgentBroker.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from pilot.agent.agent import Agent, AgentSettings, job_limits, sandbox_for
from pilot.agent.brokerlink import NoOffer, Offer
from pilot.agent.jobrun import JobRun, RunSettings
from pilot.agent.slot import SlotResources
from pilot.pipe import messages as m
from pilot.pipe.channel import spawn_with_channel

HERE = Path(__file__).parent


class FakeAgentBroker:
    address = "127.0.0.1:1"
    ca_pem = b"CA"

    def __init__(self, specs: list[m.JobSpec]) -> None:
        self.queue = list(specs)
        self.matched: list[tuple[int, int]] = []
        self.slots = []
        self.failures: list[tuple[int, int, int, str]] = []
        self.ends: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        self._next = 100

    def match(self, slot, pilot_id, node):
        with self._lock:
            self.slots.append(slot)
            for index, spec in enumerate(self.queue):
                req = spec.requirements
                if max(1, req.cores) <= slot.cores and req.memory_mb <= slot.memory_mb:
                    self.queue.pop(index)
                    self._next += 1
                    self.matched.append((self._next, 1))
                    return Offer(self._next, 1, spec, b"CERT", b"KEY", int(time.time()) + 3600)
        return NoOffer("queue empty", 0.2)

    def pilot_heartbeat(self, pilot_id, node, running, cores_in_use):
        return [], False

    def report_pilot_end(self, pilot_id, node, jobs_run, reason):
        self.ends.append((jobs_run, reason))

    def report_attempt_failure(self, job_id, attempt, failure, detail, pilot_id):
        self.failures.append((job_id, attempt, failure, detail))

    def close(self):
        pass


def script_spec(script: str, tmp: Path, *, cores=1, memory_mb=500, name="job") -> m.JobSpec:
    inputs = tmp / "broker" / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    path = inputs / f"{name}.sh"
    path.write_text(script)
    sums_file = tmp / "broker" / "inputs.json"
    sums = json.loads(sums_file.read_text()) if sums_file.exists() else {}
    sums[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    sums_file.write_text(json.dumps(sums))
    return m.JobSpec(executable=f"./{path.name}", name=name, input_files=[m.InputFile(name=path.name)],
                     requirements=m.Requirements(cores=cores, memory_mb=memory_mb, disk_mb=100, walltime_s=600))


def make_agent(tmp: Path, broker, *, cores=2, memory_mb=2000, lifetime=600, idle=1.5, wrapper=None,
               black_hole=3, monitor=0.3):
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    slot = SlotResources(cores, memory_mb, 10_000, time.time() + lifetime, "test")
    settings = AgentSettings(work_dir=str(work), idle_timeout_s=idle, min_backoff_s=0.1, max_backoff_s=0.3,
                             min_job_time_s=5, black_hole_failures=black_hole,
                             run=RunSettings(monitor_interval_s=monitor, ready_timeout_s=30, stop_deadline_s=3,
                                             limit_stop_deadline_s=2))
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": f"{HERE.parent}{os.pathsep}{HERE}"}
    argv = wrapper or [sys.executable, str(HERE / "fake_job_broker.py"), str(tmp / "broker")]

    def make_run(offer, on_done):
        sandbox = sandbox_for(str(work), offer)
        return JobRun(offer, spawn_wrapper=lambda: spawn_with_channel(argv, env=env, stderr=subprocess.DEVNULL),
                      sandbox_host=sandbox, sandbox_inside=sandbox, software_inside="", broker_address="x",
                      ca_pem=b"CA", agent_id=settings.pilot_id, limits=job_limits(offer.spec),
                      deadline_unix=0, settings=settings.run, on_done=on_done)
    return Agent(broker, slot, settings, make_run, containers=False)


def states(tmp: Path) -> list[int]:
    path = tmp / "broker" / "states.jsonl"
    return [json.loads(line)["state"] for line in path.read_text().splitlines()] if path.exists() else []


def test_runs_jobs_concurrently_then_leaves_idle(tmp_path):
    specs = [script_spec("#!/bin/sh\nsleep 1\n", tmp_path, name=f"j{i}") for i in range(4)]
    broker = FakeAgentBroker(specs)
    agent = make_agent(tmp_path, broker, cores=2)
    assert agent.run() == 0
    assert len(broker.matched) == 4 and broker.queue == []
    assert broker.ends == [(4, "idle")]
    assert states(tmp_path).count(m.JobState.JOB_STATE_DONE) == 4
    # Partitioning: with 2 cores, never more than 2 one-core jobs at once.
    assert min(s.cores for s in broker.slots) >= 0 and max(s.cores for s in broker.slots) == 2
    assert all(s.cores > 0 for s in broker.slots)  # it does not ask when nothing is free
    assert not os.listdir(tmp_path / "work")  # sandboxes removed


def test_empty_pilot_leaves_and_says_so(tmp_path):
    broker = FakeAgentBroker([])
    agent = make_agent(tmp_path, broker, idle=0.5)
    assert agent.run() == 0
    assert broker.ends == [(0, "idle: no job matched (empty pilot)")]


def test_shutdown_stops_jobs_with_a_deadline_and_reports_them(tmp_path):
    broker = FakeAgentBroker([script_spec("#!/bin/sh\ntrap '' TERM\nsleep 1000\n", tmp_path)])
    agent = make_agent(tmp_path, broker, idle=30)
    thread = threading.Thread(target=agent.run)
    thread.start()
    deadline = time.monotonic() + 30
    while m.JobState.JOB_STATE_RUNNING not in states(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    agent.request_shutdown("test: SIGTERM from HTCondor", m.StopReason.STOP_REASON_PREEMPTED)
    thread.join(timeout=60)
    assert not thread.is_alive()
    (job_id, attempt, failure, detail), = broker.failures
    assert failure == 3 and "STOP_REASON_PREEMPTED" in detail  # STOPPED: the broker re-queues it
    assert broker.ends[0][1].startswith("test: SIGTERM")


def test_memory_hog_is_killed_with_the_reason(tmp_path):
    hog = ("#!/bin/sh\nexec python3 -c 'import time; x = bytearray(400 << 20); "
           "x[::4096] = b\"x\" * len(x[::4096]); time.sleep(100)'\n")
    broker = FakeAgentBroker([script_spec(hog, tmp_path, memory_mb=100)])
    agent = make_agent(tmp_path, broker, idle=0.5)
    agent.run()
    (job_id, attempt, failure, detail), = broker.failures
    assert failure == 4 and "exceeds the limit of 100 MiB" in detail


def test_wrapper_crashes_trip_the_black_hole_guard(tmp_path):
    specs = [script_spec("#!/bin/sh\ntrue\n", tmp_path, name=f"j{i}") for i in range(5)]
    broker = FakeAgentBroker(specs)
    crashing = [sys.executable, "-c", "import os; os._exit(1)"]
    agent = make_agent(tmp_path, broker, cores=1, wrapper=crashing, black_hole=2, idle=30)
    assert agent.run() == 3
    assert [f[2] for f in broker.failures] == [1, 1]  # WRAPPER: re-queued, never blamed on the payload
    assert len(broker.matched) == 2 and len(broker.queue) == 3  # stopped taking work
    assert broker.ends[0][1].startswith("black hole")


def test_no_match_when_time_left_cannot_fit_a_job(tmp_path):
    broker = FakeAgentBroker([script_spec("#!/bin/sh\ntrue\n", tmp_path)])
    agent = make_agent(tmp_path, broker, lifetime=7, idle=30)  # 7 s - 3 s stop deadline < 5 s minimum
    assert agent.run() == 0
    assert broker.matched == [] and broker.ends[0][1] in ("too little time left for any job",
                                                         "the slot's lifetime ends")
