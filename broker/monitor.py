"""The live web monitor: one read-only page and the JSON it polls, on the broker's own HTTP port.

    splitpilot broker serve --monitor 127.0.0.1:8081     # then open http://127.0.0.1:8081/

Served by a BoundedHttpServer (broker/metrics.py: one asyncio thread, bounded
connections and request heads, one rendering thread), never by the gRPC
port. The page (broker/monitor_page.py) carries its CSS and JavaScript
inline and draws its charts as inline SVG: it works without a network
connection and loads nothing from elsewhere (its Content-Security-Policy
forbids it). It polls /api/monitor.json every few seconds.

What it shows: jobs by state per site (now, and over the last hour from an
in-memory ring of samples taken every SAMPLE_S seconds), pilots per site
(alive, busy, idle, empty), failures by class, the last failed jobs'
messages, and the waiting job classes no site can run (broker/waiting.py's
analysis). A job's message is written by its wrapper, i.e. by whoever
controls the payload: the page only ever sets it as text (textContent),
never as HTML, and the CSP allows no inline handler or foreign script
besides the page's own (by hash).

Who may see what. The monitor has no authentication: the broker's tokens are
client certificates, which a browser would have to present over HTTPS to a
second TLS endpoint. On loopback (the default; reach it through an SSH
tunnel) it shows everything above. On any other address (`--monitor-public`)
it shows aggregated counts only: jobs per state, pilots alive/busy/idle/empty
and failures per class, summed over all sites, no site names, no job ids,
no messages, no analysis; as much as the public metrics endpoint shows.
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from broker import waiting
from broker.metrics import TEXT, BoundedHttpServer, Response
from broker.monitor_page import CSP, PAGE
from broker.store.base import JobStore
from broker.store.classes import RequirementClass
from broker.store.figures import SiteFigures

log = logging.getLogger("splitpilot.broker.monitor")

JSON = "application/json; charset=utf-8"
HELD_STATES = ("ASSIGNED", "STARTED", "RUNNING", "SAVING")


@dataclass(frozen=True)
class MonitorSettings:
    """How often the monitor samples and how much history it keeps."""

    #: Seconds between samples of the history ring.
    sample_s: float = 10.0
    #: Samples kept (360 x 10 s: one hour).
    history: int = 360
    #: Seconds a snapshot is reused for however many browsers poll.
    cache_s: float = 2.0
    #: Aggregated counts only (a public bind).
    public: bool = False


def unrunnable(store: JobStore, classes: tuple[tuple[int, int, int], ...], offer_settings: waiting.OfferSettings,
               site_states: dict[str, str], now: datetime.datetime) -> list[dict[str, Any]]:
    """The waiting classes (class id, jobs, oldest job) that no site's recent offers can run, with why."""
    if not classes:
        return []
    since_ms = int(now.timestamp() * 1000) - offer_settings.window_s * 1000
    offers = store.offers(since_ms)
    found = []
    for class_id, count, first in classes:
        try:
            record = store.get(first, with_history=False)
        except Exception:  # noqa: BLE001 (matched or gone since the figures were read: skip it)
            continue
        analysis = waiting.analyse(RequirementClass.of(record.spec.requirements), offers, site_states, now,
                                   offer_settings)
        fitting = [s for s in analysis.sites if not s.unmet and s.state == "enabled"]
        if analysis.never_runnable or not fitting:
            found.append({"class": class_id, "jobs": count, "oldest_job": first, "why": analysis.summary,
                          "never_runnable": analysis.never_runnable})
    return found


class Monitor:
    """The snapshots the page shows: FIGURES() and UNRUNNABLE(figures, site states) (the waiting analysis,
    at most WAITING_CLASSES classes) read at most once per cache period, however many browsers poll, and a
    ring of samples (one per sample_s, taken by the sampler thread, or by a request when it is late)."""

    def __init__(self, figures: Callable[[], SiteFigures], site_states: Callable[[], dict[str, str]],
                 unrunnable: Callable[[SiteFigures, dict[str, str]], list[dict[str, Any]]],
                 settings: MonitorSettings) -> None:
        self._figures = figures
        self._site_states = site_states
        self._unrunnable = unrunnable
        self.settings = settings
        self._lock = threading.Lock()
        self._history: collections.deque[dict[str, Any]] = collections.deque(maxlen=settings.history)
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._last_sample = float("-inf")

    def sample(self) -> None:
        """Add a sample to the history now (the sampler thread calls this every sample_s)."""
        figures = self._figures()
        with self._lock:
            self._last_sample = time.monotonic()
            self._history.append(self._sample_of(figures))
            self._cached = None  # the next answer shows the new sample

    def snapshot(self) -> dict[str, Any]:
        """What /api/monitor.json answers: read afresh unless the last answer is younger than cache_s."""
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.settings.cache_s:
                figures = self._figures()
                states = self._site_states()
                try:
                    analysis = [] if self.settings.public else self._unrunnable(figures, states)
                except Exception:  # noqa: BLE001 (the rest of the page is still worth showing)
                    log.exception("monitor: the waiting analysis failed")
                    analysis = []
                if now - self._last_sample >= self.settings.sample_s:
                    self._last_sample = now
                    self._history.append(self._sample_of(figures))
                self._cached = (now, self._render(figures, states, analysis))
            return self._cached[1]

    def _sample_of(self, figures: SiteFigures) -> dict[str, Any]:
        held: dict[str, int] = {}
        for (site, state), n in figures.jobs.items():
            if state in HELD_STATES:
                held[site] = held.get(site, 0) + n
        sample: dict[str, Any] = {"time": int(figures.now.timestamp()), "waiting": figures.totals.get("WAITING", 0),
                                  "running": sum(figures.totals.get(s, 0) for s in HELD_STATES)}
        if not self.settings.public:
            sample["sites"] = held
        return sample

    def _render(self, figures: SiteFigures, states: dict[str, str], analysis: list[dict[str, Any]]) -> dict[str, Any]:
        pilots = figures.pilots.values()
        failures: dict[str, int] = {}
        for (_, failure), n in figures.failures.items():
            failures[failure] = failures.get(failure, 0) + n
        out: dict[str, Any] = {
            "time": figures.now.isoformat(timespec="seconds"),
            "public": self.settings.public,
            "sample_s": self.settings.sample_s,
            "jobs": figures.totals,
            "pilots": {"alive": sum(p.alive for p in pilots), "busy": sum(p.busy for p in pilots),
                       "idle": sum(p.idle for p in pilots), "empty": sum(p.empty for p in pilots)},
            "failures": failures,
            "history": list(self._history),
        }
        if self.settings.public:
            return out
        sites = []
        for site in sorted(set(figures.sites) | set(states)):
            counts = figures.pilots.get(site)
            sites.append({
                "site": site, "state": states.get(site, "enabled"),
                "pilots": {"alive": counts.alive if counts else 0, "busy": counts.busy if counts else 0,
                           "idle": counts.idle if counts else 0, "empty": counts.empty if counts else 0},
                "jobs": {state: n for (s, state), n in sorted(figures.jobs.items()) if s == site},
                "failures": {failure: n for (s, failure), n in sorted(figures.failures.items()) if s == site},
            })
        out["sites"] = sites
        out["errors"] = [{"job": e.job_id, "site": e.site, "state": e.state,
                          "time": e.time.isoformat(timespec="seconds"), "message": e.message}
                         for e in figures.errors]
        out["unrunnable"] = analysis
        return out


class MonitorServer(BoundedHttpServer):
    """The page at /, its JSON at /api/monitor.json, /healthz; a sampler thread fills the history."""

    NAME = "broker-monitor"

    def __init__(self, host: str, port: int, monitor: Monitor, *, read_timeout: float = 10.0,
                 max_connections: int = 256) -> None:
        self.monitor = monitor
        page = PAGE.encode()
        routes: dict[str, Callable[[], Response]] = {
            "/": lambda: ("200 OK", "text/html; charset=utf-8", page),
            "/api/monitor.json": self._json,
            "/healthz": lambda: ("200 OK", TEXT, b"ok\n"),
        }
        super().__init__(host, port, routes, read_timeout=read_timeout, max_connections=max_connections)
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample_loop, name="broker-monitor-sampler", daemon=True)

    def extra_headers(self) -> str:
        return (f"Content-Security-Policy: {CSP}\r\nX-Frame-Options: DENY\r\n"
                "Referrer-Policy: no-referrer\r\n")

    def _json(self) -> Response:
        return "200 OK", JSON, json.dumps(self.monitor.snapshot(), separators=(",", ":")).encode()

    def start(self) -> None:
        super().start()
        self._sampler.start()

    def _sample_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.monitor.sample()
            except Exception:  # noqa: BLE001 (the database may be back at the next sample)
                log.exception("monitor: sampling failed; trying again in %.0fs", self.monitor.settings.sample_s)
            self._stop.wait(self.monitor.settings.sample_s)

    def stop(self) -> None:
        self._stop.set()
        if self._sampler.is_alive():
            self._sampler.join(timeout=30)
        super().stop()


__all__ = ["Monitor", "MonitorServer", "MonitorSettings", "unrunnable"]
