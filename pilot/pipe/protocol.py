"""The sans-I/O core of the agent <-> wrapper protocol.

A `Connection` holds one side's view of the conversation: our state, the
peer's state, and a frame decoder. It does no I/O: `send(message)` checks
the message is legal and returns the bytes to write; `receive_data(bytes)`
takes what was read (b"" for end of file) and `next_event()` returns the
peer's messages one by one. The I/O adapters (pilot.pipe.channel for
blocking pipes; an agent's selector loop later) stay thin around it.

All the rules of the conversation are in the single table `TRANSITIONS`:
for each (sender, sender's state, message kind), the sender's next state.
Anything not in the table is illegal, whichever side tries it.

Versions: each side announces (major, minor) in its greeting (Hello or
Ready). Majors must match. The minor in use is the smaller of the two
(`negotiated_minor`; 0 until the peer's greeting has arrived): `send`
refuses a message kind or an enum value of a later minor
(pilot.pipe.messages.MINORS), and a peer that sends a kind of a later minor
than the negotiated one breaks the protocol.
"""

from __future__ import annotations

import collections
import enum
from typing import Final

from google.protobuf.message import DecodeError

from pilot.pipe import messages
from pilot.pipe.errors import (
    FrameTooLarge,
    PeerClosed,
    ProtocolError,
    UndecodableMessage,
    UnexpectedMessage,
    UnsupportedVersion,
)
from pilot.pipe.framing import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, encode_varint
from pilot.pipe.messages import ENUM_VALUE_MINOR, ENVELOPE_KEYS, KIND_MINOR

#: Message kinds whose top-level enum fields are checked against the negotiated minor on sending.
_ENUM_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "result": ("final_state", "failure_class"), "state_change": ("state",), "stop": ("reason",),
    "error": ("code",),
}


class Role(enum.Enum):
    """Which end of the pipe a Connection is."""

    AGENT = "agent"
    WRAPPER = "wrapper"

    @property
    def peer(self) -> Role:
        return Role.WRAPPER if self is Role.AGENT else Role.AGENT


class State(enum.Enum):
    """Where one side is in the conversation."""

    START = "START"          # nothing sent yet
    GREETED = "GREETED"      # sent Hello (agent) or Ready (wrapper)
    JOB = "JOB"              # agent: sent JobStart
    STOPPING = "STOPPING"    # agent: sent Stop
    FINISHED = "FINISHED"    # wrapper: sent Result or Error
    CLOSED = "CLOSED"        # sent end of file
    ERROR = "ERROR"          # broke the protocol; nothing more is accepted


A, W = Role.AGENT, Role.WRAPPER
S = State

#: (sender, sender's state, message kind) -> sender's next state.
TRANSITIONS: Final[dict[tuple[Role, State, str], State]] = {
    # agent -> wrapper
    (A, S.START, "hello"): S.GREETED,
    (A, S.GREETED, "job_start"): S.JOB,
    (A, S.GREETED, "ping"): S.GREETED,
    (A, S.JOB, "ping"): S.JOB,
    (A, S.JOB, "token_refresh"): S.JOB,
    (A, S.JOB, "stop"): S.STOPPING,
    (A, S.STOPPING, "ping"): S.STOPPING,
    (A, S.STOPPING, "token_refresh"): S.STOPPING,
    (A, S.STOPPING, "stop"): S.STOPPING,  # a later Stop may shorten the deadline
    # wrapper -> agent
    (W, S.START, "ready"): S.GREETED,
    (W, S.START, "error"): S.FINISHED,
    (W, S.GREETED, "pong"): S.GREETED,
    (W, S.GREETED, "state_change"): S.GREETED,
    (W, S.GREETED, "heartbeat"): S.GREETED,
    (W, S.GREETED, "log_chunk"): S.GREETED,
    (W, S.GREETED, "result"): S.FINISHED,
    (W, S.GREETED, "error"): S.FINISHED,
}

#: Wrapper messages that speak of the job: legal only once the agent has
#: sent JobStart (the wrapper cannot report on a job it was never given).
NEEDS_JOB: Final[frozenset[str]] = frozenset({"state_change", "heartbeat", "log_chunk", "result"})

#: States in which a side may end its stream without leaving the peer
#: waiting for something (end of file there is a clean close).
CLEAN_CLOSE: Final[dict[Role, frozenset[State]]] = {
    # The agent may close the wrapper's stdin at any time after Hello: before
    # JobStart when it only probed the wrapper (a runtime self-test), after it
    # when it went away, and the wrapper then stops the payload as on a Stop.
    A: frozenset({S.GREETED, S.JOB, S.STOPPING}),
    W: frozenset({S.FINISHED}),
}


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


class _ConnectionClosed:
    def __repr__(self) -> str:
        return "ConnectionClosed"


#: next_event(): no complete message buffered; feed more bytes.
NEED_DATA: Final = _NeedData()
#: next_event(): the peer ended its stream cleanly, in a state that allows it.
ConnectionClosed: Final = _ConnectionClosed()


class Connection:
    """One side of the pipe protocol, without I/O.

    Events returned by `next_event` are the peer's messages themselves
    (e.g. a `messages.Heartbeat`), `ConnectionClosed`, or `NEED_DATA`.
    Errors raised are `pilot.pipe.errors.ProtocolError` subclasses; a remote
    error is sticky (the peer's stream is not trusted any further).
    """

    def __init__(self, role: Role, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.role = role
        self.max_frame_bytes = max_frame_bytes
        self.our_state = State.START
        self.their_state = State.START
        self.peer_version: tuple[int, int] | None = None
        self.own_minor = messages.PROTOCOL_VERSION[1]
        self._decoder = FrameDecoder(max_frame_bytes)
        self._in_envelope: type[messages.AgentMessage] | type[messages.WrapperMessage]
        if role is Role.AGENT:
            self._out_kinds, self._in_envelope = messages.AGENT_KINDS, messages.WrapperMessage
        else:
            self._out_kinds, self._in_envelope = messages.WRAPPER_KINDS, messages.AgentMessage
        self._in_parse = self._in_envelope.FromString
        self._job_sent = False      # the agent has sent JobStart (both sides track it)
        # Nonces of the agent's Pings not yet answered, oldest first: Pongs
        # answer them in order.
        self._pending_pings: collections.deque[int] = collections.deque()
        self._error: ProtocolError | None = None

    @property
    def negotiated_minor(self) -> int:
        """The minor both sides speak: the smaller announced one, 0 before the peer's greeting."""
        if self.peer_version is None:
            return 0
        return min(self.own_minor, self.peer_version[1])

    def peer_knows(self, kind: str, enum_values: tuple[tuple[str, int], ...] = ()) -> bool:
        """Whether message KIND and ENUM_VALUES ((enum full name, number) pairs) exist in the negotiated minor."""
        minor = self.negotiated_minor
        return KIND_MINOR.get(kind, 0) <= minor and all(ENUM_VALUE_MINOR.get(v, 0) <= minor for v in enum_values)

    # ----------------------------------------------------------- sending

    def send(self, message) -> bytes:
        """Check MESSAGE is legal now, advance our state, return its frame."""
        header, body = self.send_parts(message)
        return header + body

    def send_parts(self, message) -> tuple[bytes, bytes]:
        """Like send(), but the frame comes as (header, body) so that a large
        message can be written with writev() without being copied again."""
        kind = self._out_kinds.get(type(message))
        if kind is None:
            raise UnexpectedMessage(type(message).__name__, self.role.value, self.our_state.value,
                                    local=True, why=f"is not a message the {self.role.value} sends")
        new_state = self._transition(self.role, self.our_state, kind, local=True, message=message)
        self._check_minor(kind, message)
        if kind == "hello" or kind == "ready":
            # The minor we announce is the one we hold ourselves to (never above what this code knows).
            self.own_minor = min(message.protocol_minor, messages.PROTOCOL_VERSION[1])
        body = message.SerializeToString()
        key = ENVELOPE_KEYS[kind]
        size = len(body)
        inner_prefix = encode_varint(size)
        envelope_size = len(key) + len(inner_prefix) + size
        if envelope_size > self.max_frame_bytes:
            raise FrameTooLarge(envelope_size, self.max_frame_bytes, local=True)
        header = encode_varint(envelope_size) + key + inner_prefix
        self._after(self.role, kind, message)
        self.our_state = new_state
        return header, body

    def send_log_chunk(self, data: bytes, *, stream: messages.LogStream, offset: int,
                       skipped_before: bool = False) -> tuple[bytes, bytes]:
        """Frame a LogChunk around DATA without copying DATA: (header, DATA).

        The bulk path of the protocol: building a LogChunk message copies the
        bytes in and serialising copies them out again, which for 1 MiB
        chunks costs more than the pipe itself. The fields are encoded here
        exactly as protobuf would (field order, proto3 defaults omitted;
        tests compare the bytes), with DATA last so it can follow the header
        in a writev().
        """
        kind = "log_chunk"
        new_state = self._transition(self.role, self.our_state, kind, local=True)
        fields = bytearray()
        if stream:
            fields += b"\x08" + encode_varint(stream)
        if offset:
            fields += b"\x10" + encode_varint(offset)
        if skipped_before:
            # Field 4 comes after field 3 in protobuf's order, so it cannot
            # follow DATA; a chunk with skipped_before set takes the copy.
            chunk = messages.LogChunk(stream=stream, offset=offset, data=data, skipped_before=True)
            return self.send_parts(chunk)
        if data:
            fields += b"\x1a" + encode_varint(len(data))
        body_size = len(fields) + len(data)
        key = ENVELOPE_KEYS[kind]
        inner_prefix = encode_varint(body_size)
        envelope_size = len(key) + len(inner_prefix) + body_size
        if envelope_size > self.max_frame_bytes:
            raise FrameTooLarge(envelope_size, self.max_frame_bytes, local=True)
        header = encode_varint(envelope_size) + key + inner_prefix + bytes(fields)
        self._after(self.role, kind, None)
        self.our_state = new_state
        return header, data

    def send_many(self, batch) -> bytes:
        """Like send() for several messages, all or nothing: if one is
        illegal, none counts as sent and the state is as before."""
        saved = (self.our_state, self._job_sent, self._pending_pings.copy())
        try:
            return b"".join([self.send(message) for message in batch])
        except BaseException:
            self.our_state, self._job_sent, self._pending_pings = saved
            raise

    def send_eof(self) -> None:
        """Record that we close our stream (the adapter closes the fd)."""
        self.our_state = State.CLOSED

    # ---------------------------------------------------------- receiving

    def receive_data(self, data: bytes) -> None:
        """Take bytes read from the peer; b"" means end of file."""
        if data:
            self._decoder.feed(data)
        else:
            self._decoder.feed_eof()

    def get_buffer(self) -> memoryview | None:
        """A buffer to read the peer's next bytes into directly, or None
        (then use receive_data); see FrameDecoder.get_buffer."""
        return self._decoder.get_buffer()

    def buffer_updated(self, count: int) -> None:
        """COUNT bytes (more than 0) were read into get_buffer()'s view."""
        self._decoder.buffer_updated(count)

    def next_event(self):
        """Return the peer's next message, ConnectionClosed or NEED_DATA."""
        if self._error is not None:
            raise self._error
        try:
            frame = self._decoder.next_frame()
            if frame is None:
                return NEED_DATA
            if frame is FrameDecoder.EOF:
                return self._peer_closed()
            try:
                envelope = self._in_parse(frame)
            except DecodeError as exc:
                raise UndecodableMessage(str(exc) or "invalid protobuf") from None
            kind = envelope.WhichOneof("kind")
            if kind is None:
                raise UndecodableMessage(
                    f"{self._in_envelope.DESCRIPTOR.name} with no message set (an unknown kind "
                    "from a newer peer, or not a message of this protocol)")
            peer = self.role.peer
            message = getattr(envelope, kind)
            new_state = self._transition(peer, self.their_state, kind, local=False, message=message)
            if kind == "hello" or kind == "ready":
                self._check_version(message)
            elif KIND_MINOR.get(kind, 0) > self.negotiated_minor:
                raise UnexpectedMessage(kind, peer.value, self.their_state.value, local=False,
                                        why=f"was added in minor {KIND_MINOR[kind]}, but the negotiated "
                                            f"protocol is 1.{self.negotiated_minor}")
            self._after(peer, kind, message)
            self.their_state = new_state
            return message
        except ProtocolError as exc:
            self._error = exc
            self.their_state = State.ERROR
            raise

    # ----------------------------------------------------------- internals

    def _transition(self, sender: Role, state: State, kind: str, *, local: bool, message=None) -> State:
        new_state = TRANSITIONS.get((sender, state, kind))
        if new_state is None:
            raise UnexpectedMessage(kind, sender.value, state.value, local=local)
        if sender is Role.WRAPPER:
            if kind in NEEDS_JOB and not self._job_sent:
                raise UnexpectedMessage(kind, sender.value, state.value, local=local,
                                        why="is about a job, but the agent has not sent JobStart")
            if kind == "pong":
                pending = self._pending_pings
                if not pending:
                    raise UnexpectedMessage(kind, sender.value, state.value, local=local,
                                            why="answers no Ping")
                if message is not None and message.nonce != pending[0]:
                    raise UnexpectedMessage(kind, sender.value, state.value, local=local,
                                            why=f"carries nonce {message.nonce}, but the oldest "
                                                f"unanswered Ping is {pending[0]}")
        return new_state

    def _check_minor(self, kind: str, message) -> None:
        """Refuse (locally) a kind or an enum value the peer's minor lacks: the caller must send another."""
        minor = self.negotiated_minor
        added = KIND_MINOR.get(kind, 0)
        if added > minor:
            raise UnexpectedMessage(kind, self.role.value, self.our_state.value, local=True,
                                    why=f"was added in minor {added}; the negotiated protocol is 1.{minor}")
        for name in _ENUM_FIELDS.get(kind, ()):
            field = message.DESCRIPTOR.fields_by_name[name]
            value = getattr(message, name)
            added = ENUM_VALUE_MINOR.get((field.enum_type.full_name, value), 0)
            if added > minor:
                raise UnexpectedMessage(kind, self.role.value, self.our_state.value, local=True,
                                        why=f"carries {name} {field.enum_type.values_by_number[value].name}, "
                                            f"added in minor {added}; the negotiated protocol is 1.{minor} "
                                            "(send the older value it stands for)")

    def _after(self, sender: Role, kind: str, message) -> None:
        if kind == "job_start":
            self._job_sent = True
        elif kind == "ping":
            self._pending_pings.append(message.nonce)
        elif kind == "pong":
            self._pending_pings.popleft()

    def _check_version(self, greeting) -> None:
        theirs = (greeting.protocol_major, greeting.protocol_minor)
        self.peer_version = theirs
        if theirs[0] != messages.PROTOCOL_VERSION[0]:
            raise UnsupportedVersion(messages.PROTOCOL_VERSION, theirs)

    def _peer_closed(self):
        state = self.their_state
        # A probed wrapper (the agent closed after Hello without a job) ends
        # after Ready: nothing was left unsaid.
        probed = (self.role is Role.AGENT and state is State.GREETED
                  and self.our_state is State.CLOSED and not self._job_sent)
        if state in CLEAN_CLOSE[self.role.peer] or state is State.CLOSED or probed:
            self.their_state = State.CLOSED
            return ConnectionClosed
        raise PeerClosed(state.value)
