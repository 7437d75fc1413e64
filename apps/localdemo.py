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
import os
import shutil
import subprocess
import sys
import tempfile
import time

from apps.demojobs import check_outputs, print_summary, progress_line, state_counts, submit_sample_jobs
from broker.server import BrokerConfig, BrokerServer
from pilot.api.client import BrokerClient
from pilot.tokens import TokenRole
from pilot.tokens.files import write_private


def run_local_demo(jobs: int = 20, runtimes: str = "bubblewrap,podman,apptainer", keep: bool = False,
                   timeout: float = 600.0) -> int:
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
        with BrokerClient(server.address, user, server.ca_pem) as client:
            expected = submit_sample_jobs(client, os.path.join(state, "inputs"), jobs)
            ids = [e.job_id for e in expected]
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
                line = progress_line(state_counts(listing), started)
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
            checked = check_outputs(client, expected, os.path.join(state, "outputs"))
            print_summary(checked)
            ok = all(c.good for c in checked)
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
