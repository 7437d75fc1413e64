"""A fixed-seed set of fault-injection rounds (tools/faultrun.py): one round per kind of fault.

Each round runs a real broker (`splitpilot broker serve`, restarted on the same state after a kill), real
agents as the unprivileged user nobody on small tmpfs work folders, and jobs with inputs and outputs, and
injects its kind of fault at random moments (seeded). The test fails when a round finds a job lost (not
DONE although meant to succeed), completed twice, a wrong output, a stale attempt accepted, a fenced
payload still running, or a process or sandbox left behind; and when the fault was never injected.
`tools/faultrun.py --seed SEED --rounds 1 --kinds KIND` replays a round.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "faultrun.py"
#: kind -> seed (any seed injects its kind: these are fixed so that a failure can be replayed).
ROUNDS = {"wrapper-kill": 101, "payload-kill": 102, "agent-kill": 103, "broker-kill": 104, "agent-stop": 105,
          "agent-term": 106, "disk-full": 107}


def load_tool():
    if "faultrun" in sys.modules:
        return sys.modules["faultrun"]
    spec = importlib.util.spec_from_file_location("faultrun", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["faultrun"] = module   # before it runs: its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(ROUNDS))
def test_fault_round_loses_no_job(kind, capsys):
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("the fault runner needs root (tmpfs work folders, agents as nobody, kill -9)")
    faultrun = load_tool()
    # Short rounds: a round that cannot finish gives up after 90 s (its jobs count as lost).
    settings = faultrun.Settings(jobs=6, agents=2, max_faults=2, kinds=(kind,), max_outage_s=8.0,
                                 long_outage_s=20.0, long_payload_s=(8.0, 12.0), round_timeout_s=90.0)
    (result,) = faultrun.run(settings, ROUNDS[kind], 1)
    out = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + "\n".join(line for line in out.splitlines() if not line.startswith(("rounds:", "jobs:"))))
    assert [f.kind for f in result.faults] and {f.kind for f in result.faults} == {kind}, out
    assert result.jobs == 6 and not result.error, out
    assert result.problems == 0, out
    assert out.splitlines()[-1] == "faultrun_lost_jobs: 0 jobs"


# ---------------------------------------------------------------------------------------- the checks

def status(job_id: int, state, attempt: int, events, exit_code=None):
    """A JobStatus as the broker would report it; EVENTS: (seconds, state, attempt)."""
    import datetime

    from pilot.api.client import JobEvent, JobStatus
    from pilot.pipe import messages as m

    moment = lambda s: datetime.datetime.fromtimestamp(1_000_000 + s, datetime.UTC)  # noqa: E731
    return JobStatus(job_id=job_id, name="j", owner="o", state=state, attempt=attempt, submitted=moment(0),
                     updated=moment(0), site="S", node="n", pilot_id="p", exit_code=exit_code, message="",
                     history=tuple(JobEvent(moment(t), s, a, "") for t, s, a in events), outputs=(),
                     spec=m.JobSpec())


@pytest.fixture
def checker(tmp_path, monkeypatch):
    """A round that never started: its checks fed with made-up statuses and ledger files."""
    if os.geteuid() != 0:
        pytest.skip("a round is made as root (it resolves the agents' user)")
    faultrun = load_tool()
    one = faultrun.Round(0, 1, faultrun.Settings(), tmp_path / "software", tmp_path)
    one.ledger.mkdir()
    monkeypatch.setattr(one, "_check_output", lambda *args: None)
    one.wall_started = 1_000_000.0
    return one


def test_checks_find_lost_double_stale_wasted_and_fenced_runs(checker):
    from pilot.api.states import JobState as S

    W, A, R, D = S.WAITING, S.ASSIGNED, S.RUNNING, S.DONE
    checker.expected = {job: {"digest": "x", "bad": job == 5, "may_fail": job == 6} for job in range(1, 8)}
    checker.resumed = [1_000_030.0]
    ledger = checker.ledger
    (ledger / "4.1.start").write_text("1 0\n")
    (ledger / "4.1.end").write_text("0 1000009\n")           # succeeded, but attempt 2 was taken
    (ledger / "4.1.alive").write_text("1000009\n")
    (ledger / "7.1.start").write_text("1 0\n")
    (ledger / "7.1.alive").write_text("1000052\n")           # 22 s after its node ran again (30 s)
    statuses = {
        1: status(1, D, 1, [(0, W, 0), (1, A, 1), (2, R, 1), (3, D, 1)]),
        2: status(2, S.FAILED_INPUT, 1, [(0, W, 0), (1, A, 1), (2, S.FAILED_INPUT, 1)]),
        3: status(3, D, 2, [(0, W, 0), (1, A, 1), (5, W, 1), (6, A, 2), (7, D, 2), (8, D, 2)]),
        4: status(4, D, 2, [(0, W, 0), (1, A, 1), (5, W, 1), (6, A, 2), (8, R, 1), (9, D, 2)]),
        5: status(5, D, 1, [(0, W, 0), (1, A, 1), (2, D, 1)]),
        6: status(6, S.FAILED_EXECUTION, 1, [(0, W, 0), (1, A, 1), (2, S.FAILED_EXECUTION, 1)], exit_code=-9),
        7: status(7, D, 2, [(0, W, 0), (1, A, 1), (10, W, 1), (11, A, 2), (12, D, 2)]),
    }
    checker._check(statuses)
    r = checker.result
    assert sorted(item["job"] for item in r.lost) == [2, 5]          # input failure; meant to fail, but DONE
    assert [item["job"] for item in r.double] == [3]
    assert [item["job"] for item in r.stale] == [4] and "RUNNING of attempt 1 after attempt 2" in r.stale[0]["why"]
    assert r.wasted_runs == [{"job": 4, "attempt": 1, "final_attempt": 2, "state": "DONE", "why": ""}]
    assert [(item["job"], item["ran_on_s"]) for item in r.fenced_ran_on] == [(7, 22.0)]
    assert r.done == 4 and r.problems == 5
