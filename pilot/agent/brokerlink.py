"""What the agent needs from the broker, with the agent token only.

`AgentBroker` is the interface the agent's loop uses; `GrpcAgentBroker`
adapts pilot.api.client.AgentClient to it. Tests may pass another implementation.
A call the broker refuses because of the agent's token raises
`pilot.agent.refusal.AgentTokenRefused` (see that module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pilot.agent.refusal import AgentTokenRefused, probe_tls, refusal_of
from pilot.api.client import AgentClient, BrokerError, JobClient
from pilot.api.states import JobState
from pilot.pipe import messages as m
from pilot.tokens.files import certificate_pem, private_key_pem

__all__ = ["AgentBroker", "AgentTokenRefused", "GrpcAgentBroker", "NoOffer", "Offer", "RefreshedToken", "SlotRequest"]


@dataclass(frozen=True)
class SlotRequest:
    """What is free right now, as the agent offers it."""

    cores: int
    memory_mb: int
    disk_mb: int
    time_left_s: int
    platforms: tuple[str, ...] = ()
    containers: bool = False
    isolation: str = ""       # pilot.launch.isolation: what separates a job here ("none", "namespace", ...)


@dataclass(frozen=True)
class Offer:
    """A matched job, with its token and the key made here for it."""

    job_id: int
    attempt: int
    spec: m.JobSpec
    token_pem: bytes          # job certificate chain
    private_key_pem: bytes    # made on this node; goes to the wrapper over the pipe only
    token_not_after: int
    broker_heartbeat_s: int = 0   # how often the wrapper heartbeats the broker (0: the wrapper's default)
    liveness_from_pilot: bool = False   # the broker keeps the attempt alive from pilot heartbeats (see agent._vouched)


@dataclass(frozen=True)
class RefreshedToken:
    """A job token for the same job and attempt, with the key made here for it."""

    token_pem: bytes
    private_key_pem: bytes
    not_after: int


@dataclass(frozen=True)
class NoOffer:
    reason: str
    retry_after_s: float
    leave: bool = False


class AgentBroker(Protocol):
    address: str
    ca_pem: bytes

    def match(self, slot: SlotRequest, pilot_id: str, node: str) -> Offer | NoOffer: ...

    def pilot_heartbeat(self, pilot_id: str, node: str, running: list[tuple[int, int]], cores_in_use: int,
                        usage: dict[tuple[int, int], tuple[float, int, int]] | None = None,
                        ) -> tuple[list[tuple[int, int]], bool]:
        """Attempts to stop, and whether to leave. USAGE: the attempts this heartbeat keeps alive (those matched
        with liveness_from_pilot whose wrapper runs), with their payload's CPU s, RSS and sandbox bytes."""

    def report_pilot_end(self, pilot_id: str, node: str, jobs_run: int, reason: str,
                         abandoned: bool = False) -> None:
        """ABANDONED: the agent died without ending its jobs (the guardian reports it)."""

    def report_attempt_failure(self, job_id: int, attempt: int, failure: int, detail: str,
                               pilot_id: str) -> None:
        """FAILURE: a splitpilot.broker.v1.AttemptFailure value."""

    def refresh_job_token(self, token_pem: bytes, private_key_pem: bytes) -> RefreshedToken:
        """A fresh token for the job of TOKEN_PEM (JobService.RefreshToken with that token; a new key made here)."""

    def report_job_unusable(self, token_pem: bytes, private_key_pem: bytes, detail: str) -> None:
        """End the attempt of TOKEN_PEM as the job's own input failure (STARTED, then FAILED_INPUT with DETAIL),
        with the job's token: the job cannot be handed to a wrapper as described."""

    def close(self) -> None: ...


class GrpcAgentBroker:
    """AgentBroker over gRPC: pilot.api.client.AgentClient with the agent token.

    Every call raises AgentTokenRefused when the broker refuses the token (see refusal_of)."""

    def __init__(self, address: str, token, ca_pem: bytes | None = None, probe_timeout: float = 5.0) -> None:
        self._client = AgentClient(address, token, ca_pem)
        self._token = token
        self._probe_timeout = probe_timeout
        self.address = address
        self.ca_pem = self._client.ca_pem

    def probe(self) -> str | None:
        return probe_tls(self.address, certificate_pem([self._token.chain[0]]), private_key_pem(self._token.key),
                         self.ca_pem, self._probe_timeout)

    def _guard(self, call, *args):
        try:
            return call(*args)
        except BrokerError as exc:
            refused = refusal_of(exc, self.probe)
            if refused is not None:
                raise refused from None
            raise

    def match(self, slot: SlotRequest, pilot_id: str, node: str) -> Offer | NoOffer:
        answer = self._guard(self._client.match, dict(
            cores=slot.cores, memory_mb=slot.memory_mb, disk_mb=slot.disk_mb, time_left_s=slot.time_left_s,
            platforms=list(slot.platforms), containers=slot.containers, isolation=slot.isolation), pilot_id, node)
        if not answer.matched:
            return NoOffer(answer.reason, float(answer.retry_after_s or 1), answer.leave)
        return Offer(answer.job_id, answer.attempt, answer.spec, answer.token_pem, answer.key_pem,
                     int(answer.not_after.timestamp()), answer.broker_heartbeat_s, answer.liveness_from_pilot)

    def pilot_heartbeat(self, pilot_id, node, running, cores_in_use, usage=None):
        answer = self._guard(self._client.pilot_heartbeat, pilot_id, node, running, cores_in_use, usage)
        return answer.stop, answer.leave

    def report_pilot_end(self, pilot_id, node, jobs_run, reason, abandoned=False):
        if abandoned:
            self._guard(lambda: self._client.report_pilot_end(pilot_id, node, jobs_run, reason, abandoned=True))
        else:
            self._guard(self._client.report_pilot_end, pilot_id, node, jobs_run, reason)

    def report_attempt_failure(self, job_id, attempt, failure, detail, pilot_id):
        self._guard(self._client.report_attempt_failure, job_id, attempt, failure, detail, pilot_id)

    def _job_client(self, token_pem: bytes, private_key_pem: bytes):
        return JobClient(self.address, token_pem, private_key_pem, self.ca_pem, retries=0)

    def refresh_job_token(self, token_pem, private_key_pem):
        with self._job_client(token_pem, private_key_pem) as client:
            not_after = client.refresh_token()
            return RefreshedToken(client.token_pem, client.key_pem, int(not_after.timestamp()))

    def report_job_unusable(self, token_pem, private_key_pem, detail):
        with self._job_client(token_pem, private_key_pem) as client:
            client.update_state(JobState.STARTED, "the agent could not hand the job to a wrapper")
            client.update_state(JobState.FAILED_INPUT, detail)

    def close(self):
        self._client.close()
