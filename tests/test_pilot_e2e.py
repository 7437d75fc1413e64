"""The pilot end to end: a real broker, a real agent, real wrappers and runtimes.

The agent gets a real agent token on its stdin and runs jobs through each
runtime present (process, bubblewrap, podman, docker: a private engine). The secrecy test runs a
hostile payload that dumps everything it can read (environment, argv,
/proc/*/environ, /proc/*/cmdline, its ancestors' memory, open descriptors,
readable files) and the test searches the dump for the agent's private key,
as PEM lines and as the raw private scalar.

Under the process launcher the agent and payload run as the same
unprivileged user (as in a glidein); what protects the agent's memory and
environment there is prctl(PR_SET_DUMPABLE, 0). As root, nothing would:
root reads any process's memory. Container runtimes isolate further (own
PID namespace: the agent is not even visible).
"""

from __future__ import annotations

import datetime
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from broker.server import BrokerConfig, BrokerServer
from pilot.api.client import BrokerClient
from pilot.api.states import JobState
from pilot.launch import build_software_area
from pilot.launch.testimage import ensure_rootfs
from pilot.pipe import messages as m
from pilot.tokens import TokenRole

HERE = Path(__file__).parent
NOBODY = pwd.getpwnam("nobody")
#: Put in the agent's environment; made at run time so that no file (this
#: test's own source, which the payload may read) contains it.
SENTINEL = f"agent-env-sentinel-{secrets.token_hex(16)}"


@pytest.fixture(scope="module")
def world():
    """A broker, a user, a software area, and a folder everyone can use."""
    base = Path(tempfile.mkdtemp(prefix="splitpilot-e2e-"))
    os.chmod(base, 0o755)
    server = BrokerServer(BrokerConfig(state_dir=str(base / "broker"), listen="127.0.0.1:0", reap_interval=1.0))
    server.start()
    try:
        software = base / "software"
        build_software_area(software)
        user = server.ca.new_token(TokenRole.USER, "e2e-user")
        with BrokerClient(server.address, user, server.ca_pem) as client:
            yield {"base": base, "server": server, "client": client, "software": software}
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def agent_command(world, name: str, runtime: str, *, as_nobody: bool = False, image: str | None = None,
                  idle: str = "3s", own_software: bool = False,
                  extra: tuple[str, ...] = ()) -> tuple[list[str], dict, bytes]:
    """The argv and environment of one agent, and its token (PEM, for its stdin)."""
    ca = world["server"].ca
    agent_token = ca.new_token(TokenRole.AGENT, f"pilot-{name}", site="E2E", queue="default",
                               ttl=datetime.timedelta(hours=1))
    work = world["base"] / f"work-{name}"
    work.mkdir()
    argv = [sys.executable, "-m", "pilot", "agent", "--broker", world["server"].address, "--token", "-",
            "--work-dir", str(work), "--idle-timeout", idle, "--lifetime", "30m", "--runtimes", runtime,
            "--container-policy", "require"]
    if not own_software:
        argv += ["--software-dir", str(world["software"])]
    if image:
        argv += ["--image", image]
    argv += list(extra)
    env = {"PATH": os.environ["PATH"], "SPLITPILOT_AGENT_TOKEN": SENTINEL,
           "PYTHONPATH": str(HERE.parent)}
    if "DOCKER_HOST" in os.environ:  # the tests' private Docker engine (conftest.docker_engine)
        env["DOCKER_HOST"] = os.environ["DOCKER_HOST"]
    if as_nobody:
        os.chown(work, NOBODY.pw_uid, NOBODY.pw_gid)
        argv = ["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}", "--clear-groups", *argv]
        env["HOME"] = str(work)
    return argv, env, agent_token.to_pem()


def run_agent(world, name: str, runtime: str, *, as_nobody: bool = False, image: str | None = None,
              timeout: float = 240, **options) -> tuple[subprocess.CompletedProcess, bytes]:
    """Run one agent until it leaves idle; return its outcome and its token's private key (PEM)."""
    argv, env, token = agent_command(world, name, runtime, as_nobody=as_nobody, image=image, **options)
    result = subprocess.run(argv, input=token, capture_output=True, timeout=timeout, env=env)
    return result, token


def start_agent(world, name: str, runtime: str, **options) -> subprocess.Popen:
    """Start one agent in the background (stderr to a file: read it with agent_log)."""
    argv, env, token = agent_command(world, name, runtime, **options)
    log = open(world["base"] / f"agent-{name}.log", "wb")
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log, env=env)
    log.close()
    process.stdin.write(token)
    process.stdin.close()
    return process


def agent_log(world, name: str) -> str:
    return (world["base"] / f"agent-{name}.log").read_text(errors="replace")


def shared_folder(world, name: str) -> Path:
    """A folder the payloads of an unprivileged agent can write (for what a test needs them to leave)."""
    folder = world["base"] / f"shared-{name}"
    folder.mkdir()
    os.chmod(folder, 0o777)
    return folder


def wait_for(condition, timeout: float, what: str):
    """Poll CONDITION until it returns something true; fail naming WHAT after TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def processes_in(folder: Path) -> list[int]:
    """PIDs of processes whose working directory is below FOLDER."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/cwd").startswith(str(folder)):
                found.append(int(pid))
        except OSError:
            pass
    return found


def submit(world, spec: m.JobSpec) -> int:
    return world["client"].submit([spec])[0]


def payload_spec(client, script: Path, name: str, *args: str, memory_mb: int = 512, outputs=("*.out",)):
    uploaded = client.upload(str(script), script.name)
    return m.JobSpec(name=name, executable=f"./{script.name}" if script.suffix == ".sh" else "python3",
                     arguments=[script.name, *args] if script.suffix == ".py" else list(args),
                     input_files=[uploaded], output_patterns=list(outputs), max_attempts=2,
                     requirements=m.Requirements(cores=1, memory_mb=memory_mb, disk_mb=2048, walltime_s=600))


def wait_final(client, job_id: int, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        status = client.status(job_id)
        if status.final or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


RUNTIMES = [
    pytest.param("process", {"as_nobody": True}, id="process-as-unprivileged-user"),
    pytest.param("bubblewrap", {}, id="bubblewrap"),
    pytest.param("podman", {"image": "ROOTFS"}, id="podman"),
    pytest.param("docker", {"image": "DOCKER"}, id="docker"),
]


@pytest.mark.parametrize("runtime,options", RUNTIMES)
def test_hostile_payload_finds_no_agent_token(world, runtime, options, tmp_path, request):
    client = world["client"]
    options = dict(options)
    if options.get("image") == "ROOTFS":
        options["image"] = str(ensure_rootfs())
    elif options.get("image") == "DOCKER":   # a private Docker engine, the test root imported as an image
        options["image"] = request.getfixturevalue("docker_engine").image
    job_id = submit(world, payload_spec(client, HERE / "hostile_payload.py", "hostile",
                                        outputs=("dump.bin", "report.out")))
    result, agent_pem = run_agent(world, f"hostile-{runtime}", runtime, **options)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    status = wait_final(client, job_id)
    assert status.state is JobState.DONE, (status.message, result.stderr.decode()[-3000:])
    out = tmp_path / "out"
    client.output(job_id, out)
    dump = (out / "dump.bin").read_bytes()
    report = (out / "report.out").read_text()
    assert len(dump) > 10_000, report  # it did read things
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_private_key(agent_pem[agent_pem.index(b"-----BEGIN " b"PRIVATE KEY"):], None)
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    key_lines = [line for line in agent_pem.split(b"-----BEGIN " b"PRIVATE KEY-----")[1].split(b"\n")
                 if len(line) >= 40]
    assert key_lines
    found = [line for line in key_lines if line in dump]
    assert not found, f"agent key PEM found by the payload under {runtime}; {report}"
    assert scalar not in dump, f"agent private scalar found in memory readable under {runtime}; {report}"
    assert SENTINEL.encode() not in dump, f"agent environment leaked under {runtime}; {report}"
    print(f"{runtime}: " + report.replace("\n", " | "))


def test_a_real_wrapper_runs_its_job_without_loading_cryptography(world):
    """The wrapper holds a job token but never parses it: while its job runs (the token used for the input
    and the states), its process maps gRPC's library and not cryptography's (~10 MiB of resident memory)."""
    client = world["client"]
    go = shared_folder(world, "no-crypto") / "go"
    script = world["base"] / "wait_for_go.sh"
    # The payload waits (bounded) for the test to have looked at its wrapper.
    script.write_text('#!/bin/sh\ni=0\nwhile [ ! -e "$1" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n'
                      'echo ran > ran.out\n')
    script.chmod(0o755)
    job_id = submit(world, payload_spec(client, script, "no-crypto", str(go)))
    agent = start_agent(world, "no-crypto", "process", extra=("--allow-root-payloads",))
    try:
        wait_for(lambda: client.status(job_id).state is JobState.RUNNING, 60, "the job to run")

        def wrappers():
            found = []
            for pid in processes_in(world["base"] / "work-no-crypto"):
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if b"pilot.wrapper" in argv and not argv[0].endswith(b"sh"):
                    found.append(pid)
            return found

        wrapper, = wait_for(wrappers, 30, "the job's wrapper")
        maps = Path(f"/proc/{wrapper}/maps").read_text()
        go.touch()
        assert "cygrpc" in maps, "the wrapper's gRPC client is not loaded: this test looked at the wrong process"
        assert "cryptography" not in maps and "_rust.abi3" not in maps
        assert wait_final(client, job_id).state is JobState.DONE
        assert agent.wait(timeout=60) == 0, agent_log(world, "no-crypto")[-3000:]
    finally:
        go.touch()
        if agent.poll() is None:   # a failed assertion above: nothing of this agent may outlive the test
            agent.kill()
            agent.wait()
        wait_for(lambda: not processes_in(world["base"] / "work-no-crypto"), timeout=60,
                 what="the agent, its wrapper and payload to end")


def test_wrapper_sigkill_is_an_infrastructure_failure_and_requeued(world):
    client = world["client"]
    script = world["base"] / "suicide.sh"
    # The payload kills its wrapper (its parent) on the first attempt only.
    script.write_text("#!/bin/sh\nif [ \"$SPLITPILOT_ATTEMPT\" = 1 ]; then kill -9 $PPID; sleep 5; fi\n"
                      "echo second > attempt.out\n")
    job_id = submit(world, payload_spec(client, script, "wrapper-killed"))
    result, _ = run_agent(world, "sigkill", "bubblewrap")
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    status = wait_final(client, job_id)
    assert status.state is JobState.DONE and status.attempt == 2, status
    stderr = result.stderr.decode()
    assert "wrapper failed" in stderr  # never a payload failure
    history = [(e.state, e.attempt) for e in client.status(job_id).history]
    assert (JobState.WAITING, 2) in history or any(a == 2 for _, a in history)


def test_memory_hog_killed_with_reason(world):
    client = world["client"]
    script = world["base"] / "hog.py"
    script.write_text("import time\nx = bytearray(600 << 20)\nx[::4096] = b'x' * len(x[::4096])\ntime.sleep(60)\n")
    job_id = submit(world, payload_spec(client, script, "hog", memory_mb=200))
    result, _ = run_agent(world, "hog", "bubblewrap")
    status = wait_final(client, job_id)
    assert status.state is JobState.FAILED_LIMIT, status  # its own limit, not an owner's kill
    assert "exceeds the limit of 200 MiB" in status.message or "memory" in status.message, status.message


def test_an_agent_at_debug_logs_no_token_or_key(world):
    """The curious operator (or whoever reads a glidein's .err): an agent at --log-level debug, whose wrappers
    then log at DEBUG too (every pipe frame's kind and size, the JobStart with the job token among them), runs
    a job; its log file (0600), its stderr and its wrappers' logs hold no PEM, no line of the agent token's
    certificate or key, and the agent token itself never went through argv (stdin)."""
    client = world["client"]
    script = world["base"] / "debug_job.sh"
    script.write_text("#!/bin/sh\necho debug-job > debug.out\n")
    job_id = submit(world, payload_spec(client, script, "debug-log"))
    log_file = world["base"] / "agent-debug.log"
    result, token = run_agent(world, "debug-log", "bubblewrap", extra=("--log-level", "debug",
                                                                       "--log-file", str(log_file)))
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert wait_final(client, job_id).state is JobState.DONE
    agent_lines = log_file.read_text()
    wrapper_logs = sorted((world["base"] / "work-debug-log").glob("job-*.wrapper.log"))
    assert wrapper_logs, "no wrapper log kept"
    wrapper_lines = "".join(path.read_text() for path in wrapper_logs)
    # DEBUG was on in both processes, and the frames that carry tokens went by.
    assert "DEBUG pipe: agent sends JobStart" in agent_lines and "INFO agent: leaving:" in agent_lines, agent_lines
    assert "DEBUG pipe: wrapper received JobStart" in wrapper_lines, wrapper_lines[-3000:]
    assert os.stat(log_file).st_mode & 0o777 == 0o600
    assert b"agent:" not in result.stderr, result.stderr[-2000:]            # the lines went to the file
    secret_lines = [line for line in token.decode().splitlines() if len(line) >= 40 and not line.startswith("-----")]
    assert len(secret_lines) > 10                                           # key and certificate bodies
    for text in (agent_lines, wrapper_lines, result.stderr.decode(errors="replace")):
        assert "-----BEGIN" not in text and "PRIVATE KEY" not in text
        assert not [line for line in secret_lines if line in text]


def test_agent_refuses_root_payloads_without_a_container(world):
    if os.geteuid() != 0:
        pytest.skip("needs root to check the refusal of root payloads")
    result, _ = run_agent(world, "root-refused", "process")
    assert result.returncode == 2
    assert b"refusing to run payloads as root without a container" in result.stderr


# ---------------------------------------------------------------------------
# The attacks on the node, replayed: each must now be refused.

STEAL_FROM_ANCESTORS = """
import errno, json, os

def stat_of(pid):
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[1])

def attempt(path, limit=1 << 20):
    try:
        with open(path, "rb") as handle:
            return handle.read(limit)
    except OSError as exc:
        return errno.errorcode[exc.errno]

found = {}
wrapper = os.getppid()
agent = stat_of(wrapper)
guardian = stat_of(agent)
for who, pid in (("wrapper", wrapper), ("agent", agent), ("guardian", guardian)):
    environ = attempt(f"/proc/{pid}/environ")
    key_found = False
    try:
        with open(f"/proc/{pid}/mem", "rb") as mem:
            mem_result = "opened"
            maps = attempt(f"/proc/{pid}/maps", 16 << 20)
            for line in maps.splitlines() if isinstance(maps, bytes) else ():
                fields = line.split()
                start, end = (int(x, 16) for x in fields[0].split(b"-"))
                if b"r" not in fields[1] or end - start > 256 << 20:
                    continue
                try:
                    mem.seek(start)
                    key_found |= b"PRIVATE" + b" KEY-----" in mem.read(end - start)
                    mem_result = "READ"
                except (OSError, ValueError, OverflowError):
                    pass
    except OSError as exc:
        mem_result = errno.errorcode[exc.errno]
    found[who] = {"pid": pid, "environ": environ if isinstance(environ, str) else "READ", "mem": mem_result,
                  "key_found": key_found}
with open("steal.out", "w") as handle:
    json.dump(found, handle)
"""


def test_payload_cannot_read_its_wrappers_memory_or_environment(world):
    """Process launcher, agent and payload as the same unprivileged user: the wrapper (job token and key),
    the agent and its guardian are all non-dumpable; /proc/PID/mem and environ are refused."""
    client = world["client"]
    script = world["base"] / "steal_from_ancestors.py"
    script.write_text(STEAL_FROM_ANCESTORS)
    job_id = submit(world, payload_spec(client, script, "steal-memory", outputs=("steal.out",)))
    result, _ = run_agent(world, "steal-memory", "process", as_nobody=True)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    status = wait_final(client, job_id)
    assert status.state is JobState.DONE, status.message
    out = world["base"] / "steal-memory-out"
    client.output(job_id, out)
    found = json.loads((out / "steal.out").read_text())
    print(found)
    for who in ("wrapper", "agent", "guardian"):
        assert found[who]["mem"] in ("EACCES", "EPERM"), (who, found)
        assert found[who]["environ"] in ("EACCES", "EPERM"), (who, found)
        assert not found[who]["key_found"]


LEAVER = """#!/bin/sh
# Attempt 1 leaves a daemon, then kills its own wrapper (which can no longer clean up) and lingers.
shared=$1
ls ../.. > others.out
date +%s.%N > times.out
if [ "$SPLITPILOT_ATTEMPT" = 1 ]; then
    setsid sh -c "echo \\$\\$ > $shared/daemon.pid; exec sleep 300" < /dev/null > /dev/null 2>&1 &
    while [ ! -s "$shared/daemon.pid" ]; do sleep 0.05; done
    kill -9 $PPID
    exec sleep 300
fi
if kill -0 "$(cat "$shared/daemon.pid")" 2>/dev/null; then echo alive; else echo gone; fi > daemon.out
date +%s.%N >> times.out
"""
TIMED = """#!/bin/sh
ls ../.. > others.out
date +%s.%N > times.out
sleep 1
date +%s.%N >> times.out
"""


def test_without_isolation_jobs_run_one_at_a_time_and_nothing_of_a_job_survives_it(world):
    client = world["client"]
    shared = shared_folder(world, "one-at-a-time")
    leaver, timed = world["base"] / "leaver.sh", world["base"] / "timed.sh"
    leaver.write_text(LEAVER)
    timed.write_text(TIMED)
    leaver_id = submit(world, payload_spec(client, leaver, "leaver", str(shared)))
    timed_ids = [submit(world, payload_spec(client, timed, f"timed-{i}")) for i in range(3)]
    # 2 cores here and 1-core jobs: only the one-job rule keeps them apart.
    result, _ = run_agent(world, "one-at-a-time", "process", as_nobody=True)
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr[-3000:]
    assert "isolation: none (nothing separates jobs: one job at a time)" in stderr
    windows = []
    for job_id in [leaver_id, *timed_ids]:
        status = wait_final(client, job_id)
        assert status.state is JobState.DONE, (status.message, stderr[-3000:])
        out = world["base"] / f"one-at-a-time-{job_id}"
        client.output(job_id, out)
        start, end = (float(x) for x in (out / "times.out").read_text().split())
        windows.append((start, end, job_id))
        # Alone in the work dir: no other job's folder, no earlier sandbox left.
        others = [n for n in (out / "others.out").read_text().split() if n.startswith("job-") and "." not in n]
        assert others == [f"job-{job_id}-{status.attempt}"], others
    windows.sort()
    for (_s1, end1, first), (start2, _e2, second) in zip(windows, windows[1:], strict=False):
        assert end1 <= start2, f"jobs {first} and {second} ran at the same time: {windows}"
    assert client.status(leaver_id).attempt == 2
    assert (world["base"] / f"one-at-a-time-{leaver_id}" / "daemon.out").read_text() == "gone\n"
    assert "left 2 process(es) behind: killed" in stderr, stderr[-3000:]
    daemon = int((shared / "daemon.pid").read_text())
    assert not os.path.exists(f"/proc/{daemon}")


NEIGHBOUR = """
import json, os, sys, time
victim_sandbox, work_dir = sys.argv[1], sys.argv[2]
started = time.time()
processes = {}
while time.time() < started + 3:   # watch for 3 s: the victim, started at the same time, may come up later
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            processes[pid] = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode("latin-1")
        except OSError as exc:
            processes.setdefault(pid, str(exc))
    time.sleep(0.05)
readable = []
for pid in processes:
    if int(pid) == os.getpid():
        continue
    try:
        open(f"/proc/{pid}/mem", "rb").close()
        readable.append(pid)
    except OSError:
        pass
report = {"processes": processes, "mem_readable": readable, "victim_visible": os.path.exists(victim_sandbox),
          "work_visible": os.path.exists(work_dir), "root": sorted(os.listdir("/")), "started": started,
          "ended": time.time()}
with open("neighbour.out", "w") as handle:
    json.dump(report, handle)
"""
VICTIM = """#!/bin/sh
date +%s.%N > times.out
echo "the victim's own result" > victim.out
sleep 6
date +%s.%N >> times.out
"""


def test_namespace_jobs_see_neither_each_other_nor_the_agent(world):
    """Two jobs at once under the namespace launcher (agent as an unprivileged user): the attacker
    knows where the victim's sandbox and the agent's work dir are on the host, and finds neither; it
    sees no process but its own namespace's (not the agent, not its guardian, not the victim)."""
    client = world["client"]
    victim_script, neighbour_script = world["base"] / "victim.sh", world["base"] / "neighbour.py"
    victim_script.write_text(VICTIM)
    neighbour_script.write_text(NEIGHBOUR)
    work = world["base"] / "work-namespace-neighbours"
    victim_id = submit(world, payload_spec(client, victim_script, "victim"))
    victim_sandbox = work / f"job-{victim_id}-1" / "sandbox"
    neighbour_id = submit(world, payload_spec(client, neighbour_script, "neighbour", str(victim_sandbox), str(work)))
    result, _ = run_agent(world, "namespace-neighbours", "namespace", as_nobody=True)
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr[-3000:]
    assert f"job {victim_id}.1 matched" in stderr and "isolation: namespace" in stderr
    for job_id in (victim_id, neighbour_id):
        status = wait_final(client, job_id)
        assert status.state is JobState.DONE, (status.message, stderr[-3000:])
    out = world["base"] / "namespace-neighbours-out"
    client.output(victim_id, out / "victim")
    client.output(neighbour_id, out / "neighbour")
    report = json.loads((out / "neighbour" / "neighbour.out").read_text())
    start, end = (float(x) for x in (out / "victim" / "times.out").read_text().split())
    assert start < report["ended"] and report["started"] < end, "precondition: both jobs ran at the same time"
    assert (out / "victim" / "victim.out").read_text() == "the victim's own result\n"
    assert not report["victim_visible"] and not report["work_visible"]
    assert len(report["processes"]) <= 4, report["processes"]
    assert not any("pilot agent" in c or "--token" in c or "victim" in c for c in report["processes"].values())
    assert report["mem_readable"] == [], report
    assert "workdir" in report["root"] and "home" not in report["root"] and "root" not in report["root"]


PATCH_SOFTWARE_AREA = """#!/bin/sh
# The software area is on PYTHONPATH (setup.sh put it there): patch the wrapper the next job will run.
area=${PYTHONPATH%/lib/python}
printf '\\nopen("%s/pwned", "w").write("the patched wrapper ran")\\n' "$1" >> "$area/lib/python/pilot/wrapper/run.py"
echo patched > patched.out
"""


def test_a_job_patching_the_software_area_stops_the_agent_before_the_next_wrapper(world):
    """Process launcher: the area (the agent's own, in its work dir) is writable by the payload. Job 1
    patches pilot/wrapper/run.py; job 2, of another user, must not run it: the agent refuses to start the
    wrapper, reports the attempt as an infrastructure failure, reports its end naming the file, exits 6."""
    client, server = world["client"], world["server"]
    shared = shared_folder(world, "tamper")
    script = world["base"] / "patch_area.sh"
    script.write_text(PATCH_SOFTWARE_AREA)
    first = submit(world, payload_spec(client, script, "tamper", str(shared)))
    agent = start_agent(world, "tamper", "process", as_nobody=True, idle="60s", own_software=True)
    other_user = server.ca.new_token(TokenRole.USER, "e2e-other-user")
    admin = server.ca.new_token(TokenRole.ADMIN, "e2e-admin")
    from pilot.api.client import AdminClient
    with BrokerClient(server.address, other_user, server.ca_pem) as other, \
            AdminClient(server.address, admin, server.ca_pem) as admin_client:
        second = None
        try:
            assert wait_final(client, first, timeout=120).state is JobState.DONE
            second = other.submit([m.JobSpec(name="victim-of-tamper", executable="/bin/true", max_attempts=3,
                                             requirements=m.Requirements(cores=1, memory_mb=100,
                                                                         walltime_s=60))])[0]
            assert agent.wait(timeout=120) == 6
            log = agent_log(world, "tamper")
            assert "lib/python/pilot/wrapper/run.py was modified" in log, log[-3000:]
            assert f"job {second}.1 not started: the software area changed" in log
            assert not (shared / "pwned").exists()           # the patched wrapper never ran
            status = other.status(second)
            assert status.state is JobState.WAITING and status.attempt == 1, status   # back in the queue
            assert any("software area changed" in event.detail for event in status.history), status.history
            pilots = [p for p in admin_client.list_pilots() if p.end_reason.startswith("software area changed")]
            assert pilots and "lib/python/pilot/wrapper/run.py" in pilots[0].end_reason, pilots
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
            if second is not None:
                other.kill(second, "test cleanup")


def test_an_agent_killed_by_its_payload_is_reported_at_once_by_its_guardian(world):
    """Process launcher, same user: the payload SIGKILLs its agent. The guardian reports the pilot
    abandoned at once: the job is back in the queue within seconds, not after the reaper's timeout."""
    client = world["client"]
    script = world["base"] / "kill_agent.sh"
    script.write_text("#!/bin/sh\n"
                      "agent=$(sed 's/.*) //' /proc/$PPID/stat | cut -d' ' -f2)\n"
                      "echo $agent > agent.pid\n"
                      "kill -9 $agent\n"
                      "exec sleep 300\n")
    job_id = submit(world, payload_spec(client, script, "kill-agent"))
    agent = start_agent(world, "kill-agent", "process", as_nobody=True, idle="60s")
    work = world["base"] / "work-kill-agent"
    try:
        code = agent.wait(timeout=120)
        log = agent_log(world, "kill-agent")
        assert code == 1, log[-3000:]
        assert "guardian: agent killed by SIGKILL" in log, log[-3000:]
        # The broker ended the attempt at once (ReportPilotEnd abandoned=True) and re-queued the job.
        wait_for(lambda: client.status(job_id).state is JobState.WAITING, timeout=10,
                 what=f"job {job_id} back in the queue; guardian log: {log[-1500:]}")
        assert "reported to the broker" in log
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        client.kill(job_id, "test cleanup")
        # The wrapper sees the agent's end of its pipe close and stops its payload: nothing stays.
        wait_for(lambda: not processes_in(work), timeout=60, what="the orphaned wrapper and payload to end")


SWAP_OUTPUTS = """#!/bin/sh
# result.out flips between the original and a link to /etc/passwd (env.out: to the wrapper's environ)
# from the moment this script has exited; agent.out is a hard link to a file of the agent's work dir;
# fifo.out would block a reader for ever.
work=$(cd ../.. && pwd)
echo original > result.out
echo original-env > env.out
ln "$work/agent-state.txt" agent.out
mkfifo fifo.out
setsid sh -c '
    while kill -0 '$$' 2>/dev/null; do :; done
    while true; do
        echo original > keep.tmp && mv -f keep.tmp result.out
        echo original-env > keep2.tmp && mv -f keep2.tmp env.out
        ln -sfn /etc/passwd swap.tmp && mv -f swap.tmp result.out
        ln -sfn /proc/self/environ swap2.tmp && mv -f swap2.tmp env.out
    done' < /dev/null > /dev/null 2>&1 &
exit 0
"""


def test_outputs_are_uploaded_from_what_the_payload_left_never_from_what_it_points_at(world):
    """Process launcher, same user, a real broker: links, a hard link into the agent's work dir and a FIFO
    named like outputs; a daemon swapping files after the payload's exit. Nothing but the payload's own
    regular files is stored, and the job says which outputs were refused."""
    client = world["client"]
    script = world["base"] / "swap_outputs.sh"
    script.write_text(SWAP_OUTPUTS)
    job_id = submit(world, payload_spec(client, script, "swap-outputs"))
    work = world["base"] / "work-swap-outputs"
    argv, env, token = agent_command(world, "swap-outputs", "process", as_nobody=True)
    (work / "agent-state.txt").write_text("the agent's own file\n")
    os.chown(work / "agent-state.txt", NOBODY.pw_uid, NOBODY.pw_gid)
    result = subprocess.run(argv, input=token, capture_output=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    status = wait_final(client, job_id)
    assert status.state is JobState.FAILED_OUTPUT, status.message
    assert "'agent.out' has 2 hard links" in status.message and "'fifo.out' is a FIFO" in status.message
    out = world["base"] / "swap-outputs-out"
    client.output(job_id, out)
    stored = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "agent.out" not in stored and "fifo.out" not in stored
    assert stored.get("result.out", b"original\n") == b"original\n"
    assert stored.get("env.out", b"original-env\n") == b"original-env\n"
    for name in {"result.out", "env.out"} - set(stored):   # flipped to a link when the daemon was killed
        assert f"'{name}' is a symbolic link" in status.message
    assert not any(b"root:" in data or b"PATH=" in data for data in stored.values())
    assert not processes_in(work)


BIND_PROBE = """#!/bin/sh
# The site's data, bound by the agent's --bind: readable, not writable (even where the host folder is 0777).
cat /site/data/given.txt > seen.out
if echo x > /site/data/planted.txt 2>/dev/null; then echo written > write.out; else echo refused > write.out; fi
"""


def test_site_binds_from_the_agents_command_line_reach_the_payload_read_only(world):
    """`splitpilot agent --bind SRC:DST` under the namespace launcher (agent as an unprivileged user): the payload
    reads the site's file at DST and cannot write there, though the host folder is writable by everyone."""
    client = world["client"]
    site = world["base"] / "site-data"
    site.mkdir()
    os.chmod(site, 0o777)
    (site / "given.txt").write_text("from the site\n")
    script = world["base"] / "bind_probe.sh"
    script.write_text(BIND_PROBE)
    job_id = submit(world, payload_spec(client, script, "bind-probe"))
    result, _ = run_agent(world, "binds", "namespace", as_nobody=True, extra=("--bind", f"{site}:/site/data"))
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr[-3000:]
    assert f"site binds (read-only): {site} at /site/data" in stderr and "isolation: namespace" in stderr
    status = wait_final(client, job_id)
    assert status.state is JobState.DONE, (status.message, stderr[-3000:])
    out = world["base"] / "binds-out"
    client.output(job_id, out)
    assert (out / "seen.out").read_text() == "from the site\n"
    assert (out / "write.out").read_text() == "refused\n" and not (site / "planted.txt").exists()


@pytest.mark.parametrize("bind, words", [
    ("WORK:/site/work", "is the agent's work dir"),
    ("BASE:/site/all", "holds the agent's work dir"),
    ("/proc/self:/site/me", "the whole host or its processes"),
    ("/:/host", "the whole host"),
    ("/usr:/workdir", "overlaps /workdir"),
    ("/usr/../etc:/site/etc", "'..'"),
])
def test_agent_refuses_binds_that_would_show_a_payload_the_agent(world, bind, words):
    """Before it reads its token or contacts the broker: exit 2 naming the bind and the fix; the work dir stays
    empty and the broker sees no pilot."""
    name = f"bad-bind-{abs(hash(bind)) % 10**8}"
    work = world["base"] / f"work-{name}"
    bind = bind.replace("WORK", str(work)).replace("BASE", str(world["base"]))
    before = {p.pilot_id for p in world["server"].store.list_pilots(datetime.datetime.fromtimestamp(0, datetime.UTC))}
    result, _ = run_agent(world, name, "namespace", as_nobody=True, extra=("--bind", bind), timeout=60)
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr[-3000:]
    assert "--bind" in stderr and words in stderr and "fix:" in stderr, stderr
    assert list(work.iterdir()) == []
    after = {p.pilot_id for p in world["server"].store.list_pilots(datetime.datetime.fromtimestamp(0, datetime.UTC))}
    assert after == before
