"""Job states and the single table of legal transitions.

    WAITING -> ASSIGNED -> STARTED -> RUNNING -> SAVING -> DONE

Every FAILED_*, KILLED, EXPIRED and LOST state is final. FAILED_LIMIT is a
job stopped for exceeding its own memory, walltime or disk limit (reported by
its wrapper, or by the agent that killed it); KILLED is only ever a kill its
owner or an admin asked for. Who may cause each
transition is part of the table: the matcher (broker), the job itself (its
wrapper, through a job token), the reaper (missed heartbeats, assignments
never started), the owner or an admin (kill, requeue), or the agent on the
wrapper's behalf (a wrapper that died). A re-queue is not a transition of
the job's state machine alone: it ends the current attempt and starts the
next one in WAITING (attempt + 1), or fails the job for good once
max_attempts is reached (LOST for lost attempts, FAILED_WRAPPER for
wrapper/infrastructure failures). Stops (slot end, preemption), admin
re-queues and failures of the agent's own code re-queue without using up an
attempt: neither the job nor the node did anything wrong.

Peers may be newer than this broker: `read_state` turns any state number into
a JobState, a value this code does not know into an UNKNOWN(n) pseudo-state
(logged once), where the plain `JobState(n)` raises ValueError.
"""

from __future__ import annotations

import enum
import logging
import threading
from typing import Final

from splitpilot.job.v1 import job_pb2


class JobState(enum.IntEnum):
    """Mirrors splitpilot.job.v1.JobState (same numbers, stored as integers)."""

    WAITING = job_pb2.JOB_STATE_WAITING
    ASSIGNED = job_pb2.JOB_STATE_ASSIGNED
    STARTED = job_pb2.JOB_STATE_STARTED
    RUNNING = job_pb2.JOB_STATE_RUNNING
    SAVING = job_pb2.JOB_STATE_SAVING
    DONE = job_pb2.JOB_STATE_DONE
    FAILED_INPUT = job_pb2.JOB_STATE_FAILED_INPUT
    FAILED_EXECUTION = job_pb2.JOB_STATE_FAILED_EXECUTION
    FAILED_OUTPUT = job_pb2.JOB_STATE_FAILED_OUTPUT
    FAILED_WRAPPER = job_pb2.JOB_STATE_FAILED_WRAPPER
    KILLED = job_pb2.JOB_STATE_KILLED
    EXPIRED = job_pb2.JOB_STATE_EXPIRED
    LOST = job_pb2.JOB_STATE_LOST
    FAILED_LIMIT = job_pb2.JOB_STATE_FAILED_LIMIT

    @property
    def final(self) -> bool:
        return self in FINAL_STATES

    @property
    def active(self) -> bool:
        """An attempt is under way (a pilot holds the job)."""
        return self in ACTIVE_STATES

    @property
    def known(self) -> bool:
        """False for the UNKNOWN(n) pseudo-states of `read_state`."""
        return JobState._value2member_map_.get(self._value_) is self


log = logging.getLogger("splitpilot.lifecycle")
_unknown_lock = threading.Lock()
_unknown: dict[int, JobState] = {}


def read_state(value: int) -> JobState:
    """The JobState numbered VALUE as read from a peer: a value this code does not know (a newer
    broker's or wrapper's state) becomes the pseudo-state UNKNOWN(VALUE), neither final nor active,
    and is logged once per value instead of raising."""
    try:
        return JobState(value)
    except ValueError:
        pass
    with _unknown_lock:
        state = _unknown.get(value)
        if state is None:
            state = int.__new__(JobState, value)
            state._name_ = f"UNKNOWN({value})"
            state._value_ = value
            _unknown[value] = state
            log.warning("job state %d is unknown to this version (a newer peer?); shown as %s", value, state.name)
    return state


S = JobState

FINAL_STATES: Final[frozenset[JobState]] = frozenset({
    S.DONE, S.FAILED_INPUT, S.FAILED_EXECUTION, S.FAILED_OUTPUT, S.FAILED_WRAPPER,
    S.KILLED, S.EXPIRED, S.LOST, S.FAILED_LIMIT})
ACTIVE_STATES: Final[frozenset[JobState]] = frozenset({S.ASSIGNED, S.STARTED, S.RUNNING, S.SAVING})


class Actor(enum.Enum):
    """Who causes a transition."""

    MATCHER = "matcher"   # the broker's match (an agent asked)
    JOB = "job"           # the wrapper, with the job token
    REAPER = "reaper"     # the broker's timeouts
    OWNER = "owner"       # the user who submitted it, or an admin


#: (from, to) -> who may cause it. Re-queues (attempt + 1) are separate: see requeue_target.
TRANSITIONS: Final[dict[tuple[JobState, JobState], frozenset[Actor]]] = {
    (S.WAITING, S.ASSIGNED): frozenset({Actor.MATCHER}),
    (S.ASSIGNED, S.STARTED): frozenset({Actor.JOB}),
    (S.STARTED, S.RUNNING): frozenset({Actor.JOB}),
    (S.RUNNING, S.SAVING): frozenset({Actor.JOB}),
    (S.SAVING, S.DONE): frozenset({Actor.JOB}),
    # Failures the wrapper reports, from where they can happen.
    (S.STARTED, S.FAILED_INPUT): frozenset({Actor.JOB}),
    (S.STARTED, S.FAILED_EXECUTION): frozenset({Actor.JOB}),  # the payload could not start (its owner's fault)
    (S.RUNNING, S.FAILED_EXECUTION): frozenset({Actor.JOB}),
    (S.SAVING, S.FAILED_EXECUTION): frozenset({Actor.JOB}),  # payload failed; logs saved first
    (S.SAVING, S.FAILED_OUTPUT): frozenset({Actor.JOB}),
    (S.RUNNING, S.KILLED): frozenset({Actor.JOB}),           # the kill it was told of
    (S.SAVING, S.KILLED): frozenset({Actor.JOB}),
    # Its own limit (memory, walltime, disk): inputs may already fill the disk.
    (S.STARTED, S.FAILED_LIMIT): frozenset({Actor.JOB}),
    (S.RUNNING, S.FAILED_LIMIT): frozenset({Actor.JOB}),
    (S.SAVING, S.FAILED_LIMIT): frozenset({Actor.JOB}),
    # Kills by the owner: at once for queued jobs; running ones are told at
    # their next heartbeat and then report KILLED themselves.
    (S.WAITING, S.KILLED): frozenset({Actor.OWNER}),
    (S.ASSIGNED, S.KILLED): frozenset({Actor.OWNER}),
    # Jobs that wait too long in the queue.
    (S.WAITING, S.EXPIRED): frozenset({Actor.REAPER}),
}

#: States a job may report through UpdateState (never WAITING/ASSIGNED/LOST/EXPIRED).
JOB_REPORTABLE: Final[frozenset[JobState]] = frozenset(
    to for (_, to), actors in TRANSITIONS.items() if Actor.JOB in actors)


def allowed(current: JobState, new: JobState, actor: Actor) -> bool:
    return actor in TRANSITIONS.get((current, new), frozenset())


class RequeueCause(enum.Enum):
    """Why an attempt ends without a final state of its own."""

    LOST = "lost"                    # no heartbeat for too long
    NEVER_STARTED = "never started"  # ASSIGNED, no STARTED within the deadline
    WRAPPER = "wrapper"              # the wrapper died / broke the protocol (agent reports)
    INFRASTRUCTURE = "infrastructure"
    STOPPED = "stopped"              # slot end, preemption
    ADMIN = "admin"                  # an admin's requeue
    AGENT = "agent"                  # the agent's own code failed while it ran the attempt


#: Causes that never use up an attempt.
FREE_CAUSES: Final[frozenset[RequeueCause]] = frozenset({RequeueCause.STOPPED, RequeueCause.ADMIN,
                                                         RequeueCause.AGENT})


def requeue_target(cause: RequeueCause, attempt: int, max_attempts: int) -> JobState:
    """WAITING for another attempt, or the final state when attempts are used up.

    Stops (preemption, slot end), admin requeues and the agent's own failures
    never use up attempts: the job did nothing wrong and neither did the node.
    """
    if cause in FREE_CAUSES or attempt < max_attempts:
        return JobState.WAITING
    return JobState.LOST if cause in (RequeueCause.LOST, RequeueCause.NEVER_STARTED) else JobState.FAILED_WRAPPER
