"""Broker metrics through prometheus_client, served over a bounded plain-HTTP endpoint.

Each BrokerServer has its own CollectorRegistry (never the process-global one:
tests and embedding programs run several brokers in one process). `Metrics`
holds this process's Counters and Histograms (calls, match outcomes, reaped
attempts, file traffic); `BrokerCollector` reads the durable figures (jobs per
state, matches since the database was created, lost attempts, pilots) from
the store, and the identity cache's figures, at scrape time. The endpoint
renders at most once per `cache_seconds`, so a scrape storm cannot become a
query storm on the database.

    splitpilot_jobs{state="WAITING"}                    gauge: queue depth per state
    splitpilot_matches_total                            jobs matched, since the database was created
    splitpilot_broker_matches_total                     the same, by this broker process (rate() it)
    splitpilot_match_requests_total{result=...}         matched / empty / refused Match calls
    splitpilot_lost_attempts_total                      attempts lost (missed heartbeats)
    splitpilot_pilots_seen                              gauge: pilots the broker has seen
    splitpilot_empty_pilots_total                       pilots that left without running a job
    splitpilot_reaped_total{cause=...}                  attempts ended by this process's reaper
    splitpilot_gc_files_freed_total                     unreferenced contents removed by this process's collector
    splitpilot_gc_bytes_freed_total                     their bytes
    splitpilot_history_events_pruned_total              history events of long-final jobs pruned by this process
    splitpilot_rpc_requests_total{method=...,code=...}  calls per RPC and status code
    splitpilot_rpc_errors_total{method=...}             calls that did not end OK
    splitpilot_rpc_duration_seconds{method=...}         histogram: time in handlers per RPC
    splitpilot_identity_cache_{hits,misses}_total       token verification cache (and _entries, a gauge)
    splitpilot_match_duration_seconds{result=...}       histogram: Match latency by result
    splitpilot_queue_wait_seconds{site=...}             histogram: submission to each assignment (first and re-)
    splitpilot_pilots_alive                             gauge: pilots alive now (not ended, heard from lately)
    splitpilot_site_pilots{site=...,status=...}         gauge: alive / busy / idle pilots per site
    splitpilot_site_jobs{site=...,state=...}            gauge: jobs a site holds now, or ended there in the last hour
    splitpilot_site_failures{site=...,class=...}        gauge: jobs failed in the last hour, by final state
    splitpilot_site_pilot_ends{site=...,reason=...}     gauge: pilots ended in the last hour, by end reason
    splitpilot_site_empty_pilots{site=...}              gauge: pilots ended in the last hour without a job

Site and reason labels are capped (broker.store.figures: 200 sites, 20 reasons, the rest "other").
The endpoint also answers /healthz (the process answers) and /readyz (the store answers: the same
probe as the gRPC health service; 503 when it does not).

prometheus_client's own HTTP servers (start_http_server, make_wsgi_app) are
not used: they run a thread per connection with no bound on idle ones,
which is what MetricsServer below exists to prevent.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from broker.store.figures import MAX_SITES, OTHER, SiteFigures, label
from pilot.api.states import JobState

log = logging.getLogger("splitpilot.broker.metrics")

#: The classic text format: every name here is a legacy Prometheus name, so nothing needs the 1.0.0 escaping.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

#: Seconds. Most calls take a millisecond or less; file streams and heavy listings take seconds.
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

MATCH_RESULTS = ("matched", "empty", "refused")

#: Seconds. A Match is one store transaction plus, when matched, a job token's signature.
MATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

#: Seconds from a job's submission to its assignment: a second on an idle test broker, hours on a
#: busy grid, days for a job only a drained site can run.
QUEUE_WAIT_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 2 * 3600.0, 4 * 3600.0,
                      8 * 3600.0, 12 * 3600.0, 86400.0, 2 * 86400.0, 4 * 86400.0, 7 * 86400.0)


class Metrics:
    """This process's instruments, registered in REGISTRY (a new one by default). prometheus_client's
    instruments lock their own updates, so the event loop and the reaper thread may both count."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.started = time.time()
        r = self.registry
        self.rpc_requests = Counter("splitpilot_rpc_requests", "RPCs handled, by method and status code.",
                                    ("method", "code"), registry=r)
        self.rpc_errors = Counter("splitpilot_rpc_errors", "RPCs that did not end OK, by method.", ("method",),
                                  registry=r)
        self.rpc_duration = Histogram("splitpilot_rpc_duration_seconds", "Seconds spent in handlers, by method.",
                                      ("method",), buckets=RPC_BUCKETS, registry=r)
        self.match_requests = Counter("splitpilot_match_requests", "Match calls by result.", ("result",),
                                      registry=r)
        self.match_duration = Histogram("splitpilot_match_duration_seconds",
                                        "Seconds a Match call took (the claim and the job token), by result.",
                                        ("result",), buckets=MATCH_BUCKETS, registry=r)
        self.queue_wait = Histogram("splitpilot_queue_wait_seconds",
                                    "Seconds from a job's submission to each of its assignments to a pilot "
                                    "(the first and every re-assignment), by the pilot's site.",
                                    ("site",), buckets=QUEUE_WAIT_BUCKETS, registry=r)
        # The in-process site labels: the first MAX_SITES sites keep theirs, later ones count as OTHER
        # (the same cap and cleaning as the per-site figures read from the store).
        self._site_labels: dict[str, str] = {}
        self._site_lock = threading.Lock()
        self.broker_matches = Counter("splitpilot_broker_matches", "Jobs matched by this broker process.",
                                      registry=r)
        self.reaped = Counter("splitpilot_reaped", "Attempts ended by this process's reaper, by cause.", ("cause",),
                              registry=r)
        self.file_bytes_received = Counter("splitpilot_file_bytes_received", "File bytes accepted into the store.",
                                           registry=r)
        self.file_bytes_sent = Counter("splitpilot_file_bytes_sent", "File bytes streamed to clients.", registry=r)
        self.gc_files_freed = Counter("splitpilot_gc_files_freed", "Unreferenced contents removed by this "
                                      "process's garbage collection.", registry=r)
        self.gc_bytes_freed = Counter("splitpilot_gc_bytes_freed", "Bytes of the unreferenced contents removed by "
                                      "this process's garbage collection.", registry=r)
        self.history_pruned = Counter("splitpilot_history_events_pruned", "History events of jobs final for "
                                      "longer than the retention, pruned by this process.", registry=r)
        self.outputs_pruned = Counter("splitpilot_outputs_pruned", "Output rows of jobs final for longer than "
                                      "the output retention, forgotten by this process.", registry=r)
        Gauge("splitpilot_broker_start_time_seconds", "Unix time the broker process started.",
              registry=r).set(self.started)
        for result in MATCH_RESULTS:  # every result shown from the start, so that rate() sees the first one
            self.match_requests.labels(result)

    def observe(self, method: str, code: str, seconds: float) -> None:
        """One handled call of METHOD that ended with gRPC status CODE (a name: OK, NOT_FOUND, ...)."""
        self.rpc_requests.labels(method, code).inc()
        if code != "OK":
            self.rpc_errors.labels(method).inc()
        self.rpc_duration.labels(method).observe(seconds)

    def match_result(self, result: str, seconds: float | None = None) -> None:
        """One Match call answered with RESULT (one of MATCH_RESULTS) after SECONDS (None: not timed)."""
        self.match_requests.labels(result).inc()
        if seconds is not None:
            self.match_duration.labels(result).observe(seconds)
        if result == "matched":
            self.broker_matches.inc()

    def site_label(self, site: str) -> str:
        """SITE as a label value of this process's per-site instruments: cleaned (broker.store.figures.label),
        at most MAX_SITES distinct ones (a token may name any site: the label set must stay bounded)."""
        with self._site_lock:
            found = self._site_labels.get(site)
            if found is None:
                found = label(site) if len(self._site_labels) < MAX_SITES else OTHER
                if found != OTHER:
                    self._site_labels[site] = found
            return found

    def queued_for(self, site: str, seconds: float) -> None:
        """A job assigned at SITE SECONDS after its submission (negative: clocks disagree, counted as 0)."""
        self.queue_wait.labels(self.site_label(site)).observe(max(0.0, seconds))

    def render(self) -> bytes:
        """The registry in the text format (what the endpoint serves)."""
        return generate_latest(self.registry)


class IdentityCacheFigures(Protocol):
    """What BrokerCollector reads from the identity cache (broker.auth.IdentityCache)."""

    hits: int
    misses: int

    def __len__(self) -> int: ...


class BrokerCollector(Collector):
    """The figures that live outside this process's instruments, read at scrape time: the store's job
    counts per state and durable counters (COUNTS() and STATS(), as JobStore.counts and .stats), and
    the identity cache's hits, misses and size (CACHE())."""

    #: Store statistics shown, with their kind and help; others the store keeps are not exported.
    STATS = (
        ("matches_total", "counter", "Jobs matched to pilots since the broker database was created."),
        ("lost_attempts_total", "counter", "Job attempts lost (no heartbeat) since the database was created."),
        ("pilots_seen", "gauge", "Pilots the broker has seen."),
        ("empty_pilots_total", "counter", "Pilots that ended without running a job."),
    )

    def __init__(self, counts: Callable[[], Mapping[JobState, int]], stats: Callable[[], Mapping[str, int]],
                 cache: Callable[[], IdentityCacheFigures],
                 figures: Callable[[], SiteFigures] | None = None) -> None:
        self._counts = counts
        self._stats = stats
        self._cache = cache
        self._figures = figures

    def describe(self) -> Iterable[Metric]:
        # The names without samples: registering must not query the database.
        return list(self._families(None, {}, None)) + list(self._site_families(None))

    def collect(self) -> Iterable[Metric]:
        figures = self._figures() if self._figures is not None else None
        return list(self._families(self._counts(), self._stats(), self._cache())) + list(self._site_families(figures))

    def _site_families(self, figures: SiteFigures | None) -> Iterator[Metric]:
        if self._figures is None:
            return
        alive = GaugeMetricFamily("splitpilot_pilots_alive", "Pilots alive now (not ended, heard from lately).",
                                  value=None if figures is None else sum(p.alive for p in figures.pilots.values()))
        pilots = GaugeMetricFamily("splitpilot_site_pilots", "Pilots alive now per site: alive, busy (holding a "
                                   "job), idle.", labels=("site", "status"))
        jobs = GaugeMetricFamily("splitpilot_site_jobs", "Jobs per site and state: held now, or ended there in "
                                 "the last hour.", labels=("site", "state"))
        failures = GaugeMetricFamily("splitpilot_site_failures", "Jobs that failed in the last hour, per site "
                                     "and failure class (final state).", labels=("site", "class"))
        ends = GaugeMetricFamily("splitpilot_site_pilot_ends", "Pilots that ended in the last hour, per site and "
                                 "end reason.", labels=("site", "reason"))
        empty = GaugeMetricFamily("splitpilot_site_empty_pilots", "Pilots that ended in the last hour without "
                                  "running a job, per site.", labels=("site",))
        if figures is not None:
            for site, counts in sorted(figures.pilots.items()):
                for status in ("alive", "busy", "idle"):
                    pilots.add_metric((site, status), getattr(counts, status))
                empty.add_metric((site,), counts.empty)
            for (site, state), n in sorted(figures.jobs.items()):
                jobs.add_metric((site, state), n)
            for (site, failure), n in sorted(figures.failures.items()):
                failures.add_metric((site, failure), n)
            for (site, reason), n in sorted(figures.pilot_ends.items()):
                ends.add_metric((site, reason), n)
        yield from (alive, pilots, jobs, failures, ends, empty)

    def _families(self, counts: Mapping[JobState, int] | None, stats: Mapping[str, int],
                  cache: IdentityCacheFigures | None) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("splitpilot_jobs", "Jobs per state (queue depth for WAITING).", labels=("state",))
        if counts is not None:
            for state in JobState:  # every state, zero included: a state that empties shows 0, not a gap
                jobs.add_metric((state.name,), counts.get(state, 0))
        yield jobs
        for key, kind, help_text in self.STATS:
            value = stats.get(key)
            if kind == "counter":  # the family's name without _total: the format adds it to the sample
                yield CounterMetricFamily(f"splitpilot_{key.removesuffix('_total')}", help_text, value=value)
            else:
                yield GaugeMetricFamily(f"splitpilot_{key}", help_text, value=value)
        hits = misses = entries = None
        if cache is not None:
            hits, misses, entries = cache.hits, cache.misses, len(cache)
        yield CounterMetricFamily("splitpilot_identity_cache_hits", "Calls whose token was verified before.",
                                  value=hits)
        yield CounterMetricFamily("splitpilot_identity_cache_misses", "Calls whose token had to be verified.",
                                  value=misses)
        yield GaugeMetricFamily("splitpilot_identity_cache_entries", "Verified identities cached now.",
                                value=entries)


#: What a route answers: (status line, content type, body).
Response = tuple[str, str, bytes]
TEXT = "text/plain; charset=utf-8"


class BoundedHttpServer:
    """Serves ROUTES (path -> a function answering it, run in one rendering thread) on HOST:PORT.

    One thread runs an asyncio server, whatever the number of connections
    (the old thread-per-connection server grew to 1,512 threads for 1,500
    idle connections); a second one renders. Every connection must send its
    request head (at most 8 KiB) within READ_TIMEOUT seconds or is closed;
    at most MAX_CONNECTIONS are open at once, and when a new one arrives at
    that bound the oldest connection still waiting for its request is
    closed to make room, so idle connections can delay a request by no more
    than their own number of accepts, and never block it. One request per
    connection (the answer says Connection: close). Only GET and HEAD; the
    query string is ignored. The metrics endpoint and the web monitor
    (broker/monitor.py) are two of these.
    """

    MAX_HEAD = 8 << 10
    NAME = "broker-http"

    def __init__(self, host: str, port: int, routes: Mapping[str, Callable[[], Response]], *,
                 read_timeout: float = 10.0, max_connections: int = 256) -> None:
        self.routes = dict(routes)
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        # Bound here, so that a port in use fails the broker's start (OSError), as before.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, port), family=family, backlog=128)
        self.port = self._socket.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._renderer = ThreadPoolExecutor(1, thread_name_prefix=f"{self.NAME}-render")
        #: Connections still waiting for their request head, oldest first (evicted first at the bound).
        self._waiting: OrderedDict[asyncio.StreamWriter, None] = OrderedDict()
        self._open = 0
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._run, name=self.NAME, daemon=True)
        self._started = threading.Event()

    @property
    def connections(self) -> int:
        """Connections open now (tests and diagnostics)."""
        return self._open

    def start(self) -> None:
        self._thread.start()
        self._started.wait(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(
            self._serve, sock=self._socket, limit=self.MAX_HEAD))
        self._started.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        if self._open > self.max_connections:
            if not self._waiting:  # every open connection is being answered: this one waits for none
                self._open -= 1
                writer.transport.abort()
                return
            oldest, _ = self._waiting.popitem(last=False)
            oldest.transport.abort()  # its handler sees the connection end and returns
        self._waiting[writer] = None
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return  # idle, slow, oversized or gone: closed below without an answer
            finally:
                self._waiting.pop(writer, None)
            await self._answer(head, writer)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            self._open -= 1
            writer.close()

    async def _answer(self, head: bytes, writer: asyncio.StreamWriter) -> None:
        parts = head.split(b"\r\n", 1)[0].split()
        method, target = (parts[0], parts[1].decode("latin-1")) if len(parts) == 3 else (b"", "")
        route = self.routes.get(target.split("?")[0])
        served = ", ".join(sorted(self.routes))
        if method not in (b"GET", b"HEAD"):
            status, content_type, body = "405 Method Not Allowed", TEXT, f"only GET of {served} here\n".encode()
        elif route is None:
            status, content_type, body = "404 Not Found", TEXT, f"only {served} are served here\n".encode()
        else:
            try:
                status, content_type, body = await self._loop.run_in_executor(self._renderer, route)
            except Exception:  # noqa: BLE001
                log.exception("%s: answering %s failed", self.NAME, target[:200])
                status, content_type, body = ("500 Internal Server Error", TEXT,
                                              b"the answer could not be made; see the broker's log\n")
        writer.write(f"HTTP/1.1 {status}\r\nServer: splitpilot-broker\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff"
                     f"\r\n{self.extra_headers()}Connection: close\r\n\r\n".encode())
        if method != b"HEAD":
            writer.write(body)
        await asyncio.wait_for(writer.drain(), self.read_timeout)
        log.debug("%s: %s %s %s", self.NAME, method.decode("latin-1"), target[:200], status)

    def extra_headers(self) -> str:
        """Header lines (each ending in CRLF) added to every answer."""
        return ""

    def stop(self) -> None:
        if self._thread.is_alive():
            async def close() -> None:
                if self._server is not None:
                    self._server.close()
                for writer in list(self._waiting):
                    writer.transport.abort()
                tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            try:
                asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            except Exception as exc:  # noqa: BLE001
                log.warning("%s: stop: %s", self.NAME, exc)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        if not self._loop.is_running():
            self._loop.close()
        self._socket.close()
        self._renderer.shutdown(wait=False, cancel_futures=True)


class MetricsServer(BoundedHttpServer):
    """RENDER() at /metrics (and /), rendered at most once per CACHE_SECONDS (the store is queried no more
    often, however many scrapes arrive); /healthz: 200 while the process answers; /readyz: 200 when READY()
    (the store answers), else 503 (asked at most once per CACHE_SECONDS too)."""

    NAME = "broker-metrics"

    def __init__(self, host: str, port: int, render: Callable[[], bytes], *, cache_seconds: float = 1.0,
                 read_timeout: float = 10.0, max_connections: int = 256,
                 ready: Callable[[], bool] | None = None) -> None:
        self._render = render
        self._ready = ready
        self._cache_seconds = cache_seconds
        self._cached: tuple[float, bytes] | None = None
        self._readiness: tuple[float, bool] | None = None
        self._lock = threading.Lock()
        routes: dict[str, Callable[[], Response]] = {"/": self._metrics, "/metrics": self._metrics,
                                                     "/healthz": lambda: ("200 OK", TEXT, b"ok\n")}
        if ready is not None:
            routes["/readyz"] = self._readyz
        super().__init__(host, port, routes, read_timeout=read_timeout, max_connections=max_connections)

    def body(self) -> bytes:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self._cache_seconds:
                self._cached = (now, self._render())
            return self._cached[1]

    def _metrics(self) -> Response:
        try:
            return "200 OK", CONTENT_TYPE, self.body()
        except Exception:  # noqa: BLE001
            log.exception("metrics: rendering failed")
            return "500 Internal Server Error", TEXT, b"metrics could not be collected; see the broker's log\n"

    def _readyz(self) -> Response:
        assert self._ready is not None
        with self._lock:
            now = time.monotonic()
            if self._readiness is None or now - self._readiness[0] >= self._cache_seconds:
                self._readiness = (now, self._ready())
            ready = self._readiness[1]
        if ready:
            return "200 OK", TEXT, b"ready: the store answers\n"
        return ("503 Service Unavailable", TEXT,
                b"not ready: the store does not answer; see the broker's log for the database error\n")


__all__ = ["CONTENT_TYPE", "BoundedHttpServer", "BrokerCollector", "Metrics", "MetricsServer", "Response"]
