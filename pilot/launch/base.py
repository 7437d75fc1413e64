"""The launcher interface: argv in, argv out.

A launcher turns the wrapper's argv into the one command that runs it inside
a runtime (Parsl's shape, without shell strings). Each runtime is one small
frozen dataclass whose fields are its settings (the image, the OCI runtime,
...); `wrap` is a pure function of those settings and its arguments, so the
exact command can be shown (dry run), compared in tests, and cached.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from pilot.launch.environment import HOST_PATH, runtime_environment
from pilot.launch.mounts import SOFTWARE, WORKDIR, Mounts

#: Seconds a `--version` call may take (a cold CVMFS or a slow daemon).
PROBE_TIMEOUT = 30.0


@dataclass(frozen=True)
class ProbeResult:
    """Is a runtime's program here, and which version.

    Attributes:
        name: the launcher's name.
        ok: the program was found and answered.
        path: where the program is (None when not found, or no program needed).
        version: the first line of its version output.
        reason: why not, with the fix, when `ok` is False.
    """

    name: str
    ok: bool
    path: str | None = None
    version: str = ""
    reason: str = ""


class Launcher(ABC):
    """Runs a wrapper's argv inside one runtime.

    Class attributes:
        name: how configuration names this runtime.
        binary: the runtime's program ('' when none is needed).
        version_argv: arguments after `binary` that print its version (and,
            where the program alone proves nothing, reach the service).
        install_hint: the fix when the program is missing.
        host_variables: the caller's variables the runtime itself needs (its
            own configuration); they are passed to the runtime process only.
    """

    name: ClassVar[str]
    binary: ClassVar[str] = ""
    version_argv: ClassVar[tuple[str, ...]] = ("--version",)
    install_hint: ClassVar[str] = ""
    host_variables: ClassVar[tuple[str, ...]] = ()
    #: The image this launcher runs, when it runs one (set by subclasses' fields).
    image: str | None = None

    @abstractmethod
    def wrap(self, argv: Sequence[str], mounts: Mounts) -> list[str]:
        """The exact command that runs ARGV inside this runtime with MOUNTS."""

    # The paths the wrapper sees, for building its argv and its JobStart.
    def workdir(self, mounts: Mounts) -> str:
        """Where the sandbox is, as the wrapper sees it."""
        return WORKDIR

    def software_dir(self, mounts: Mounts) -> str:
        """Where the software area is, as the wrapper sees it."""
        return SOFTWARE

    def cwd(self, mounts: Mounts) -> str:
        """The working directory of the process we start (on the host).

        The sandbox, for every runtime: the runtime process never keeps the
        agent's own directory as its working directory.
        """
        return mounts.sandbox

    @property
    def sandbox_owner(self) -> tuple[int, int]:
        """(uid, gid) the sandbox must belong to for the wrapper to write it: by default the agent's own.

        Runtimes that run the wrapper as another user (podman and docker
        started by root: an unprivileged uid inside) say which.
        """
        return os.geteuid(), os.getegid()

    def prepare_sandbox(self, path: str) -> None:
        """Give the new, empty sandbox PATH to `sandbox_owner` (a chown, only when it differs).

        Called where a sandbox is made (the agent's job sandboxes, the
        self-test's). Only the folder itself: it is empty at this point.
        """
        uid, gid = self.sandbox_owner
        st = os.stat(path)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.chown(path, uid, gid)

    def environment(self, mounts: Mounts, caller: Mapping[str, str]) -> dict[str, str]:
        """The whole environment of the process we start (see pilot.launch.environment).

        For container runtimes, the runtime's own needs: container runtimes
        build the container's environment themselves and pass none of these
        variables in.
        """
        return runtime_environment(caller, self.host_variables)

    def probe(self, caller: Mapping[str, str] | None = None) -> ProbeResult:
        """Find the runtime's program and ask its version (no container is started)."""
        caller = os.environ if caller is None else caller
        path = shutil.which(self.binary, path=caller.get("PATH") or HOST_PATH)
        if path is None:
            return ProbeResult(self.name, False, reason=f"'{self.binary}' is not on PATH; fix: {self.install_hint}")
        env = runtime_environment(caller, self.host_variables)
        try:
            done = subprocess.run([path, *self.version_argv], stdin=subprocess.DEVNULL, capture_output=True,
                                  env=env, timeout=PROBE_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            return ProbeResult(self.name, False, path,
                               reason=f"'{path} {' '.join(self.version_argv)}' did not answer within "
                                      f"{PROBE_TIMEOUT:g} s (a hung daemon or file system?)")
        except OSError as exc:
            return ProbeResult(self.name, False, path, reason=f"cannot run {path}: {exc.strerror}")
        output = done.stdout.decode(errors="replace").strip()
        if done.returncode != 0:
            detail = _last_line(done.stderr) or output or f"exit status {done.returncode}"
            return ProbeResult(self.name, False, path,
                               reason=f"'{path} {' '.join(self.version_argv)}' failed: {detail}; "
                                      f"fix: {self.install_hint}")
        return ProbeResult(self.name, True, path, version=output.splitlines()[0] if output else "")

    def describe(self) -> str:
        """One line for logs: the runtime and its image."""
        return f"{self.name} (image {self.image})" if self.image else self.name


def _last_line(data: bytes) -> str:
    lines = data.decode(errors="replace").strip().splitlines()
    return lines[-1].strip() if lines else ""


def check_argv(argv: Sequence[str]) -> list[str]:
    """ARGV as a list, refusing what no exec() can run."""
    if isinstance(argv, (str, bytes)):
        raise TypeError("argv must be a list of strings, not one string (no shell is involved)")
    argv = list(argv)
    if not argv:
        raise ValueError("argv is empty: nothing to run")
    for arg in argv:
        if not isinstance(arg, str):
            raise TypeError(f"argv items must be strings, not {type(arg).__name__}: {arg!r}")
        if "\0" in arg:
            raise ValueError(f"argv item {arg!r} contains a NUL byte, which exec() cannot pass")
    return argv
