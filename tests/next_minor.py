"""A "next minor" of the broker's schemas, made in the test run: what a newer broker or client could
send while staying within the .v1 rules (only additions).

`make_next_minor(folder)` copies proto/ into FOLDER/proto, adds to it (a job state, a JobSpec field, a
JobInfo field, a Match answer of a new kind, an AttemptFailure and a SiteState value, a new RPC), and
generates its Python code into FOLDER/gen (grpc_tools' protoc, as tools/protogen.py does). The generated
package shadows the repository's `splitpilot` for a process whose PYTHONPATH starts with FOLDER/gen:
a newer peer runs in a subprocess, never in the test process (one descriptor pool per process).
"""

from __future__ import annotations

import pathlib
import shutil

REPO = pathlib.Path(__file__).resolve().parent.parent

#: (file, text to find, text to put after it): each an addition a newer minor may make.
ADDITIONS = (
    ("splitpilot/job/v1/job.proto", "  JOB_STATE_FAILED_LIMIT = 14;\n",
     "  // Held by its owner (next minor).\n  JOB_STATE_PAUSED = 15;\n"),
    ("splitpilot/job/v1/job.proto", "  int32 priority = 10;\n",
     "  // Accounting group (next minor).\n  string accounting_group = 11;\n"),
    ("splitpilot/broker/v1/broker.proto", "  string batch_id = 18;\n",
     "  // The queue the job is in (next minor).\n  string queue = 19;\n"),
    ("splitpilot/broker/v1/broker.proto", "    NoMatch no_match = 2;\n",
     "    // Leave after the running jobs (next minor).\n    Drain drain = 3;\n"),
    ("splitpilot/broker/v1/broker.proto", "// Why nothing was matched.\n",
     "// Leave when done (next minor).\nmessage Drain {\n  // Why.\n  string reason = 1;\n}\n\n"),
    ("splitpilot/broker/v1/broker.proto", "  ATTEMPT_FAILURE_AGENT = 5;\n",
     "  // Preempted by a higher-priority job of the same owner (next minor).\n"
     "  ATTEMPT_FAILURE_SELF_PREEMPTED = 6;\n"),
    ("splitpilot/broker/v1/broker.proto", "  SITE_STATE_DISABLED = 3;\n",
     "  // Matches only test jobs (next minor).\n  SITE_STATE_TESTING = 4;\n"),
    ("splitpilot/broker/v1/broker.proto",
     "  rpc DownloadOutput(DownloadOutputRequest) returns (stream DownloadOutputResponse);\n",
     "  // Hold a waiting job (next minor).\n  rpc HoldJob(HoldJobRequest) returns (HoldJobResponse);\n"),
    ("splitpilot/broker/v1/broker.proto", "// Fetch one output of a job.\n",
     "// Hold a job (next minor).\nmessage HoldJobRequest {\n  // The job.\n  uint64 job_id = 1;\n}\n\n"
     "// Answer to HoldJob (next minor).\nmessage HoldJobResponse {}\n\n"),
)


def make_next_minor(folder: pathlib.Path) -> pathlib.Path:
    """Write FOLDER/proto (this version plus ADDITIONS) and FOLDER/gen (its Python code); return FOLDER/gen."""
    from grpc_tools import protoc

    proto = folder / "proto"
    shutil.copytree(REPO / "proto", proto)
    for relative, anchor, addition in ADDITIONS:
        path = proto / relative
        text = path.read_text()
        assert text.count(anchor) == 1, f"{relative}: the anchor {anchor!r} moved; update tests/next_minor.py"
        path.write_text(text.replace(anchor, anchor + addition))
    gen = folder / "gen"
    gen.mkdir()
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    for path in sorted(proto.rglob("*.proto")):
        relative = path.relative_to(proto)
        args = ["protoc", f"-I{proto}", f"-I{include}", f"--python_out={gen}", f"--grpc_python_out={gen}",
                str(relative)]
        assert protoc.main(args) == 0, f"protoc failed on the next minor's {relative}"
    for directory in [gen / "splitpilot", *sorted(p for p in (gen / "splitpilot").rglob("*") if p.is_dir())]:
        (directory / "__init__.py").write_text("")
    return gen
