"""Forward compatibility of the pipe: peers of the next minor, made from schemas generated in the test run.

tests/next_minor_pipe.py writes a copy of pipe.proto and job.proto with new
fields, enum values, a oneof member and new message kinds, and compiles it;
tests/newer_peer.py speaks it (its own framing, its own process). Against
this agent, a newer wrapper sends values this side does not know: they are
read as UNKNOWN, said once, and end the attempt as a re-queue that is never
charged to the node. Against this wrapper, a newer agent sends new fields
and a Stop with an unknown reason: the wrapper stops as for any Stop. Both
stand-ins negotiate the smaller minor and so never send their new kinds.
Older peers (minor 0) get nothing of minor 1 from this side either.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pilot.agent.brokerlink import Offer
from pilot.agent.jobrun import JobRun, RunSettings
from pilot.agent.policy import Ending
from pilot.pipe import enums
from pilot.pipe import messages as m
from pilot.pipe.channel import spawn_with_channel
from tests.next_minor_pipe import (
    NEW_ERROR_CODE,
    NEW_FAILURE_CLASS,
    NEW_JOB_STATE,
    NEW_LOG_STREAM,
    NEW_STOP_REASON,
    NEXT_MINOR,
    generate,
)
from tests.test_agent import FakeAgentBroker, make_agent, script_spec

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def next_minor(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("next-minor"))


@pytest.fixture
def said(monkeypatch) -> list[str]:
    """What pilot.pipe.enums reports about unknown values, from a clean slate."""
    lines: list[str] = []
    monkeypatch.setattr(enums, "report", lines.append)
    monkeypatch.setattr(enums, "_seen", set())
    return lines


def newer_wrapper_argv(gen: Path, reports: Path) -> list[str]:
    return ["env", f"PYTHONPATH={gen}", sys.executable, str(HERE / "newer_peer.py"), "wrapper", str(reports)]


def test_the_next_minor_is_the_one_after_ours(next_minor):
    assert NEXT_MINOR == m.PROTOCOL_VERSION[1] + 1
    text = (next_minor.parent / "proto" / "splitpilot" / "pipe" / "v1" / "pipe.proto").read_text()
    assert "Drain drain = 6;" in text and "Progress progress = 8;" in text and "string not_started = 10;" in text


@pytest.mark.parametrize("scenario", ["result", "error"])
def test_a_newer_wrapper_is_read_tolerantly_by_this_agents_jobrun(next_minor, tmp_path, said, scenario):
    reports = tmp_path / "reports"
    reports.mkdir()
    sandbox = tmp_path / "job-5-1" / "sandbox"
    sandbox.mkdir(parents=True)
    offer = Offer(5, 1, m.JobSpec(name=scenario, executable="/bin/true"), b"CERT", b"KEY", 0)
    ended = []
    run = JobRun(offer, spawn_wrapper=lambda: spawn_with_channel(newer_wrapper_argv(next_minor, reports)),
                 sandbox_host=str(sandbox), sandbox_inside=str(sandbox), software_inside="", broker_address="x",
                 ca_pem=b"CA", agent_id="this-agent", limits=m.Limits(cores=1), deadline_unix=0,
                 settings=RunSettings(monitor_interval_s=0.2, ready_timeout_s=30),
                 on_done=lambda _run, outcome: ended.append(outcome))
    run.start()
    run.join(timeout=60)
    assert not run.is_alive()
    (outcome,) = ended
    report = json.loads((reports / "5.json").read_text())
    assert report["agent_minor"] == m.PROTOCOL_VERSION[1] and report["negotiated"] == m.PROTOCOL_VERSION[1]
    assert "progress" not in report["sent"]          # the newer wrapper kept to the negotiated minor
    assert outcome.ending is Ending.UNKNOWN_RESULT   # re-queued, never charged to the node
    if scenario == "result":
        assert f"JOB_STATE_UNKNOWN({NEW_JOB_STATE})" in outcome.detail
        assert f"FAILURE_CLASS_UNKNOWN({NEW_FAILURE_CLASS})" in outcome.detail
        assert run.state == NEW_JOB_STATE and run.last_heartbeat.rss_bytes == 1 << 20
        # Each unknown value said once, though JobState 99 came twice (StateChange and Result).
        assert len(said) == 3, said
        assert sum(f"JobState value {NEW_JOB_STATE}," in line for line in said) == 1
        assert sum(f"LogStream value {NEW_LOG_STREAM}," in line for line in said) == 1
    else:
        assert f"ERROR_CODE_UNKNOWN({NEW_ERROR_CODE})" in outcome.detail
        assert len(said) == 1 and f"ErrorCode value {NEW_ERROR_CODE}," in said[0]


def test_a_newer_wrapper_costs_the_agent_nothing(next_minor, tmp_path, said):
    """Through the whole agent: both attempts reported as wrapper failures (re-queued), the black-hole guard
    (1 failure here) untouched, the agent leaves idle with exit 0."""
    reports = tmp_path / "reports"
    reports.mkdir()
    specs = [script_spec("#!/bin/sh\ntrue\n", tmp_path, name=name) for name in ("result", "error")]
    broker = FakeAgentBroker(specs)
    agent = make_agent(tmp_path, broker, cores=1, black_hole=1, idle=0.5,
                       wrapper=newer_wrapper_argv(next_minor, reports))
    assert agent.run() == 0
    assert [f[2] for f in broker.failures] == [1, 1]              # ATTEMPT_FAILURE_WRAPPER: re-queued
    assert broker.ends == [(2, "idle")] and not agent.black_hole


def test_a_newer_agent_against_this_wrapper(next_minor, tmp_path):
    broker_dir, sandbox = tmp_path / "broker", tmp_path / "sandbox"
    (broker_dir / "inputs").mkdir(parents=True)
    sandbox.mkdir()
    (broker_dir / "inputs.json").write_text("{}")
    job = m.JobStart(job_id=12, attempt=1, sandbox_dir=str(sandbox),
                     spec=m.JobSpec(executable="/bin/sh", arguments=["-c", "echo started > s.out; exec sleep 300"],
                                    output_patterns=["*.out"]),
                     token=m.JobToken(certificate_pem=b"JOB-CERT", private_key_pem=b"JOB-KEY"))
    job_file, report = tmp_path / "jobstart.bin", tmp_path / "report.json"
    job_file.write_bytes(job.SerializeToString())
    wrapper = ["env", f"PYTHONPATH={HERE.parent}{os.pathsep}{HERE}", sys.executable, str(HERE / "fake_job_broker.py"),
               str(broker_dir)]
    result = subprocess.run([sys.executable, str(HERE / "newer_peer.py"), "agent", str(report), str(job_file), "--",
                             *wrapper], env={"PATH": os.environ["PATH"], "PYTHONPATH": str(next_minor)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(report.read_text())
    assert seen["wrapper_minor"] == m.PROTOCOL_VERSION[1] and seen["negotiated"] == m.PROTOCOL_VERSION[1]
    assert "drain" not in seen["sent"] and "stop" in seen["sent"]
    assert seen["result"]["failure_class"] == m.FailureClass.FAILURE_CLASS_STOPPED, seen
    assert f"STOP_REASON_UNKNOWN({NEW_STOP_REASON})" in seen["result"]["message"]
    assert seen["wrapper_exit"] == 0
    assert f"StopReason value {NEW_STOP_REASON}, which this side does not know" in result.stderr
    states = [json.loads(line)["state"] for line in (broker_dir / "states.jsonl").read_text().splitlines()]
    assert m.JobState.JOB_STATE_DONE not in states and (broker_dir / "outputs" / "s.out").exists()


# ---------------------------------------------------------------------------
# The node's broker calls, answered by a newer broker with a JobState this side does not know

# The real broker's fixtures (a server with users and an agent) and helpers.
from tests.test_broker_server import ca, ca_dir, clients, match, server, submit_one, tokens  # noqa: E402, F401


@pytest.fixture
def newer_answers(monkeypatch):
    """UpdateState and ReportAttemptFailure answer with JobState 99, as a newer broker could (set before the
    broker starts: its servicers are bound then)."""
    from broker.services import agent as service_agent
    from broker.services import job as service_job

    def answering_99(method):
        async def patched(self, request, context):
            response = await method(self, request, context)
            response.state = NEW_JOB_STATE
            return response
        return patched
    monkeypatch.setattr(service_job.JobServicer, "UpdateState", answering_99(service_job.JobServicer.UpdateState))
    monkeypatch.setattr(service_agent.AgentServicer, "ReportAttemptFailure",
                        answering_99(service_agent.AgentServicer.ReportAttemptFailure))


def test_a_state_unknown_to_this_client_in_a_brokers_answer_is_no_error(newer_answers, server, clients):  # noqa: F811
    """A real broker answering with a state this side does not know: the job client (the wrapper's link) and
    the agent client read it as the number 99 instead of failing the call (the old client raised ValueError,
    which the wrapper took for the broker refusing its report)."""
    from pilot.wrapper.broker_link import connect_grpc

    submit_one(clients.alice)
    matched = match(clients.agent)
    start = m.JobStart(job_id=matched.job_id, attempt=matched.attempt, spec=matched.spec,
                       token=m.JobToken(certificate_pem=matched.token_pem, private_key_pem=matched.key_pem),
                       broker=m.BrokerEndpoint(address=server.address, ca_pem=server.ca_pem))
    link = connect_grpc(start)
    try:
        assert link.update_state(int(m.JobState.JOB_STATE_STARTED)).state == NEW_JOB_STATE
    finally:
        link.close()
    assert clients.agent.report_attempt_failure(matched.job_id, matched.attempt, "wrapper", "test",
                                                "pilot-1") == NEW_JOB_STATE
