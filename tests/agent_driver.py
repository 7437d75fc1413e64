"""A real agent process (pilot.agent.agent.Agent) with a file-recording broker, for tests that must signal or
watch the agent from outside.

    agent_driver.py CONFIG.json          run an agent as CONFIG says (see main)
    agent_driver.py --error-wrapper      be a wrapper that answers JobStart with Error(code 42), as a newer
                                         wrapper with an ErrorCode this agent does not know would

The broker records into CONFIG["events"] (JSON lines): {"event": "matched" | "failure" | "end" |
"signalled", ...}. CONFIG["inject"] = "sigterm-inside-the-loop": once a job has started, the driver sends
SIGTERM to its own process from inside the main loop: inside the section guarded by the agent's `_lock`
when the agent has one (the design of issue 11's first bug: its handler took that lock), else from inside
the main thread's next broker call. The handler then runs while the main thread is in the middle of its work.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

from pilot import logconfig
from pilot.agent.agent import Agent, AgentSettings, job_limits, sandbox_for
from pilot.agent.brokerlink import NoOffer, Offer
from pilot.agent.jobrun import JobRun, RunSettings
from pilot.agent.slot import SlotResources
from pilot.pipe import messages as m
from pilot.pipe.channel import spawn_with_channel


class RecordingBroker:
    address = "127.0.0.1:1"
    ca_pem = b"CA"

    def __init__(self, specs: list[m.JobSpec], events: str) -> None:
        self.queue = list(specs)
        self.events = events
        self.next_id = 100
        self.lock = threading.Lock()
        self.on_match = None   # called in match() (the main thread), for injections

    def record(self, **event) -> None:
        with self.lock, open(self.events, "a") as handle:
            handle.write(json.dumps(event) + "\n")

    def match(self, slot, pilot_id, node):
        if self.on_match is not None:
            self.on_match()
        if self.queue and slot.cores >= 1:
            spec = self.queue.pop(0)
            self.next_id += 1
            self.record(event="matched", job=self.next_id)
            return Offer(self.next_id, 1, spec, b"CERT", b"KEY", int(time.time()) + 3600)
        return NoOffer("queue empty", 0.2)

    def pilot_heartbeat(self, pilot_id, node, running, cores_in_use):
        return [], False

    def report_pilot_end(self, pilot_id, node, jobs_run, reason):
        self.record(event="end", jobs_run=jobs_run, reason=reason)

    def report_attempt_failure(self, job_id, attempt, failure, detail, pilot_id):
        self.record(event="failure", job=job_id, failure=failure, detail=detail)

    def close(self):
        pass


class SignallingLock:
    """A lock that, the first time the main thread holds it once armed, sends SIGTERM to this process."""

    def __init__(self, broker: RecordingBroker) -> None:
        self._lock = threading.Lock()
        self.broker = broker
        self.armed = False

    def __enter__(self):
        self._lock.acquire()
        if self.armed and threading.current_thread() is threading.main_thread():
            self.armed = False
            self.broker.record(event="signalled", inside="the agent's lock")
            os.kill(os.getpid(), signal.SIGTERM)   # the handler runs at the next bytecode: inside this section
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


def error_wrapper() -> int:
    from pilot.pipe.channel import PipeChannel, claim_stdio
    from pilot.pipe.protocol import Role

    read_fd, write_fd = claim_stdio()
    with PipeChannel(Role.WRAPPER, read_fd, write_fd) as channel:
        channel.send(m.make_ready())
        channel.expect(m.Hello)
        channel.expect(m.JobStart)
        channel.send(m.Error(code=42, message="a failure only a newer wrapper can name"))
    return 0


def main(config_path: str) -> int:
    with open(config_path) as handle:
        config = json.load(handle)
    logconfig.configure(config.get("log_level", "info"))   # as `splitpilot agent` does
    specs = [m.JobSpec.FromString(bytes.fromhex(h)) for h in config["specs"]]
    broker = RecordingBroker(specs, config["events"])
    work = config["work"]
    slot = SlotResources(config.get("cores", 1), 4000, 10_000, time.time() + 600, "driver")
    settings = AgentSettings(work_dir=work, idle_timeout_s=config.get("idle", 1.0), min_backoff_s=0.1,
                             max_backoff_s=0.3, min_job_time_s=5, black_hole_failures=config.get("black_hole", 3),
                             run=RunSettings(monitor_interval_s=0.3, ready_timeout_s=30, stop_deadline_s=5))

    def make_run(offer, on_done):
        sandbox = sandbox_for(work, offer)
        return JobRun(offer, spawn_wrapper=lambda: spawn_with_channel(config["wrapper"], env=config["env"]),
                      sandbox_host=sandbox, sandbox_inside=sandbox, software_inside="", broker_address="x",
                      ca_pem=b"CA", agent_id=settings.pilot_id, limits=job_limits(offer.spec), deadline_unix=0,
                      settings=settings.run, on_done=on_done)

    agent = Agent(broker, slot, settings, make_run, containers=False)
    agent.install_signal_handlers()
    if config.get("inject") == "sigterm-inside-the-loop":
        if hasattr(agent, "_lock"):
            lock = agent._lock = SignallingLock(broker)
            original = agent.make_run

            def arm_after_start(offer, on_done):
                lock.armed = True
                return original(offer, on_done)
            agent.make_run = arm_after_start
        else:
            state = {"armed": False, "done": False}
            original = agent.make_run

            def arm_after_start(offer, on_done):
                state["armed"] = True
                return original(offer, on_done)
            agent.make_run = arm_after_start

            def inside_match():
                if state["armed"] and not state["done"]:
                    state["done"] = True
                    broker.record(event="signalled", inside="a broker call of the main thread")
                    os.kill(os.getpid(), signal.SIGTERM)
            broker.on_match = inside_match
    return agent.run()


if __name__ == "__main__":
    if sys.argv[1] == "--error-wrapper":
        sys.exit(error_wrapper())
    sys.exit(main(sys.argv[1]))
