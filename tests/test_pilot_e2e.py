"""The pilot end to end: a real broker, a real agent, real wrappers and runtimes.

The agent gets a real agent token on its stdin and runs jobs through each
runtime present (process, bubblewrap, podman). The secrecy test runs a
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

from broker.client import BrokerClient
from broker.lifecycle import JobState
from broker.server import BrokerConfig, BrokerServer
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


def run_agent(world, name: str, runtime: str, *, as_nobody: bool = False, image: str | None = None,
              timeout: float = 240) -> tuple[subprocess.CompletedProcess, bytes]:
    """Run one agent until it leaves idle; return its outcome and its token's private key (PEM)."""
    ca = world["server"].ca
    agent_token = ca.new_token(TokenRole.AGENT, f"pilot-{name}", site="E2E", queue="default",
                               ttl=datetime.timedelta(hours=1))
    work = world["base"] / f"work-{name}"
    work.mkdir()
    argv = [sys.executable, "-m", "pilot", "agent", "--broker", world["server"].address, "--token", "-",
            "--work-dir", str(work), "--software-dir", str(world["software"]), "--idle-timeout", "3s",
            "--lifetime", "30m", "--runtimes", runtime, "--container-policy", "require"]
    if image:
        argv += ["--image", image]
    env = {"PATH": os.environ["PATH"], "SPLITPILOT_AGENT_TOKEN": SENTINEL,
           "PYTHONPATH": str(HERE.parent)}
    if as_nobody:
        os.chown(work, NOBODY.pw_uid, NOBODY.pw_gid)
        argv = ["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}", "--clear-groups", *argv]
        env["HOME"] = str(work)
    result = subprocess.run(argv, input=agent_token.to_pem(), capture_output=True, timeout=timeout, env=env)
    return result, agent_token.to_pem()


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
]


@pytest.mark.parametrize("runtime,options", RUNTIMES)
def test_hostile_payload_finds_no_agent_token(world, runtime, options, tmp_path):
    client = world["client"]
    options = dict(options)
    if options.get("image") == "ROOTFS":
        options["image"] = str(ensure_rootfs())
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
    assert status.state is JobState.KILLED, status
    assert "exceeds the limit of 200 MiB" in status.message or "memory" in status.message, status.message


def test_agent_refuses_root_payloads_without_a_container(world):
    if os.geteuid() != 0:
        pytest.skip("needs root to check the refusal of root payloads")
    result, _ = run_agent(world, "root-refused", "process")
    assert result.returncode == 2
    assert b"refusing to run payloads as root without a container" in result.stderr
