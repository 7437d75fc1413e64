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
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "faultrun.py"
#: kind -> seed (any seed injects its kind: these are fixed so that a failure can be replayed).
ROUNDS = {"wrapper-kill": 101, "payload-kill": 102, "agent-kill": 103, "broker-kill": 104, "agent-stop": 105,
          "agent-term": 106, "disk-full": 107}


def load_tool():
    spec = importlib.util.spec_from_file_location("faultrun", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(ROUNDS))
def test_fault_round_loses_no_job(kind, capsys):
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("the fault runner needs root (tmpfs work folders, agents as nobody, kill -9)")
    faultrun = load_tool()
    settings = faultrun.Settings(jobs=6, agents=2, max_faults=2, kinds=(kind,), max_outage_s=8.0,
                                 long_outage_s=20.0)
    (result,) = faultrun.run(settings, ROUNDS[kind], 1)
    out = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + "\n".join(line for line in out.splitlines() if not line.startswith(("rounds:", "jobs:"))))
    assert [f.kind for f in result.faults] and {f.kind for f in result.faults} == {kind}, out
    assert result.jobs == 6 and not result.error, out
    assert result.problems == 0, out
    assert out.splitlines()[-1] == "faultrun_lost_jobs: 0 jobs"
