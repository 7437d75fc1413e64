"""Resource use of process trees and directories, read from /proc and the file system.

Shared by the agent (watching each wrapper's tree) and the wrapper (watching
its payload). A process tree is found from a root pid by the parent links in
/proc/<pid>/stat; a payload that double-forks a daemon escapes the tree but
not its process group or session, so callers may also pass a session id
(or make themselves a child subreaper: pilot.prctl). `kill_descendants`
empties a tree for good.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class TreeUsage:
    """Resource use of a set of processes at one moment."""

    pids: tuple[int, ...]
    cpu_seconds: float   # user + system, of the live processes (children they reaped included)
    rss_bytes: int       # sum of resident set sizes (shared pages counted per process)

    @property
    def processes(self) -> int:
        return len(self.pids)


def _stat(pid: int) -> tuple[int, int, float, int] | None:
    """(ppid, session, cpu seconds incl. reaped children, rss bytes) or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2:].split()
    ppid, session = int(fields[1]), int(fields[3])
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    rss_pages = int(fields[21])
    return ppid, session, (utime + stime + cutime + cstime) / _CLOCK_TICKS, rss_pages * _PAGE


def tree_usage(root: int, session: int | None = None, *, include_root: bool = True) -> TreeUsage:
    """Processes descending from ROOT (and, if given, all of SESSION)."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _stat(int(name))
            if stat is not None:
                table[int(name)] = stat
    children: dict[int, list[int]] = {}
    for pid, (ppid, _sess, _cpu, _rss) in table.items():
        children.setdefault(ppid, []).append(pid)
    members = set()
    stack = [root] if root in table else []
    while stack:
        pid = stack.pop()
        if pid not in members:
            members.add(pid)
            stack.extend(children.get(pid, ()))
    if session is not None:
        members |= {pid for pid, (_p, sess, _c, _r) in table.items() if sess == session}
    if not include_root:
        members.discard(root)
    cpu = sum(table[p][2] for p in members)
    rss = sum(table[p][3] for p in members)
    return TreeUsage(tuple(sorted(members)), cpu, rss)


def directory_bytes(path: str) -> int:
    """Bytes allocated on disk below PATH (like du; links not followed)."""
    total = 0
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += info.st_blocks * 512
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        except OSError:
            continue
    return total


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return True   # gone
    return data[data.rindex(b")") + 2:][:1] in (b"Z", b"X")


def kill_descendants(root: int | None = None, *, rounds: int = 100) -> int:
    """SIGKILL every descendant of ROOT (default: this process), again until none is left (they may
    fork while being killed), and reap those that became our children; return how many were killed.

    Meant for a child subreaper (orphans come back to it): everything a job
    left behind, however it daemonised, is below it.
    """
    me = os.getpid() if root is None else root
    killed: set[int] = set()
    for _ in range(rounds):
        alive = [pid for pid in tree_usage(me, include_root=False).pids if not _is_zombie(pid)]
        if not alive:
            break
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        _reap(killed)
        time.sleep(0.01)
    # Whatever is left below us now is a zombie: ours (orphans come to a subreaper), reap them all.
    _reap(killed | set(tree_usage(me, include_root=False).pids))
    return len(killed)


def _reap(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass  # not our child: its own parent (also being killed) or the kernel reaps it
