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
        object.__setattr__(self, "host", _check_path(str(self.host), "bind host path"))
        container = _check_path(str(self.container), "bind container path")
        for reserved in _RESERVED:
            if container == reserved or container.startswith(reserved + "/") or container == "/":
                raise LaunchConfigError(
                    f"bind container path {container!r} overlaps {reserved}, which the launcher "
                    "mounts itself; fix: choose another container path (e.g. /site/...)")
        object.__setattr__(self, "container", container)


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
