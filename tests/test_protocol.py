"""The sans-I/O protocol core: the transition table, both directions, every refusal."""

from __future__ import annotations

import itertools

import pytest
from conftest import pump, sample_job_start

from pilot.pipe import messages as m
from pilot.pipe.errors import (
    PeerClosed,
    UndecodableMessage,
    UnexpectedMessage,
    UnsupportedVersion,
)
from pilot.pipe.framing import encode_frame
from pilot.pipe.protocol import (
    NEED_DATA,
    NEEDS_JOB,
    TRANSITIONS,
    Connection,
    ConnectionClosed,
    Role,
    State,
)

SAMPLES = {
    "hello": m.make_hello("a"), "job_start": sample_job_start(), "stop": m.Stop(deadline_s=5),
    "token_refresh": m.TokenRefresh(token=m.JobToken(certificate_pem=b"C")), "ping": m.Ping(nonce=1),
    "ready": m.make_ready(), "state_change": m.StateChange(state=m.JobState.JOB_STATE_RUNNING),
    "heartbeat": m.Heartbeat(cpu_seconds=1.0), "log_chunk": m.LogChunk(data=b"log"),
    "result": m.Result(final_state=m.JobState.JOB_STATE_DONE, exit_code=0), "pong": m.Pong(nonce=1),
    "error": m.Error(code=m.ErrorCode.ERROR_CODE_BAD_JOB, message="bad"),
}
KINDS = {Role.AGENT: sorted(m.AGENT_KINDS.values()), Role.WRAPPER: sorted(m.WRAPPER_KINDS.values())}


def test_samples_cover_every_message_kind():
    assert set(SAMPLES) == set(KINDS[Role.AGENT]) | set(KINDS[Role.WRAPPER])


def test_full_conversation(running):
    agent, wrapper = running
    assert pump(agent, wrapper, m.Ping(nonce=9)).nonce == 9
    assert pump(wrapper, agent, m.Pong(nonce=9)).nonce == 9
    for message in (m.StateChange(state=m.JobState.JOB_STATE_STARTED), m.Heartbeat(rss_bytes=5),
                    m.LogChunk(data=b"x")):
        assert pump(wrapper, agent, message) == message
    assert pump(agent, wrapper, SAMPLES["token_refresh"]).token.certificate_pem == b"C"
    stop = pump(agent, wrapper, m.Stop(reason=m.StopReason.STOP_REASON_PREEMPTED, deadline_s=30))
    assert stop.deadline_s == 30 and agent.our_state is State.STOPPING
    pump(agent, wrapper, m.Stop(deadline_s=5))  # a later Stop may shorten the deadline
    result = pump(wrapper, agent, m.Result(final_state=m.JobState.JOB_STATE_FAILED_WRAPPER, signal=15,
                                           failure_class=m.FailureClass.FAILURE_CLASS_STOPPED))
    assert result.WhichOneof("termination") == "signal"
    assert wrapper.our_state is State.FINISHED and agent.their_state is State.FINISHED
    agent.receive_data(b"")
    assert agent.next_event() is ConnectionClosed
    wrapper.receive_data(b"")
    assert wrapper.next_event() is ConnectionClosed


def test_job_start_round_trips_every_field(pair):
    agent, wrapper = pair
    job = sample_job_start(job_id=2**63, attempt=7)
    assert pump(agent, wrapper, job) == job


def test_agent_may_pipeline_hello_and_job_before_ready():
    agent, wrapper = Connection(Role.AGENT), Connection(Role.WRAPPER)
    wrapper.receive_data(agent.send(m.make_hello("a")) + agent.send(sample_job_start()))
    assert isinstance(wrapper.next_event(), m.Hello)
    assert isinstance(wrapper.next_event(), m.JobStart)
    assert wrapper.next_event() is NEED_DATA
    # The wrapper may report on the job at once; the agent accepts it after Ready.
    agent.receive_data(wrapper.send(m.make_ready()) + wrapper.send(SAMPLES["state_change"]))
    assert isinstance(agent.next_event(), m.Ready)
    assert isinstance(agent.next_event(), m.StateChange)


def _all_cases():
    for role in Role:
        for state, kind in itertools.product([s for s in State if s not in (State.CLOSED, State.ERROR)],
                                             KINDS[role]):
            yield role, state, kind


@pytest.mark.parametrize("role,state,kind", list(_all_cases()))
def test_table_decides_both_sending_and_receiving(role, state, kind):
    """Every (sender, state, kind): legal exactly when TRANSITIONS says so, on both ends."""
    expected = TRANSITIONS.get((role, state, kind))
    if role is Role.WRAPPER and kind in NEEDS_JOB:
        job_sent = True  # the cross rule is tested separately
    else:
        job_sent = False
    sender, receiver = Connection(role), Connection(role.peer)
    sender.our_state, receiver.their_state = state, state
    for conn in (sender, receiver):
        conn._job_sent = job_sent
        conn._pending_pings.append(1)
    if expected is None:
        with pytest.raises(UnexpectedMessage) as err:
            sender.send(SAMPLES[kind])
        assert err.value.local and err.value.kind == kind and err.value.state == state.value
        assert sender.our_state is state  # a refused send changes nothing
        frame = _frame(role, kind)
        receiver.receive_data(frame)
        with pytest.raises(UnexpectedMessage) as err:
            receiver.next_event()
        assert not err.value.local and err.value.sender == role.value
        assert receiver.their_state is State.ERROR
    else:
        receiver.receive_data(sender.send(SAMPLES[kind]))
        event = receiver.next_event()
        assert type(event) is type(SAMPLES[kind])
        assert sender.our_state is expected and receiver.their_state is expected


def _frame(role: Role, kind: str) -> bytes:
    envelope = m.AgentMessage() if role is Role.AGENT else m.WrapperMessage()
    getattr(envelope, kind).CopyFrom(SAMPLES[kind])
    return encode_frame(envelope.SerializeToString())


@pytest.mark.parametrize("kind", sorted(NEEDS_JOB))
def test_job_messages_need_job_start(pair, kind):
    agent, wrapper = pair
    with pytest.raises(UnexpectedMessage, match="has not sent JobStart"):
        wrapper.send(SAMPLES[kind])
    agent.receive_data(_frame(Role.WRAPPER, kind))
    with pytest.raises(UnexpectedMessage, match="has not sent JobStart") as err:
        agent.next_event()
    assert not err.value.local


def test_pong_must_answer_a_ping(running):
    agent, wrapper = running
    with pytest.raises(UnexpectedMessage, match="answers no Ping"):
        wrapper.send(m.Pong(nonce=1))
    pump(agent, wrapper, m.Ping(nonce=1))
    pump(wrapper, agent, m.Pong(nonce=1))
    agent.receive_data(_frame(Role.WRAPPER, "pong"))  # a second, unsolicited Pong
    with pytest.raises(UnexpectedMessage, match="answers no Ping"):
        agent.next_event()


def test_sending_a_message_of_the_other_direction_is_local_error(pair):
    agent, wrapper = pair
    with pytest.raises(UnexpectedMessage, match="not a message the agent sends") as err:
        agent.send(m.Heartbeat())
    assert err.value.local
    with pytest.raises(UnexpectedMessage):
        wrapper.send(m.Ping())
    with pytest.raises(UnexpectedMessage):
        agent.send(m.JobSpec())


@pytest.mark.parametrize("role", list(Role))
def test_major_version_mismatch_refused(role):
    receiver = Connection(role.peer)
    greeting = (m.Hello(protocol_major=2, protocol_minor=0) if role is Role.AGENT
                else m.Ready(protocol_major=2, protocol_minor=3))
    envelope = m.AgentMessage(hello=greeting) if role is Role.AGENT else m.WrapperMessage(ready=greeting)
    receiver.receive_data(encode_frame(envelope.SerializeToString()))
    with pytest.raises(UnsupportedVersion) as err:
        receiver.next_event()
    assert err.value.ours == m.PROTOCOL_VERSION and err.value.theirs[0] == 2
    assert "major versions must match" in str(err.value)


def test_newer_minor_version_accepted():
    wrapper = Connection(Role.WRAPPER)
    wrapper.receive_data(encode_frame(m.AgentMessage(hello=m.Hello(protocol_major=1, protocol_minor=99))
                                      .SerializeToString()))
    assert isinstance(wrapper.next_event(), m.Hello)
    assert wrapper.peer_version == (1, 99)


def test_garbage_is_undecodable_and_sticky():
    agent = Connection(Role.AGENT)
    agent.receive_data(encode_frame(b"\xff\xff\xff\xff"))
    with pytest.raises(UndecodableMessage) as first:
        agent.next_event()
    with pytest.raises(UndecodableMessage) as second:
        agent.next_event()
    assert first.value is second.value and agent.their_state is State.ERROR


def test_empty_envelope_is_undecodable():
    agent = Connection(Role.AGENT)
    agent.receive_data(encode_frame(b""))
    with pytest.raises(UndecodableMessage, match="no message set"):
        agent.next_event()


@pytest.mark.parametrize("steps,closing,expect_clean", [
    ([], Role.WRAPPER, False),                      # wrapper died before Ready
    (["hello", "ready"], Role.WRAPPER, False),      # wrapper died after Ready, no Result
    (["hello", "ready", "job_start"], Role.WRAPPER, False),
    (["hello", "ready", "job_start", "result"], Role.WRAPPER, True),
    (["ready", "error"], Role.WRAPPER, True),       # Error is a last word too
    ([], Role.AGENT, False),                        # agent gone before Hello
    (["hello"], Role.AGENT, True),                  # a probe: Hello, Ready, close
    (["hello", "ready", "job_start"], Role.AGENT, True),
    (["hello", "ready", "job_start", "stop"], Role.AGENT, True),
])
def test_end_of_file_clean_or_peer_closed(steps, closing, expect_clean):
    conns = {Role.AGENT: Connection(Role.AGENT), Role.WRAPPER: Connection(Role.WRAPPER)}
    for kind in steps:
        role = Role.AGENT if kind in KINDS[Role.AGENT] else Role.WRAPPER
        pump(conns[role], conns[role.peer], SAMPLES[kind])
    observer = conns[closing.peer]
    observer.receive_data(b"")
    if expect_clean:
        assert observer.next_event() is ConnectionClosed
        assert observer.their_state is State.CLOSED
    else:
        with pytest.raises(PeerClosed) as err:
            observer.next_event()
        assert not err.value.local


def test_messages_after_result_are_refused(running):
    agent, wrapper = running
    pump(wrapper, agent, SAMPLES["result"])
    with pytest.raises(UnexpectedMessage):
        wrapper.send(m.Heartbeat())


def test_send_many_is_all_or_nothing(pair):
    agent, _ = pair
    with pytest.raises(UnexpectedMessage):
        agent.send_many([sample_job_start(), m.Ping(nonce=1), m.make_hello("again")])
    assert agent.our_state is State.GREETED and not agent._job_sent and not agent._pending_pings
    frames = agent.send_many([sample_job_start(), m.Ping(nonce=1)])
    assert agent.our_state is State.JOB and frames


def test_probed_wrapper_may_close_after_ready(pair):
    agent, _ = pair
    agent.send_eof()  # the agent only probed the wrapper: no job
    agent.receive_data(b"")
    assert agent.next_event() is ConnectionClosed


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_hand_built_envelope_equals_protobuf_serialisation(kind):
    """Connection writes key + length + message instead of copying into an envelope."""
    role = Role.AGENT if kind in KINDS[Role.AGENT] else Role.WRAPPER
    for message in (SAMPLES[kind], type(SAMPLES[kind])()):  # a full one and an empty one
        sender = Connection(role)
        sender.our_state = next(state for (r, state, k) in TRANSITIONS if r is role and k == kind)
        sender._job_sent = True
        sender._pending_pings.append(message.nonce if kind == "pong" else 1)
        assert sender.send(message) == _frame_of(role, kind, message)


def test_large_message_frame_equals_protobuf_serialisation(running):
    _, wrapper = running
    chunk = m.LogChunk(data=b"\x00\xff" * 300_000, offset=2**40)
    assert wrapper.send(chunk) == _frame_of(Role.WRAPPER, "log_chunk", chunk)


def _frame_of(role: Role, kind: str, message) -> bytes:
    envelope = m.AgentMessage() if role is Role.AGENT else m.WrapperMessage()
    getattr(envelope, kind).CopyFrom(message)
    return encode_frame(envelope.SerializeToString())


@pytest.mark.parametrize("data", [b"", b"x", b"y" * 200, b"z" * 100_000])
@pytest.mark.parametrize("stream,offset,skipped", [(0, 0, False), (1, 0, False), (2, 2**50, False),
                                                   (1, 7, True)])
def test_zero_copy_log_chunk_equals_protobuf_serialisation(running, data, stream, offset, skipped):
    agent, wrapper = running
    header, body = wrapper.send_log_chunk(data, stream=stream, offset=offset, skipped_before=skipped)
    expected = m.LogChunk(stream=stream, offset=offset, data=data, skipped_before=skipped)
    assert header + body == _frame_of(Role.WRAPPER, "log_chunk", expected)
    agent.receive_data(header + body)
    assert agent.next_event() == expected


def test_zero_copy_log_chunk_obeys_the_table(pair):
    _, wrapper = pair
    with pytest.raises(UnexpectedMessage, match="has not sent JobStart"):
        wrapper.send_log_chunk(b"x", stream=1, offset=0)


def test_pongs_answer_pings_in_order(running):
    agent, wrapper = running
    pump(agent, wrapper, m.Ping(nonce=10))
    pump(agent, wrapper, m.Ping(nonce=11))
    with pytest.raises(UnexpectedMessage, match="oldest unanswered Ping is 10"):
        wrapper.send(m.Pong(nonce=11))
    assert pump(wrapper, agent, m.Pong(nonce=10)).nonce == 10
    agent.receive_data(_frame_of(Role.WRAPPER, "pong", m.Pong(nonce=99)))
    with pytest.raises(UnexpectedMessage, match="carries nonce 99") as err:
        agent.next_event()
    assert not err.value.local


# ---------------------------------------------------------------------------
# Minors: negotiated, never exceeded; values from a newer peer read as UNKNOWN


def test_the_minor_in_use_is_the_smaller_one_and_zero_before_the_greeting():
    agent, wrapper = Connection(Role.AGENT), Connection(Role.WRAPPER)
    assert agent.negotiated_minor == wrapper.negotiated_minor == 0
    pump(agent, wrapper, m.Hello(protocol_major=1, protocol_minor=7, agent_id="a newer agent"))
    assert wrapper.negotiated_minor == m.PROTOCOL_VERSION[1] and wrapper.peer_version == (1, 7)
    pump(wrapper, agent, m.Ready(protocol_major=1, protocol_minor=0))
    assert agent.negotiated_minor == 0


@pytest.mark.parametrize("agent_minor", [0, 1])
def test_a_value_of_a_later_minor_is_refused_on_sending_and_changes_nothing(agent_minor):
    agent, wrapper = Connection(Role.AGENT), Connection(Role.WRAPPER)
    pump(agent, wrapper, m.Hello(protocol_major=1, protocol_minor=agent_minor))
    pump(wrapper, agent, m.make_ready())
    pump(agent, wrapper, m.JobStart(job_id=1, attempt=1))
    limit = m.Result(final_state=m.JobState.JOB_STATE_FAILED_LIMIT, failure_class=m.FailureClass.FAILURE_CLASS_LIMIT)
    assert wrapper.peer_knows("result", (("splitpilot.pipe.v1.FailureClass", 9),)) is (agent_minor >= 1)
    if agent_minor == 0:
        with pytest.raises(UnexpectedMessage) as info:
            wrapper.send(limit)
        assert info.value.local and "carries final_state JOB_STATE_FAILED_LIMIT, added in minor 1; the " \
            "negotiated protocol is 1.0" in str(info.value)
        assert wrapper.our_state is State.GREETED          # nothing counted as sent
        limit = m.Result(final_state=m.JobState.JOB_STATE_FAILED_WRAPPER,
                         failure_class=m.FailureClass.FAILURE_CLASS_STOPPED)
    assert isinstance(pump(wrapper, agent, limit), m.Result) and wrapper.our_state is State.FINISHED


def test_a_kind_of_a_later_minor_from_the_peer_is_a_protocol_error(monkeypatch):
    """No real kind is newer than minor 0 yet: pretend heartbeats came with minor 1, and let a wrapper of
    minor 1 send one to an agent that said minor 0 (the wrapper's own check is what would stop it)."""
    from pilot.pipe import protocol

    monkeypatch.setitem(protocol.KIND_MINOR, "heartbeat", 1)
    agent, wrapper = Connection(Role.AGENT), Connection(Role.WRAPPER)
    pump(agent, wrapper, m.Hello(protocol_major=1, protocol_minor=0))
    pump(wrapper, agent, m.make_ready())
    pump(agent, wrapper, m.JobStart(job_id=1, attempt=1))
    with pytest.raises(UnexpectedMessage) as refused:
        wrapper.send(m.Heartbeat(payload_pid=1))
    assert refused.value.local
    wrapper.peer_version = (1, 1)                           # a wrapper that ignores the agent's minor
    agent.receive_data(wrapper.send(m.Heartbeat(payload_pid=1)))
    with pytest.raises(UnexpectedMessage) as info:
        agent.next_event()
    assert not info.value.local and "was added in minor 1, but the negotiated protocol is 1.0" in str(info.value)


def test_unknown_enum_values_are_named_and_said_once(monkeypatch):
    from pilot.pipe import enums

    said: list[str] = []
    monkeypatch.setattr(enums, "report", said.append)
    monkeypatch.setattr(enums, "_seen", set())
    assert enums.name_of(m.FailureClass, m.FailureClass.FAILURE_CLASS_LIMIT) == "FAILURE_CLASS_LIMIT"
    for _ in range(3):
        assert enums.name_of(m.FailureClass, 42) == "FAILURE_CLASS_UNKNOWN(42)"
    assert enums.name_of(m.StopReason, 77) == "STOP_REASON_UNKNOWN(77)"
    assert enums.name_of(m.JobState, 99, sender="the wrapper") == "JOB_STATE_UNKNOWN(99)"
    assert enums.name_of(m.ErrorCode, 5) == "ERROR_CODE_UNKNOWN(5)"
    assert enums.name_of(m.LogStream, 3) == "LOG_STREAM_UNKNOWN(3)"
    assert len(said) == 5 and said[0] == ("the peer sent FailureClass value 42, which this side does not know "
                                          "(a newer peer?): read as FAILURE_CLASS_UNKNOWN(42)")
    assert said[2].startswith("the wrapper sent JobState value 99")
    assert not enums.known(m.ErrorCode, 5) and enums.known(m.ErrorCode, 4)
