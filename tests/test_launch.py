"""Launchers: exact commands, the setup script's quoting, and real runs in every runtime here.

Real runs use an image made from this host's own python3 and libraries
(pilot.launch.testimage, cached across runs) that does not contain
splitpilot, and a software area built from this installation (read-only
inside). Runtimes: no container, bubblewrap (host root and image folder),
podman (an imported image and the folder through --rootfs), docker (a
private daemon started for the session, tests/dockerd.py, driven by each
docker client on the machine: Debian's 20.10 and a newer one where present),
and apptainer where present. Only apptainer may be skipped, when absent.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import logging
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import sample_job_start

from pilot.launch import (
    LAUNCHERS,
    ApptainerLauncher,
    Bind,
    BubblewrapLauncher,
    DockerLauncher,
    LaunchConfigError,
    Launcher,
    Mounts,
    NamespaceLauncher,
    NoUsableRuntime,
    PodmanLauncher,
    ProcessLauncher,
    SingularityLauncher,
    build_software_area,
    check_site_binds,
    clear_cache,
    detect,
    detection,
    dry_run,
    make_launcher,
    parse_bind,
    setup_command,
    spawn,
    wrapper_command,
)
from pilot.launch.environment import SETUP_SHELL
from pilot.launch.software import SETUP_SH
from pilot.launch.testimage import ensure_image, ensure_rootfs
from pilot.pipe import messages as m
from pilot.pipe.errors import PeerClosed
from pilot.pipe.protocol import ConnectionClosed
from tests.dockerd import DEBIAN_CLIENT

TIMEOUT = 60.0
SECRET_NAME = "SPLITPILOT_AGENT_TOKEN"
APPTAINER_ELSEWHERE = ("apptainer is not on PATH on this host; this test runs for real where it is, e.g. "
                       "inside the Debian 13 node root of the mini-condor set-up (see shared notes)")

# A fixed mount set for the pure argv tests.
M = Mounts("/scratch/job1", "/opt/sw")
M_ALL = Mounts("/scratch/job1", "/opt/sw", cvmfs=True,
               extra=(Bind("/data/site", "/site/data"), Bind("/scratch/shared", "/site/scratch", read_only=False)))
ARGV = ["/bin/sh", "-c", ". /sw/x", "arg with space"]


# ------------------------------------------------------------------ pure argv


def test_process_launcher_returns_argv_unchanged_and_runs_in_the_sandbox():
    launcher = ProcessLauncher()
    assert launcher.wrap(ARGV, M) == ARGV
    assert launcher.cwd(M) == "/scratch/job1"
    assert launcher.workdir(M) == "/scratch/job1" and launcher.software_dir(M) == "/opt/sw"
    assert launcher.environment(M, {SECRET_NAME: "s", "PATH": "/evil"}) == {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/scratch/job1", "LANG": "C.UTF-8",
        "TMPDIR": "/scratch/job1"}


HOST_SYSTEM = ["--ro-bind", "/usr", "/usr", "--ro-bind-try", "/bin", "/bin", "--ro-bind-try", "/sbin", "/sbin",
               "--ro-bind-try", "/lib", "/lib", "--ro-bind-try", "/lib64", "/lib64",
               "--ro-bind-try", "/lib32", "/lib32", "--ro-bind-try", "/libx32", "/libx32",
               "--ro-bind-try", "/opt", "/opt"]
HOST_ETC = [x for path in ("/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/hosts", "/etc/host.conf",
                           "/etc/resolv.conf", "/etc/localtime", "/etc/ld.so.cache", "/etc/ld.so.conf",
                           "/etc/ld.so.conf.d", "/etc/alternatives", "/etc/ssl", "/etc/ca-certificates", "/etc/pki",
                           "/etc/os-release")
            for x in ("--ro-bind-try", path, path)]
BWRAP_HEAD = ["bwrap", "--unshare-all", "--share-net", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
BWRAP_FS = ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]


def test_bubblewrap_argv_on_the_host_root():
    assert BubblewrapLauncher().wrap(ARGV, M) == [
        *BWRAP_HEAD, *HOST_SYSTEM, *HOST_ETC, *BWRAP_FS,
        "--bind", "/scratch/job1", "/workdir", "--ro-bind", "/opt/sw", "/sw",
        "--chdir", "/workdir", "--", *ARGV]


def test_bubblewrap_argv_with_an_image_folder_cvmfs_and_site_binds():
    image_system = [x.replace("/", "/images/el9/", 1) if i % 3 == 1 else x for i, x in enumerate(HOST_SYSTEM)]
    assert BubblewrapLauncher(image="/images/el9/").wrap(ARGV, M_ALL) == [
        *BWRAP_HEAD, *image_system, "--ro-bind", "/images/el9/etc", "/etc", *BWRAP_FS,
        "--bind", "/scratch/job1", "/workdir", "--ro-bind", "/opt/sw", "/sw", "--ro-bind", "/cvmfs", "/cvmfs",
        "--ro-bind", "/data/site", "/site/data", "--bind", "/scratch/shared", "/site/scratch",
        "--chdir", "/workdir", "--", *ARGV]
    assert image_system[:3] == ["--ro-bind", "/images/el9/usr", "/usr"]


def test_namespace_argv_runs_the_stdlib_helper_by_path_with_the_agents_interpreter():
    launcher = NamespaceLauncher(python="/opt/py/bin/python3", helper="/opt/sp/pilot/launch/isolate.py")
    system = [x if i % 3 else "--system" for i, x in enumerate(HOST_SYSTEM)]
    assert launcher.wrap(ARGV, M_ALL) == [
        "/opt/py/bin/python3", "-I", "-S", "/opt/sp/pilot/launch/isolate.py", *system, *HOST_ETC,
        "--bind", "/scratch/job1", "/workdir", "--ro-bind", "/opt/sw", "/sw", "--ro-bind", "/cvmfs", "/cvmfs",
        "--ro-bind", "/data/site", "/site/data", "--bind", "/scratch/shared", "/site/scratch",
        "--chdir", "/workdir", "--", *ARGV]
    # Defaults: this interpreter and this installation's helper, never the software area's copy.
    default = NamespaceLauncher()
    assert os.path.samefile(default.python, sys.executable) and default.helper.endswith("pilot/launch/isolate.py")
    assert not default.helper.startswith(M.software)
    assert default.environment(M, {SECRET_NAME: "s"}) == BubblewrapLauncher().environment(M, {})
    assert default.workdir(M) == "/workdir" and default.software_dir(M) == "/sw"


def test_bubblewrap_environment_is_the_wrappers_and_minimal():
    env = BubblewrapLauncher().environment(M, {SECRET_NAME: "s", "HOME": "/root", "XDG_RUNTIME_DIR": "/run/x"})
    assert env == {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/workdir", "LANG": "C.UTF-8", "TMPDIR": "/tmp"}


def test_apptainer_and_singularity_argv():
    assert ApptainerLauncher(image="/cvmfs/unpacked/el9").wrap(ARGV, M) == [
        "apptainer", "exec", "--containall", "--no-home", "--pwd", "/workdir",
        "-B", "/scratch/job1:/workdir,/opt/sw:/sw:ro", "/cvmfs/unpacked/el9", *ARGV]
    assert SingularityLauncher(image="el9.sif").wrap(ARGV, M_ALL) == [
        "singularity", "exec", "--containall", "--no-home", "--pwd", "/workdir",
        "-B", "/scratch/job1:/workdir,/opt/sw:/sw:ro,/cvmfs:/cvmfs:ro,/data/site:/site/data:ro,"
              "/scratch/shared:/site/scratch",
        "el9.sif", *ARGV]


PODMAN_FIXED = dict(user="1000:1000", ulimits=("nofile=1024:4096", "nproc=4096:4096"), userns=None)
NO_PRIVILEGE = ["--cap-drop=ALL", "--security-opt=no-new-privileges"]


def test_podman_argv_with_an_image_name():
    assert PodmanLauncher(image="localhost/el9:1", **PODMAN_FIXED).wrap(ARGV, M_ALL) == [
        "podman", "run", "--rm", "-i", "--pull=missing", "--quiet", "--runtime=runc", "--cgroup-manager=cgroupfs",
        "--network=host", "--log-driver=none", "--detach-keys=", "--entrypoint=", *NO_PRIVILEGE, "--init",
        "--ulimit=nofile=1024:4096", "--ulimit=nproc=4096:4096", "--user=1000:1000",
        "-v", "/scratch/job1:/workdir", "-v", "/opt/sw:/sw:ro", "-v", "/cvmfs:/cvmfs:ro",
        "-v", "/data/site:/site/data:ro", "-v", "/scratch/shared:/site/scratch",
        "-w", "/workdir", "localhost/el9:1", *ARGV]


def test_podman_argv_with_a_root_folder_and_defaults_switched_off():
    launcher = PodmanLauncher(image="/images/el9", user="4242:4243", oci_runtime=None, cgroup_manager=None,
                              ulimits=(), pull="never", quiet=False, init=False, userns="keep-id")
    assert launcher.wrap(ARGV, M) == [
        "podman", "run", "--rm", "-i", "--pull=never", "--network=host", "--log-driver=none", "--detach-keys=",
        "--entrypoint=", *NO_PRIVILEGE, "--userns=keep-id", "--user=4242:4243", "--rootfs",
        "-v", "/scratch/job1:/workdir", "-v", "/opt/sw:/sw:ro", "-w", "/workdir", "/images/el9:O", *ARGV]


def test_podman_and_docker_defaults_never_run_the_payload_as_root():
    for launcher in (PodmanLauncher(image="x"), DockerLauncher(image="x")):
        if os.geteuid() == 0:
            # A root agent: an unprivileged uid inside, which needs no entry in the image.
            assert launcher.user == "65534:65534" and launcher.sandbox_owner == (65534, 65534)
            assert launcher.userns is None
        else:
            # Not root: its own uid inside (podman rootless: mapped to the same uid by keep-id).
            assert launcher.user == f"{os.geteuid()}:{os.getegid()}"
            assert launcher.sandbox_owner == (os.geteuid(), os.getegid())
        command = launcher.wrap(ARGV, M)
        assert set(NO_PRIVILEGE) <= set(command) and f"--user={launcher.user}" in command
        assert "--privileged" not in command and not any(c.startswith("--cap-add") for c in command)
    nofile, nproc = PodmanLauncher(image="x").ulimits
    assert nofile.startswith("nofile=") and nproc.startswith("nproc=")
    assert all(int(v) <= 32768 for v in nproc.removeprefix("nproc=").split(":"))
    assert BubblewrapLauncher().sandbox_owner == (os.geteuid(), os.getegid())


def test_docker_argv_has_no_quiet_which_debians_client_refuses():
    assert DockerLauncher(image="registry.example.org/el9:1", user="1000:1000").wrap(ARGV, M) == [
        "docker", "run", "--rm", "-i", "--pull=missing", "--network=host", "--log-driver=none",
        "--entrypoint=", *NO_PRIVILEGE, "--init", "--user=1000:1000", "-v", "/scratch/job1:/workdir",
        "-v", "/opt/sw:/sw:ro", "-w", "/workdir", "registry.example.org/el9:1", *ARGV]


def test_prepare_sandbox_gives_the_folder_to_the_user_inside(tmp_path):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    if os.geteuid() != 0:
        PodmanLauncher(image="x").prepare_sandbox(str(sandbox))   # its own uid: nothing to change
        assert sandbox.stat().st_uid == os.geteuid()
        return
    DockerLauncher(image="x", user="4242:4343").prepare_sandbox(str(sandbox))
    assert (sandbox.stat().st_uid, sandbox.stat().st_gid) == (4242, 4343)
    BubblewrapLauncher().prepare_sandbox(str(sandbox))          # detection falls back: the agent's own again
    assert (sandbox.stat().st_uid, sandbox.stat().st_gid) == (0, 0)


def test_no_launcher_asks_for_a_tty_or_shell_string():
    for launcher in (ProcessLauncher(), BubblewrapLauncher(), ApptainerLauncher(image="i"), PodmanLauncher(image="i"),
                     DockerLauncher(image="i")):
        command = launcher.wrap(["prog", "$(reboot)"], M_ALL)
        assert command[-2:] == ["prog", "$(reboot)"]
        assert not {"-t", "--tty", "-it", "-ti", "--interactive-tty"} & set(command)


def test_container_runtimes_get_only_their_own_settings_from_the_caller():
    caller = {SECRET_NAME: "secret", "PATH": "/opt/podman/bin:/usr/bin", "HOME": "/home/pilot",
              "XDG_RUNTIME_DIR": "/run/user/1000", "DOCKER_HOST": "unix:///d.sock", "APPTAINER_CACHEDIR": "/c",
              "APPTAINERENV_X": "leak", "HTTPS_PROXY": "http://user:pw@proxy", "LD_PRELOAD": "/evil.so"}
    base = {"PATH": "/opt/podman/bin:/usr/bin", "HOME": "/home/pilot", "LANG": "C.UTF-8"}
    assert PodmanLauncher(image="i").environment(M, caller) == {**base, "XDG_RUNTIME_DIR": "/run/user/1000"}
    assert DockerLauncher(image="i").environment(M, caller) == {
        **base, "XDG_RUNTIME_DIR": "/run/user/1000", "DOCKER_HOST": "unix:///d.sock"}
    assert ApptainerLauncher(image="i").environment(M, caller) == {
        **base, "XDG_RUNTIME_DIR": "/run/user/1000", "APPTAINER_CACHEDIR": "/c"}
    assert PodmanLauncher(image="i").environment(M, {})["PATH"].endswith("/usr/sbin:/usr/bin:/sbin:/bin")


@pytest.mark.parametrize("bad, fix", [
    (lambda: Mounts("relative/sb", "/sw"), "not absolute"),
    (lambda: Mounts("/a:b", "/sw"), "a colon"),
    (lambda: Mounts("/sb", "/s,w"), "a comma"),
    (lambda: Mounts("/sb", "/sw\nx"), "a newline"),
    (lambda: Bind("/data", "/workdir/data"), "overlaps /workdir"),
    (lambda: Bind("/data", "/"), "overlaps"),
    (lambda: Mounts("/sb", "/sw", extra=(Bind("/a", "/x"), Bind("/b", "/x"))), "two extra binds"),
    (lambda: PodmanLauncher(image=""), "needs an image"),
    (lambda: ApptainerLauncher(image=None), "needs an image"),
    (lambda: PodmanLauncher(image="--privileged"), "read as an option"),
    (lambda: PodmanLauncher(image="i", user="0:0"), "is root (uid or gid 0)"),
    (lambda: DockerLauncher(image="i", user="0:1000"), "is root (uid or gid 0)"),
    (lambda: DockerLauncher(image="i", user="1000:0"), "is root (uid or gid 0)"),
    (lambda: PodmanLauncher(image="i", user="nobody"), "is not 'UID:GID' in numbers"),
    (lambda: DockerLauncher(image="i", user="1000"), "is not 'UID:GID' in numbers"),
    (lambda: PodmanLauncher(image="/images/a:b"), "--rootfs cannot take"),
    (lambda: DockerLauncher(image="/images/el9"), "docker cannot run the folder"),
    (lambda: BubblewrapLauncher(image="localhost/el9"), "absolute path of an unpacked root folder"),
    (lambda: make_launcher("lxc"), "unknown container runtime"),
])
def test_configuration_errors_name_the_fix(bad, fix):
    with pytest.raises(LaunchConfigError) as err:
        bad()
    assert fix in str(err.value)


@pytest.mark.parametrize("text, fix", [
    ("data", "not absolute"),
    ("/data:site", "not absolute"),
    ("/data:/site:/x", "not SRC or SRC:DST"),
    ("/data:", "not SRC or SRC:DST"),
    (":/site", "not SRC or SRC:DST"),
    ("/data/../etc:/site", "contains '..'"),
    ("/data:/site/../workdir", "contains '..'"),
    ("/:/host", "the whole host"),
    ("/proc:/site/proc", "the whole host or its processes"),
    ("/proc/1/root:/site/root", "its processes"),
    ("/data:/workdir", "overlaps /workdir"),
    ("/data:/sw/lib", "overlaps /sw"),
    ("/data:/proc", "overlaps /proc"),
    ("/data:/tmp", "overlaps /tmp"),
    ("/data:/", "overlaps"),
    ("/data,x:/site", "a comma"),
])
def test_site_binds_from_a_command_line_are_refused_with_the_fix(text, fix):
    with pytest.raises(LaunchConfigError) as err:
        parse_bind(text)
    assert fix in str(err.value)


def test_site_binds_parse_read_only_with_the_same_path_by_default():
    assert parse_bind("/data/site") == Bind("/data/site", "/data/site", read_only=True)
    assert parse_bind("/data/site/:/site/data") == Bind("/data/site", "/site/data", read_only=True)


def test_site_binds_never_show_the_agents_work_dir_or_the_hosts_processes(tmp_path):
    """Checked after symlinks, against the agent's work dir: a bind of the work dir, a folder inside it (other
    jobs' sandboxes), a folder holding it, or a symlink leading to it or to /proc, is refused."""
    work = tmp_path / "work"
    (work / "job-1-1" / "sandbox").mkdir(parents=True)
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "to-work").symlink_to(work)
    (tmp_path / "to-proc").symlink_to("/proc/self")
    check_site_binds((parse_bind(f"{data}:/site/data"),), work_dir=str(work))     # fine
    for source, fix in ((work, "is the agent's work dir"),
                        (work / "job-1-1" / "sandbox", "is inside the agent's work dir"),
                        (tmp_path, "holds the agent's work dir"),
                        (tmp_path / "to-work", "is the agent's work dir"),
                        (tmp_path / "to-proc", "the host's processes"),
                        (tmp_path / "missing", "does not exist")):
        with pytest.raises(LaunchConfigError) as err:
            check_site_binds((parse_bind(f"{source}:/site/x"),), work_dir=str(work))
        assert fix in str(err.value) and "fix:" in str(err.value), str(err.value)
    assert err.value.exit_code == 2  # a usage error: fix the configuration


def test_bad_argv_is_refused_before_any_runtime_sees_it():
    for launcher in (ProcessLauncher(), PodmanLauncher(image="i")):
        with pytest.raises(TypeError):
            launcher.wrap("python3 -m x", M)
        with pytest.raises(ValueError):
            launcher.wrap([], M)
        with pytest.raises(ValueError):
            launcher.wrap(["a\0b"], M)


def test_make_launcher_names():
    assert set(LAUNCHERS) == {"process", "namespace", "bubblewrap", "apptainer", "singularity", "podman", "docker"}
    assert make_launcher("bwrap") == BubblewrapLauncher()
    assert make_launcher("namespace", "ignored") == NamespaceLauncher()
    assert make_launcher("process", "ignored") == ProcessLauncher()
    assert make_launcher("podman", "img").image == "img"
    assert all(issubclass(cls, Launcher) and cls.name for cls in LAUNCHERS.values())


def test_mounts_on_host_binds_cvmfs_only_when_present(tmp_path):
    assert Mounts.on_host(tmp_path, tmp_path, cvmfs_root=str(tmp_path / "absent")).cvmfs is False
    (tmp_path / "cvmfs").mkdir()
    assert Mounts.on_host(tmp_path, tmp_path, cvmfs_root=str(tmp_path / "cvmfs")).cvmfs is True


def test_dry_run_shows_the_exact_command_and_environment():
    launcher = PodmanLauncher(image="localhost/el9:1", **PODMAN_FIXED)
    argv = wrapper_command(launcher, M, ["python3", "-m", "pilot.wrapper", "it's \"quoted\""])
    text = dry_run(launcher, argv, M, env={SECRET_NAME: "secret", "PATH": "/usr/bin", "HOME": "/home/p"})
    assert "secret" not in text
    lines = text.splitlines()
    assert lines[0] == "# launcher: podman (image localhost/el9:1)"
    assert lines[2] == "cd /scratch/job1 &&"
    words = shlex.split(lines[3])
    assert words[:5] == ["env", "-i", "HOME=/home/p", "LANG=C.UTF-8", "PATH=/usr/bin"]
    assert words[5:] == launcher.wrap(argv, M)  # pasting it runs exactly what spawn runs


# ---------------------------------------------------------------- setup script


def test_setup_command_exact_form():
    assert setup_command(["python3", "-m", "w"]) == [
        "/bin/sh", "-c", '. "$1" >&2 && shift && exec "$@"', "sh", "/sw/setup.sh", "python3", "-m", "w"]
    assert setup_command(["x"], "/cvmfs/a b/setup.sh")[4] == "/cvmfs/a b/setup.sh"
    with pytest.raises(ValueError):
        setup_command([])


HOSTILE = [
    'it\'s "quoted"', "$(touch PWNED)", "`touch PWNED2`", "; touch PWNED3", "a\nb\n", "  spaced  out  ", "",
    "$HOME", "${IFS}", "*", "--rm", "-v", "\\", "'", '"', "$1", "$@", "&& touch PWNED4", "|| true", "\t",
    "é ü 漢字", "-c", "--",
]


def test_setup_command_passes_hostile_argv_through_a_real_shell(tmp_path):
    (tmp_path / "setup.sh").write_text('export FROM_SETUP="set by $1"\necho "setup prints on stdout"\n')
    code = "import json, os, sys; print(json.dumps([sys.argv[1:], os.environ.get('FROM_SETUP')]))"
    command = setup_command([sys.executable, "-c", code, *HOSTILE], str(tmp_path / "setup.sh"))
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    argv, from_setup = json.loads(done.stdout)  # stdout: the program's output only
    assert argv == HOSTILE
    assert from_setup == f"set by {tmp_path}/setup.sh"
    assert "setup prints on stdout" in done.stderr
    assert not list(tmp_path.glob("PWNED*"))


def test_a_failing_setup_script_stops_the_start(tmp_path):
    (tmp_path / "setup.sh").write_text("echo 'no python here' >&2\nreturn 7\n")
    done = subprocess.run(setup_command(["touch", "STARTED"], str(tmp_path / "setup.sh")), cwd=tmp_path,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 7 and "no python here" in done.stderr
    assert not (tmp_path / "STARTED").exists()


def test_generated_setup_script_refuses_an_image_without_python(tmp_path):
    (tmp_path / "setup.sh").write_text(SETUP_SH)
    done = subprocess.run(setup_command(["true"], str(tmp_path / "setup.sh")), cwd=tmp_path, capture_output=True,
                          text=True, env={"PATH": "/nonexistent"}, timeout=TIMEOUT)
    assert done.returncode != 0 and "no python3" in done.stderr
    assert SETUP_SHELL in setup_command(["x"])


# -------------------------------------------------------- real runtimes: fixtures

RUNTIMES = ["process", "namespace", "bubblewrap-host", "bubblewrap-image", "podman-image", "podman-rootfs", "apptainer",
            "docker", "docker-debian-client"]


def _need(binary: str, packages: str) -> None:
    if shutil.which(binary) is None:
        pytest.fail(f"{binary} is not installed; fix: run scripts/install-system-deps.sh (packages: {packages})")


@pytest.fixture(scope="session")
def rootfs() -> str:
    return str(ensure_rootfs())


@pytest.fixture(scope="session")
def podman_image() -> str:
    _need("podman", "podman runc")
    _need("runc", "runc")
    return ensure_image("podman")


@pytest.fixture(scope="session")
def software(tmp_path_factory) -> str:
    area = build_software_area(tmp_path_factory.mktemp("software") / "sw")
    # A second setup script that prints on stdout and stderr, as site scripts do.
    (area / "noisy-setup.sh").write_text(
        SETUP_SH + 'echo "setup: hello on stdout"\necho "setup: hello on stderr" >&2\n')
    return str(area)


@pytest.fixture
def mounts(tmp_path, software, request) -> Mounts:
    """A new sandbox, given (as the agent does) to whoever the test's launcher runs the wrapper as."""
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    if "launcher" in request.fixturenames:
        request.getfixturevalue("launcher").prepare_sandbox(str(sandbox))
    return Mounts.on_host(sandbox, software)


@pytest.fixture(scope="session")
def debian_docker_client(tmp_path_factory) -> str:
    """A folder whose `docker` is Debian's own client (20.10), to put first on PATH."""
    if not os.path.exists(DEBIAN_CLIENT):
        pytest.fail(f"{DEBIAN_CLIENT} is missing; fix: run scripts/install-system-deps.sh (package docker.io)")
    folder = tmp_path_factory.mktemp("debian-docker-client")
    (folder / "docker").symlink_to(DEBIAN_CLIENT)
    return str(folder)


def _launcher_for(kind: str, request) -> Launcher:
    if kind == "process":
        return ProcessLauncher()
    if kind == "namespace":
        return NamespaceLauncher()
    if kind.startswith("bubblewrap"):
        _need("bwrap", "bubblewrap")
        return BubblewrapLauncher(image=request.getfixturevalue("rootfs") if kind.endswith("image") else None)
    if kind == "podman-image":
        return PodmanLauncher(image=request.getfixturevalue("podman_image"))
    if kind == "podman-rootfs":
        _need("podman", "podman runc")
        return PodmanLauncher(image=request.getfixturevalue("rootfs"))
    if kind == "apptainer":
        if shutil.which("apptainer") is None:
            pytest.skip(APPTAINER_ELSEWHERE)
        return ApptainerLauncher(image=request.getfixturevalue("rootfs"))
    if kind.startswith("docker"):
        engine = request.getfixturevalue("docker_engine")
        if kind == "docker-debian-client":
            if shutil.which("docker") == DEBIAN_CLIENT:
                pytest.skip(f"the docker client first on PATH is {DEBIAN_CLIENT} already (see 'docker')")
            folder = request.getfixturevalue("debian_docker_client")
            request.getfixturevalue("monkeypatch").setenv("PATH", f"{folder}:{os.environ['PATH']}")
        return DockerLauncher(image=engine.image)
    raise AssertionError(kind)


@pytest.fixture(params=RUNTIMES)
def launcher(request) -> Launcher:
    return _launcher_for(request.param, request)


def _finish(process: subprocess.Popen, timeout: float = TIMEOUT) -> str:
    """Wait for PROCESS; return its stderr (it must have been started with stderr=PIPE)."""
    try:
        _, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return err.decode(errors="replace")


def _run_inside(launcher: Launcher, mounts: Mounts, code: str, *, setup: str = "setup.sh",
                env: dict | None = None) -> tuple[int, str]:
    """Run python CODE inside the runtime (not a wrapper: no protocol); return (status, stderr)."""
    argv = wrapper_command(launcher, mounts, ["python3", "-c", textwrap.dedent(code)], setup_name=setup)
    process, channel = spawn(launcher, argv, mounts, env=env, stderr=subprocess.PIPE)
    channel.close()
    err = _finish(process)
    return process.returncode, err


def _play_job(channel, steps: int, *, stop_after: int | None = None) -> dict:
    """Drive a loopback job; return what arrived, checking each frame's content."""
    job = sample_job_start()
    job.spec.arguments[:] = [str(steps)]
    channel.send(job)
    seen = {"states": [], "heartbeats": 0, "chunks": [], "pongs": [], "result": None}
    while seen["result"] is None:
        event = channel.expect(m.StateChange, m.Heartbeat, m.LogChunk, m.Pong, m.Result, timeout=TIMEOUT)
        if isinstance(event, m.StateChange):
            seen["states"].append(event.state)
        elif isinstance(event, m.Heartbeat):
            seen["heartbeats"] += 1
        elif isinstance(event, m.LogChunk):
            seen["chunks"].append((event.offset, event.data))
            if len(seen["chunks"]) == 1:
                channel.send(m.Ping(nonce=99))  # answered while the job runs
            if stop_after is not None and len(seen["chunks"]) == stop_after:
                channel.send(m.Stop(reason=m.StopReason.STOP_REASON_SLOT_END, detail="test", deadline_s=30))
        elif isinstance(event, m.Pong):
            seen["pongs"].append(event.nonce)
        else:
            seen["result"] = event
    return seen


def _check_chunks(chunks: list[tuple[int, bytes]]) -> None:
    offset = 0
    for number, (at, data) in enumerate(chunks, start=1):
        assert at == offset and data == f"step {number} of job 42\n".encode()
        offset += len(data)


# ------------------------------------------------------- real runtimes: the pipe


def test_protocol_crosses_the_runtime_boundary_intact(launcher, mounts):
    process, channel = spawn(launcher, wrapper_command(launcher, mounts), mounts, stderr=subprocess.PIPE)
    with channel:
        # Ctrl-P Ctrl-Q (podman's detach keys), Ctrl-C, Ctrl-D inside a frame: a TTY would eat them.
        channel.send(m.make_hello("agent \x10\x11\x03\x04 under test"))
        ready = channel.expect(m.Ready, timeout=TIMEOUT)
        assert (ready.protocol_major, ready.protocol_minor) == m.PROTOCOL_VERSION
        channel.send(m.Ping(nonce=7))
        assert channel.expect(m.Pong, timeout=TIMEOUT).nonce == 7
        seen = _play_job(channel, steps=3)
        channel.close_write()
        assert channel.receive(timeout=TIMEOUT) is ConnectionClosed
    err = _finish(process)
    assert process.returncode == 0, err
    assert seen["states"] == [m.JobState.JOB_STATE_STARTED, m.JobState.JOB_STATE_RUNNING,
                              m.JobState.JOB_STATE_SAVING]
    assert seen["heartbeats"] == 3 and seen["pongs"] == [99]
    _check_chunks(seen["chunks"])
    assert len(seen["chunks"]) == 3
    assert seen["result"].final_state == m.JobState.JOB_STATE_DONE
    assert "greeted by agent 'agent \\x10\\x11\\x03\\x04 under test'" in err  # the wrapper's print: on stderr


def test_stop_reaches_the_wrapper_inside_the_runtime(launcher, mounts):
    process, channel = spawn(launcher, wrapper_command(launcher, mounts), mounts, stderr=subprocess.PIPE)
    with channel:
        channel.send(m.make_hello("a"))
        channel.expect(m.Ready, timeout=TIMEOUT)
        seen = _play_job(channel, steps=10_000, stop_after=2)
        channel.close_write()
        assert channel.receive(timeout=TIMEOUT) is ConnectionClosed
    err = _finish(process)
    assert process.returncode == 0, err
    result = seen["result"]
    assert result.failure_class == m.FailureClass.FAILURE_CLASS_STOPPED
    assert "STOP_REASON_SLOT_END test" in result.message
    assert 2 <= len(seen["chunks"]) < 10_000
    _check_chunks(seen["chunks"])


NOISY_WRAPPER = """
    import subprocess, sys
    from pilot.pipe import loopback
    from pilot.pipe.channel import PipeChannel, claim_stdio
    from pilot.pipe.protocol import Role
    read_fd, write_fd = claim_stdio()
    print("wrapper: print after claim", flush=True)
    subprocess.run(["/bin/sh", "-c", "echo payload says hi on stdout; echo payload says hi on stderr >&2"])
    with PipeChannel(Role.WRAPPER, read_fd, write_fd) as channel:
        sys.exit(loopback.run(channel))
"""


def test_frames_stay_intact_when_setup_wrapper_and_payload_print(launcher, mounts):
    argv = wrapper_command(launcher, mounts, ["python3", "-c", textwrap.dedent(NOISY_WRAPPER)],
                           setup_name="noisy-setup.sh")
    process, channel = spawn(launcher, argv, mounts, stderr=subprocess.PIPE)
    with channel:
        channel.send(m.make_hello("a"))
        channel.expect(m.Ready, timeout=TIMEOUT)
        seen = _play_job(channel, steps=4)
        channel.close_write()
        assert channel.receive(timeout=TIMEOUT) is ConnectionClosed
    err = _finish(process)
    assert process.returncode == 0, err
    _check_chunks(seen["chunks"])
    assert seen["result"].final_state == m.JobState.JOB_STATE_DONE
    for text in ("setup: hello on stdout", "setup: hello on stderr", "wrapper: print after claim",
                 "payload says hi on stdout", "payload says hi on stderr"):
        assert text in err


def test_runtime_passes_arbitrary_bytes_both_ways(launcher, mounts):
    """4 MiB of random bytes (with TTY control sequences) through `cat` inside: nothing altered."""
    data = b"\x10\x11\x03\x04\x1c\r\n\x1b[0m" * 1000 + os.urandom(4 << 20)
    process, channel = spawn(launcher, ["/bin/cat"], mounts, stderr=subprocess.PIPE)
    received = io.BytesIO()

    def feed() -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(channel.write_fd, view[:1 << 16]):]
        os.close(channel.write_fd)

    writer = threading.Thread(target=feed)
    writer.start()
    while chunk := os.read(channel.read_fd, 1 << 16):
        received.write(chunk)
    writer.join(TIMEOUT)
    channel.write_fd = -1
    channel.close()
    err = _finish(process)
    assert process.returncode == 0, err
    assert hashlib.sha256(received.getvalue()).digest() == hashlib.sha256(data).digest()


def test_podman_pull_messages_go_to_stderr(podman_image, mounts, tmp_path):
    """Running from an archive makes podman copy the image: its progress must not touch stdout."""
    archive = Path(ensure_rootfs()).parent / f"{podman_image.rsplit(':', 1)[1]}.oci.tar"
    if not archive.exists():
        partial = archive.with_suffix(".partial")
        subprocess.run(["podman", "save", "--quiet", "--format", "oci-archive", "-o", str(partial), podman_image],
                       check=True, capture_output=True)
        partial.rename(archive)
    for quiet in (False, True):
        launcher = PodmanLauncher(image=f"oci-archive:{archive}", quiet=quiet)
        launcher.prepare_sandbox(mounts.sandbox)
        process, channel = spawn(launcher, wrapper_command(launcher, mounts), mounts, stderr=subprocess.PIPE)
        with channel:
            channel.send(m.make_hello("a"))
            channel.expect(m.Ready, timeout=TIMEOUT)
            seen = _play_job(channel, steps=2)
            channel.close_write()
            assert channel.receive(timeout=TIMEOUT) is ConnectionClosed
        err = _finish(process)
        assert process.returncode == 0, err
        _check_chunks(seen["chunks"])
        assert ("Copying blob" in err) is not quiet, err


def _processes_running(marker: str) -> list[int]:
    """PIDs of `sleep MARKER` processes (not of the runtimes whose arguments name it)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(b"sleep") and argv[1:2] == [marker.encode()]:
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_sigterm_to_the_runtime_ends_a_wrapper_without_handlers(launcher, mounts):
    """The agent's hard stop: a signal to the process it started ends the wrapper, whatever the runtime."""
    marker = f"600.{os.getpid()}{time.monotonic_ns() % 100000}"
    process, channel = spawn(launcher, ["/bin/sleep", marker], mounts, stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT
    while not _processes_running(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_running(marker), "the wrapper never started"
    time.sleep(0.3)  # let the runtime finish setting up its signal forwarding
    process.terminate()
    try:
        err = _finish(process, timeout=20)
        channel.close()
        deadline = time.monotonic() + 20
        while _processes_running(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _processes_running(marker), f"the wrapper outlived its runtime process; stderr: {err}"
    finally:
        for pid in _processes_running(marker):  # leave nothing behind, even on failure
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------- real runtimes: environment


SECRECY_PROBE = """
    import json, os, sys
    procs = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            for what in ("environ", "cmdline"):
                try:
                    with open(f"/proc/{pid}/{what}", "rb") as f:
                        procs[f"{pid}/{what}"] = f.read().decode("latin-1")
                except OSError as exc:
                    procs[f"{pid}/{what}"] = f"unreadable: {exc.strerror}"
    report = {"environ": dict(os.environ), "argv": sys.argv, "proc": procs, "pid": os.getpid(), "cwd": os.getcwd()}
    with open("secrecy.json", "w") as f:
        json.dump(report, f)
"""

AGENT = """
import base64, pickle, sys
from pilot.launch import spawn
launcher, mounts, argv = pickle.loads(base64.b64decode(sys.argv[1]))
process, channel = spawn(launcher, argv, mounts)  # env=None: this process's environment, secret included
channel.close()
sys.exit(process.wait(60))
"""

#: Variables a runtime itself adds inside (they carry no value from the agent).
RUNTIME_ADDED = {"PWD", "SHLVL", "_", "container", "HOSTNAME", "TERM"}
SETUP_EXPORTS = {"PATH", "HOME", "LANG", "TMPDIR", "PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONDONTWRITEBYTECODE",
                 "PYTHONSAFEPATH"}


def test_the_agents_secret_never_reaches_the_wrapper(launcher, mounts):
    """An agent whose own environment holds its token starts a wrapper: the wrapper finds it nowhere."""
    secret = "tok-" + os.urandom(12).hex()
    argv = wrapper_command(launcher, mounts, ["python3", "-c", textwrap.dedent(SECRECY_PROBE)])
    env = {**os.environ, SECRET_NAME: secret, "APPTAINERENV_" + SECRET_NAME: secret,
           "SINGULARITYENV_" + SECRET_NAME: secret, "HTTPS_PROXY": f"http://{secret}@proxy:3128",
           "http_proxy": f"http://{secret}@proxy:3128", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    blob = base64.b64encode(pickle.dumps((launcher, mounts, argv))).decode()
    agent = subprocess.run([sys.executable, "-c", AGENT, blob], env=env, capture_output=True, text=True,
                           timeout=TIMEOUT * 2)
    assert agent.returncode == 0, agent.stderr
    report = json.loads((Path(mounts.sandbox) / "secrecy.json").read_text())
    assert secret not in json.dumps(report["environ"]) and secret not in json.dumps(report["argv"])
    assert set(report["environ"]) <= SETUP_EXPORTS | RUNTIME_ADDED, report["environ"]
    assert report["environ"]["HOME"] == launcher.workdir(mounts) == report["cwd"]
    exposed = sorted(key for key, text in report["proc"].items() if secret in text)
    if isinstance(launcher, ProcessLauncher):
        # No container, no PID namespace: the agent's own /proc/PID/environ is readable to its uid.
        # Known and documented (docs/containers.md): only a container hides the agent's files and processes.
        assert exposed and all(key.endswith("/environ") for key in exposed)
    else:
        assert exposed == [], f"the secret is readable inside at {exposed}"
        assert len([k for k in report["proc"] if k.endswith("/environ")]) <= 4  # own PID namespace


# --------------------------------------------- real runtimes: sandbox and software area


FILESYSTEM_PROBE = """
    import errno, json, os
    def attempt(path):
        try:
            with open(path, "w") as f:
                f.write("x")
            return "written"
        except OSError as exc:
            return errno.errorcode[exc.errno]
    sw = os.environ["PYTHONPATH"].rsplit("/lib/python", 1)[0]
    result = {
        "sandbox": attempt("from-inside.txt"),
        "software": attempt(sw + "/planted.txt"),
        "tmp": attempt(os.path.join(os.environ.get("TMPDIR", "/tmp"), "t.txt")),
        "cwd": os.getcwd(),
        "software_dir": sw,
    }
    if os.path.isdir("/site"):
        result["site_ro"] = attempt("/site/data/planted.txt")
        result["site_ro_read"] = open("/site/data/given.txt").read()
        result["site_rw"] = attempt("/site/scratch/from-inside.txt")
    with open("fs.json", "w") as f:
        json.dump(result, f)
"""


def test_sandbox_is_writable_and_software_area_read_only(launcher, tmp_path, software):
    sandbox, site_ro, site_rw = tmp_path / "sandbox", tmp_path / "site-ro", tmp_path / "site-rw"
    for folder in (sandbox, site_ro, site_rw):
        folder.mkdir()
    (site_ro / "given.txt").write_text("from the site")
    extra = (Bind(str(site_ro), "/site/data"), Bind(str(site_rw), "/site/scratch", read_only=False))
    mounts = Mounts.on_host(sandbox, software, extra)
    launcher.prepare_sandbox(str(sandbox))
    os.chown(site_rw, *launcher.sandbox_owner)  # a writable site bind: the site gives it to the user inside
    status, err = _run_inside(launcher, mounts, FILESYSTEM_PROBE)
    assert status == 0, err
    result = json.loads((sandbox / "fs.json").read_text())
    assert result["sandbox"] == "written" and (sandbox / "from-inside.txt").read_text() == "x"
    assert result["tmp"] == "written"
    assert result["cwd"] == launcher.workdir(mounts)
    assert result["software_dir"] == launcher.software_dir(mounts)
    if isinstance(launcher, ProcessLauncher):
        # Without a container nothing is read-only for the agent's own uid (documented).
        assert result["software"] == "written"
        os.unlink(Path(software) / "planted.txt")
        assert "site_ro" not in result  # site binds need a container
    else:
        assert result["software"] == "EROFS" and not (Path(software) / "planted.txt").exists()
        assert result["site_ro"] == "EROFS" and result["site_ro_read"] == "from the site"
        assert result["site_rw"] == "written" and (site_rw / "from-inside.txt").exists()


# ------------------------------------------------- real runtimes: privilege on the host's network


PRIVILEGE_PROBE = """
    import errno, json, os, socket
    sw = os.environ["PYTHONPATH"].rsplit("/lib/python", 1)[0]
    def attempt(action):
        try:
            action()
            return "done"
        except OSError as exc:
            return errno.errorcode[exc.errno]
    def raw_socket():
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP).close()
    def packet_socket():   # what tcpdump opens to capture the host's loopback (the broker's port included)
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)).close()
    def bind_81():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
            server.bind(("127.0.0.1", 81))
    def write_software():
        with open(sw + "/planted-by-payload", "w") as handle:
            handle.write("x")
    def become_root():
        os.setuid(0)
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    report = {
        "status": {k: status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")},
        "uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
        "raw_socket": attempt(raw_socket), "packet_socket": attempt(packet_socket), "bind_81": attempt(bind_81),
        "write_software": attempt(write_software), "setuid_0": attempt(become_root),
    }
    with open("privilege.json", "w") as handle:
        json.dump(report, handle)
"""
NO_CAPABILITY = "0000000000000000"


@pytest.mark.parametrize("kind", ["namespace", "bubblewrap-host", "bubblewrap-image", "podman-image",
                                  "podman-rootfs", "apptainer", "docker", "docker-debian-client"])
def test_payload_holds_no_privilege_on_the_hosts_network(kind, request, mounts, software):
    """The hostile payload on the host's network: no capability, no raw or packet socket (no sniffing of the
    host's loopback), no port below 1024, no setuid gain, a read-only software area; under podman and docker
    (which a root agent starts) not root either."""
    launcher = _launcher_for(kind, request)
    launcher.prepare_sandbox(mounts.sandbox)
    status, err = _run_inside(launcher, mounts, PRIVILEGE_PROBE)
    assert status == 0, err
    report = json.loads((Path(mounts.sandbox) / "privilege.json").read_text())
    print(f"\nprivilege probe, {kind} (agent uid {os.geteuid()}): {json.dumps(report)}")
    assert report["status"] == {"CapInh": NO_CAPABILITY, "CapPrm": NO_CAPABILITY, "CapEff": NO_CAPABILITY,
                                "CapBnd": NO_CAPABILITY, "CapAmb": NO_CAPABILITY, "NoNewPrivs": "1"}, report
    assert report["raw_socket"] == "EPERM" and report["packet_socket"] == "EPERM", report
    assert report["bind_81"] == "EACCES", report
    assert report["write_software"] == "EROFS" and not (Path(software) / "planted-by-payload").exists()
    if isinstance(launcher, PodmanLauncher) or os.geteuid() != 0:
        # Podman and docker: never root inside, not even by group (root's group owns files root may read).
        assert report["uid"] != 0 and report["gid"] != 0 and 0 not in report["groups"], report
        assert report["setuid_0"] == "EPERM", report
        owner = Path(mounts.sandbox).stat()
        assert (owner.st_uid, owner.st_gid) == (report["uid"], report["gid"]) == launcher.sandbox_owner


@pytest.mark.parametrize("kind", ["bubblewrap-image", "podman-rootfs", "apptainer"])
def test_an_image_without_python_fails_with_the_setup_scripts_message(kind, request, mounts, tmp_path):
    launcher = _launcher_for(kind, request)
    empty_root = tmp_path / "root"
    shutil.copytree(launcher.image, empty_root, symlinks=True,
                    ignore=lambda d, names: [n for n in names if n.startswith("python")])
    bare = type(launcher)(image=str(empty_root))
    bare.prepare_sandbox(mounts.sandbox)
    argv = wrapper_command(bare, mounts)
    process, channel = spawn(bare, argv, mounts, stderr=subprocess.PIPE)
    channel.send(m.make_hello("a"))
    with pytest.raises(PeerClosed):
        channel.expect(m.Ready, timeout=TIMEOUT)
    channel.close()
    err = _finish(process)
    assert process.returncode == 1 and "this image has no python3" in err


# ------------------------------------------------------------- detection


@pytest.fixture(autouse=True)
def _fresh_detection_cache():
    clear_cache()
    yield
    clear_cache()


def _image_map(request) -> dict:
    return {"podman": request.getfixturevalue("podman_image"), "apptainer": request.getfixturevalue("rootfs"),
            "bubblewrap": request.getfixturevalue("rootfs")}


def test_detect_require_picks_the_first_working_runtime(request, mounts):
    preference = ["apptainer", "podman", "bubblewrap"] if shutil.which("apptainer") is None else ["podman"]
    selection = detect(preference, "require", _image_map(request), mounts)
    assert isinstance(selection.launcher, PodmanLauncher)
    assert selection.launcher.image == request.getfixturevalue("podman_image")
    assert selection.attempts[-1].ok and selection.attempts[-1].version.startswith("podman version")
    if len(selection.attempts) == 2:
        assert "'apptainer' is not on PATH; fix: install apptainer" in selection.reasons["apptainer"]
    assert selection.require() is selection.launcher
    # Cached for the process: the next detection starts nothing.
    again = detect(preference, "require", _image_map(request), mounts, self_test_argv=["/bin/false"])
    assert again.launcher == selection.launcher and again.attempts[-1].cached


@pytest.mark.parametrize("kind", ["bubblewrap-host", "bubblewrap-image", "podman-image", "podman-rootfs",
                                  "apptainer", "docker", "docker-debian-client"])
def test_every_runtime_here_passes_its_self_test(kind, request, mounts):
    launcher = _launcher_for(kind, request)
    selection = detect([launcher.name], "require", launcher.image, mounts)
    assert selection.launcher == launcher, selection.reasons
    assert not list(Path(mounts.sandbox).iterdir())  # the write check cleaned up after itself


def test_detect_require_with_nothing_working_matches_nothing(request, mounts):
    failing = ["/bin/sh", "-c", "echo broken wrapper >&2; exit 3"]
    selection = detect(["apptainer", "docker", "podman", "bubblewrap", "lxc"], "require", _image_map(request),
                       mounts, self_test_argv=failing)
    assert selection.launcher is None and not selection.fell_back
    reasons = selection.reasons
    assert set(reasons) == {"apptainer", "docker", "podman", "bubblewrap", "lxc"}
    assert "broken wrapper" in reasons["podman"] and "broken wrapper" in reasons["bubblewrap"]
    assert "unknown container runtime 'lxc'" in reasons["lxc"]
    assert "docker" in reasons and "fix:" in reasons["docker"]
    with pytest.raises(NoUsableRuntime) as err:
        selection.require()
    assert "policy 'require'" in str(err.value) and "'prefer'" in str(err.value)
    assert err.value.reasons == reasons


def test_detect_prefer_falls_back_to_no_container_loudly(request, mounts, caplog):
    selection = detect(["podman"], "prefer", "localhost/splitpilot-no-such-image:0", mounts,
                       self_test_argv=lambda launcher: ["/bin/false"])
    assert selection.launcher == ProcessLauncher() and selection.fell_back
    assert [r.levelname for r in caplog.records if "WITHOUT a container" in r.getMessage()] == ["WARNING"]
    assert "podman" in selection.reasons


def test_detect_prefer_with_a_working_runtime_does_not_warn(mounts, caplog):
    selection = detect(["bubblewrap"], "prefer", None, mounts)
    assert selection.launcher == BubblewrapLauncher() and not selection.fell_back
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_detect_off_tries_only_the_namespace_launcher(mounts, caplog):
    """`off` means no container: the namespace launcher (no image) if it works, never a configured runtime."""
    selection = detect(["podman", "bubblewrap"], "off", "img", mounts)
    assert selection.launcher == NamespaceLauncher() and not selection.fell_back
    assert [a.name for a in selection.attempts] == ["namespace"] and selection.attempts[0].ok
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_detect_off_without_user_namespaces_falls_back_to_no_isolation_loudly(mounts, caplog):
    selection = detect(["podman"], "off", "img", mounts, self_test_argv=["/bin/false"])
    warnings = caplog.text
    assert selection.launcher == ProcessLauncher() and selection.fell_back
    assert [a.name for a in selection.attempts] == ["namespace"]
    assert "WITHOUT a container or any isolation (policy 'off')" in warnings
    assert "one at a time" in warnings


def test_detect_prefer_takes_the_namespace_launcher_before_no_isolation(request, mounts, caplog):
    """The configured runtime fails its self-test: the namespace launcher, not the process launcher."""
    from pilot.launch.detection import default_self_test_argv

    selection = detect(["podman"], "prefer", request.getfixturevalue("podman_image"), mounts,
                       self_test_argv=lambda launcher: ["/bin/false"] if launcher.name == "podman"
                       else default_self_test_argv(launcher, mounts))
    assert selection.launcher == NamespaceLauncher() and selection.fell_back
    assert [(a.name, a.ok) for a in selection.attempts] == [("podman", False), ("namespace", True)]
    assert "namespace launcher" in caplog.text and "WITHOUT" not in caplog.text


def test_detect_refuses_an_unknown_policy(mounts):
    with pytest.raises(LaunchConfigError, match="require, prefer, off"):
        detect(["bubblewrap"], "sometimes", None, mounts)


def test_failed_self_tests_are_retried_after_a_while(mounts, monkeypatch):
    calls = []

    def argv_for(launcher):
        calls.append(launcher.name)
        return ["/bin/false"]

    detect(["bubblewrap"], "require", None, mounts, self_test_argv=argv_for)
    detect(["bubblewrap"], "require", None, mounts, self_test_argv=argv_for)
    assert calls == ["bubblewrap"]
    monkeypatch.setattr(detection, "FAILURE_TTL", 0.0)
    detect(["bubblewrap"], "require", None, mounts, self_test_argv=argv_for)
    assert calls == ["bubblewrap", "bubblewrap"]


UNPRIVILEGED_AGENT = """
import json, sys
from pilot.launch import Mounts, detect, spawn, wrapper_command
from pilot.pipe import messages as m
mounts = Mounts(sys.argv[1], sys.argv[2])
selection = detect(["bubblewrap"], "require", None, mounts)
print(json.dumps({"ok": selection.launcher is not None, "reasons": selection.reasons}))
"""


def test_bubblewrap_works_for_an_unprivileged_agent():
    """The agent normally runs as the glidein's own user: no root, no setuid helper."""
    _need("bwrap", "bubblewrap")
    # As root, become nobody; as anyone else, stay (the point is not being root).
    become = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.getuid() == 0 else []
    base = Path(tempfile.mkdtemp(prefix="splitpilot-unprivileged-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        software = build_software_area(base / "sw")
        sandbox = base / "sandbox"
        sandbox.mkdir()
        if become:
            os.chown(sandbox, 65534, 65534)
        done = subprocess.run(
            [*become, "/usr/bin/python3", "-c", UNPRIVILEGED_AGENT, str(sandbox), str(software)],
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(software / "lib" / "python"), "HOME": "/nonexistent"},
            cwd=base, capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.splitlines()[-1]) == {"ok": True, "reasons": {}}
    finally:
        shutil.rmtree(base)


def test_errno_names_used_in_probes_exist():
    assert errno.EROFS and "EROFS" in errno.errorcode.values()


# ------------------------------------------------ the namespace launcher, as the attacker sees it


NAMESPACE_PROBE = """
    import ctypes, errno, json, os, signal, sys
    outside_pid, other_sandbox, work_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    def attempt(action):
        try:
            action()
            return "done"
        except OSError as exc:
            return errno.errorcode[exc.errno]
    def write(path):
        with open(path, "w") as handle:
            handle.write("x")
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    processes = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            processes[pid] = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode("latin-1")
        except OSError as exc:
            processes[pid] = errno.errorcode[exc.errno]
    memory = {}
    for pid in processes:
        if int(pid) != os.getpid():
            memory[pid] = attempt(lambda: open(f"/proc/{pid}/mem", "rb").close())
    libc = ctypes.CDLL(None, use_errno=True)
    def syscall(function, *args):
        return "done" if function(*args) == 0 else errno.errorcode[ctypes.get_errno()]
    def mounts_attack():
        # What a payload with every capability (of a user namespace of its own) can do to the mounts.
        return {"umount_sw": syscall(libc.umount2, b"/sw", 0),
                "remount_sw_rw": syscall(libc.mount, None, b"/sw", None, 32 | 4096, None),   # MS_REMOUNT|MS_BIND
                "write_sw": attempt(lambda: write("/sw/planted")),
                "umount_workdir": syscall(libc.umount2, b"/workdir", 2)}                     # MNT_DETACH
    plain = mounts_attack()
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        entered = syscall(libc.unshare, 0x10000000 | 0x00020000)   # CLONE_NEWUSER | CLONE_NEWNS
        os.write(writer, json.dumps({"unshare": entered, **mounts_attack()}).encode())
        os._exit(0)
    os.waitpid(child, 0)
    os.close(writer)
    nested = json.loads(os.read(reader, 65536))
    report = {
        "status": {k: status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")},
        "uid": os.getuid(), "pid": os.getpid(), "processes": processes, "memory": memory,
        "signal_outside": attempt(lambda: os.kill(outside_pid, 0)),
        "other_sandbox": os.path.exists(other_sandbox), "work_dir": os.path.exists(work_dir),
        "root": sorted(os.listdir("/")), "etc": sorted(os.listdir("/etc")),
        "write_root": attempt(lambda: write("/planted")), "write_usr": attempt(lambda: write("/usr/planted")),
        "write_sw": attempt(lambda: write("/sw/planted")), "write_tmp": attempt(lambda: write("/tmp/t")),
        "plain": plain, "nested": nested,
    }
    with open("namespace.json", "w") as handle:
        json.dump(report, handle)
"""


NAMESPACE_ANY_AGENT = """
import base64, pickle, sys
from pilot.launch import NamespaceLauncher, spawn
mounts, argv = pickle.loads(base64.b64decode(sys.argv[1]))
process, channel = spawn(NamespaceLauncher(), argv, mounts)
channel.close()
sys.exit(process.wait(60))
"""


@pytest.mark.parametrize("user", ["root", "nobody"])
def test_namespace_payload_has_no_capabilities_and_sees_nothing_but_its_sandbox(user, tmp_path):
    """What a payload can see and do inside the namespace launcher, as root and as an unprivileged agent."""
    if user == "root" and os.geteuid() != 0:
        pytest.skip("the root case needs root")
    base = Path(tempfile.mkdtemp(prefix="splitpilot-ns-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        software = build_software_area(base / "sw")
        work = base / "work"
        sandbox, other = work / "job-1-1" / "sandbox", work / "job-2-1" / "sandbox"
        for folder in (sandbox, other):
            folder.mkdir(parents=True)
        (other / "secret.out").write_text("the other job's output")
        (work / "agent-state").write_text("the agent's")
        become = []
        if user == "nobody":
            for path in (work, work / "job-1-1", sandbox, work / "job-2-1", other):
                os.chown(path, 65534, 65534)
            become = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        mounts = Mounts.on_host(sandbox, software)
        argv = wrapper_command(NamespaceLauncher(), mounts, ["python3", "-c", textwrap.dedent(NAMESPACE_PROBE),
                                                             str(os.getpid()), str(other), str(work)])
        # The launcher is made by the agent itself (its interpreter is the one this user can run).
        blob = base64.b64encode(pickle.dumps((mounts, argv))).decode()
        agent = subprocess.run([*become, sys.executable, "-c", NAMESPACE_ANY_AGENT, blob], capture_output=True,
                               text=True, timeout=TIMEOUT,
                               env={"PATH": os.environ["PATH"], "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        assert agent.returncode == 0, agent.stderr
        report = json.loads((sandbox / "namespace.json").read_text())
        print(json.dumps({k: v for k, v in report.items() if k != "processes"}))
        # No capability in any set, for good; uid unchanged (no other id exists inside).
        assert report["status"] == {"CapInh": "0000000000000000", "CapPrm": "0000000000000000",
                                    "CapEff": "0000000000000000", "CapBnd": "0000000000000000",
                                    "CapAmb": "0000000000000000", "NoNewPrivs": "1"}
        assert report["uid"] == (0 if user == "root" else 65534)
        # Its own PID namespace: init, the shell chain and itself; not the agent, not the test.
        assert len(report["processes"]) <= 4 and "1" in report["processes"]
        assert not any("pytest" in c or "spawn(launcher" in c for c in report["processes"].values())
        assert report["signal_outside"] == "ESRCH"
        assert all(r in ("EACCES", "EPERM") for r in report["memory"].values()), report["memory"]
        # Nothing of the host but the system folders, a short /etc, its sandbox and the software area.
        assert not report["other_sandbox"] and not report["work_dir"]
        assert set(report["root"]) <= {"usr", "bin", "sbin", "lib", "lib64", "lib32", "libx32", "opt", "etc",
                                       "proc", "dev", "tmp", "workdir", "sw"}, report["root"]
        assert set(report["etc"]) <= {p.rsplit("/", 1)[1] for p in NamespaceLauncher().etc}, report["etc"]
        assert "shadow" not in report["etc"]
        # Read-only everywhere but /workdir and /tmp; the mounts cannot be removed, not even from a user
        # namespace of its own (the kernel locks mounts inherited from a more privileged namespace).
        assert (report["write_root"], report["write_usr"], report["write_sw"]) == ("EROFS", "EROFS", "EROFS")
        assert report["write_tmp"] == "done"
        assert report["plain"] == {"umount_sw": "EPERM", "remount_sw_rw": "EPERM", "write_sw": "EROFS",
                                   "umount_workdir": "EPERM"}
        assert report["nested"] == {"unshare": "done", "umount_sw": "EINVAL", "remount_sw_rw": "EPERM",
                                    "write_sw": "EROFS", "umount_workdir": "EINVAL"}
        assert not (software / "planted").exists() and (other / "secret.out").read_text() == "the other job's output"
        assert sorted(p.name for p in work.iterdir()) == ["agent-state", "job-1-1", "job-2-1"]
    finally:
        shutil.rmtree(base)


NAMESPACE_AGENT = """
import sys, time
from pilot.launch import Mounts, NamespaceLauncher, spawn
mounts = Mounts(sys.argv[1], sys.argv[2])
process, channel = spawn(NamespaceLauncher(), ["/bin/sleep", sys.argv[3]], mounts)
print(process.pid, flush=True)
time.sleep(600)
"""


def test_namespace_wrapper_dies_with_its_agent(mounts):
    """SIGKILL the agent: every process inside goes at once (parent-death signal, then PID 1 of the namespace)."""
    marker = f"601.{os.getpid()}{time.monotonic_ns() % 100000}"
    agent = subprocess.Popen([sys.executable, "-c", NAMESPACE_AGENT, mounts.sandbox, mounts.software, marker],
                             stdout=subprocess.PIPE, text=True,
                             env={"PATH": os.environ["PATH"], "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        outer = int(agent.stdout.readline())
        deadline = time.monotonic() + TIMEOUT
        while not _processes_running(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _processes_running(marker), "the wrapper never started"
        agent.kill()
        agent.wait()
        deadline = time.monotonic() + 20
        while (_processes_running(marker) or os.path.exists(f"/proc/{outer}")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _processes_running(marker) and not os.path.exists(f"/proc/{outer}")
    finally:
        agent.kill()
        agent.wait()
        for pid in _processes_running(marker):
            os.kill(pid, signal.SIGKILL)


def test_namespace_setup_failures_name_the_step(mounts, tmp_path):
    launcher = NamespaceLauncher()
    missing = Mounts(mounts.sandbox, str(tmp_path / "no-such-software-area"))
    process, channel = spawn(launcher, ["/bin/true"], missing, stderr=subprocess.PIPE)
    channel.close()
    err = _finish(process)
    assert process.returncode == 125
    assert f"splitpilot isolate: --ro-bind {tmp_path}/no-such-software-area: no such file or folder" in err
    process, channel = spawn(launcher, ["/no/such/program"], mounts, stderr=subprocess.PIPE)
    channel.close()
    err = _finish(process)
    assert process.returncode == 127 and "cannot run '/no/such/program'" in err
    # A program by name: the PATH search happens inside the new root, with nothing of the helper's left to import.
    process, channel = spawn(launcher, ["sh", "-c", "exit 7"], mounts, stderr=subprocess.PIPE)
    channel.close()
    err = _finish(process)
    assert process.returncode == 7, err
