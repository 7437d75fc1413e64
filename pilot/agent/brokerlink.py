"""What the agent needs from the broker, with the agent token only.

`AgentBroker` is the interface the agent's loop uses; `GrpcAgentBroker`
adapts broker.client.AgentClient to it. Tests may pass another implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pilot.pipe import messages as m


@dataclass(frozen=True)
class SlotRequest:
    """What is free right now, as the agent offers it."""

    cores: int
    memory_mb: int
    disk_mb: int
    time_left_s: int
    platforms: tuple[str, ...] = ()
    containers: bool = False


@dataclass(frozen=True)
class Offer:
    """A matched job, with its token and the key made here for it."""

    job_id: int
    attempt: int
    spec: m.JobSpec
    token_pem: bytes          # job certificate chain
    private_key_pem: bytes    # made on this node; goes to the wrapper over the pipe only
    token_not_after: int


@dataclass(frozen=True)
class NoOffer:
    reason: str
    retry_after_s: float
    leave: bool = False


class AgentBroker(Protocol):
    address: str
    ca_pem: bytes

    def match(self, slot: SlotRequest, pilot_id: str, node: str) -> Offer | NoOffer: ...

    def pilot_heartbeat(self, pilot_id: str, node: str, running: list[tuple[int, int]],
                        cores_in_use: int) -> tuple[list[tuple[int, int]], bool]:
        """Attempts to stop, and whether to leave."""

    def report_pilot_end(self, pilot_id: str, node: str, jobs_run: int, reason: str) -> None: ...

    def report_attempt_failure(self, job_id: int, attempt: int, failure: int, detail: str,
                               pilot_id: str) -> None:
        """FAILURE: a splitpilot.broker.v1.AttemptFailure value."""

    def close(self) -> None: ...
