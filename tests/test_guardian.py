"""The agent's guardian (pilot.agent.guardian) as real processes, with a recording stand-in for the broker.

Each case runs a small program that calls `fork_agent` exactly as `splitpilot
agent` does (it must fork before any thread starts, so never inside pytest):
the child plays the agent (killed, crashing, ending normally, or waiting for
a signal), the parent is the real guardian, whose report of an abandoned
pilot is written to a file instead of reaching a broker. The end-to-end case
with a real broker and a payload killing its agent is in test_pilot_e2e.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent

PROGRAM = """
import json, os, signal, sys, time
from pilot import logconfig
from pilot.agent.guardian import fork_agent

logconfig.configure("info")    # as `splitpilot agent` does before it forks

behaviour, reports = sys.argv[1], sys.argv[2]

def report(reason):
    with open(reports, "a") as handle:
        handle.write(json.dumps({"pilot": "pilot-test", "abandoned": True, "reason": reason}) + "\\n")
    if behaviour == "broker-down":
        raise ConnectionError("broker unreachable")

role = fork_agent("pilot-test", report)
if isinstance(role, int):
    sys.exit(role)             # the guardian: the agent's exit code
# The agent. Its SIGTERM handler is in place before it says it runs (the test signals as soon as it does).
if behaviour == "sigterm":
    def leave(signum, frame):
        role.done()            # a preempted agent stops its jobs, reports, then leaves
        sys.exit(0)
    signal.signal(signal.SIGTERM, leave)
print(os.getpid(), flush=True)
if behaviour in ("sigkill", "broker-down"):
    os.kill(os.getpid(), signal.SIGKILL)
elif behaviour == "crash":
    sys.exit(7)                # ended without its end report
elif behaviour == "normal":
    role.done()
    sys.exit(3)
elif behaviour == "sigterm":
    time.sleep(60)
    sys.exit(9)
"""


def run(behaviour: str, tmp_path: Path, *, signal_guardian: int | None = None) -> tuple[int, list[dict], str, int]:
    reports = tmp_path / "reports.jsonl"
    process = subprocess.Popen([sys.executable, "-c", PROGRAM, behaviour, str(reports)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    agent = int(process.stdout.readline())
    if signal_guardian is not None:
        process.send_signal(signal_guardian)
    try:
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = reports.read_text().splitlines() if reports.exists() else []
    return process.returncode, [json.loads(line) for line in lines], err, agent


def test_agent_killed_by_a_signal_is_reported_abandoned_at_once(tmp_path):
    started = time.monotonic()
    code, reports, err, agent = run("sigkill", tmp_path)
    assert code == 1
    assert reports == [{"pilot": "pilot-test", "abandoned": True,
                        "reason": "agent killed by SIGKILL (pilot pilot-test); its jobs were abandoned"}]
    assert "guardian: agent killed by SIGKILL" in err and "reported to the broker" in err
    assert not os.path.exists(f"/proc/{agent}")
    print(f"guardian reported within {time.monotonic() - started:.2f} s of the start")


def test_agent_ending_without_its_end_report_is_reported_with_its_code(tmp_path):
    code, reports, err, _ = run("crash", tmp_path)
    assert code == 7
    assert [r["reason"] for r in reports] == [
        "agent ended with exit code 7 without its end report (pilot pilot-test); its jobs were abandoned"]


def test_a_normal_end_is_not_reported_again_and_keeps_the_agents_code(tmp_path):
    code, reports, err, _ = run("normal", tmp_path)
    assert code == 3 and reports == [] and "guardian" not in err


def test_sigterm_to_the_guardian_reaches_the_agent(tmp_path):
    """HTCondor preempts the glidein: the signal reaches the guardian (its top process) and is passed on."""
    code, reports, err, agent = run("sigterm", tmp_path, signal_guardian=signal.SIGTERM)
    assert code == 0 and reports == [], err
    assert not os.path.exists(f"/proc/{agent}")


def test_a_broker_that_cannot_be_reached_is_logged_not_fatal(tmp_path):
    code, reports, err, _ = run("broker-down", tmp_path)
    assert code == 1 and len(reports) == 1
    assert "could not report the abandoned pilot to the broker (broker unreachable)" in err


def test_fork_is_refused_once_threads_run():
    import threading

    from pilot.agent.guardian import fork_agent

    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        with pytest.raises(RuntimeError, match="before any thread starts"):
            fork_agent("p", lambda reason: None)
    finally:
        stop.set()
        thread.join()
