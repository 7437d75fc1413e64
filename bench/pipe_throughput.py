#!/usr/bin/env python3
"""Pipe throughput between two real processes: raw os.pipe vs our framing.

    python bench/pipe_throughput.py [--quick]

One run measures, each against a child process over its stdin/stdout:
  1. raw pipe bandwidth with 64 KiB writes (the baseline);
  2. heartbeat-sized frames one way (wrapper -> agent), through the full
     protocol stack on both ends (Connection state checks included);
  3. Ping/Pong request/response round trips (p50, p90, p99);
  4. 1 MiB LogChunk frames one way, as a fraction of the raw bandwidth.
Each figure is the median of several repetitions. Targets (issue 2):
>= 200,000 frames/s, p50 round trip <= 100 us, LogChunk >= 50% of raw.
The last line is `pipe_frames_per_s: N`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pilot.pipe import messages as m  # noqa: E402
from pilot.pipe.channel import PipeChannel, claim_stdio, spawn_with_channel  # noqa: E402
from pilot.pipe.protocol import Role  # noqa: E402

CHUNK = 64 * 1024
MIB = 1024 * 1024


def heartbeat() -> m.Heartbeat:
    # Realistic values: varints of full width, doubles, a timestamp.
    return m.Heartbeat(payload_pid=123456, cpu_seconds=12345.678, rss_bytes=1_234_567_890,
                       sandbox_bytes=9_876_543_210, wall_seconds=23456.789, processes=17,
                       time_unix_ms=int(time.time() * 1000))


# ------------------------------------------------------------------ child side

def peer_main(mode: str) -> int:
    read_fd, write_fd = claim_stdio()
    if mode == "raw":
        os.read(read_fd, 1)  # start signal
        total = int(os.read(read_fd, 64).decode())
        block = b"x" * CHUNK
        view = memoryview(block)
        sent = 0
        while sent < total:
            sent += os.write(write_fd, view[: min(CHUNK, total - sent)])
        os.close(write_fd)
        return 0
    if mode == "raw-pong":  # the round-trip baseline: one byte each way, no framing
        while os.read(read_fd, 1):
            os.write(write_fd, b"p")
        return 0
    channel = PipeChannel(Role.WRAPPER, read_fd, write_fd)
    channel.send(m.make_ready())
    channel.expect(m.Hello)
    if mode == "pong":
        while True:
            event = channel.receive()
            if not isinstance(event, m.Ping):
                return 0
            channel.send(m.Pong(nonce=event.nonce))
    job = channel.expect(m.JobStart)
    count = int(job.spec.arguments[0])
    batch = int(job.spec.arguments[1])
    if mode == "heartbeats":
        frame = heartbeat()
        if batch == 1:
            send = channel.send
            for _ in range(count):
                send(frame)
        else:
            full, rest = divmod(count, batch)
            for _ in range(full):
                channel.send_many([frame] * batch)
            channel.send_many([frame] * rest)
    elif mode == "logchunks":  # the wrapper's bulk path: no copy of the chunk in Python
        data = os.urandom(MIB)
        for i in range(count):
            channel.send_log_chunk(data, stream=m.LogStream.LOG_STREAM_STDOUT, offset=i * MIB)
    elif mode == "logchunk-messages":  # the same through LogChunk objects (two more copies)
        data = os.urandom(MIB)
        for i in range(count):
            channel.send(m.LogChunk(stream=m.LogStream.LOG_STREAM_STDOUT, offset=i * MIB, data=data))
    channel.send(m.Result(final_state=m.JobState.JOB_STATE_DONE))
    channel.close()
    return 0


# ----------------------------------------------------------------- parent side

def spawn(mode: str) -> tuple[subprocess.Popen, PipeChannel]:
    return spawn_with_channel([sys.executable, os.path.abspath(__file__), "--peer", mode])


def finish(process: subprocess.Popen, channel: PipeChannel) -> None:
    channel.close()
    if process.wait(timeout=60) != 0:
        raise SystemExit(f"peer exited with {process.returncode}")


def raw_bandwidth(total: int) -> float:
    process, channel = spawn("raw")
    rfd = channel.read_fd
    time.sleep(0.2)  # let the child import and block on its start signal
    start = time.perf_counter()
    os.write(channel.write_fd, b"s" + str(total).encode())
    received = 0
    while chunk := os.read(rfd, CHUNK):
        received += len(chunk)
    elapsed = time.perf_counter() - start
    finish(process, channel)
    assert received == total, (received, total)
    return total / elapsed


def agent_channel(mode: str) -> tuple[subprocess.Popen, PipeChannel]:
    process, channel = spawn(mode)
    channel.send(m.make_hello("bench"))
    channel.expect(m.Ready, timeout=30)
    return process, channel


def one_way(mode: str, count: int, batch: int = 1) -> tuple[float, int]:
    """Messages per second from JobStart to Result, and bytes received."""
    process, channel = agent_channel(mode)
    time.sleep(0.1)
    start = time.perf_counter()
    channel.send(m.JobStart(job_id=1, attempt=1, spec=m.JobSpec(arguments=[str(count), str(batch)])))
    received = 0
    receive = channel.receive
    while True:
        event = receive()
        if isinstance(event, m.Result):
            break
        received += 1
    elapsed = time.perf_counter() - start
    finish(process, channel)
    assert received == count, (received, count)
    return count / elapsed, channel.bytes_received


def round_trips(count: int) -> list[float]:
    process, channel = agent_channel("pong")
    samples = []
    ping = m.Ping
    for nonce in range(count + 200):
        t0 = time.perf_counter()
        channel.send(ping(nonce=nonce))
        channel.receive()
        samples.append(time.perf_counter() - t0)
    finish(process, channel)
    return samples[200:]  # the first round trips warm caches up


def raw_round_trips(count: int) -> list[float]:
    process, channel = spawn("raw-pong")
    rfd, wfd = channel.read_fd, channel.write_fd
    samples = []
    for _ in range(count + 200):
        t0 = time.perf_counter()
        os.write(wfd, b"q")
        os.read(rfd, 1)
        samples.append(time.perf_counter() - t0)
    finish(process, channel)
    return samples[200:]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    args = parser.parse_args()
    if args.peer:
        return peer_main(args.peer)

    reps = 2 if args.quick else 5
    scale = 4 if args.quick else 1
    raw_total = 512 * MIB // scale
    frames = 400_000 // scale
    chunks = 512 // scale

    print(f"pipe_throughput: {reps} repetitions each, medians reported", file=sys.stderr)
    raw = statistics.median(raw_bandwidth(raw_total) for _ in range(reps))
    print(f"raw pipe, 64 KiB writes:        {raw / 1e9:8.3f} GB/s")

    sample = m.WrapperMessage(heartbeat=heartbeat()).ByteSize()
    single = [one_way("heartbeats", frames) for _ in range(reps)]
    fps = statistics.median(r[0] for r in single)
    print(f"heartbeat frames ({sample} B), one write each: {fps:10,.0f} frames/s")
    batched = statistics.median(one_way("heartbeats", frames, batch=64)[0] for _ in range(reps))
    print(f"heartbeat frames, 64 per write:  {batched:10,.0f} frames/s")

    raw_rtts = raw_round_trips(20_000 // scale)
    raw_p50 = percentile(raw_rtts, 0.5) * 1e6
    print(f"raw 1-byte round trip:          p50 {raw_p50:6.1f} us  p90 {percentile(raw_rtts, 0.9) * 1e6:6.1f} us")
    rtts = round_trips(20_000 // scale)
    p50, p90, p99 = (percentile(rtts, q) * 1e6 for q in (0.5, 0.9, 0.99))
    print(f"ping/pong round trip:           p50 {p50:6.1f} us  p90 {p90:6.1f} us  p99 {p99:6.1f} us"
          f"  ({p50 / raw_p50:.2f}x the raw round trip)")

    log_bw = statistics.median(one_way("logchunks", chunks)[0] * MIB for _ in range(reps))
    print(f"1 MiB LogChunk frames:          {log_bw / 1e9:8.3f} GB/s = {log_bw / raw:.0%} of raw"
          " (send_log_chunk, the wrapper's path)")
    obj_bw = statistics.median(one_way("logchunk-messages", chunks)[0] * MIB for _ in range(reps))
    print(f"1 MiB LogChunk messages:        {obj_bw / 1e9:8.3f} GB/s = {obj_bw / raw:.0%} of raw"
          " (send(LogChunk(...)): copies in and out of the message)")

    print(f"targets: frames/s >= 200,000 ({fps / 200_000:.2f}x), rtt p50 <= 100 us ({p50:.0f} us), "
          f"LogChunk >= 50% of raw ({log_bw / raw:.0%})")
    print(f"pipe_frames_per_s: {fps:.0f} frames/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
