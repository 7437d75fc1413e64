"""A "next minor" of the pipe schemas, made in the test run: what a newer peer would speak.

`generate(dest)` copies proto/ into DEST/proto with additions of every kind
a later minor may make (pilot.pipe.messages.MINORS explains the rules):

- new fields: Hello.site, Ready.features, JobStart.priority_class,
  Heartbeat.gpu_memory_bytes;
- new enum values: JobState 99 (JOB_STATE_NEXT_MINOR), StopReason 6,
  LogStream 3, FailureClass 11, ErrorCode 5;
- a new oneof member: Result.termination gains `not_started`;
- new message kinds: AgentMessage.drain (Drain) and WrapperMessage.progress
  (Progress);

then compiles them with grpcio-tools into DEST/gen (a package tree of its
own: a stand-in peer runs with it first on PYTHONPATH, in its own process,
since one process cannot load two versions of the same .proto file).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NEXT_MINOR = 2   # one above pilot.pipe.messages.PROTOCOL_VERSION's minor (checked by the tests)

#: What the next minor adds, for the stand-ins and the tests to refer to.
NEW_JOB_STATE = 99
NEW_STOP_REASON = 6
NEW_LOG_STREAM = 3
NEW_FAILURE_CLASS = 11
NEW_ERROR_CODE = 5


def _into_block(text: str, opening: str, addition: str) -> str:
    """Insert ADDITION before the closing brace of the block that starts with OPENING (a unique line)."""
    start = text.index(opening)
    depth, index = 0, text.index("{", start)
    while True:
        char = text[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                break
        index += 1
    line_start = text.rindex("\n", 0, index) + 1
    return text[:line_start] + addition + text[line_start:]


def _next_number(text: str, header: str) -> int:
    """One more than the highest field number of the (unnested) message HEADER opens."""
    start = text.index(header)
    body = text[start:text.index("\n}", start)]
    return 1 + max(int(n) for n in re.findall(r"= (\d+);", body))


def _next_pipe(text: str) -> str:
    text = _into_block(text, "message AgentMessage {", "")  # checks it exists
    text = re.sub(r"(message AgentMessage \{.*?oneof kind \{.*?)(\n  \})",
                  r"\1\n    // next minor: a new kind.\n    Drain drain = 6;\2", text, count=1, flags=re.S)
    text = re.sub(r"(message WrapperMessage \{.*?oneof kind \{.*?)(\n  \})",
                  r"\1\n    // next minor: a new kind.\n    Progress progress = 8;\2", text, count=1, flags=re.S)
    text = re.sub(r"(message Result \{.*?oneof termination \{.*?)(\n  \})",
                  r"\1\n    // next minor: a new member.\n    string not_started = 10;\2", text, count=1, flags=re.S)
    for header, field in (("message Hello {", "string site"), ("message Ready {", "repeated string features"),
                          ("message JobStart {", "string priority_class"),
                          ("message Heartbeat {", "uint64 gpu_memory_bytes")):
        # The next free number: fields this minor adds must not make the next one's collide.
        text = _into_block(text, header, f"  // next minor.\n  {field} = {_next_number(text, header)};\n")
    text = _into_block(text, "enum StopReason {", f"  // next minor.\n  STOP_REASON_NEXT = {NEW_STOP_REASON};\n")
    text = _into_block(text, "enum LogStream {", f"  // next minor.\n  LOG_STREAM_TRACE = {NEW_LOG_STREAM};\n")
    text = _into_block(text, "enum FailureClass {",
                       f"  // next minor.\n  FAILURE_CLASS_NEXT = {NEW_FAILURE_CLASS};\n")
    text = _into_block(text, "enum ErrorCode {", f"  // next minor.\n  ERROR_CODE_NEXT = {NEW_ERROR_CODE};\n")
    text += ("\n// next minor: agent -> wrapper.\nmessage Drain {\n  // Seconds.\n  uint32 within_s = 1;\n}\n"
             "\n// next minor: wrapper -> agent.\nmessage Progress {\n  // 0..1.\n  double fraction = 1;\n}\n")
    for added in ("Drain drain = 6;", "Progress progress = 8;", "string not_started = 10;"):
        assert added in text, f"the next minor could not add {added!r}: pipe.proto changed shape"
    return text


def _next_job(text: str) -> str:
    return _into_block(text, "enum JobState {", f"  // next minor.\n  JOB_STATE_NEXT_MINOR = {NEW_JOB_STATE};\n")


def generate(dest: Path) -> Path:
    """Write the next minor's schemas under DEST/proto and their Python code under DEST/gen; return DEST/gen."""
    proto, gen = dest / "proto", dest / "gen"
    for name, change in (("splitpilot/pipe/v1/pipe.proto", _next_pipe), ("splitpilot/job/v1/job.proto", _next_job)):
        target = proto / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(change((REPO / "proto" / name).read_text()))
    gen.mkdir(parents=True)
    result = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{proto}", f"--python_out={gen}",
                             "splitpilot/job/v1/job.proto", "splitpilot/pipe/v1/pipe.proto"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for package in ("splitpilot", "splitpilot/job", "splitpilot/job/v1", "splitpilot/pipe", "splitpilot/pipe/v1"):
        (gen / package / "__init__.py").touch()
    return gen
