"""The demos' sample jobs: submit them, show progress, fetch and check their outputs.

Shared by `splitpilot demo --local` (one agent on this machine) and the
default `splitpilot demo` (glideins on the mini-condor): the same payload,
the same checks, the same summary table.

Each job counts the words of its own input file, hashes it, and says where it
ran; the checks recompute both from what was submitted, so a job that ran
the wrong input, lost an output, or ran outside a container is reported.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from pilot.api.states import JobState
from pilot.pipe import messages as m

PAYLOAD = """\
#!/bin/sh
# A sample payload: count the words of its input, hash it, and say where it ran.
set -e
sleep "$1"
wc -w < words.txt | tr -d ' ' > count.out
sha256sum words.txt | cut -d' ' -f1 > digest.out
if [ -n "${APPTAINER_CONTAINER:-}${SINGULARITY_CONTAINER:-}" ] || [ -d /.singularity.d ]; then runtime=apptainer
elif [ -f /run/.containerenv ]; then runtime=podman
elif [ -f /.dockerenv ]; then runtime=docker
elif [ "$(pwd)" = /workdir ]; then runtime=bubblewrap
else runtime=none
fi
echo "job $SPLITPILOT_JOB_ID attempt $SPLITPILOT_ATTEMPT ran in $(pwd) on $(uname -n) container=$runtime" > where.out
echo "done: $(cat count.out) words"
"""

#: The states a job passes through on the way to DONE, in order (the progress line's columns).
PROGRESS_ORDER = ("WAITING", "ASSIGNED", "STARTED", "RUNNING", "SAVING", "DONE")


@dataclass(frozen=True)
class Expected:
    """What one sample job must produce."""

    job_id: int
    name: str
    words: int
    digest: str


@dataclass(frozen=True)
class Checked:
    """One job's outcome, as the summary shows it."""

    job_id: int
    name: str
    state: str
    attempts: int
    node: str
    seconds: float
    good: bool
    container: str          # the runtime the payload saw itself in ("none" outside a container)

    @property
    def check(self) -> str:
        if self.state != "DONE":
            return "-"
        return ("ok" if self.good else "WRONG") + f" (container: {self.container})"


def submit_sample_jobs(client, inputs_dir: str, jobs: int, sleep_s: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8),
                       ) -> list[Expected]:
    """Upload the payload and one input per job, submit JOBS jobs; return what each must produce."""
    os.makedirs(inputs_dir, exist_ok=True)
    payload = os.path.join(inputs_dir, "count.sh")
    with open(payload, "w") as handle:
        handle.write(PAYLOAD)
    script = client.upload(payload, "count.sh")
    specs, expected = [], []
    for index in range(jobs):
        words = " ".join(f"word{index}-{n}" for n in range(10 + 7 * index)) + "\n"
        path = os.path.join(inputs_dir, f"words-{index}.txt")
        with open(path, "w") as handle:
            handle.write(words)
        data = client.upload(path, "words.txt")
        name = f"count-{index:02d}"
        specs.append(m.JobSpec(
            name=name, executable="./count.sh", arguments=[f"{sleep_s[index % len(sleep_s)]:.1f}"],
            input_files=[script, data], output_patterns=["*.out"], max_attempts=3,
            requirements=m.Requirements(cores=1, memory_mb=256, disk_mb=64, walltime_s=300)))
        expected.append((name, 10 + 7 * index, hashlib.sha256(words.encode()).hexdigest()))
    ids = client.submit(specs)
    return [Expected(job_id, name, words, digest)
            for job_id, (name, words, digest) in zip(ids, expected, strict=True)]


def progress_line(counts: Mapping[str, int], started: float, extra: str = "") -> str:
    """`[ 12.3 s] waiting 4  assigned 0 ... done 16` (+ failed N, + EXTRA)."""
    parts = [f"{name.lower()} {counts.get(name, 0)}" for name in PROGRESS_ORDER]
    failed = sum(v for k, v in counts.items() if k not in PROGRESS_ORDER)
    line = f"[{time.monotonic() - started:5.1f} s] " + "  ".join(parts) + (f"  failed {failed}" if failed else "")
    return line + (f"  | {extra}" if extra else "")


def state_counts(listing) -> dict[str, int]:
    return {state.name: count for state, count in listing.counts.items()}


def check_outputs(client, expected: list[Expected], out_dir: str) -> list[Checked]:
    """Fetch every DONE job's outputs into OUT_DIR/ID and check them against EXPECTED."""
    checked = []
    for item in expected:
        status = client.status(item.job_id)
        good, container = False, "-"
        if status.state is JobState.DONE:
            target = os.path.join(out_dir, str(item.job_id))
            client.output(item.job_id, target)
            good = (_read(target, "count.out") == str(item.words) and _read(target, "digest.out") == item.digest)
            where = _read(target, "where.out")
            container = where.rsplit("container=", 1)[1] if "container=" in where else "unknown"
        seconds = (status.updated - status.submitted).total_seconds()
        checked.append(Checked(item.job_id, item.name, status.state.name, status.attempt, status.node or "-",
                               seconds, good, container))
    return checked


def print_summary(checked: list[Checked]) -> None:
    header = ("job", "name", "state", "attempts", "node", "seconds", "outputs")
    rows = [(str(c.job_id), c.name, c.state, str(c.attempts), c.node, f"{c.seconds:.1f}", c.check) for c in checked]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print(flush=True)


def _read(folder: str, name: str) -> str:
    try:
        with open(os.path.join(folder, name)) as handle:
            return handle.read().strip()
    except FileNotFoundError:
        return ""
