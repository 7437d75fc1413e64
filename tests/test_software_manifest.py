"""The software area's manifest (pilot.launch.manifest): every way a payload could change what a later
wrapper runs is seen, by content at the agent's start and by stat before each wrapper."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pilot.agent import exitcodes
from pilot.launch import build_software_area
from pilot.launch.manifest import (
    MANIFEST_NAME,
    ManifestError,
    SoftwareAreaChanged,
    SoftwareGuard,
    write_manifest,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_software_area(tmp_path_factory.mktemp("area") / "sw")


@pytest.fixture
def area(tmp_path) -> Path:
    """A small area with the shape of a real one."""
    root = tmp_path / "sw"
    (root / "lib" / "python" / "pilot" / "wrapper").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "setup.sh").write_text("export PATH=...\n")
    (root / "lib" / "python" / "pilot" / "wrapper" / "run.py").write_text("print('wrapper')\n")
    (root / "lib" / "python" / "pilot" / "__init__.py").write_text("")
    (root / "bin" / "tool").symlink_to("../setup.sh")
    write_manifest(root)
    return root


def changed(guard: SoftwareGuard) -> SoftwareAreaChanged:
    with pytest.raises(SoftwareAreaChanged) as info:
        guard.check()
    return info.value


def test_a_built_area_has_a_manifest_that_verifies(built):
    manifest = json.loads((built / MANIFEST_NAME).read_text())
    entries = manifest["entries"]
    assert entries["setup.sh"]["type"] == "file" and len(entries["setup.sh"]["sha256"]) == 64
    assert entries["lib/python/pilot/wrapper/run.py"]["mode"] == 0o644
    guard = SoftwareGuard.verify(built)
    assert guard.entries == len(entries) + 1      # + the manifest itself (stat-checked, not listed in itself)
    started = time.monotonic()
    guard.check()
    print(f"{guard.entries} entries stat-checked in {1000 * (time.monotonic() - started):.1f} ms")


def test_patching_a_file_is_seen_before_the_next_wrapper(area):
    guard = SoftwareGuard.verify(area)
    with open(area / "lib/python/pilot/wrapper/run.py", "a") as handle:
        handle.write("import os; os.system('steal the token')\n")
    error = changed(guard)
    assert error.path == "lib/python/pilot/wrapper/run.py" and error.what.startswith("was modified")
    assert error.exit_code == exitcodes.SOFTWARE_CHANGED == 6
    assert "fix:" in str(error).lower()


def test_patching_then_restoring_size_and_mtime_is_still_seen(area):
    """ctime cannot be set back by an unprivileged process: same length, old mtime, still caught."""
    target = area / "lib/python/pilot/wrapper/run.py"
    before = target.stat()
    guard = SoftwareGuard.verify(area)
    target.write_text("print('WRAPPER')\n")          # same length
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert target.stat().st_size == before.st_size and target.stat().st_mtime_ns == before.st_mtime_ns
    assert "ctime_ns" in changed(guard).what


def test_replacing_adding_removing_and_chmod_are_seen(area):
    run_py = area / "lib/python/pilot/wrapper/run.py"
    guard = SoftwareGuard.verify(area)
    (area / "lib/python/pilot/wrapper/evil.py").write_text("x = 1\n")      # a new module next to run.py
    assert changed(guard).path == "lib/python/pilot/wrapper"
    os.unlink(area / "lib/python/pilot/wrapper/evil.py")

    guard = SoftwareGuard.verify(area)
    replacement = area / "run.py.new"
    replacement.write_text(run_py.read_text())
    os.replace(replacement, run_py)                                         # same content, new inode
    error = changed(guard)
    assert error.path in ("lib/python/pilot/wrapper/run.py", ".")

    write_manifest(area)
    guard = SoftwareGuard.verify(area)
    os.chmod(area / "setup.sh", 0o777)
    assert changed(guard).path == "setup.sh"

    write_manifest(area)
    guard = SoftwareGuard.verify(area)
    os.unlink(area / "bin" / "tool")
    assert changed(guard).path in ("bin", "bin/tool")


def test_start_verification_compares_content_with_the_manifest(area):
    """A change made before the agent starts (an earlier agent's job) is caught by content."""
    (area / "setup.sh").write_text("export PATH=/tmp/evil:$PATH\n")
    with pytest.raises(SoftwareAreaChanged, match="setup.sh differs from the manifest"):
        SoftwareGuard.verify(area)
    write_manifest(area)
    (area / "sitecustomize.py").write_text("import os\n")
    with pytest.raises(SoftwareAreaChanged, match="sitecustomize.py is not in the manifest"):
        SoftwareGuard.verify(area)
    os.unlink(area / "sitecustomize.py")
    os.unlink(area / "lib/python/pilot/__init__.py")
    with pytest.raises(SoftwareAreaChanged, match="lib/python/pilot/__init__.py is missing"):
        SoftwareGuard.verify(area)


def test_an_area_without_a_usable_manifest_is_a_configuration_error(area):
    (area / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="unusable") as info:
        SoftwareGuard.verify(area)
    assert info.value.exit_code == 2
    os.unlink(area / MANIFEST_NAME)
    with pytest.raises(ManifestError, match="has no readable manifest.*fix: rebuild"):
        SoftwareGuard.verify(area)
    os.symlink("/etc/passwd", area / MANIFEST_NAME)    # never followed
    with pytest.raises(ManifestError):
        SoftwareGuard.verify(area)


def test_the_agent_rebuilds_its_own_area_when_it_changed(tmp_path):
    """An earlier agent's job patched the area in the shared work dir: a new agent does not take it."""
    from pilot.agent.cli import _software_area

    work = tmp_path / "work"
    work.mkdir()
    area = Path(_software_area(str(work)))
    run_py = area / "lib/python/pilot/wrapper/run.py"
    original = run_py.read_bytes()
    with open(run_py, "ab") as handle:
        handle.write(b"\nopen('/tmp/pwned', 'w')\n")
    again = Path(_software_area(str(work)))
    assert again == area and run_py.read_bytes() == original
    SoftwareGuard.verify(again)


def test_the_area_holds_the_node_side_only(built):
    """A job can read the software area: it holds pilot/ and splitpilot/ (and their runtime), never the
    broker server, the CA, the HTCondor side or the CLI root. Its Python finds the API client and not the
    server, whatever the host has installed (-S: no site packages, as inside an image)."""
    import subprocess
    import sys

    lib = built / "lib" / "python"
    assert {"pilot", "splitpilot"} <= {p.name for p in lib.iterdir()}
    assert not any((lib / name).exists() for name in ("broker", "condor_plugin", "submit", "apps"))
    assert not (lib / "pilot" / "tokens" / "ca.py").exists()
    probe = ("import importlib.util as u, pilot.api.client; "
             "print([n for n in ('broker', 'condor_plugin', 'submit', 'apps') if u.find_spec(n)])")
    result = subprocess.run([sys.executable, "-S", "-c", probe], env={"PYTHONPATH": str(lib), "PATH": "/usr/bin"},
                            capture_output=True, text=True, timeout=60, cwd=built)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

