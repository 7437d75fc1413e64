"""The C++ frame reader of docs/protocol.md, compiled from the page itself and fed hostile streams.

Its first version called an 11-byte length prefix a clean end of file (the prefix read failed with
nothing consumed) and read a prefix of 2^32 + 4 as a 4-byte frame (32 bits). `make test` installs g++
and libprotobuf-dev (scripts/install-system-deps.sh): missing tools fail this test, never skip it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pilot.pipe import messages as m
from pilot.pipe.framing import encode_varint

REPO = Path(__file__).resolve().parent.parent

MAIN = r"""
#include <cstdio>
int main() {
  pb::io::FileInputStream from(0);
  splitpilot::pipe::v1::WrapperMessage msg;
  int frames = 0;
  bool clean_eof = false;
  while (true) {
    msg.Clear();
    if (!ReadFrame(&from, &msg, &clean_eof)) break;
    frames++;
  }
  std::printf("%d %s\n", frames, clean_eof ? "clean" : "error");
  return 0;
}
"""


@pytest.fixture(scope="module")
def reader(tmp_path_factory) -> Path:
    for tool in ("g++", "protoc", "pkg-config"):
        assert shutil.which(tool), f"{tool} is missing; fix: run scripts/install-system-deps.sh (make test does)"
    page = (REPO / "docs" / "protocol.md").read_text()
    blocks = re.findall(r"```cpp\n(.*?)```", page, flags=re.S)
    (code,) = [b for b in blocks if "bool ReadFrame(" in b]
    work = tmp_path_factory.mktemp("cpp-reader")
    gen = work / "gen"
    gen.mkdir()
    subprocess.run(["protoc", f"-I{REPO / 'proto'}", f"--cpp_out={gen}", "splitpilot/job/v1/job.proto",
                    "splitpilot/pipe/v1/pipe.proto"], check=True, timeout=120)
    (work / "reader.cc").write_text(code + MAIN)
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "protobuf"], capture_output=True, text=True)
    assert flags.returncode == 0, "libprotobuf-dev is missing; fix: run scripts/install-system-deps.sh"
    result = subprocess.run(["g++", "-std=c++17", "-O0", f"-I{gen}", str(work / "reader.cc"),
                             str(gen / "splitpilot/pipe/v1/pipe.pb.cc"), str(gen / "splitpilot/job/v1/job.pb.cc"),
                             *flags.stdout.split(), "-o", str(work / "reader")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "reader"


PONG = m.WrapperMessage(pong=m.Pong(nonce=7)).SerializeToString()


@pytest.mark.parametrize("stream,expected", [
    (b"", "0 clean"),
    (encode_varint(len(PONG)) + PONG + encode_varint(len(PONG)) + PONG, "2 clean"),
    (bytes([0x80 | len(PONG)] + [0x80] * 8 + [0x00]) + PONG, "1 clean"),     # a 10-byte prefix of 4: accepted
    (bytes([0x80 | len(PONG)] + [0x80] * 9 + [0x00]) + PONG, "0 error"),     # 11 bytes: an error, not an end
    (bytes([0x84]), "0 error"),                                             # a prefix cut short
    (encode_varint((1 << 32) + len(PONG)) + PONG, "0 error"),               # over the cap, not 4 in 32 bits
    (encode_varint((4 << 20) + 1), "0 error"),                              # over the cap
    (encode_varint(len(PONG)) + PONG[:2], "0 error"),                       # a truncated frame
], ids=["empty", "two frames", "10-byte prefix", "11-byte prefix", "cut prefix", "2^32+4", "over cap",
        "truncated"])
def test_the_documented_cpp_reader(reader, stream, expected):
    result = subprocess.run([str(reader)], input=stream, capture_output=True, timeout=60)
    assert result.returncode == 0 and result.stdout.decode().strip() == expected, result
