"""The agent as a real process (tests/agent_driver.py: the Agent with a file-recording broker), signalled and
watched from outside: the two ways issue 11 found to hang or wedge it.

1. SIGTERM while the main loop holds a lock: the old handler printed and took `self._lock`, which the loop
   held at that moment, and the agent hung for good (later SIGTERMs too). The driver delivers SIGTERM from
   inside that section when the agent has one, else from inside the main thread's broker call.
2. A JobRun that raised (the old agent named a newer wrapper's ErrorCode with ErrorCode.Name: ValueError in
   the job's thread): its on_done never ran, the slot stayed busy, the agent never went idle, and its drain
   spun. Now every run ends with an Outcome and an unknown code is re-queued without charging the node.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pilot.pipe import messages as m
from tests.test_agent import script_spec
from tests.test_pilot_e2e import wait_for

HERE = Path(__file__).parent


def driver(tmp_path: Path, specs: list[m.JobSpec], *, wrapper: list[str] | None = None, **config):
    work, events = tmp_path / "work", tmp_path / "events.jsonl"
    work.mkdir()
    config.update(work=str(work), events=str(events), specs=[s.SerializeToString().hex() for s in specs],
                  wrapper=wrapper or [sys.executable, str(HERE / "fake_job_broker.py"), str(tmp_path / "broker")],
                  env={"PATH": os.environ["PATH"], "PYTHONPATH": f"{HERE.parent}{os.pathsep}{HERE}"})
    (tmp_path / "driver.json").write_text(json.dumps(config))
    log = open(tmp_path / "agent.log", "wb")
    process = subprocess.Popen([sys.executable, str(HERE / "agent_driver.py"), str(tmp_path / "driver.json")],
                               stdout=log, stderr=log, env={**os.environ, "PYTHONPATH": f"{HERE.parent}"})
    log.close()
    return process, events


def recorded(events: Path) -> list[dict]:
    return [json.loads(line) for line in events.read_text().splitlines()] if events.exists() else []


def finish(process: subprocess.Popen, timeout: float, tmp_path: Path) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"the agent did not end within {timeout} s (hung); its log:\n"
                             f"{(tmp_path / 'agent.log').read_text()[-3000:]}") from None


def test_sigterm_inside_the_main_loop_stops_the_jobs_and_ends_the_agent(tmp_path):
    spec = script_spec("#!/bin/sh\nexec sleep 300\n", tmp_path, name="long")
    process, events = driver(tmp_path, [spec], cores=2, idle=60, inject="sigterm-inside-the-loop")
    try:
        wait_for(lambda: any(e["event"] == "signalled" for e in recorded(events)), 60, "the driver's SIGTERM")
        if process.poll() is None:   # a later SIGTERM (HTCondor may send more than one) changes nothing
            process.send_signal(signal.SIGTERM)
        code = finish(process, 60, tmp_path)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = (tmp_path / "agent.log").read_text()
    assert code == 0, log[-3000:]
    seen = recorded(events)
    failures = [e for e in seen if e["event"] == "failure"]
    assert [f["failure"] for f in failures] == [3], seen          # STOPPED: re-queued by the broker
    assert "STOP_REASON_PREEMPTED" in failures[0]["detail"] or "signal SIGTERM" in failures[0]["detail"]
    (end,) = [e for e in seen if e["event"] == "end"]
    assert end["reason"] == "signal SIGTERM" and end["jobs_run"] == 1
    assert "received SIGTERM" in log
    assert not os.listdir(tmp_path / "work")                       # the job's folder removed


def test_a_newer_wrappers_unknown_error_code_neither_wedges_nor_charges_the_agent(tmp_path):
    specs = [script_spec("#!/bin/sh\ntrue\n", tmp_path, name=f"j{i}") for i in range(2)]
    wrapper = [sys.executable, str(HERE / "agent_driver.py"), "--error-wrapper"]
    process, events = driver(tmp_path, specs, wrapper=wrapper, cores=1, idle=0.5, black_hole=1)
    try:
        started = time.monotonic()
        code = finish(process, 60, tmp_path)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = (tmp_path / "agent.log").read_text()
    assert code == 0, log[-3000:]                                  # not 3: the guard (1 failure) untouched
    seen = recorded(events)
    assert [e["failure"] for e in seen if e["event"] == "failure"] == [1, 1], seen   # WRAPPER: re-queued
    assert all("ERROR_CODE_UNKNOWN(42)" in e["detail"] for e in seen if e["event"] == "failure")
    assert [e for e in seen if e["event"] == "end"] == [{"event": "end", "jobs_run": 2, "reason": "idle"}]
    assert log.count("ErrorCode value 42, which this side does not know") == 1   # said once
    assert time.monotonic() - started < 60
