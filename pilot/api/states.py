"""Job states as the broker's API carries them, and how a peer's state number is read.

The client (pilot.api) and the broker (broker.lifecycle, which holds the
transitions) share these. Peers may be newer than this code: `read_state`
turns any state number into a JobState, a value this code does not know into
an UNKNOWN(n) pseudo-state (logged once), where the plain `JobState(n)`
raises ValueError.
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
            # The pseudo-member's value is the bare number (the enum's own members hold theirs the same way);
            # the checker types an IntEnum's _value_ as the enum.
            state._value_ = value  # type: ignore[assignment]
            _unknown[value] = state
            log.warning("job state %d is unknown to this version (a newer peer?); shown as %s", value, state.name)
    return state


S = JobState

FINAL_STATES: Final[frozenset[JobState]] = frozenset({
    S.DONE, S.FAILED_INPUT, S.FAILED_EXECUTION, S.FAILED_OUTPUT, S.FAILED_WRAPPER,
    S.KILLED, S.EXPIRED, S.LOST, S.FAILED_LIMIT})
ACTIVE_STATES: Final[frozenset[JobState]] = frozenset({S.ASSIGNED, S.STARTED, S.RUNNING, S.SAVING})
