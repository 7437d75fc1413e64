"""The isolation table of docs/security.md, measured: one probe payload under every runtime.

For each launcher present here, a probe (tests/isolation_probe.py) runs in a
job's sandbox exactly as a wrapper is started (the launcher's command, the
software area's setup script, the launcher's environment), as the user the
agent would be: unprivileged for no container, the namespace launcher and
bubblewrap (a glidein's user); root for podman and docker (rootful engines).
Beside its sandbox lie another job's sandbox with a secret and the agent's
own state file, as the agent lays them out; a decoy "agent" process of the
agent's user runs; the test listens on a loopback port. The probe tries to
reach each, and the test turns what it saw into the table's cells.

The test then checks those cells against the table in docs/security.md, so
the document says what was measured, not what was assumed: a change of
isolation fails here until the document is changed with it.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pilot.launch import Mounts, build_software_area, make_launcher
from pilot.launch.testimage import ensure_rootfs

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "security.md"
PROBE = HERE / "isolation_probe.py"
NOBODY = pwd.getpwnam("nobody")
MARKER = "splitpilot-decoy-agent"
COLUMNS = ("other jobs", "the agent", "the software area", "the host network", "capabilities")

#: Runs as the agent's user: build the launcher and start the probe as the agent starts a wrapper.
AGENT_SIDE = """
import json, sys
from pilot.launch import Mounts, make_launcher, spawn, wrapper_command
runtime, image, sandbox, software = json.loads(sys.argv[1])
launcher = make_launcher(runtime, image or None)
mounts = Mounts.on_host(sandbox, software)
launcher.prepare_sandbox(sandbox)  # as the agent does: engines may run the payload as a user of their own
process, channel = spawn(launcher, wrapper_command(launcher, mounts, ["python3", "isolation_probe.py"]), mounts)
channel.close()
sys.exit(process.wait(120))
"""


def cells(result: dict) -> dict[str, str]:
    """The table's cells from one probe result."""
    other = "isolated" if result["other_job_secret"] != "ok" else "NOT isolated"
    agent_reached = result["agent_visible"] or result["agent_state"] == "ok"
    agent = "isolated" if not agent_reached else (
        "NOT isolated (visible, signalable)" if result["agent_signal"] == "ok" else "NOT isolated (visible)")
    software = "read-only" if "ok" not in (result["software_modify"], result["software_create"]) else "writable"
    network = "shared" if result["host_loopback"] == "ok" else "separate"
    status = result["status"]
    no_caps = status.get("CapEff") == "0000000000000000" and result["raw_socket"] != "ok" \
        and result["bind_port_81"] != "ok"
    bounded = status.get("CapBnd") == "0000000000000000"
    capabilities = ("none" if no_caps else "SOME") + (", bounding set empty" if bounded else "") + \
        (", no_new_privs" if status.get("NoNewPrivs") == "1" else "")
    return dict(zip(COLUMNS, (other, agent, software, network, capabilities), strict=True))


def documented_rows() -> dict[str, dict[str, str]]:
    """The isolation table of docs/security.md: runtime -> column -> cell."""
    text = DOC.read_text()
    section = text[text.index("## What each runtime isolates"):]
    rows = {}
    for line in section.splitlines():
        found = re.fullmatch(r"\|\s*`(\w+)`\s*\|(.*)\|", line.strip())
        if found:
            values = [v.strip() for v in found.group(2).split("|")]
            rows[found.group(1)] = dict(zip(COLUMNS, values[:len(COLUMNS)], strict=True))
    return rows


@pytest.fixture(scope="module")
def listener():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


def run_probe(runtime: str, image: str | None, user: pwd.struct_passwd | None, port: int) -> dict:
    """Lay out an agent's work dir, start a decoy agent and the probe; return what the probe saw."""
    base = Path(tempfile.mkdtemp(prefix=f"splitpilot-matrix-{runtime}-", dir="/tmp"))
    decoy = None
    try:
        os.chmod(base, 0o755)
        work = base / "work"
        sandbox, other = work / "job-1-1" / "sandbox", work / "job-2-1" / "sandbox"
        for folder in (sandbox, other):
            folder.mkdir(parents=True)
        (other / "secret.out").write_text("another job's output\n")
        (work / "agent-state").write_text("the agent's own file\n")
        software = build_software_area(work / "software")  # the agent builds it in its own work dir
        shutil.copy(PROBE, sandbox / PROBE.name)
        become: list[str] = []
        if user is not None:
            for path in [work, *work.rglob("*")]:
                os.lchown(path, user.pw_uid, user.pw_gid)
            become = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
        # The decoy agent: a process of the agent's user, found by the probe through MARKER.
        decoy = subprocess.Popen([*become, sys.executable, "-c", "import time; time.sleep(600)", MARKER])
        launcher = make_launcher(runtime, image)
        mounts = Mounts.on_host(str(sandbox), str(software))
        (sandbox / "probe-input.json").write_text(json.dumps({
            "other_secret": str(other / "secret.out"), "agent_state": str(work / "agent-state"),
            "agent_pid": decoy.pid, "agent_marker": MARKER, "port": port,
            "software": launcher.software_dir(mounts)}))
        agent = subprocess.run([*become, sys.executable, "-c", AGENT_SIDE,
                                json.dumps([runtime, image or "", str(sandbox), str(software)])],
                               capture_output=True, text=True, timeout=240,
                               env={**os.environ, "PYTHONPATH": str(HERE.parent)})
        assert agent.returncode == 0, agent.stdout + agent.stderr
        return json.loads((sandbox / "probe-result.json").read_text())
    finally:
        if decoy is not None:
            decoy.kill()
            decoy.wait()
        shutil.rmtree(base, ignore_errors=True)


def _available(runtime: str) -> str | None:
    """Why RUNTIME cannot be measured here, or None."""
    launcher_binary = {"bubblewrap": "bwrap", "podman": "podman"}.get(runtime)
    if launcher_binary and shutil.which(launcher_binary) is None:
        return f"{launcher_binary} is not installed here"
    return None


HOST_RUNTIMES = {
    # runtime: (the agent's user: None = root, the image from the test's request)
    "process": (NOBODY, lambda request: None),
    "namespace": (NOBODY, lambda request: None),
    "bubblewrap": (NOBODY, lambda request: None),
    "podman": (None, lambda request: str(ensure_rootfs())),
    # A private engine (tests/dockerd.py); its DOCKER_HOST reaches the agent side through the environment.
    "docker": (None, lambda request: request.getfixturevalue("docker_engine").image),
}


@pytest.mark.parametrize("runtime", list(HOST_RUNTIMES))
def test_the_documented_isolation_is_what_a_payload_finds(runtime, listener, request):
    if os.geteuid() != 0:
        pytest.skip("lays out an agent as another user: needs root")
    problem = _available(runtime)
    if problem:
        pytest.skip(problem)
    user, image = HOST_RUNTIMES[runtime]
    result = run_probe(runtime, image(request), user, listener)
    measured = cells(result)
    print(f"| `{runtime}` | " + " | ".join(measured[c] for c in COLUMNS) + " |")
    documented = documented_rows()
    assert runtime in documented, f"docs/security.md has no row for `{runtime}`; measured: {measured}"
    assert documented[runtime] == measured, f"{runtime}: the document says {documented[runtime]}, " \
                                            f"a payload found {measured} ({result})"


def test_the_table_has_a_row_for_every_launcher():
    from pilot.launch.runtimes import LAUNCHERS

    assert set(LAUNCHERS) - {"singularity"} <= set(documented_rows()), "every launcher's isolation is documented"
