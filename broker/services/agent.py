"""AgentService: match jobs for the agent's site and report pilots (agent tokens).

Match is the hot path: one store call on a successful match (the claim), one
certificate signature, no other round trip. The site and the agent's expiry
come from its verified (cached) token, never from the request.

Every call names a pilot id; the store binds it to the calling certificate
(serial, holder, site) on its first call and refuses, with PERMISSION_DENIED
and without changing anything, any later call naming it with another
certificate: an agent can affect only its own pilots and the jobs they hold.
"""

from __future__ import annotations

import logging
import time

from cryptography.hazmat.primitives import serialization

from broker.lifecycle import RequeueCause
from broker.services.base import BadRequest, Broker, job_public_key, rpc, text, to_ms, utcnow
from broker.store.base import PilotRef, SlotOffer
from pilot.tokens import Identity
from splitpilot.broker.v1 import broker_pb2 as pb
from splitpilot.broker.v1 import broker_pb2_grpc as rpc_pb

log = logging.getLogger("splitpilot.broker")

SERVICE = "AgentService"

#: AttemptFailure -> how the store re-queues (None: stopped for a limit: FAILED_LIMIT, final).
FAILURE_CAUSES = {
    pb.ATTEMPT_FAILURE_WRAPPER: RequeueCause.WRAPPER,
    pb.ATTEMPT_FAILURE_INFRASTRUCTURE: RequeueCause.INFRASTRUCTURE,
    pb.ATTEMPT_FAILURE_STOPPED: RequeueCause.STOPPED,
    pb.ATTEMPT_FAILURE_LIMIT: None,
    pb.ATTEMPT_FAILURE_AGENT: RequeueCause.AGENT,
}
_unknown_failures: set[int] = set()
#: Attempts one pilot heartbeat may list: more cores than any worker node has (a bound on what a peer sends).
MAX_RUNNING = 1024


def failure_cause(value: int) -> RequeueCause | None:
    """How an AttemptFailure re-queues. A value this broker does not know (a newer agent's) is taken as
    ATTEMPT_FAILURE_WRAPPER, as broker.proto documents (logged once per value): the attempt is ended
    now rather than left to the reaper."""
    if value in FAILURE_CAUSES:
        return FAILURE_CAUSES[value]
    if value == pb.ATTEMPT_FAILURE_UNSPECIFIED:
        raise BadRequest("failure is not set; fix: send an AttemptFailure class, e.g. ATTEMPT_FAILURE_WRAPPER")
    if value not in _unknown_failures:
        _unknown_failures.add(value)
        log.warning("ReportAttemptFailure: failure class %d is unknown to this broker (a newer agent?); taken as "
                    "ATTEMPT_FAILURE_WRAPPER", value)
    return RequeueCause.WRAPPER

_PEM = serialization.Encoding.PEM


def _isolation(value: str) -> str:
    if len(value) > 64 or not all(" " <= c <= "~" for c in value):
        raise BadRequest(f"slot.isolation {value[:80]!r} must be at most 64 printable ASCII characters; fix: send "
                         "the launcher's isolation name (pilot.launch.isolation), e.g. 'namespace'")
    return value


def _reason(value: str) -> str:
    """A pilot's end reason as stored: control characters replaced, at most 1,000 characters."""
    return "".join(c if c.isprintable() else "?" for c in value[:1000])


def _pilot_id(value: str) -> str:
    if not value or len(value) > 256 or not value.isprintable():
        raise BadRequest("pilot_id must be 1-256 printable characters; fix: send the glidein's unique pilot id")
    return value


def _pilot(identity: Identity, pilot_id: str, node: str) -> PilotRef:
    """The calling pilot: its id from the request, everything else from the verified certificate."""
    return PilotRef(pilot_id=_pilot_id(pilot_id), site=identity.site or "", node=text(node, 256),
                    subject=identity.subject, serial=f"{identity.serial:x}", not_after=identity.not_after)


class AgentServicer(rpc_pb.AgentServiceServicer):
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    @rpc(SERVICE)
    async def Match(self, identity: Identity, request: pb.MatchRequest, context) -> pb.MatchResponse:
        broker = self.broker
        started = time.monotonic()  # the Match latency histogram: from here to the answer
        key = job_public_key(request.job_public_key)
        pilot = _pilot(identity, request.pilot_id, request.node)
        slot = request.slot
        site = identity.site or ""
        offer = SlotOffer(site=site, cores=slot.cores, memory_mb=slot.memory_mb, disk_mb=slot.disk_mb,
                          time_left_s=slot.time_left_s, platforms=tuple(slot.platforms),
                          containers=slot.containers, isolation=_isolation(slot.isolation))
        now = utcnow()
        assignment = await broker.call(broker.store.match, offer, pilot, now)
        broker.offers.note(offer, to_ms(now))  # in memory: why-is-my-job-waiting, no store access here
        if assignment is None:
            return await self._no_match(site, started)
        try:
            certificate = broker.ca.issue_job_token(
                identity, job_id=assignment.job_id, attempt=assignment.attempt, owner=assignment.owner,
                public_key=key, ttl=broker.settings.job_token_ttl, now=now)
        except Exception as exc:
            # The job is claimed but cannot run without a token: give it back now
            # instead of waiting for the start timeout.
            log.error("job %d attempt %d: no job token could be issued (%s); re-queueing it",
                      assignment.job_id, assignment.attempt, exc)
            await broker.call(broker.store.attempt_failed, assignment.job_id, assignment.attempt, pilot,
                              RequeueCause.INFRASTRUCTURE, f"job token not issued: {exc}", now)
            broker.metrics.match_result("refused", time.monotonic() - started)
            raise
        broker.metrics.match_result("matched", time.monotonic() - started)
        broker.metrics.queued_for(site, (now - assignment.submitted).total_seconds())
        return pb.MatchResponse(job=pb.MatchedJob(
            job_id=assignment.job_id, attempt=assignment.attempt, spec=assignment.spec,
            job_token_pem=certificate.public_bytes(_PEM) + broker.ca_pem,
            token_not_after_unix=int(certificate.not_valid_after_utc.timestamp()),
            broker_heartbeat_s=broker.settings.broker_heartbeat_s, liveness_from_pilot=True))

    async def _no_match(self, site: str, started: float) -> pb.MatchResponse:
        broker = self.broker
        state = await broker.call(broker.store.site_state, site)
        if state != "enabled":
            broker.metrics.match_result("refused", time.monotonic() - started)
            return pb.MatchResponse(no_match=pb.NoMatch(
                reason=f"site {site} is {state}: no new jobs; leave", retry_after_s=0, leave=True))
        broker.metrics.match_result("empty", time.monotonic() - started)
        return pb.MatchResponse(no_match=pb.NoMatch(
            reason="no waiting job fits this slot", retry_after_s=broker.settings.empty_retry_s, leave=False))

    @rpc(SERVICE)
    async def PilotHeartbeat(self, identity: Identity, request: pb.PilotHeartbeatRequest,
                             context) -> pb.PilotHeartbeatResponse:
        broker = self.broker
        pilot = _pilot(identity, request.pilot_id, request.node)
        if len(request.running) > MAX_RUNNING:
            raise BadRequest(f"the heartbeat lists {len(request.running)} running attempts, more than the "
                             f"{MAX_RUNNING} one pilot may hold; fix: list only the attempts this pilot runs")
        running = [(r.job_id, r.attempt) for r in request.running]
        # The agent vouches for the attempts whose wrapper it heard from (usage set): they stay alive as with
        # their own Heartbeat. The store refreshes only attempts this pilot holds (see pilot_heartbeat).
        usage = {(r.job_id, r.attempt): (r.usage.cpu_seconds, r.usage.rss_bytes)
                 for r in request.running if r.HasField("usage")}
        stop = await broker.call(broker.store.pilot_heartbeat, pilot, running, utcnow(), usage)
        state = await broker.call(broker.store.site_state, pilot.site)
        return pb.PilotHeartbeatResponse(stop=[pb.RunningAttempt(job_id=j, attempt=a) for j, a in stop],
                                         leave=state != "enabled")

    @rpc(SERVICE)
    async def ReportPilotEnd(self, identity: Identity, request: pb.ReportPilotEndRequest,
                             context) -> pb.ReportPilotEndResponse:
        broker = self.broker
        pilot = _pilot(identity, request.pilot_id, request.node)
        pilot_id = pilot.pilot_id
        reason = _reason(request.reason)
        ended = await broker.call(broker.store.pilot_end, pilot, request.jobs_run, reason, utcnow(),
                                  abandoned=request.abandoned)
        for attempt in ended:
            broker.metrics.reaped.labels("pilot_end").inc()
            log.info("pilot %s ended holding job %d attempt %d: now %s", pilot_id, attempt.job_id, attempt.attempt,
                     attempt.new_state.name)
        log.log(logging.WARNING if request.abandoned else logging.DEBUG, "pilot %s at %s ended after %d job(s)%s: %s",
                pilot_id, pilot.site, request.jobs_run, " (its agent died)" if request.abandoned else "", reason)
        return pb.ReportPilotEndResponse()

    @rpc(SERVICE)
    async def ReportAttemptFailure(self, identity: Identity, request: pb.ReportAttemptFailureRequest,
                                   context) -> pb.ReportAttemptFailureResponse:
        broker = self.broker
        cause = failure_cause(request.failure)
        pilot = _pilot(identity, request.pilot_id, "")
        pilot_id = pilot.pilot_id
        detail = _reason(request.detail)
        state = await broker.call(broker.store.attempt_failed, request.job_id, request.attempt, pilot,
                                  cause, detail, utcnow())
        failure = pb.AttemptFailure.Name(request.failure) if request.failure in FAILURE_CAUSES else str(request.failure)
        log.info("pilot %s reported job %d attempt %d failed (%s: %s): now %s", pilot_id, request.job_id,
                 request.attempt, failure, detail, state.name)
        return pb.ReportAttemptFailureResponse(state=int(state))
