"""A private XRootD server for the tests (and bench/sandbox_store.py), requiring `sss` authentication.

`XRootDServer` runs Debian's `xrootd` (package `xrootd-server`, installed with
scripts/install-system-deps.sh when missing and the run is root) in the
foreground as a child of the test run, on a free 127.0.0.1 port, exporting a
fresh private directory (mode 0700, owned by the server's user). As root it
runs as the `xrootd` user (`-R xrootd`: XRootD refuses to run as root).

Authentication: one sss key made by `xrdsssadmin`, in two keytabs of mode
0600: the server's (owned by the server's user) and the broker's (owned by
this process's user, `keytab`). The server accepts sss only
(`sec.protbind * only sss`): a client without the key gets nothing.

Nothing is left behind: `stop()` terminates the server (then kills it) and
removes the directory; a watchdog process does the same if the test run
itself dies (it waits for EOF on a pipe only this process holds).

Fixtures: `xrootd_server` (session scope) is the server; `xrootd_url` gives
each test its own folder on it, as a --file-store URL with the keytab.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

INSTALL_HINT = ("fix: apt-get install -y xrootd-server (scripts/install-system-deps.sh installs it for "
                "`make test`)")
SERVER_USER = "xrootd"

_WATCHDOG = r"""
import os, shutil, signal, sys
folder, pid = sys.argv[1], 0
signal.signal(signal.SIGINT, signal.SIG_IGN)
for line in sys.stdin:             # the server's pid, one line per start; EOF: the owner closed the pipe or died
    pid = int(line)
if pid:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
shutil.rmtree(folder, ignore_errors=True)
"""


class MissingXRootD(RuntimeError):
    pass


def find_xrootd() -> str:
    """The xrootd binary; installed with apt-get (as root) when missing."""
    found = shutil.which("xrootd")
    if found and shutil.which("xrdsssadmin"):
        return found
    if os.geteuid() != 0:
        raise MissingXRootD(f"xrootd is not installed and this test run is not root; {INSTALL_HINT}")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                          "install-system-deps.sh")
    try:
        done = subprocess.run(["sh", script, "xrootd-server"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MissingXRootD(f"xrootd is not installed and apt-get could not run ({exc}); {INSTALL_HINT}") from None
    found = shutil.which("xrootd")
    if done.returncode != 0 or not found:
        raise MissingXRootD(f"xrootd is not installed and `apt-get install -y xrootd-server` failed "
                            f"({done.returncode}):\n{done.stdout[-2000:]}\n{INSTALL_HINT}")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_keytab(path: str, user: str = "splitpilot") -> None:
    """A new sss keytab at PATH (mode 0600) holding one random key."""
    done = subprocess.run(["xrdsssadmin", "-k", "splitpilot", "-u", user, "-g", user, "add", path],
                          input="y\n", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    if done.returncode != 0 or not os.path.exists(path):
        raise RuntimeError(f"xrdsssadmin could not make {path} ({done.returncode}):\n{done.stdout}")
    os.chmod(path, 0o600)


class XRootDServer:
    """A throw-away xrootd server requiring sss; a context manager. `url(base)` is a --file-store URL."""

    def __init__(self, keytab: str | None = None) -> None:
        self.binary = find_xrootd()
        #: The broker's keytab: KEYTAB (another server's, whose key this one then shares: the XRootD client
        #: takes one keytab per process), else a new one in this server's folder.
        self._keytab = keytab
        self.dir = ""
        self.port = 0
        self.process: subprocess.Popen | None = None
        self._watchdog: subprocess.Popen | None = None
        self._log = None

    @property
    def export(self) -> str:
        """The server's local folder behind its namespace (what an attacker on the server's disk would edit)."""
        return os.path.join(self.dir, "export")

    @property
    def keytab(self) -> str:
        """The broker's keytab (this process's user, 0600)."""
        return self._keytab or os.path.join(self.dir, "broker.keytab")

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, "xrootd.out")

    def url(self, base: str) -> str:
        return f"xrootd://127.0.0.1:{self.port}/{base.strip('/')}?keytab={self.keytab}"

    def local(self, base: str, sha256: str = "") -> str:
        """The server-side file of content SHA256 under BASE."""
        return os.path.join(self.export, base.strip("/"), sha256)

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as handle:
                return handle.read()[-4000:]
        except OSError:
            return ""

    def start(self) -> XRootDServer:
        self.dir = tempfile.mkdtemp(prefix="splitpilot-xrootd-")
        os.chmod(self.dir, 0o755)   # the server's user walks into its own folders below
        as_root = os.geteuid() == 0
        owner = pwd.getpwnam(SERVER_USER) if as_root else None
        admin = os.path.join(self.dir, "admin")
        server_keytab = os.path.join(self.dir, "server.keytab")
        os.mkdir(self.export, 0o700)
        os.mkdir(admin, 0o700)
        if self._keytab is None:
            make_keytab(self.keytab)
        shutil.copyfile(self.keytab, server_keytab)
        os.chmod(server_keytab, 0o600)
        if owner is not None:
            for path in (self.export, admin, server_keytab):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        for attempt in range(5):
            self.port = free_port()
            config = os.path.join(self.dir, "xrootd.cfg")
            with open(config, "w") as handle:
                handle.write(f"""\
# Written by tests/xrootd.py (docs/broker.md shows a production configuration).
all.export /
oss.localroot {self.export}
all.adminpath {admin}
all.pidpath {admin}
xrd.port {self.port}
xrd.network nodnr
xrootd.seclib libXrdSec.so
sec.protocol sss -s {server_keytab}
sec.protbind * only sss
""")
            self._log = open(self.log_path, "wb")
            argv = [self.binary, "-c", config, "-n", "splitpilot", *(["-R", SERVER_USER] if as_root else [])]
            self.process = subprocess.Popen(argv, stdout=self._log, stderr=self._log, stdin=subprocess.DEVNULL)
            if self._watchdog is None:
                self._watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, self.dir], stdin=subprocess.PIPE,
                                                  start_new_session=True, text=True)
            self._watchdog.stdin.write(f"{self.process.pid}\n")
            self._watchdog.stdin.flush()
            if self._wait_listening():
                return self
            self._terminate()
            if attempt == 4:
                raise RuntimeError(f"xrootd did not start on 127.0.0.1:{self.port}:\n{self.log()}")
        return self

    def _wait_listening(self) -> bool:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False   # e.g. the port was taken meanwhile: another one
            if "initialization completed" in self.log() and self._accepts():
                return True
            time.sleep(0.05)
        return False

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def _terminate(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def pause(self) -> None:
        """Stop the server as an outage would (its folder stays for inspection; stop() removes it)."""
        self._terminate()

    def stop(self) -> None:
        self._terminate()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""
        if self._watchdog is not None:
            self._watchdog.stdin.close()
            try:
                self._watchdog.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                self._watchdog.wait()
            self._watchdog = None

    def __enter__(self) -> XRootDServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


_session: dict = {"server": None, "users": 0}


@pytest.fixture(scope="session")
def xrootd_server():
    """The test session's XRootD server (fails, never skips, when xrootd is missing). One for the whole run
    however many test modules import this fixture (pytest makes each import a fixture of its own, and the
    XRootD client takes one keytab per process): started by the first, stopped after the last."""
    if _session["server"] is None:
        missing = ""
        try:
            server = XRootDServer()
        except MissingXRootD as exc:
            missing = str(exc)
        if missing:
            pytest.fail(missing, pytrace=False)  # outside the except: no chained traceback
        _session["server"] = server.__enter__()
    _session["users"] += 1
    try:
        yield _session["server"]
    finally:
        _session["users"] -= 1
        if not _session["users"]:
            _session["server"].stop()
            _session["server"] = None


@pytest.fixture
def xrootd_url(xrootd_server) -> str:
    """A --file-store URL of a folder of its own on the session's XRootD server, for one test."""
    return xrootd_server.url(f"t-{uuid.uuid4().hex[:12]}")
