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

The states themselves, and `read_state` for a peer's state number, are the
API's: pilot.api.states.
"""

from __future__ import annotations

import enum
from typing import Final

from pilot.api.states import JobState

S = JobState


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


#: Final states an admin may re-queue, with a fresh count of attempts: failures a broken site, node,
#: input server or queue may have caused (the admin knows). Not DONE (nothing to redo) and not
#: KILLED (its owner's wish); a job waiting or under way is re-queued by ending its attempt.
ADMIN_REQUEUABLE_FINAL: Final[frozenset[JobState]] = frozenset({
    S.FAILED_INPUT, S.FAILED_EXECUTION, S.FAILED_OUTPUT, S.FAILED_WRAPPER, S.FAILED_LIMIT, S.LOST, S.EXPIRED})

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
