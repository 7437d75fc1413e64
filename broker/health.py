"""The standard gRPC health service (grpc.health.v1.Health) on the broker's own port.

SERVING while the store answers, NOT_SERVING while it does not and, for good,
once the broker is stopping (so a load balancer or a monitoring probe stops
sending calls during the grace period). The answer covers the whole server
(service "") and each of the four broker services by full name; any other
name is NOT_FOUND, as the standard says.

Who may ask: any valid token of a client role (user, admin, agent, job),
through the same mutual TLS and the same revocation check as every other
call. The answer tells nothing a caller could not learn by making a call,
and a monitor is given a token like any client; a peer without a token from
this CA never reaches the handler (the TLS handshake refuses it), and a
revoked token is refused by name.

The store is asked at most once per `min_interval` seconds, however many
probes arrive (a flood of health checks cannot become a flood of queries);
the server's revocation thread, which queries the store every few seconds
anyway, reports what it saw too, so that Watch streams hear of a change
without anyone calling Check.
"""

from __future__ import annotations

import asyncio
import logging
import time

from grpc_health.v1 import health, health_pb2

from broker.auth import SERVICE_ROLES
from broker.services.base import Broker, rpc, status_of
from splitpilot.broker.v1 import broker_pb2 as pb

log = logging.getLogger("splitpilot.broker")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

#: The names a health request may ask about: the whole server, and each broker service.
SERVICES = ("", *(service.full_name for service in pb.DESCRIPTOR.services_by_name.values()))


class BrokerHealth(health.aio.HealthServicer):
    """grpc_health's asyncio servicer, behind the broker's authentication, fed by store probes."""

    def __init__(self, broker: Broker, *, min_interval: float = 1.0) -> None:
        super().__init__()
        self.broker = broker
        self.min_interval = min_interval
        self._probed = float("-inf")
        self._serving: bool | None = None
        self._lock = asyncio.Lock()

    @rpc("Health")
    async def Check(self, identity, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:
        await self.probe()
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        try:
            self.broker.auth.identify(context, SERVICE_ROLES["Health"])
        except Exception as exc:  # noqa: BLE001 (every refusal becomes a status, as in rpc())
            await context.abort(*status_of(exc))
        await self.probe()
        await super().Watch(request, context)

    async def probe(self) -> None:
        """Ask the store whether it answers, unless it was asked within min_interval."""
        if self._gracefully_shutting_down or time.monotonic() - self._probed < self.min_interval:
            return
        async with self._lock:  # concurrent checks share one probe
            if time.monotonic() - self._probed < self.min_interval:
                return
            try:
                await self.broker.call(self.broker.store.revocation_generation)
                serving = True
            except Exception as exc:  # noqa: BLE001 (any failure of the store means: do not send calls here)
                log.warning("health: the store does not answer (%s): NOT_SERVING", exc)
                serving = False
            self._probed = time.monotonic()
            await self.observe(serving)

    async def observe(self, serving: bool) -> None:
        """Record what a query of the store just showed (the probe, or the server's revocation thread)."""
        if serving != self._serving:
            if serving and self._serving is not None:
                log.info("health: the store answers again: SERVING")
            self._serving = serving
            for service in SERVICES:
                await self.set(service, SERVING if serving else NOT_SERVING)


__all__ = ["SERVICES", "BrokerHealth"]
