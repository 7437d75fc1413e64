"""Blocking I/O adapter: a protocol Connection over a pair of pipe fds.

The agent uses it on the wrapper's stdin/stdout; the wrapper on its own
(after `claim_stdio`, so that fd 1 carries frames only). Reads are bounded
(64 KiB at a time) so that, with the decoder's cap, no peer can make this
side buffer more than one frame plus one read.
"""

from __future__ import annotations

import os
import select
import sys
import time

from pilot.pipe.errors import PeerClosed, ProtocolError, UnexpectedMessage
from pilot.pipe.framing import DEFAULT_MAX_FRAME_BYTES
from pilot.pipe.protocol import NEED_DATA, Connection, ConnectionClosed, Role

READ_SIZE = 64 * 1024


class PipeTimeout(ProtocolError):
    """No complete message arrived in time.

    Attributes:
        seconds: the timeout that expired.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no message from the peer within {seconds:g} s (is it hung?)")
        self.seconds = seconds


class PipeChannel:
    """Send and receive protocol messages over two file descriptors.

    The channel owns the fds and closes them in `close()` (or on leaving a
    `with` block).
    """

    def __init__(self, role: Role, read_fd: int, write_fd: int, *,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
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

    def send(self, message) -> None:
        """Send one message; raises PeerClosed if the peer's end is gone."""
        self._write(self.conn.send(message))

    def send_many(self, batch) -> None:
        """Send several messages with one write (fewer system calls)."""
        self._write(b"".join([self.conn.send(m) for m in batch]))

    def _write(self, data: bytes) -> None:
        self.bytes_sent += len(data)
        view = memoryview(data)
        try:
            while view:
                written = os.write(self.write_fd, view)
                view = view[written:]
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

    def receive(self, timeout: float | None = None):
        """Return the peer's next message, or ConnectionClosed at a clean end.

        Raises PipeTimeout when TIMEOUT seconds pass without a full message,
        and the protocol's errors for anything the peer gets wrong.
        """
        conn = self.conn
        event = conn.next_event()
        if event is not NEED_DATA:
            return event
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.read_fd], [], [], left)[0]:
                    raise PipeTimeout(timeout)
            data = os.read(self.read_fd, READ_SIZE)
            self.bytes_received += len(data)
            conn.receive_data(data)
            event = conn.next_event()
            if event is not NEED_DATA:
                return event

    def expect(self, *types: type, timeout: float | None = None):
        """Receive one message that must be of one of TYPES."""
        event = self.receive(timeout)
        if event is ConnectionClosed:
            raise PeerClosed(self.conn.their_state.value)
        if not isinstance(event, types):
            names = " or ".join(t.__name__ for t in types)
            raise UnexpectedMessage(type(event).__name__, self.conn.role.peer.value,
                                    self.conn.their_state.value, local=False,
                                    why=f"arrived where {names} was expected")
        return event


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
