"""What a payload can reach: the probe behind docs/security.md's isolation table.

Run as `python3 isolation_probe.py` in a job's sandbox, under any launcher
(tests/test_isolation_matrix.py starts it exactly as the agent starts a
wrapper: the launcher's command, the software area's setup script). Standard
library only: images carry no splitpilot. It reads probe-input.json (host
paths of another job's secret, the agent's state file, the agent's pid, the
software area as the payload sees it, a loopback port the test listens on)
and writes probe-result.json: for every attempt, "ok" or the errno's name.
"""

import errno
import json
import os
import socket


def attempt(action) -> str:
    try:
        action()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else type(exc).__name__


def read(path: str) -> None:
    with open(path, "rb") as handle:
        handle.read(1)


def append(path: str) -> None:
    with open(path, "ab") as handle:
        handle.write(b"changed by a payload\n")


def create(path: str) -> None:
    with open(path, "xb") as handle:
        handle.write(b"planted by a payload\n")


def visible(pid: int, marker: str) -> bool:
    """Is the process PID (identified by MARKER in its command line) in this payload's /proc?"""
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                if marker.encode() in handle.read():
                    return True
        except OSError:
            pass
    return False


def signal_agent(pid: int) -> None:
    os.kill(pid, 0)


def connect(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass


def raw_socket() -> None:
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()


def bind_low_port() -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 81))


def status() -> dict:
    fields = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("CapEff", "CapPrm", "CapBnd", "NoNewPrivs"):
                fields[key] = value.strip()
    return fields


with open("probe-input.json") as handle:
    given = json.load(handle)
if "agent_pid_file" in given:  # the decoy was started beside the launcher (inside a mini-condor node)
    with open(given["agent_pid_file"]) as handle:
        given["agent_pid"] = int(handle.read())
result = {
    "uid": os.getuid(),
    "status": status(),
    "other_job_secret": attempt(lambda: read(given["other_secret"])),
    "agent_state": attempt(lambda: read(given["agent_state"])),
    "agent_visible": visible(given["agent_pid"], given["agent_marker"]),
    # Only meaningful where the agent is visible (the pid is the host's).
    "agent_signal": attempt(lambda: signal_agent(given["agent_pid"]))
    if visible(given["agent_pid"], given["agent_marker"]) else "not visible",
    "software_modify": attempt(lambda: append(os.path.join(given["software"], "setup.sh"))),
    "software_create": attempt(lambda: create(os.path.join(given["software"], "planted.py"))),
    "host_loopback": attempt(lambda: connect(given["port"])),
    "raw_socket": attempt(raw_socket),
    "bind_port_81": attempt(bind_low_port),
}
with open("probe-result.json", "w") as handle:
    json.dump(result, handle)
