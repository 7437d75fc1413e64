"""A running job's liveness rides on its pilot's heartbeats; its wrapper holds no connection between calls.

A real broker with a 6 s heartbeat timeout (wrappers would heartbeat every 2 s), a real agent and wrapper
(process runtime, as nobody). The payload outlives the timeout twice over with no Heartbeat RPC from its
wrapper: the agent's PilotHeartbeat vouches for it. While it runs, the broker holds one connection (the
agent's): the wrapper's closed itself after pilot.wrapper.broker_link.IDLE_CONNECTION_S without a call.
A kill reaches the payload through the agent.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from test_pilot_e2e import payload_spec, processes_in, start_agent, wait_final, wait_for

from broker.server import BrokerConfig, BrokerServer
from broker.store.base import StoreSettings
from pilot.api.client import BrokerClient
from pilot.api.states import JobState
from pilot.launch import build_software_area
from pilot.tokens import TokenRole
from pilot.wrapper.broker_link import IDLE_CONNECTION_S

TIMEOUT = datetime.timedelta(seconds=6)


@pytest.fixture(scope="module")
def world():
    base = Path(tempfile.mkdtemp(prefix="splitpilot-liveness-"))
    os.chmod(base, 0o755)
    server = BrokerServer(BrokerConfig(state_dir=str(base / "broker"), listen="127.0.0.1:0", reap_interval=0.5,
                                       store_settings=StoreSettings(heartbeat_timeout=TIMEOUT)))
    server.start()
    try:
        software = base / "software"
        build_software_area(software)
        user = server.ca.new_token(TokenRole.USER, "liveness-user")
        with BrokerClient(server.address, user, server.ca_pem) as client:
            yield {"base": base, "server": server, "client": client, "software": software}
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def rpcs(server, method: str) -> float:
    """RPCs of METHOD (its bare name) the broker handled, whatever their status."""
    total = 0.0
    for metric in server.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "splitpilot_rpc_requests_total" and \
                    sample.labels["method"].rsplit("/", 1)[-1] == method:
                total += sample.value
    return total


def descendants(pid: int) -> list[int]:
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def wrapper_pids(agent_pid: int) -> list[int]:
    pids = []
    for pid in descendants(agent_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        if b"pilot.wrapper" in argv:
            pids.append(pid)
    return pids


def connections_of(pids: list[int], port: int) -> int:
    """Established TCP connections held by the processes PIDS to PORT (matched by socket inode)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            for line in handle.readlines()[1:]:
                fields = line.split()
                if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                    count += 1
    return count


def stop(agent) -> None:
    if agent.poll() is None:
        agent.terminate()
        agent.wait(timeout=60)


def test_a_job_lives_on_its_pilots_heartbeats_with_no_wrapper_connection_between_calls(world):
    server, client = world["server"], world["client"]
    port = int(server.address.rsplit(":", 1)[1])
    script = world["base"] / "long.sh"
    # Runs until told to end (a file the test writes), at least twice the heartbeat timeout.
    release = world["base"] / "release-long"
    script.write_text(f"#!/bin/sh\nwhile [ ! -e {release} ]; do sleep 0.2; done\necho done > result.out\n")
    job_id = client.submit([payload_spec(client, script, "long")])[0]
    heartbeats_before = rpcs(server, "Heartbeat")
    agent = start_agent(world, "long", "process", as_nobody=True, idle="2s")
    try:
        wait_for(lambda: client.status(job_id).state is JobState.RUNNING, 60, "the job to run")
        running_since = wait_for(lambda: client.status(job_id).usage_at, 30, "usage figures from the pilot")
        wrapper = wait_for(lambda: wrapper_pids(agent.pid), 30, "the wrapper process")
        # It holds a connection right after its state reports (the test would not see a wrapper that never
        # connects otherwise)...
        assert connections_of(wrapper, port) == 1
        # ... then it closes after IDLE_CONNECTION_S without a call; the agent's stays.
        assert client.status(job_id).history[-1].state is JobState.RUNNING
        wait_for(lambda: connections_of(wrapper, port) == 0, IDLE_CONNECTION_S + 30,
                 "the wrapper's connection to close")
        others = [pid for pid in [agent.pid, *descendants(agent.pid)] if pid not in wrapper]
        assert connections_of(others, port) == 1     # the agent's (the guardian has none)
        assert client.status(job_id).state is JobState.RUNNING
        # Alive for more than twice the heartbeat timeout after that, its liveness refreshed by the pilot.
        wait_for(lambda: client.status(job_id).usage_at - running_since > 2 * TIMEOUT, 60,
                 "two heartbeat timeouts of pilot-carried liveness")
        status = client.status(job_id)
        assert (status.state, status.attempt) == (JobState.RUNNING, 1), status
        assert connections_of(wrapper, port) == 0
        release.touch()
        final = wait_final(client, job_id, timeout=60)
        assert (final.state, final.attempt) == (JobState.DONE, 1), final
    finally:
        release.touch()
        stop(agent)
    assert rpcs(server, "Heartbeat") == heartbeats_before       # the wrapper never heartbeat the broker
    assert rpcs(server, "PilotHeartbeat") >= 3
    assert server.metrics.registry.get_sample_value("splitpilot_reaped_total", {"cause": "lost"}) in (None, 0.0)


def test_a_kill_reaches_the_payload_through_its_agent(world):
    client = world["client"]
    script = world["base"] / "forever.sh"
    script.write_text("#!/bin/sh\nsleep 600\n")
    job_id = client.submit([payload_spec(client, script, "forever")])[0]
    agent = start_agent(world, "kill", "process", as_nobody=True, idle="2s")
    work = world["base"] / "work-kill"
    try:
        wait_for(lambda: client.status(job_id).state is JobState.RUNNING, 60, "the job to run")
        wait_for(lambda: processes_in(work), 30, "the payload's processes")
        client.kill(job_id, "no longer needed")
        # The broker fences the attempt; the agent's next heartbeat (every 2 s) is told to stop it.
        wait_for(lambda: not processes_in(work), 60, "the payload to be stopped")
        final = client.status(job_id)
        assert final.state is JobState.KILLED and final.attempt == 1, final
    finally:
        stop(agent)
