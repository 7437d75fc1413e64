"""The blocking adapter between real processes, and the wrapper's claim on fd 1."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import sample_job_start

from pilot.pipe import messages as m
from pilot.pipe.channel import PipeChannel, PipeTimeout, spawn_with_channel
from pilot.pipe.errors import PeerClosed, TruncatedFrame, UndecodableMessage, UnsupportedVersion
from pilot.pipe.protocol import ConnectionClosed, Role


def spawn_python(code: str, stderr=subprocess.PIPE):
    return spawn_with_channel([sys.executable, "-c", textwrap.dedent(code)], stderr=stderr)


def finish(process, channel):
    channel.close()
    try:
        process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_loopback_wrapper_runs_a_job_over_real_pipes():
    process, channel = spawn_with_channel([sys.executable, "-m", "pilot.pipe.loopback"],
                                          stderr=subprocess.PIPE)
    try:
        channel.send(m.make_hello("test-agent"))
        job = sample_job_start()
        job.spec.arguments[:] = ["3"]
        channel.send(job)
        ready = channel.expect(m.Ready, timeout=20)
        assert ready.pid == process.pid and "log-chunks" in ready.capabilities
        kinds = []
        while not kinds or kinds[-1] != "Result":
            kinds.append(type(channel.expect(m.StateChange, m.Heartbeat, m.LogChunk, m.Result,
                                             timeout=20)).__name__)
        assert kinds.count("Heartbeat") == 3 and kinds.count("LogChunk") == 3
        assert channel.receive(timeout=20) is ConnectionClosed
    finally:
        finish(process, channel)
    # The loopback prints a greeting with print(): it must be on stderr, not in the stream.
    assert b"greeted by agent 'test-agent'" in process.stderr.read()
    assert process.returncode == 0


def test_stray_output_after_claim_goes_to_stderr_and_children_cannot_reach_the_pipe():
    process, channel = spawn_python("""
        import os, subprocess, sys
        from pilot.pipe import messages as m
        from pilot.pipe.channel import PipeChannel, claim_stdio
        from pilot.pipe.protocol import Role
        r, w = claim_stdio()
        print("python print after claim")
        os.write(1, b"raw write to fd 1\\n")
        # A child that writes to its stdout and tries the protocol fds.
        subprocess.run(["sh", "-c", f"echo child stdout; echo sneaky >&{w} 2>/dev/null || echo fd {w} closed >&2"])
        with PipeChannel(Role.WRAPPER, r, w) as ch:
            ch.send(m.make_ready())
            ch.expect(m.Hello)
    """)
    try:
        channel.send(m.make_hello("a"))
        assert isinstance(channel.expect(m.Ready, timeout=20), m.Ready)
        channel.close_write()
        # Nothing else arrived on the pipe: the next thing is its (probe-clean) end.
        assert channel.receive(timeout=20) is ConnectionClosed
    finally:
        finish(process, channel)
    err = process.stderr.read().decode()
    assert "python print after claim" in err and "raw write to fd 1" in err and "child stdout" in err
    assert "closed" in err  # the protocol fd is close-on-exec: not inherited


def test_wrapper_dying_without_result_is_peer_closed():
    process, channel = spawn_python("""
        import os
        from pilot.pipe import messages as m
        from pilot.pipe.channel import PipeChannel, claim_stdio
        from pilot.pipe.protocol import Role
        ch = PipeChannel(Role.WRAPPER, *claim_stdio())
        ch.send(m.make_ready())
        os._exit(9)
    """)
    try:
        channel.send(m.make_hello("a"))
        channel.expect(m.Ready, timeout=20)
        with pytest.raises(PeerClosed) as err:
            channel.receive(timeout=20)
        assert err.value.state == "GREETED"
    finally:
        finish(process, channel)
    assert process.returncode == 9


def test_wrapper_killed_mid_frame_is_truncated_frame():
    process, channel = spawn_python("""
        import os
        from pilot.pipe import messages as m
        from pilot.pipe.protocol import Connection, Role
        frame = Connection(Role.WRAPPER).send(m.make_ready())
        os.write(1, frame[: len(frame) // 2])
        os._exit(0)
    """)
    try:
        with pytest.raises(TruncatedFrame):
            channel.receive(timeout=20)
    finally:
        finish(process, channel)


def test_payload_text_on_the_pipe_is_undecodable():
    process, channel = spawn_python("""
        print("Welcome to the payload! This is not a frame. " * 3, flush=True)
    """)
    try:
        with pytest.raises((UndecodableMessage, TruncatedFrame)):
            channel.receive(timeout=20)
    finally:
        finish(process, channel)


def test_version_mismatch_between_processes():
    process, channel = spawn_python("""
        from pilot.pipe import messages as m
        from pilot.pipe.channel import PipeChannel, claim_stdio
        from pilot.pipe.protocol import Role
        ch = PipeChannel(Role.WRAPPER, *claim_stdio())
        ch.send(m.Ready(protocol_major=7, protocol_minor=1))
    """)
    try:
        with pytest.raises(UnsupportedVersion) as err:
            channel.receive(timeout=20)
        assert err.value.theirs == (7, 1)
    finally:
        finish(process, channel)


def test_receive_timeout_then_continue():
    process, channel = spawn_python("""
        import sys, time
        from pilot.pipe import messages as m
        from pilot.pipe.channel import PipeChannel, claim_stdio
        from pilot.pipe.protocol import Role
        ch = PipeChannel(Role.WRAPPER, *claim_stdio())
        ch.expect(m.Hello)
        ch.send(m.make_ready())
        ch.expect(m.JobStart)
    """)
    try:
        with pytest.raises(PipeTimeout) as err:
            channel.receive(timeout=0.2)
        assert err.value.seconds == 0.2
        channel.send(m.make_hello("a"))  # the channel is still usable after a timeout
        assert isinstance(channel.expect(m.Ready, timeout=20), m.Ready)
        channel.send(sample_job_start())
        with pytest.raises(PeerClosed):
            channel.receive(timeout=20)  # exits without a Result
    finally:
        finish(process, channel)


def test_sending_to_a_dead_wrapper_is_peer_closed():
    process, channel = spawn_python("import os; os.close(0)")
    try:
        process.wait(timeout=20)
        with pytest.raises(PeerClosed):
            for _ in range(10):
                channel.send(m.make_hello("a") if _ == 0 else m.Ping())
    finally:
        finish(process, channel)


def test_spawned_child_inherits_only_stdio():
    process, channel = spawn_python("""
        import os, sys
        sys.stderr.write(" ".join(sorted(os.listdir("/proc/self/fd"))))
    """)
    try:
        process.wait(timeout=20)
    finally:
        finish(process, channel)
    fds = set(process.stderr.read().decode().split())
    assert fds <= {"0", "1", "2", "3"}  # 3: the listdir handle itself


def test_channel_counts_bytes(tmp_path):
    r, w = os.pipe()
    agent = PipeChannel(Role.AGENT, os.open(os.devnull, os.O_RDONLY), w)
    agent.send(m.make_hello("abc"))
    assert agent.bytes_sent == len(os.read(r, 1000))
    agent.close()
    os.close(r)


def test_send_times_out_when_the_peer_does_not_read():
    process, channel = spawn_python("import time; time.sleep(30)")
    try:
        channel.send(m.make_hello("a"))
        channel.send(sample_job_start())
        big = m.TokenRefresh(token=m.JobToken(certificate_pem=b"c" * (3 << 20)))
        with pytest.raises(PipeTimeout) as err:
            channel.send(big, timeout=0.3)  # 3 MiB cannot fit the pipe: nobody reads
        assert err.value.sending
    finally:
        process.kill()
        finish(process, channel)


def test_expect_after_a_clean_close_names_what_was_expected():
    process, channel = spawn_with_channel([sys.executable, "-m", "pilot.pipe.loopback"],
                                          stderr=subprocess.DEVNULL)
    try:
        channel.send(m.make_hello("a"))
        channel.expect(m.Ready, timeout=20)
        channel.close_write()  # a probe: Hello, Ready, close; the wrapper ends quietly
        with pytest.raises(PeerClosed) as err:
            channel.expect(m.StateChange, timeout=20)
        assert err.value.expected == "StateChange" and "where StateChange was expected" in str(err.value)
    finally:
        finish(process, channel)


def test_frame_buffers_are_kept_on_the_heap_under_glibc():
    from pilot.pipe.memory import keep_frames_on_heap
    assert keep_frames_on_heap() is True  # Debian's glibc has mallopt
    assert keep_frames_on_heap() is True  # idempotent
