"""A node's processes, namespaces and mounts, as the host sees them in /proc.

The mini-condor's promise "stop leaves no process and no mount behind" is
checked here, from the outside: a process belongs to the node if it is in the
node's mount namespace (the `unshare` launcher and the daemons) or in the
node's PID namespace or one nested in it (jobs, which the starter puts in
mount namespaces of their own, and Apptainer containers, which have PID
namespaces of their own). Mounts are read from /proc/self/mountinfo.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may hold spaces): [state, ppid, ...]."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def start_time(pid: int) -> int | None:
    """PID's start time in clock ticks since boot (field 22 of stat(5)); None if it is gone."""
    fields = stat_fields(pid)
    return int(fields[19]) if fields else None


def alive(pid: int, started: int) -> bool:
    """PID runs, is not a zombie, and is the process that started at STARTED (not a reused PID)."""
    fields = stat_fields(pid)
    if not fields:
        return False
    return fields[0] != "Z" and int(fields[19]) == started


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def children(parent: int) -> list[int]:
    """PIDs whose parent is PARENT (scanning /proc: /proc/PID/task/*/children may be missing)."""
    found = []
    for pid in all_pids():
        fields = stat_fields(pid)
        if fields and int(fields[1]) == parent:
            found.append(pid)
    return found


def child_named(parent: int, command: str) -> int | None:
    """A child of PARENT whose command name (comm) is COMMAND."""
    for pid in children(parent):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == command:
                return pid
    return None


def ns_inode(pid: int, kind: str) -> int | None:
    """The inode number identifying PID's namespace of KIND (mnt, pid, ...)."""
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


_NS_GET_PARENT = 0xB702  # ioctl(2) on a PID namespace file: open its parent namespace


def pid_ns_ancestry(pid: int) -> list[int]:
    """Inode numbers of PID's PID namespace and of its ancestors, up to ours."""
    chain: list[int] = []
    try:
        fd = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY)
    except OSError:
        return chain
    try:
        for _ in range(33):  # the kernel nests at most 32 PID namespaces
            chain.append(os.fstat(fd).st_ino)
            try:
                parent = fcntl.ioctl(fd, _NS_GET_PARENT)
            except OSError as exc:
                if exc.errno != errno.EPERM:  # EPERM: the parent is outside our own namespace
                    raise
                break
            os.close(fd)
            fd = parent
    finally:
        os.close(fd)
    return chain


def node_processes(mnt_ns: int, pid_ns: int) -> list[int]:
    """Live processes in mount namespace MNT_NS, or in PID namespace PID_NS or one nested in it."""
    found = []
    for pid in all_pids():
        if pid == os.getpid():
            continue
        fields = stat_fields(pid)
        if not fields or fields[0] == "Z":
            continue
        if ns_inode(pid, "mnt") == mnt_ns or pid_ns in pid_ns_ancestry(pid):
            found.append(pid)
    return found


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below PATH in this process's mount namespace."""
    top = str(path).rstrip("/") or "/"
    prefix = top.rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
            if point == top or point.startswith(prefix):
                found.append(point)
    return found


def wait_for(probe: Callable[[], T], timeout: float,
             report: Callable[[float], None] | None = None) -> T | None:
    """Call PROBE every 0.1 s until it returns a truthy value (returned) or TIMEOUT passes (None).

    REPORT, if given, is called with the seconds waited every 5 s: progress for long waits.
    """
    started = last = time.monotonic()
    while True:
        value = probe()
        if value:
            return value
        now = time.monotonic()
        if now - started >= timeout:
            return None
        if report is not None and now - last >= 5:
            last = now
            report(now - started)
        time.sleep(0.1)


def run_captured(argv: Sequence[str], input: str | None, timeout: float) -> subprocess.CompletedProcess[str] | None:
    """Run ARGV with captured text output; None if it ran past TIMEOUT (then it is killed).

    On timeout the children of ARGV's process are killed first: `nsenter` forks
    the command into the node, where it would otherwise be adopted by the
    node's PID 1 and live on.
    """
    process = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        for child in children(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        process.kill()
        process.communicate()
        return None
    return subprocess.CompletedProcess(list(argv), process.returncode, stdout, stderr)
