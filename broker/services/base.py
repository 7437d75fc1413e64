"""The broker's gRPC services: shared machinery (this module) and the four
servicers (`service_user`, `service_agent`, `service_job`, `service_admin`).

Servicers run on grpc.aio: measured on 2 cores with mutual TLS and token
issuance, an asyncio server matched ~2,050 jobs/s against ~1,550/s for the
thread-pool server and ~1,350/s for asyncio handing every call to a thread.
So the store is called inline on the event loop for SQLite (its calls are
short, local, and serialised by SQLite anyway), and through a thread pool
for PostgreSQL (network round trips) and for heavy calls of any store
(submitting or listing thousands of jobs). File I/O always goes to threads.

Every handler is wrapped by `rpc()`: it identifies the caller (auth.py),
checks the service's role, runs the handler, and turns any exception into a
gRPC status with a message that names the problem and the fix
(`status_of`). The server keeps serving after any bad request. Requests are
decoded by `broker.services.add_servicers`' own deserializers: bytes protobuf cannot parse
(a string that is not UTF-8, a truncated field) reach the handler as
`Undecodable` and are refused with INVALID_ARGUMENT, where gRPC's own would
answer UNKNOWN.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import functools
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.message import DecodeError

from broker.auth import SERVICE_ROLES, Authoriser, Unauthenticated
from broker.ca import CertificateAuthority, public_key_from_request
from broker.files import ContentStore, LostContent, StoredFile
from broker.metrics import Metrics
from broker.specs import JobStartBudget
from broker.store.base import (
    BadValue,
    InvalidTransition,
    JobRecord,
    JobStore,
    LimitExceeded,
    NotRevocable,
    NotYours,
    OutOfOrderUpdate,
    StaleAttemptError,
    StoreError,
    StoreUnavailable,
    TooManyJobs,
    UnknownBatch,
    UnknownJob,
)
from broker.waiting import OfferLog, OfferSettings
from pilot.api.files import CHUNK_SIZE, FileRefused, FileTooLarge, MissingFile
from pilot.api.states import JobState
from pilot.errors import SplitpilotError, UsageError
from pilot.tokens import Identity, TokenRole, TokenVerifier
from pilot.tokens.errors import (
    IssueError,
    MalformedToken,
    StaleAttempt,
    TokenRefused,
    WrongJob,
    WrongRole,
    WrongSite,
)
from pilot.tokens.files import certificate_pem
from splitpilot.broker.v1 import broker_pb2 as pb

log = logging.getLogger("splitpilot.broker")



# ------------------------------------------------------------------ errors

class BadRequest(SplitpilotError):
    """The request itself is wrong (INVALID_ARGUMENT); the message says how."""

    exit_code = 2


class Conflict(SplitpilotError):
    """The request is well-formed but the job's state does not allow it (FAILED_PRECONDITION)."""


class NotFound(SplitpilotError):
    """A named thing (input, output) does not exist (NOT_FOUND)."""


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message for an exception raised by a handler."""
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, str(exc)
    if isinstance(exc, StaleAttempt):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, (WrongRole, WrongJob, WrongSite, NotYours)):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc)
    if isinstance(exc, TokenRefused):  # expired, untrusted, malformed
        return grpc.StatusCode.UNAUTHENTICATED, str(exc)
    if isinstance(exc, StaleAttemptError):
        # The same words whether the token or the store noticed first.
        return grpc.StatusCode.FAILED_PRECONDITION, str(StaleAttempt(exc.job_id, exc.attempt, exc.current))
    if isinstance(exc, LostContent):  # the broker's fault: DATA_LOSS, never the job's NOT_FOUND
        return grpc.StatusCode.DATA_LOSS, str(exc)
    if isinstance(exc, (UnknownJob, UnknownBatch, NotFound, MissingFile, NotRevocable)):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, (InvalidTransition, OutOfOrderUpdate, Conflict, IssueError)):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, (BadRequest, FileRefused, UsageError, MalformedToken, TooManyJobs, LimitExceeded, BadValue)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, StoreUnavailable):  # the database is down or restarting: the caller retries
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, StoreError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, SplitpilotError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s: %s", incident, exc, exc_info=exc)
    return grpc.StatusCode.INTERNAL, (f"internal broker error (incident {incident}); the broker logged the "
                                      "details; fix: retry later, and report the incident id if it persists")


# ------------------------------------------------------------------ settings and core

@dataclass(frozen=True)
class ServiceSettings:
    """Tunables of the services (the server's configuration passes them in)."""

    #: Suggested wait before an agent asks again after an empty match, seconds.
    empty_retry_s: int = 30
    #: Call the store from a thread pool for every call (True for network
    #: databases); False: inline on the event loop except heavy calls.
    offload_store: bool = False
    #: Threads for store offloading and file I/O.
    threads: int = 8
    #: Job token lifetime at match (None: the CA's maximum for job tokens).
    job_token_ttl: datetime.timedelta | None = None
    #: ListJobs: default and maximum page sizes.
    list_default: int = 1000
    list_max: int = 10_000
    #: How often wrappers heartbeat the broker, seconds (MatchedJob.broker_heartbeat_s); the server
    #: derives it from the store's heartbeat timeout (heartbeat_interval).
    broker_heartbeat_s: int = 30
    #: How the pilots' slot offers are summarised for "why is my job waiting".
    offers: OfferSettings = OfferSettings()


#: Wrappers heartbeat at most this often, and never less often than DEFAULT_HEARTBEAT_S.
MIN_HEARTBEAT_S = 1
DEFAULT_HEARTBEAT_S = 30
#: Heartbeats a healthy job may miss before the broker's timeout reaps it (DIRAC allows 2.5 cycles).
HEARTBEATS_PER_TIMEOUT = 3


def heartbeat_interval(timeout: datetime.timedelta) -> int:
    """The wrappers' heartbeat interval, seconds, for a broker heartbeat TIMEOUT: a third of it (so a
    healthy job may miss two heartbeats without being reaped), at most DEFAULT_HEARTBEAT_S. UsageError
    when the timeout is shorter than wrappers can meet."""
    shortest = datetime.timedelta(seconds=MIN_HEARTBEAT_S * HEARTBEATS_PER_TIMEOUT)
    if timeout < shortest:
        raise UsageError(f"a heartbeat timeout of {timeout.total_seconds():g}s is shorter than wrappers can meet: "
                         f"they heartbeat at most every {MIN_HEARTBEAT_S}s, and a healthy job must be allowed to "
                         f"miss {HEARTBEATS_PER_TIMEOUT - 1} heartbeats (a busy node, a slow broker); fix: "
                         f"--heartbeat-timeout {shortest.total_seconds():g}s or more")
    return max(MIN_HEARTBEAT_S, min(DEFAULT_HEARTBEAT_S, int(timeout.total_seconds()) // HEARTBEATS_PER_TIMEOUT))


class Broker:
    """What every servicer needs: store, files, CA, authoriser, metrics."""

    def __init__(self, store: JobStore, files: ContentStore, ca: CertificateAuthority, *,
                 settings: ServiceSettings | None = None, metrics: Metrics | None = None) -> None:
        self.store = store
        self.files = files
        # Replaced outputs free their content only when nothing refers to it (the local store asks the
        # job store; the database store checks in its own transaction).
        if getattr(files, "referenced", False) is None:
            files.referenced = store.content_referenced
        self.ca = ca
        self.ca_pem = certificate_pem([ca.certificate])
        self.settings = settings or ServiceSettings()
        self.metrics = metrics or Metrics()
        self.auth = Authoriser(TokenVerifier([ca.certificate]), ca.policy.clock_skew)
        self.executor = ThreadPoolExecutor(self.settings.threads, thread_name_prefix="broker-io")
        self.offers = OfferLog(self.settings.offers)
        self.spec_budget = JobStartBudget.for_broker(_largest_job_token(ca), len(self.ca_pem))

    async def call(self, fn: Callable, *args, heavy: bool = False, **kwargs):
        """Run a store call: inline, or in the thread pool (offloaded stores, heavy calls)."""
        if heavy or self.settings.offload_store:
            return await asyncio.get_running_loop().run_in_executor(
                self.executor, functools.partial(fn, *args, **kwargs))
        return fn(*args, **kwargs)

    async def call_or_undo(self, undo: Callable, fn: Callable, *args):
        """Like `call`, for a store call that creates something (a reservation): if this call is cancelled
        (the client went away) while FN runs in a thread, UNDO(FN's result) runs once FN has finished, so
        nothing it made is left behind unowned."""
        if not self.settings.offload_store:
            return fn(*args)  # inline: no await, nothing to cancel in between
        future = self.executor.submit(fn, *args)
        try:
            return await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            def undo_when_done(done) -> None:
                if not done.cancelled() and done.exception() is None:
                    self.executor.submit(undo, done.result())
            future.add_done_callback(undo_when_done)
            raise

    async def finally_(self, fn: Callable, *args):
        """Run FN in the thread pool to its end even if this call is cancelled meanwhile (clean-up
        in a `finally` of a call the client may abandon)."""
        await asyncio.shield(asyncio.wrap_future(self.executor.submit(fn, *args)))

    async def io(self, fn: Callable, *args):
        """Run file I/O in the thread pool (hashing and fsync release the GIL)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def prune(self, now: datetime.datetime) -> None:
        """Forget expired cached identities (the reaper calls this)."""
        self.auth.cache.prune()

    def flush_seen(self) -> None:
        """Write the certificates first seen by this process to the store (for RevokeToken by serial)."""
        seen = self.auth.take_seen()
        if not seen:
            return
        try:
            self.store.note_tokens(seen, utcnow())
        except BaseException:
            self.auth.give_back_seen(seen)
            raise

    def refresh_revocations(self) -> bool:
        """Note first-seen certificates, then reload the revocations if the store's changed (a cheap
        query when nothing did). Blocking: the server's revocation thread calls it every few seconds.
        Returns True when the list was reloaded."""
        self.flush_seen()
        generation = self.store.revocation_generation()
        if generation == self.auth.revoked.generation:
            return False
        self.auth.revoked.replace(self.store.revocations(), generation)
        return True

    def flush_offers(self, now: datetime.datetime | None = None) -> None:
        """Write the slot offers this process saw since the last flush into the store (blocking)."""
        self.offers.flush(self.store, to_ms(now or utcnow()))

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _largest_job_token(ca: CertificateAuthority) -> int:
    """Bytes of the largest job token chain (PEM leaf and CA) this CA issues: the longest owner name and
    the largest ids, plus a margin for the variable parts of a signature."""
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = ca.issue(TokenRole.JOB, "x" * 64, key.public_key(), job_id=2**63 - 1, attempt=2**32 - 1)
    return len(leaf.public_bytes(serialization.Encoding.PEM)) + len(certificate_pem([ca.certificate])) + 256


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# ------------------------------------------------------------------ handler wrappers

@dataclass(frozen=True)
class Undecodable:
    """A request message protobuf could not parse: its type's full name and the parser's words."""

    type_name: str
    error: str


def decoded(message):
    """MESSAGE, unless it is Undecodable: then BadRequest naming the problem."""
    if isinstance(message, Undecodable):
        raise BadRequest(f"the {message.type_name.rsplit('.', 1)[-1]} could not be decoded ({message.error}); fix: "
                         "send a message serialised by a protobuf library (strings must be UTF-8)")
    return message


def _deserializer(message_type) -> Callable[[bytes], object]:
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return Undecodable(message_type.DESCRIPTOR.full_name, str(exc).split(": ", 1)[-1][:200])
    return parse


def rpc(service: str) -> Callable:
    """Wrap a unary-response handler `(self, identity, request, context)`."""
    roles = SERVICE_ROLES[service]

    def decorate(fn: Callable) -> Callable:
        method = fn.__name__

        @functools.wraps(fn)
        async def handler(self, request, context):
            broker: Broker = self.broker
            started = time.perf_counter()
            try:
                identity = broker.auth.identify(context, roles)
                response = await fn(self, identity, decoded(request), context)
            except Exception as exc:  # noqa: BLE001 (every error becomes a status)
                code, message = _failed(broker, service, method, exc, started)
                await context.abort(code, message)
            broker.metrics.observe(method, "OK", time.perf_counter() - started)
            return response
        return handler
    return decorate


def rpc_stream(service: str) -> Callable:
    """Wrap a server-streaming handler (an async generator) like `rpc`."""
    roles = SERVICE_ROLES[service]

    def decorate(fn: Callable) -> Callable:
        method = fn.__name__

        @functools.wraps(fn)
        async def handler(self, request, context):
            broker: Broker = self.broker
            started = time.perf_counter()
            try:
                identity = broker.auth.identify(context, roles)
                async for item in fn(self, identity, decoded(request), context):
                    yield item
            except Exception as exc:  # noqa: BLE001
                code, message = _failed(broker, service, method, exc, started)
                await context.abort(code, message)
            broker.metrics.observe(method, "OK", time.perf_counter() - started)
        return handler
    return decorate


def _failed(broker: Broker, service: str, method: str, exc: Exception, started: float
            ) -> tuple[grpc.StatusCode, str]:
    code, message = status_of(exc)
    if isinstance(exc, WrongRole):
        message = f"{service}.{method}: {message}"
    broker.metrics.observe(method, code.name, time.perf_counter() - started)
    if code is not grpc.StatusCode.INTERNAL:
        log.debug("%s.%s refused: %s %s", service, method, code.name, message)
    return code, message


# ------------------------------------------------------------------ conversions and checks

def to_ms(when: datetime.datetime) -> int:
    return int(when.timestamp() * 1000)


#: Free text a peer sends (a reason, a detail, a node name) is kept to this many characters.
MAX_TEXT = 4000


def text(value: str, limit: int = MAX_TEXT) -> str:
    """VALUE as the broker stores free text from a peer: at most LIMIT characters (a hostile caller
    cannot fill the database), NUL and other control characters but tab and newline replaced (no
    database takes NUL in a text, and a terminal shows the rest)."""
    value = value[:limit]
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() or c in "\t\n" else "\ufffd" for c in value)


def job_info(record: JobRecord, *, history: bool = True) -> pb.JobInfo:
    info = pb.JobInfo(job_id=record.job_id, spec=record.spec, state=int(record.state), attempt=record.attempt,
                      submitted_unix_ms=to_ms(record.submitted), updated_unix_ms=to_ms(record.updated),
                      site=record.site, node=record.node, pilot_id=record.pilot_id, message=record.message,
                      batch_id=record.batch or "")
    info.spec.owner = record.owner
    if record.exit_code is not None:
        info.exit_code = record.exit_code
    if history:
        info.history.extend(pb.JobEvent(time_unix_ms=to_ms(e.time), state=int(e.state), attempt=e.attempt,
                                        detail=e.detail) for e in record.history)
    info.outputs.extend(pb.OutputFile(name=o.name, size=o.size, sha256=o.sha256) for o in record.outputs)
    if record.usage is not None and record.state in USAGE_STATES:   # a live attempt's use, not a past one's
        info.cpu_seconds = record.usage.cpu_seconds
        info.rss_bytes = record.usage.rss_bytes
        info.usage_unix_ms = to_ms(record.usage.time)
    return info


#: States whose attempt's last heartbeat figures JobInfo carries (the payload runs or saves).
USAGE_STATES = frozenset({JobState.STARTED, JobState.RUNNING, JobState.SAVING})


def job_public_key(data: bytes, field: str = "job_public_key"):
    """The ECDSA P-256 public key of a request (DER/PEM SPKI or CSR), else BadRequest."""
    if not data:
        raise BadRequest(f"{field} is empty; fix: send the DER SubjectPublicKeyInfo of a fresh ECDSA P-256 key "
                         "made on the worker node")
    try:
        # The common case first: a bare DER SubjectPublicKeyInfo (~4x cheaper than the general parser).
        key = serialization.load_der_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    try:
        if key is None:
            key = public_key_from_request(data)
    except MalformedToken as exc:
        raise BadRequest(f"{field}: {exc.detail}; fix: send the DER SubjectPublicKeyInfo (or a CSR) of an "
                         "ECDSA P-256 key") from None
    if not (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"):
        raise BadRequest(f"{field}: job tokens are issued for ECDSA P-256 keys only, not "
                         f"{getattr(getattr(key, 'curve', None), 'name', type(key).__name__)}; fix: generate "
                         "the job key with ec.generate_private_key(ec.SECP256R1())")
    return key


def check_owner(identity: Identity, record: JobRecord) -> None:
    """Users act on their own jobs only; admins on any."""
    if identity.role is TokenRole.USER and record.owner != identity.subject:
        # Not whose it is: a user guessing ids learns no other user's name (ids are sequential, so
        # that a job exists is no secret; who submitted it is).
        raise NotYours(f"job {record.job_id} belongs to another user, not to {identity.subject!r}; "
                       "fix: use the owner's token, or an admin token")


# ------------------------------------------------------------------ file streams

async def receive_file(broker: Broker, request_iterator, *, what: str,
                       record: Callable[[pb.FileHeader, StoredFile], object], before_data=None):
    """Read a file stream (UploadFileRequest or PutOutputRequest): the header (checked by BEFORE_DATA(header) and
    the store's limits before any data is read), then the data, verified;
    then place the content and call RECORD(stored), which writes the row that
    refers to it, both under the file store's lock (in a thread): RECORD(header,
    stored). Returns (header, what RECORD returned)."""
    iterator = request_iterator.__aiter__()
    try:
        first = decoded(await iterator.__anext__())
    except StopAsyncIteration:
        raise BadRequest("the stream ended before the header; fix: send a first message with the header") from None
    if first.WhichOneof("kind") != "header":
        raise BadRequest("the first message of the stream must carry the header (name, size, sha256); "
                         "fix: send the header before any data")
    header = first.header
    broker.files.check_header(header.name, header.size, header.sha256, what=what)
    if before_data is not None:
        await before_data(header)
    incoming = broker.files.receive(header.name, header.size, header.sha256, what=what)
    running: concurrent.futures.Future | None = None  # the pool's operation on INCOMING, while one runs

    async def in_pool(fn: Callable, *args):
        nonlocal running
        running = broker.executor.submit(fn, *args)
        # Shielded: a cancelled call (the client left) does not stop the operation, it only stops waiting.
        result = await asyncio.shield(asyncio.wrap_future(running))
        running = None
        return result

    try:
        async for chunk in iterator:
            if decoded(chunk).WhichOneof("kind") != "data":
                raise BadRequest("only the first message carries a header; fix: send data chunks after it")
            await in_pool(incoming.write, chunk.data)
        result = await in_pool(incoming.commit, functools.partial(record, header))
    finally:
        if running is not None:
            # Cancelled while a write or the commit runs in a thread: abort once it has returned, never
            # alongside it (abort closes the descriptor it writes to, whose number may be reused at once).
            running.add_done_callback(lambda _done: incoming.abort())
        else:
            incoming.abort()
    broker.metrics.file_bytes_received.inc(header.size)
    return header, result


async def send_file(broker: Broker, name: str, size: int, sha256: str, message):
    """Yield a stored file as MESSAGEs (GetInputResponse, DownloadOutputResponse): header, then data of
    at most 1 MiB each. Content a job's record names and the store lacks is the broker's loss
    (LostContent: DATA_LOSS), not the caller's mistake."""
    try:
        handle = await broker.io(broker.files.open, sha256, name)
    except LostContent:
        raise
    except MissingFile:
        raise LostContent(name, sha256) from None
    try:
        yield message(header=pb.FileHeader(name=name, size=size, sha256=sha256))
        while block := await broker.io(handle.read, CHUNK_SIZE):
            broker.metrics.file_bytes_sent.inc(len(block))
            yield message(data=block)
    finally:
        handle.close()


def check_job_total(name: str, total: int, limit: int, what: str) -> None:
    if total > limit:
        raise FileTooLarge(name, total, limit, what)


# ------------------------------------------------------------------ registration

_HANDLERS = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}


__all__ = ["BadRequest", "Broker", "Conflict", "NotFound", "ServiceSettings", "job_info",
           "rpc", "rpc_stream", "status_of"]
