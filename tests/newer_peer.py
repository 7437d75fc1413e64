"""A stand-in peer of the *next* minor of the pipe protocol (tests/next_minor.py), in its own process.

It imports the next minor's generated classes (first on PYTHONPATH) and
frames messages itself (a varint length, then the bytes: protobuf's
delimited format), so nothing of this repository's pipe code is involved.
It follows the negotiation rule: the smaller of both minors is used, and a
kind or enum value of a later minor is never sent to an older peer.

    newer_peer.py wrapper REPORT_DIR              stdin/stdout: the agent's pipe
    newer_peer.py agent REPORT JOBSTART -- ARGV   starts ARGV (a wrapper) and talks to it

The wrapper plays the scenario its job is named after: `result` (a
StateChange, a Heartbeat and a LogChunk with new fields and values, then a
Result with a new final state, failure class and termination member) or
`error` (an Error with a new ErrorCode); it writes REPORT_DIR/JOB_ID.json. The agent
plays one job (JobStart with a new field), waits for RUNNING, sends a Stop
with a new StopReason and reads the Result. Both write what they saw and
did to REPORT (JSON).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from splitpilot.job.v1 import job_pb2
from splitpilot.pipe.v1 import pipe_pb2

MINOR = 2
NEW_JOB_STATE, NEW_STOP_REASON, NEW_LOG_STREAM, NEW_FAILURE_CLASS, NEW_ERROR_CODE = 99, 6, 3, 11, 5


def write_frame(fd: int, envelope) -> None:
    body = envelope.SerializeToString()
    size, prefix = len(body), bytearray()
    while True:
        byte = size & 0x7F
        size >>= 7
        prefix.append(byte | (0x80 if size else 0))
        if not size:
            break
    data = bytes(prefix) + body
    while data:
        data = data[os.write(fd, data):]


def _read_exact(fd: int, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = os.read(fd, count - len(data))
        if not chunk:
            raise EOFError("end of file inside a frame")
        data += chunk
    return data


def read_frame(fd: int, envelope_type):
    """The next envelope, or None at a clean end of file."""
    size, shift = 0, 0
    while True:
        byte = os.read(fd, 1)
        if not byte:
            if shift:
                raise EOFError("end of file inside a length prefix")
            return None
        size |= (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            break
    if size > 4 << 20:
        raise ValueError(f"frame of {size} bytes")
    return envelope_type.FromString(_read_exact(fd, size))


def wrapper(report_dir: str) -> int:
    read_fd, write_fd = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    report = {"sent": []}

    def send(**kind):
        write_frame(write_fd, pipe_pb2.WrapperMessage(**kind))
        report["sent"].append(next(iter(kind)))

    send(ready=pipe_pb2.Ready(protocol_major=1, protocol_minor=MINOR, pid=os.getpid(), features=["next"],
                              capabilities=["stop"], software_version="newer peer"))
    hello = read_frame(read_fd, pipe_pb2.AgentMessage).hello
    negotiated = min(MINOR, hello.protocol_minor)
    report.update(agent_minor=hello.protocol_minor, negotiated=negotiated)
    start = read_frame(read_fd, pipe_pb2.AgentMessage)
    report["job_id"] = start.job_start.job_id
    report["scenario"] = scenario = start.job_start.spec.name
    if scenario == "error":
        send(error=pipe_pb2.Error(code=NEW_ERROR_CODE, message="a failure only the next minor can name"))
    else:
        now = int(time.time() * 1000)
        send(state_change=pipe_pb2.StateChange(state=job_pb2.JOB_STATE_STARTED, detail="next", time_unix_ms=now))
        send(state_change=pipe_pb2.StateChange(state=NEW_JOB_STATE, detail="a state of the next minor",
                                               time_unix_ms=now))
        send(heartbeat=pipe_pb2.Heartbeat(payload_pid=1, rss_bytes=1 << 20, gpu_memory_bytes=5 << 30))
        send(log_chunk=pipe_pb2.LogChunk(stream=NEW_LOG_STREAM, data=b"trace line\n"))
        if negotiated >= MINOR:
            send(progress=pipe_pb2.Progress(fraction=0.5))   # only to a peer that knows the kind
        send(result=pipe_pb2.Result(final_state=NEW_JOB_STATE, failure_class=NEW_FAILURE_CLASS,
                                    not_started="a termination of the next minor", message="from the future"))
    os.close(write_fd)
    report["agent_after"] = []
    while (envelope := read_frame(read_fd, pipe_pb2.AgentMessage)) is not None:
        report["agent_after"].append(envelope.WhichOneof("kind"))
    with open(os.path.join(report_dir, f"{report['job_id']}.json"), "w") as handle:
        json.dump(report, handle)
    return 0


def agent(report_path: str, argv: list[str], job_start_bytes: bytes) -> int:
    """Play one job with the wrapper ARGV; JOB_START_BYTES: a JobStart of this repository's schema."""
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    to_wrapper, from_wrapper = process.stdin.fileno(), process.stdout.fileno()
    report = {"received": [], "sent": []}

    def send(**kind):
        write_frame(to_wrapper, pipe_pb2.AgentMessage(**kind))
        report["sent"].append(next(iter(kind)))

    job = pipe_pb2.JobStart.FromString(job_start_bytes)
    job.priority_class = "next-minor field"
    send(hello=pipe_pb2.Hello(protocol_major=1, protocol_minor=MINOR, agent_id="newer-agent", site="NEXT"))
    send(job_start=job)
    ready = read_frame(from_wrapper, pipe_pb2.WrapperMessage).ready
    negotiated = min(MINOR, ready.protocol_minor)
    report.update(wrapper_minor=ready.protocol_minor, negotiated=negotiated)
    result = None
    while result is None:
        envelope = read_frame(from_wrapper, pipe_pb2.WrapperMessage)
        if envelope is None:
            break
        kind = envelope.WhichOneof("kind")
        report["received"].append(kind)
        if kind == "state_change" and envelope.state_change.state == job_pb2.JOB_STATE_RUNNING:
            if negotiated >= MINOR:
                send(drain=pipe_pb2.Drain(within_s=5))   # never to an older wrapper
            send(stop=pipe_pb2.Stop(reason=NEW_STOP_REASON, detail="a reason of the next minor", deadline_s=10))
        elif kind == "result":
            result = envelope.result
    if result is not None:
        report["result"] = {"final_state": result.final_state, "failure_class": result.failure_class,
                            "message": result.message, "termination": result.WhichOneof("termination")}
    process.stdin.close()
    report["wrapper_exit"] = process.wait(timeout=60)
    with open(report_path, "w") as handle:
        json.dump(report, handle)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "wrapper":
        sys.exit(wrapper(sys.argv[2]))
    dash = sys.argv.index("--")
    with open(sys.argv[3], "rb") as job_file:
        sys.exit(agent(sys.argv[2], sys.argv[dash + 1:], job_file.read()))
