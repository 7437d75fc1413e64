"""The schema gate `make test` runs first (scripts/schema-gate.sh): `buf lint` (STANDARD) and `buf breaking`
(FILE) against the release named in proto/BASELINE, whose schemas are committed as a buf image
(proto/baseline/TAG.binpb, made from the tag). The repository passes it, with no git history or tags
(CI may clone shallow); a lint finding, a breaking change and a missing release image each fail it with a
message that names the fix; the committed image is the tag's schemas; the "next minor" the compatibility
tests use (tests/next_minor.py) is a legal minor by buf's rules too.

buf comes from npm into .cache/buf (the gate installs it once: `make test` has run it before pytest).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest
from next_minor import make_next_minor

REPO = pathlib.Path(__file__).resolve().parent.parent
GATE = REPO / "scripts" / "schema-gate.sh"


def gate(root: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(root / "scripts" / "schema-gate.sh"), *args], capture_output=True, text=True,
                          timeout=600, cwd=root)


def buf_binary() -> pathlib.Path:
    """The gate's buf (installed by the gate's first run, which this makes if needed)."""
    version = next(line.split("=", 1)[1] for line in GATE.read_text().splitlines() if line.startswith("BUF_VERSION="))
    binary = REPO / ".cache" / "buf" / version / "node_modules" / ".bin" / "buf"
    if not binary.exists():
        first = gate(REPO)
        assert first.returncode == 0, first.stdout + first.stderr
    return binary


def git(root: pathlib.Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@splitpilot", *args], cwd=root, check=True,
                   capture_output=True, timeout=120)


@pytest.fixture
def scratch_repo(tmp_path) -> pathlib.Path:
    """A git repository with the gate, buf.yaml and proto/ of this one, its release tagged as BASELINE says,
    and this repository's buf cache."""
    buf_binary()
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(GATE, root / "scripts" / "schema-gate.sh")
    shutil.copy2(REPO / "buf.yaml", root / "buf.yaml")
    shutil.copytree(REPO / "proto", root / "proto")
    os.symlink(REPO / ".cache", root / ".cache")
    git(root, "init", "-q")
    git(root, "add", "scripts", "buf.yaml", "proto")
    git(root, "commit", "-q", "-m", "schemas")
    tag = (REPO / "proto" / "BASELINE").read_text().strip()
    git(root, "tag", "-a", tag, "-m", "release")
    return root


def test_the_schemas_pass_the_gate():
    done = gate(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    tag = (REPO / "proto" / "BASELINE").read_text().strip()
    assert f"schema-gate: buf breaking against release {tag} (proto/baseline/{tag}.binpb) (FILE rules)" in done.stdout
    assert done.stdout.rstrip().endswith("schema-gate: ok")


def test_a_breaking_change_fails_the_gate(scratch_repo):
    """A field renumbered in a .v1 schema (old clients would read it as another field)."""
    job = scratch_repo / "proto" / "splitpilot" / "job" / "v1" / "job.proto"
    job.write_text(job.read_text().replace("  int32 priority = 10;", "  int32 priority = 12;"))
    done = gate(scratch_repo)
    assert done.returncode == 1
    assert 'Previously present field "10" with name "priority" on message "JobSpec" was deleted' in done.stdout
    assert "schema-gate: the schemas break compatibility with release proto-v1.0.0" in done.stderr
    assert "fix: only add fields, enum values, messages and RPCs to a .v1 package" in done.stderr


def test_a_lint_finding_fails_the_gate(scratch_repo):
    """An enum whose zero value means something (STANDARD wants COLOR_UNSPECIFIED = 0 first)."""
    job = scratch_repo / "proto" / "splitpilot" / "job" / "v1" / "job.proto"
    job.write_text(job.read_text() + "\n// A colour.\nenum Colour {\n  // Red.\n  RED = 0;\n}\n")
    done = gate(scratch_repo)
    assert done.returncode == 1
    assert 'Enum zero value name "RED" should be suffixed with "_UNSPECIFIED"' in done.stdout, done.stdout
    assert "schema-gate: buf lint failed (above)" in done.stderr


def test_a_missing_release_image_is_named_with_the_fix(scratch_repo):
    (scratch_repo / "proto" / "BASELINE").write_text("proto-v9.9.9\n")
    done = gate(scratch_repo)
    assert done.returncode == 1
    assert ("proto/baseline/proto-v9.9.9.binpb (the schemas of the release proto-v9.9.9 named in proto/BASELINE) "
            "is missing; fix: scripts/schema-gate.sh --make-baseline") in done.stderr


def test_the_gate_needs_no_git_history_or_tags(scratch_repo):
    """What a shallow CI clone without tags has: the files only."""
    shutil.rmtree(scratch_repo / ".git")
    done = gate(scratch_repo)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_committed_release_image_is_the_tags_schemas(scratch_repo):
    """--make-baseline from the tag gives the committed image, byte for byte (buf images are deterministic)."""
    tag = (REPO / "proto" / "BASELINE").read_text().strip()
    if subprocess.run(["git", "rev-parse", "-q", "--verify", f"refs/tags/{tag}"], cwd=REPO,
                      capture_output=True).returncode != 0:
        pytest.skip(f"this clone has no tag {tag} (a shallow clone): the image cannot be compared with it here")
    committed = (REPO / "proto" / "baseline" / f"{tag}.binpb").read_bytes()
    made = subprocess.run(["git", "archive", tag, "proto"], cwd=REPO, capture_output=True, check=True).stdout
    release = scratch_repo / "release"
    release.mkdir()
    subprocess.run(["tar", "-x", "-C", str(release)], input=made, check=True)
    (release / "buf.yaml").write_text("version: v2\nmodules:\n  - path: proto\n")
    built = release / "image.binpb"
    subprocess.run([str(buf_binary()), "build", "-o", str(built)], cwd=release, check=True, timeout=300)
    assert built.read_bytes() == committed


def test_the_next_minor_of_the_tests_is_a_legal_minor(tmp_path):
    """What the compatibility tests call a newer peer's schemas only adds, by buf's own rules."""
    make_next_minor(tmp_path)
    (tmp_path / "buf.yaml").write_text("version: v2\nmodules:\n  - path: proto\nbreaking:\n  use:\n    - FILE\n")
    against = tmp_path / "against"
    against.mkdir()
    shutil.copytree(REPO / "proto", against / "proto")
    (against / "buf.yaml").write_text("version: v2\nmodules:\n  - path: proto\n")
    done = subprocess.run([str(buf_binary()), "breaking", "--against", str(against)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    renumbered = tmp_path / "proto" / "splitpilot" / "job" / "v1" / "job.proto"
    renumbered.write_text(renumbered.read_text().replace("JOB_STATE_PAUSED = 15;", "JOB_STATE_PAUSED = 14;")
                          .replace("JOB_STATE_FAILED_LIMIT = 14;", "JOB_STATE_FAILED_LIMIT = 15;"))
    broken = subprocess.run([str(buf_binary()), "breaking", "--against", str(against)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert broken.returncode != 0 and "JOB_STATE_FAILED_LIMIT" in broken.stdout
