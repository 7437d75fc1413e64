"""Errors of the agent <-> wrapper pipe protocol.

As in h11, every error knows whether *we* broke the protocol (`local` is
True: a bug or misuse on this side) or the peer did (`local` is False: the
peer is broken, hostile, of another version, or died). The types split only
where a caller acts differently:

- `PeerClosed`: the peer ended its stream cleanly where a message was still
  expected (the wrapper exited without a Result, the agent went away).
- `TruncatedFrame`: end of file inside a frame: the peer died mid-write.
- `FrameTooLarge`: a length prefix above the cap; refused before allocating.
- `UndecodableMessage`: the bytes are not a valid message of the schema.
- `UnexpectedMessage`: a valid message that is not allowed in this state.
- `UnsupportedVersion`: the peer speaks another major protocol version.
"""

from __future__ import annotations

from pilot.errors import SplitpilotError


class ProtocolError(SplitpilotError):
    """Root of the pipe protocol errors.

    Attributes:
        local: True when this side broke the protocol, False when the peer did.
    """

    def __init__(self, message: str, *, local: bool = False) -> None:
        super().__init__(message)
        self.local = local

    @property
    def side(self) -> str:
        return "local" if self.local else "remote"


class PeerClosed(ProtocolError):
    """End of the peer's stream where the conversation required more.

    Attributes:
        state: the peer's protocol state when its stream ended.
        expected: what was awaited, when a caller asked for something
            specific (PipeChannel.expect); empty otherwise.
    """

    def __init__(self, state: str, expected: str = "") -> None:
        if expected:
            what = f"the peer closed the pipe where {expected} was expected"
        else:
            what = f"the peer closed the pipe in state {state} without finishing the conversation"
        super().__init__(f"{what} (it exited or crashed; check its stderr)")
        self.state = state
        self.expected = expected


class TruncatedFrame(ProtocolError):
    """End of file inside a frame.

    Attributes:
        expected: bytes the frame announced (None if the length prefix itself
            was cut).
        received: bytes of the frame that arrived.
    """

    def __init__(self, expected: int | None, received: int) -> None:
        what = "its length prefix" if expected is None else f"{received} of {expected} bytes"
        super().__init__(f"the pipe ended inside a frame ({what}): the peer died while writing")
        self.expected = expected
        self.received = received


class FrameTooLarge(ProtocolError):
    """A frame longer than the configured cap.

    Attributes:
        size: the announced (or attempted) frame length in bytes.
        limit: the cap in bytes.
    """

    def __init__(self, size: int, limit: int, *, local: bool = False) -> None:
        if local:
            hint = "send less per message (split LogChunks) or raise max_frame_bytes on both sides"
        else:
            hint = "the peer is broken or hostile, or both sides need a larger max_frame_bytes"
        super().__init__(f"frame of {size} bytes exceeds the cap of {limit} bytes: {hint}", local=local)
        self.size = size
        self.limit = limit


class UndecodableMessage(ProtocolError):
    """Bytes that do not decode as the expected message (or a bad prefix).

    Attributes:
        detail: what the decoder said.
    """

    def __init__(self, detail: str) -> None:
        super().__init__(
            f"undecodable frame from the peer: {detail} (the stream is corrupt, or something "
            "other than the protocol wrote to the pipe: payload output must never reach it)"
        )
        self.detail = detail


class UnexpectedMessage(ProtocolError):
    """A message the sender may not send in its current state.

    Attributes:
        kind: the message kind (envelope field name, e.g. "job_start").
        sender: "agent" or "wrapper".
        state: the sender's state when it was sent.
    """

    def __init__(self, kind: str, sender: str, state: str, *, local: bool, why: str = "") -> None:
        reason = why or f"not allowed from the {sender} in state {state}"
        super().__init__(f"message {kind!r} {reason}", local=local)
        self.kind = kind
        self.sender = sender
        self.state = state


class UnsupportedVersion(ProtocolError):
    """The peer's major protocol version is not ours.

    Attributes:
        ours: our (major, minor).
        theirs: the peer's (major, minor).
    """

    def __init__(self, ours: tuple[int, int], theirs: tuple[int, int]) -> None:
        super().__init__(
            f"the peer speaks pipe protocol {theirs[0]}.{theirs[1]}, this side {ours[0]}.{ours[1]}: "
            "major versions must match; install the same splitpilot major version on both sides"
        )
        self.ours = ours
        self.theirs = theirs
