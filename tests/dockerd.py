"""A private Docker engine for the tests: its own folders, socket and containerd; nothing of the host's.

    with private_dockerd() as engine:        # started, answering, test image imported
        env = {"DOCKER_HOST": engine.host}   # what every docker client of the test uses

As verified on these machines (shared notes, docker.md): Debian's `dockerd`
with --iptables=false --ip-forward=false --bridge=none (no docker0 bridge,
no iptables rules, no sysctl changes) and its data-root, exec-root, pidfile
and unix socket in one temporary folder. Containers use --network host.
The daemon starts its own containerd (state under exec-root) as its child.

Stopping: SIGTERM to the daemon (it stops its containerd), SIGKILL after a
deadline; then the mounts it leaves (the network namespace file under
exec-root/netns, the data-root's own bind) are unmounted and the folder is
removed. `stop()` checks that no process and no mount is left and raises if
one is (a test must leave nothing behind).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from condor_plugin.testing.nodeproc import mounts_under, wait_for
from pilot.launch.testimage import ensure_image

#: Seconds the daemon may take to answer (a few on an idle machine).
START_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0
#: Debian's docker.io client (20.10), and a newer one some machines have first on PATH.
DEBIAN_CLIENT = "/usr/bin/docker"
OTHER_CLIENT = "/usr/local/bin/docker"


class DockerdError(RuntimeError):
    """The private daemon did not start, or left something behind."""


class PrivateDockerd:
    """One dockerd (and its containerd) living in a temporary folder."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.socket = base / "docker.sock"
        self.pidfile = base / "dockerd.pid"
        self.log = base / "dockerd.log"
        self.process: subprocess.Popen | None = None
        self.image: str | None = None

    @property
    def host(self) -> str:
        """DOCKER_HOST for clients of this daemon."""
        return f"unix://{self.socket}"

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host, **extra}

    def start(self) -> None:
        dockerd = shutil.which("dockerd", path="/usr/sbin:/usr/bin:/sbin:/bin")
        if dockerd is None:
            raise DockerdError("dockerd is not installed; fix: scripts/install-system-deps.sh (package docker.io)")
        argv = [dockerd, "--iptables=false", "--ip-forward=false", "--bridge=none",
                "--data-root", str(self.base / "data"), "--exec-root", str(self.base / "exec"),
                "--pidfile", str(self.pidfile), "-H", self.host]
        with open(self.log, "ab") as log:
            # Its own session: a Ctrl-C meant for pytest does not reach it before teardown does.
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        if wait_for(self._answers, START_TIMEOUT) is None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise DockerdError(f"the private dockerd did not answer within {START_TIMEOUT:g} s:\n{tail}")

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise DockerdError(f"dockerd exited with {self.process.returncode}:\n"
                               + self.log.read_text(errors="replace")[-3000:])
        if not self.socket.exists():
            return False
        done = subprocess.run([DEBIAN_CLIENT if os.path.exists(DEBIAN_CLIENT) else "docker", "version",
                               "--format", "{{.Server.Version}}"], env=self.env(), capture_output=True, check=False)
        return done.returncode == 0

    def import_test_image(self) -> str:
        """The test root folder (pilot.launch.testimage) as an image of this daemon."""
        with _docker_host(self.host):
            self.image = ensure_image("docker")
        return self.image

    def processes(self) -> list[int]:
        """PIDs of processes whose command line names this daemon's folder (dockerd, containerd, shims)."""
        found = []
        marker = str(self.base).encode()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
            except OSError:
                pass
        return found

    def stop(self) -> None:
        """Stop the daemon and its containerd, unmount what they left, remove the folder; check all three."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if wait_for(lambda: not self.processes(), STOP_TIMEOUT) is None:
            for pid in self.processes():  # containerd or a shim that outlived its daemon
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not self.processes(), 10.0)
        for point in sorted(mounts_under(self.base), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        left_processes, left_mounts = self.processes(), mounts_under(self.base)
        if left_mounts:
            raise DockerdError(f"mounts left under {self.base}: {left_mounts}")
        shutil.rmtree(self.base, ignore_errors=True)
        if left_processes or self.base.exists():
            raise DockerdError(f"the private dockerd left processes {left_processes} or its folder {self.base}")


@contextlib.contextmanager
def _docker_host(host: str) -> Iterator[None]:
    previous = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = host
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = previous


@contextlib.contextmanager
def private_dockerd(*, set_environment: bool = True) -> Iterator[PrivateDockerd]:
    """A started private dockerd with the test image imported; stopped and removed on exit.

    SET_ENVIRONMENT: DOCKER_HOST points at it in this process's environment
    meanwhile (the launchers take DOCKER_HOST from the agent's environment).
    """
    # Under /tmp, short: a unix socket path must fit in 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="splitpilot-dockerd-", dir="/tmp"))
    engine = PrivateDockerd(base)
    try:
        engine.start()
        engine.import_test_image()
        if set_environment:
            with _docker_host(engine.host):
                yield engine
        else:
            yield engine
    finally:
        engine.stop()


def docker_clients() -> list[str]:
    """The docker clients on this machine, Debian's first."""
    return [client for client in (DEBIAN_CLIENT, OTHER_CLIENT) if os.access(client, os.X_OK)]
