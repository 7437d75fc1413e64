"""Reading enum values a newer peer may send: an explicit "unknown", logged once, never an exception.

Protobuf enums are open in proto3: a value this side's schema does not know
(a newer peer's) arrives as its bare number. Comparing it with known values
is harmless; what raises is asking its name (`FailureClass.Name(42)` is a
ValueError). Every place that names a value read from a peer goes through
`name_of`, which returns e.g. "FAILURE_CLASS_UNKNOWN(42)" and reports the
first sighting of each (enum, value) once, through `report` (by
default the process's log: the agent's and the wrapper's).

What each side *does* with an unknown value is decided where it is read and
documented at the enum in pipe.proto: an unknown final state or failure
class is a wrapper failure, re-queued and not charged to the node; an
unknown StopReason is a generic stop; an unknown ErrorCode a wrapper
failure; an unknown LogStream or intermediate state is only logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

_seen: set[tuple[str, int]] = set()
_seen_lock = threading.Lock()


#: Where first sightings go (tests may replace it): a WARNING `pipe: ...` line in the process's log.
report: Callable[[str], None] = logging.getLogger("splitpilot.pipe").warning


def known(enum, value: int) -> bool:
    """Whether VALUE is a value of ENUM (a generated EnumTypeWrapper) in this side's schema."""
    return value in enum.DESCRIPTOR.values_by_number


def unknown_name(enum, value: int) -> str:
    """The reading of an unknown VALUE of ENUM: its prefix, UNKNOWN and the number (FAILURE_CLASS_UNKNOWN(42))."""
    first = enum.DESCRIPTOR.values[0].name          # the *_UNSPECIFIED = 0 value every enum here starts with
    prefix = first[:-len("UNSPECIFIED")] if first.endswith("UNSPECIFIED") else f"{enum.DESCRIPTOR.name}_"
    return f"{prefix}UNKNOWN({value})"


def name_of(enum, value: int, *, sender: str = "the peer") -> str:
    """VALUE's name in ENUM, or its unknown reading (reported once per enum and value)."""
    described = enum.DESCRIPTOR.values_by_number.get(value)
    if described is not None:
        return described.name
    name = unknown_name(enum, value)
    key = (enum.DESCRIPTOR.full_name, value)
    with _seen_lock:
        first = key not in _seen
        _seen.add(key)
    if first:
        report(f"{sender} sent {enum.DESCRIPTOR.name} value {value}, which this side does not know (a newer "
               f"peer?): read as {name}")
    return name
