"""A broker fleet behind one address: 3 `splitpilot broker serve` processes on one PostgreSQL database
behind a real HAProxy (TCP mode: mutual TLS ends at a broker), real agents (process launcher, as an
unprivileged user) and their wrappers dialling HAProxy's address only. One broker is killed with SIGKILL
while jobs run.

What must hold afterwards (the issue's "every job DONE exactly once, no attempt won twice, the fleet's
metrics add up"):
- every job ends DONE, and its history holds exactly one DONE, reported by its last attempt;
- no attempt acted after a later attempt of its job was matched (fencing: a stale attempt's updates are
  refused, never applied), and every attempt that did not end the job ended by a re-queue;
- no job is lost or stuck: an attempt orphaned by the dead broker (a Match it committed but whose
  answer no agent runs, made here on purpose just before the kill) is re-queued by a surviving
  broker's reaper (--start-timeout) and run again, and its token, coming back late through HAProxy, is
  refused with nothing changed;
- the fleet's metrics add up: the durable counters come from the shared database, so every surviving
  broker shows the same `splitpilot_jobs{state="DONE"}` (= the jobs), `splitpilot_matches_total`
  (= the attempts the jobs' histories show) and `splitpilot_lost_attempts_total`; the per-process
  `splitpilot_broker_matches_total` of the survivors plus the victim's last scrape before the kill add
  up to that total, less what the victim matched between that scrape and its death (at most one Match
  per agent).

Both with and without inputs and outputs: the jobs' content lives in the database (the shared content
store, --file-store database, the default on PostgreSQL), so a job uploaded through one broker runs
through another and its outputs come back through a third.
"""

from __future__ import annotations

import datetime
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from haproxy import haproxy_or_fail
from pg import free_port, pg_server, pg_url  # noqa: F401  (fixtures: a private PostgreSQL server)

from broker.ca import CertificateAuthority
from pilot.api.base import BrokerUnavailable, PreconditionFailed
from pilot.api.client import AdminClient, AgentClient, BrokerClient
from pilot.api.jobclient import JobClient, UpdateResult
from pilot.api.states import JobState
from pilot.launch import build_software_area
from pilot.pipe import messages as m
from pilot.tokens import TokenRole
from tests.test_pilot_e2e import processes_in, wait_for

BIN = Path(sys.executable).parent / "splitpilot"
HERE = Path(__file__).parent
NOBODY = pwd.getpwnam("nobody")
BROKERS = 3
AGENTS = 4
JOBS = 12
#: The address clients dial: HAProxy's, on a loopback address no broker listens on, so the brokers' host
#: certificates must name it (--host-name) or every TLS handshake through HAProxy fails.
FRONT = "127.0.0.2"


class Broker:
    """One `splitpilot broker serve` process of the fleet."""

    def __init__(self, base: Path, index: int, db: str, ca_dir: Path) -> None:
        self.state = base / f"broker-{index}"
        self.log = base / f"broker-{index}.log"
        self.metrics_port = free_port()
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [str(BIN), "broker", "serve", "--state-dir", str(self.state), "--db", db, "--ca", str(ca_dir),
                 "--listen", "127.0.0.1:0", "--host-name", FRONT, "--metrics", f"127.0.0.1:{self.metrics_port}",
                 "--reap-interval", "1s", "--heartbeat-timeout", "6s", "--start-timeout", "15s",
                 "--empty-retry", "1s", "--grace", "1s"],
                stdout=subprocess.DEVNULL, stderr=log)
        self.address = ""

    def started(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"broker {self.state.name} ended at start:\n{self.log.read_text()[-3000:]}")
        path = self.state / "address"
        if path.exists() and (text := path.read_text().strip()):
            self.address = text
            return True
        return False

    def metrics(self) -> dict[str, float]:
        """The /metrics page as {sample name with labels: value} (comments and _created samples dropped)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                if "_created" not in name:
                    samples[name] = float(value)
        return samples

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def fleet(pg_url):  # noqa: F811
    """A CA, 3 brokers on one PostgreSQL database, HAProxy in front, a software area; all stopped after."""
    base = Path(tempfile.mkdtemp(prefix="splitpilot-fleet-"))
    os.chmod(base, 0o755)
    ca = CertificateAuthority.init(str(base / "ca"))
    brokers: list[Broker] = []
    proxy = None
    agents: list[subprocess.Popen] = []
    try:
        brokers = [Broker(base, index, pg_url, base / "ca") for index in range(BROKERS)]
        wait_for(lambda: all(b.started() for b in brokers), 60, "the brokers to start")
        proxy = haproxy_or_fail([b.address for b in brokers], host=FRONT)
        wait_for(lambda: set(proxy.server_states().values()) == {"UP"}, 30, "HAProxy to see every broker up")
        software = base / "software"
        build_software_area(software)
        yield {"base": base, "ca": ca, "brokers": brokers, "proxy": proxy, "software": software, "agents": agents}
    finally:
        # Each agent runs in its own session: its guardian (the process started), the agent it forked,
        # wrappers. A guardian killed alone would leave its agent running, so the whole group goes, then
        # whatever still runs in the work folders (a payload in a session of its own).
        for agent in agents:
            try:
                os.killpg(agent.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            agent.wait()
        for pid in processes_in(base):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_for(lambda: not processes_in(base), 30, "no process left in the fleet's folders")
        if proxy is not None:
            proxy.stop()
        for broker in brokers:
            broker.stop()
        shutil.rmtree(base, ignore_errors=True)


def start_agent(fleet, index: int) -> subprocess.Popen:
    """A real agent (process launcher, as nobody) dialling HAProxy's address; its token on stdin."""
    token = fleet["ca"].new_token(TokenRole.AGENT, f"fleet-pilot-{index}", site="FLEET", queue="default",
                                  ttl=datetime.timedelta(hours=1))
    work = fleet["base"] / f"work-{index}"
    work.mkdir()
    os.chown(work, NOBODY.pw_uid, NOBODY.pw_gid)
    # --idle-timeout outlasts the brokers' --start-timeout (15 s) plus the reaper's second: the lost answer's
    # job is re-queued that long after its Match, when the other jobs may all be done; with 4 s the agents
    # had left by then and the job waited for nobody (seen in about 1 run in 3).
    argv = ["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}", "--clear-groups",
            sys.executable, "-m", "pilot", "agent", "--broker", fleet["proxy"].address, "--token", "-",
            "--work-dir", str(work), "--software-dir", str(fleet["software"]), "--idle-timeout", "30s",
            "--lifetime", "30m", "--runtimes", "process", "--container-policy", "require",
            "--min-job-time", "10s"]
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(HERE.parent), "HOME": str(work)}
    with open(fleet["base"] / f"agent-{index}.log", "wb") as log:
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log, env=env,
                                   start_new_session=True)
    fleet["agents"].append(process)
    process.stdin.write(token.to_pem())
    process.stdin.close()
    return process


def job_spec(index: int, script: m.InputFile | None) -> m.JobSpec:
    requirements = m.Requirements(cores=1, memory_mb=256, disk_mb=100, walltime_s=600)
    if script is None:   # no input; a small output
        return m.JobSpec(name=f"fleet-{index}", executable="/bin/sh",
                         arguments=["-c", f"sleep 4; echo job {index} > result.out"],
                         output_patterns=["result.out"], max_attempts=3, requirements=requirements)
    return m.JobSpec(name=f"fleet-{index}", executable="/bin/sh", arguments=[script.name, str(index)],
                     input_files=[script], output_patterns=["result.out"], max_attempts=3,
                     requirements=requirements)


def calm(call, timeout: float = 30):
    """CALL's result, retried while the broker behind HAProxy is unreachable (the test's own client
    reconnects like any other: its channel may have been on the killed broker)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except BrokerUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


SANDBOX = [
    pytest.param(False, id="no-inputs-small-outputs"),
    pytest.param(True, id="inputs-and-outputs"),
]


@pytest.mark.slow   # 35-80 s on 2 cores: PostgreSQL, 3 brokers, a software area, 4 agents, 13 jobs
@pytest.mark.parametrize("sandbox", SANDBOX)
def test_a_fleet_behind_haproxy_survives_the_loss_of_a_broker(fleet, sandbox, tmp_path):
    proxy, brokers = fleet["proxy"], fleet["brokers"]
    user = fleet["ca"].new_token(TokenRole.USER, "fleet-user")
    with BrokerClient(proxy.address, user) as client:
        script = None
        if sandbox:
            path = tmp_path / "job.sh"
            path.write_text('#!/bin/sh\nsleep 4\necho "job $1" > result.out\n')
            script = client.upload(str(path), "job.sh")
        job_ids = client.submit([job_spec(index, script) for index in range(JOBS)])
        assert len(job_ids) == JOBS
        victim = brokers[0]
        survivors = [b for b in brokers if b is not victim]
        for index in range(AGENTS):
            start_agent(fleet, index)

        def running() -> list[int]:
            listing = calm(lambda: client.list(limit=JOBS * 2))
            failed = [f"job {s.job_id}: {s.state.name}: {s.message}" for s in listing.jobs
                      if s.final and s.state is not JobState.DONE]
            assert not failed, "jobs failed before the kill:\n" + "\n".join(failed)
            return [s.job_id for s in listing.jobs if s.state is JobState.RUNNING]
        wait_for(lambda: len(running()) >= AGENTS, 90, "every agent running a job")

        # The victim holds live connections (agents' and wrappers' channels through HAProxy).
        sessions = wait_for(lambda: (found := proxy.sessions()).get(victim.address) and found, 30,
                            "a client connected to the victim through HAProxy")
        # Just before it dies the victim answers a Match whose answer never reaches a running agent (as
        # when a broker dies between its commit and its answer): an attempt nobody runs, which the
        # surviving brokers' reapers must re-queue (--start-timeout), and whose token, coming back late
        # through HAProxy, must be refused.
        rogue = fleet["ca"].new_token(TokenRole.AGENT, "fleet-lost-answer", site="FLEET", queue="default")
        with AgentClient(victim.address, rogue) as lost_agent:
            lost = lost_agent.match(SLOT, "pilot-lost-answer", "node-lost")
        assert lost.matched and lost.attempt == 1, lost
        lost_matched = datetime.datetime.now(datetime.UTC)
        before_kill = victim.metrics()
        active = [s.job_id for s in calm(lambda: client.list(limit=JOBS * 2)).jobs
                  if s.state in (JobState.ASSIGNED, JobState.STARTED, JobState.RUNNING, JobState.SAVING)
                  and s.job_id != lost.job_id]
        victim.process.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        killed_wall = datetime.datetime.now(datetime.UTC)
        victim.process.wait()
        wait_for(lambda: proxy.server_states().get(victim.address) == "DOWN", 30, "HAProxy to mark the victim down")
        marked_down_s = time.monotonic() - killed_at

        # Every job that was active at the kill is heard from again (through a surviving broker) or done.
        def heard_again() -> bool:
            for job_id in active:
                status = calm(lambda job_id=job_id: client.status(job_id))
                if not status.final and not any(e.time > killed_wall for e in status.history) and not (
                        status.usage_at and status.usage_at > killed_wall):
                    return False
            return True
        wait_for(heard_again, 60, "every job active at the kill to be heard from again")
        active_again_s = time.monotonic() - killed_at

        def all_final() -> list:
            listing = calm(lambda: client.list(limit=JOBS * 2))
            return listing.jobs if all(s.final for s in listing.jobs) else []
        try:
            wait_for(all_final, 120, "every job to end")
        except AssertionError:
            stuck = [calm(lambda s=s: client.status(s.job_id)) for s in calm(lambda: client.list(limit=JOBS * 2)).jobs
                     if not s.final]
            raise AssertionError("jobs not final 120 s after the kill:\n" + "\n".join(
                f"job {st.job_id} {st.state.name} attempt {st.attempt}: "
                + "; ".join(f"{e.time:%H:%M:%S} {e.state.name} a{e.attempt} {e.detail[:80]}" for e in st.history)
                for st in stuck)) from None
        all_done_s = time.monotonic() - killed_at
        statuses = [calm(lambda job_id=job_id: client.status(job_id)) for job_id in job_ids]

        # The lost answer's attempt was re-queued by a survivor and run again; its token is refused now.
        (orphan,) = [s for s in statuses if s.job_id == lost.job_id]
        assert orphan.attempt >= 2 and any(e.state is JobState.WAITING and e.attempt == 1
                                           and "start" in e.detail for e in orphan.history), orphan.history
        orphan_rematched = min(e.time for e in orphan.history if e.state is JobState.ASSIGNED and e.attempt == 2)
        with JobClient(proxy.address, lost.token_pem, lost.key, lost.ca_pem, retries=0) as late:
            with pytest.raises(PreconditionFailed) as refused:
                late.update_state(JobState.STARTED, "the lost answer's attempt, late")
            assert f"token of attempt 1, but the job is at attempt {orphan.attempt}" in refused.value.details
        assert calm(lambda: client.status(lost.job_id)).history == orphan.history   # nothing changed
        if sandbox:
            for status in statuses:
                out = tmp_path / f"out-{status.job_id}"
                calm(lambda status=status, out=out: client.output(status.job_id, out))
                assert (out / "result.out").read_text() == f"job {status.name.split('-')[1]}\n"

    # Every job DONE, exactly once, by its last attempt; no attempt acted after a later one was matched.
    problems = []
    attempts_seen = 0
    for status in statuses:
        history = status.history
        dones = [e for e in history if e.state is JobState.DONE]
        if status.state is not JobState.DONE or len(dones) != 1 or dones[0].attempt != status.attempt:
            problems.append(f"job {status.job_id}: {status.state.name}, DONE events {dones}: {status.message}")
        assigned = {e.attempt: e.time for e in history if e.state is JobState.ASSIGNED}
        attempts_seen += len(assigned)
        for event in history:
            later = [t for a, t in assigned.items() if a > event.attempt]
            if later and event.time > min(later) and event.state is not JobState.WAITING:
                problems.append(f"job {status.job_id}: attempt {event.attempt} reported {event.state.name} "
                                f"after attempt {event.attempt + 1} was matched")
    assert not problems, "\n".join(problems)
    assert attempts_seen >= JOBS

    # The fleet's metrics add up (see the module's docstring for what that means).
    # The durable counters are the database's: the same on every survivor (a page is rendered at most once
    # a second, so a scrape may trail the last update by that much: polled).
    durable = ('splitpilot_jobs{state="DONE"}', "splitpilot_matches_total", "splitpilot_lost_attempts_total")
    last: list[list[dict[str, float]]] = []

    def agreeing() -> list[dict[str, float]] | None:
        scraped = [b.metrics() for b in survivors]
        last[:] = [scraped]
        figures = {tuple(samples.get(name) for name in durable) for samples in scraped}
        agree = len(figures) == 1 and next(iter(figures))[:2] == (JOBS, attempts_seen)
        return scraped if agree else None
    try:
        scraped = wait_for(agreeing, 15, "every survivor's durable counters to show the jobs and attempts")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {[{n: s.get(n) for n in durable} for s in last[0]]}, expected DONE "
                             f"{JOBS}, matches {attempts_seen}") from None
    per_process = sum(s["splitpilot_broker_matches_total"] for s in scraped)
    per_process += before_kill["splitpilot_broker_matches_total"]
    # Every attempt was matched by one of the processes: the survivors' per-process counters plus the victim's
    # last scrape count them all, but for what the victim matched in the moment between its scrape and its
    # death (at most one Match per agent: each runs one job at a time).
    assert attempts_seen - AGENTS <= per_process <= attempts_seen, (per_process, attempts_seen)

    # Calls refused (fenced: FAILED_PRECONDITION) or failed over (UNAVAILABLE) at the survivors, and the
    # clients' retries in the agents' logs (the wrappers log there too): reported, not asserted.
    def count(code: str) -> dict[str, int]:
        found: dict[str, int] = {}
        for samples in scraped:
            for key, value in samples.items():
                if key.startswith("splitpilot_rpc_requests_total") and f'code="{code}"' in key and value:
                    method = re.search(r'method="([^"]*)"', key)
                    name = method[1] if method else key
                    found[name] = found.get(name, 0) + int(value)
        return found
    # Jobs that needed another attempt (orphaned by the kill): when the new attempt was matched and when
    # the job ended, counted from the kill.
    orphaned = []
    for status in statuses:
        if status.attempt > 1:
            rematched = max(e.time for e in status.history if e.state is JobState.ASSIGNED)
            causes = [e.detail for e in status.history if e.state is JobState.WAITING and e.attempt >= 1]
            orphaned.append(f"job {status.job_id}: attempt {status.attempt} matched "
                            f"{(rematched - killed_wall).total_seconds():.1f} s after the kill, DONE "
                            f"{(status.updated - killed_wall).total_seconds():.1f} s after it ({causes})")
    logs = "".join((fleet["base"] / f"agent-{i}.log").read_text(errors="replace") for i in range(AGENTS))
    retried = len(re.findall(r"retrying in", logs))
    heartbeat_failures = len(re.findall(r"heartbeat to the broker failed", logs))
    print(f"\nFLEET: victim {victim.address} ({sessions.get(victim.address, 0)} sessions), "
          f"{len(active)} jobs active at the kill; HAProxy marked it down after {marked_down_s:.2f} s; "
          f"every active job heard from again after {active_again_s:.2f} s; all {JOBS} jobs final after "
          f"{all_done_s:.2f} s; attempts {attempts_seen} for {JOBS} jobs; matches by process: victim "
          f">= {before_kill['splitpilot_broker_matches_total']:.0f}, survivors "
          f"{[s['splitpilot_broker_matches_total'] for s in scraped]}; refused at the survivors: FAILED_PRECONDITION "
          f"{count('FAILED_PRECONDITION')}, UNAVAILABLE {count('UNAVAILABLE')}; client "
          f"retries logged {retried}, heartbeat failures logged {heartbeat_failures}; orphaned: {orphaned}; "
          f"the lost Match answer's job re-matched {(orphan_rematched - lost_matched).total_seconds():.1f} s "
          f"after that match ({(orphan_rematched - killed_wall).total_seconds():.1f} s after the kill), "
          f"DONE {(orphan.updated - killed_wall).total_seconds():.1f} s after the kill")
    for status in statuses:   # what each side logged about a job that needed another attempt
        if status.attempt > 1:
            pattern = re.compile(rf"\bjob {status.job_id}\b|\bjob {status.job_id}\.")
            for path in sorted(fleet["base"].glob("*.log")):
                for line in path.read_text(errors="replace").splitlines():
                    if pattern.search(line):
                        print(f"  {path.name}: {line}")
    for agent in fleet["agents"]:
        assert agent.wait(timeout=60) == 0, logs[-3000:]


def test_the_contrib_haproxy_config_is_valid_and_passes_tls_through():
    """contrib/haproxy.cfg as shipped: HAProxy accepts it, and it never ends TLS (mutual TLS must end at a
    broker: a proxy holding the certificates would see every token)."""
    from haproxy import find_haproxy

    path = HERE.parent / "contrib" / "haproxy.cfg"
    text = path.read_text()
    check = subprocess.run([find_haproxy(), "-c", "-f", str(path)], capture_output=True, text=True, timeout=60)
    # The stats socket's folder may be missing on a test machine: the only complaint allowed.
    complaints = [line for line in (check.stdout + check.stderr).splitlines()
                  if "ALERT" in line and "admin.sock" not in line and "stats socket" not in line]
    assert not complaints, check.stdout + check.stderr
    settings = [line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert ["mode", "tcp"] in settings
    assert not [words for words in settings if "ssl" in words or "crt" in words or words[0] == "mode"
                and words != ["mode", "tcp"]]
    assert any("on-marked-down" in words and "check" in words for words in settings)
    assert ["option", "redispatch"] in settings


SLOT = {"cores": 1, "memory_mb": 4000, "disk_mb": 4000, "time_left_s": 86400}


def test_across_the_fleet_a_replayed_report_counts_once_and_a_stale_attempt_is_refused_everywhere(fleet):
    """What a wrapper's retry after a failover meets. Its report reached one broker, which applied it and
    died before answering: the retry (same sequence number) reaches another broker, which must
    acknowledge it as a replay, not apply it twice. And once the job has a newer attempt, the old
    attempt's token is refused by EVERY broker of the fleet (each one checks the shared database, none
    trusts a cache of its own), with nothing changed."""
    proxy, brokers, ca = fleet["proxy"], fleet["brokers"], fleet["ca"]
    user = ca.new_token(TokenRole.USER, "fleet-user")
    agent_token = ca.new_token(TokenRole.AGENT, "fleet-rogue", site="FLEET", queue="default")
    admin = ca.new_token(TokenRole.ADMIN, "fleet-ops")
    with BrokerClient(proxy.address, user) as client, AgentClient(proxy.address, agent_token) as agent, \
            AdminClient(proxy.address, admin) as ops:
        (job_id,) = client.submit([m.JobSpec(name="fenced", executable="/bin/true", requirements=m.Requirements(
            cores=1, memory_mb=256, disk_mb=100, walltime_s=600), max_attempts=3)])
        first = agent.match(SLOT, "pilot-fleet-rogue", "node-1")
        assert first.matched and first.job_id == job_id and first.attempt == 1
        with first.job_client(retries=0) as wrapper:
            assert wrapper.update_state(JobState.STARTED).replay is False
            assert wrapper.update_state(JobState.RUNNING).replay is False   # sequence 2
        # The retry of sequence 2, at each broker directly (whichever HAProxy would pick after a failover).
        for broker in brokers:
            with JobClient(broker.address, first.token_pem, first.key, first.ca_pem, retries=0,
                           first_sequence=2) as retried:
                assert retried.update_state(JobState.RUNNING) == UpdateResult(JobState.RUNNING, True), broker.address
        history = client.status(job_id).history
        assert [e.state for e in history].count(JobState.RUNNING) == 1, history

        # A newer attempt: the old one is fenced at every broker, whatever it sends.
        assert ops.requeue(job_id, "the fleet test") == 2
        second = agent.match(SLOT, "pilot-fleet-rogue", "node-1")
        assert second.matched and (second.job_id, second.attempt) == (job_id, 2)
        before = client.status(job_id)
        for broker in brokers:
            with JobClient(broker.address, first.token_pem, first.key, first.ca_pem, retries=0,
                           first_sequence=3) as stale:
                with pytest.raises(PreconditionFailed) as refused:
                    stale.update_state(JobState.DONE, "the old attempt claims the job", exit_code=0)
                assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION
                assert f"job {job_id}: token of attempt 1, but the job is at attempt 2" in refused.value.details
                with pytest.raises(PreconditionFailed):
                    stale.heartbeat()
        after = client.status(job_id)
        assert (after.state, after.attempt, after.history) == (before.state, before.attempt, before.history)
        assert JobState.DONE not in [e.state for e in after.history]
        # The current attempt is untouched by all this and ends the job.
        with second.job_client(retries=0) as current:
            for state in (JobState.STARTED, JobState.RUNNING, JobState.SAVING, JobState.DONE):
                current.update_state(state, exit_code=0 if state is JobState.DONE else None)
        done = client.status(job_id)
        assert done.state is JobState.DONE and [(e.state, e.attempt) for e in done.history
                                                if e.state is JobState.DONE] == [(JobState.DONE, 2)]
