"""The layering (docs/architecture.md) is enforced: lint-imports over the sources, with setup.cfg's contracts.

Runs in `make test` (and `make lint`): an import that points up the layers, a node module that reaches for
the broker, the HTCondor bindings or the database, or shipped HTCondor code that reaches for the mini-condor
fails the suite. The contracts are shown to bite: a copy of the sources with one such import is refused,
naming the contract and the offending import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("apps", "broker", "condor_plugin", "submit", "pilot", "splitpilot")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH: the packages under ROOT are the ones analysed, not the installed (editable) ones.
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / "setup.cfg"), "--no-cache"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)


def test_the_sources_keep_every_contract():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "contract", "found"), [
    # The wrapper reaching for the broker server: the container would carry it again.
    ("pilot/wrapper/logs.py", "import broker.server", "The node side (pilot) imports no server",
     "pilot.wrapper.logs -> broker.server"),
    # The node side reaching for the HTCondor bindings.
    ("pilot/pipe/framing.py", "import htcondor2", "The node side (pilot) imports no server", "htcondor2"),
    # The factory (shipped) reaching for the mini-condor (tests only).
    ("condor_plugin/factory/policy.py", "import condor_plugin.testing.minicondor",
     "What the factory and glideins run never imports the mini-condor",
     "condor_plugin.factory.policy -> condor_plugin.testing.minicondor"),
    # The broker reaching up for the CLI root.
    ("broker/store/base.py", "import apps.cli", "Every import points down the layers", "broker.store.base -> apps.cli"),
])
def test_an_import_against_the_layers_fails_the_build(tmp_path, module, line, contract, found):
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(REPO / "setup.cfg", tmp_path / "setup.cfg")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert f"{contract}" in result.stdout.replace("\n", " ") and "BROKEN" in result.stdout
    assert found in result.stdout, result.stdout
    # The repository itself is untouched: only the copy holds the import.
    assert line not in (REPO / module).read_text()
