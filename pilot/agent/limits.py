"""Enforcing a job's memory limit: a cgroup v2 memory.max where the agent's
cgroup is delegated to it, otherwise a watchdog that kills on excess.

A delegated cgroup (HTCondor's starter and systemd can delegate one) lets
the kernel enforce the limit exactly and account every process of the job,
daemons included. Without one, the agent samples the wrapper's process tree
every few seconds and stops the job when it exceeds the limit: looser (a
fast allocation can overshoot between samples), but works everywhere.
"""

from __future__ import annotations

import os


def own_cgroup_dir() -> str | None:
    """This process's cgroup v2 directory, if cgroup v2 is mounted."""
    try:
        with open("/proc/self/cgroup") as handle:
            for line in handle:
                hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
                if hierarchy == "0" and controllers == "":
                    for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                        candidate = root + path
                        if os.path.exists(os.path.join(candidate, "cgroup.procs")):
                            return candidate
    except OSError:
        pass
    return None


def prepare_delegation() -> str | None:
    """Make our cgroup able to hold per-job children with the memory controller.

    cgroup v2 forbids processes in a cgroup that distributes controllers to
    children, so the agent first moves itself into a leaf `agent` child, then
    enables +memory for the children. Called once, before any wrapper starts.
    Returns the parent directory, or None when not delegated to us.
    """
    parent = own_cgroup_dir()
    if parent is None or not os.access(parent, os.W_OK):
        return None
    try:
        with open(os.path.join(parent, "cgroup.controllers")) as handle:
            if "memory" not in handle.read().split():
                return None
        with open(os.path.join(parent, "cgroup.subtree_control")) as handle:
            if "memory" in handle.read().split():
                return parent
        leaf = os.path.join(parent, "agent")
        os.makedirs(leaf, exist_ok=True)
        with open(os.path.join(leaf, "cgroup.procs"), "w") as handle:
            handle.write(str(os.getpid()))
        with open(os.path.join(parent, "cgroup.subtree_control"), "w") as handle:
            handle.write("+memory")
        return parent
    except OSError:
        return None


class CgroupLimit:
    """A child cgroup with memory.max for one job; None from `create` when not delegated."""

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def create(cls, parent: str | None, name: str, memory_mb: int) -> CgroupLimit | None:
        """A child of PARENT (from prepare_delegation) limited to MEMORY_MB."""
        if parent is None:
            return None
        try:
            path = os.path.join(parent, name)
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, "memory.max"), "w") as handle:
                handle.write(str(memory_mb * 1024 * 1024))
            with open(os.path.join(path, "memory.swap.max"), "w") as handle:
                handle.write("0")
        except OSError:
            return None
        return cls(path)

    def add(self, pid: int) -> bool:
        try:
            with open(os.path.join(self.path, "cgroup.procs"), "w") as handle:
                handle.write(str(pid))
            return True
        except OSError:
            return False

    def oom_killed(self) -> bool:
        try:
            with open(os.path.join(self.path, "memory.events")) as handle:
                for line in handle:
                    key, value = line.split()
                    if key == "oom_kill" and int(value) > 0:
                        return True
        except OSError:
            pass
        return False

    def remove(self) -> None:
        try:
            os.rmdir(self.path)
        except OSError:
            pass
