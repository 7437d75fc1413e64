"""A protocol-only wrapper: speaks the wrapper's side of the pipe, runs nothing.

    python -m pilot.pipe.loopback

It claims stdin/stdout for frames exactly as the real wrapper does, greets
with Ready, and on JobStart plays a job: STARTED, RUNNING, one Heartbeat and
LogChunk per step (the step count is the job's first argument, default 5;
0.05 s apart), SAVING, then Result DONE. It answers Pings, honours Stop
(Result STOPPED) and TokenRefresh, and stops quietly when the agent goes
away. The demo and the tests use it as a real peer process until the job
wrapper proper exists; it also shows that stray prints cannot reach the pipe.
"""

from __future__ import annotations

import sys
import time

from pilot import __version__
from pilot.pipe import messages as m
from pilot.pipe.channel import PipeChannel, PipeTimeout, claim_stdio
from pilot.pipe.protocol import ConnectionClosed, Role, State

STEP_SECONDS = 0.05


def _now_ms() -> int:
    return int(time.time() * 1000)


def _steps(job: m.JobStart) -> int:
    try:
        return max(0, int(job.spec.arguments[0]))
    except (IndexError, ValueError):
        return 5


def run(channel: PipeChannel) -> int:
    channel.send(m.make_ready(("log-chunks", "token-refresh"), f"loopback {__version__}"))
    hello = channel.expect(m.Hello)
    # Stray output: with fd 1 claimed this lands on stderr, never in the stream.
    print(f"loopback: greeted by agent {hello.agent_id!r}")
    job = None
    while job is None:  # Pings may come before the job
        event = channel.receive()
        if event is ConnectionClosed:
            return 0  # a probe: the agent only wanted to see us start
        if isinstance(event, m.Ping):
            channel.send(m.Pong(nonce=event.nonce))
        else:
            job = event
    start = time.monotonic()
    channel.send(m.StateChange(state=m.JobState.JOB_STATE_STARTED, detail="loopback: no inputs",
                               time_unix_ms=_now_ms()))
    channel.send(m.StateChange(state=m.JobState.JOB_STATE_RUNNING, detail="loopback: simulated payload",
                               time_unix_ms=_now_ms()))
    offset = 0
    stopped: m.Stop | None = None
    for step in range(_steps(job)):
        line = f"step {step + 1} of job {job.job_id}\n".encode()
        channel.send_many([
            m.Heartbeat(payload_pid=0, cpu_seconds=0.0, rss_bytes=0, processes=0,
                        wall_seconds=time.monotonic() - start, time_unix_ms=_now_ms()),
            m.LogChunk(stream=m.LogStream.LOG_STREAM_STDOUT, offset=offset, data=line),
        ])
        offset += len(line)
        stopped = _serve(channel, until=time.monotonic() + STEP_SECONDS)
        if stopped is not None or channel.conn.their_state is State.CLOSED:
            break
    if channel.conn.their_state is State.CLOSED and stopped is None:
        return 0  # the agent went away: nobody to report to
    wall = time.monotonic() - start
    if stopped is not None:
        channel.send(m.Result(final_state=m.JobState.JOB_STATE_FAILED_WRAPPER, signal=15,
                              failure_class=m.FailureClass.FAILURE_CLASS_STOPPED,
                              message=f"stopped: {m.StopReason.Name(stopped.reason)} {stopped.detail}",
                              wall_seconds=wall))
    else:
        channel.send(m.StateChange(state=m.JobState.JOB_STATE_SAVING, time_unix_ms=_now_ms()))
        channel.send(m.Result(final_state=m.JobState.JOB_STATE_DONE, exit_code=0,
                              failure_class=m.FailureClass.FAILURE_CLASS_NONE,
                              message="loopback job finished", wall_seconds=wall))
    return 0


def _serve(channel: PipeChannel, until: float) -> m.Stop | None:
    """Answer the agent until UNTIL; return a Stop if one arrives."""
    while (left := until - time.monotonic()) > 0:
        try:
            event = channel.receive(timeout=left)
        except PipeTimeout:
            return None
        if event is ConnectionClosed:
            return None
        if isinstance(event, m.Ping):
            channel.send(m.Pong(nonce=event.nonce))
        elif isinstance(event, m.Stop):
            return event
        # TokenRefresh: a real wrapper swaps its credentials; nothing to do here.
    return None


def main() -> int:
    read_fd, write_fd = claim_stdio()
    with PipeChannel(Role.WRAPPER, read_fd, write_fd) as channel:
        return run(channel)


if __name__ == "__main__":
    sys.exit(main())
