"""A real HAProxy in front of several brokers, for the fleet tests.

`HAProxy(backends)` writes a TCP-mode configuration into a private temporary
folder and runs Debian's `haproxy` in the foreground (`-db`) as a child of the
test: TLS passes through untouched, so mutual TLS still ends at a broker (the
brokers' host certificates must name the address clients dial: HAProxy's).
Backends are health-checked every 500 ms (TCP connect), marked down after 2
failures and up after 1 success; a connection HAProxy cannot make to a dead
backend is dispatched to another one (`retries` + `option redispatch`), and the
sessions of a backend marked down are closed (`on-marked-down
shutdown-sessions`) so that their clients reconnect through HAProxy to a live
broker.

HAProxy's runtime API (a UNIX socket in the same private folder, mode 0600)
tells the test which backends HAProxy sees up (`server_states`).

The binary comes from Debian's `haproxy` package: installed when it is missing
(as root, by scripts/install-system-deps.sh, which keeps Debian's own haproxy
service from starting). If that is impossible the tests FAIL (never skip),
naming the fix. `stop()` ends HAProxy (SIGTERM, then SIGKILL), waits for it and
removes the folder: nothing is left behind.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence

import pytest

INSTALL_HINT = ("fix: apt-get install -y haproxy (scripts/install-system-deps.sh installs it for `make test`)")


class MissingHAProxy(RuntimeError):
    pass


def find_haproxy() -> str:
    """The haproxy binary; installed with apt-get (as root) when missing."""
    found = shutil.which("haproxy") or next(
        (path for path in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(path, os.X_OK)), None)
    if found:
        return found
    if os.geteuid() != 0:
        raise MissingHAProxy(f"haproxy is not installed and this test run is not root; {INSTALL_HINT}")
    # The project's installer: apt-get without starting Debian's haproxy service (policy-rc.d).
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                          "install-system-deps.sh")
    try:
        done = subprocess.run(["sh", script, "haproxy"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MissingHAProxy(f"haproxy is not installed and apt-get could not run ({exc}); {INSTALL_HINT}") from None
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)
    if done.returncode != 0 or not found:
        raise MissingHAProxy(f"haproxy is not installed and `apt-get install -y haproxy` failed "
                             f"({done.returncode}):\n{done.stdout[-2000:]}\n{INSTALL_HINT}")
    return found


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def config_text(listen: tuple[str, int], backends: Sequence[str], admin_socket: str) -> str:
    """HAProxy's configuration: one TCP frontend, one backend per broker (HOST:PORT), fast health checks."""
    servers = "\n".join(f"    server b{index} {address}" for index, address in enumerate(backends))
    return f"""\
# Written by tests/haproxy.py (contrib/haproxy.cfg is the production example).
global
    maxconn 4096
    stats socket {admin_socket} mode 600 level admin

defaults
    mode tcp
    # gRPC keeps one long-lived HTTP/2 connection per client; its keepalive pings (2 min) keep it open.
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    # A connection to a backend that just died is tried again, on another backend.
    retries 2
    option redispatch

frontend brokers
    bind {listen[0]}:{listen[1]}
    default_backend brokers

backend brokers
    balance leastconn
    default-server check inter 500ms fall 2 rise 1 on-marked-down shutdown-sessions
{servers}
"""


class HAProxy:
    """A foreground haproxy child in TCP mode; a context manager. `address` is HOST:PORT to dial."""

    def __init__(self, backends: Sequence[str], host: str = "127.0.0.1") -> None:
        self.backends = list(backends)
        self.host = host
        self.port = 0
        self.dir = ""
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def admin_socket(self) -> str:
        return os.path.join(self.dir, "admin.sock")

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, "haproxy.log")

    def start(self) -> HAProxy:
        binary = find_haproxy()
        self.dir = tempfile.mkdtemp(prefix="splitpilot-haproxy-")
        self.port = free_port(self.host)
        path = os.path.join(self.dir, "haproxy.cfg")
        with open(path, "w") as handle:
            handle.write(config_text((self.host, self.port), self.backends, self.admin_socket))
        check = subprocess.run([binary, "-c", "-q", "-f", path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, timeout=60)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refused its configuration {path}:\n{check.stdout}")
        self._log = open(self.log_path, "wb")
        # -db: foreground, no daemon: the test owns the process and waits for it.
        self.process = subprocess.Popen([binary, "-db", "-f", path], stdout=self._log, stderr=self._log,
                                        stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not self._accepts():
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy ended at start ({self.process.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not listen on {self.address} within 30 s:\n{self.log()}")
            time.sleep(0.05)
        return self

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return True
        except OSError:
            return False

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as handle:
                return handle.read()[-4000:]
        except OSError:
            return ""

    def command(self, line: str) -> str:
        """One command of HAProxy's runtime API (e.g. `show servers state`), its answer."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(self.admin_socket)
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def _servers(self) -> list[tuple[str, list[str]]]:
        """(backend address, its CSV fields of `show stat`) per server."""
        rows = []
        for line in self.command("show stat").splitlines():
            fields = line.split(",")
            if len(fields) > 17 and fields[0] == "brokers" and fields[1] not in ("BACKEND", "FRONTEND"):
                rows.append((self.backends[int(fields[1][1:])], fields))
        return rows

    def server_states(self) -> dict[str, str]:
        """Backend address (HOST:PORT) -> 'UP' or 'DOWN', as HAProxy's health checks see it now."""
        return {address: "UP" if fields[17].startswith("UP") else "DOWN" for address, fields in self._servers()}

    def sessions(self) -> dict[str, int]:
        """Backend address -> connections HAProxy holds to it now (`scur`)."""
        return {address: int(fields[4] or 0) for address, fields in self._servers()}

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""

    def __enter__(self) -> HAProxy:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def haproxy_or_fail(backends: Sequence[str], host: str = "127.0.0.1") -> HAProxy:
    """A started HAProxy; a missing haproxy fails the test (never skips) with the fix."""
    proxy = HAProxy(backends, host)
    try:
        return proxy.__enter__()
    except MissingHAProxy as exc:
        message = str(exc)
    pytest.fail(message, pytrace=False)  # outside the except: no chained traceback
