"""AdminService: sites, pilots, requeues, everyone's jobs, and token revocation (admin tokens).

Revocation: RevokeToken records the revocation in the store and applies it
in this broker at once; every other broker on the same database picks it up
at its next refresh (`--revocation-refresh`, 2 s by default). A token can be
named by serial (if some broker on the database has seen it), by its
certificate (even one never used), or by holder and role (every token of
that holder issued until now).
"""

from __future__ import annotations

import datetime
import logging
import re

from broker.lifecycle import RequeueCause
from broker.services.base import BadRequest, Broker, rpc, text, to_ms, utcnow
from broker.services.user import checked_name, list_jobs
from broker.store.base import PILOT_STATES, NotRevocable, Revocation
from pilot.tokens import Identity, TokenRole, TokenVerifier
from pilot.tokens.errors import IssueError, TokenError
from pilot.tokens.files import load_certificates
from pilot.tokens.identity import check_name
from splitpilot.broker.v1 import broker_pb2 as pb
from splitpilot.broker.v1 import broker_pb2_grpc as rpc_pb
from splitpilot.job.v1 import job_pb2

log = logging.getLogger("splitpilot.broker")

SERVICE = "AdminService"

SITE_STATES = {pb.SITE_STATE_ENABLED: "enabled", pb.SITE_STATE_DRAINING: "draining",
               pb.SITE_STATE_DISABLED: "disabled"}
SITE_STATE_VALUES = {name: value for value, name in SITE_STATES.items()}
#: Roles a revocation may name (host tokens never call the broker).
REVOCABLE_ROLES = tuple(r.value for r in (TokenRole.USER, TokenRole.ADMIN, TokenRole.AGENT, TokenRole.JOB))
MAX_REASON = 500
#: Revocations per ListRevoked answer: ~200 bytes each, well inside gRPC's 4 MiB message limit.
MAX_REVOKED_PAGE = 10_000
#: The longest failure window ListSites counts over.
MAX_FAILURE_WINDOW_S = 7 * 86400
_SERIAL_RE = re.compile(r"(?:0x)?([0-9a-f]{1,40})")


def parse_serial(text: str) -> str:
    """A certificate serial as lower-case hex without leading zeros ('0x' and ':' separators accepted)."""
    found = _SERIAL_RE.fullmatch(text.strip().lower().replace(":", ""))
    if found is None:
        raise BadRequest(f"serial {text[:80]!r} is not a hexadecimal certificate serial; fix: copy it from "
                         "`splitpilot token show FILE` (serial:) or ListPilots")
    return f"{int(found.group(1), 16):x}"


def _reason(text: str) -> str:
    reason = text.strip()
    if not reason or len(reason) > MAX_REASON or not reason.isprintable():
        raise BadRequest(f"reason must be 1-{MAX_REASON} printable characters; fix: say why the token is revoked "
                         "(the refused holder is shown it), e.g. --reason 'laptop stolen'")
    return reason


def revoked_info(revocation: Revocation) -> pb.RevokedToken:
    return pb.RevokedToken(id=revocation.id, serial=revocation.serial, subject=revocation.subject,
                           role=revocation.role, reason=revocation.reason,
                           revoked_unix_ms=to_ms(revocation.revoked), revoked_by=revocation.revoked_by,
                           not_after_unix_ms=to_ms(revocation.not_after) if revocation.not_after else 0)


class AdminServicer(rpc_pb.AdminServiceServicer):
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    @rpc(SERVICE)
    async def SetSiteState(self, identity: Identity, request: pb.SetSiteStateRequest,
                           context) -> pb.SetSiteStateResponse:
        broker = self.broker
        if request.state not in SITE_STATES:
            raise BadRequest(f"state {request.state} is not one this broker takes; fix: send SITE_STATE_ENABLED, "
                             "_DRAINING or _DISABLED")
        try:
            check_name("site", request.site)
        except IssueError as exc:
            raise BadRequest(exc.detail) from None
        previous = await broker.call(broker.store.set_site_state, request.site, SITE_STATES[request.state],
                                     text(request.reason), utcnow())
        log.info("%s set site %s %s -> %s (%s)", identity.subject, request.site, previous,
                 SITE_STATES[request.state], request.reason)
        return pb.SetSiteStateResponse(previous=SITE_STATE_VALUES.get(previous, pb.SITE_STATE_UNSPECIFIED))

    @rpc(SERVICE)
    async def ListPilots(self, identity: Identity, request: pb.ListPilotsRequest, context) -> pb.ListPilotsResponse:
        broker = self.broker
        if request.state not in ("", *PILOT_STATES):
            raise BadRequest(f"state {request.state[:40]!r} is not a pilot state; fix: send "
                             f"{' or '.join(repr(s) for s in PILOT_STATES)}, or leave state empty for both")
        site = checked_name("site", request.site) if request.site else ""
        limit = min(request.limit or broker.settings.list_default, broker.settings.list_max)
        now = utcnow()
        since = now - datetime.timedelta(seconds=request.seen_within_s or 3600)
        pilots = await broker.call(broker.store.list_pilots, since, now=now, site=site, state=request.state,
                                   limit=limit, heavy=True)
        return pb.ListPilotsResponse(pilots=[
            pb.PilotInfo(pilot_id=p.pilot_id, site=p.site, node=p.node, first_seen_unix_ms=to_ms(p.first_seen),
                         last_seen_unix_ms=to_ms(p.last_seen), jobs_matched=p.jobs_matched,
                         end_reason=p.end_reason, certificate_serial=p.certificate_serial, alive=p.alive,
                         jobs_run=p.jobs_run, current_job_ids=p.current_job_ids,
                         ended_unix_ms=to_ms(p.ended) if p.ended else 0) for p in pilots])

    @rpc(SERVICE)
    async def ListSites(self, identity: Identity, request: pb.ListSitesRequest, context) -> pb.ListSitesResponse:
        broker = self.broker
        window = request.failures_within_s or 3600
        if window > MAX_FAILURE_WINDOW_S:
            raise BadRequest(f"failures_within_s {window} is longer than {MAX_FAILURE_WINDOW_S} s (7 days); fix: "
                             "ask for a shorter window, or 0 for one hour")
        now = utcnow()
        sites = await broker.call(broker.store.list_sites, now, now - datetime.timedelta(seconds=window),
                                  heavy=True)
        # Bounded like every listing (sites are few; the bound only guards the message size).
        return pb.ListSitesResponse(failures_within_s=window, sites=[
            pb.SiteInfo(site=s.site, state=SITE_STATE_VALUES.get(s.state, pb.SITE_STATE_UNSPECIFIED),
                        reason=s.reason, state_updated_unix_ms=to_ms(s.state_updated) if s.state_updated else 0,
                        pilots_alive=s.pilots_alive, jobs_running=s.jobs_running, jobs_waiting=s.jobs_waiting,
                        failures_by_class={job_pb2.JobState.Name(int(state)): n for state, n in s.failures.items()},
                        empty_pilots=s.empty_pilots) for s in sites[:broker.settings.list_max]])

    @rpc(SERVICE)
    async def Requeue(self, identity: Identity, request: pb.RequeueRequest, context) -> pb.RequeueResponse:
        broker = self.broker
        reason = text(request.reason) or f"requeued by {identity.subject}"
        attempt = await broker.call(broker.store.requeue, request.job_id, RequeueCause.ADMIN, reason, utcnow())
        log.info("%s requeued job %d (%s): attempt %d", identity.subject, request.job_id, reason, attempt)
        return pb.RequeueResponse(attempt=attempt)

    @rpc(SERVICE)
    async def ListAllJobs(self, identity: Identity, request: pb.ListAllJobsRequest,
                          context) -> pb.ListAllJobsResponse:
        return await list_jobs(self.broker, None, request, pb.ListAllJobsResponse)

    @rpc(SERVICE)
    async def RevokeToken(self, identity: Identity, request: pb.RevokeTokenRequest,
                          context) -> pb.RevokeTokenResponse:
        broker = self.broker
        reason = _reason(request.reason)
        target = request.WhichOneof("target")
        not_after = None
        if target == "serial":
            serial = parse_serial(request.serial)
            await broker.call(broker.flush_seen, heavy=True)  # what this broker saw counts at once
            seen = await broker.call(broker.store.seen_token, serial)
            if seen is None:
                raise NotRevocable(serial)
            subject, role, not_after = seen.subject, seen.role, seen.not_after
        elif target == "holder":
            subject, role, serial = request.holder.subject, request.holder.role, ""
            try:
                check_name("subject", subject)
            except IssueError as exc:
                raise BadRequest(f"holder: {exc.detail}") from None
            if role not in REVOCABLE_ROLES:
                raise BadRequest(f"holder role {role[:40]!r} is not one of {', '.join(REVOCABLE_ROLES)}; fix: name "
                                 "the role of the tokens to revoke")
        elif target == "certificate_pem":
            revoked = self._certificate(bytes(request.certificate_pem[:1 << 16]))
            if revoked.role.value not in REVOCABLE_ROLES:
                raise BadRequest(f"certificate_pem is a {revoked.role.value} token, which never calls the broker; "
                                 "fix: to replace the broker's own host token, remove STATE/host.pem and restart")
            serial, subject, role, not_after = (f"{revoked.serial:x}", revoked.subject, revoked.role.value,
                                                revoked.not_after)
        else:
            raise BadRequest("say which token to revoke; fix: set serial, holder (subject and role) or "
                             "certificate_pem")
        revocation, already = await broker.call(broker.store.revoke, serial, subject, role, reason,
                                                identity.subject, not_after, utcnow(), heavy=True)
        broker.auth.revoked.add(revocation)  # here at once; other brokers at their next refresh
        log.warning("%s revoked %s: %s%s", identity.subject,
                    f"token serial {serial} ({role} {subject})" if serial else
                    f"every {role} token of {subject} issued until now", reason,
                    " (already revoked)" if already else "")
        return pb.RevokeTokenResponse(revoked=revoked_info(revocation), already_revoked=already)

    def _certificate(self, data: bytes) -> Identity:
        """The identity of a token certificate issued by this broker's CA (expired or not)."""
        try:
            leaf = load_certificates(data, "certificate_pem")[0]
            when = min(max(utcnow(), leaf.not_valid_before_utc), leaf.not_valid_after_utc)
            return TokenVerifier([self.broker.ca.certificate]).verify([leaf], now=when)
        except TokenError as exc:
            raise BadRequest(f"certificate_pem: {exc}; fix: send the certificate of a token issued by this "
                             "broker's CA (the token file's first PEM block; never its key)") from None

    @rpc(SERVICE)
    async def ListRevoked(self, identity: Identity, request: pb.ListRevokedRequest,
                          context) -> pb.ListRevokedResponse:
        broker = self.broker
        limit = min(request.limit or MAX_REVOKED_PAGE, MAX_REVOKED_PAGE)
        # One more than the page: whether another page follows, without a count.
        after = min(request.after_id, 2**63 - 1)  # a uint64 beyond the databases' integers: nothing after it
        revocations = await broker.call(broker.store.revocations, after, limit + 1, heavy=True)
        return pb.ListRevokedResponse(revoked=[revoked_info(r) for r in revocations[:limit]],
                                      more=len(revocations) > limit)
