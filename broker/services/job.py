"""JobService: a job attempt acting on itself (job tokens).

The job id and attempt come from the token, never from the request. Fencing:
a token whose attempt is not the job's current one is refused with
FAILED_PRECONDITION (the store checks it for state changes, heartbeats and
outputs; the reads below check it against the job record first).
"""

from __future__ import annotations

import datetime
import logging

from cryptography.hazmat.primitives import serialization

from broker.files import StoredFile
from broker.lifecycle import JOB_REPORTABLE
from broker.services.base import (
    BadRequest,
    Broker,
    Conflict,
    NotFound,
    job_public_key,
    receive_file,
    rpc,
    rpc_stream,
    send_file,
    text,
    utcnow,
)
from broker.store.base import JobRecord, OutputRecord
from pilot.api.states import ACTIVE_STATES, JobState
from pilot.tokens import Identity, TokenRole
from pilot.tokens.errors import StaleAttempt, WrongJob
from splitpilot.broker.v1 import broker_pb2 as pb
from splitpilot.broker.v1 import broker_pb2_grpc as rpc_pb
from splitpilot.job.v1 import job_pb2

log = logging.getLogger("splitpilot.broker")

SERVICE = "JobService"
_REPORTABLE_NAMES = ", ".join(sorted(s.name for s in JOB_REPORTABLE))


class JobServicer(rpc_pb.JobServiceServicer):
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def _current(self, identity: Identity, *, active: bool = True) -> JobRecord:
        """The job record, if the token's attempt is the current one (fencing)."""
        broker = self.broker
        record = await broker.call(broker.store.get, identity.job_id, with_history=False)
        # A re-queued job waits for its next attempt: the last one is over.
        current = record.attempt + 1 if record.state is JobState.WAITING else record.attempt
        if current != identity.attempt:
            if identity.attempt < current:
                raise StaleAttempt(record.job_id, identity.attempt, current)
            raise WrongJob((record.job_id, identity.attempt), (record.job_id, current))
        if active and record.state not in ACTIVE_STATES:
            raise Conflict(f"job {record.job_id} attempt {record.attempt} is {record.state.name}"
                           f"{': ' + record.message if record.message else ''}; it may not act any more "
                           "(the wrapper should stop)")
        return record

    @rpc(SERVICE)
    async def UpdateState(self, identity: Identity, request: pb.UpdateStateRequest, context) -> pb.UpdateStateResponse:
        broker = self.broker
        try:
            state = JobState(request.state)
        except ValueError:
            state = None
        if state not in JOB_REPORTABLE:
            name = job_pb2.JobState.Name(request.state) if request.state in job_pb2.JobState.values() \
                else str(request.state)
            raise BadRequest(f"a job cannot report {name}; fix: report one of {_REPORTABLE_NAMES} (a state this "
                             "broker does not know is refused: update the broker, or report an older state)")
        if request.sequence < 1:
            raise BadRequest("sequence must start at 1 and grow by one per update; fix: number the updates of "
                             "this attempt 1, 2, 3, ...")
        exit_code = request.exit_code if request.HasField("exit_code") else None
        result = await broker.call(broker.store.job_update, identity.job_id, identity.attempt, state,
                                   request.sequence, text(request.detail), exit_code, utcnow())
        if result.state.final and not result.replay:
            log.info("job %d attempt %d ended %s%s", identity.job_id, identity.attempt, result.state.name,
                     f" (exit {exit_code})" if exit_code is not None else "")
        return pb.UpdateStateResponse(state=int(result.state), replay=result.replay)

    @rpc(SERVICE)
    async def Heartbeat(self, identity: Identity, request: pb.HeartbeatRequest, context) -> pb.HeartbeatResponse:
        broker = self.broker
        kill = await broker.call(broker.store.job_heartbeat, identity.job_id, identity.attempt, request.cpu_seconds,
                                 request.rss_bytes, request.sandbox_bytes, utcnow())
        return pb.HeartbeatResponse(kill=bool(kill))

    @rpc_stream(SERVICE)
    async def GetInput(self, identity: Identity, request: pb.GetInputRequest, context):
        record = await self._current(identity)
        for item in record.spec.input_files:
            if item.name == request.name:
                break
        else:
            names = ", ".join(repr(i.name) for i in record.spec.input_files) or "none"
            raise NotFound(f"job {record.job_id} has no input named {request.name!r} (inputs: {names}); "
                           "fix: ask for a name from the job spec's input_files")
        async for chunk in send_file(self.broker, item.name, item.size, item.sha256, pb.GetInputResponse):
            yield chunk

    @rpc(SERVICE)
    async def PutOutput(self, identity: Identity, request_iterator, context) -> pb.PutOutputResponse:
        broker = self.broker
        store, files = broker.store, broker.files
        job_id, attempt = identity.job_id, identity.attempt
        reservation: int | None = None

        async def before_data(header: pb.FileHeader) -> None:
            # Fencing and the job's output limits on the header alone, before any data: the declared
            # size is reserved in the store, atomically with every other upload of this attempt.
            nonlocal reservation
            reservation = await broker.call_or_undo(store.release_reservation, store.reserve_output, job_id, attempt,
                                                    header.name, header.size, files.max_job_bytes,
                                                    files.max_job_files, utcnow())

        def record(header: pb.FileHeader, stored: StoredFile) -> StoredFile:
            # Under the file store's lock: the output row takes the reservation's place, and content
            # the name held before is freed unless something else still refers to it.
            nonlocal reservation
            replaced = store.add_output(job_id, attempt, OutputRecord(header.name, stored.size, stored.sha256),
                                        utcnow(), reservation=reservation)
            reservation = None
            if replaced is not None:
                try:
                    files.free(replaced)
                except Exception:  # noqa: BLE001 (the output is recorded; the old bytes merely stay)
                    log.exception("job %d: the replaced content %s of output %r could not be freed", job_id,
                                  replaced, header.name)
            return stored

        try:
            _header, stored = await receive_file(broker, request_iterator, what="output name", record=record,
                                                 before_data=before_data)
        finally:
            if reservation is not None:  # refused, broken or cancelled after the header: give it back
                await broker.finally_(store.release_reservation, reservation)
        return pb.PutOutputResponse(sha256=stored.sha256, size=stored.size)

    @rpc(SERVICE)
    async def RefreshToken(self, identity: Identity, request: pb.RefreshTokenRequest,
                           context) -> pb.RefreshTokenResponse:
        broker = self.broker
        key = job_public_key(request.public_key, "public_key")
        record = await self._current(identity)
        now = utcnow()
        # Never outlive the agent certificate bound to the pilot holding the job (durable: recorded by
        # the store at the pilot's first call, the same for every broker). That is the point of a
        # refresh: a job may outlive its first token, never its pilot's. Only for a pilot with no
        # recorded certificate (bound before schema 2) is the presented token the cap: no lengthening.
        holder_expiry = await broker.call(broker.store.pilot_expiry, record.pilot_id)
        cap = holder_expiry if holder_expiry is not None else identity.not_after
        if request.time_left_s:
            cap = min(cap, now + datetime.timedelta(seconds=min(request.time_left_s, 10 * 365 * 86400)))
        certificate = broker.ca.issue(TokenRole.JOB, record.owner, key, job_id=record.job_id,
                                      attempt=record.attempt, ttl=broker.settings.job_token_ttl,
                                      not_after_cap=cap, now=now)
        return pb.RefreshTokenResponse(
            job_token_pem=certificate.public_bytes(serialization.Encoding.PEM) + broker.ca_pem,
            token_not_after_unix=int(certificate.not_valid_after_utc.timestamp()))
