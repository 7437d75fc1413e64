"""Property-based tests: hostile byte streams against both decoders.

Random, truncated, oversize and mutated streams must end in one of the
protocol's own errors, a clean close, or a wait for more data: never another
exception, never a hang, and never an allocation beyond the frame cap.
"""

from __future__ import annotations

import os
import threading
import tracemalloc

from conftest import sample_job_start
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pilot.pipe import messages as m
from pilot.pipe.channel import PipeChannel, PipeTimeout
from pilot.pipe.errors import ProtocolError
from pilot.pipe.framing import encode_frame, encode_varint
from pilot.pipe.protocol import NEED_DATA, Connection, ConnectionClosed, Role

CAP = 64 * 1024
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _stream(role: Role, messages) -> bytes:
    """A valid stream as ROLE would send it."""
    conn = Connection(role)
    if role is Role.WRAPPER:
        conn._job_sent = True  # as if JobStart had been received
    return b"".join(conn.send(msg) for msg in messages)


AGENT_STREAM = _stream(Role.AGENT, [
    m.make_hello("fuzz"), sample_job_start(), m.Ping(nonce=3),
    m.TokenRefresh(token=m.JobToken(certificate_pem=b"C" * 300)), m.Stop(deadline_s=9)])
WRAPPER_STREAM = _stream(Role.WRAPPER, [
    m.make_ready(("x",)), m.StateChange(state=m.JobState.JOB_STATE_RUNNING, detail="d" * 200),
    m.Heartbeat(cpu_seconds=3.5, rss_bytes=2**40), m.LogChunk(data=os.urandom(3000)),
    m.Result(final_state=m.JobState.JOB_STATE_DONE, exit_code=0)])


def drain(receiver: Connection, data: bytes, chunk: int) -> str:
    """Feed DATA in CHUNK-sized reads, then EOF; return how the stream ended."""
    steps = 0
    try:
        for i in range(0, len(data), chunk):
            receiver.receive_data(data[i:i + chunk])
            while receiver.next_event() is not NEED_DATA:
                steps += 1
                assert steps < 10_000, "decoder does not make progress"
        receiver.receive_data(b"")
        while True:
            event = receiver.next_event()
            assert event is not NEED_DATA, "NEED_DATA after end of file: would hang a reader"
            if event is ConnectionClosed:
                return "closed"
            steps += 1
            assert steps < 10_000, "decoder does not make progress"
    except ProtocolError as exc:
        return type(exc).__name__


def receiver_for(sender: Role) -> Connection:
    conn = Connection(sender.peer, max_frame_bytes=CAP)
    if sender is Role.WRAPPER:
        conn._job_sent = True  # let job messages through; the state checks still run
    return conn


@FUZZ
@given(data=st.binary(max_size=4096), chunk=st.integers(1, 4096), sender=st.sampled_from(list(Role)))
def test_random_bytes(data, chunk, sender):
    drain(receiver_for(sender), data, chunk)


@FUZZ
@given(cut=st.integers(0, len(WRAPPER_STREAM)), chunk=st.integers(1, 512), sender=st.sampled_from(list(Role)))
def test_truncated_valid_streams(cut, chunk, sender):
    stream = AGENT_STREAM if sender is Role.AGENT else WRAPPER_STREAM
    outcome = drain(receiver_for(sender), stream[:cut], chunk)
    if cut == len(stream):
        assert outcome == "closed"
    elif cut == 0:
        assert outcome == "PeerClosed"
    else:
        assert outcome in {"TruncatedFrame", "PeerClosed", "closed"}


@FUZZ
@given(
    sender=st.sampled_from(list(Role)),
    edits=st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete"]),
                             st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
    chunk=st.integers(1, 2048),
)
def test_mutated_valid_streams(sender, edits, chunk):
    stream = bytearray(AGENT_STREAM if sender is Role.AGENT else WRAPPER_STREAM)
    for op, pos, value in edits:
        pos %= max(1, len(stream))
        if op == "flip" and stream:
            stream[pos] ^= value or 1
        elif op == "insert":
            stream.insert(pos, value)
        elif stream:
            del stream[pos]
    drain(receiver_for(sender), bytes(stream), chunk)


@FUZZ
@given(size=st.integers(CAP + 1, 2**64 - 1), sender=st.sampled_from(list(Role)), chunk=st.integers(1, 64))
def test_oversize_prefix_refused_without_allocating(size, sender, chunk):
    receiver = receiver_for(sender)
    tracemalloc.start()
    try:
        outcome = drain(receiver, encode_varint(size) + b"\x00" * 256, chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert outcome in {"FrameTooLarge", "UndecodableMessage"}
    assert peak < 64 * 1024, f"peak {peak} bytes allocated for a refused frame"


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(0, CAP), min_size=1, max_size=6))
def test_allocation_bounded_by_cap(sizes):
    """Decoding frames up to the cap never holds much more than one frame and one read."""
    stream = b"".join(encode_frame(m.WrapperMessage(log_chunk=m.LogChunk(data=b"y" * max(0, s - 20)))
                                   .SerializeToString()[:CAP]) for s in sizes)
    receiver = Connection(Role.AGENT, max_frame_bytes=CAP)
    tracemalloc.start()
    try:
        drain(receiver, stream, 16 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * CAP + 64 * 1024


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=20_000))
def test_blocking_channel_never_hangs_on_garbage(data):
    """The real adapter over a real pipe: garbage then EOF ends in an error or a close."""
    to_us_r, to_us_w = os.pipe()
    to_peer_r, to_peer_w = os.pipe()
    writer = threading.Thread(target=_write_and_close, args=(to_us_w, data))
    writer.start()
    channel = PipeChannel(Role.AGENT, to_us_r, to_peer_w, max_frame_bytes=CAP)
    channel.conn._job_sent = True
    try:
        for _ in range(10_000):
            event = channel.receive(timeout=10)
            if event is ConnectionClosed:
                break
        else:
            raise AssertionError("no end after 10,000 events")
    except PipeTimeout:
        raise AssertionError("a reader hung on garbage") from None
    except ProtocolError:
        pass
    finally:
        writer.join()
        channel.close()
        os.close(to_peer_r)


def _write_and_close(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
