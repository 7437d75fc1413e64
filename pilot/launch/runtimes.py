"""The runtimes: one small class each, one generic call to its program.

Common to all: stdin and stdout stay plain pipes from the agent to the
wrapper (the pipe protocol rides on them), so no runtime is asked for a
TTY, and everything a runtime says itself goes to stderr (pull progress,
warnings). The sandbox is the working directory, read-write; the software
area is read-only; /cvmfs is read-only when bound; the network is the host's
(the wrapper talks to the broker).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from pilot.launch.base import Launcher, ProbeResult, check_argv
from pilot.launch.environment import minimal_environment
from pilot.launch.errors import LaunchConfigError
from pilot.launch.mounts import CVMFS, HOST_ETC, SOFTWARE, SYSTEM_DIRS, WORKDIR, Mounts
from pilot.launch.namespace import NamespaceLauncher


def _require_image(launcher: Launcher, image: str | None) -> None:
    if not image or not isinstance(image, str):
        raise LaunchConfigError(
            f"the {launcher.name} launcher needs an image; fix: set the container image in the site "
            f"configuration (for {launcher.name}: {_IMAGE_EXAMPLES.get(launcher.name, 'an image name')})")
    if image.startswith("-"):
        raise LaunchConfigError(f"image {image!r} starts with '-' and would be read as an option; fix the name")


_IMAGE_EXAMPLES = {
    "apptainer": "a SIF file or an unpacked folder, e.g. /cvmfs/unpacked.cern.ch/...",
    "singularity": "a SIF file or an unpacked folder",
    "podman": "an image name, e.g. localhost/site-el9:latest",
    "docker": "an image name, e.g. registry.example.org/site-el9:latest",
}


@dataclass(frozen=True)
class ProcessLauncher(Launcher):
    """No container: the wrapper runs as a plain child process, in the sandbox.

    It still gets only the minimal environment (HOME and TMPDIR are the
    sandbox), and sees the software area at its host path.
    """

    name: ClassVar[str] = "process"

    def wrap(self, argv: Sequence[str], mounts: Mounts) -> list[str]:
        return check_argv(argv)

    def workdir(self, mounts: Mounts) -> str:
        return mounts.sandbox

    def software_dir(self, mounts: Mounts) -> str:
        return mounts.software

    def environment(self, mounts: Mounts, caller: Mapping[str, str]) -> dict[str, str]:
        return minimal_environment(home=mounts.sandbox, tmpdir=mounts.sandbox)

    def probe(self, caller: Mapping[str, str] | None = None) -> ProbeResult:
        return ProbeResult(self.name, True, version="no container")


@dataclass(frozen=True)
class BubblewrapLauncher(Launcher):
    """bubblewrap: new namespaces (all but the network), a read-only system.

    Settings:
        image: an unpacked root folder whose system folders and /etc are
            used; None: the host's own /usr, /bin, /lib*, ... and a short list
            of /etc files (HOST_ETC).
        etc: the /etc entries bound for the host root.

    The wrapper runs with no capabilities, in its own session (no TTY
    injection), and is killed when the process that started bwrap dies.
    Note: a signal to bwrap ends the wrapper at once (bwrap does not pass
    signals on): stop a wrapper with the pipe's Stop message.
    """

    image: str | None = None
    etc: tuple[str, ...] = HOST_ETC

    name: ClassVar[str] = "bubblewrap"
    binary: ClassVar[str] = "bwrap"
    install_hint: ClassVar[str] = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; "
                                   "EL: dnf install bubblewrap)")

    def __post_init__(self) -> None:
        if self.image is not None and not os.path.isabs(self.image):
            raise LaunchConfigError(f"bubblewrap image {self.image!r} must be the absolute path of an unpacked "
                                    "root folder; fix the image setting (or use podman for image names)")

    def environment(self, mounts: Mounts, caller: Mapping[str, str]) -> dict[str, str]:
        # bwrap passes its own environment on unchanged: this is the wrapper's.
        return minimal_environment(home=WORKDIR, tmpdir="/tmp")

    def wrap(self, argv: Sequence[str], mounts: Mounts) -> list[str]:
        argv = check_argv(argv)
        root = (self.image or "/").rstrip("/")
        command = ["bwrap", "--unshare-all", "--share-net", "--die-with-parent", "--new-session",
                   "--cap-drop", "ALL"]
        for folder in SYSTEM_DIRS:
            command += ["--ro-bind-try" if folder != "/usr" else "--ro-bind", root + folder, folder]
        if self.image is None:
            for path in self.etc:
                command += ["--ro-bind-try", path, path]
        else:
            command += ["--ro-bind", root + "/etc", "/etc"]
        command += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
                    "--bind", mounts.sandbox, WORKDIR, "--ro-bind", mounts.software, SOFTWARE]
        if mounts.cvmfs:
            command += ["--ro-bind", CVMFS, CVMFS]
        for bind in mounts.extra:
            command += ["--ro-bind" if bind.read_only else "--bind", bind.host, bind.container]
        return command + ["--chdir", WORKDIR, "--", *argv]


def _apptainer_binds(mounts: Mounts) -> str:
    binds = [f"{mounts.sandbox}:{WORKDIR}", f"{mounts.software}:{SOFTWARE}:ro"]
    if mounts.cvmfs:
        binds.append(f"{CVMFS}:{CVMFS}:ro")
    binds += [f"{b.host}:{b.container}" + (":ro" if b.read_only else "") for b in mounts.extra]
    return ",".join(binds)


@dataclass(frozen=True)
class ApptainerLauncher(Launcher):
    """Apptainer: `exec --containall --no-home` of an image (SIF or folder).

    --containall gives the wrapper its own PID and IPC namespaces, a clean
    environment and empty /tmp and home; the sandbox is bound at /workdir.
    """

    image: str

    name: ClassVar[str] = "apptainer"
    binary: ClassVar[str] = "apptainer"
    install_hint: ClassVar[str] = (
        "install apptainer, or put an apptainer on PATH (e.g. /cvmfs/oasis.opensciencegrid.org/mis/"
        "apptainer/current/bin); it runs unprivileged through user namespaces")
    host_variables: ClassVar[tuple[str, ...]] = (
        "XDG_RUNTIME_DIR", "APPTAINER_CACHEDIR", "APPTAINER_TMPDIR", "APPTAINER_CONFIGDIR",
        "SINGULARITY_CACHEDIR", "SINGULARITY_TMPDIR")

    def __post_init__(self) -> None:
        _require_image(self, self.image)

    def wrap(self, argv: Sequence[str], mounts: Mounts) -> list[str]:
        argv = check_argv(argv)
        return [self.binary, "exec", "--containall", "--no-home", "--pwd", WORKDIR,
                "-B", _apptainer_binds(mounts), self.image, *argv]


@dataclass(frozen=True)
class SingularityLauncher(ApptainerLauncher):
    """The same as Apptainer, for sites that still install `singularity`."""

    name: ClassVar[str] = "singularity"
    binary: ClassVar[str] = "singularity"
    install_hint: ClassVar[str] = "install singularity (or apptainer, and configure 'apptainer')"


def _volumes(mounts: Mounts) -> list[str]:
    volumes = ["-v", f"{mounts.sandbox}:{WORKDIR}", "-v", f"{mounts.software}:{SOFTWARE}:ro"]
    if mounts.cvmfs:
        volumes += ["-v", f"{CVMFS}:{CVMFS}:ro"]
    for bind in mounts.extra:
        volumes += ["-v", f"{bind.host}:{bind.container}" + (":ro" if bind.read_only else "")]
    return volumes


#: The user a container payload runs as when the agent is root: nobody/nogroup by number, which
#: needs no entry in the image and owns nothing on the host.
UNPRIVILEGED_USER = "65534:65534"


def container_user() -> str:
    """Who the wrapper runs as inside podman and docker: the agent's own uid:gid, or, when the
    agent is root, UNPRIVILEGED_USER (never root: a root payload with the host's network could
    sniff it or bind its privileged ports, whatever capabilities it keeps)."""
    if os.geteuid() == 0:
        return UNPRIVILEGED_USER
    return f"{os.geteuid()}:{os.getegid()}"


def _rootless_userns() -> str | None:
    """Podman's --userns for this agent: keep-id when podman runs rootless (the agent is not root)."""
    return None if os.geteuid() == 0 else "keep-id"


def _check_user(launcher: Launcher, user: str) -> tuple[int, int]:
    """USER as (uid, gid); refuse names (the image need not know them) and root."""
    uid, colon, gid = user.partition(":")
    if not (colon and uid.isdigit() and gid.isdigit()):
        raise LaunchConfigError(f"{launcher.name} user {user!r} is not 'UID:GID' in numbers; fix: give numbers "
                                f"(the image needs no entry for them), e.g. {UNPRIVILEGED_USER}")
    if int(uid) == 0 or int(gid) == 0:
        raise LaunchConfigError(f"{launcher.name} user {user!r} is root (uid or gid 0): payloads never run as "
                                f"root in a container; fix: give an unprivileged UID:GID, e.g. {UNPRIVILEGED_USER}")
    return int(uid), int(gid)


#: Podman 4 was seen to lower its own process limit to this at start-up.
PODMAN_NPROC = 32768


def caller_ulimits() -> tuple[str, ...]:
    """This process's open-files and processes limits, as podman --ulimit values.

    Without them podman asks for its defaults (nofile 1048576), which the
    OCI runtime cannot set without CAP_SYS_RESOURCE ("error setting rlimit
    type 7: operation not permitted"), as in a batch slot or a container.
    Podman 4 was seen to lower its own process limit to 32768 at start-up,
    and a container cannot get more than podman has: nproc is capped there.
    """
    def value(limit: int, top: int | None = None) -> str:
        if limit == resource.RLIM_INFINITY:
            return "-1" if top is None else str(top)
        return str(limit if top is None else min(limit, top))

    nofile_soft, nofile_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nproc_soft, nproc_hard = resource.getrlimit(resource.RLIMIT_NPROC)
    return (f"nofile={value(nofile_soft)}:{value(nofile_hard)}",
            f"nproc={value(nproc_soft, PODMAN_NPROC)}:{value(nproc_hard, PODMAN_NPROC)}")


#: What every podman and docker payload runs with: no capabilities at all (bounding set
#: included: nothing can be regained), and no privilege gained through setuid files.
PRIVILEGE_OPTIONS: tuple[str, ...] = ("--cap-drop=ALL", "--security-opt=no-new-privileges")


@dataclass(frozen=True)
class PodmanLauncher(Launcher):
    """Podman: `run --rm -i` of an image, host network, sandbox at /workdir, no privilege.

    Settings:
        image: an image name, or the absolute path of an unpacked root folder
            (run with --rootfs PATH:O: an overlay keeps the folder unchanged,
            so one folder, e.g. on CVMFS, serves podman, apptainer and
            bubblewrap alike).
        user: 'UID:GID' inside, numbers only, never root (default
            `container_user()`: the agent's own, or 65534:65534 when the agent
            is root). The sandbox is given to it (`sandbox_owner`).
        oci_runtime, cgroup_manager: podman's --runtime and --cgroup-manager
            (None: podman's default). runc and cgroupfs work on hosts with
            hybrid cgroups, where the default crun fails.
        ulimits: --ulimit values (default: the agent's own, see caller_ulimits).
        pull: --pull policy (missing: only when the image is not there).
        quiet: --quiet (no pull progress; progress would go to stderr anyway).
        init: --init, a tiny init (catatonit) as PID 1 that passes signals on.
            Without it the wrapper is PID 1, which ignores every signal it
            has no handler for: a SIGTERM to podman (forwarded inside) would
            do nothing.
        userns: --userns (default: keep-id when the agent is not root, see
            below; None for rootful podman).

    The payload shares the host's network (the wrapper talks to the broker),
    so it must hold no privilege there: --cap-drop=ALL (no raw sockets to
    sniff the host's loopback, no ports below 1024) and no-new-privileges,
    as bubblewrap and apptainer give. An agent that is not root runs podman
    rootless: --userns=keep-id maps its uid to the same uid inside, so the
    sandbox it made stays its own (without it, its uid inside would map to
    one of its subordinate uids on the host).

    `-i` keeps stdin open to the wrapper and no `-t` is given: the pipes stay
    binary-clean. Detach keys are switched off and no log driver copies the
    frames to disk. If the podman process is killed (SIGKILL), the container
    lives on until the wrapper sees the end of its stdin: wrappers treat
    that end as "the agent is gone" and stop.
    """

    image: str
    user: str = field(default_factory=container_user)
    oci_runtime: str | None = "runc"
    cgroup_manager: str | None = "cgroupfs"
    ulimits: tuple[str, ...] = field(default_factory=caller_ulimits)
    pull: str = "missing"
    quiet: bool = True
    init: bool = True
    userns: str | None = field(default_factory=_rootless_userns)

    name: ClassVar[str] = "podman"
    binary: ClassVar[str] = "podman"
    install_hint: ClassVar[str] = "install podman, runc and catatonit (Debian: apt-get install podman runc catatonit)"
    host_variables: ClassVar[tuple[str, ...]] = (
        "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "TMPDIR", "CONTAINERS_CONF",
        "CONTAINERS_STORAGE_CONF", "CONTAINERS_REGISTRIES_CONF", "CONTAINER_HOST", "CONTAINER_CONNECTION")

    def __post_init__(self) -> None:
        _require_image(self, self.image)
        _check_user(self, self.user)
        if self.image.startswith("/") and (":" in self.image or "," in self.image):
            raise LaunchConfigError(f"image folder {self.image!r} contains ':' or ',', which podman's "
                                    "--rootfs cannot take; fix: move or symlink it to a plain path")

    @property
    def sandbox_owner(self) -> tuple[int, int]:
        return _check_user(self, self.user)

    def _engine_options(self) -> list[str]:
        options = []
        if self.oci_runtime:
            options.append(f"--runtime={self.oci_runtime}")
        if self.cgroup_manager:
            options.append(f"--cgroup-manager={self.cgroup_manager}")
        return options

    def _run_options(self) -> list[str]:
        options = ["--network=host", "--log-driver=none", "--detach-keys=", "--entrypoint=", *PRIVILEGE_OPTIONS]
        if self.userns:
            options.append(f"--userns={self.userns}")
        if self.init:
            options.append("--init")
        return options + [*(f"--ulimit={limit}" for limit in self.ulimits), f"--user={self.user}"]

    def wrap(self, argv: Sequence[str], mounts: Mounts) -> list[str]:
        argv = check_argv(argv)
        command = [self.binary, "run", "--rm", "-i", f"--pull={self.pull}"]
        if self.quiet:
            command.append("--quiet")
        command += self._engine_options() + self._run_options()
        if self.image.startswith("/"):
            command.append("--rootfs")
            target = f"{self.image}:O"
        else:
            target = self.image
        return command + _volumes(mounts) + ["-w", WORKDIR, target, *argv]


@dataclass(frozen=True)
class DockerLauncher(PodmanLauncher):
    """Docker: the same shape as Podman, through a Docker daemon, with the same lack of privilege.

    The probe asks the daemon's version, so a docker client without a
    reachable daemon is refused at detection, not at the first job.
    No --quiet by default: the docker client writes pull progress to stderr
    anyway, and Debian 12's client (20.10) refuses the flag ("unknown flag").
    """

    oci_runtime: str | None = None
    cgroup_manager: str | None = None
    ulimits: tuple[str, ...] = ()
    quiet: bool = False
    userns: str | None = None   # the daemon's set-up (userns-remap), not the client's

    name: ClassVar[str] = "docker"
    binary: ClassVar[str] = "docker"
    version_argv: ClassVar[tuple[str, ...]] = ("version", "--format", "{{.Server.Version}}")
    install_hint: ClassVar[str] = ("start the Docker daemon and give this user access to it "
                                   "(or set DOCKER_HOST), or use podman")
    host_variables: ClassVar[tuple[str, ...]] = (
        "XDG_RUNTIME_DIR", "DOCKER_HOST", "DOCKER_CONFIG", "DOCKER_CONTEXT", "DOCKER_CERT_PATH",
        "DOCKER_TLS_VERIFY")

    def __post_init__(self) -> None:
        _require_image(self, self.image)
        _check_user(self, self.user)
        if self.image.startswith("/"):
            raise LaunchConfigError(f"docker cannot run the folder {self.image!r}; fix: give an image name "
                                    "(docker import a tarball of the folder first), or use podman")

    def _engine_options(self) -> list[str]:
        return [f"--runtime={self.oci_runtime}"] if self.oci_runtime else []

    def _run_options(self) -> list[str]:
        # Docker's client applies detach keys only with a TTY; its daemon has no --cgroup-manager.
        # The daemon, not this user, owns the container: no user namespace mapping to ask for.
        return ["--network=host", "--log-driver=none", "--entrypoint=", *PRIVILEGE_OPTIONS,
                *(["--init"] if self.init else []), *(f"--ulimit={limit}" for limit in self.ulimits),
                f"--user={self.user}"]


#: Launcher classes by the name configuration uses.
LAUNCHERS: dict[str, type[Launcher]] = {
    cls.name: cls for cls in (ProcessLauncher, NamespaceLauncher, BubblewrapLauncher, ApptainerLauncher,
                              SingularityLauncher, PodmanLauncher, DockerLauncher)
}
_ALIASES = {"bwrap": "bubblewrap", "none": "process"}


def make_launcher(name: str, image: str | None = None) -> Launcher:
    """The launcher configuration calls NAME, with IMAGE where it takes one."""
    key = _ALIASES.get(name, name)
    cls = LAUNCHERS.get(key)
    if cls is None:
        raise LaunchConfigError(f"unknown container runtime {name!r}; fix: use one of {', '.join(LAUNCHERS)}")
    if cls in (ProcessLauncher, NamespaceLauncher):
        return cls()  # no image: they run the host's own system
    return cls(image=image)  # type: ignore[call-arg]
