"""What the agent's slot offers: cores, memory, disk and time.

From HTCondor when the agent runs in a glidein ($_CONDOR_MACHINE_AD for the
slot's Cpus, Memory (MiB), Disk (KiB); $_CONDOR_JOB_AD for the glidein's own
limits), otherwise from cgroup limits, the CPU affinity mask, /proc/meminfo
and the work directory's free space. Time left comes from the configured
lifetime, capped by the machine ad's end of life when it says so.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass

_CLASSAD_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*=\s*(.*?)\s*$")


@dataclass(frozen=True)
class SlotResources:
    """The slot as a whole (the agent partitions it between its jobs)."""

    cores: int
    memory_mb: int
    disk_mb: int
    end_of_life: float  # time.time() at which the slot ends
    source: str         # where the figures came from, for logs and --dry-run

    def time_left(self, now: float | None = None) -> float:
        return max(0.0, self.end_of_life - (time.time() if now is None else now))


def read_classad(path: str) -> dict[str, str]:
    """The attributes of an old-syntax ClassAd file (one `Name = value` a line)."""
    attributes = {}
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            match = _CLASSAD_LINE.match(line)
            if match:
                attributes[match.group(1).lower()] = match.group(2).strip('"')
    return attributes


def _number(ad: dict[str, str], name: str) -> float | None:
    try:
        return float(ad[name.lower()])
    except (KeyError, ValueError):
        return None


def cgroup_memory_limit_mb() -> int | None:
    """memory.max of this process's cgroup (v2), or memory.limit_in_bytes (v1)."""
    try:
        with open("/proc/self/cgroup") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _hier, controllers, path = line.split(":", 2)
        candidates = []
        if controllers == "":
            candidates.append(f"/sys/fs/cgroup{path}/memory.max")
            candidates.append(f"/sys/fs/cgroup/unified{path}/memory.max")
        elif "memory" in controllers.split(","):
            candidates.append(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
        for candidate in candidates:
            try:
                with open(candidate) as handle:
                    value = handle.read().strip()
            except OSError:
                continue
            if value.isdigit() and int(value) < 1 << 60:
                return int(value) // (1024 * 1024)
    return None


def _meminfo_mb() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0


def discover(work_dir: str, lifetime_s: float, environ: dict[str, str] | None = None,
             now: float | None = None) -> SlotResources:
    """The slot this agent runs in."""
    env = os.environ if environ is None else environ
    now = time.time() if now is None else now
    end = now + lifetime_s
    machine_ad_path = env.get("_CONDOR_MACHINE_AD")
    if machine_ad_path and os.path.exists(machine_ad_path):
        ad = read_classad(machine_ad_path)
        cores = _number(ad, "Cpus")
        memory = _number(ad, "Memory")   # MiB
        disk = _number(ad, "Disk")       # KiB
        # A glidein's startd may advertise when the slot must be given back.
        for name in ("GLIDEIN_ToDie", "GLIDEIN_ToRetire"):
            limit = _number(ad, name)
            if limit:
                end = min(end, limit)
        if cores and memory and disk:
            return SlotResources(int(cores), int(memory), int(disk // 1024), end, f"machine ad {machine_ad_path}")
    cores = len(os.sched_getaffinity(0))
    memory = cgroup_memory_limit_mb() or _meminfo_mb()
    disk = shutil.disk_usage(work_dir).free // (1024 * 1024)
    return SlotResources(cores, memory, disk, end, "cgroup, affinity, /proc/meminfo, free disk")
