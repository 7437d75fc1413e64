"""Why a waiting job has not matched: what the sites' pilots offered, and the analysis.

Every Match tells the broker what one slot offers. `OfferLog` folds these into
per-site maxima in memory, per time bucket and for all time: one dictionary
update per Match, no store access on the match path, whatever the queue. The
reaper thread (and any call that needs fresh figures) flushes them into the
store's site_offers table, where every broker on the database adds its own.

`analyse` compares a waiting job's requirements with the recent maxima of
each site (HTCondor's `condor_q -better-analyze` is the model: per site, which
requirements nothing offered), and `never_offered` with the all-time maxima
of every site (the warning at submit). Both are pure functions of their
arguments.

The figures are per field: a site that offered 64 cores in one slot and
500 GB in another looks able to run a job needing both at once. That keeps
them to one row per site and bucket; "no site offered X" is still exact.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from broker.store.base import JobStore, OfferRecord, SlotOffer
from broker.store.classes import SEPARATOR, RequirementClass
from splitpilot.broker.v1 import broker_pb2 as pb

#: The most platform names one site's record keeps (a hostile agent cannot grow it).
MAX_PLATFORMS = 64
_MAX_PLATFORM_CHARS = 256
_INT63 = 2**63 - 1


@dataclass(frozen=True)
class OfferSettings:
    """How offers are summarised (ServiceSettings holds these)."""

    #: Offers of the last WINDOW seconds are "recent".
    window_s: int = 3600
    #: Width of one time bucket, seconds.
    bucket_s: int = 300

    @property
    def keep_ms(self) -> int:
        """Buckets older than this are dropped from the store (the window, and one bucket to spare)."""
        return (self.window_s + self.bucket_s) * 1000


def _clamp(value: int) -> int:
    return max(0, min(int(value), _INT63))


def _platforms(names: Iterable[str]) -> frozenset[str]:
    """The platform names worth keeping: printable, short, at most MAX_PLATFORMS."""
    kept = sorted({n for n in names if n and len(n) <= _MAX_PLATFORM_CHARS and n.isprintable()
                   and SEPARATOR not in n})
    return frozenset(kept[:MAX_PLATFORMS])


def merge(a: OfferRecord, b: OfferRecord) -> OfferRecord:
    """A.merged(B), with the platform set kept within MAX_PLATFORMS."""
    merged = a.merged(b)
    if len(merged.platforms) > MAX_PLATFORMS:
        merged = OfferRecord(merged.site, merged.bucket, merged.cores, merged.memory_mb, merged.disk_mb,
                             merged.time_left_s, merged.containers, _platforms(merged.platforms), merged.last_offer)
    return merged


class OfferLog:
    """This process's offers not yet in the store (thread-safe: Match notes them on the event loop, the
    reaper thread and calls in the thread pool flush them)."""

    def __init__(self, settings: OfferSettings | None = None) -> None:
        self.settings = settings or OfferSettings()
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, int], OfferRecord] = {}

    def note(self, offer: SlotOffer, ms: int) -> None:
        """A slot of OFFER.site offered this at MS (Unix ms)."""
        bucket_ms = self.settings.bucket_s * 1000
        record = OfferRecord(offer.site, ms - ms % bucket_ms, _clamp(offer.cores), _clamp(offer.memory_mb),
                             _clamp(offer.disk_mb), _clamp(offer.time_left_s), bool(offer.containers),
                             _platforms(offer.platforms), ms)
        with self._lock:
            for bucket in (record.bucket, 0):
                key = (offer.site, bucket)
                current = self._pending.get(key)
                mine = record if bucket else _in_bucket(record, 0)
                self._pending[key] = mine if current is None else merge(current, mine)

    def flush(self, store: JobStore, now_ms: int) -> int:
        """Write the pending offers into STORE (and drop old buckets there); returns how many records were
        written. On failure they stay pending for the next flush."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return 0
        try:
            store.merge_offers(list(pending.values()), now_ms - self.settings.keep_ms)
        except BaseException:
            with self._lock:
                for key, record in pending.items():
                    current = self._pending.get(key)
                    self._pending[key] = record if current is None else merge(current, record)
            raise
        return len(pending)


def _in_bucket(record: OfferRecord, bucket: int) -> OfferRecord:
    return OfferRecord(record.site, bucket, record.cores, record.memory_mb, record.disk_mb, record.time_left_s,
                       record.containers, record.platforms, record.last_offer)


# ------------------------------------------------------------------ the analysis

def site_rules(requirement: RequirementClass, site: str) -> list[pb.UnmetRequirement]:
    """The site lists of REQUIREMENT that exclude SITE."""
    unmet = []
    if requirement.sites_allowed and site not in requirement.sites_allowed:
        unmet.append(pb.UnmetRequirement(requirement="sites_allowed", offered=site,
                                         wanted=", ".join(sorted(requirement.sites_allowed))))
    if site in requirement.sites_denied:
        unmet.append(pb.UnmetRequirement(requirement="sites_denied", wanted=f"not {site}", offered=site))
    return unmet


def resources(requirement: RequirementClass, offer: OfferRecord, where: str = "") -> list[pb.UnmetRequirement]:
    """The resources REQUIREMENT asks for that OFFER lacks (WHERE: appended to the offered figures)."""
    at = f" ({where})" if where else ""
    unmet = []
    for field, wanted, offered in (("cores", requirement.cores, offer.cores),
                                   ("memory_mb", requirement.memory_mb, offer.memory_mb),
                                   ("disk_mb", requirement.disk_mb, offer.disk_mb),
                                   ("walltime_s", requirement.walltime_s, offer.time_left_s)):
        if wanted > offered:
            unmet.append(pb.UnmetRequirement(requirement=field, wanted=str(wanted), offered=f"{offered}{at}"))
    if requirement.platform and requirement.platform not in offer.platforms:
        unmet.append(pb.UnmetRequirement(requirement="platform", wanted=requirement.platform,
                                         offered=(", ".join(sorted(offer.platforms)) or "none") + at))
    if requirement.container_image and not offer.containers:
        unmet.append(pb.UnmetRequirement(requirement="container_image",
                                         wanted=f"a container runtime (image {requirement.container_image[:200]})",
                                         offered="none" + at))
    return unmet


def unmet_at(requirement: RequirementClass, offer: OfferRecord) -> list[pb.UnmetRequirement]:
    """Everything REQUIREMENT asks for that OFFER's site did not offer (site lists first)."""
    return site_rules(requirement, offer.site) + resources(requirement, offer)


def _best(records: Sequence[OfferRecord]) -> tuple[OfferRecord, dict[str, str]]:
    """The field-wise maximum of RECORDS, and for each resource field the site that offered it."""
    best = records[0]
    by: dict[str, str] = {}
    for field, attribute in (("cores", "cores"), ("memory_mb", "memory_mb"), ("disk_mb", "disk_mb"),
                             ("walltime_s", "time_left_s")):
        top = max(records, key=lambda r, a=attribute: getattr(r, a))
        by[field] = top.site
    for record in records[1:]:
        best = merge(best, _in_bucket(record, best.bucket))
    return best, by


def everywhere(requirement: RequirementClass, records: Sequence[OfferRecord]) -> list[pb.UnmetRequirement]:
    """What no site of RECORDS offered (each with the most any eligible site offered, and where), or []
    when one site offered all of it."""
    if any(not unmet_at(requirement, r) for r in records):
        return []
    eligible = [r for r in records if not site_rules(requirement, r.site)]
    if not eligible:
        seen = ", ".join(sorted({r.site for r in records}))
        field = "sites_allowed" if requirement.sites_allowed else "sites_denied"
        wanted = (", ".join(sorted(requirement.sites_allowed)) if requirement.sites_allowed
                  else "not " + ", ".join(sorted(requirement.sites_denied)))
        return [pb.UnmetRequirement(requirement=field, wanted=wanted, offered=seen)]
    best, by = _best(eligible)
    found = resources(requirement, best)
    for item in found:
        if item.requirement in by:
            item.offered = f"{item.offered} at {by[item.requirement]}"
    # Each field alone was offered somewhere, but no single site offered all of them together.
    return found or [pb.UnmetRequirement(requirement=u.requirement, wanted=u.wanted, offered=f"{u.offered} at {r.site}")
                     for r in eligible[:1] for u in resources(requirement, r)]


def describe(unmet: Sequence[pb.UnmetRequirement]) -> str:
    """'memory_mb 500000 (offered at most 8000 at SITE-A), platform el9 (offered el8)'."""
    return ", ".join(f"{u.requirement} {u.wanted} (offered: {u.offered})" for u in unmet)


def never_offered(requirement: RequirementClass, all_time: Sequence[OfferRecord]) -> list[pb.UnmetRequirement]:
    """What no site ever offered ([] when some site did, or when no pilot was ever seen: nothing is
    known then)."""
    return everywhere(requirement, all_time) if all_time else []


def analyse(requirement: RequirementClass, offers: Sequence[OfferRecord], site_states: dict[str, str],
            now: datetime.datetime, settings: OfferSettings, jobs_ahead: int = 0) -> pb.WaitAnalysis:
    """Why a waiting job of REQUIREMENT has not matched, from OFFERS (store.offers: all-time records,
    bucket 0, and recent buckets), the sites' admin states (absent: enabled) and the jobs ahead of it."""
    now_ms = int(now.timestamp() * 1000)
    since = now_ms - settings.window_s * 1000
    all_time = [r for r in offers if r.bucket == 0]
    recent: dict[str, OfferRecord] = {}
    for record in offers:
        if record.bucket and record.last_offer >= since:
            current = recent.get(record.site)
            recent[record.site] = record if current is None else merge(current, _in_bucket(record, current.bucket))
    window = _duration(settings.window_s)
    analysis = pb.WaitAnalysis(window_s=settings.window_s, jobs_ahead=jobs_ahead)
    never = never_offered(requirement, all_time)
    analysis.never_runnable = bool(never)
    for site in sorted(recent):
        record = recent[site]
        analysis.sites.add(site=site, state=site_states.get(site, "enabled"), unmet=unmet_at(requirement, record),
                           last_offer_unix_ms=record.last_offer)
    ahead = f", behind {jobs_ahead} job(s) with the same requirements" if jobs_ahead else ""
    if never:
        analysis.summary = (f"no pilot of any site has ever offered what this job needs: {describe(never)}; fix: "
                            "ask for less (resubmit), or ask the sites' operators for such slots")
    elif not recent:
        if not all_time:
            analysis.summary = ("no pilot has asked this broker for work yet, so nothing is known about the sites; "
                                "the job waits for the first pilots")
        else:
            last = max(r.last_offer for r in all_time)
            analysis.summary = (f"no pilot asked for work in the last {window} (the last at "
                                f"{datetime.datetime.fromtimestamp(last / 1000, datetime.UTC):%Y-%m-%d %H:%M:%S}Z); "
                                "the job waits for pilots; fix: check that glideins are sent to the sites")
    else:
        fitting = [s for s in analysis.sites if not s.unmet]
        enabled = [s.site for s in fitting if s.state == "enabled"]
        if enabled:
            analysis.summary = (f"{', '.join(enabled)} offered everything this job needs in the last {window}: it "
                                f"waits for a free slot there{ahead}")
        elif fitting:
            states = ", ".join(f"{s.site} ({s.state})" for s in fitting)
            analysis.summary = (f"only {states} offered everything this job needs in the last {window}, and "
                                "takes no new jobs; it waits until such a site is enabled or another offers it")
        else:
            missing = everywhere(requirement, list(recent.values()))
            analysis.summary = (f"no site offered everything this job needs in the last {window}: "
                                f"{describe(missing)}; it waits until one does (see each site below)")
    return analysis


def _duration(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


__all__ = ["OfferLog", "OfferSettings", "analyse", "describe", "never_offered"]
