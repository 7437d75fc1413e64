"""The `namespace` launcher: bubblewrap's isolation without bubblewrap, from the Python standard library.

Where unprivileged user namespaces work (most kernels since 4.x; the
agent needs no setuid helper and no package), the wrapper runs in its own
user, mount, PID, IPC and UTS namespaces with a new root: the host's system
folders and a short list of /etc files read-only, the sandbox read-write at
/workdir, the software area read-only at /sw, a new /proc, a minimal /dev
and a tmpfs /tmp; no capability, no_new_privs, its own session, and it dies
with the agent. It is not a container: there is no image, the host's own
system folders are what the wrapper runs on, and the network is the host's.

The set-up is done by `pilot.launch.isolate`, a stdlib-only helper run by
path with the agent's own interpreter in isolated mode (`-I -S`: no
environment variable, no site-packages, nothing the sandbox or the software
area holds is imported). `wrap` puts it in front of the wrapper's argv, so
the exact command is shown by a dry run, as for every other runtime.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from pilot.launch import isolate
from pilot.launch.base import Launcher, ProbeResult, check_argv
from pilot.launch.environment import minimal_environment
from pilot.launch.mounts import CVMFS, HOST_ETC, SOFTWARE, SYSTEM_DIRS, WORKDIR, Mounts

#: The helper, by path: the agent's own installed copy (never the software area's, which jobs may see).
ISOLATE_PATH = os.path.abspath(isolate.__file__)


def running_interpreter() -> str:
    """An interpreter this user can run for the helper (it imports nothing but the standard library).

    The binary this process runs (/proc/self/exe) first, then sys.executable,
    then the system's python3: a virtualenv's `bin/python` may be a link into
    a folder another user cannot enter."""
    candidates = []
    try:
        candidates.append(os.readlink("/proc/self/exe"))
    except OSError:
        pass
    candidates += [sys.executable, shutil.which("python3") or "", "/usr/bin/python3"]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return sys.executable


def _user_namespace_problem() -> str:
    """Why this kernel refuses unprivileged user namespaces, with the fix; '' when they look allowed."""
    for path, bad, fix in (("/proc/sys/user/max_user_namespaces", "0", "sysctl -w user.max_user_namespaces=15000"),
                           ("/proc/sys/kernel/unprivileged_userns_clone", "0",
                            "sysctl -w kernel.unprivileged_userns_clone=1"),
                           ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1",
                            "allow user namespaces for this program in AppArmor, or "
                            "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0")):
        if path.endswith("unprivileged_userns_clone") and os.geteuid() == 0:
            continue   # root is not restricted by this one
        try:
            with open(path) as handle:
                value = handle.read().strip()
        except OSError:
            continue
        if value == bad:
            return f"{path} is {value}: user namespaces are switched off here; fix: {fix}, or use another launcher"
    return ""


@dataclass(frozen=True)
class NamespaceLauncher(Launcher):
    """Own namespaces and a new root made by pilot.launch.isolate, with the agent's interpreter.

    Settings:
        python: the interpreter that runs the helper (default: the binary the agent runs).
        helper: the helper's path (default: this installation's pilot/launch/isolate.py).
        etc: the host's /etc entries bound read-only (as for bubblewrap on the host root).

    Signals to the process the agent starts are passed on to the wrapper
    (TERM, INT, HUP, QUIT, USR1, USR2); a SIGKILL to it, or the death of the
    agent's thread that started it, kills every process inside at once.
    """

    python: str = field(default_factory=running_interpreter)
    helper: str = ISOLATE_PATH
    etc: tuple[str, ...] = HOST_ETC

    name: ClassVar[str] = "namespace"
    install_hint: ClassVar[str] = "allow unprivileged user namespaces, or install bubblewrap or a container runtime"

    def wrap(self, argv: Sequence[str], mounts: Mounts) -> list[str]:
        argv = check_argv(argv)
        command = [self.python, "-I", "-S", self.helper]
        for folder in SYSTEM_DIRS:
            command += ["--system", folder, folder]
        for path in self.etc:
            command += ["--ro-bind-try", path, path]
        command += ["--bind", mounts.sandbox, WORKDIR, "--ro-bind", mounts.software, SOFTWARE]
        if mounts.cvmfs:
            command += ["--ro-bind", CVMFS, CVMFS]
        for bind in mounts.extra:
            command += ["--ro-bind" if bind.read_only else "--bind", bind.host, bind.container]
        return command + ["--chdir", WORKDIR, "--", *argv]

    def environment(self, mounts: Mounts, caller: Mapping[str, str]) -> dict[str, str]:
        # The helper passes its environment on unchanged (and, run with -I, reads none of it itself).
        return minimal_environment(home=WORKDIR, tmpdir="/tmp")

    def probe(self, caller: Mapping[str, str] | None = None) -> ProbeResult:
        if not os.access(self.python, os.X_OK):
            return ProbeResult(self.name, False, reason=f"the interpreter {self.python} cannot be run by this user; "
                                                        f"fix: {self.install_hint}")
        if not os.access(self.helper, os.R_OK):
            return ProbeResult(self.name, False, reason=f"the helper {self.helper} is not readable by this user; "
                                                        "fix: install splitpilot readable for the agent's user")
        if platform.machine() not in isolate.SYS_PIVOT_ROOT:
            return ProbeResult(self.name, False, reason=f"no pivot_root syscall number known for "
                                                        f"{platform.machine()}; fix: use bubblewrap here")
        problem = _user_namespace_problem()
        if problem:
            return ProbeResult(self.name, False, reason=problem)
        return ProbeResult(self.name, True, self.python,
                           version=f"user namespaces, python {platform.python_version()}")
