#!/usr/bin/env python3
"""Fetching the outputs of many jobs: one `job output RANGE DIR` against a shell loop.

    python bench/bulk_output.py [--quick] [--size BYTES]

Issue 13 found that fetching 50 jobs' outputs needed a shell loop of
`splitpilot job output ID` and took 24 s. Here a real broker runs as a
process (`splitpilot broker serve`, its own CA, SQLite), N jobs are
submitted with the real CLI (one job file, count = N), and each is run to
DONE through the agent and job APIs with one output of --size bytes (as a
wrapper would upload it). Then, for each N:
  - baseline: the issue's way, one `splitpilot job output ID DIR/ID`
    process per job (each pays interpreter start, TLS handshake, token load);
  - ours: one `splitpilot job output FIRST .. LAST DIR` (DIR/ID/NAME).
Both fetch the same bytes and are checked (every file, every byte). Each is
timed over several rounds (medians; the output folder is emptied between
rounds). Printed: seconds per N for both, the ratio, and the cost per job
as N grows. The last line is `bulk_output_50_jobs: S s`.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from broker.ca import CertificateAuthority  # noqa: E402
from pilot.api.client import AgentClient, MatchedJob  # noqa: E402
from pilot.api.states import JobState  # noqa: E402
from pilot.tokens import TokenRole  # noqa: E402

BIN = pathlib.Path(sys.executable).parent / "splitpilot"
SLOT = {"cores": 1, "memory_mb": 4000, "disk_mb": 4000, "time_left_s": 86400}


def cli(*args: str, config: str) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN), *args, "--config", config], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"bulk_output: `splitpilot {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


def start_broker(work: pathlib.Path) -> tuple[subprocess.Popen, str]:
    state = work / "state"
    log = open(work / "broker.log", "wb")
    process = subprocess.Popen([str(BIN), "broker", "serve", "--state-dir", str(state), "--listen", "127.0.0.1:0"],
                               stdout=subprocess.DEVNULL, stderr=log)
    log.close()
    deadline = time.monotonic() + 60
    while not (state / "address").exists():   # the broker writes it once it listens
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"bulk_output: the broker did not start: {(work / 'broker.log').read_text()}")
        time.sleep(0.05)
    return process, (state / "address").read_text().strip()


def run_jobs(address: str, ca: CertificateAuthority, count: int, payload: bytes, work: pathlib.Path) -> list[int]:
    """Match COUNT jobs and run each to DONE with one output, through the agent and job APIs."""
    agent_token = ca.new_token(TokenRole.AGENT, "bench", site="SITE-A", queue="default")
    done = []
    with AgentClient(address, agent_token) as agent:
        for _ in range(count):
            matched = agent.match(SLOT, "pilot-bench", "node-bench")
            assert isinstance(matched, MatchedJob)
            with matched.job_client() as wrapper:
                wrapper.update_state(JobState.STARTED)
                wrapper.update_state(JobState.RUNNING)
                sandbox = work / f"sandbox-{matched.job_id}"
                sandbox.mkdir()
                (sandbox / "result.out").write_bytes(payload + str(matched.job_id).encode())
                wrapper.put_output(str(sandbox / "result.out"))
                wrapper.update_state(JobState.SAVING)
                wrapper.update_state(JobState.DONE, exit_code=0)
            done.append(matched.job_id)
    return done


def check(out: pathlib.Path, ids: list[int], payload: bytes) -> None:
    for job_id in ids:
        if (out / str(job_id) / "result.out").read_bytes() != payload + str(job_id).encode():
            raise SystemExit(f"bulk_output: job {job_id}'s output is missing or wrong in {out}")


def timed(function, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer jobs and rounds (a smoke run)")
    parser.add_argument("--size", type=int, default=64 * 1024, metavar="BYTES",
                        help="size of each job's output (default 64 KiB)")
    args = parser.parse_args()
    sizes = [5, 10] if args.quick else [10, 50, 100]
    rounds = 1 if args.quick else 3
    payload = os.urandom(args.size)
    with tempfile.TemporaryDirectory(prefix="bulk-output-") as tmp:
        work = pathlib.Path(tmp)
        process, address = start_broker(work)
        try:
            ca = CertificateAuthority.load(str(work / "state" / "ca"))
            token = work / "alice.pem"
            subprocess.run([str(BIN), "token", "issue", "--ca", str(work / "state" / "ca"), "--role", "user",
                            "--subject", "alice", "--out", str(token)], check=True, capture_output=True)
            config = work / "client.toml"
            config.write_text(f'[client]\nbroker = "{address}"\ntoken = "{token}"\n')
            jobfile = work / "jobs.toml"
            jobfile.write_text(f'[job]\nname = "bulk-{{index}}"\nexecutable = "run.sh"\ncount = {max(sizes)}\n'
                               '[job.requirements]\nwalltime = "1h"\n[job.outputs]\npatterns = ["*.out"]\n')
            cli("job", "submit", str(jobfile), config=str(config))
            ids = run_jobs(address, ca, max(sizes), payload, work)
            print(f"bulk_output: {len(ids)} DONE jobs, one {args.size:,}-byte output each, {rounds} round(s), "
                  "medians", file=sys.stderr)
            out = work / "out"
            figures = {}
            for n in sizes:
                chosen = ids[:n]

                def loop(chosen: list[int] = chosen) -> None:
                    shutil.rmtree(out, ignore_errors=True)
                    for job_id in chosen:
                        cli("job", "output", str(job_id), str(out / str(job_id)), config=str(config))
                    check(out, chosen, payload)

                def bulk(chosen: list[int] = chosen) -> None:
                    shutil.rmtree(out, ignore_errors=True)
                    cli("job", "output", str(chosen[0]), "..", str(chosen[-1]), str(out), config=str(config))
                    check(out, chosen, payload)

                looped = timed(loop, rounds) if n <= 50 else float("nan")
                once = timed(bulk, rounds)
                figures[n] = once
                ratio = f"{looped / once:5.1f}x faster" if looped == looped else "(loop not run)"
                print(f"{n:4d} jobs: shell loop {looped:6.2f} s, one `job output` {once:6.2f} s "
                      f"({once / n * 1000:5.1f} ms per job), {ratio}")
        finally:
            process.terminate()
            process.wait(timeout=60)
    key = 50 if 50 in figures else max(figures)
    print(f"bulk_output_{key}_jobs: {figures[key]:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
