"""Framing: varints, frames, caps, truncation, and byte compatibility with protobuf."""

from __future__ import annotations

import pytest
from google.protobuf.internal import decoder as pb_decoder
from google.protobuf.internal import encoder as pb_encoder

from pilot.pipe.errors import FrameTooLarge, TruncatedFrame, UndecodableMessage
from pilot.pipe.framing import FrameDecoder, check_max_frame_bytes, encode_frame, encode_varint


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16383, 16384, 2**21, 2**31 - 1, 2**63])
def test_varint_matches_protobuf_encoder(value):
    assert encode_varint(value) == pb_encoder._VarintBytes(value)
    decoded, end = pb_decoder._DecodeVarint(encode_varint(value), 0)
    assert (decoded, end) == (value, len(encode_varint(value)))


def test_negative_varint_refused():
    with pytest.raises(ValueError):
        encode_varint(-1)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 200, 70_000, 1 << 20])
def test_frames_round_trip_byte_by_byte_and_whole(size):
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    stream = encode_frame(payload) + encode_frame(b"second")
    whole = FrameDecoder()
    whole.feed(stream)
    assert bytes(whole.next_frame()) == payload
    assert whole.next_frame() == b"second"
    assert whole.next_frame() is None

    if size <= 70_000:  # byte by byte is slow for the 1 MiB case
        trickle = FrameDecoder()
        frames = []
        for i in range(len(stream)):
            trickle.feed(stream[i:i + 1])
            while (frame := trickle.next_frame()) is not None:
                frames.append(bytes(frame))
        assert frames == [payload, b"second"]


def test_large_frame_split_across_reads_keeps_the_rest():
    big = b"x" * 200_000
    stream = encode_frame(big) + encode_frame(b"after") + encode_frame(b"and more")
    decoder = FrameDecoder()
    got = []
    for i in range(0, len(stream), 65_536):
        decoder.feed(stream[i:i + 65_536])
        while (frame := decoder.next_frame()) is not None:
            got.append(bytes(frame))
    assert got == [big, b"after", b"and more"]
    assert decoder.buffered == 0


def test_clean_eof_between_frames():
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"one"))
    decoder.feed_eof()
    assert decoder.next_frame() == b"one"
    assert decoder.next_frame() is FrameDecoder.EOF


def test_eof_inside_payload_is_truncated_frame():
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"0123456789")[:6])
    decoder.feed_eof()
    with pytest.raises(TruncatedFrame) as err:
        decoder.next_frame()
    assert (err.value.expected, err.value.received) == (10, 5)
    assert not err.value.local


def test_eof_inside_large_payload_is_truncated_frame():
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"z" * 100_000)[:50_000])
    assert decoder.next_frame() is None
    decoder.feed_eof()
    with pytest.raises(TruncatedFrame) as err:
        decoder.next_frame()
    assert err.value.expected == 100_000


def test_eof_inside_length_prefix():
    decoder = FrameDecoder()
    decoder.feed(b"\x80")
    decoder.feed_eof()
    with pytest.raises(TruncatedFrame) as err:
        decoder.next_frame()
    assert err.value.expected is None


def test_oversize_refused_from_prefix_alone():
    decoder = FrameDecoder(max_frame_bytes=1000)
    decoder.feed(encode_varint(1001))  # no payload at all: refused before buffering any
    with pytest.raises(FrameTooLarge) as err:
        decoder.next_frame()
    assert (err.value.size, err.value.limit, err.value.local) == (1001, 1000, False)


def test_oversize_refused_before_prefix_complete():
    # A 2**62-1 length: refused as soon as the partial prefix exceeds the cap.
    decoder = FrameDecoder(max_frame_bytes=1 << 20)
    decoder.feed(encode_varint(2**62 - 1)[:4])
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_errors_are_sticky():
    decoder = FrameDecoder(max_frame_bytes=10)
    decoder.feed(encode_varint(11))
    for _ in range(2):
        with pytest.raises(FrameTooLarge):
            decoder.next_frame()


def test_overlong_prefix_is_undecodable():
    decoder = FrameDecoder()
    decoder.feed(b"\x80" * 10 + b"\x00")
    with pytest.raises(UndecodableMessage):
        decoder.next_frame()


def test_non_canonical_prefix_accepted_like_java():
    decoder = FrameDecoder()
    decoder.feed(b"\x83\x80\x80\x00abc")  # 3, padded to four bytes
    assert decoder.next_frame() == b"abc"


def test_sending_over_the_cap_is_a_local_error():
    with pytest.raises(FrameTooLarge) as err:
        encode_frame(b"x" * 11, max_frame_bytes=10)
    assert err.value.local


@pytest.mark.parametrize("bad", [0, -5, 2**31, "4MiB", True])
def test_cap_validation(bad):
    with pytest.raises((ValueError, TypeError)):
        check_max_frame_bytes(bad)


def test_feed_after_eof_is_a_bug():
    decoder = FrameDecoder()
    decoder.feed_eof()
    with pytest.raises(ValueError):
        decoder.feed(b"x")
