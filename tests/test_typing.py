"""The node side type-checks: mypy over setup.cfg's [mypy] `files` (pilot/ at least), strict optional.

Runs in `make test` (and `make lint`): a None reaching a place that needs a value, or a wrong type
passed on, fails the suite. The check is shown to bite: a copy of the sources with one such mistake is
refused, naming the file, the line's problem and its error code.
"""

from __future__ import annotations

import configparser
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                                reason="mypy is not installed; fix: pip install -e '.[test]' (the test extra has it)")


def mypy(root: Path, cache: Path, *targets: str) -> subprocess.CompletedProcess:
    # No targets: the files and options come from ROOT's setup.cfg, as in `make lint`.
    return subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(cache), *targets], cwd=root,
                          capture_output=True, text=True, timeout=600)


def test_the_checked_packages_include_the_node_side():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    files = {name.strip() for name in config["mypy"]["files"].replace("\n", ",").split(",") if name.strip()}
    assert {"pilot", "submit", "condor_plugin"} <= files
    assert config["mypy"].getboolean("strict_optional")


def test_the_sources_type_check(tmp_path):
    result = mypy(REPO, tmp_path / "cache")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout


@pytest.mark.parametrize(("module", "code", "error", "found"), [
    # A value that may be None used as if it never were (strict optional).
    ("pilot/agent/policy.py", "def _leaving(p: AgentPolicy) -> str:\n    return p.leaving\n", "return-value",
     'got "str | None", expected "str"'),
    # The wrapper's payload read before the job started (what its _payload property guards).
    ("pilot/wrapper/run.py", "def _pid(w: Wrapper) -> int:\n    return w.payload.pid\n", "union-attr",
     'Item "None" of "Payload | None" has no attribute "pid"'),
    # A plain string where the pipe's Stop wants a number of seconds.
    ("pilot/agent/jobrun.py", 'def _stop() -> m.Stop:\n    return m.Stop(detail="x", deadline_s="soon")\n',
     "arg-type", 'Argument "deadline_s" to "Stop" has incompatible type "str"'),
])
def test_a_type_error_fails_the_build(tmp_path, module, code, error, found):
    copy = tmp_path / "src"
    for package in ("pilot", "splitpilot"):
        shutil.copytree(REPO / package, copy / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(REPO / "setup.cfg", copy / "setup.cfg")
    target = copy / module
    target.write_text(target.read_text() + f"\n\n{code}")
    result = mypy(copy, tmp_path / "cache", "pilot")   # setup.cfg's options; the copy holds pilot only
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{module}:" in result.stdout and f"[{error}]" in result.stdout, result.stdout
    assert found in result.stdout, result.stdout
    assert "Found 1 error in 1 file" in result.stdout, result.stdout
    # The repository itself is untouched: only the copy holds the mistake.
    assert code not in (REPO / module).read_text()
