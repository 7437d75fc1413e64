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

import asyncio
import logging
import socket
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from pilot.api.states import JobState

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
    """Serves RENDER() at /metrics (and /) on HOST:PORT.

    One thread runs an asyncio server, whatever the number of connections
    (the old thread-per-connection server grew to 1,512 threads for 1,500
    idle connections); a second one renders (the store is queried at most
    once per CACHE_SECONDS). Every connection must send its request head
    (at most 8 KiB) within READ_TIMEOUT seconds or is closed; at most
    MAX_CONNECTIONS are open at once, and when a new one arrives at that
    bound the oldest connection still waiting for its request is closed to
    make room, so idle connections can delay a scrape by no more than their
    own number of accepts, and never block it. One request per connection
    (the answer says Connection: close).
    """

    MAX_HEAD = 8 << 10

    def __init__(self, host: str, port: int, render: Callable[[], str], *, cache_seconds: float = 1.0,
                 read_timeout: float = 10.0, max_connections: int = 256) -> None:
        self._render = render
        self._cache_seconds = cache_seconds
        self._cached: tuple[float, bytes] | None = None
        self._lock = threading.Lock()
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        # Bound here, so that a port in use fails the broker's start (OSError), as before.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, port), family=family, backlog=128)
        self.port = self._socket.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._renderer = ThreadPoolExecutor(1, thread_name_prefix="broker-metrics-render")
        #: Connections still waiting for their request head, oldest first (evicted first at the bound).
        self._waiting: OrderedDict[asyncio.StreamWriter, None] = OrderedDict()
        self._open = 0
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._run, name="broker-metrics", daemon=True)
        self._started = threading.Event()

    def body(self) -> bytes:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self._cache_seconds:
                self._cached = (now, self._render().encode())
            return self._cached[1]

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
        if method not in (b"GET", b"HEAD"):
            status, body = "405 Method Not Allowed", b"only GET /metrics is served here\n"
        elif target.split("?")[0] not in ("/", "/metrics"):
            status, body = "404 Not Found", b"only /metrics is served here\n"
        else:
            try:
                body = await self._loop.run_in_executor(self._renderer, self.body)
                status = "200 OK"
            except Exception:  # noqa: BLE001
                log.exception("metrics: rendering failed")
                status, body = "500 Internal Server Error", b"metrics could not be collected; see the broker's log\n"
        content_type = CONTENT_TYPE if status == "200 OK" else "text/plain; charset=utf-8"
        writer.write(f"HTTP/1.1 {status}\r\nServer: splitpilot-broker\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
        if method != b"HEAD":
            writer.write(body)
        await asyncio.wait_for(writer.drain(), self.read_timeout)
        log.debug("metrics: %s %s %s", method.decode("latin-1"), target[:200], status)

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
                log.warning("metrics: stop: %s", exc)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        if not self._loop.is_running():
            self._loop.close()
        self._socket.close()
        self._renderer.shutdown(wait=False, cancel_futures=True)


__all__ = ["CONTENT_TYPE", "Metrics", "MetricsServer"]
