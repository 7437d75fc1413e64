"""`splitpilot broker serve` and `splitpilot job ...` end to end, as subprocesses."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from pg import pg_server, pg_url  # noqa: F401  (fixtures: a private PostgreSQL server)

from broker.ca import CertificateAuthority
from pilot.api.client import AgentClient, MatchedJob
from pilot.api.states import JobState
from pilot.errors import SplitpilotError, UsageError
from pilot.tokens import TokenRole
from pilot.tokens.files import write_private
from splitpilot.broker.v1 import broker_pb2 as pb
from splitpilot.job.v1 import job_pb2

BIN = pathlib.Path(sys.executable).parent / "splitpilot"
SLOT = {"cores": 1, "memory_mb": 4000, "disk_mb": 4000, "time_left_s": 86400}


def run(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@contextlib.contextmanager
def serving(tmp_path, *options: str):
    """A broker process on a free port (with OPTIONS), a user token and a client config file."""
    state = tmp_path / "state"
    log_path = tmp_path / "broker.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([str(BIN), "broker", "serve", "--state-dir", str(state), "--listen",
                                    "127.0.0.1:0", "--reap-interval", "1s", *options],
                                   stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while not (state / "address").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the broker did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
        address = (state / "address").read_text().strip()
        token = tmp_path / "alice.pem"
        issued = run("token", "issue", "--ca", str(state / "ca"), "--role", "user", "--subject", "alice",
                     "--out", str(token))
        assert issued.returncode == 0, issued.stderr
        config = tmp_path / "client.toml"
        config.write_text(f'[client]\nbroker = "{address}"\ntoken = "{token}"\n')
        yield SimpleNamespace(process=process, state=state, address=address, config=str(config),
                              log=log_path, ca=CertificateAuthority.load(str(state / "ca")))
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def broker(tmp_path):
    """A broker process on a free port, with a user token and a client config file."""
    with serving(tmp_path) as running:
        yield running


def job(broker, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run("job", *args, "--config", broker.config, **kwargs)


def write_job_file(tmp_path) -> str:
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "input.txt").write_text("input data\n")
    path = tmp_path / "jobs.toml"
    path.write_text('[job]\nname = "cli-{index}"\nexecutable = "run.sh"\ncount = 2\n'
                    '[job.requirements]\nmemory_mb = 1000\nwalltime = "1h"\n'
                    '[[job.inputs]]\npath = "data/input.txt"\n[job.outputs]\npatterns = ["*.out"]\n')
    return str(path)


def run_to_done(broker, tmp_path) -> int:
    agent_token = broker.ca.new_token(TokenRole.AGENT, "glidein", site="SITE-A", queue="default")
    with AgentClient(broker.address, agent_token) as agent:
        matched = agent.match(SLOT, "pilot-1", "node-1")
        assert isinstance(matched, MatchedJob)
        with matched.job_client() as wrapper:
            wrapper.update_state(JobState.STARTED)
            sandbox = tmp_path / "sandbox"
            sandbox.mkdir(exist_ok=True)
            wrapper.get_input("input.txt", str(sandbox))
            wrapper.update_state(JobState.RUNNING)
            (sandbox / "result.out").write_text("the answer is 42\n")
            wrapper.put_output(str(sandbox / "result.out"))
            wrapper.update_state(JobState.SAVING)
            wrapper.update_state(JobState.DONE, exit_code=0)
    return matched.job_id


def test_submit_status_output_kill(broker, tmp_path):
    submitted = job(broker, "submit", write_job_file(tmp_path))
    assert submitted.returncode == 0, submitted.stderr
    first, second = (int(line) for line in submitted.stdout.split())
    assert "submitted 2 job(s)" in submitted.stderr

    table = job(broker, "status")
    assert table.returncode == 0, table.stderr
    assert "ID" in table.stdout and "cli-0" in table.stdout and "WAITING" in table.stdout
    assert "2 job(s) (all shown): 2 WAITING" in table.stdout

    # A watcher started now follows the job until it ends.
    watcher = subprocess.Popen([str(BIN), "job", "status", str(first), "--watch", "--interval", "1s", "--config",
                                broker.config], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert run_to_done(broker, tmp_path) == first
        out, err = watcher.communicate(timeout=120)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 0, err
    assert "WAITING" in out and "RUNNING" in out and "DONE" in out

    one = job(broker, "status", str(first))
    assert one.returncode == 0, one.stderr
    for words in ("state:     DONE, exit code 0", "history:", "ASSIGNED", "SAVING", "outputs:", "result.out",
                  "at SITE-A on node-1"):
        assert words in one.stdout, one.stdout

    output = job(broker, "output", str(first), str(tmp_path / "results"))
    assert output.returncode == 0, output.stderr
    assert (tmp_path / "results" / "result.out").read_text() == "the answer is 42\n"
    assert "sha256 verified" in output.stderr
    nothing = job(broker, "output", str(second), str(tmp_path / "results2"))
    assert nothing.returncode == 1 and "has no outputs" in nothing.stderr

    killed = job(broker, "kill", str(second), "--reason", "not needed")
    assert killed.returncode == 0 and f"job {second}: KILLED" in killed.stdout
    watch_all = job(broker, "status", "--watch", "--interval", "1s")
    assert watch_all.returncode == 1  # everything ended, but not everything DONE
    assert "2/2 final" in watch_all.stdout and "KILLED" in watch_all.stdout


def test_errors_and_exit_codes(broker, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[job]\nexecutable = "run.sh"\n[job.requirements]\nmemory_mb = "lots"\n')
    result = job(broker, "submit", str(bad))
    assert result.returncode == 2
    assert (f"{bad}: job.requirements.memory_mb: expected a positive integer, got 'lots'; "
            "fix: write memory_mb = 2000") in result.stderr
    unknown = job(broker, "status", "424242")
    assert unknown.returncode == 1 and "no job 424242" in unknown.stderr
    missing_token = run("job", "status", "--token", str(tmp_path / "nope.pem"), "--broker", broker.address)
    assert missing_token.returncode == 2 and "no token file" in missing_token.stderr and "fix:" in missing_token.stderr
    # The config file may come from the environment (a path, never a token).
    via_env = run("job", "status", env={"SPLITPILOT_CONFIG": broker.config})
    assert via_env.returncode == 0, via_env.stderr
    typo = tmp_path / "typo.toml"
    typo.write_text('[client]\nbrokr = "x:1"\n')
    wrong = run("job", "status", "--config", str(typo))
    assert wrong.returncode == 2 and "did you mean 'broker'" in wrong.stderr
    unreachable = run("job", "status", "--config", broker.config, "--broker", "127.0.0.1:1")
    assert unreachable.returncode == 1 and "cannot reach the broker" in unreachable.stderr
    dry = job(broker, "submit", "--dry-run", write_job_file(tmp_path))
    assert dry.returncode == 0 and "2 job(s) valid; nothing submitted" in dry.stderr
    assert job(broker, "status").stdout.count("WAITING") == 0


def test_help_is_complete():
    for args in (("broker", "serve"), ("job", "submit"), ("job", "status"), ("job", "output"), ("job", "kill")):
        result = run(*args, "--help")
        assert result.returncode == 0, result.stderr
        assert "usage: splitpilot " + " ".join(args) in result.stdout
    assert "--state-dir" in run("broker", "serve", "--help").stdout
    assert "[[job.inputs]]" in run("job", "submit", "--help").stdout
    assert run("job").returncode == 2


def test_serve_stops_cleanly_on_sigterm(broker):
    broker.process.send_signal(signal.SIGTERM)
    assert broker.process.wait(timeout=60) == 0
    assert not (broker.state / "address").exists()  # it named a listener that is gone
    log = broker.log.read_text()
    for words in ("created CA", "issued host token", "listening on 127.0.0.1:", "ready:", "shutting down",
                  "broker stopped"):
        assert words in log, log


def test_serve_exits_130_on_ctrl_c_after_the_same_clean_stop(broker, tmp_path):
    # A job queued before: the clean stop keeps it (the store is closed, not lost).
    submitted = job(broker, "submit", write_job_file(tmp_path))
    assert submitted.returncode == 0, submitted.stderr
    broker.process.send_signal(signal.SIGINT)
    assert broker.process.wait(timeout=60) == 130
    log = broker.log.read_text()
    assert "shutting down" in log and "broker stopped" in log, log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    assert not (broker.state / "address").exists()  # removed at stop: nobody dials the dead port
    with serving(tmp_path) as again:  # same state directory: the lock was released, the jobs are there
        table = job(again, "status")
        assert table.returncode == 0, table.stderr
        assert "2 job(s) (all shown): 2 WAITING" in table.stdout


def test_serve_logs_one_format_with_time_and_level_and_no_pool_chatter(tmp_path, pg_url):  # noqa: F811
    """`broker serve` on PostgreSQL configures logging once: every line carries a timestamp and a level
    (the lines' words as before), and psycopg_pool's per-connection INFO lines stay out of the log
    (psycopg keeps its loggers at WARNING unless the program sets them)."""
    with serving(tmp_path, "--db", pg_url) as running:
        for _ in range(3):
            listed = job(running, "status")
            assert listed.returncode == 0, listed.stderr
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(timeout=60) == 0
    log = running.log.read_text()
    lines = log.splitlines()
    assert lines and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) ", line)
                         for line in lines if not line.startswith((" ", "Traceback"))), log
    assert "INFO store postgresql://" in log and "INFO broker stopped" in log, log
    assert "connection requested" not in log and "returning connection" not in log, log


def test_serve_refuses_bad_options(tmp_path):
    result = run("broker", "serve", "--state-dir", str(tmp_path / "s"), "--listen", "nowhere")
    assert result.returncode == 2 and "is not HOST:PORT; fix:" in result.stderr
    result = run("broker", "serve", "--state-dir", str(tmp_path / "s"), "--ca", str(tmp_path / "no-ca"))
    assert result.returncode == 2 and "splitpilot ca init" in result.stderr
    # Metrics beyond loopback only on request (the endpoint has no authentication).
    result = run("broker", "serve", "--state-dir", str(tmp_path / "s"), "--listen", "127.0.0.1:0", "--metrics",
                 "0.0.0.0:0")
    assert result.returncode == 2 and "add --metrics-public" in result.stderr and "fix:" in result.stderr
    assert "--metrics-public" in run("broker", "serve", "--help").stdout
    # The same for the web monitor (no authentication either).
    result = run("broker", "serve", "--state-dir", str(tmp_path / "s"), "--listen", "127.0.0.1:0", "--monitor",
                 "0.0.0.0:0")
    assert result.returncode == 2 and "add --monitor-public" in result.stderr and "fix:" in result.stderr
    assert "--monitor-public" in run("broker", "serve", "--help").stdout


def test_serve_refuses_a_heartbeat_timeout_wrappers_cannot_meet(tmp_path):
    state = tmp_path / "s"
    result = run("broker", "serve", "--state-dir", str(state), "--listen", "127.0.0.1:0", "--heartbeat-timeout", "2s")
    assert result.returncode == 2
    assert "a heartbeat timeout of 2s is shorter than wrappers can meet" in result.stderr
    assert "fix: --heartbeat-timeout 3s or more" in result.stderr
    assert not state.exists()  # refused before the broker made anything


def test_job_status_says_why_a_job_waits_and_submit_warns(broker, tmp_path):
    """The user's view of the why-is-my-job-waiting analysis: nothing known before any pilot; then a job
    needing 64 cores where pilots offered 1 is queued with a warning, and its status names what is missing
    at which site."""
    early = tmp_path / "early.toml"
    early.write_text('[job]\nname = "early"\nexecutable = "run.sh"\n[job.requirements]\nwalltime = "1h"\n')
    first = job(broker, "submit", str(early))
    assert first.returncode == 0 and "warning" not in first.stderr
    job_id = int(first.stdout)
    before = job(broker, "status", str(job_id))
    assert "waiting:   no pilot has asked this broker for work yet" in before.stdout
    agent_token = broker.ca.new_token(TokenRole.AGENT, "glidein", site="SITE-A", queue="default")
    with AgentClient(broker.address, agent_token) as agent:
        assert agent.match(SLOT, "pilot-1", "node-1").job_id == job_id
    big = tmp_path / "big.toml"
    big.write_text('[job]\nname = "big"\nexecutable = "run.sh"\n[job.requirements]\ncores = 64\nwalltime = "1h"\n')
    submitted = job(broker, "submit", str(big))
    assert submitted.returncode == 0, submitted.stderr  # queued: a warning, not a refusal
    big_id = int(submitted.stdout)
    assert (f"warning: {big}:job: jobs[0]: no pilot of any site has ever offered what this job needs: cores 64 "
            "(offered: 1 at SITE-A); queued anyway") in submitted.stderr
    status = job(broker, "status", str(big_id))
    assert status.returncode == 0, status.stderr
    assert "state:     WAITING" in status.stdout
    assert "waiting:   no pilot of any site has ever offered what this job needs: cores 64" in status.stdout
    assert "  SITE-A (last offer " in status.stdout and "): cores wanted 64, offered 1" in status.stdout


def test_clients_name_a_bad_token_and_grpc_stays_off_stderr(broker, tmp_path):
    """An expired token and a token of another CA were reported as "cannot reach the broker ... check that
    it runs", among gRPC's own log lines. Now: what is wrong with the token, and only our words, unless
    GRPC_VERBOSITY asks for gRPC's."""
    address = broker.address
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3)
    expired = tmp_path / "expired.pem"
    write_private(str(expired), broker.ca.new_token(TokenRole.USER, "alice", ttl=datetime.timedelta(hours=1),
                                                    now=long_ago).to_pem())
    result = run("job", "status", "--broker", address, "--token", str(expired))
    assert result.returncode == 1
    assert "splitpilot: error: your user token (alice) expired at " in result.stderr
    assert "cannot reach" not in result.stderr
    foreign = tmp_path / "foreign.pem"
    write_private(str(foreign), CertificateAuthority.create().new_token(TokenRole.USER, "alice").to_pem())
    broker_ca = tmp_path / "broker-ca.crt"
    broker_ca.write_bytes((broker.state / "ca" / "ca.crt").read_bytes())
    result = run("job", "status", "--broker", address, "--token", str(foreign), "--ca-cert", str(broker_ca))
    assert result.returncode == 1 and "your user token (alice) is not from this broker's CA" in result.stderr
    # Trusting its own CA, the client meets the broker's foreign certificate in the TLS handshake.
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    quiet = subprocess.run([str(BIN), "job", "status", "--broker", address, "--token", str(foreign)],
                           capture_output=True, text=True, timeout=120, env=env)
    assert quiet.returncode == 1
    assert "presented a certificate that is not from the CA this client trusts" in quiet.stderr
    assert quiet.stderr.count("\n") == 1, quiet.stderr  # our one line, no gRPC log lines
    loud = run("job", "status", "--broker", address, "--token", str(foreign), env={"GRPC_VERBOSITY": "INFO"})
    assert loud.returncode == 1 and "ssl_transport_security" in loud.stderr  # asked for: shown


def test_token_issue_creates_the_folder_of_the_token(tmp_path):
    ca = tmp_path / "ca"
    assert run("ca", "init", str(ca)).returncode == 0
    out = tmp_path / "home" / ".splitpilot" / "token.pem"
    issued = run("token", "issue", "--ca", str(ca), "--role", "user", "--subject", "alice", "--out", str(out))
    assert issued.returncode == 0, issued.stderr
    assert "Traceback" not in issued.stderr and f"created {out.parent} (0700)" in issued.stderr
    assert (out.parent.stat().st_mode & 0o777, out.stat().st_mode & 0o777) == (0o700, 0o600)
    (tmp_path / "file").write_text("not a folder")
    blocked = run("token", "issue", "--ca", str(ca), "--role", "user", "--out", str(tmp_path / "file" / "t.pem"))
    assert blocked.returncode == 2
    assert f"cannot create the folder {tmp_path / 'file'} for --out" in blocked.stderr and "fix:" in blocked.stderr


@pytest.mark.parametrize("text, words", [
    ('[client]\nbrokr = "x:1"\n', ["client.brokr", "did you mean 'broker'?", "fix: rename it to broker"]),
    ('[clients]\nbroker = "x:1"\n', ["clients", "did you mean 'client'?"]),
    ('[client]\nbroker = 7443\n', ["client.broker", "expected a string", 'broker = "host:7443"']),
    ('[client]\ntoken = ["a", "b"]\n', ["client.token", "expected a string"]),
    ('client = "x"\n', ["client", "expected a table"]),
    ('[client\n', ["(syntax)", "not valid TOML", "[client]"]),
])
def test_client_config_mistakes_name_the_file_key_and_fix(tmp_path, text, words):
    """Every mistake in the client config at once, with the file, the key and the fix; nothing is read from a
    config that has one (a typo must not silently fall back to the default broker)."""
    from broker.cli import client_settings
    from pilot.errors import UsageError

    config = tmp_path / "client.toml"
    config.write_text(text)
    args = SimpleNamespace(config=str(config), broker=None, token=str(tmp_path / "token.pem"), ca_cert=None)
    with pytest.raises(UsageError) as err:
        client_settings(args)
    message = str(err.value)
    assert message.startswith(f"config file {config}:") and err.value.exit_code == 2
    for word in words:
        assert word in message, (word, message)


# ------------------------------------------------------------------ splitpilot admin

def admin_config(broker, tmp_path) -> str:
    """An admin token issued by the broker's CA, and a client config file naming it."""
    token = tmp_path / "root.pem"
    issued = run("token", "issue", "--ca", str(broker.state / "ca"), "--role", "admin", "--subject", "root",
                 "--out", str(token))
    assert issued.returncode == 0, issued.stderr
    config = tmp_path / "admin.toml"
    config.write_text(f'[client]\nbroker = "{broker.address}"\ntoken = "{token}"\n')
    return str(config)


def admin(config: str, *args: str) -> subprocess.CompletedProcess:
    return run("admin", *args, "--config", config)


def admin_json(config: str, *args: str):
    done = admin(config, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


SITE_FIELDS = {"site", "state", "reason", "state_updated", "pilots_alive", "jobs_running", "jobs_waiting",
               "failures", "empty_pilots"}
PILOT_FIELDS = {"pilot_id", "site", "node", "state", "first_seen", "last_seen", "ended", "jobs_matched", "jobs_run",
                "current_jobs", "end_reason", "certificate_serial"}
JOB_FIELDS = {"job_id", "batch_id", "name", "owner", "state", "attempt", "site", "node", "pilot_id", "submitted",
              "updated", "exit_code", "message"}


def test_admin_commands_against_a_real_broker(broker, tmp_path):
    config = admin_config(broker, tmp_path)
    submitted = job(broker, "submit", write_job_file(tmp_path))
    assert submitted.returncode == 0, submitted.stderr
    first, second = (int(line) for line in submitted.stdout.split())
    done = run_to_done(broker, tmp_path)                       # pilot-1 at SITE-A ran one job to DONE
    agent_token = broker.ca.new_token(TokenRole.AGENT, "glidein", site="SITE-A", queue="default")
    with AgentClient(broker.address, agent_token) as agent:
        held = agent.match(SLOT, "pilot-2", "node-2")          # pilot-2 holds the other
        assert isinstance(held, MatchedJob) and {held.job_id, done} == {first, second}
        agent.report_pilot_end("pilot-empty", "node-3", 0, "idle")

    sites = admin_json(config, "sites")
    assert [set(s) for s in sites] == [SITE_FIELDS] and sites[0]["site"] == "SITE-A"
    assert (sites[0]["state"], sites[0]["pilots_alive"], sites[0]["jobs_running"], sites[0]["empty_pilots"]) == \
        ("enabled", 2, 1, 1)
    drained = admin(config, "site", "drain", "SITE-A", "--reason", "disk swap")
    assert drained.returncode == 0, drained.stderr
    assert "site SITE-A: enabled -> draining (disk swap)" in drained.stdout
    table = admin(config, "sites")
    assert table.returncode == 0 and re.search(r"SITE-A\s+draining\s+2\s+1\s+0\s+0\s+1\s+disk swap", table.stdout)

    pilots = admin_json(config, "pilots", "--state", "alive")
    assert all(set(p) == PILOT_FIELDS for p in pilots)
    assert {p["pilot_id"]: p["current_jobs"] for p in pilots} == {"pilot-1": [], "pilot-2": [held.job_id]}
    ended = admin_json(config, "pilots", "--site", "SITE-A", "--state", "ended")
    assert [(p["pilot_id"], p["end_reason"], p["state"]) for p in ended] == [("pilot-empty", "empty", "ended")]

    listing = admin_json(config, "jobs", "--owner", "alice")   # not final only, by default
    assert [j["job_id"] for j in listing["jobs"]] == [held.job_id] and set(listing["jobs"][0]) == JOB_FIELDS
    assert listing["counts"] == {"ASSIGNED": 1, "DONE": 1}
    everything = admin_json(config, "jobs", "--all", "--site", "SITE-A", "--since", "1h")
    assert sorted(j["job_id"] for j in everything["jobs"]) == [first, second]
    assert admin_json(config, "jobs", "--all", "--owner", "bob")["jobs"] == []

    # Requeue: the held job goes back to the queue; the final one is refused by name and stays DONE.
    requeued = admin(config, "requeue", f"{first}..{second}", "--reason", "node-2 broken")
    assert requeued.returncode == 1
    assert f"job {held.job_id}: requeued, attempt 2 waits for a match" in requeued.stdout
    assert (f"job {done}: not requeued: job {done}: DONE -> WAITING is not allowed (only a job waiting, under way "
            "(ASSIGNED to SAVING) or ended in FAILED_INPUT") in requeued.stderr
    after = {j["job_id"]: (j["state"], j["attempt"]) for j in admin_json(config, "jobs", "--all")["jobs"]}
    assert after == {held.job_id: ("WAITING", 1), done: ("DONE", 1)}  # (attempt: the last one that ran)

    revoked = admin(config, "token", "revoke", "--subject", "mallory", "--role", "user", "--reason", "left")
    assert revoked.returncode == 0, revoked.stderr
    assert [(r["subject"], r["role"], r["revoked_by"]) for r in admin_json(config, "token", "revoked")] == \
        [("mallory", "user", "root")]


def test_admin_commands_refuse_a_user_token_and_change_nothing(broker, tmp_path):
    config = admin_config(broker, tmp_path)
    job_id = int(job(broker, "submit", write_job_file(tmp_path)).stdout.split()[0])
    for args in (("sites",), ("pilots",), ("jobs", "--all"), ("site", "disable", "SITE-A", "--reason", "mine"),
                 ("requeue", str(job_id)), ("token", "revoke", "--subject", "root", "--role", "admin",
                                            "--reason", "coup")):
        refused = run("admin", *args, "--config", broker.config)   # alice's user token
        assert refused.returncode == 1, (args, refused.stdout, refused.stderr)
        assert "PERMISSION_DENIED" in refused.stderr and "admin token" in refused.stderr, refused.stderr
        assert refused.stdout == ""
    assert admin_json(config, "sites") == []                     # no site state written
    assert admin_json(config, "token", "revoked") == []          # nothing revoked
    state = admin_json(config, "jobs", "--all")["jobs"]
    assert [(j["job_id"], j["state"], j["attempt"]) for j in state if j["job_id"] == job_id] == \
        [(job_id, "WAITING", 0)]


@pytest.mark.parametrize(("args", "words"), [
    (("requeue", "4..x"), "'4..x' is not a job id; fix: give ids like 42 or ranges like 4..53"),
    (("requeue", "9..3"), "a range goes from low to high"),
    (("requeue", "1..20000"), "more than 10000 job ids; fix: requeue in smaller ranges"),
    (("pilots", "--state", "asleep"), "invalid choice: 'asleep'"),
    (("jobs", "--since", "yesterday"), "--since"),
    (("site", "pause", "SITE-A", "--reason", "x"), "invalid choice: 'pause'"),
    (("pilots", "--limit", "0"), "argument --limit: 0: give 1 to 10000"),
    (("jobs", "--limit", "-1"), "argument --limit: -1: give 1 to 10000"),
])
def test_admin_usage_mistakes_exit_2_naming_the_fix(broker, tmp_path, args, words):
    config = admin_config(broker, tmp_path)
    refused = admin(config, *args)
    assert refused.returncode == 2, refused.stderr
    assert words in refused.stderr


# ------------------------------------------------------------------ jobs in bulk

def submitted_range(result: subprocess.CompletedProcess) -> list[str]:
    """The range exactly as `job submit` prints it on stderr ("...: 4 .. 53"), split as a shell would."""
    match = re.search(r"submitted \d+ job\(s\) to \S+: (\d+ \.\. \d+)$", result.stderr, re.M)
    assert match, result.stderr
    return match.group(1).split()


def finish(broker, agent_token, tmp_path, *, detail: str = "", fail: bool = False) -> int:
    """Match one job as SITE-A and run it to DONE with one output (or fail it with DETAIL)."""
    with AgentClient(broker.address, agent_token) as agent:
        matched = agent.match(SLOT, "pilot-1", "node-1")
        assert isinstance(matched, MatchedJob)
        with matched.job_client() as wrapper:
            wrapper.update_state(JobState.STARTED)
            wrapper.update_state(JobState.RUNNING)
            if fail:
                wrapper.update_state(JobState.FAILED_EXECUTION, detail=detail, exit_code=3)
                return matched.job_id
            sandbox = tmp_path / f"sandbox-{matched.job_id}"
            sandbox.mkdir()
            (sandbox / "result.out").write_text(f"job {matched.job_id}\n")
            wrapper.put_output(str(sandbox / "result.out"))
            wrapper.update_state(JobState.SAVING)
            wrapper.update_state(JobState.DONE, exit_code=0)
    return matched.job_id


def test_status_output_kill_take_the_range_submit_prints(broker, tmp_path):
    path = write_job_file(tmp_path)
    pathlib.Path(path).write_text(pathlib.Path(path).read_text().replace("count = 2", "count = 4"))
    submitted = job(broker, "submit", path)
    assert submitted.returncode == 0, submitted.stderr
    ids = [int(line) for line in submitted.stdout.split()]
    pasted = submitted_range(submitted)          # ["4", "..", "7"]: pasted as it was printed
    assert pasted == [str(ids[0]), "..", str(ids[-1])]
    agent_token = broker.ca.new_token(TokenRole.AGENT, "glidein", site="SITE-A", queue="default")
    done = [finish(broker, agent_token, tmp_path) for _ in range(3)]
    assert done == ids[:3]

    # status of the range: a table of exactly those jobs; --json: one object per job and line.
    table = job(broker, "status", *pasted)
    assert table.returncode == 0, table.stderr
    assert "4 job(s) (all shown): 1 WAITING, 3 DONE" in table.stdout, table.stdout
    as_json = job(broker, "status", f"{ids[0]}-{ids[-1]}", "--json")
    assert as_json.returncode == 0, as_json.stderr
    records = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [r["job_id"] for r in records] == ids
    assert [r["state"] for r in records] == ["DONE", "DONE", "DONE", "WAITING"]
    assert records[0]["outputs"] == [{"name": "result.out", "size": len(f"job {ids[0]}\n"),
                                      "sha256": records[0]["outputs"][0]["sha256"]}]
    assert records[0]["site"] == "SITE-A" and records[0]["exit_code"] == 0 and records[0]["final"] is True
    assert records[3]["waiting"] and records[3]["exit_code"] is None
    assert set(records[0]) == JSON_FIELDS
    listed = [json.loads(line) for line in job(broker, "status", "--json").stdout.splitlines()]
    assert sorted(r["job_id"] for r in listed) == ids and set(listed[0]) == JSON_FIELDS

    # output of the done ones, by range: DIR/JOBID/NAME.
    out = tmp_path / "results"
    fetched = job(broker, "output", f"{ids[0]}..{ids[2]}", str(out))
    assert fetched.returncode == 0, fetched.stderr
    for job_id in ids[:3]:
        assert (out / str(job_id) / "result.out").read_text() == f"job {job_id}\n"
    assert sorted(os.listdir(out)) == sorted(str(i) for i in ids[:3])

    # kill the range: the done ones say so, the waiting one is killed.
    killed = job(broker, "kill", *pasted, "--reason", "enough")
    assert killed.returncode == 0, killed.stderr
    assert f"job {ids[3]}: KILLED" in killed.stdout
    assert all(f"job {i} had already ended: DONE" in killed.stdout for i in ids[:3])


JSON_FIELDS = {"job_id", "batch_id", "name", "owner", "state", "final", "attempt", "exit_code", "message", "site",
               "node", "pilot_id", "submitted", "updated", "executable", "arguments", "history", "outputs", "waiting",
               "cpu_seconds", "rss_bytes", "usage_time"}


@pytest.mark.parametrize("words, message", [
    (["1..4000000000"], "would name more than 10000 jobs"),
    (["9..3"], "the range 9..3 runs backwards; fix: write 3..9"),
    (["4..x"], "'4..x' is not a job id or range"),
    (["1", ".."], "'..' needs a job id on each side"),
    (["0"], "'0' is not a job id (ids start at 1)"),
    (["\x1b]0;owned\x07"], "is not a job id or range"),
])
def test_bad_ids_and_ranges_are_refused_before_anything_changes(broker, tmp_path, words, message):
    submitted = job(broker, "submit", write_job_file(tmp_path))
    assert submitted.returncode == 0, submitted.stderr
    for command in (("kill", *words), ("status", *words), ("output", *words, str(tmp_path / "out"))):
        result = job(broker, *command)
        assert result.returncode == 2, (command, result.stderr)
        assert message in result.stderr and "fix:" in result.stderr, result.stderr
        assert "\x1b" not in result.stderr  # a hostile word is shown escaped
    assert not (tmp_path / "out").exists()
    assert "2 job(s) (all shown): 2 WAITING" in job(broker, "status").stdout  # nothing was killed


def test_a_range_over_other_users_jobs_kills_only_the_callers(broker, tmp_path):
    alice = job(broker, "submit", write_job_file(tmp_path))
    assert alice.returncode == 0, alice.stderr
    alice_ids = [int(line) for line in alice.stdout.split()]
    bob_token = tmp_path / "bob.pem"
    assert run("token", "issue", "--ca", str(broker.state / "ca"), "--role", "user", "--subject", "bob",
               "--out", str(bob_token)).returncode == 0
    bob_config = tmp_path / "bob.toml"
    bob_config.write_text(f'[client]\nbroker = "{broker.address}"\ntoken = "{bob_token}"\n')
    bob = run("job", "submit", write_job_file(tmp_path), "--config", str(bob_config))
    assert bob.returncode == 0, bob.stderr
    bob_ids = [int(line) for line in bob.stdout.split()]

    # Bob kills "everything": the range covers alice's jobs too.
    killed = run("job", "kill", f"{alice_ids[0]}..{bob_ids[-1]}", "--config", str(bob_config))
    assert killed.returncode == 1
    for job_id in alice_ids:
        assert f"error: job {job_id}: " in killed.stderr and "belongs to another user" in killed.stderr
    assert "2 of 4 job(s) could not be killed" in killed.stderr
    assert all(f"job {i}: KILLED" in killed.stdout for i in bob_ids)
    # Alice's jobs are untouched; bob cannot even read them in bulk.
    assert "2 job(s) (all shown): 2 WAITING" in job(broker, "status").stdout
    peek = run("job", "status", f"{alice_ids[0]}..{alice_ids[1]}", "--json", "--config", str(bob_config))
    assert peek.returncode == 1 and peek.stdout == "" and "alice" not in peek.stdout


def test_status_table_is_whole_and_escaped_when_not_a_terminal(broker, tmp_path):
    submitted = job(broker, "submit", write_job_file(tmp_path))
    assert submitted.returncode == 0, submitted.stderr
    agent_token = broker.ca.new_token(TokenRole.AGENT, "glidein", site="SITE-A", queue="default")
    hostile = "segfault in reco step 7 of 12 after 4711 events; see the log \x1b[2J\x1b]0;owned\x07 for more"
    failed = finish(broker, agent_token, tmp_path, detail=hostile, fail=True)
    table = job(broker, "status")
    assert table.returncode == 0, table.stderr
    assert "\x1b" not in table.stdout and "\x07" not in table.stdout
    assert "…" not in table.stdout  # a pipe gets whole cells
    line = next(row for row in table.stdout.splitlines() if row.startswith(str(failed)))
    # Whole (not cut at 40 characters), and no control character reaches the terminal (the broker
    # already replaces them in what a job reports; the table escapes whatever else could come).
    assert "segfault in reco step 7 of 12 after 4711 events; see the log " in line and line.endswith(" for more")
    assert "json" not in table.stdout
    one = job(broker, "status", str(failed), "--json")
    assert json.loads(one.stdout)["message"].endswith(" for more")
    assert "\x1b" not in one.stdout


def test_job_ids_parse_as_submit_prints_them():
    from broker.jobids import parse_job_ids

    assert parse_job_ids(["4", "..", "7"]) == [4, 5, 6, 7]
    assert parse_job_ids(["4..6", "9-10", "5", "11"]) == [4, 5, 6, 9, 10, 11]
    assert parse_job_ids(["3"]) == [3]
    assert parse_job_ids(["1..10000"]) == list(range(1, 10001))
    with pytest.raises(UsageError, match="more than 10000"):
        parse_job_ids(["1..10000", "10001"])
    with pytest.raises(UsageError, match="not a job id"):
        parse_job_ids(["99999999999999999999999"])
    with pytest.raises(UsageError, match="no job id given"):
        parse_job_ids([])


def test_status_of_a_failed_job_shows_the_end_of_its_stderr_escaped(broker, tmp_path):
    submitted = job(broker, "submit", write_job_file(tmp_path))
    assert submitted.returncode == 0, submitted.stderr
    agent_token = broker.ca.new_token(TokenRole.AGENT, "glidein", site="SITE-A", queue="default")
    lines = [f"line {i}" for i in range(1, 31)]
    lines[28] = "line 29 \x1b]0;owned\x07\x1b[2J C:\\path"   # the payload wrote escape sequences
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    (sandbox / "payload.stderr").write_bytes(("\n".join(lines) + "\n").encode())
    with AgentClient(broker.address, agent_token) as agent:
        matched = agent.match(SLOT, "pilot-1", "node-1")
        assert isinstance(matched, MatchedJob)
        with matched.job_client() as wrapper:
            wrapper.update_state(JobState.STARTED)
            wrapper.update_state(JobState.RUNNING)
            wrapper.update_state(JobState.SAVING)
            wrapper.put_output(str(sandbox / "payload.stderr"))
            wrapper.update_state(JobState.FAILED_EXECUTION, detail="exit code 3", exit_code=3)
    shown_status = job(broker, "status", str(matched.job_id))
    assert shown_status.returncode == 0, shown_status.stderr
    out = shown_status.stdout
    assert "stderr (last 20 lines of payload.stderr):" in out, out
    assert "  line 11\n" in out and "  line 30\n" in out and "line 10\n" not in out
    assert "  line 29 \\x1b]0;owned\\x07\\x1b[2J C:\\\\path\n" in out, out
    assert "\x1b" not in out and "\x07" not in out

    # A job that has not failed shows none.
    assert "stderr" not in job(broker, "status", str(matched.job_id + 1)).stdout

    # Too large to read for its end: not read, and the fix says how to fetch it.
    from pilot.api.client import BrokerClient
    token = broker.config.replace("client.toml", "alice.pem")
    with BrokerClient(broker.address, token) as client:
        assert client.output_tail(matched.job_id, "payload.stderr", max_bytes=8).endswith(b"30\n")
        with pytest.raises(SplitpilotError, match=rf"more than the 100 read to show its end; fix: splitpilot job "
                                                  rf"output {matched.job_id} DIR --name payload.stderr"):
            client.output_tail(matched.job_id, "payload.stderr", max_size=100)


def test_status_of_a_running_job_shows_cpu_and_memory_of_its_last_heartbeat(broker, tmp_path):
    submitted = job(broker, "submit", write_job_file(tmp_path))
    assert submitted.returncode == 0, submitted.stderr
    agent_token = broker.ca.new_token(TokenRole.AGENT, "glidein", site="SITE-A", queue="default")
    with AgentClient(broker.address, agent_token) as agent:
        matched = agent.match(SLOT, "pilot-1", "node-1")
        assert isinstance(matched, MatchedJob)
        with matched.job_client() as wrapper:
            wrapper.update_state(JobState.STARTED)
            wrapper.update_state(JobState.RUNNING)
            before = job(broker, "status", str(matched.job_id))
            assert "usage:" not in before.stdout  # no heartbeat yet: nothing made up
            assert wrapper.heartbeat(cpu_seconds=754.4, rss_bytes=300 << 20, sandbox_bytes=1 << 20) is False
            shown_status = job(broker, "status", str(matched.job_id))
            assert shown_status.returncode == 0, shown_status.stderr
            assert "usage:     CPU 12m34s, memory 300 MiB (heartbeat " in shown_status.stdout, shown_status.stdout
            record = json.loads(job(broker, "status", str(matched.job_id), "--json").stdout)
            assert (record["cpu_seconds"], record["rss_bytes"]) == (754.4, 300 << 20) and record["usage_time"]
            # A hostile wrapper's figures: accepted as liveness, shown bounded, never an error.
            assert wrapper.heartbeat(cpu_seconds=float("nan"), rss_bytes=2**64 - 1) is False
            hostile = json.loads(job(broker, "status", str(matched.job_id), "--json").stdout)
            assert hostile["cpu_seconds"] == 0 and hostile["rss_bytes"] == 2**62
            wrapper.update_state(JobState.SAVING)
            wrapper.update_state(JobState.DONE, exit_code=0)
    ended = job(broker, "status", str(matched.job_id))
    assert "usage:" not in ended.stdout  # a final job's figures are no longer "now"
    assert json.loads(job(broker, "status", str(matched.job_id), "--json").stdout)["cpu_seconds"] is None


# ------------------------------------------------------------------ inputs already on the broker

def test_an_input_already_on_the_broker_is_not_uploaded_again(broker, tmp_path):
    from pilot.api.client import BrokerClient

    path = write_job_file(tmp_path)
    first = job(broker, "submit", path)
    assert first.returncode == 0, first.stderr
    assert "already on the broker" not in first.stderr
    again = job(broker, "submit", path)
    assert again.returncode == 0, again.stderr
    assert "1 input file(s) already on the broker: named by sha256, not uploaded again; 0 uploaded" in again.stderr

    # Counted on the wire: no UploadFile call the second time; a changed file is uploaded.
    with BrokerClient(broker.address, str(tmp_path / "alice.pem")) as client:
        calls = []
        real = client._stub.UploadFile
        client._stub.UploadFile = lambda *a, **k: calls.append(1) or real(*a, **k)
        submission = client.submit_checked(path)
        assert (len(calls), submission.uploaded, submission.reused) == (0, 0, 1)
        (tmp_path / "data" / "input.txt").write_text("changed\n")
        submission = client.submit_checked(path)
        assert (len(calls), submission.uploaded, submission.reused) == (1, 1, 0)
    # The jobs named by digest run with the right content.
    agent_token = broker.ca.new_token(TokenRole.AGENT, "glidein", site="SITE-A", queue="default")
    with AgentClient(broker.address, agent_token) as agent:
        matched = agent.match(SLOT, "pilot-1", "node-1")
        assert isinstance(matched, MatchedJob)
        with matched.job_client() as wrapper:
            wrapper.update_state(JobState.STARTED)
            (tmp_path / "sandbox").mkdir()
            got = wrapper.get_input("input.txt", str(tmp_path / "sandbox"))
            assert pathlib.Path(got).read_text() == "input data\n"


def test_find_files_reveals_no_other_users_content_and_refuses_garbage(broker, tmp_path):
    import hashlib

    from pilot.api.base import InvalidRequest
    from pilot.api.client import BrokerClient

    assert job(broker, "submit", write_job_file(tmp_path)).returncode == 0
    alice_sha = hashlib.sha256(b"input data\n").hexdigest()
    bob_token = tmp_path / "bob.pem"
    assert run("token", "issue", "--ca", str(broker.state / "ca"), "--role", "user", "--subject", "bob",
               "--out", str(bob_token)).returncode == 0
    with BrokerClient(broker.address, str(tmp_path / "alice.pem")) as alice:
        assert alice.find_files([alice_sha, "0" * 64]) == {alice_sha: len(b"input data\n")}
    with BrokerClient(broker.address, str(bob_token)) as bob:
        # The curious user: alice's digest is answered exactly like content the broker does not have.
        assert bob.find_files([alice_sha]) == {}
        # ... and asking made nothing bob's: naming it in a job is still refused.
        spec = job_pb2.JobSpec(executable="run.sh")
        spec.requirements.walltime_s = 3600
        spec.input_files.add(name="input.txt", size=len(b"input data\n"), sha256=alice_sha)
        with pytest.raises(SplitpilotError, match="is not in the broker's file store"):
            bob.submit_checked(spec)
        for garbage, words in (([alice_sha.upper()], "sha256[0]"), (["../../etc/passwd"], "sha256[0]"),
                               ([alice_sha] * 10_001, "at most 10000")):
            with pytest.raises(InvalidRequest, match=re.escape(words)) as refused:
                bob._call("FindFiles", bob._stub.FindFiles, pb.FindFilesRequest(sha256=garbage))
            assert "fix:" in str(refused.value)
        assert bob.list().jobs == []


def test_token_show_and_ca_show_json_say_what_the_human_form_says_and_never_the_key(tmp_path):
    """`--json` for scripts: stable fields; the key of a token file is never in the output."""
    import json

    ca = tmp_path / "ca"
    assert run("ca", "init", str(ca), "--max-ttl", "agent=1d").returncode == 0
    shown = run("ca", "show", str(ca), "--json")
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    assert set(document) == {"subject", "key", "not_before", "not_after", "fingerprint", "max_lifetime_s"}
    assert document["max_lifetime_s"]["agent"] == 86400 and len(document["fingerprint"]) == 64
    token = tmp_path / "agent.pem"
    assert run("token", "issue", "--ca", str(ca), "--role", "agent", "--site", "SITE-A", "--ttl", "2h",
               "--out", str(token)).returncode == 0
    human = run("token", "show", str(token), "--ca", str(ca))
    machine = run("token", "show", str(token), "--ca", str(ca), "--json")
    assert machine.returncode == 0, machine.stderr
    record = json.loads(machine.stdout)
    assert (record["role"], record["site"], record["queue"], record["job_id"], record["verified"],
            record["expired"]) == ("agent", "SITE-A", "default", None, True, False)
    assert f"serial:      {record['serial']}" in human.stdout and record["fingerprint"] in human.stdout
    assert "PRIVATE" not in machine.stdout and "BEGIN" not in machine.stdout
    unverified = json.loads(run("token", "show", str(token), "--json").stdout)
    assert unverified["verified"] is False and unverified["serial"] == record["serial"]
# ------------------------------------------------------------------ batches

BATCH_FIELDS = {"batch_id", "owner", "label", "created", "jobs", "counts"}


def user_config(broker, tmp_path, name: str) -> str:
    """A client config file for another user NAME of the broker."""
    token = tmp_path / f"{name}.pem"
    assert run("token", "issue", "--ca", str(broker.state / "ca"), "--role", "user", "--subject", name,
               "--out", str(token)).returncode == 0
    config = tmp_path / f"{name}.toml"
    config.write_text(f'[client]\nbroker = "{broker.address}"\ntoken = "{token}"\n')
    return str(config)


def test_batches_from_submit_to_kill_status_and_output(broker, tmp_path):
    """The real CLI end to end: submit prints its batch (human and --json), job batches lists it, and
    status|kill|output --batch act on exactly that batch's jobs: the other batch is untouched."""
    first = job(broker, "submit", write_job_file(tmp_path), "--json")
    assert first.returncode == 0, first.stderr
    made = json.loads(first.stdout)
    assert set(made) == {"batch_id", "job_ids", "uploaded", "reused", "warnings"} and len(made["job_ids"]) == 2
    batch_a, ids_a = made["batch_id"], made["job_ids"]
    assert f"batch {batch_a}: splitpilot job status|kill|output --batch {batch_a}" in first.stderr
    second = job(broker, "submit", write_job_file(tmp_path), "--label", "calib run 7")
    ids_b = [int(line) for line in second.stdout.split()]
    batch_b = re.search(r"^batch (b-[0-9a-f]{10}):", second.stderr, re.M).group(1)
    assert batch_b != batch_a

    listed = [json.loads(line) for line in job(broker, "batches", "--json").stdout.splitlines()]
    assert [(b["batch_id"], b["jobs"], b["counts"], b["owner"], b["label"]) for b in listed] == \
        [(batch_b, 2, {"WAITING": 2}, "alice", "calib run 7"), (batch_a, 2, {"WAITING": 2}, "alice", "")]
    assert all(set(b) == BATCH_FIELDS for b in listed)
    table = job(broker, "batches")
    assert table.returncode == 0 and re.search(rf"^{batch_a}\s+-\s+\S+ \S+\s+2\s+2 WAITING$", table.stdout, re.M)
    assert re.search(rf"^{batch_b}\s+calib run 7\s+", table.stdout, re.M), table.stdout

    # Batch A's first job runs to DONE with an output; its outputs come by batch into DIR/ID/.
    agent_token = broker.ca.new_token(TokenRole.AGENT, "glidein", site="SITE-A", queue="default")
    assert finish(broker, agent_token, tmp_path) == ids_a[0]
    fetched = job(broker, "output", "--batch", batch_a, str(tmp_path / "results"))
    assert fetched.returncode == 1   # the waiting one has no outputs yet: said, and counted
    assert (tmp_path / "results" / str(ids_a[0]) / "result.out").read_text() == f"job {ids_a[0]}\n"
    assert f"job {ids_a[1]} has no outputs (state WAITING)" in fetched.stderr
    assert os.listdir(tmp_path / "results") == [str(ids_a[0])]

    killed = job(broker, "kill", "--batch", batch_a, "--reason", "wrong input")
    assert killed.returncode == 0, killed.stderr
    assert killed.stdout == f"job {ids_a[1]}: KILLED\n"   # the done one is not named: nothing to kill
    states = {r["job_id"]: (r["state"], r["batch_id"]) for r in
              map(json.loads, job(broker, "status", "--json").stdout.splitlines())}
    assert states == {ids_a[0]: ("DONE", batch_a), ids_a[1]: ("KILLED", batch_a),
                      ids_b[0]: ("WAITING", batch_b), ids_b[1]: ("WAITING", batch_b)}
    shown = job(broker, "status", "--batch", batch_b)
    assert "2 job(s) (all shown): 2 WAITING" in shown.stdout and str(ids_a[0]) not in shown.stdout.split()
    assert f"batch:     {batch_a}" in job(broker, "status", str(ids_a[0])).stdout


def test_another_users_batch_is_refused_by_every_command_and_nothing_changes(broker, tmp_path):
    alice = job(broker, "submit", write_job_file(tmp_path))
    batch = re.search(r"^batch (b-[0-9a-f]{10}):", alice.stderr, re.M).group(1)
    bob = user_config(broker, tmp_path, "bob")
    before = job(broker, "status", "--json").stdout
    for command in (("kill", "--batch", batch), ("status", "--batch", batch), ("status", "--batch", batch, "--json"),
                    ("output", "--batch", batch, str(tmp_path / "loot")), ("kill", "--batch", "b-0000000000")):
        refused = run("job", *command, "--config", bob)
        assert refused.returncode == 1, (command, refused.stdout, refused.stderr)
        assert "NOT_FOUND" in refused.stderr and "of yours; fix: check the id with `splitpilot job batches`" \
            in refused.stderr, refused.stderr
        assert refused.stdout == "" and "alice" not in refused.stderr
    assert not (tmp_path / "loot").exists()
    assert job(broker, "status", "--json").stdout == before           # alice's jobs untouched
    assert run("job", "batches", "--json", "--config", bob).stdout == ""


@pytest.mark.parametrize(("command", "words"), [
    (("kill", "1", "--batch", "b-0123456789"), "give either job ids or --batch, not both; fix:"),
    (("status", "1..2", "--batch", "b-0123456789"), "give either job ids or --batch, not both; fix:"),
    (("output", "1", "DIR", "--batch", "b-0123456789"), "give either job ids or --batch, not both; fix:"),
    (("kill", "--batch", ""), "--batch is empty; fix:"),
    (("submit", "jobs.toml", "--label", "\x1b]0;owned\x07"), "is not 1 to 64 letters, digits"),
    (("kill",), "no job id given; fix:"),
    (("batches", "--limit", "-1"), "argument --limit: -1: give 1 to 10000"),
    (("status", "--limit", "-1"), "argument --limit: -1: give 1 to 10000"),
])
def test_batch_usage_mistakes_exit_2_naming_the_fix(broker, tmp_path, command, words):
    job(broker, "submit", write_job_file(tmp_path))
    refused = job(broker, *command)
    assert refused.returncode == 2, refused.stderr
    assert words in refused.stderr
    assert "2 job(s) (all shown): 2 WAITING" in job(broker, "status").stdout
