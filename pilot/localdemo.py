"""`splitpilot demo --local`: the main job end to end on one machine.

A broker on the embedded default (SQLite, in a temporary state directory),
about 20 sample jobs with inputs and outputs submitted with a user token, and
one real agent (a separate process holding an agent token, given on its
stdin) that runs each job in a wrapper inside the best container runtime it
finds. Progress is shown live; at the end every job's outputs are fetched,
checked against what the payload must have computed, and summarised.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

PAYLOAD = """\
#!/bin/sh
# A sample payload: count the words of its input, hash it, and say where it ran.
set -e
sleep "$1"
wc -w < words.txt | tr -d ' ' > count.out
sha256sum words.txt | cut -d' ' -f1 > digest.out
echo "job $SPLITPILOT_JOB_ID attempt $SPLITPILOT_ATTEMPT ran in $(pwd)" > where.out
echo "done: $(cat count.out) words"
"""


@dataclass(frozen=True)
class Expected:
    job_id: int
    name: str
    words: int
    digest: str


def _progress(counts: dict, started: float) -> str:
    order = ("WAITING", "ASSIGNED", "STARTED", "RUNNING", "SAVING", "DONE")
    parts = [f"{name.lower()} {counts.get(name, 0)}" for name in order]
    failed = sum(v for k, v in counts.items() if k not in order)
    return f"[{time.monotonic() - started:5.1f} s] " + "  ".join(parts) + (f"  failed {failed}" if failed else "")


def run_local_demo(jobs: int = 20, runtimes: str = "bubblewrap,podman,apptainer", keep: bool = False,
                   timeout: float = 600.0) -> int:
    from broker.client import BrokerClient
    from broker.lifecycle import JobState
    from broker.server import BrokerConfig, BrokerServer
    from pilot.pipe import messages as m
    from pilot.tokens import TokenRole
    from pilot.tokens.files import write_private

    state = tempfile.mkdtemp(prefix="splitpilot-demo-")
    print(f"splitpilot demo: broker, {jobs} jobs and one agent on this machine (state in {state})", flush=True)
    started = time.monotonic()
    agent = None
    server = BrokerServer(BrokerConfig(state_dir=os.path.join(state, "broker"), listen="127.0.0.1:0",
                                       reap_interval=2.0))
    try:
        server.start()
        print(f"broker: listening on {server.address} (mutual TLS, SQLite in {server.state_dir})", flush=True)
        user = server.ca.new_token(TokenRole.USER, "demo-user")
        agent_token = server.ca.new_token(TokenRole.AGENT, "demo-pilot", site="LOCAL", queue="default",
                                          ttl=datetime.timedelta(hours=2))
        inputs = os.path.join(state, "inputs")
        os.makedirs(inputs)
        payload = os.path.join(inputs, "count.sh")
        with open(payload, "w") as handle:
            handle.write(PAYLOAD)
        expected: list[Expected] = []
        with BrokerClient(server.address, user, server.ca_pem) as client:
            script = client.upload(payload, "count.sh")
            specs = []
            for index in range(jobs):
                words = " ".join(f"word{index}-{n}" for n in range(10 + 7 * index)) + "\n"
                path = os.path.join(inputs, f"words-{index}.txt")
                with open(path, "w") as handle:
                    handle.write(words)
                data = client.upload(path, "words.txt")
                specs.append(m.JobSpec(
                    name=f"count-{index:02d}", executable="./count.sh", arguments=[f"{0.2 + (index % 4) * 0.2:.1f}"],
                    input_files=[script, data], output_patterns=["*.out"], max_attempts=3,
                    requirements=m.Requirements(cores=1, memory_mb=256, disk_mb=64, walltime_s=300)))
                expected.append(Expected(0, f"count-{index:02d}", 10 + 7 * index,
                                         hashlib.sha256(words.encode()).hexdigest()))
            ids = client.submit(specs)
            expected = [Expected(job_id, e.name, e.words, e.digest) for job_id, e in zip(ids, expected, strict=True)]
            print(f"submitted {len(ids)} jobs (ids {ids[0]}..{ids[-1]}), each with 2 inputs and 3 outputs", flush=True)

            token_path = os.path.join(state, "agent-token.pem")
            write_private(token_path, agent_token.to_pem())
            log_path = os.path.join(state, "agent.log")
            with open(log_path, "wb") as log:
                agent = subprocess.Popen(
                    [sys.executable, "-m", "pilot", "agent", "--broker", server.address, "--token", "-",
                     "--work-dir", os.path.join(state, "agent"), "--idle-timeout", "3s", "--lifetime", "1h",
                     "--container-policy", "prefer", "--runtimes", runtimes],
                    stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT)
                agent.stdin.write(agent_token.to_pem())
                agent.stdin.close()
            os.unlink(token_path)
            print(f"agent: pid {agent.pid}, token given on its stdin, log {log_path}", flush=True)

            last = ""
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                listing = client.list()
                counts = {state_.name: n for state_, n in listing.counts.items()}
                line = _progress(counts, started)
                if line.split("] ", 1)[1] != last:
                    print(line, flush=True)
                    last = line.split("] ", 1)[1]
                if all(job.final for job in listing.jobs) and len(listing.jobs) == len(ids):
                    break
                if agent.poll() is not None and not all(job.final for job in listing.jobs):
                    print(f"agent exited early (code {agent.returncode}); its log:", file=sys.stderr)
                    print(open(log_path, errors="replace").read()[-4000:], file=sys.stderr)
                    return 1
                time.sleep(0.5)
            runtime = _runtime_line(log_path)
            ok = _summary(client, expected, os.path.join(state, "outputs"), JobState)
            agent.wait(timeout=60)
            print(f"agent: {runtime}; left with code {agent.returncode}")
            verdict = "all jobs DONE with the right outputs" if ok else "FAILED"
            print(f"total {time.monotonic() - started:.1f} s; {verdict}")
            return 0 if ok else 1
    finally:
        if agent is not None and agent.poll() is None:
            agent.terminate()
            try:
                agent.wait(timeout=60)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        server.stop()
        if keep:
            print(f"state kept in {state}")
        else:
            shutil.rmtree(state, ignore_errors=True)


def _runtime_line(log_path: str) -> str:
    with open(log_path, errors="replace") as handle:
        for line in handle:
            if "runtime:" in line and "memory limits" in line:
                return line.split("agent: ", 1)[1].strip()
    return "runtime unknown"


def _summary(client, expected: list[Expected], out_dir: str, JobState) -> bool:
    header = ("job", "name", "state", "attempts", "node", "seconds", "outputs")
    rows = []
    ok = True
    for item in expected:
        status = client.status(item.job_id)
        target = os.path.join(out_dir, str(item.job_id))
        check = "-"
        if status.state is JobState.DONE:
            client.output(item.job_id, target)
            count = open(os.path.join(target, "count.out")).read().strip()
            digest = open(os.path.join(target, "digest.out")).read().strip()
            where = open(os.path.join(target, "where.out")).read().strip()
            good = count == str(item.words) and digest == item.digest
            place = " (in /workdir)" if where.endswith("/workdir") else " (no container)"
            check = ("ok" if good else "WRONG") + place
            ok &= good
        else:
            ok = False
        seconds = (status.updated - status.submitted).total_seconds()
        rows.append((str(item.job_id), item.name, status.state.name, str(status.attempt), status.node or "-",
                     f"{seconds:.1f}", check))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print()
    return ok
