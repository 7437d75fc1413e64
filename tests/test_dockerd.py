"""The private Docker engine of the tests (tests/dockerd.py) leaves nothing behind.

A daemon is started, runs a container on the host network through each docker
client (Debian's 20.10 refuses options a newer client takes: what the
launcher passes must suit both), and is stopped: no dockerd, containerd or
shim process, no mount (the network namespace file under exec-root, the
data-root bind) and no folder may remain.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from condor_plugin.testing.nodeproc import mounts_under
from tests.dockerd import docker_clients, private_dockerd


@pytest.mark.skipif(os.geteuid() != 0, reason="dockerd needs root")
def test_private_dockerd_runs_containers_and_leaves_no_daemon_mount_or_folder():
    clients = docker_clients()
    assert clients, "no docker client; fix: scripts/install-system-deps.sh (package docker.io)"
    with private_dockerd(set_environment=False) as engine:
        base, pids = engine.base, engine.processes()
        assert len(pids) >= 2  # dockerd and its own containerd
        for client in clients:
            done = subprocess.run([client, "run", "--rm", "-i", "--network=host", "--cap-drop=ALL",
                                   "--security-opt=no-new-privileges", "--user=65534:65534", engine.image,
                                   "/bin/sh", "-c", "read line; echo \"$line from $(id -u)\""],
                                  input=b"hello\n", env=engine.env(), capture_output=True, timeout=120)
            assert done.returncode == 0, done.stderr
            assert done.stdout == b"hello from 65534\n"
        assert mounts_under(base)  # the daemon did mount things there (what stop() must undo)
    assert not engine.processes() and not any(os.path.exists(f"/proc/{pid}") for pid in pids)
    assert not mounts_under(base) and not base.exists()
    assert "DOCKER_HOST" not in os.environ or not os.environ["DOCKER_HOST"].endswith(f"{base}/docker.sock")
