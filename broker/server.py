"""The broker process: gRPC over mutual TLS, the metrics endpoint, the reaper.

    with BrokerServer(BrokerConfig(state_dir="/srv/broker", listen="0.0.0.0:7443")) as server:
        server.wait()

The state directory holds everything the broker owns:

    STATE/ca/          the CA (ca.key 0600, ca.crt, policy.toml), created on
                       first start unless --ca points to an existing one
    STATE/host.pem     the broker's host token (server certificate and key,
                       0600), (re)issued when missing, expiring within 30
                       days, or not covering the names the broker listens on
    STATE/broker.db    the SQLite database (unless --db names another)
    STATE/files/       the content-addressed sandbox store
    STATE/address      the address actually bound (useful with port 0)
    STATE/broker.lock  held while a broker runs (one broker per directory)

The gRPC server runs on grpc.aio in its own thread with its own event loop,
so the same object serves the CLI, tests and embedding programs. Clients
must present a certificate from the CA (require_client_auth): a client
without one, or with one from another CA, fails the TLS handshake.

Besides the gRPC loop, three threads: the reaper, the revocation refresher
(every `revocation_refresh` seconds it writes the certificates this process
saw first and reloads the revocations when the store's changed, so a token
revoked through any broker on the same database is refused here within
seconds, and tells the health service whether the store answered), and the
metrics endpoint (loopback only unless `metrics_public`). The standard gRPC
health service (broker/health.py) shares the gRPC port and its mutual TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import fcntl
import ipaddress
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2_grpc

from broker.ca import CertificateAuthority
from broker.files import DEFAULT_MAX_FILE_SIZE, DEFAULT_MAX_JOB_BYTES, DEFAULT_MAX_JOB_FILES, ContentStore, FileStore
from broker.health import BrokerHealth
from broker.metrics import BrokerCollector, Metrics, MetricsServer
from broker.monitor import Monitor, MonitorServer, MonitorSettings, unrunnable
from broker.services import add_servicers
from broker.services.base import Broker, ServiceSettings, heartbeat_interval, utcnow
from broker.store import open_store
from broker.store.base import JobStore, Reaped, StoreSettings, StoreUnavailable
from broker.store.figures import SiteFigures, site_figures
from broker.store.sql import SqlStore
from pilot.errors import SplitpilotError, UsageError
from pilot.tokens import Expectation, TokenFile, TokenRole, TokenVerifier
from pilot.tokens.errors import KeyFileError, TokenError
from pilot.tokens.files import certificate_pem, private_key_pem, read_token_file, write_private, write_public

log = logging.getLogger("splitpilot.broker")

DEFAULT_PORT = 7443
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
HOST_TOKEN_FILE = "host.pem"
HOST_TOKEN_RENEW = datetime.timedelta(days=30)
MAX_MESSAGE = 32 << 20

GRPC_OPTIONS = (
    ("grpc.so_reuseport", 0),  # a second broker on the same port must fail, not share it
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
)


class BrokerStartError(SplitpilotError):
    """The broker cannot start (state directory, CA, port, database). Attributes: detail."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"broker cannot start: {detail}")
        self.detail = detail


def parse_address(text: str, what: str = "--listen") -> tuple[str, int]:
    """'HOST:PORT' or '[IPv6]:PORT' -> (host, port); UsageError with the fix."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"{what} {text!r} is not HOST:PORT; fix: write e.g. 127.0.0.1:{DEFAULT_PORT}, "
                         f"0.0.0.0:{DEFAULT_PORT} or [::1]:{DEFAULT_PORT}")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class BrokerConfig:
    """Everything `splitpilot broker serve` can set."""

    state_dir: str
    #: Store URL (sqlite:///PATH or postgresql://...); default: SQLite in the state dir.
    db_url: str | None = None
    listen: str = DEFAULT_LISTEN
    #: HOST:PORT (or PORT: 127.0.0.1) of the Prometheus endpoint; None: no endpoint.
    metrics: str | None = None
    #: Allow a metrics address other than loopback (job counts and RPC rates for anyone who reaches it).
    metrics_public: bool = False
    #: Seconds a metrics connection may take to send its request before it is closed.
    metrics_timeout: float = 10.0
    #: HOST:PORT (or PORT: 127.0.0.1) of the live web monitor (broker/monitor.py); None: no monitor.
    monitor: str | None = None
    #: Allow a monitor address other than loopback; it then shows aggregated counts only.
    monitor_public: bool = False
    #: Seconds between the monitor's history samples (an hour of them is kept).
    monitor_sample: float = 10.0
    #: Seconds between reloads of the revoked tokens from the store (0: only at start).
    revocation_refresh: float = 2.0
    #: CA directory; default STATE/ca (created on first start).
    ca_dir: str | None = None
    #: Extra DNS names / IP addresses for the host token (clients connect by them).
    host_names: tuple[str, ...] = ()
    reap_interval: float = 5.0
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    max_job_bytes: int = DEFAULT_MAX_JOB_BYTES
    max_job_files: int = DEFAULT_MAX_JOB_FILES
    #: Where sandbox content lives: "local" (STATE/files), "database" (the job store's database, shared by
    #: every broker of it; PostgreSQL only), "xrootd://HOST:PORT/PATH[?keytab=FILE]" (an XRootD server,
    #: catalogued in PostgreSQL: broker.xrdfiles); None: "database" with PostgreSQL, "local" with SQLite.
    file_store: str | None = None
    #: Content nothing refers to any more is removed once older than this (None: never collected).
    file_grace: datetime.timedelta | None = datetime.timedelta(days=1)
    #: The history events of jobs final for longer than this are pruned (None: kept for ever).
    history_retention: datetime.timedelta | None = datetime.timedelta(days=90)
    #: The outputs of jobs final for longer than this are forgotten, then collected (None: kept for ever).
    output_retention: datetime.timedelta | None = None
    #: Seconds between garbage collection passes of the reaper thread.
    gc_interval: float = 300.0
    store_settings: StoreSettings = field(default_factory=StoreSettings)
    #: None: derived (offload store calls to threads for PostgreSQL).
    service: ServiceSettings | None = None
    #: Seconds running calls get to finish on stop.
    grace: float = 5.0

    @property
    def ca_path(self) -> str:
        return self.ca_dir or os.path.join(self.state_dir, "ca")

    @property
    def store_url(self) -> str:
        return self.db_url or f"sqlite://{os.path.abspath(os.path.join(self.state_dir, 'broker.db'))}"


class BrokerServer:
    """One running broker. start()/stop(), or use it as a context manager."""

    def __init__(self, config: BrokerConfig, *, store: JobStore | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.store: JobStore | None = store
        self._own_store = store is None
        self.broker: Broker | None = None
        self.ca: CertificateAuthority | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self.health: BrokerHealth | None = None
        self._metrics_server: MetricsServer | None = None
        self._monitor_server: MonitorServer | None = None
        self.monitor_port: int | None = None
        self._reaper: threading.Thread | None = None
        self._revocations: threading.Thread | None = None
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._lock_fd: int | None = None

    # ------------------------------------------------------------ properties

    @property
    def host(self) -> str:
        return parse_address(self.config.listen)[0]

    @property
    def address(self) -> str:
        """Where clients connect (a wildcard listen address becomes localhost)."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return format_address(host, self.port or 0)

    @property
    def ca_pem(self) -> bytes:
        return certificate_pem([self.ca.certificate])

    @property
    def state_dir(self) -> str:
        return self.config.state_dir

    # ------------------------------------------------------------ life cycle

    def __enter__(self) -> BrokerServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        config = self.config
        host, port = parse_address(config.listen)
        metrics_address = metrics_bind(config.metrics, config.metrics_public) if config.metrics else None
        monitor_address = (metrics_bind(config.monitor, config.monitor_public, "--monitor") if config.monitor
                           else None)
        # Wrappers heartbeat at a third of the timeout (MatchedJob.broker_heartbeat_s): a healthy job is never
        # reaped, and a timeout they cannot meet is refused here, before anything starts.
        heartbeat_s = heartbeat_interval(config.store_settings.heartbeat_timeout)
        try:
            self._prepare_state()
            self.ca = self._load_or_create_ca()
            host_token = self._host_token(host)
            if self.store is None:
                self.store = self._open_store()
            files = self._open_files()
            settings = dataclasses.replace(config.service or ServiceSettings(
                offload_store=config.store_url.startswith(("postgres:", "postgresql:", "postgresql+"))),
                broker_heartbeat_s=heartbeat_s)
            self.broker = Broker(self.store, files, self.ca, settings=settings, metrics=self.metrics)
            broker, store = self.broker, self.store
            self.metrics.registry.register(BrokerCollector(store.counts, store.stats, lambda: broker.auth.cache,
                                                           self.site_figures if isinstance(store, SqlStore) else None))
            self.broker.refresh_revocations()  # before the first call: a restarted broker knows them all
            credentials = grpc.ssl_server_credentials(
                [(private_key_pem(host_token.key), certificate_pem(list(host_token.chain)))],
                root_certificates=self.ca_pem, require_client_auth=True)
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._run_loop, name="broker-grpc", daemon=True)
            self._thread.start()
            future = asyncio.run_coroutine_threadsafe(self._start_grpc(host, port, credentials), self._loop)
            self.port = future.result(timeout=60)
            write_public(os.path.join(config.state_dir, "address"), f"{format_address(host, self.port)}\n".encode())
            log.info("listening on %s (mutual TLS: clients need a token issued by the CA in %s)",
                     format_address(host, self.port), config.ca_path)
            if metrics_address is not None:
                metrics_host, metrics_port = metrics_address
                try:
                    self._metrics_server = MetricsServer(metrics_host, metrics_port, self.metrics.render,
                                                         read_timeout=config.metrics_timeout, ready=self.ready)
                except OSError as exc:
                    raise BrokerStartError(f"metrics endpoint {config.metrics}: {exc.strerror}; fix: choose "
                                           "another --metrics HOST:PORT") from None
                self._metrics_server.start()
                self.metrics_port = self._metrics_server.port
                if config.metrics_public and not _loopback(metrics_host):
                    log.warning("METRICS ARE PUBLIC: http://%s/metrics answers anyone who can reach it (job "
                                "counts per state, RPC rates, pilots seen); restrict it with a firewall, or serve "
                                "it on 127.0.0.1", format_address(metrics_host, self.metrics_port))
                else:
                    log.info("metrics on http://%s/metrics", format_address(metrics_host, self.metrics_port))
            if monitor_address is not None:
                self._start_monitor(*monitor_address)
            if config.reap_interval > 0:
                self._reaper = threading.Thread(target=self._reap_loop, name="broker-reaper", daemon=True)
                self._reaper.start()
            if config.revocation_refresh > 0:
                self._revocations = threading.Thread(target=self._revocation_loop, name="broker-revocations",
                                                     daemon=True)
                self._revocations.start()
        except BaseException:
            self.stop()
            raise

    def stop(self, grace: float | None = None) -> None:
        """Stop serving (running calls get GRACE seconds), close the store. Idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._stopping.set()
        grace = self.config.grace if grace is None else grace
        for thread in (self._reaper, self._revocations):
            if thread is not None:
                thread.join(timeout=30)
        if self._metrics_server is not None:
            self._metrics_server.stop()
        if self._monitor_server is not None:
            self._monitor_server.stop()
        if self._loop is not None:
            if self.health is not None:  # NOT_SERVING for good: probes send no new calls during the grace
                try:
                    asyncio.run_coroutine_threadsafe(self.health.enter_graceful_shutdown(), self._loop).result(10)
                except Exception as exc:  # noqa: BLE001
                    log.warning("health: could not announce the stop: %s", exc)
            if self._server is not None:
                try:
                    asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop).result(grace + 10)
                except Exception as exc:  # noqa: BLE001
                    log.warning("gRPC server stop: %s", exc)
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=30)
            if not self._loop.is_running():
                self._loop.close()
        if self.broker is not None:
            try:
                self.broker.flush_offers()  # what this process saw stays known after it
            except Exception as exc:  # noqa: BLE001
                log.warning("the sites' last offers could not be written: %s", exc)
            self.broker.close()
        if self.store is not None and self._own_store:
            self.store.close()
        if self._lock_fd is not None:
            # The address names a listener that is gone: removed while the lock is still ours (no next
            # broker on this folder can have written its own yet), so nobody finds and dials a dead port.
            if self.port:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.config.state_dir, "address"))
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._server is not None:
            log.info("broker stopped")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stop() (from another thread or a signal handler); True if stopped."""
        return self._stopping.wait(timeout)

    def request_stop(self) -> None:
        """Ask wait() to return (safe from signal handlers); the caller then calls stop()."""
        self._stopping.set()

    # ------------------------------------------------------------ the reaper and metrics

    def reap_once(self, now: datetime.datetime | None = None) -> list[Reaped]:
        """Run the reaper once (the thread calls this every reap_interval)."""
        now = now or utcnow()
        try:
            self.broker.flush_offers(now)  # the sites' offers, for "why is my job waiting"
        except Exception:  # noqa: BLE001 (they stay pending for the next pass; the reaping matters more)
            log.exception("reaper: the sites' offers could not be written; trying again next pass")
        reaped = self.store.reap(now)
        for item in reaped:
            cause = item.cause.value if item.cause is not None else "expired"
            self.metrics.reaped.labels(cause).inc()
            log.info("reaper: job %d attempt %d %s: now %s", item.job_id, item.attempt, cause, item.new_state.name)
        self.broker.prune(now)
        return reaped

    def _reap_loop(self) -> None:
        next_collection = time.monotonic() + min(self.config.gc_interval, 60.0)
        while not self._stopping.wait(self.config.reap_interval):
            if self.config.gc_interval > 0 and time.monotonic() >= next_collection:
                next_collection = time.monotonic() + self.config.gc_interval
                try:
                    self.collect_once()
                except Exception:  # noqa: BLE001 (collection is housekeeping: the next pass tries again)
                    log.exception("garbage collection: pass failed; trying again in %.0fs", self.config.gc_interval)
            try:
                self.reap_once()
            except Exception:  # noqa: BLE001 (the reaper must survive a bad moment of the database)
                log.exception("reaper: pass failed; trying again in %.0fs", self.config.reap_interval)

    def _revocation_loop(self) -> None:
        while not self._stopping.wait(self.config.revocation_refresh):
            try:
                if self.broker.refresh_revocations():
                    log.info("revocations reloaded: %d in force", len(self.broker.auth.revoked))
                answered = True
            except Exception:  # noqa: BLE001 (keep the last list; the database may be back next time)
                log.exception("revocations: refresh failed; trying again in %.0fs", self.config.revocation_refresh)
                answered = False
            self._report_health(answered)

    def _report_health(self, store_answered: bool) -> None:
        """Tell the health service what a query of the store just showed (Watch streams hear of it)."""
        if self.health is not None and self._loop is not None and not self._stopping.is_set():
            asyncio.run_coroutine_threadsafe(self.health.observe(store_answered), self._loop)

    def ready(self) -> bool:
        """Whether the store answers (/readyz): the gRPC health service's probe (broker/health.py)."""
        try:
            self.store.revocation_generation()
            return True
        except Exception as exc:  # noqa: BLE001 (any failure of the store means: not ready)
            log.warning("readyz: the store does not answer (%s)", exc)
            return False

    def site_figures(self) -> SiteFigures:
        """Per-site figures now (metrics and monitor); a pilot heard from within the heartbeat timeout is alive."""
        assert isinstance(self.store, SqlStore)
        return site_figures(self.store, utcnow(), self.config.store_settings.heartbeat_timeout)

    def _start_monitor(self, host: str, port: int) -> None:
        config, broker, store = self.config, self.broker, self.store
        assert broker is not None and store is not None
        if not isinstance(store, SqlStore):
            raise BrokerStartError("--monitor needs one of the SQL stores (SQLite or PostgreSQL)")

        def unrunnable_now(figures: SiteFigures, states: dict[str, str]) -> list:
            now = utcnow()
            broker.flush_offers(now)  # this process's offers too, as GetJob's analysis does
            return unrunnable(store, figures.waiting_classes, broker.settings.offers, states, now)

        monitor = Monitor(self.site_figures, store.site_states, unrunnable_now,
                          MonitorSettings(sample_s=config.monitor_sample, public=config.monitor_public))
        try:
            self._monitor_server = MonitorServer(host, port, monitor, read_timeout=config.metrics_timeout)
        except OSError as exc:
            raise BrokerStartError(f"monitor {config.monitor}: {exc.strerror}; fix: choose another --monitor "
                                   "HOST:PORT") from None
        self._monitor_server.start()
        self.monitor_port = self._monitor_server.port
        shown = format_address(host, self.monitor_port)
        if config.monitor_public and not _loopback(host):
            log.warning("MONITOR IS PUBLIC: http://%s/ answers anyone who can reach it, with aggregated counts "
                        "only (no site names, job ids or messages); serve it on 127.0.0.1 for the full view",
                        shown)
        else:
            log.info("web monitor on http://%s/", shown)

    def render_metrics(self) -> str:
        """What the metrics endpoint serves (rendered now, whatever the endpoint's cache holds)."""
        return self.metrics.render().decode()

    # ------------------------------------------------------------ start-up pieces

    def _prepare_state(self) -> None:
        state = self.config.state_dir
        try:
            os.makedirs(state, mode=0o700, exist_ok=True)
            self._lock_fd = os.open(os.path.join(state, "broker.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise BrokerStartError(f"state directory {state}: {exc.strerror}; fix: choose a --state-dir this user "
                                   "may write") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BrokerStartError(f"another broker is running with state directory {state}; fix: stop it, or "
                                   "use another --state-dir") from None
        log.info("state directory %s", os.path.abspath(state))

    def _load_or_create_ca(self) -> CertificateAuthority:
        path = self.config.ca_path
        if os.path.exists(os.path.join(path, "ca.crt")) or self.config.ca_dir:
            ca = CertificateAuthority.load(path)
            log.info("CA %s from %s", ca.certificate.subject.rfc4514_string(), path)
            return ca
        ca = CertificateAuthority.init(path)
        log.info("created CA %s in %s; issue tokens with: splitpilot token issue --ca %s --role user "
                 "--subject NAME --out FILE", ca.certificate.subject.rfc4514_string(), path, path)
        return ca

    def _host_names(self, host: str) -> tuple[list[str], list[str]]:
        """(DNS names, IP addresses) the host token must carry."""
        dns: list[str] = []
        ips: list[str] = []

        def add(name: str) -> None:
            name = name.strip().strip("[]")
            if not name:
                return
            try:
                address = ipaddress.ip_address(name)
            except ValueError:
                if name not in dns:
                    dns.append(name)
                return
            if not address.is_unspecified and str(address) not in ips:
                ips.append(str(address))

        try:
            wildcard = ipaddress.ip_address(host).is_unspecified
        except ValueError:
            wildcard = False
        add(host)
        if wildcard:
            add(socket.gethostname())
            add(socket.getfqdn())
        for name in self.config.host_names:
            add(name)
        for name in ("localhost", "127.0.0.1", "::1"):
            add(name)
        return dns, ips

    def _host_token(self, host: str) -> TokenFile:
        path = os.path.join(self.config.state_dir, HOST_TOKEN_FILE)
        dns, ips = self._host_names(host)
        if os.path.exists(path):
            reason = self._host_token_problem(path, dns, ips)
            if reason is None:
                log.info("host token %s (names: %s)", path, ", ".join(dns + ips))
                return read_token_file(path)
            log.info("host token %s: %s; issuing a new one", path, reason)
        subject = dns[0]
        token = self.ca.new_token(TokenRole.HOST, subject, dns_names=dns, ip_addresses=ips)
        write_private(path, token.to_pem())
        log.info("issued host token %s for %s", path, ", ".join(dns + ips))
        return token

    def _host_token_problem(self, path: str, dns: list[str], ips: list[str]) -> str | None:
        try:
            token = read_token_file(path)
            identity = TokenVerifier([self.ca.certificate]).verify(list(token.chain),
                                                                  Expectation.role(TokenRole.HOST))
        except (TokenError, KeyFileError) as exc:
            return f"not usable ({exc})"
        if identity.not_after - utcnow() < HOST_TOKEN_RENEW:
            return f"expires at {identity.not_after:%Y-%m-%d}"
        try:
            san = token.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            have_ips = {str(a) for a in san.get_values_for_type(x509.IPAddress)}
        except x509.ExtensionNotFound:
            have_ips = set()
        missing = [n for n in dns if n not in identity.dns_names] + [a for a in ips if a not in have_ips]
        if missing:
            return f"does not name {', '.join(missing)}"
        return None

    def _open_files(self) -> ContentStore:
        config = self.config
        limits = {"max_file_size": config.max_file_size, "max_job_bytes": config.max_job_bytes,
                  "max_job_files": config.max_job_files}
        kind = file_store_kind(config.file_store, bool(getattr(self.store, "SHARED", False)))
        if kind == "xrootd":
            if not getattr(self.store, "SHARED", False):
                raise BrokerStartError("an xrootd file store needs a PostgreSQL store (its catalogue and locks are "
                                       "there); fix: --db postgresql://..., or --file-store local")
            from broker.xrdfiles import XRootDFileStore  # why: the optional `xrootd` extra
            try:
                return XRootDFileStore.from_url(self.store, config.file_store or "", config.state_dir,
                                                os.path.join(config.state_dir, "staging"), **limits)
            except ImportError as exc:
                raise BrokerStartError(f"an xrootd file store needs the XRootD client ({exc}); fix: pip install "
                                       "'splitpilot[xrootd]'") from None
        if kind == "database":
            if not getattr(self.store, "SHARED", False):
                raise BrokerStartError("file_store = \"database\" needs a PostgreSQL store (the content is "
                                       "shared through it); fix: --db postgresql://..., or --file-store local")
            from broker.dbfiles import DatabaseFileStore  # why: only with PostgreSQL
            store = DatabaseFileStore(self.store, os.path.join(config.state_dir, "staging"), **limits)
            folder = os.path.join(config.state_dir, "files")
            if os.path.isdir(folder):  # content a broker before schema 6 kept here: into the shared store
                copied, size = store.import_folder(folder)
                if copied:
                    log.info("file store: %d file(s) of %d bytes copied from %s into the database; the folder "
                             "is no longer used and may be removed", copied, size, folder)
            return store
        return FileStore(os.path.join(config.state_dir, "files"), **limits)

    def collect_once(self, now: datetime.datetime | None = None) -> tuple[int, int, int]:
        """One garbage collection pass (the reaper thread calls this every gc_interval): unreferenced
        content older than file_grace, history of jobs final for longer than history_retention. Returns
        (files freed, bytes freed, events pruned) by this pass."""
        now = now or utcnow()
        files = freed = events = 0
        broker, config = self.broker, self.config
        if broker is None or not isinstance(self.store, SqlStore):
            return 0, 0, 0
        if config.output_retention is not None:   # first: what it frees is collected in this same pass
            outputs = self._drain(self.store.prune_outputs, now - config.output_retention,
                                  self.metrics.outputs_pruned)
            if outputs:
                log.info("output retention: %d output(s) of jobs final for longer than %s forgotten", outputs,
                         config.output_retention)
        if config.file_grace is not None:
            while removed := broker.files.collect(self.store, now - config.file_grace):
                files += len(removed)
                freed += sum(size for _sha, size in removed)
                self.metrics.gc_files_freed.inc(len(removed))
                self.metrics.gc_bytes_freed.inc(sum(size for _sha, size in removed))
                if self._stopping.is_set():
                    break
        if config.history_retention is not None:
            events = self._drain(self.store.prune_history, now - config.history_retention,
                                 self.metrics.history_pruned)
        if files or events:
            log.info("garbage collection: %d unreferenced content(s) of %d bytes removed, %d history events "
                     "pruned", files, freed, events)
        return files, freed, events

    def _drain(self, prune, cutoff: datetime.datetime, counter) -> int:
        """Call PRUNE(CUTOFF) (one bounded batch each) until it finds nothing or the broker stops;
        count each batch in COUNTER; return the total."""
        total = 0
        while pruned := prune(cutoff):
            total += pruned
            counter.inc(pruned)
            if self._stopping.is_set():
                break
        return total

    def _open_store(self) -> JobStore:
        url = self.config.store_url
        try:
            store = open_store(url, self.config.store_settings)
        except StoreUnavailable as exc:  # the driver's words, without the store's retry advice
            raise BrokerStartError(f"database {_redact(url)}: {exc.__cause__ or exc}; fix: check --db") from exc
        except SplitpilotError:
            raise
        except Exception as exc:  # noqa: BLE001 (driver errors: name the database and the fix)
            raise BrokerStartError(f"database {_redact(url)}: {exc}; fix: check --db") from exc
        log.info("store %s", _redact(url))
        return store

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def _start_grpc(self, host: str, port: int, credentials) -> int:
        server = grpc.aio.server(options=GRPC_OPTIONS)
        add_servicers(server, self.broker)
        self.health = BrokerHealth(self.broker)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = format_address(host, port)
        try:
            bound = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            bound = 0
            detail = str(exc)
        else:
            detail = "nothing bound"
        if not bound:
            await server.stop(None)
            raise BrokerStartError(f"cannot listen on {address} ({detail}); fix: the port is in use or the address "
                                   "is not this host's: choose another --listen HOST:PORT")
        await server.start()
        self._server = server
        return bound


FILE_STORES = ("local", "database")


def file_store_kind(choice: str | None, shared_store: bool) -> str:
    """The file store to use: CHOICE, or by default "database" for a store several brokers may share
    (PostgreSQL) and "local" otherwise."""
    if choice is None:
        return "database" if shared_store else "local"
    if choice.startswith(("xrootd://", "root://")):
        return "xrootd"
    if choice not in FILE_STORES:
        raise BrokerStartError(f"file store {choice!r} is not one of {', '.join(FILE_STORES)}, xrootd://HOST:PORT/"
                               "PATH; fix: --file-store local, --file-store database or --file-store xrootd://...")
    return choice


def _loopback(host: str) -> bool:
    """Whether HOST (an address or a name) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def metrics_bind(text: str, public: bool, option: str = "--metrics") -> tuple[str, int]:
    """(host, port) of --metrics or --monitor (OPTION): PORT alone means 127.0.0.1:PORT; an address beyond
    loopback needs PUBLIC."""
    if text.isdigit():
        text = f"127.0.0.1:{text}"
    host, port = parse_address(text, option)
    if not public and not _loopback(host) and option == "--monitor":
        raise UsageError(f"--monitor {text}: {host} is reachable from other machines, and the monitor has no "
                         f"authentication; fix: serve it on 127.0.0.1:{port} (open it through an SSH tunnel), or "
                         "add --monitor-public to show aggregated counts only (no site names, job ids or "
                         "messages) to anyone who reaches it")
    if not public and not _loopback(host):
        raise UsageError(f"--metrics {text}: {host} is reachable from other machines, and the endpoint has no "
                         "authentication (it shows job counts, RPC rates and pilots seen to anyone); fix: serve it "
                         f"on 127.0.0.1:{port} (scrape through an SSH tunnel or a local Prometheus), or add "
                         "--metrics-public if a firewall restricts who can reach it")
    return host, port


def _redact(url: str) -> str:
    """The URL without a password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in credentials else url
    return url


__all__ = ["DEFAULT_LISTEN", "DEFAULT_PORT", "BrokerConfig", "BrokerServer", "BrokerStartError",
           "format_address", "parse_address"]
