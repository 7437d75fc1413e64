"""What the wrapper sees of the host: the sandbox, the software area, /cvmfs, site binds.

Inside every container runtime the layout is the same:

    /workdir   the job's sandbox (read-write; the wrapper's working directory)
    /sw        the software area (read-only): the wrapper's runtime and setup.sh
    /cvmfs     the host's /cvmfs, read-only, when the host has one
    ...        extra binds named by the site's configuration

Without a container (ProcessLauncher) the same folders are used at their host
paths. Every path is checked when a `Mounts` is made, so that no launcher
can produce a command its runtime would misread: Apptainer's `-B` and
Podman's `-v` split their argument on ',' and ':', so such characters are
refused here, with the fix in the message.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

from pilot.launch.errors import LaunchConfigError

#: Where the sandbox appears inside a container.
WORKDIR = "/workdir"
#: Where the software area appears inside a container (the role CVMFS plays at CERN).
SOFTWARE = "/sw"
#: The host's CVMFS mount, bound at the same path when present.
CVMFS = "/cvmfs"

#: What a host-root bubblewrap sandbox sees of /etc: what programs need to
#: resolve users, hosts and libraries and to verify TLS, and no more (hosts'
#: /etc can hold keys, e.g. /etc/grid-security/hostkey.pem). Sites add
#: more through extra binds.
HOST_ETC: tuple[str, ...] = (
    "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/hosts", "/etc/host.conf", "/etc/resolv.conf",
    "/etc/localtime", "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives",
    "/etc/ssl", "/etc/ca-certificates", "/etc/pki", "/etc/os-release",
)
#: The system folders of a root (the host's, or an unpacked image's).
SYSTEM_DIRS: tuple[str, ...] = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32", "/opt")

#: Container paths a site bind may not take (they are the layout above, or
#: what every runtime mounts itself).
_RESERVED = (WORKDIR, SOFTWARE, CVMFS, "/proc", "/dev", "/sys", "/tmp")
_FORBIDDEN_CHARACTERS = {",": "a comma", ":": "a colon", "\n": "a newline", "\0": "a NUL byte"}


def _check_path(path: str, what: str) -> str:
    if not isinstance(path, str) or not path:
        raise LaunchConfigError(f"{what} is empty; set it to an absolute path")
    if not posixpath.isabs(path):
        raise LaunchConfigError(f"{what} {path!r} is not absolute; give the full path (e.g. {'/' + path!r})")
    for character, name in _FORBIDDEN_CHARACTERS.items():
        if character in path:
            raise LaunchConfigError(
                f"{what} {path!r} contains {name}, which container runtimes read as a separator in "
                "their bind syntax (apptainer -B, podman -v); fix: move or symlink the folder to a "
                "path without it")
    return posixpath.normpath(path)


@dataclass(frozen=True)
class Bind:
    """One extra bind from the site's configuration.

    Attributes:
        host: the folder (or file) on the host.
        container: where it appears inside the container.
        read_only: mount it read-only (the default: sites share data, not scratch).
    """

    host: str
    container: str
    read_only: bool = True

    def __post_init__(self) -> None:
        for path, what in ((self.host, "bind host path"), (self.container, "bind container path")):
            if ".." in str(path).split("/"):
                raise LaunchConfigError(f"{what} {str(path)!r} contains '..'; fix: give the path without it "
                                        "(where it leads depends on symlinks the launcher does not see)")
        host = _check_path(str(self.host), "bind host path")
        if host == "/" or host == "/proc" or host.startswith("/proc/"):
            raise LaunchConfigError(f"bind host path {host!r} would show the payload the whole host or its "
                                    "processes (their memory and environment, the agent's token included); "
                                    "fix: bind only the folder the jobs need")
        object.__setattr__(self, "host", host)
        container = _check_path(str(self.container), "bind container path")
        for reserved in _RESERVED:
            if container == reserved or container.startswith(reserved + "/") or container == "/":
                raise LaunchConfigError(
                    f"bind container path {container!r} overlaps {reserved}, which the launcher "
                    "mounts itself; fix: choose another container path (e.g. /site/...)")
        object.__setattr__(self, "container", container)


def parse_bind(text: str) -> Bind:
    """A site bind as given on a command line: `SRC` or `SRC:DST` (absolute paths; DST defaults to SRC).

    Read-only: a site shares data with its jobs, not scratch (the sandbox is the job's scratch)."""
    parts = text.split(":")
    if len(parts) > 2 or not all(parts):
        raise LaunchConfigError(f"bind {text!r} is not SRC or SRC:DST; fix: e.g. --bind /data/site:/site/data "
                                "(absolute paths without ':')")
    return Bind(parts[0], parts[-1])


def check_site_binds(binds: tuple[Bind, ...], *, work_dir: str) -> None:
    """Refuse binds that would show a payload the agent's WORK_DIR (its lock, the job folders of other jobs,
    a token file while it is read) or the host's /proc, after symlinks; or whose source does not exist."""
    work = os.path.realpath(work_dir)
    for bind in binds:
        if not os.path.exists(bind.host):
            raise LaunchConfigError(f"bind host path {bind.host!r} does not exist; fix: create it, or drop the bind")
        real = os.path.realpath(bind.host)
        if real == "/proc" or real.startswith("/proc/"):
            raise LaunchConfigError(f"bind host path {bind.host!r} leads to {real} (the host's processes); "
                                    "fix: bind only the folder the jobs need")
        common = os.path.commonpath([real, work])
        if common in (real, work):
            where = "is" if real == work else "holds" if common == real else "is inside"
            raise LaunchConfigError(
                f"bind host path {bind.host!r} ({real}) {where} the agent's work dir {work}, where the other "
                "jobs' sandboxes and the agent's files are; fix: bind a folder outside it")


@dataclass(frozen=True)
class Mounts:
    """The host folders a wrapper gets, and how.

    Attributes:
        sandbox: the job's sandbox on the host (appears read-write at /workdir).
        software: the software area on the host (appears read-only at /sw).
        cvmfs: bind the host's /cvmfs read-only at /cvmfs. `Mounts.on_host`
            sets it when the host has one; launchers never look themselves,
            so that `wrap` stays a pure function of its arguments.
        extra: the site's additional binds, in order.
    """

    sandbox: str
    software: str
    cvmfs: bool = False
    extra: tuple[Bind, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "sandbox", _check_path(os.fspath(self.sandbox), "sandbox"))
        object.__setattr__(self, "software", _check_path(os.fspath(self.software), "software area"))
        object.__setattr__(self, "extra", tuple(self.extra))
        seen: set[str] = set()
        for bind in self.extra:
            if not isinstance(bind, Bind):
                raise LaunchConfigError(f"extra binds must be Bind(host, container, read_only), not {bind!r}")
            if bind.container in seen:
                raise LaunchConfigError(f"two extra binds target {bind.container!r}; fix: keep one")
            seen.add(bind.container)

    @classmethod
    def on_host(cls, sandbox: str | Path, software: str | Path, extra: tuple[Bind, ...] = (),
                *, cvmfs_root: str = CVMFS) -> Mounts:
        """Mounts for this host: /cvmfs is bound when it exists here."""
        return cls(str(sandbox), str(software), cvmfs=os.path.isdir(cvmfs_root), extra=tuple(extra))
