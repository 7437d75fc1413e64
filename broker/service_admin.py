"""AdminService: sites, pilots, requeues and everyone's jobs (admin tokens)."""

from __future__ import annotations

import datetime
import logging

from broker.lifecycle import RequeueCause
from broker.service import BadRequest, Broker, rpc, to_ms, utcnow
from broker.service_user import list_jobs
from pilot.tokens import Identity
from pilot.tokens.errors import IssueError
from pilot.tokens.identity import check_name
from splitpilot.broker.v1 import broker_pb2 as pb
from splitpilot.broker.v1 import broker_pb2_grpc as rpc_pb

log = logging.getLogger("splitpilot.broker")

SERVICE = "AdminService"

SITE_STATES = {pb.SITE_STATE_ENABLED: "enabled", pb.SITE_STATE_DRAINING: "draining",
               pb.SITE_STATE_DISABLED: "disabled"}
SITE_STATE_VALUES = {name: value for value, name in SITE_STATES.items()}


class AdminServicer(rpc_pb.AdminServiceServicer):
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    @rpc(SERVICE)
    async def SetSiteState(self, identity: Identity, request: pb.SetSiteStateRequest,
                           context) -> pb.SetSiteStateResponse:
        broker = self.broker
        if request.state not in SITE_STATES:
            raise BadRequest("state must be SITE_STATE_ENABLED, _DRAINING or _DISABLED")
        try:
            check_name("site", request.site)
        except IssueError as exc:
            raise BadRequest(exc.detail) from None
        previous = await broker.call(broker.store.set_site_state, request.site, SITE_STATES[request.state],
                                     request.reason, utcnow())
        log.info("%s set site %s %s -> %s (%s)", identity.subject, request.site, previous,
                 SITE_STATES[request.state], request.reason)
        return pb.SetSiteStateResponse(previous=SITE_STATE_VALUES.get(previous, pb.SITE_STATE_UNSPECIFIED))

    @rpc(SERVICE)
    async def ListPilots(self, identity: Identity, request: pb.ListPilotsRequest, context) -> pb.ListPilotsResponse:
        broker = self.broker
        since = utcnow() - datetime.timedelta(seconds=request.seen_within_s or 3600)
        pilots = await broker.call(broker.store.list_pilots, since, heavy=True)
        return pb.ListPilotsResponse(pilots=[
            pb.PilotInfo(pilot_id=p.pilot_id, site=p.site, node=p.node, first_seen_unix_ms=to_ms(p.first_seen),
                         last_seen_unix_ms=to_ms(p.last_seen), jobs_matched=p.jobs_matched,
                         end_reason=p.end_reason) for p in pilots])

    @rpc(SERVICE)
    async def Requeue(self, identity: Identity, request: pb.RequeueRequest, context) -> pb.RequeueResponse:
        broker = self.broker
        reason = request.reason or f"requeued by {identity.subject}"
        attempt = await broker.call(broker.store.requeue, request.job_id, RequeueCause.ADMIN, reason, utcnow())
        log.info("%s requeued job %d (%s): attempt %d", identity.subject, request.job_id, reason, attempt)
        return pb.RequeueResponse(attempt=attempt)

    @rpc(SERVICE)
    async def ListAllJobs(self, identity: Identity, request: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        return await list_jobs(self.broker, None, request)
