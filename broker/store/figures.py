"""Per-site figures for the metrics and the web monitor: a few aggregate reads of a SqlStore.

One snapshot read (`site_figures`) answers what an operator looks at: jobs
by state per site, pilots per site (alive, busy, idle; ended and why in the
last hour), failures by class in the last hour, the last failed jobs'
messages, and the waiting requirement classes. It is separate from the
JobStore interface (which the services use) because only the broker's
own endpoints read it, and at most once per cache period, whatever the
number of scrapes or browsers.

Every query uses an index the stores already have (jobs_state, jobs_alive,
pilots_last_seen) or reads a bounded set (the running jobs, the last hour),
so a large history never makes a scrape slow. Site names and pilot end
reasons come from certificates and agents: they are capped here
(`cap_labels`), so neither a CA with many sites nor a hostile agent can grow
the metrics without bound.
"""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from broker.store.schema import ALIVE_STATES, ASSIGNED, WAITING, from_ms, to_ms
from broker.store.sql import SqlStore
from pilot.api.states import JobState

#: The final states that count as a failure, by class (EXPIRED and KILLED are no site's failure).
FAILURE_STATES = (JobState.FAILED_INPUT, JobState.FAILED_EXECUTION, JobState.FAILED_OUTPUT,
                  JobState.FAILED_WRAPPER, JobState.FAILED_LIMIT, JobState.LOST)
#: At most this many distinct sites are labelled; the rest are summed under OTHER.
MAX_SITES = 200
#: At most this many distinct pilot end reasons are labelled (agents choose them).
MAX_REASONS = 20
OTHER = "other"
#: Characters of a label value kept (a longer site or reason is cut).
MAX_LABEL_CHARS = 64
#: Characters of a job's message kept for "the last errors".
MAX_MESSAGE_CHARS = 300
RECENT_ERRORS = 20
WAITING_CLASSES = 50

_FAILED = ", ".join(str(int(s)) for s in FAILURE_STATES)
_HELD = f"({ASSIGNED}, {ALIVE_STATES[1:-1]})"


@dataclass(frozen=True)
class PilotCounts:
    """One site's pilots: ALIVE (not ended, seen within the window), of them BUSY (holding a job) and IDLE;
    ENDED and EMPTY (ended without running a job) in the last hour."""

    alive: int = 0
    busy: int = 0
    ended: int = 0
    empty: int = 0

    @property
    def idle(self) -> int:
        return self.alive - self.busy


@dataclass(frozen=True)
class RecentError:
    """A job that failed in the last hour: its message is the wrapper's or agent's text (attacker-controlled)."""

    job_id: int
    site: str
    state: str
    time: datetime.datetime
    message: str


@dataclass(frozen=True)
class SiteFigures:
    """What `site_figures` read at NOW."""

    now: datetime.datetime
    #: Jobs per state, all of them.
    totals: dict[str, int]
    #: (site, state name) -> jobs, for jobs a site holds or ended (WAITING and EXPIRED jobs are at no site).
    jobs: dict[tuple[str, str], int]
    pilots: dict[str, PilotCounts]
    #: (site, end reason) -> pilots ended in the last hour.
    pilot_ends: dict[tuple[str, str], int]
    #: (site, failure class: a final state name) -> jobs that failed in the last hour.
    failures: dict[tuple[str, str], int]
    errors: tuple[RecentError, ...]
    #: (class id, waiting jobs, the oldest job's id), largest first.
    waiting_classes: tuple[tuple[int, int, int], ...] = field(default=())

    @property
    def sites(self) -> list[str]:
        """Every site named anywhere in these figures, sorted."""
        names = {site for site, _ in self.jobs} | set(self.pilots) | {site for site, _ in self.failures}
        names |= {site for site, _ in self.pilot_ends}
        return sorted(names)


def label(text: str) -> str:
    """TEXT as a label value: printable, at most MAX_LABEL_CHARS, never empty."""
    cleaned = "".join(c if c.isprintable() else "?" for c in text[:MAX_LABEL_CHARS]).strip()
    return cleaned or "none"


def cap_labels(weights: Iterable[tuple[str, int]], limit: int) -> dict[str, str]:
    """name -> label: the LIMIT heaviest names keep theirs (cleaned), the rest become OTHER."""
    totals: Counter[str] = Counter()
    for name, weight in weights:
        totals[name] += weight
    ranked = sorted(totals, key=lambda n: (-totals[n], n))
    return {name: (label(name) if i < limit else OTHER) for i, name in enumerate(ranked)}


def _sum_by(pairs: Iterable[tuple[tuple[str, str], int]], first: dict[str, str],
            second: dict[str, str] | None = None) -> dict[tuple[str, str], int]:
    out: Counter[tuple[str, str]] = Counter()
    for (a, b), n in pairs:
        out[(first[a], second[b] if second is not None else b)] += n
    return dict(out)


def site_figures(store: SqlStore, now: datetime.datetime, alive_window: datetime.timedelta) -> SiteFigures:
    """The figures at NOW; a pilot is alive when it has not ended and was heard from within ALIVE_WINDOW."""
    now_ms = to_ms(now)
    hour_ago = now_ms - 3_600_000
    alive_since = now_ms - int(alive_window.total_seconds() * 1000)

    def body(cur) -> tuple:
        totals = cur.rows("SELECT state, count(*) FROM jobs GROUP BY state")
        held = cur.rows(f"SELECT site, state, pilot_id FROM jobs WHERE state IN {_HELD}")
        ended_jobs = cur.rows(f"SELECT site, state, count(*) FROM jobs WHERE state IN ({_FAILED}, "
                              f"{int(JobState.DONE)}, {int(JobState.KILLED)}) AND updated >= ? GROUP BY site, state",
                              (hour_ago,))
        pilots = cur.rows("SELECT pilot_id, site, last_seen, ended, end_reason FROM pilots WHERE last_seen >= ?",
                          (min(alive_since, hour_ago),))
        errors = cur.rows(f"SELECT id, site, state, updated, message FROM jobs WHERE state IN ({_FAILED}) "
                          "AND updated >= ? ORDER BY updated DESC, id DESC LIMIT ?", (hour_ago, RECENT_ERRORS))
        waiting = cur.rows(f"SELECT class_id, count(*), min(id) FROM jobs WHERE state = {WAITING} "
                           "GROUP BY class_id ORDER BY count(*) DESC, class_id LIMIT ?", (WAITING_CLASSES,))
        return totals, held, ended_jobs, pilots, errors, waiting

    # The store's own read hook: figures.py is a sibling of sql.py, sharing its cursor protocol.
    totals, held, ended_jobs, pilots, errors, waiting = store._read(body, snapshot=True)

    busy_pilots = {pilot_id for _, _, pilot_id in held}
    job_counts: Counter[tuple[str, str]] = Counter()
    for site, state, _ in held:
        job_counts[(site, JobState(state).name)] += 1
    for site, state, n in ended_jobs:
        job_counts[(site, JobState(state).name)] += int(n)
    alive_rows = [(s, p) for p, s, seen, ended, _ in pilots if ended is None and seen >= alive_since]
    ended_rows = [(s, reason) for _, s, _, ended, reason in pilots if ended is not None and ended >= hour_ago]
    failures = {(site, JobState(state).name): int(n) for site, state, n in ended_jobs if state in
                {int(s) for s in FAILURE_STATES}}

    sites = cap_labels([(s, n) for (s, _), n in job_counts.items()] + [(s, 1) for s, _ in alive_rows]
                       + [(s, 1) for s, _ in ended_rows], MAX_SITES)
    reasons = cap_labels([(r, 1) for _, r in ended_rows], MAX_REASONS)
    per_site: dict[str, dict[str, int]] = {}
    for site, pilot_id in alive_rows:
        entry = per_site.setdefault(sites[site], {"alive": 0, "busy": 0, "ended": 0, "empty": 0})
        entry["alive"] += 1
        entry["busy"] += pilot_id in busy_pilots
    for site, reason in ended_rows:
        entry = per_site.setdefault(sites[site], {"alive": 0, "busy": 0, "ended": 0, "empty": 0})
        entry["ended"] += 1
        entry["empty"] += reason == "empty"
    return SiteFigures(
        now=now,
        totals={JobState(s).name: int(n) for s, n in totals if s in JobState._value2member_map_},
        jobs=_sum_by(job_counts.items(), sites),
        pilots={site: PilotCounts(**entry) for site, entry in per_site.items()},
        pilot_ends=_sum_by(Counter(ended_rows).items(), sites, reasons),
        failures=_sum_by(failures.items(), sites),
        errors=tuple(RecentError(int(i), site, JobState(state).name, from_ms(updated), message[:MAX_MESSAGE_CHARS])
                     for i, site, state, updated, message in errors),
        waiting_classes=tuple((int(c), int(n), int(first)) for c, n, first in waiting))


__all__ = ["FAILURE_STATES", "MAX_SITES", "OTHER", "PilotCounts", "RecentError", "SiteFigures", "cap_labels",
           "site_figures"]
