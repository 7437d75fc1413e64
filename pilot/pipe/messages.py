"""The pipe's message types, its version, and helpers to build greetings.

Everything else in pilot.pipe imports the generated classes through here, so
the generated package's layout is known in one place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pilot.pipe.framing import encode_varint
from splitpilot.job.v1 import job_pb2
from splitpilot.pipe.v1 import pipe_pb2

#: (major, minor) of the pipe protocol this code speaks. The major equals the
#: `.v1` in the proto package; a new minor adds fields, enum values and message
#: kinds (MINORS says which), never changes what exists.
PROTOCOL_VERSION: tuple[int, int] = (1, 1)

# Re-exported message and enum types, so callers write `messages.Heartbeat`.
AgentMessage = pipe_pb2.AgentMessage
WrapperMessage = pipe_pb2.WrapperMessage
Hello = pipe_pb2.Hello
JobStart = pipe_pb2.JobStart
JobToken = pipe_pb2.JobToken
BrokerEndpoint = pipe_pb2.BrokerEndpoint
Limits = pipe_pb2.Limits
Stop = pipe_pb2.Stop
StopReason = pipe_pb2.StopReason
TokenRefresh = pipe_pb2.TokenRefresh
Ping = pipe_pb2.Ping
Ready = pipe_pb2.Ready
StateChange = pipe_pb2.StateChange
Heartbeat = pipe_pb2.Heartbeat
LogChunk = pipe_pb2.LogChunk
LogStream = pipe_pb2.LogStream
Result = pipe_pb2.Result
FailureClass = pipe_pb2.FailureClass
Pong = pipe_pb2.Pong
Error = pipe_pb2.Error
ErrorCode = pipe_pb2.ErrorCode
JobSpec = job_pb2.JobSpec
JobState = job_pb2.JobState
InputFile = job_pb2.InputFile
Requirements = job_pb2.Requirements




@dataclass(frozen=True)
class MinorAdditions:
    """What one minor version of the protocol added.

    kinds: envelope field names (message kinds), either direction.
    enum_values: (enum full name, number) pairs.
    fields: "Message.field" names, for the record only: fields need no
    negotiation (an older reader skips them).
    """

    kinds: frozenset[str] = frozenset()
    enum_values: frozenset[tuple[str, int]] = frozenset()
    fields: tuple[str, ...] = ()


#: Minor -> what it added. A side never sends a kind or an enum value of a
#: minor above the negotiated one (the smaller of both greetings' minors).
MINORS: dict[int, MinorAdditions] = {
    0: MinorAdditions(),  # the protocol as first published
    1: MinorAdditions(
        enum_values=frozenset({("splitpilot.pipe.v1.FailureClass", pipe_pb2.FAILURE_CLASS_LIMIT),
                               ("splitpilot.pipe.v1.FailureClass", pipe_pb2.FAILURE_CLASS_FENCED),
                               ("splitpilot.job.v1.JobState", job_pb2.JOB_STATE_FAILED_LIMIT)}),
        fields=("JobStart.broker_heartbeat_s",)),
}
assert max(MINORS) == PROTOCOL_VERSION[1], "describe every minor in MINORS"

#: Message kind -> the minor that added it (kinds absent here: minor 0).
KIND_MINOR: dict[str, int] = {kind: minor for minor, added in MINORS.items() for kind in added.kinds}
#: (enum full name, number) -> the minor that added it (values absent here: minor 0).
ENUM_VALUE_MINOR: dict[tuple[str, int], int] = {
    value: minor for minor, added in MINORS.items() for value in added.enum_values}


def _kinds(envelope: type[AgentMessage] | type[WrapperMessage]) -> dict[type, str]:
    """Map each message class of an envelope's `kind` oneof to its field name."""
    oneof = envelope.DESCRIPTOR.oneofs_by_name["kind"]
    kinds: dict[type, str] = {}
    for field in oneof.fields:
        if field.message_type is None:   # pipe.proto's rule: every `kind` is a message
            raise TypeError(f"{envelope.DESCRIPTOR.name}.{field.name} is not a message")
        kinds[getattr(pipe_pb2, field.message_type.name)] = field.name
    return kinds


#: Message class -> envelope field name, per direction.
AGENT_KINDS: dict[type, str] = _kinds(AgentMessage)
WRAPPER_KINDS: dict[type, str] = _kinds(WrapperMessage)


def _tags(envelope: type[AgentMessage] | type[WrapperMessage]) -> dict[str, bytes]:
    """Envelope field name -> the encoded key of that field (number, wire type 2)."""
    oneof = envelope.DESCRIPTOR.oneofs_by_name["kind"]
    return {field.name: encode_varint(field.number << 3 | 2) for field in oneof.fields}


#: Envelope field name -> its encoded field key. An envelope holding one
#: message serialises as this key, the message's length, and its bytes; the
#: Connection writes that by hand instead of copying each message into an
#: envelope object first (tests check the bytes are identical).
ENVELOPE_KEYS: dict[str, bytes] = {**_tags(AgentMessage), **_tags(WrapperMessage)}


def make_hello(agent_id: str, software_version: str = "") -> pipe_pb2.Hello:
    """The agent's greeting with this side's protocol version filled in."""
    major, minor = PROTOCOL_VERSION
    return Hello(protocol_major=major, protocol_minor=minor, agent_id=agent_id,
                 software_version=software_version)


def make_ready(capabilities: tuple[str, ...] = (), software_version: str = "") -> pipe_pb2.Ready:
    """The wrapper's greeting with this side's protocol version and pid."""
    major, minor = PROTOCOL_VERSION
    return Ready(protocol_major=major, protocol_minor=minor, pid=os.getpid(),
                 capabilities=list(capabilities), software_version=software_version)
