"""Length-delimited framing: varint length, then the message bytes.

The layout is protobuf's own delimited format (Java writeDelimitedTo /
parseDelimitedFrom, C++ SerializeDelimitedTo..., Go protodelim), so peers in
other languages use their standard API. This module is sans-I/O: bytes in,
frames out; it never reads or writes a file descriptor itself.

The decoder checks a frame's announced length against the cap as soon as the
length prefix is read, before it buffers or allocates the frame.
"""

from __future__ import annotations

import enum
from typing import Final, NoReturn

from pilot.pipe.errors import FrameTooLarge, TruncatedFrame, UndecodableMessage

#: Default cap on one frame, both directions: room for a JobStart with a
#: large job description and certificate chain, small enough that a corrupt
#: or hostile length prefix cannot make a peer allocate much.
DEFAULT_MAX_FRAME_BYTES = 4 * 1024 * 1024

#: Hard ceiling for the configurable cap: lengths are 32-bit in every
#: protobuf implementation's delimited readers.
MAX_FRAME_BYTES_CEILING = 2**31 - 1

#: A varint of a 64-bit value needs at most 10 bytes; Java and C++ accept
#: non-canonical prefixes up to that length, so we do too.
_MAX_VARINT_BYTES = 10

_ONE_BYTE_PREFIX = tuple(bytes((n,)) for n in range(128))

# The decoder drops consumed bytes from the front of its buffer only once
# this many have accumulated, so that a burst of small frames costs one
# memmove per 64 KiB rather than one per frame.
_COMPACT_AFTER = 64 * 1024

# A frame longer than this that is still incomplete gets a buffer of its own,
# allocated once at its announced size (already checked against the cap), and
# later reads are copied straight into it. Growing one shared buffer instead
# costs repeated reallocations and copies: 1 MiB frames ran at 15% of the
# raw pipe bandwidth that way.
_LARGE_FRAME = 64 * 1024


def check_max_frame_bytes(value: int) -> int:
    """Validate a configured frame cap and return it."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"max_frame_bytes must be an int, not {type(value).__name__}")
    if not 1 <= value <= MAX_FRAME_BYTES_CEILING:
        raise ValueError(f"max_frame_bytes must be between 1 and {MAX_FRAME_BYTES_CEILING}, not {value}")
    return value


def encode_varint(value: int) -> bytes:
    """Encode a non-negative integer as a protobuf base-128 varint."""
    if value < 0:
        raise ValueError(f"varint of a negative number: {value}")
    if value < 128:
        return _ONE_BYTE_PREFIX[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_frame(payload: bytes, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """Prefix PAYLOAD with its varint length; refuse it above the cap."""
    size = len(payload)
    if size > max_frame_bytes:
        raise FrameTooLarge(size, max_frame_bytes, local=True)
    if size < 128:
        return _ONE_BYTE_PREFIX[size] + payload
    return encode_varint(size) + payload


class EndOfStream(enum.Enum):
    """The type of `FrameDecoder.EOF`: one enum member, so that a type checker narrows `frame is EOF`."""

    EOF = "EOF"


class FrameDecoder:
    """Turns a byte stream into frame payloads, one at a time.

    Feed bytes with `feed`, end of stream with `feed_eof`; `next_frame`
    returns the next complete payload, None when more bytes are needed, and
    `EOF` once the stream ended cleanly between frames. Errors are sticky:
    after one, every call raises it again.
    """

    EOF: Final = EndOfStream.EOF

    __slots__ = ("max_frame_bytes", "_buf", "_pos", "_eof", "_error", "_large", "_large_filled")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = check_max_frame_bytes(max_frame_bytes)
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._error: Exception | None = None
        self._large: bytearray | None = None  # a large frame being filled
        self._large_filled = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) - self._pos + self._large_filled

    def feed(self, data: bytes) -> None:
        if self._eof:
            raise ValueError("feed() after feed_eof()")
        large = self._large
        if large is not None:
            filled = self._large_filled
            take = min(len(large) - filled, len(data))
            large[filled:filled + take] = memoryview(data)[:take]
            self._large_filled = filled + take
            data = data[take:]
        if data:
            self._buf += data

    def get_buffer(self) -> memoryview | None:
        """Where a reader may read the next bytes directly, or None.

        While a large frame is being received, this is the unfilled rest of
        its buffer: reading into it (os.readv) and reporting the count with
        `buffer_updated` saves a copy and an allocation per read. Otherwise
        readers use `feed`.
        """
        large = self._large
        if large is None or self._eof:
            return None
        return memoryview(large)[self._large_filled:]

    def buffer_updated(self, count: int) -> None:
        """COUNT bytes were read into the view from `get_buffer`."""
        if self._large is None or not 0 < count <= len(self._large) - self._large_filled:
            raise ValueError(f"buffer_updated({count}) does not match the buffer given out")
        self._large_filled += count

    def feed_eof(self) -> None:
        self._eof = True

    def next_frame(self) -> bytes | bytearray | EndOfStream | None:
        """The next frame's bytes, None (need more data) or `EOF`."""
        if self._error is not None:
            raise self._error
        large = self._large
        if large is not None:
            if self._large_filled < len(large):
                if self._eof:
                    return self._fail(TruncatedFrame(len(large), self._large_filled))
                return None
            self._large = None
            self._large_filled = 0
            return large
        buf = self._buf
        pos = self._pos
        end = len(buf)
        if pos >= end:
            if self._eof:
                return self.EOF
            if pos:
                buf.clear()
                self._pos = 0
            return None
        first = buf[pos]
        if first < 0x80:  # the common case: a frame shorter than 128 bytes
            size = first
            start = pos + 1
        else:
            size = first & 0x7F
            shift = 7
            i = pos + 1
            while True:
                if i >= end:
                    if self._eof:
                        return self._fail(TruncatedFrame(None, 0))
                    if i - pos >= _MAX_VARINT_BYTES:
                        return self._fail(UndecodableMessage("length prefix longer than 10 bytes"))
                    return None
                byte = buf[i]
                size |= (byte & 0x7F) << shift
                i += 1
                if size > self.max_frame_bytes:
                    return self._fail(FrameTooLarge(size, self.max_frame_bytes))
                if byte < 0x80:
                    break
                if i - pos >= _MAX_VARINT_BYTES:
                    return self._fail(UndecodableMessage("length prefix longer than 10 bytes"))
                shift += 7
            start = i
        if size > self.max_frame_bytes:
            return self._fail(FrameTooLarge(size, self.max_frame_bytes))
        stop = start + size
        if stop > end:
            if self._eof:
                return self._fail(TruncatedFrame(size, end - start))
            if size > _LARGE_FRAME:
                large = bytearray(size)
                have = end - start
                large[:have] = buf[start:end]
                self._large = large
                self._large_filled = have
                buf.clear()
                self._pos = 0
            return None
        frame = bytes(buf[start:stop])
        if stop >= _COMPACT_AFTER:
            del buf[:stop]
            self._pos = 0
        else:
            self._pos = stop
        return frame

    def _fail(self, error: Exception) -> NoReturn:
        self._error = error
        raise error
