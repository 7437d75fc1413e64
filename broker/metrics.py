"""Broker metrics in the Prometheus text exposition format, over plain HTTP.

Counters of this process (requests and errors per RPC, match outcomes,
reaped attempts) live in `Metrics`; the durable figures (jobs per state,
matches since the database was created, lost attempts, pilots) come from the
store at scrape time, at most once per `cache_seconds`.

    splitpilot_jobs{state="WAITING"}                    queue depth per state
    splitpilot_matches_total                            jobs matched, since the database was created
    splitpilot_broker_matches_total                     the same, by this broker process (rate() it)
    splitpilot_match_requests_total{result=...}         matched / empty / refused Match calls
    splitpilot_lost_attempts_total                      attempts lost (missed heartbeats)
    splitpilot_pilots_seen                              pilots the broker has seen
    splitpilot_empty_pilots_total                       pilots that left without running a job
    splitpilot_reaped_total{cause=...}                  attempts ended by this process's reaper
    splitpilot_rpc_requests_total{method=...,code=...}  calls per RPC and status code
    splitpilot_rpc_errors_total{method=...}             calls that did not end OK
    splitpilot_rpc_duration_seconds_{sum,count}         time in handlers per RPC
    splitpilot_identity_cache_{hits,misses}_total       token verification cache
"""

from __future__ import annotations

import http.server
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable

from broker.lifecycle import JobState

log = logging.getLogger("splitpilot.broker.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """In-process counters. Updated from the server's event loop (and the
    reaper thread); single increments are safe under the GIL, and a scrape
    that reads a value mid-update only sees it a moment early or late."""

    def __init__(self) -> None:
        self.started = time.time()
        self.requests: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.duration_sum: defaultdict[str, float] = defaultdict(float)
        self.duration_count: defaultdict[str, int] = defaultdict(int)
        self.match_results: defaultdict[str, int] = defaultdict(int)
        self.reaped: defaultdict[str, int] = defaultdict(int)
        self.files_received_bytes = 0
        self.files_sent_bytes = 0

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.requests[(method, code)] += 1
        self.duration_sum[method] += seconds
        self.duration_count[method] += 1

    @property
    def matches(self) -> int:
        return self.match_results["matched"]

    def render(self, store_counts: dict[JobState, int] | None, store_stats: dict[str, int] | None,
               extra: dict[str, float] | None = None) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{labels} {_number(value)}")

        if store_counts is not None:
            metric("splitpilot_jobs", "gauge", "Jobs per state (queue depth for WAITING).",
                   [(f'{{state="{s.name}"}}', store_counts.get(s, 0)) for s in JobState])
        stats = store_stats or {}
        for key, name, kind, help_text in (
                ("matches_total", "splitpilot_matches_total", "counter",
                 "Jobs matched to pilots since the broker database was created."),
                ("lost_attempts_total", "splitpilot_lost_attempts_total", "counter",
                 "Job attempts lost (no heartbeat) since the database was created."),
                ("pilots_seen", "splitpilot_pilots_seen", "gauge", "Pilots the broker has seen."),
                ("empty_pilots_total", "splitpilot_empty_pilots_total", "counter",
                 "Pilots that ended without running a job.")):
            if key in stats:
                metric(name, kind, help_text, [("", stats[key])])
        metric("splitpilot_broker_matches_total", "counter", "Jobs matched by this broker process.",
               [("", self.matches)])
        metric("splitpilot_match_requests_total", "counter", "Match calls by result.",
               [(f'{{result="{r}"}}', self.match_results.get(r, 0)) for r in ("matched", "empty", "refused")])
        metric("splitpilot_reaped_total", "counter", "Attempts ended by this process's reaper, by cause.",
               [(f'{{cause="{c}"}}', n) for c, n in sorted(self.reaped.items())])
        metric("splitpilot_rpc_requests_total", "counter", "RPCs handled, by method and status code.",
               [(f'{{method="{m}",code="{c}"}}', n) for (m, c), n in sorted(self.requests.items())])
        errors: defaultdict[str, int] = defaultdict(int)
        for (m, c), n in list(self.requests.items()):
            errors[m] += n if c != "OK" else 0
        metric("splitpilot_rpc_errors_total", "counter", "RPCs that did not end OK, by method.",
               [(f'{{method="{m}"}}', n) for m, n in sorted(errors.items())])
        metric("splitpilot_rpc_duration_seconds_sum", "counter", "Seconds spent in handlers, by method.",
               [(f'{{method="{m}"}}', s) for m, s in sorted(self.duration_sum.items())])
        metric("splitpilot_rpc_duration_seconds_count", "counter", "Handled calls, by method.",
               [(f'{{method="{m}"}}', n) for m, n in sorted(self.duration_count.items())])
        metric("splitpilot_file_bytes_received_total", "counter", "File bytes accepted into the store.",
               [("", self.files_received_bytes)])
        metric("splitpilot_file_bytes_sent_total", "counter", "File bytes streamed to clients.",
               [("", self.files_sent_bytes)])
        for name, value in (extra or {}).items():
            metric(name, "counter" if name.endswith("_total") else "gauge", name.replace("_", " "), [("", value)])
        metric("splitpilot_broker_start_time_seconds", "gauge", "Unix time the broker process started.",
               [("", self.started)])
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    if isinstance(value, float) and not value.is_integer():
        return repr(value)
    return str(int(value))


class MetricsServer:
    """Serves RENDER() at /metrics (and /) on HOST:PORT from a daemon thread."""

    def __init__(self, host: str, port: int, render: Callable[[], str], *, cache_seconds: float = 1.0) -> None:
        self._render = render
        self._cache_seconds = cache_seconds
        self._cached: tuple[float, bytes] | None = None
        self._lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            server_version = "splitpilot-broker"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.split("?")[0] not in ("/", "/metrics"):
                    self.send_error(404, "only /metrics is served here")
                    return
                try:
                    body = owner.body()
                except Exception:
                    log.exception("metrics: rendering failed")
                    self.send_error(500, "metrics could not be collected; see the broker's log")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:  # noqa: A002
                log.debug("metrics: " + format, *args)

        self.httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="broker-metrics", daemon=True)

    def body(self) -> bytes:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self._cache_seconds:
                self._cached = (now, self._render().encode())
            return self._cached[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


__all__ = ["CONTENT_TYPE", "Metrics", "MetricsServer"]
