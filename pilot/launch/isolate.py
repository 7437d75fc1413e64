"""Run a program in new namespaces, in a new root, with no capabilities: the `namespace` launcher's helper.

    python3 -I -S isolate.py [OPTIONS] -- PROGRAM [ARGS...]

What bubblewrap does, for hosts without it, with nothing but the Python
standard library (it runs by path with the agent's own interpreter, so that
neither the software area nor anything the payload can write is imported).
Three processes, as in bubblewrap:

    outer   the process the agent started. It unshares a user namespace
            (mapping only its own uid and gid: no other id exists inside),
            PID, IPC and UTS namespaces, dies with the agent's thread that
            started it (PR_SET_PDEATHSIG), passes TERM/INT/HUP/QUIT/USR1/USR2
            on, and ends as the program ended (the same exit code, or killed
            by the same signal).
    init    PID 1 of the new PID namespace. It unshares a mount namespace,
            builds the new root (below), pivots into it, drops every
            capability and sets no_new_privs, starts a new session, then
            starts the program and reaps orphans. When the program ends, init
            ends, and the kernel kills whatever is left in the namespace.
    program the wrapper: PROGRAM exec'd with this process's environment.

Everything this helper needs is imported before the pivot: the interpreter's
own files are not in the new root.

The new root is a tmpfs, read-only once built, holding only what the options
name: system folders read-only (symlinks such as /bin -> usr/bin kept as
symlinks), single /etc entries read-only, the sandbox read-write, the
software area read-only, a new /proc for the new PID namespace, a minimal
/dev (null, zero, full, random, urandom, tty, a private devpts, shm) and a
tmpfs /tmp. Nothing else of the host is there: not the agent's work dir, not
other sandboxes, not /home, /root, /run or the rest of /etc.

Capabilities: the bounding, effective, permitted, inheritable and ambient
sets are emptied and the securebits locked (SECBIT_NOROOT: uid 0 inside, an
agent running as root, gets no capabilities back on exec), so the program
can neither unmount nor remount anything; mounts made here are locked for
any user namespace it makes itself (the kernel's MNT_LOCK_* rules), so it
cannot take them apart there either.

Exit status 125 and a message on stderr mean the set-up failed (the message
names the step and the fix); anything else is the program's own.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import stat
import struct
import sys
import warnings  # noqa: F401 - os.execvp's PATH search imports it lazily: after the pivot, no stdlib is visible

# --- kernel constants (linux/sched.h, linux/mount.h, linux/prctl.h, linux/securebits.h)
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

SECBIT_NOROOT = 1 << 0
SECBIT_NOROOT_LOCKED = 1 << 1
SECBIT_KEEP_CAPS_LOCKED = 1 << 5
SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6
SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 7
LOCKED_SECUREBITS = (SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_KEEP_CAPS_LOCKED
                     | SECBIT_NO_CAP_AMBIENT_RAISE | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED)
LINUX_CAPABILITY_VERSION_3 = 0x20080522

#: pivot_root has no libc wrapper: its syscall number per architecture.
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "ppc64": 203, "s390x": 217,
                  "i686": 217, "i386": 217, "armv7l": 218}

#: statvfs flags -> the mount flags a remount must repeat (the kernel refuses
#: to clear flags the parent namespace locked: nosuid, nodev, noexec, atime).
_KEPT_FLAGS = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
               (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME))

#: Signals passed on from the outer process to init, and from init to the program.
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
#: The devices of the minimal /dev, bound from the host's.
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
SETUP_FAILED = 125
#: Where the first tmpfs is mounted before pivoting into it (as bubblewrap does); it is moved by
#: pivot_root, so whatever the folder holds on the host stays reachable under /oldroot meanwhile.
BASE_CANDIDATES = ("/tmp", "/var/tmp", "/mnt", "/run")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_libc.syscall.restype = ctypes.c_long


class SetupError(Exception):
    """A set-up step failed; the message names the step, the errno and the fix."""


def _check(result: int, what: str, fix: str = "") -> None:
    if result != 0:
        code = ctypes.get_errno()
        advice = f"; fix: {fix}" if fix else ""
        raise SetupError(f"{what}: {os.strerror(code)} ({errno.errorcode.get(code, code)}){advice}")


def _b(path: str) -> bytes:
    return os.fsencode(path)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    result = _libc.mount(_b(source) if source else None, _b(target), fstype.encode() if fstype else None, flags,
                         data.encode() if data else None)
    _check(result, f"mount {source or ''} on {target}" + (f" ({fstype})" if fstype else ""))


def prctl(option: int, arg: int = 0) -> None:
    _check(_libc.prctl(option, arg, 0, 0, 0), f"prctl({option}, {arg})")


def pivot_root(new_root: str, put_old: str) -> None:
    machine = os.uname().machine   # not the platform module: it costs milliseconds to import
    number = SYS_PIVOT_ROOT.get(machine)
    if number is None:
        raise SetupError(f"pivot_root: unknown syscall number on {machine}; fix: use bubblewrap here")
    _check(_libc.syscall(number, _b(new_root), _b(put_old)), f"pivot_root({new_root}, {put_old})")


# ------------------------------------------------------------------ options


class Options:
    """The parsed command line (argv-based, like bubblewrap's, so a dry run shows everything).

    binds: (kind, host source, destination inside) in order; kind is one of
    system, ro-bind, ro-bind-try, bind. (A plain class: importing dataclasses
    would add ~10 ms to every job's start.)"""

    def __init__(self) -> None:
        self.binds: list[tuple[str, str, str]] = []
        self.chdir = "/"
        self.argv: list[str] = []


USAGE = ("usage: isolate.py [--system SRC DEST] [--ro-bind SRC DEST] [--ro-bind-try SRC DEST] [--bind SRC DEST] "
         "[--chdir DIR] -- PROGRAM [ARGS...]")


def parse(argv: list[str]) -> Options:
    options = Options()
    index = 0
    two = {"--system", "--ro-bind", "--ro-bind-try", "--bind"}
    while index < len(argv):
        arg = argv[index]
        if arg == "--":
            options.argv = argv[index + 1:]
            break
        if arg in two:
            if index + 2 >= len(argv):
                raise SetupError(f"{arg} needs a source and a destination; {USAGE}")
            source, dest = argv[index + 1], argv[index + 2]
            if not source.startswith("/") or not dest.startswith("/"):
                raise SetupError(f"{arg} {source} {dest}: both paths must be absolute")
            options.binds.append((arg[2:], source, os.path.normpath(dest)))
            index += 3
        elif arg == "--chdir":
            if index + 1 >= len(argv):
                raise SetupError(f"--chdir needs a folder; {USAGE}")
            options.chdir = argv[index + 1]
            index += 2
        else:
            raise SetupError(f"unknown option {arg!r}; {USAGE}")
    if not options.argv:
        raise SetupError(f"no program given after --; {USAGE}")
    return options


# ------------------------------------------------------------------ the outer process


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def enter_namespaces() -> None:
    """unshare the user, PID, IPC and UTS namespaces and map our own uid/gid (only them) inside."""
    uid, gid = os.geteuid(), os.getegid()
    _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS),
           "unshare(user, pid, ipc, uts namespaces)",
           "allow unprivileged user namespaces (sysctl user.max_user_namespaces > 0; on some kernels "
           "kernel.unprivileged_userns_clone=1), or use another launcher")
    try:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
        _write("/proc/self/gid_map", f"{gid} {gid} 1\n")
    except OSError as exc:
        raise SetupError(f"writing the user namespace's id maps: {exc.strerror}") from None


def outer(options: Options) -> int:
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)   # the agent (the thread that started us) gone: we go
    enter_namespaces()
    status_r, status_w = os.pipe2(os.O_CLOEXEC)   # init -> outer: the program's wait status
    alive_r, alive_w = os.pipe2(os.O_CLOEXEC)     # held open by outer only: init sees it close
    pending: list[int] = []
    child = 0

    def forward(signum, _frame):
        if child:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass
        else:
            pending.append(signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    child = os.fork()
    if child == 0:
        os.close(status_r)
        os.close(alive_w)
        try:
            code = init(options, status_w, alive_r)
        except SetupError as exc:
            print(f"splitpilot isolate: {exc}", file=sys.stderr, flush=True)
            code = SETUP_FAILED
        except BaseException as exc:  # noqa: BLE001 - never return into the outer process's code
            print(f"splitpilot isolate: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            code = SETUP_FAILED
        os._exit(code)
    os.close(status_w)
    os.close(alive_r)
    for queued in pending:
        forward(queued, None)
    _release_stdio()
    while True:
        try:
            _pid, init_status = os.waitpid(child, 0)
            break
        except ChildProcessError:
            init_status = 0
            break
    data = b""
    while len(data) < 4:
        chunk = os.read(status_r, 4 - len(data))
        if not chunk:
            break
        data += chunk
    if len(data) == 4:
        return _become(struct.unpack("=i", data)[0])
    # init ended without the program's status: set-up failed (it said why) or init was killed.
    return _become(init_status)


def _become(wait_status: int) -> int:
    """End like a process with WAIT_STATUS: the same exit code, or killed by the same signal."""
    if os.WIFSIGNALED(wait_status):
        signum = os.WTERMSIG(wait_status)
        signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
        os.kill(os.getpid(), signum)
        return 128 + signum   # a signal whose default is not to end the process
    return os.waitstatus_to_exitcode(wait_status)


def _release_stdio() -> None:
    """Give up our copies of stdin and stdout (the agent's pipe): only the program holds them."""
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)


# ------------------------------------------------------------------ init: the new root


def init(options: Options, status_w: int, alive_r: int) -> int:
    pending: list[int] = []
    program = 0

    def forward(signum, _frame):
        if program:
            try:
                os.kill(program, signum)
            except ProcessLookupError:
                pass
        else:
            pending.append(signum)

    # First: PID 1 ignores every signal it has no handler for.
    for signum in FORWARDED:
        signal.signal(signum, forward)
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # The outer process may have died before the line above: its pipe end is then closed.
    if select.select([alive_r], [], [], 0)[0]:
        return SETUP_FAILED
    sources = _resolve_sources(options)
    build_root(options, sources)
    os.setsid()
    drop_privileges()
    try:
        os.chdir(options.chdir)
    except OSError as exc:
        raise SetupError(f"cannot enter {options.chdir} inside: {exc.strerror}") from None
    program = os.fork()
    if program == 0:
        try:
            for signum in FORWARDED:
                signal.signal(signum, signal.SIG_DFL)
            os.execvp(options.argv[0], options.argv)
        except OSError as exc:
            print(f"splitpilot isolate: cannot run {options.argv[0]!r}: {exc.strerror}", file=sys.stderr,
                  flush=True)
        os._exit(127)
    for queued in pending:
        forward(queued, None)
    _release_stdio()
    while True:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            return SETUP_FAILED
        if pid == program:
            os.write(status_w, struct.pack("=i", wait_status))
            return 0   # as PID 1 leaves, the kernel kills the rest of the namespace


def _resolve_sources(options: Options) -> dict[str, str]:
    """Host paths with their symlinks resolved, while the host's root is still ours (as bubblewrap does):
    after the pivot an absolute symlink would point into the new root."""
    resolved = {}
    for kind, source, _dest in options.binds:
        if kind != "system":
            resolved[source] = os.path.realpath(source)
    return resolved


def build_root(options: Options, sources: dict[str, str]) -> None:
    _check(_libc.unshare(CLONE_NEWNS), "unshare(mount namespace)")
    # Nothing we mount may propagate back to the host.
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    base = next((p for p in BASE_CANDIDATES if os.path.isdir(p) and not os.path.islink(p)), None)
    if base is None:
        raise SetupError(f"none of {', '.join(BASE_CANDIDATES)} is a folder to build the new root on")
    mount("tmpfs", base, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    os.chdir(base)
    os.mkdir("newroot", 0o755)
    os.mkdir("oldroot", 0o755)
    pivot_root(".", "oldroot")
    os.chdir("/")
    mount("tmpfs", "/newroot", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    for kind, source, dest in options.binds:
        if kind == "system":
            _system(source, dest)
        else:
            _bind(kind, sources[source], dest)
    _proc()
    _dev()
    _makedirs("/newroot/tmp")
    mount("tmpfs", "/newroot/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    # Drop the host's root, then make the new one the root.
    mount(None, "/oldroot", None, MS_REC | MS_PRIVATE)
    _check(_libc.umount2(b"/oldroot", MNT_DETACH), "umount /oldroot")
    os.chdir("/newroot")
    pivot_root(".", ".")
    _check(_libc.umount2(b".", MNT_DETACH), "umount the old root")
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _makedirs(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)


def _mount_point(dest: str, directory: bool) -> str:
    target = "/newroot" + dest
    if directory:
        _makedirs(target)
    else:
        _makedirs(os.path.dirname(target))
        if not os.path.lexists(target):
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
    return target


def _system(source: str, dest: str) -> None:
    """A system folder: a symlink stays that symlink, a folder is bound read-only, a missing one is skipped."""
    host = "/oldroot" + source
    if os.path.islink(host):
        target = "/newroot" + dest
        _makedirs(os.path.dirname(target))
        os.symlink(os.readlink(host), target)
    elif os.path.isdir(host):
        target = _mount_point(dest, True)
        mount(host, target, None, MS_BIND | MS_REC)
        _read_only(target)


def _bind(kind: str, source: str, dest: str) -> None:
    host = "/oldroot" + source
    if not os.path.exists(host):
        if kind == "ro-bind-try":
            return
        raise SetupError(f"--{kind} {source}: no such file or folder on this host")
    target = _mount_point(dest, os.path.isdir(host))
    mount(host, target, None, MS_BIND | MS_REC)
    if kind == "bind":
        _remount(target, MS_NOSUID | MS_NODEV)
    else:
        _read_only(target)


def _read_only(target: str) -> None:
    """Remount TARGET and every mount below it read-only, nosuid, nodev."""
    for point in _mounts_below(target):
        _remount(point, MS_RDONLY | MS_NOSUID | MS_NODEV)


def _remount(point: str, add: int) -> None:
    flags = os.statvfs(point).f_flag
    kept = 0
    for st_flag, ms_flag in _KEPT_FLAGS:
        if flags & st_flag:
            kept |= ms_flag
    mount(None, point, None, MS_REMOUNT | MS_BIND | add | kept)


def _mounts_below(target: str) -> list[str]:
    """TARGET and the mount points below it, parents first (from /proc/self/mountinfo)."""
    # While the new root is built, the host's /proc is the one under /oldroot (it shows our mounts too).
    with open("/oldroot/proc/self/mountinfo", "rb") as handle:
        lines = handle.read().decode("utf-8", "surrogateescape").splitlines()
    points = []
    for line in lines:
        point = _unescape(line.split(" ")[4])
        if point == target or point.startswith(target + "/"):
            points.append(point)
    return sorted(set(points), key=lambda p: p.count("/")) or [target]


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo.
    out, index = [], 0
    while index < len(field):
        if field[index] == "\\" and field[index + 1:index + 4].isdigit() and len(field[index + 1:index + 4]) == 3:
            out.append(chr(int(field[index + 1:index + 4], 8)))
            index += 4
        else:
            out.append(field[index])
            index += 1
    return "".join(out)


def _proc() -> None:
    _makedirs("/newroot/proc")
    mount("proc", "/newroot/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _dev() -> None:
    _makedirs("/newroot/dev")
    mount("tmpfs", "/newroot/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755")
    for name in DEVICES:
        host = f"/oldroot/dev/{name}"
        if os.path.exists(host) and stat.S_ISCHR(os.stat(host).st_mode):
            target = _mount_point(f"/dev/{name}", False)
            mount(host, target, None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx")):
        os.symlink(target, f"/newroot/dev/{name}")
    _makedirs("/newroot/dev/shm")
    mount("tmpfs", "/newroot/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    _makedirs("/newroot/dev/pts")
    try:
        mount("devpts", "/newroot/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620")
    except SetupError:
        pass  # no pseudo-terminals inside: batch payloads rarely need one, and nothing else depends on it


# ------------------------------------------------------------------ capabilities


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_privileges() -> None:
    """Empty every capability set for good, then no_new_privs and non-dumpable."""
    prctl(PR_SET_SECUREBITS, LOCKED_SECUREBITS)
    try:
        with open("/proc/sys/kernel/cap_last_cap") as handle:
            last = int(handle.read())
    except (OSError, ValueError):
        last = 63
    for cap in range(last + 1):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
            _check(-1, f"dropping capability {cap} from the bounding set")
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset (dropping every capability)")
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_DUMPABLE, 0)


# ------------------------------------------------------------------ main


def main(argv: list[str]) -> int:
    try:
        options = parse(argv)
        return outer(options)
    except SetupError as exc:
        print(f"splitpilot isolate: {exc}", file=sys.stderr, flush=True)
        return SETUP_FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
