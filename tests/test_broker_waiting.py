"""broker.waiting as pure functions: what the pilots offered (OfferLog) and why a job waits (analyse).

No broker, no store (a recording fake where a flush needs one), no sleeps: the time is an argument. The
same analysis through a real broker is in test_broker_robustness.py and test_broker_cli.py.
"""

from __future__ import annotations

import datetime

import pytest

from broker.store.base import OfferRecord, SlotOffer
from broker.store.classes import RequirementClass
from broker.waiting import MAX_PLATFORMS, OfferLog, OfferSettings, analyse, never_offered
from splitpilot.job.v1 import job_pb2

NOW = datetime.datetime(2026, 3, 1, 12, 0, tzinfo=datetime.UTC)
NOW_MS = int(NOW.timestamp() * 1000)
SETTINGS = OfferSettings(window_s=3600, bucket_s=300)


def needs(**fields) -> RequirementClass:
    fields.setdefault("walltime_s", 3600)
    return RequirementClass.of(job_pb2.Requirements(**fields))


def record(site: str, *, bucket: int = 0, cores: int = 8, memory_mb: int = 16000, disk_mb: int = 10000,
           time_left_s: int = 86400, containers: bool = False, platforms=("el9",), last: int = NOW_MS - 60_000
           ) -> OfferRecord:
    return OfferRecord(site, bucket, cores, memory_mb, disk_mb, time_left_s, containers, frozenset(platforms), last)


def seen(*records: OfferRecord) -> list[OfferRecord]:
    """Each record as the store returns it: all time (bucket 0) and its recent bucket."""
    found = []
    for r in records:
        found += [r, OfferRecord(r.site, r.last_offer - r.last_offer % 300_000, r.cores, r.memory_mb, r.disk_mb,
                                 r.time_left_s, r.containers, r.platforms, r.last_offer)]
    return found


class RecordingStore:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.merged: list[tuple[list[OfferRecord], int]] = []

    def merge_offers(self, offers, drop_before_ms) -> None:
        if self.fail:
            raise ConnectionError("database away")
        self.merged.append((sorted(offers, key=lambda o: (o.site, o.bucket)), drop_before_ms))


# ------------------------------------------------------------------ OfferLog

def test_offers_fold_into_site_maxima_per_bucket_and_all_time():
    log = OfferLog(SETTINGS)
    log.note(SlotOffer("SITE-A", 4, 8000, 100, 3600, ("el9",), False), NOW_MS)
    log.note(SlotOffer("SITE-A", 2, 64000, 50, 600, ("el8",), True), NOW_MS + 1)
    log.note(SlotOffer("SITE-B", 1, 1, 1, 1, (), False), NOW_MS + 2)
    store = RecordingStore()
    assert log.flush(store, NOW_MS) == 4
    [(offers, drop)] = store.merged
    assert drop == NOW_MS - (3600 + 300) * 1000
    bucket = NOW_MS - NOW_MS % 300_000
    by_key = {(o.site, o.bucket): o for o in offers}
    assert set(by_key) == {("SITE-A", 0), ("SITE-A", bucket), ("SITE-B", 0), ("SITE-B", bucket)}
    a = by_key[("SITE-A", 0)]
    assert (a.cores, a.memory_mb, a.disk_mb, a.time_left_s, a.containers, a.platforms, a.last_offer) == \
        (4, 64000, 100, 3600, True, {"el8", "el9"}, NOW_MS + 1)
    assert log.flush(store, NOW_MS) == 0  # nothing pending: nothing written


def test_a_hostile_agents_offer_is_bounded():
    """Platforms with control characters or line breaks are not kept (they would corrupt the stored set), the
    set is capped, and numbers beyond 63 bits are clamped."""
    log = OfferLog(SETTINGS)
    names = tuple(f"p{i:03d}" for i in range(200)) + ("bad\nname", "esc\x1b", "x" * 300, "")
    log.note(SlotOffer("SITE-A", 2**32 - 1, 2**64 - 1, 2**64 - 1, 2**64 - 1, names, True), NOW_MS)
    store = RecordingStore()
    log.flush(store, NOW_MS)
    offer = store.merged[0][0][0]
    assert len(offer.platforms) == MAX_PLATFORMS and all(p.startswith("p") for p in offer.platforms)
    assert offer.memory_mb == offer.disk_mb == offer.time_left_s == 2**63 - 1


def test_a_failed_flush_keeps_the_offers_for_the_next():
    log = OfferLog(SETTINGS)
    log.note(SlotOffer("SITE-A", 4, 8000, 100, 3600, ("el9",), False), NOW_MS)
    with pytest.raises(ConnectionError):
        log.flush(RecordingStore(fail=True), NOW_MS)
    log.note(SlotOffer("SITE-A", 8, 1, 1, 1, (), False), NOW_MS + 5)
    store = RecordingStore()
    assert log.flush(store, NOW_MS + 10) == 2
    all_time = next(o for o in store.merged[0][0] if o.bucket == 0)
    assert (all_time.cores, all_time.memory_mb) == (8, 8000)  # the kept and the new, merged


# ------------------------------------------------------------------ analyse

def test_nothing_known_before_any_pilot():
    wait = analyse(needs(cores=64), [], {}, NOW, SETTINGS)
    assert not wait.never_runnable and list(wait.sites) == []
    assert wait.summary.startswith("no pilot has asked this broker for work yet")
    assert never_offered(needs(cores=64), []) == []


def test_a_site_that_offered_everything_means_a_free_slot_is_awaited():
    wait = analyse(needs(cores=4, platform="el9"), seen(record("SITE-A"), record("SITE-B", cores=2)), {}, NOW,
                   SETTINGS, jobs_ahead=3)
    assert wait.summary == ("SITE-A offered everything this job needs in the last 1 h: it waits for a free slot "
                            "there, behind 3 job(s) with the same requirements")
    sites = {s.site: s for s in wait.sites}
    assert list(sites["SITE-A"].unmet) == [] and [u.requirement for u in sites["SITE-B"].unmet] == ["cores"]
    assert sites["SITE-B"].unmet[0].wanted == "4" and sites["SITE-B"].unmet[0].offered == "2"


def test_every_requirement_is_checked_per_site():
    job = needs(cores=16, memory_mb=32000, disk_mb=20000, walltime_s=7200, platform="el9-arm",
                container_image="/cvmfs/image", sites_allowed=["SITE-A", "SITE-B"], sites_denied=["SITE-B"])
    offers = seen(record("SITE-A", time_left_s=3600), record("SITE-B"), record("SITE-C", cores=64))
    wait = analyse(job, offers, {"SITE-C": "disabled"}, NOW, SETTINGS)
    sites = {s.site: s for s in wait.sites}
    assert [u.requirement for u in sites["SITE-A"].unmet] == ["cores", "memory_mb", "disk_mb", "walltime_s",
                                                               "platform", "container_image"]
    assert [u.requirement for u in sites["SITE-B"].unmet][:1] == ["sites_denied"]
    assert [u.requirement for u in sites["SITE-C"].unmet][:1] == ["sites_allowed"]
    assert sites["SITE-C"].state == "disabled"
    assert wait.never_runnable  # no site ever offered an arm platform and a container runtime at an allowed site
    assert "no pilot of any site has ever offered what this job needs" in wait.summary


def test_a_fitting_site_that_takes_no_jobs_is_named_with_its_state():
    wait = analyse(needs(cores=2), seen(record("SITE-A")), {"SITE-A": "draining"}, NOW, SETTINGS)
    assert wait.summary.startswith("only SITE-A (draining) offered everything this job needs")


def test_offers_older_than_the_window_are_not_recent_but_count_for_ever():
    old = record("SITE-A", last=NOW_MS - 2 * 3600 * 1000)
    wait = analyse(needs(cores=2), seen(old), {}, NOW, SETTINGS)
    assert list(wait.sites) == [] and not wait.never_runnable
    assert wait.summary.startswith("no pilot asked for work in the last 1 h (the last at 2026-03-01 10:00:00Z)")
    assert analyse(needs(cores=64), seen(old), {}, NOW, SETTINGS).never_runnable


def test_what_no_single_site_offered_is_named_with_the_best_offer_and_where():
    offers = [record("SITE-A", cores=64, memory_mb=1000), record("SITE-B", cores=2, memory_mb=500000)]
    unmet = never_offered(needs(cores=32, memory_mb=100000), offers)
    assert unmet, "each field was offered somewhere, but never both at one site"
    assert [(u.requirement, u.wanted) for u in never_offered(needs(cores=128), offers)] == [("cores", "128")]
    assert never_offered(needs(cores=128), offers)[0].offered == "64 at SITE-A"
    assert never_offered(needs(cores=2), offers) == []
    denied = never_offered(needs(sites_allowed=["SITE-Z"]), offers)
    assert [(u.requirement, u.wanted, u.offered) for u in denied] == [("sites_allowed", "SITE-Z", "SITE-A, SITE-B")]
