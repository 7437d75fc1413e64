"""Blocking I/O adapter: a protocol Connection over a pair of pipe fds.

The agent uses it on the wrapper's stdin/stdout; the wrapper on its own
(after `claim_stdio`, so that fd 1 carries frames only). Reads are bounded
(64 KiB at a time) so that, with the decoder's cap, no peer can make this
side buffer more than one frame plus one read.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Final

from pilot.pipe.errors import PeerClosed, ProtocolError, UnexpectedMessage
from pilot.pipe.framing import DEFAULT_MAX_FRAME_BYTES
from pilot.pipe.memory import keep_frames_on_heap
from pilot.pipe.protocol import NEED_DATA, Connection, ConnectionClosed, Role

#: Frame kinds and sizes at DEBUG (`pipe: ...`); never a message's content.
log = logging.getLogger("splitpilot.pipe")

if TYPE_CHECKING:
    from pilot.pipe.messages import LogStream

READ_SIZE = 64 * 1024

# Messages at least this large are written with writev(header, body) rather
# than joined into one buffer first (a copy that costs more than the extra
# system call only for large frames).
_WRITEV_FROM = 32 * 1024

#: Capacity asked for the two pipes of a spawned wrapper. Linux's default,
#: 64 KiB, makes a 1 MiB LogChunk cost 16 sleep/wake-up rounds between the
#: two processes. Larger pipes count against the user's pipe-user-pages-soft
#: budget (64 MiB by default, shared by every process of the glidein's user,
#: payloads included), so this stays moderate.
PIPE_SIZE = 256 * 1024


class PipeTimeout(ProtocolError):
    """The peer did not send (or read) a complete message in time.

    Attributes:
        seconds: the timeout that expired.
        sending: True when our write timed out, False when our read did.
    """

    def __init__(self, seconds: float, *, sending: bool = False) -> None:
        if sending:
            what = f"the peer did not read our message within {seconds:g} s"
        else:
            what = f"no message from the peer within {seconds:g} s"
        super().__init__(f"{what} (is it hung?)")
        self.seconds = seconds
        self.sending = sending


class _Woken:
    def __repr__(self) -> str:
        return "WOKEN"


#: receive(wake_fd=...): the wake descriptor became readable before a message arrived (the
#: caller has something else to do, e.g. send a Stop; it drains the descriptor itself).
WOKEN: Final = _Woken()


class PipeChannel:
    """Send and receive protocol messages over two file descriptors.

    The channel owns the fds and closes them in `close()` (or on leaving a
    `with` block). Creating one tunes this process's malloc for frame-sized
    buffers (see pilot.pipe.memory).
    """

    def __init__(self, role: Role, read_fd: int, write_fd: int, *,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        keep_frames_on_heap(max_frame_bytes)
        self.conn = Connection(role, max_frame_bytes=max_frame_bytes)
        self.read_fd = read_fd
        self.write_fd = write_fd
        # Traffic counters, for progress displays and benchmarks.
        self.bytes_sent = 0
        self.bytes_received = 0

    def __enter__(self) -> PipeChannel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------ sending

    def send(self, message, timeout: float | None = None) -> None:
        """Send one message.

        Raises PeerClosed if the peer's end is gone, and PipeTimeout if the
        peer does not read it within TIMEOUT seconds (None: wait for ever).
        """
        header, body = self.conn.send_parts(message)
        if log.isEnabledFor(logging.DEBUG):   # the kind and size only: JobStart and TokenRefresh carry tokens
            log.debug(f"{self.conn.role.value} sends {type(message).__name__} ({len(header) + len(body)} B)")
        if len(body) < _WRITEV_FROM or timeout is not None:
            self._write(header + body, timeout)
        else:
            self._write_large(header, body)

    def send_log_chunk(self, data: bytes, *, stream: LogStream, offset: int,
                       skipped_before: bool = False) -> None:
        """Send a LogChunk of DATA without copying it (the bulk path)."""
        header, body = self.conn.send_log_chunk(data, stream=stream, offset=offset,
                                                skipped_before=skipped_before)
        if len(body) < _WRITEV_FROM:
            self._write(header + body, None)
        else:
            self._write_large(header, body)

    def send_many(self, batch, timeout: float | None = None) -> None:
        """Send several messages with one write (fewer system calls)."""
        self._write(self.conn.send_many(batch), timeout)

    def _write(self, data: bytes, timeout: float | None) -> None:
        self.bytes_sent += len(data)
        view = memoryview(data)
        try:
            if timeout is None:
                while view:
                    view = view[os.write(self.write_fd, view):]
                return
            # select() reports a pipe writable when PIPE_BUF bytes fit, and a
            # write of at most PIPE_BUF then never blocks: so the deadline
            # holds without making the shared fd non-blocking.
            deadline = time.monotonic() + timeout
            while view:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([], [self.write_fd], [], left)[1]:
                    raise PipeTimeout(timeout, sending=True)
                view = view[os.write(self.write_fd, view[:select.PIPE_BUF]):]
        except BrokenPipeError:
            raise PeerClosed(self.conn.their_state.value) from None

    def _write_large(self, header: bytes, body: bytes) -> None:
        """Write header and body with one writev(), without joining them."""
        self.bytes_sent += len(header) + len(body)
        try:
            written = os.writev(self.write_fd, (header, body))
            if written < len(header):
                rest = memoryview(header + body)[written:]
            else:
                rest = memoryview(body)[written - len(header):]
            while rest:
                rest = rest[os.write(self.write_fd, rest):]
        except BrokenPipeError:
            raise PeerClosed(self.conn.their_state.value) from None

    def close_write(self) -> None:
        """End our stream (the peer sees a clean end of file)."""
        if self.write_fd >= 0:
            self.conn.send_eof()
            os.close(self.write_fd)
            self.write_fd = -1

    def close(self) -> None:
        self.close_write()
        if self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1

    # ---------------------------------------------------------- receiving

    def receive(self, timeout: float | None = None, *, wake_fd: int | None = None):
        """Return the peer's next message, or ConnectionClosed at a clean end.

        Raises PipeTimeout when TIMEOUT seconds pass without a full message,
        and the protocol's errors for anything the peer gets wrong. With
        WAKE_FD, returns WOKEN as soon as that descriptor is readable (it is
        not read here: its owner drains it).
        """
        conn = self.conn
        event = conn.next_event()
        if event is not NEED_DATA:
            if log.isEnabledFor(logging.DEBUG):
                log.debug(f"{conn.role.value} received {type(event).__name__}")
            return event
        deadline = None if timeout is None else time.monotonic() + timeout
        watched = [self.read_fd] if wake_fd is None else [self.read_fd, wake_fd]
        while True:
            if deadline is not None or wake_fd is not None:
                left = None
                if timeout is not None and deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise PipeTimeout(timeout)
                ready = select.select(watched, [], [], left)[0]
                if not ready and timeout is not None:   # (without a timeout select returns only when ready)
                    raise PipeTimeout(timeout)
                if self.read_fd not in ready:
                    return WOKEN
            view = conn.get_buffer()
            if view is not None:  # a large frame: read straight into its buffer
                count = os.readv(self.read_fd, (view,))
                view.release()
                self.bytes_received += count
                if count:
                    conn.buffer_updated(count)
                else:
                    conn.receive_data(b"")
            else:
                data = os.read(self.read_fd, READ_SIZE)
                self.bytes_received += len(data)
                conn.receive_data(data)
            event = conn.next_event()
            if event is not NEED_DATA:
                if log.isEnabledFor(logging.DEBUG):   # the kind only, never the content (tokens)
                    log.debug(f"{conn.role.value} received {type(event).__name__}")
                return event

    def expect(self, *types: type, timeout: float | None = None):
        """Receive one message that must be of one of TYPES."""
        names = " or ".join(t.__name__ for t in types)
        try:
            event = self.receive(timeout)
        except PeerClosed as exc:
            raise PeerClosed(exc.state, expected=names) from None
        if event is ConnectionClosed:
            raise PeerClosed(self.conn.their_state.value, expected=names)
        if not isinstance(event, types):
            raise UnexpectedMessage(type(event).__name__, self.conn.role.peer.value,
                                    self.conn.their_state.value, local=False,
                                    why=f"arrived where {names} was expected")
        return event


def spawn_with_channel(argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None,
                       stderr=None, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                       pipe_size: int = PIPE_SIZE) -> tuple[subprocess.Popen, PipeChannel]:
    """Start ARGV with its stdin/stdout as our pipe; return it and our channel.

    The channel owns our ends of both pipes (close it when done); the
    process's stderr goes to STDERR (default: inherited). No other fd is
    inherited by the child.
    """
    child_in, to_child = os.pipe()
    from_child, child_out = os.pipe()
    for fd in (to_child, from_child):
        _try_set_pipe_size(fd, pipe_size)
    try:
        process = subprocess.Popen(list(argv), stdin=child_in, stdout=child_out, stderr=stderr,
                                   env=None if env is None else dict(env), cwd=cwd, close_fds=True)
    except BaseException:
        for fd in (to_child, from_child):
            os.close(fd)
        raise
    finally:
        os.close(child_in)
        os.close(child_out)
    return process, PipeChannel(Role.AGENT, from_child, to_child, max_frame_bytes=max_frame_bytes)


def _try_set_pipe_size(fd: int, size: int) -> None:
    """Ask for a pipe capacity; the kernel may refuse (limits): keep the default."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except OSError:
        pass


def claim_stdio() -> tuple[int, int]:
    """Reserve the process's stdin/stdout for frames; return (read_fd, write_fd).

    Called first thing in the wrapper. The pipe fds are duplicated to new,
    close-on-exec descriptors (children never inherit them), fd 0 becomes
    /dev/null and fd 1 a copy of fd 2: whatever prints afterwards, from
    Python or from a library, lands on stderr and can never corrupt the
    stream.
    """
    sys.stdout.flush()
    read_fd = os.dup(0)
    write_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return read_fd, write_fd
