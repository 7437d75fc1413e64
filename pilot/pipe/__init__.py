"""The agent <-> wrapper pipe: schema types, framing and protocol state.

Layers, innermost first:
- `pilot.pipe.framing`: varint-delimited frames (sans-I/O);
- `pilot.pipe.protocol`: the Connection state machine (sans-I/O);
- `pilot.pipe.channel`: a blocking adapter over file descriptors.
"""

from pilot.pipe.channel import PipeChannel, PipeTimeout, claim_stdio
from pilot.pipe.errors import (
    FrameTooLarge,
    PeerClosed,
    ProtocolError,
    TruncatedFrame,
    UndecodableMessage,
    UnexpectedMessage,
    UnsupportedVersion,
)
from pilot.pipe.framing import DEFAULT_MAX_FRAME_BYTES
from pilot.pipe.messages import PROTOCOL_VERSION, make_hello, make_ready
from pilot.pipe.protocol import NEED_DATA, TRANSITIONS, Connection, ConnectionClosed, Role, State

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES", "NEED_DATA", "PROTOCOL_VERSION", "TRANSITIONS",
    "Connection", "ConnectionClosed", "FrameTooLarge", "PeerClosed", "PipeChannel",
    "PipeTimeout", "ProtocolError", "Role", "State", "TruncatedFrame", "UndecodableMessage",
    "UnexpectedMessage", "UnsupportedVersion", "claim_stdio", "make_hello", "make_ready",
]
