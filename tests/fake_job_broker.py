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
  DIR/unavailable.json  {"update_state": N, "get_input": N, "put_output": N, "heartbeat": N}: the next N
                     calls of each raise the client's real BrokerUnavailable (UNAVAILABLE), as a broker
                     restarting would (counted down; every failed call is recorded in DIR/unavailable.log)
  DIR/LOST_INPUT     if present, get_input raises the client's real BrokerError with DATA_LOSS, as a broker
                     whose file store lost (or holds damaged) the content answers
  DIR/FENCED         if present, heartbeat, update_state and put_output raise the client's real
                     PreconditionFailed (FAILED_PRECONDITION), as for an attempt another one replaced
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading

from pilot import logconfig
from pilot.pipe.channel import PipeChannel, claim_stdio
from pilot.pipe.protocol import Role

_FAULTS_LOCK = threading.Lock()


class FakeJobBroker:
    def __init__(self, directory: str) -> None:
        self.dir = directory
        os.makedirs(os.path.join(directory, "outputs"), exist_ok=True)

    def _faults(self, call: str) -> None:
        import grpc

        from pilot.api.client import BrokerUnavailable, PreconditionFailed

        if call != "get_input" and os.path.exists(os.path.join(self.dir, "FENCED")):
            raise PreconditionFailed(call, grpc.StatusCode.FAILED_PRECONDITION,
                                     "job 11: attempt 1 is over (the job is at attempt 2); this wrapper must stop")
        path = os.path.join(self.dir, "unavailable.json")
        with _FAULTS_LOCK:   # the wrapper calls from several threads (reporter, heartbeat, main)
            if not os.path.exists(path):
                return
            with open(path) as handle:
                left = json.load(handle)
            if left.get(call, 0) <= 0:
                return
            left[call] -= 1
            with open(path, "w") as handle:
                json.dump(left, handle)
            with open(os.path.join(self.dir, "unavailable.log"), "a") as handle:
                handle.write(f"{call}\n")
        raise BrokerUnavailable(call, grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses",
                                "127.0.0.1:1")

    def update_state(self, state, detail="", exit_code=None):
        self._faults("update_state")
        with open(os.path.join(self.dir, "states.jsonl"), "a") as handle:
            handle.write(json.dumps({"state": int(state), "detail": detail, "exit_code": exit_code}) + "\n")

    def heartbeat(self, cpu_seconds, rss_bytes, sandbox_bytes):
        self._faults("heartbeat")
        with open(os.path.join(self.dir, "heartbeats"), "a") as handle:
            handle.write(f"{cpu_seconds} {rss_bytes} {sandbox_bytes}\n")
        return os.path.exists(os.path.join(self.dir, "KILL"))

    def get_input(self, name, destination):
        self._faults("get_input")
        if os.path.exists(os.path.join(self.dir, "LOST_INPUT")):
            import grpc

            from pilot.api.base import BrokerError
            raise BrokerError("GetInput", grpc.StatusCode.DATA_LOSS, f"file {name!r}: the content (sha256 ...) is "
                              "no longer in the broker's file store: the broker's fault, not the job's; fix: ...")
        with open(os.path.join(self.dir, "inputs.json")) as handle:
            expected = json.load(handle)[name]
        source = os.path.join(self.dir, "inputs", name)
        with open(source, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
        if digest != expected:
            raise ValueError(f"checksum mismatch for {name}: {digest} != {expected}")
        shutil.copyfile(source, destination)

    def put_output_fd(self, fd, name):
        self._faults("put_output")
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
    """Run a real Wrapper over stdin/stdout with this fake broker (argv[1]: its dir; argv[2]: a log level)."""
    from pilot.wrapper.run import Wrapper, WrapperSettings

    read_fd, write_fd = claim_stdio()
    directory = sys.argv[1]
    logconfig.configure(sys.argv[2] if len(sys.argv) > 2 else "info")   # as pilot.wrapper.cli does, after the claim
    settings = WrapperSettings(tick_s=0.2, broker_heartbeat_s=0.2, default_stop_grace_s=2.0, retry_first_s=0.1,
                               retry_max_s=0.5, fenced_grace_s=1.0)
    with PipeChannel(Role.WRAPPER, read_fd, write_fd) as channel:
        return Wrapper(channel, connect=lambda job: FakeJobBroker(directory), settings=settings).run()


if __name__ == "__main__":
    sys.exit(main())
