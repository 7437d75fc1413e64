"""Issue 11, node side, against the real thing: a real broker (mTLS, SQLite), real `splitpilot agent`
processes (process launcher as an unprivileged user, as in a glidein), real wrappers and payloads.

- the job's own mistakes never empty a pilot (nor are they retried or charged to the node);
- a job outliving its first token is refreshed and finishes DONE;
- a broker restarted while a job runs, saves and reports costs no job and no payload run;
- the agent's own reports are retried across a broker restart;
- an attempt the broker ended (an admin's requeue) has its payload stopped within seconds;
- without isolation, what a job left running is killed before its folder goes and before it is reported;
- an agent killed with -9 leaves job folders that the next agent in that work dir removes (links not
  followed), and two live agents never share a work dir.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from broker.server import BrokerConfig, BrokerServer
from broker.services.base import ServiceSettings
from pilot.api.client import AdminClient, BrokerClient
from pilot.api.states import JobState
from pilot.launch import build_software_area
from pilot.pipe import messages as m
from pilot.tokens import TokenRole
from tests.test_pilot_e2e import agent_command, processes_in, shared_folder, wait_final, wait_for

HERE = Path(__file__).parent
USER = "faults-user"


@pytest.fixture(scope="module")
def software():
    """A software area an unprivileged agent can read."""
    base = Path(tempfile.mkdtemp(prefix="splitpilot-faults-software-"))
    os.chmod(base, 0o755)
    try:
        yield build_software_area(base / "software")
    finally:
        shutil.rmtree(base, ignore_errors=True)


class World(dict):
    """What tests/test_pilot_e2e's helpers expect (base, server, client, software), with a broker that can be
    stopped and restarted on the same state and port."""

    def restart(self) -> None:
        old = self["server"]
        port = old.port
        old.stop()
        self.start(f"127.0.0.1:{port}")

    def start(self, listen: str) -> None:
        self["server"] = server = BrokerServer(BrokerConfig(state_dir=str(self["base"] / "broker"), listen=listen,
                                                            reap_interval=1.0, service=self["service"]))
        server.start()


@pytest.fixture
def world(software, monkeypatch):
    """A fresh broker per test (restarts and settings differ), its user, and a folder everyone can use."""
    base = Path(tempfile.mkdtemp(prefix="splitpilot-faults-"))
    os.chmod(base, 0o755)
    w = World(base=base, software=software, service=ServiceSettings())
    w.start("127.0.0.1:0")
    clients = []
    try:
        def client() -> BrokerClient:
            user = w["server"].ca.new_token(TokenRole.USER, USER)
            made = BrokerClient(w["server"].address, user, w["server"].ca_pem)
            clients.append(made)
            return made
        w["client"] = client()
        w["new_client"] = client
        yield w
    finally:
        for made in clients:
            made.close()
        w["server"].stop()
        for pid in processes_in(base):   # a payload a failed test left (payloads have sessions of their own)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(base, ignore_errors=True)


def start_agent(world, name: str, *, idle: str = "4s", extra: tuple[str, ...] = (),
                work: Path | None = None) -> subprocess.Popen:
    """An agent (guardian and agent) in a session of its own: `ended` kills the whole of it if it must."""
    argv, env, token = agent_command(world, name, "process", as_nobody=True, idle=idle)
    if work is not None:
        argv[argv.index("--work-dir") + 1] = str(work)
    argv += list(extra)
    log = open(world["base"] / f"agent-{name}.log", "wb")
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log, env=env,
                               start_new_session=True)
    log.close()
    process.stdin.write(token)
    process.stdin.close()
    return process


def agent_log(world, name: str) -> str:
    return (world["base"] / f"agent-{name}.log").read_text(errors="replace")


def ended(process: subprocess.Popen, timeout: float) -> int:
    """The agent's exit code once it ended by itself; after TIMEOUT, everything of it is killed (the guardian,
    the agent, wrappers and payloads: its session) and TimeoutExpired raised."""
    try:
        return process.wait(timeout=timeout)
    finally:
        kill_session(process)


def kill_session(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def spec(name: str, script: str = "", *, executable: str = "/bin/sh", arguments=None, environment=None,
         outputs=("*.out",), max_attempts: int = 3, walltime: int = 600, priority: int = 0) -> m.JobSpec:
    return m.JobSpec(name=name, executable=executable,
                     arguments=list(arguments) if arguments is not None else ["-c", script],
                     environment=environment or {}, output_patterns=list(outputs), max_attempts=max_attempts,
                     priority=priority, requirements=m.Requirements(cores=1, memory_mb=256, disk_mb=512,
                                                                    walltime_s=walltime))


def submit_unchecked(world, specs: list[m.JobSpec]) -> list[int]:
    """Queue SPECS straight into the broker's store, past the submit checks: the broker refuses such specs at
    submit (issue 11); an older broker did not, and the node must cope with whatever reaches it."""
    return world["server"].store.submit(USER, specs, datetime.datetime.now(datetime.UTC))


def wait_state(client, job_id: int, states: set[JobState], timeout: float = 60):
    return wait_for(lambda: client.status(job_id) if client.status(job_id).state in states else None, timeout,
                    f"job {job_id} in {sorted(s.name for s in states)}")


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------------------------------------


BAD = {
    "missing-executable": (dict(executable="no-such-program-anywhere", arguments=[]),
                           "is neither an input in the sandbox nor on the PATH"),
    "equals-in-env-name": (dict(script="true", environment={"A=B": "1"}), "environment variable name 'A=B'"),
    "nul-in-env-value": (dict(script="true", environment={"GOOD": "a\0b"}), "contains a NUL character"),
    "argument-over-exec-limit": (dict(arguments=["-c", "true", "x" * (1 << 20)]), "Argument list too long"),
    "spec-over-frame-cap": (dict(arguments=["-c", "true", "x" * (5 << 20)]),
                            "over the pipe's frame cap of 4194304 bytes"),
}


@pytest.mark.parametrize("bad", [["missing-executable", "equals-in-env-name"], list(BAD)], ids=["two", "all-five"])
def test_the_jobs_own_mistakes_never_empty_a_pilot(world, bad):
    """Issue 11: two such jobs made a fresh pilot exit 3 (black hole) within a second; four made another leave
    with good jobs waiting. With --black-hole 2, the pilot runs the bad jobs (each ends FAILED_INPUT at its
    first attempt, naming the cause) and then the good ones, and leaves idle (exit 0)."""
    client = world["client"]
    bad_ids = submit_unchecked(world, [spec(name, **BAD[name][0], priority=10) for name in bad])
    good_ids = client.submit([spec(f"good-{i}", "echo fine > good.out") for i in range(2)])
    agent = start_agent(world, f"mistakes-{len(bad)}", extra=("--black-hole", "2"))
    code = ended(agent, 240)
    log = agent_log(world, f"mistakes-{len(bad)}")
    assert code == 0, log[-4000:]
    for name, job_id in zip(bad, bad_ids, strict=True):
        status = client.status(job_id)
        assert (status.state, status.attempt) == (JobState.FAILED_INPUT, 1), (name, status.message, log[-3000:])
        assert BAD[name][1] in status.message and "fix:" in status.message, (name, status.message)
    for job_id in good_ids:
        assert client.status(job_id).state is JobState.DONE
    assert "black-hole guard" not in log and "leaving: idle" in log


def test_a_job_outliving_its_first_token_is_refreshed_and_finishes_done(world):
    """Job tokens of 8 s at this broker, a job of 20 s: the agent refreshes the token over the pipe (a new key
    made on the node), the wrapper switches its channel, and the job's last calls (outputs, DONE) pass."""
    world["service"] = ServiceSettings(job_token_ttl=datetime.timedelta(seconds=8))
    world.restart()
    client = world["new_client"]()
    (job_id,) = client.submit([spec("long", "sleep 20; echo survived > long.out")])
    agent = start_agent(world, "refresh")
    code = ended(agent, 180)
    log = agent_log(world, "refresh")
    assert code == 0, log[-3000:]
    status = client.status(job_id)
    assert (status.state, status.attempt) == (JobState.DONE, 1), (status.message, log[-3000:])
    assert log.count(f"job {job_id}.1: token refreshed") >= 2, log[-3000:]
    out = world["base"] / "long-out"
    client.output(job_id, out)
    assert (out / "long.out").read_text() == "survived\n"


def test_a_broker_restart_while_a_job_runs_and_saves_costs_nothing(world):
    """Issue 11: every job lost in the fault runs was a broker restart turning UNAVAILABLE into a final
    FAILED_INPUT/OUTPUT, or the wrapper giving up its reports after ~3.5 s. The broker goes away while the
    payload runs; the payload ends during the outage; the wrapper retries its SAVING report and uploads for
    longer than that (its log says so); the broker comes back on the same state: DONE, first attempt."""
    client = world["client"]
    shared = shared_folder(world, "restart")
    (job_id,) = client.submit([spec("through-a-restart", f"touch {shared}/running; "
                                    f"while [ ! -e {shared}/go ]; do sleep 0.1; done; echo kept > kept.out",
                                    max_attempts=1)])
    agent = start_agent(world, "restart", idle="30s")
    try:
        wait_for(lambda: (shared / "running").exists(), 60, "the payload to run")
        wait_state(client, job_id, {JobState.RUNNING})
        world["server"].stop()
        (shared / "go").touch()                                   # the payload ends while the broker is away
        wrapper_log = world["base"] / "work-restart" / f"job-{job_id}-1.wrapper.log"
        # Its SAVING report failed 5 times: 7.5 s of backoff, past the old give-up after 3.5 s.
        wait_for(lambda: wrapper_log.exists() and wrapper_log.read_text().count(
            "the state report JOB_STATE_SAVING failed (UNAVAILABLE); retrying in") >= 5, 120,
            "the wrapper to retry its report past the old 3.5 s")
        world.start(f"127.0.0.1:{world['server'].port}")
        client = world["new_client"]()
        status = wait_final(client, job_id, timeout=120)
        assert (status.state, status.attempt) == (JobState.DONE, 1), (status.message, agent_log(world, "restart"))
        out = world["base"] / "restart-out"
        client.output(job_id, out)
        assert (out / "kept.out").read_text() == "kept\n"
    finally:
        agent.send_signal(signal.SIGTERM)
        ended(agent, 60)


def test_the_agents_reports_are_retried_across_a_broker_restart(world):
    """The agent used to report a failed attempt once, and never again if the broker was down: the job then
    waited for the reaper (minutes). Here the agent is stopped (SIGTERM) while the broker is away: its STOPPED
    report and its end report are retried until the broker is back, and the job is re-queued at once."""
    client = world["client"]
    shared = shared_folder(world, "agent-reports")
    (job_id,) = client.submit([spec("stopped", f"touch {shared}/running; exec sleep 300")])
    agent = start_agent(world, "agent-reports", idle="60s")
    try:
        wait_for(lambda: (shared / "running").exists(), 60, "the payload to run")
        port = world["server"].port
        world["server"].stop()
        agent.send_signal(signal.SIGTERM)
        wait_for(lambda: agent_log(world, "agent-reports").count(f"job {job_id}.1's report failed (") >= 2, 60,
                 "the agent to retry its report")
        world.start(f"127.0.0.1:{port}")
        code = ended(agent, 120)
    finally:
        kill_session(agent)
    log = agent_log(world, "agent-reports")
    assert code == 0, log[-3000:]
    status = world["new_client"]().status(job_id)
    assert (status.state, status.attempt) == (JobState.WAITING, 1), (status.state, status.message)
    assert any("signal SIGTERM" in event.detail or "PREEMPTED" in event.detail for event in status.history)
    admin = AdminClient(world["server"].address, world["server"].ca.new_token(TokenRole.ADMIN, "a"),
                        world["server"].ca_pem)
    with admin:
        assert any(p.end_reason == "signal SIGTERM" for p in admin.list_pilots())


def test_an_attempt_the_broker_ended_has_its_payload_stopped_within_seconds(world, monkeypatch):
    """Issue 11: a fenced attempt's payload ran on beside the new attempt (71 times in the fault runs). An
    admin re-queues a running job; the wrapper's next heartbeat is refused and it stops its payload at once
    (the broker asks for 1 s heartbeats here; the agent's pilot heartbeat is a minute away)."""
    from broker.services import agent as service_agent

    original = service_agent.AgentServicer.Match

    async def match_with_fast_heartbeats(self, request, context):   # what the broker says: beat every 1 s
        response = await original(self, request, context)
        if response.WhichOneof("result") == "job":
            response.job.broker_heartbeat_s = 1
        return response
    monkeypatch.setattr(service_agent.AgentServicer, "Match", match_with_fast_heartbeats)
    world.restart()
    client = world["new_client"]()
    shared = shared_folder(world, "fenced")
    script = (f'if [ "$SPLITPILOT_ATTEMPT" = 1 ]; then echo $$ > {shared}/first.pid; exec sleep 300; fi; '
              f'kill -0 $(cat {shared}/first.pid) 2>/dev/null && echo alive > first.out || echo gone > first.out')
    (job_id,) = client.submit([spec("fenced", script)])
    agent = start_agent(world, "fenced", idle="5s")
    admin = AdminClient(world["server"].address, world["server"].ca.new_token(TokenRole.ADMIN, "admin"),
                        world["server"].ca_pem)
    try:
        pid = int(wait_for(lambda: (shared / "first.pid").exists() and (shared / "first.pid").read_text().strip(),
                           60, "attempt 1's payload"))
        assert admin.requeue(job_id, "test: give the job to another attempt") == 2
        requeued = time.monotonic()
        wait_for(lambda: not pid_alive(pid), 30, "attempt 1's payload to be stopped")
        stopped_after = time.monotonic() - requeued
        status = wait_final(client, job_id, timeout=120)
        code = ended(agent, 120)
    finally:
        admin.close()
        kill_session(agent)
    log = agent_log(world, "fenced")
    assert (status.state, status.attempt) == (JobState.DONE, 2), (status.message, log[-3000:])
    assert code == 0 and stopped_after < 15, (stopped_after, log[-3000:])
    out = world["base"] / "fenced-out"
    client.output(job_id, out)
    assert (out / "first.out").read_text() == "gone\n"               # never both payloads at once
    assert f"job {job_id}.1 ended: ended at the broker" in log        # nothing reported for attempt 1


def test_without_isolation_a_jobs_leftovers_die_before_its_folder_goes_and_before_its_report(world):
    """Process launcher: the payload kills its wrapper and runs on (its own session, re-parented to the agent,
    a subreaper). It must be dead before its sandbox is removed (the old agent removed it under the running
    payload) and before the attempt is reported (the broker may then run the next attempt elsewhere)."""
    client = world["client"]
    shared = shared_folder(world, "leftovers")
    script = (f'if [ "$SPLITPILOT_ATTEMPT" = 1 ]; then echo $$ > {shared}/first.pid; kill -9 $PPID; '
              f'while [ -d "$SPLITPILOT_SANDBOX" ]; do :; done; echo vanished > {shared}/vanished; exit 0; fi; '
              f'kill -0 $(cat {shared}/first.pid) 2>/dev/null && echo alive > first.out || echo gone > first.out')
    (job_id,) = client.submit([spec("leaver", script)])
    agent = start_agent(world, "leftovers")
    code = ended(agent, 180)
    log = agent_log(world, "leftovers")
    assert code == 0, log[-3000:]
    status = client.status(job_id)
    assert (status.state, status.attempt) == (JobState.DONE, 2), (status.message, log[-3000:])
    assert not (shared / "vanished").exists(), "the sandbox was removed under a payload still running"
    out = world["base"] / "leftovers-out"
    client.output(job_id, out)
    assert (out / "first.out").read_text() == "gone\n"
    assert f"job {job_id}.1 left 1 process(es) behind: killed" in log, log[-3000:]
    assert log.index(f"job {job_id}.1 left 1 process(es) behind") < log.index(f"job {job_id}.1 ended:")


def test_a_killed_agents_job_folders_are_removed_by_the_next_agent_in_its_work_dir(world):
    client = world["client"]
    shared = shared_folder(world, "killed-agent")
    (job_id,) = client.submit([spec("orphan", f'if [ "$SPLITPILOT_ATTEMPT" = 1 ]; then touch {shared}/running; '
                                              'exec sleep 300; fi; echo second > second.out')])
    first = start_agent(world, "killed-agent", idle="60s")
    work = world["base"] / "work-killed-agent"
    outside = world["base"] / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    try:
        wait_for(lambda: (shared / "running").exists(), 60, "the payload to run")
        (work / "job-999-1").symlink_to(outside)      # planted: a link named like a job folder
        # Another agent in the same work dir while the first lives: refused.
        second = start_agent(world, "second-while-alive", work=work)
        assert ended(second, 120) == 2
        assert "is in use by another agent" in agent_log(world, "second-while-alive")
        children = Path(f"/proc/{first.pid}/task/{first.pid}/children").read_text().split()
        os.kill(int(children[0]), signal.SIGKILL)      # the agent (the guardian's child), not its guardian
        assert first.wait(timeout=60) == 1
        assert (work / f"job-{job_id}-1").is_dir()     # left behind by the killed agent
        # The next agent in that work dir.
        following = start_agent(world, "next-agent", idle="3s", work=work)
        code = ended(following, 240)
    finally:
        kill_session(first)
    stderr = agent_log(world, "next-agent")
    assert code == 0, stderr[-3000:]
    assert f"removed 2 job folder(s) an earlier agent left in {work}: job-{job_id}-1, job-999-1" in stderr, \
        stderr[-3000:]
    assert (outside / "precious").read_text() == "keep me"
    assert not [n for n in os.listdir(work) if n.startswith("job-") and not n.endswith(".log")]
    status = client.status(job_id)
    assert (status.state, status.attempt) == (JobState.DONE, 2), status.message
