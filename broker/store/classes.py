"""Requirement classes: what lets a match look at a few rows, not the queue.

Jobs with identical requirements (cores, memory, disk, walltime, platform,
container image, allowed and denied sites) share one class row. A match
asks which classes fit the slot (a check in memory over the class table,
which stays small: one row per distinct requirement set, not per job) and
then reads only the head waiting job of each fitting class through the
partial index jobs_waiting.

Classes are never deleted or changed, so each process keeps them in a
`ClassCache` and fetches only the ids above the highest it knows. New
classes are written in the transaction that inserts their first jobs (so a
refused submission leaves none behind), and become visible in id order
(SQLite serialises writers; PostgreSQL holds an advisory lock to the commit):
a match that sees a class id above its cache's refreshes the cache first.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from broker.store.base import SlotOffer
from splitpilot.job.v1 import job_pb2

#: Joins site lists in the class table (and platform sets in site_offers); the names never contain it
#: (the broker refuses site names and platforms with control characters at submit).
SEPARATOR = "\n"


@dataclass(frozen=True)
class RequirementClass:
    """The matching-relevant part of a job's Requirements, normalised."""

    cores: int
    memory_mb: int
    disk_mb: int
    walltime_s: int
    platform: str
    container_image: str
    sites_allowed: frozenset[str]
    sites_denied: frozenset[str]

    @classmethod
    def of(cls, requirements: job_pb2.Requirements) -> RequirementClass:
        return cls(cores=max(1, requirements.cores), memory_mb=requirements.memory_mb,
                   disk_mb=requirements.disk_mb, walltime_s=requirements.walltime_s,
                   platform=requirements.platform, container_image=requirements.container_image,
                   sites_allowed=frozenset(requirements.sites_allowed),
                   sites_denied=frozenset(requirements.sites_denied))

    @property
    def key(self) -> str:
        """A canonical text: equal requirements give equal keys."""
        return json.dumps([self.cores, self.memory_mb, self.disk_mb, self.walltime_s, self.platform,
                           self.container_image, sorted(self.sites_allowed), sorted(self.sites_denied)],
                          separators=(",", ":"))

    def row(self) -> tuple:
        """(key, cores, memory_mb, disk_mb, walltime_s, platform, container_image, allowed, denied)."""
        return (self.key, self.cores, self.memory_mb, self.disk_mb, self.walltime_s, self.platform,
                self.container_image, SEPARATOR.join(sorted(self.sites_allowed)),
                SEPARATOR.join(sorted(self.sites_denied)))

    @classmethod
    def from_row(cls, row: Sequence) -> RequirementClass:
        """Inverse of `row()` without the key: (cores, memory, disk, walltime, platform, image, allowed, denied)."""
        cores, memory_mb, disk_mb, walltime_s, platform, image, allowed, denied = row
        return cls(int(cores), int(memory_mb), int(disk_mb), int(walltime_s), platform, image,
                   frozenset(allowed.split(SEPARATOR)) if allowed else frozenset(),
                   frozenset(denied.split(SEPARATOR)) if denied else frozenset())

    def fits(self, slot: SlotOffer) -> bool:
        """Whether a job of this class may run in SLOT."""
        return (self.cores <= slot.cores
                and self.memory_mb <= slot.memory_mb
                and self.disk_mb <= slot.disk_mb
                and self.walltime_s <= slot.time_left_s
                and (not self.sites_allowed or slot.site in self.sites_allowed)
                and slot.site not in self.sites_denied
                and (not self.platform or self.platform in slot.platforms)
                and (not self.container_image or slot.containers))


#: Columns of the classes table read by the cache, in `ClassCache.add` order.
CLASS_COLUMNS = "id, cores, memory_mb, disk_mb, walltime_s, platform, container_image, sites_allowed, sites_denied"
CLASS_INSERT_COLUMNS = ("key, cores, memory_mb, disk_mb, walltime_s, platform, container_image, "
                        "sites_allowed, sites_denied, created")


class ClassCache:
    """This process's copy of the class table (thread-safe).

    `fitting(slot)` answers from memory and remembers answers per slot
    shape; any new class clears those answers.
    """

    _MAX_MEMO = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[int, RequirementClass] = {}
        self._by_key: dict[str, int] = {}
        self._max_id = 0
        self._memo: dict[SlotOffer, tuple[int, ...]] = {}

    @property
    def max_id(self) -> int:
        return self._max_id

    def add(self, rows: Iterable[Sequence]) -> None:
        """Rows of CLASS_COLUMNS (id first)."""
        with self._lock:
            for row in rows:
                class_id = int(row[0])
                if class_id in self._by_id:
                    continue
                requirement = RequirementClass.from_row(row[1:])
                self._by_id[class_id] = requirement
                self._by_key[requirement.key] = class_id
                self._max_id = max(self._max_id, class_id)
                self._memo.clear()

    def id_of(self, key: str) -> int | None:
        return self._by_key.get(key)

    def fitting(self, slot: SlotOffer) -> tuple[int, ...]:
        """Ids of the classes whose jobs fit SLOT."""
        found = self._memo.get(slot)
        if found is not None:
            return found
        with self._lock:
            found = tuple(class_id for class_id, requirement in self._by_id.items() if requirement.fits(slot))
            if len(self._memo) >= self._MAX_MEMO:
                self._memo.clear()
            self._memo[slot] = found
        return found

    def __len__(self) -> int:
        return len(self._by_id)
