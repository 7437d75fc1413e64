"""A file-backed stand-in for the broker's job API, for wrapper tests.

The wrapper runs in its own process (it becomes a child subreaper and kills
its descendants, which must not be the test runner's), so this fake records
into files the test reads afterwards:
  DIR/states.jsonl   one {"state", "detail", "exit_code"} per update
  DIR/heartbeats     one line per broker heartbeat
  DIR/KILL           if present, heartbeat() answers "kill"
  DIR/inputs/NAME    the input files served (checksums from DIR/inputs.json)
  DIR/outputs/NAME   uploaded outputs
  DIR/FAIL_UPLOAD    if present, put_output_fd fails
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

from pilot.pipe.channel import PipeChannel, claim_stdio
from pilot.pipe.protocol import Role


class FakeJobBroker:
    def __init__(self, directory: str) -> None:
        self.dir = directory
        os.makedirs(os.path.join(directory, "outputs"), exist_ok=True)

    def update_state(self, state, detail="", exit_code=None):
        with open(os.path.join(self.dir, "states.jsonl"), "a") as handle:
            handle.write(json.dumps({"state": int(state), "detail": detail, "exit_code": exit_code}) + "\n")

    def heartbeat(self, cpu_seconds, rss_bytes, sandbox_bytes):
        with open(os.path.join(self.dir, "heartbeats"), "a") as handle:
            handle.write(f"{cpu_seconds} {rss_bytes} {sandbox_bytes}\n")
        return os.path.exists(os.path.join(self.dir, "KILL"))

    def get_input(self, name, destination):
        with open(os.path.join(self.dir, "inputs.json")) as handle:
            expected = json.load(handle)[name]
        source = os.path.join(self.dir, "inputs", name)
        with open(source, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
        if digest != expected:
            raise ValueError(f"checksum mismatch for {name}: {digest} != {expected}")
        shutil.copyfile(source, destination)

    def put_output_fd(self, fd, name):
        if os.path.exists(os.path.join(self.dir, "FAIL_UPLOAD")):
            raise OSError("storage unavailable")
        target = os.path.join(self.dir, "outputs", name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as out:   # as JobClient does: pread from the start of FD
            offset = 0
            while block := os.pread(fd, 1 << 20, offset):
                out.write(block)
                offset += len(block)

    def replace_token(self, certificate_pem, private_key_pem):
        with open(os.path.join(self.dir, "token-refreshes"), "ab") as handle:
            handle.write(certificate_pem + b"\n")

    def close(self):
        pass


def main() -> int:
    """Run a real Wrapper over stdin/stdout with this fake broker (argv[1]: its dir)."""
    from pilot.wrapper.run import Wrapper, WrapperSettings

    read_fd, write_fd = claim_stdio()
    directory = sys.argv[1]
    settings = WrapperSettings(tick_s=0.2, broker_heartbeat_s=0.2, default_stop_grace_s=2.0)
    with PipeChannel(Role.WRAPPER, read_fd, write_fd) as channel:
        return Wrapper(channel, connect=lambda job: FakeJobBroker(directory), settings=settings).run()


if __name__ == "__main__":
    sys.exit(main())
