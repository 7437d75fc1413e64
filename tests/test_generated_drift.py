"""The committed generated code equals a fresh run of the pinned generator."""

from __future__ import annotations

import filecmp
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def _files(root: pathlib.Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_generated_code_has_not_drifted(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "protogen.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    fresh, committed = tmp_path / "splitpilot", REPO / "splitpilot"
    assert _files(fresh) == _files(committed), (
        "generated files differ from proto/: run `make proto` and commit splitpilot/")
    changed = [name for name in sorted(_files(fresh)) if not filecmp.cmp(fresh / name, committed / name, shallow=False)]
    assert not changed, f"stale generated code {changed}: run `make proto` and commit splitpilot/"


def test_every_proto_declares_foreign_language_options():
    for proto in (REPO / "proto").rglob("*.proto"):
        text = proto.read_text()
        for option in ("java_package", "java_multiple_files", "go_package"):
            assert f"option {option}" in text, f"{proto} lacks option {option}"


def test_every_message_field_and_enum_value_is_commented():
    """The schemas are a public product: no undocumented field."""
    undocumented = []
    for proto in (REPO / "proto").rglob("*.proto"):
        lines = proto.read_text().splitlines()
        for number, line in enumerate(lines):
            stripped = line.strip()
            is_field = stripped.endswith(";") and "=" in stripped and not stripped.startswith(("option", "syntax"))
            is_decl = stripped.startswith(("message ", "enum ", "oneof ")) or is_field
            if is_decl and not lines[number - 1].strip().startswith("//"):
                undocumented.append(f"{proto.name}:{number + 1}: {stripped}")
    assert not undocumented, "\n".join(undocumented)
