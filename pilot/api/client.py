"""The Python API of the broker: one client class per token role.

    from pilot.api.client import BrokerClient
    with BrokerClient("broker.example:7443", "~/.splitpilot/token.pem") as broker:
        ids = broker.submit(["jobs.toml"])          # uploads the inputs first
        print(broker.status(ids[0]).state)
        broker.output(ids[0], "results/")           # every output, sha256 verified

    BrokerClient  user (or admin) token: submit, upload, status, list, output, kill
    AgentClient   agent token: match (with a P-256 job key made here), pilot reports
    JobClient     a job token held in memory only: states, heartbeats, inputs, outputs
                  (pilot.api.jobclient, re-exported here: it never loads cryptography)
    AdminClient   admin token: sites, pilots, requeue, everyone's jobs, revocation

Outputs are written by `pilot.api.outdir.OutputDirectory`: never outside the
folder given, never through a symbolic link, never over an existing file
(unless force=True, and then only over regular files).

Every client talks gRPC over mutual TLS: its token is the client
certificate. The CA certificate that verifies the broker defaults to the
last certificate of the token's chain (token files written by `splitpilot
token issue` end with it). Failed calls raise `BrokerError` subclasses
carrying the gRPC code and the broker's message.

Before connecting, and again when a call cannot reach the broker, the
clients of people (BrokerClient, AdminClient) check their own certificate:
an expired token, or one not issued by the CA the client trusts, is reported
as such (`TokenUnusable`), never as "cannot reach the broker". (An agent
tells its refusals apart itself: pilot.agent.refusal.) Any client reports a
broker whose certificate is not from the trusted CA as such (`WrongBroker`).

A newer broker may answer with values this version does not know: a job
state becomes the pseudo-state UNKNOWN(n) (pilot.api.states.read_state), a
count of an unknown state is kept by its name (JobListing.other_counts), a
Match answer of an unknown kind is an empty match; each is logged once.
"""

from __future__ import annotations

import builtins
import datetime
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pilot.api.base import (  # noqa: F401 (re-exported: the API's names stay pilot.api.client.*)
    CLIENT_OPTIONS,
    DEFAULT_TIMEOUT,
    STREAM_TIMEOUT,
    AccessDenied,
    BaseClient,
    BrokerError,
    BrokerUnavailable,
    InvalidRequest,
    NotFound,
    OutputFile,
    PreconditionFailed,
    TokenUnusable,
    WrongBroker,
    _receive,
    read_ca_pem,
)
from pilot.api.files import CHUNK_SIZE, OnProgress, check_sandbox_name, sha256_of_file
from pilot.api.jobclient import JobClient, UpdateResult  # noqa: F401 (re-exported)
from pilot.api.jobfile import JobDescription, load_job_file
from pilot.api.outdir import OutputDirectory
from pilot.api.states import JobState, read_state
from pilot.errors import SplitpilotError, UsageError
from pilot.tokens import Identity, TokenFile, TokenRole, parse_identity, read_token_file
from pilot.tokens.files import KeyPermissions, certificate_pem, load_certificates, private_key_pem
from splitpilot.broker.v1 import broker_pb2 as pb
from splitpilot.broker.v1 import broker_pb2_grpc as rpc_pb
from splitpilot.job.v1 import job_pb2

log = logging.getLogger("splitpilot.client")

#: Wait before asking again after a Match answer this version cannot read (a newer broker's), seconds.
UNKNOWN_ANSWER_RETRY_S = 30
SUBMIT_BATCH = 5000


# ------------------------------------------------------------------ errors

# The values the broker records, as the client reports them (the client's own types: the
# store's records are the server's business).

@dataclass(frozen=True)
class JobEvent:
    time: datetime.datetime
    state: JobState
    attempt: int
    detail: str


@dataclass(frozen=True)
class PilotInfo:
    pilot_id: str
    site: str
    node: str
    first_seen: datetime.datetime
    last_seen: datetime.datetime
    jobs_matched: int
    end_reason: str = ""
    #: Serial (hex) of the agent certificate the pilot id is bound to ('' for a pilot not yet bound).
    certificate_serial: str = ""
    #: Not ended, and seen within the broker's heartbeat timeout.
    alive: bool = False
    #: Jobs it reported having run when it ended.
    jobs_run: int = 0
    #: Jobs it holds now (an attempt under way).
    current_job_ids: tuple[int, ...] = ()
    #: When it reported its end (None: not reported).
    ended: datetime.datetime | None = None


@dataclass(frozen=True)
class SiteInfo:
    """One site as AdminService.ListSites reports it."""

    site: str
    #: 'enabled', 'draining' or 'disabled' ('unknown' for a state of a newer broker).
    state: str
    reason: str
    #: When an admin set the state (None: never).
    state_updated: datetime.datetime | None
    pilots_alive: int
    jobs_running: int
    #: Waiting jobs whose site lists allow the site (resources not compared).
    jobs_waiting: int
    #: Jobs that ended unsuccessfully there within the window, by state name (e.g. 'FAILED_EXECUTION').
    failures: dict[str, int]
    #: Pilots that ended within the window without running a job.
    empty_pilots: int


@dataclass(frozen=True)
class RevokedToken:
    """One revoked token (SERIAL set), or every token of SUBJECT in ROLE issued up to REVOKED (SERIAL '')."""

    id: int
    serial: str
    subject: str
    role: str
    reason: str
    revoked: datetime.datetime
    revoked_by: str
    #: End of validity of the revoked certificate (None: unknown, or a holder revocation).
    not_after: datetime.datetime | None = None


_logged: set[str] = set()


def _logged_once(what: str) -> bool:
    """Whether WHAT was logged already (and, from now on, it was)."""
    seen = what in _logged
    _logged.add(what)
    return seen


def token_problem(chain: Sequence[x509.Certificate], ca_pem: bytes, now: datetime.datetime | None = None
                  ) -> str | None:
    """Why the token whose certificate chain is CHAIN cannot work with a broker of the CA in CA_PEM
    (expired, not yet valid, another CA's), with the fix; None when it can."""
    leaf = chain[0]
    identity = parse_identity(leaf)
    now = now or datetime.datetime.now(datetime.UTC)
    who = f"your {identity.role.value} token ({identity.subject})"
    if now > leaf.not_valid_after_utc:
        return (f"{who} expired at {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z (now {now:%Y-%m-%d %H:%M:%S}Z); "
                "fix: ask the broker's operator for a new token (splitpilot token issue)")
    if now < leaf.not_valid_before_utc:
        return (f"{who} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S}Z (now "
                f"{now:%Y-%m-%d %H:%M:%S}Z); fix: check this machine's clock (NTP)")
    trusted = load_certificates(ca_pem, "CA certificate")
    for ca in trusted:
        try:
            leaf.verify_directly_issued_by(ca)
            return None
        except (ValueError, TypeError, InvalidSignature):
            continue
    def named(ca: x509.Certificate) -> str:  # CAs made with the defaults share a name: the fingerprint tells
        return f"{ca.subject.rfc4514_string()} (SHA256:{ca.fingerprint(hashes.SHA256()).hex()[:16]}...)"
    issuer = named(chain[-1]) if len(chain) > 1 and chain[-1].subject == leaf.issuer else leaf.issuer.rfc4514_string()
    return (f"{who} is not from this broker's CA: it was issued by {issuer}, and the CA this client trusts for the "
            f"broker is {', '.join(named(ca) for ca in trusted)}; fix: use a token issued by the broker's CA, or give "
            "that CA's certificate with --ca-cert (or ca_cert in the config file)")


# ------------------------------------------------------------------ results

@dataclass(frozen=True)
class JobStatus:
    """A job as the broker reports it (history only from `status`)."""

    job_id: int
    name: str
    owner: str
    state: JobState
    attempt: int
    submitted: datetime.datetime
    updated: datetime.datetime
    site: str
    node: str
    pilot_id: str
    exit_code: int | None
    message: str
    history: tuple[JobEvent, ...]
    outputs: tuple[OutputFile, ...]
    spec: job_pb2.JobSpec
    #: Why a waiting job has not matched (status() of a WAITING job; None otherwise).
    wait: WaitReport | None = None
    #: The payload's CPU seconds and resident memory (bytes) at its last heartbeat, and when: a running
    #: job's, once it has sent one (None otherwise, and from brokers older than this field).
    cpu_seconds: float | None = None
    rss_bytes: int | None = None
    usage_at: datetime.datetime | None = None
    #: The batch (submission) of the job ('' for jobs queued before batches existed, or from an older broker).
    batch_id: str = ""

    @classmethod
    def from_proto(cls, info: pb.JobInfo) -> JobStatus:
        return cls(job_id=info.job_id, name=info.spec.name, owner=info.spec.owner, state=read_state(info.state),
                   attempt=info.attempt, submitted=_from_ms(info.submitted_unix_ms),
                   updated=_from_ms(info.updated_unix_ms), site=info.site, node=info.node, pilot_id=info.pilot_id,
                   exit_code=info.exit_code if info.HasField("exit_code") else None, message=info.message,
                   history=tuple(JobEvent(_from_ms(e.time_unix_ms), read_state(e.state), e.attempt, e.detail)
                                 for e in info.history),
                   outputs=tuple(OutputFile(o.name, o.size, o.sha256) for o in info.outputs), spec=info.spec,
                   wait=WaitReport.from_proto(info.wait) if info.HasField("wait") else None,
                   cpu_seconds=info.cpu_seconds if info.HasField("cpu_seconds") else None,
                   rss_bytes=info.rss_bytes if info.HasField("rss_bytes") else None,
                   usage_at=_from_ms(info.usage_unix_ms) if info.usage_unix_ms else None,
                   batch_id=info.batch_id)

    @property
    def final(self) -> bool:
        return self.state.final


@dataclass(frozen=True)
class Unmet:
    """One requirement of a job that a site (or every site) did not offer: what it asks, what was offered."""

    requirement: str
    wanted: str
    offered: str


@dataclass(frozen=True)
class SiteWait:
    """One site's side of a WaitReport: its admin state, what its pilots did not offer, their last offer."""

    site: str
    state: str
    unmet: tuple[Unmet, ...]
    last_offer: datetime.datetime | None


@dataclass(frozen=True)
class WaitReport:
    """Why a waiting job has not matched (GetJob's WaitAnalysis)."""

    summary: str
    window_s: int
    never_runnable: bool
    jobs_ahead: int
    sites: tuple[SiteWait, ...]

    @classmethod
    def from_proto(cls, wait: pb.WaitAnalysis) -> WaitReport:
        return cls(wait.summary, wait.window_s, wait.never_runnable, wait.jobs_ahead, tuple(
            SiteWait(s.site, s.state, tuple(Unmet(u.requirement, u.wanted, u.offered) for u in s.unmet),
                     _from_ms(s.last_offer_unix_ms) if s.last_offer_unix_ms else None) for s in wait.sites))


@dataclass(frozen=True)
class SubmitWarning:
    """Jobs of a submission that no site has ever been able to run (queued all the same)."""

    #: Positions of the jobs concerned in what was submitted.
    job_indexes: tuple[int, ...]
    message: str
    unmet: tuple[Unmet, ...]


@dataclass(frozen=True)
class Submission:
    """What submit_checked returns: the ids of the queued jobs, in order, and the broker's warnings."""

    job_ids: list[int]
    warnings: list[SubmitWarning]
    #: Input files uploaded, and those the broker already held for the caller (named by digest only).
    uploaded: int = 0
    reused: int = 0
    #: The batch every job of the submission went into ('' from a broker older than batches).
    batch_id: str = ""


@dataclass(frozen=True)
class BatchInfo:
    """One batch of the caller's (ListBatches): the jobs of one submission, counted per state."""

    batch_id: str
    owner: str
    created: datetime.datetime
    jobs: int
    counts: dict[JobState, int]
    #: Counts of states this version does not know (a newer broker's), by the broker's name for them.
    other_counts: dict[str, int] = field(default_factory=dict)
    #: The label it was made with ('' for none).
    label: str = ""


@dataclass(frozen=True)
class JobListing:
    jobs: list[JobStatus]
    #: Jobs per state among all those the caller may see (not only this page).
    counts: dict[JobState, int]
    #: Counts of states this version does not know (a newer broker's), by the broker's name for them.
    other_counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class NoMatch:
    """Match found nothing: why, when to ask again, and whether to leave."""

    reason: str
    retry_after_s: int
    leave: bool
    matched = False


@dataclass(frozen=True)
class MatchedJob:
    """A job given to this agent, with its token and the private key made for it.

    The key exists in memory only: hand it to the wrapper over the pipe, or
    to `job_client()`, never to a file.
    """

    job_id: int
    attempt: int
    spec: job_pb2.JobSpec = field(repr=False)
    token_pem: bytes = field(repr=False)
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    not_after: datetime.datetime
    address: str = ""
    ca_pem: bytes = field(default=b"", repr=False)
    #: How often the job's wrapper should heartbeat the broker, seconds (0: the wrapper's default).
    broker_heartbeat_s: int = 0
    #: The broker keeps the attempt alive from the pilot's heartbeats (see AgentClient.pilot_heartbeat's USAGE).
    liveness_from_pilot: bool = False
    matched = True

    @property
    def key_pem(self) -> bytes:
        return private_key_pem(self.key)

    def job_client(self, **kwargs) -> JobClient:
        return JobClient(self.address, self.token_pem, self.key, self.ca_pem or None, **kwargs)


@dataclass(frozen=True)
class Download:
    """What became of one output: written to PATH, or ERROR (a BrokerError, OutputRefused, a checksum
    or size mismatch) with nothing written."""

    job_id: int
    name: str
    path: str | None = None
    error: SplitpilotError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class HeartbeatAnswer:
    stop: list[tuple[int, int]]
    leave: bool


# ------------------------------------------------------------------ the base client

#: Digests per FindFiles call (the broker's limit).
FIND_FILES_BATCH = 10_000
#: output_tail: bytes kept (the end of a failed job's stderr), and the largest output read for it.
TAIL_BYTES = 64 * 1024
TAIL_MAX_SIZE = 16 * 1024 * 1024


def _from_ms(ms: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)


def _read_ca(ca_pem: bytes | str | os.PathLike | None, chain: Sequence[x509.Certificate]) -> bytes:
    if ca_pem is None:
        root = chain[-1]
        if len(chain) < 2 or root.issuer != root.subject:
            raise UsageError("the token file holds no CA certificate; fix: pass the broker's CA certificate "
                             "(--ca-cert FILE, or ca_pem=...)")
        return certificate_pem([root])
    data = read_ca_pem(ca_pem)
    load_certificates(data, "CA certificate")
    return data


class _TokenClient(BaseClient):
    """A client of a token file: its chain is parsed (identity, the own-token check), then the channel opens."""

    #: Check the own token before connecting and when the broker cannot be reached (TokenUnusable).
    CHECKS_OWN_TOKEN = False

    def __init__(self, address: str, token: TokenFile | str | os.PathLike, ca_pem=None, *,
                 timeout: float = DEFAULT_TIMEOUT, server_name: str | None = None) -> None:
        tf = _load_token(token)
        self._chain = tuple(tf.chain)
        self.identity: Identity = parse_identity(tf.chain[0])
        super().__init__(address, certificate_pem([tf.chain[0]]), private_key_pem(tf.key), _read_ca(ca_pem, tf.chain),
                         timeout=timeout, server_name=server_name)

    @property
    def certificate(self) -> x509.Certificate:
        """The certificate of the client's own token (its leaf)."""
        return self._chain[0]

    def _token_problem(self) -> str | None:
        return token_problem(self._chain, self.ca_pem) if self.CHECKS_OWN_TOKEN else None


def _wire_states(states: Iterable[JobState]) -> builtins.list[job_pb2.JobState]:
    # cast: protoc's .pyi types an enum field by its own int subclass; any int is valid on the wire.
    return [cast(job_pb2.JobState, int(s)) for s in states]


def _job_scope(identity: Identity) -> tuple[int, int]:
    """The job and attempt a job token is for; a caller's mistake (another role's token) named."""
    if identity.role is not TokenRole.JOB or identity.job_id is None or identity.attempt is None:
        raise UsageError(f"a job client needs a job token, got the {identity.describe()}; fix: use the job "
                         "token that came with the match (MatchedJob.job_client())")
    return identity.job_id, identity.attempt


def _load_token(token: TokenFile | str | os.PathLike) -> TokenFile:
    if isinstance(token, TokenFile):
        return token
    return read_token_file(os.path.expanduser(os.fspath(token)), KeyPermissions.REFUSE)


def _digest(path: str) -> tuple[str, int]:
    try:
        return sha256_of_file(path)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


def _file_chunks(path: str, name: str, size: int, sha256: str,
                 on_progress: OnProgress | None = None) -> Iterator[pb.UploadFileRequest]:
    yield pb.UploadFileRequest(header=pb.FileHeader(name=name, size=size, sha256=sha256))
    done = 0
    if on_progress is not None:
        on_progress(0, size, name)
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK_SIZE):
            yield pb.UploadFileRequest(data=block)
            # Counted once gRPC has taken the chunk: the bytes handed to the network, capped at the size
            # hashed (a file that grew meanwhile is refused by the broker; the bar does not pass 100%).
            done += len(block)
            if on_progress is not None:
                on_progress(min(done, size), size, name)


def _counted(chunks: Iterable[bytes], size: int, name: str, on_progress: OnProgress | None) -> Iterator[bytes]:
    """CHUNKS as they are, reporting the bytes received so far (capped at SIZE: a peer that sends more
    is refused by the writer, not shown as 120%)."""
    if on_progress is None:
        yield from chunks
        return
    on_progress(0, size, name)
    done = 0
    for block in chunks:
        yield block
        done += len(block)
        on_progress(min(done, size), size, name)


# ------------------------------------------------------------------ users

class BrokerClient(_TokenClient):
    """Calls with a user (or admin) token: UserService."""

    CHECKS_OWN_TOKEN = True

    def _stubs(self) -> None:
        self._stub = rpc_pb.UserServiceStub(self._channel)

    def upload(self, path: str | os.PathLike, name: str | None = None, *,
               on_progress: OnProgress | None = None) -> job_pb2.InputFile:
        """Upload the file at PATH; return the InputFile (name, size, sha256) to put in a spec.
        ON_PROGRESS(done_bytes, total_bytes, name) watches the transfer (pilot.api.files.OnProgress)."""
        path = os.fspath(path)
        name = check_sandbox_name(name or os.path.basename(path), "input name")
        sha256, size = _digest(path)
        return self._upload_hashed(path, name, sha256, size, on_progress)

    def _upload_hashed(self, path: str, name: str, sha256: str, size: int,
                       on_progress: OnProgress | None = None) -> job_pb2.InputFile:
        try:
            response = self._stub.UploadFile(_file_chunks(path, name, size, sha256, on_progress),
                                             timeout=STREAM_TIMEOUT)
        except grpc.RpcError as exc:
            raise self._failure("UploadFile", exc) from None
        return job_pb2.InputFile(name=name, size=response.size, sha256=response.sha256)

    def find_files(self, sha256s: Iterable[str]) -> dict[str, int]:
        """{sha256: size} of the contents among SHA256S this caller may name as inputs without uploading
        them (its own uploads, its jobs' outputs). A broker older than FindFiles answers {} (everything
        is uploaded, as before)."""
        wanted = sorted(set(sha256s))
        found: dict[str, int] = {}
        for start in range(0, len(wanted), FIND_FILES_BATCH):
            try:
                response = self._call("FindFiles", self._stub.FindFiles,
                                      pb.FindFilesRequest(sha256=wanted[start:start + FIND_FILES_BATCH]))
            except BrokerError as exc:
                if exc.code is grpc.StatusCode.UNIMPLEMENTED:
                    return {}
                raise
            asked = set(wanted[start:start + FIND_FILES_BATCH])
            found.update((f.sha256, f.size) for f in response.files if f.sha256 in asked)
        return found

    def submit(self, jobs: str | os.PathLike | JobDescription | job_pb2.JobSpec | Iterable, *,
               label: str = "", on_progress: OnProgress | None = None) -> list[int]:
        """Queue jobs given as job file paths, JobDescriptions or JobSpecs (or a list
        of them). Inputs of job files are uploaded first (each file once).
        More than 5,000 jobs go in several requests, each all-or-nothing, all into one
        batch (the first request's). Returns the job ids; submit_checked also returns
        the broker's warnings and the batch id. LABEL names the batch (ListBatches shows it)."""
        return self.submit_checked(jobs, label=label, on_progress=on_progress).job_ids

    def submit_checked(self, jobs: str | os.PathLike | JobDescription | job_pb2.JobSpec | Iterable, *,
                       label: str = "", on_progress: OnProgress | None = None) -> Submission:
        """Like submit; returns the ids and the broker's warnings (jobs no site has ever been able to run,
        their indexes counted over everything submitted in this call). ON_PROGRESS watches each upload;
        an input already on the broker is reported once, whole, without a transfer."""
        if isinstance(jobs, (str, os.PathLike, JobDescription, job_pb2.JobSpec)):
            jobs = [jobs]
        items: list[JobDescription | job_pb2.JobSpec] = []
        for item in jobs:
            if isinstance(item, (str, os.PathLike)):
                items.extend(load_job_file(item))
            elif isinstance(item, (JobDescription, job_pb2.JobSpec)):
                items.append(item)
            else:
                raise UsageError(f"cannot submit a {type(item).__name__}: give job file paths, JobDescriptions "
                                 "or JobSpecs")
        # Each input file is hashed here once; what the broker already holds for this caller (an earlier
        # submission's inputs: the store is content-addressed) is named by digest, not uploaded again.
        digests: dict[str, tuple[str, int]] = {}
        for item in items:
            for ref in item.inputs if isinstance(item, JobDescription) else ():
                if ref.path not in digests:
                    digests[ref.path] = _digest(ref.path)
        present = self.find_files(sha for sha, _size in digests.values()) if digests else {}
        uploaded: dict[str, tuple[str, int]] = {}
        reused: set[str] = set()
        specs: list[job_pb2.JobSpec] = []
        for item in items:
            if isinstance(item, job_pb2.JobSpec):
                specs.append(item)
                continue
            spec = job_pb2.JobSpec()
            spec.CopyFrom(item.spec)
            for ref in item.inputs:
                if ref.path not in uploaded:
                    sha256, size = digests[ref.path]
                    if present.get(sha256) == size:
                        reused.add(ref.path)
                        if on_progress is not None:
                            on_progress(size, size, ref.name)
                    else:
                        done = self._upload_hashed(ref.path, check_sandbox_name(ref.name, "input name"), sha256,
                                                   size, on_progress)
                        sha256, size = done.sha256, done.size
                    uploaded[ref.path] = (sha256, size)
                sha256, size = uploaded[ref.path]
                spec.input_files.add(name=ref.name, size=size, sha256=sha256)
            specs.append(spec)
        ids: list[int] = []
        warnings: list[SubmitWarning] = []
        batch_id = ""
        for start in range(0, len(specs), SUBMIT_BATCH):
            chunk = specs[start:start + SUBMIT_BATCH]
            # One submission is one batch: the first request makes it, the others add to it.
            request = pb.SubmitRequest(jobs=chunk, batch_id=batch_id, batch_label="" if batch_id else label)
            response = self._call("Submit", self._stub.Submit, request, timeout=300)
            batch_id = batch_id or response.batch_id
            ids.extend(response.job_ids)
            warnings.extend(SubmitWarning(tuple(start + i for i in w.job_indexes), w.message,
                                          tuple(Unmet(u.requirement, u.wanted, u.offered) for u in w.unmet))
                            for w in response.warnings)
        return Submission(ids, warnings, uploaded=len(uploaded) - len(reused), reused=len(reused),
                          batch_id=batch_id)

    def status(self, job_id: int) -> JobStatus:
        """One job with its history and outputs."""
        return JobStatus.from_proto(self._call("GetJob", self._stub.GetJob, pb.GetJobRequest(job_id=job_id)).job)

    def list(self, states: Iterable[JobState] = (), limit: int = 0, before_job_id: int = 0, *,
             batch_id: str = "") -> JobListing:
        """The caller's jobs, newest first (LIMIT 0: the broker's default, 1,000); BATCH_ID: only that
        batch's (the counts too). A batch that is not the caller's is NOT_FOUND (BrokerError)."""
        response = self._call("ListJobs", self._stub.ListJobs, pb.ListJobsRequest(
            states=_wire_states(states), limit=limit, before_job_id=before_job_id, batch_id=batch_id))
        return _listing(response)

    def batch_jobs(self, batch_id: str) -> builtins.list[JobStatus]:
        """Every job of the caller's batch BATCH_ID, lowest id first (paged: any size)."""
        jobs: builtins.list[JobStatus] = []
        before = 0
        while True:
            page = self.list(limit=10_000, before_job_id=before, batch_id=batch_id).jobs
            if any(job.batch_id != batch_id for job in page):
                # A broker older than batches ignores the filter and lists every job: never act on those.
                raise SplitpilotError(f"the broker at {self.address} does not filter by batch (it is older than "
                                      "batches); fix: name the jobs by id (job submit printed them), or upgrade "
                                      "the broker")
            jobs.extend(page)
            if not page:
                break
            before = page[-1].job_id
        return sorted(jobs, key=lambda job: job.job_id)

    def list_batches(self, limit: int = 0, before_batch_id: str = "") -> builtins.list[BatchInfo]:
        """The caller's batches, newest first (LIMIT 0: the broker's default, 1,000)."""
        response = self._call("ListBatches", self._stub.ListBatches, pb.ListBatchesRequest(
            limit=limit, before_batch_id=before_batch_id))
        found = []
        for info in response.batches:
            counts, other = _counts(info.counts_by_state)
            found.append(BatchInfo(info.batch_id, info.owner, _from_ms(info.created_unix_ms), info.jobs, counts,
                                   other, info.label))
        return found

    def output(self, job_id: int, dest_dir: str | os.PathLike, names: Iterable[str] | None = None, *,
               force: bool = False, on_progress: OnProgress | None = None) -> builtins.list[str]:
        """Download the outputs of a job (all, or NAMES) into DEST_DIR, verifying
        each sha256; return the paths written. Raises the first failure (after
        trying every output): see `download` for the per-output results."""
        results = self.download(job_id, dest_dir, names, force=force, on_progress=on_progress)
        for result in results:
            if result.error is not None:
                raise result.error
        return [result.path for result in results if result.path is not None]   # (each one without error)

    def download(self, job_id: int, dest_dir: str | os.PathLike, names: Iterable[str] | None = None, *,
                 force: bool = False, job: JobStatus | None = None,
                 on_progress: OnProgress | None = None) -> builtins.list[Download]:
        """Download the outputs of a job (all, or NAMES) into DEST_DIR: one Download per output, in name
        order; a failed output (an unsafe name, an existing file, a link or file in the way, a damaged
        copy) does not stop the others. Existing files are kept unless FORCE (regular files only).
        ON_PROGRESS(done_bytes, total_bytes, name) watches each transfer (pilot.api.files.OnProgress)."""
        job = job or self.status(job_id)
        known = {o.name: o for o in job.outputs}
        results = []
        with OutputDirectory(dest_dir, force=force) as directory:
            for name in (sorted(known) if names is None else list(names)):
                try:
                    path = self._download_one(job_id, name, known.get(name), directory, on_progress)
                except SplitpilotError as exc:
                    results.append(Download(job_id, name, error=exc))
                else:
                    results.append(Download(job_id, name, path=path))
        return results

    def _download_one(self, job_id: int, name: str, output: OutputFile | None, directory: OutputDirectory,
                      on_progress: OnProgress | None = None) -> str:
        check_sandbox_name(name, "output name")  # the broker's rules, again, before anything is asked
        # Unknown names: the broker answers NOT_FOUND, listing the outputs.
        stream = self._stream("DownloadOutput", self._stub.DownloadOutput,
                              pb.DownloadOutputRequest(job_id=job_id, name=name))
        try:
            first = next(stream, None)
            if first is None or first.WhichOneof("kind") != "header":
                raise SplitpilotError(f"output {name!r} of job {job_id}: the broker's stream did not start with a "
                                      "header; fix: download it again")
            header = first.header
            if output is not None and (header.size, header.sha256) != (output.size, output.sha256):
                raise SplitpilotError(f"output {name!r} of job {job_id}: the broker announced size {header.size} "
                                      f"sha256 {header.sha256}, but listed {output.size} {output.sha256}; fix: "
                                      "download it again")
            return directory.write(name, _counted((chunk.data for chunk in stream), header.size, name, on_progress),
                                   header.size, header.sha256)
        finally:
            stream.close()  # ends the call if the output was refused before its data was read

    def output_tail(self, job_id: int, name: str, *, max_bytes: int = TAIL_BYTES,
                    max_size: int = TAIL_MAX_SIZE) -> bytes:
        """The last MAX_BYTES bytes of output NAME of a job (a failed job's payload.stderr), read into
        memory: the whole output is streamed and checked against the size and sha256 the broker
        announced, but only its tail is kept. An output larger than MAX_SIZE is not read at all
        (SplitpilotError with the fix: download it)."""
        import hashlib  # why: only this method hashes in memory

        check_sandbox_name(name, "output name")
        stream = self._stream("DownloadOutput", self._stub.DownloadOutput,
                              pb.DownloadOutputRequest(job_id=job_id, name=name))
        try:
            first = next(stream, None)
            if first is None or first.WhichOneof("kind") != "header":
                raise SplitpilotError(f"output {name!r} of job {job_id}: the broker's stream did not start with a "
                                      "header; fix: try again")
            size, sha256 = first.header.size, first.header.sha256
            if size > max_size:
                raise SplitpilotError(f"output {name!r} of job {job_id} is {size} bytes, more than the {max_size} "
                                      f"read to show its end; fix: splitpilot job output {job_id} DIR --name {name}")
            digest, tail, seen = hashlib.sha256(), bytearray(), 0
            for chunk in stream:
                seen += len(chunk.data)
                if seen > size:  # bound what a peer sends to what it announced
                    raise SplitpilotError(f"output {name!r} of job {job_id}: the broker sent more than the {size} "
                                          "bytes it announced; fix: try again")
                digest.update(chunk.data)
                tail += chunk.data
                del tail[:-max_bytes]
            if seen != size or digest.hexdigest() != sha256:
                raise SplitpilotError(f"output {name!r} of job {job_id}: the copy received does not match the size "
                                      "and sha256 the broker announced; fix: try again")
            return bytes(tail)
        finally:
            stream.close()

    def kill(self, job_id: int, reason: str = "") -> JobState:
        """Kill a job: at once when queued, at its next heartbeat when running."""
        response = self._call("KillJob", self._stub.KillJob, pb.KillJobRequest(job_id=job_id, reason=reason))
        return read_state(response.state)


def _counts(by_name: Mapping[str, int]) -> tuple[dict[JobState, int], dict[str, int]]:
    counts: dict[JobState, int] = {}
    other: dict[str, int] = {}
    for name, n in by_name.items():
        if name in job_pb2.JobState.keys():  # noqa: SIM118 (an enum wrapper, not a dict)
            counts[read_state(job_pb2.JobState.Value(name))] = n
        else:  # a newer broker's state: shown by its name
            other[name] = n
    return counts, other


def _listing(response: pb.ListJobsResponse) -> JobListing:
    counts, other = _counts(response.counts_by_state)
    return JobListing([JobStatus.from_proto(j) for j in response.jobs], counts, other)


# ------------------------------------------------------------------ agents

def _public_der(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _slot(slot: pb.Slot | Mapping) -> pb.Slot:
    if isinstance(slot, pb.Slot):
        return slot
    return pb.Slot(**dict(slot))


_FAILURES = {"wrapper": pb.ATTEMPT_FAILURE_WRAPPER, "infrastructure": pb.ATTEMPT_FAILURE_INFRASTRUCTURE,
             "stopped": pb.ATTEMPT_FAILURE_STOPPED, "limit": pb.ATTEMPT_FAILURE_LIMIT,
             "agent": pb.ATTEMPT_FAILURE_AGENT}


class AgentClient(_TokenClient):
    """Calls with an agent token: AgentService."""

    def _stubs(self) -> None:
        self._stub = rpc_pb.AgentServiceStub(self._channel)

    def match(self, slot: pb.Slot | Mapping, pilot_id: str, node: str) -> MatchedJob | NoMatch:
        """Ask for a job fitting SLOT (a Slot or a dict of its fields). The job
        key is made here; only its public half is sent."""
        key = ec.generate_private_key(ec.SECP256R1())
        response = self._call("Match", self._stub.Match, pb.MatchRequest(
            slot=_slot(slot), pilot_id=pilot_id, node=node, job_public_key=_public_der(key)))
        kind = response.WhichOneof("result")
        if kind is None:  # an answer of a kind this version does not know (a newer broker's): ask again later
            if not _logged_once("Match"):
                log.warning("Match: the broker answered with a result this agent does not know (a newer broker?); "
                            "taken as no job, asking again in %ds", UNKNOWN_ANSWER_RETRY_S)
            return NoMatch("the broker's answer is of a kind this agent does not know (a newer broker?)",
                           UNKNOWN_ANSWER_RETRY_S, False)
        if kind != "job":
            none = response.no_match
            return NoMatch(none.reason, none.retry_after_s, none.leave)
        job = response.job
        return MatchedJob(job_id=job.job_id, attempt=job.attempt, spec=job.spec, token_pem=job.job_token_pem,
                          key=key, not_after=datetime.datetime.fromtimestamp(job.token_not_after_unix, datetime.UTC),
                          address=self.address, ca_pem=self.ca_pem, broker_heartbeat_s=job.broker_heartbeat_s,
                          liveness_from_pilot=job.liveness_from_pilot)

    def pilot_heartbeat(self, pilot_id: str, node: str, running: Iterable[tuple[int, int]] = (),
                        cores_in_use: int = 0,
                        usage: Mapping[tuple[int, int], tuple[float, int, int]] | None = None) -> HeartbeatAnswer:
        """The pilot is alive and runs RUNNING (job, attempt) pairs. USAGE maps the attempts whose wrapper
        the agent heard from to (CPU seconds, RSS bytes, sandbox bytes): a broker that matched them with
        liveness_from_pilot keeps them alive with it. Answers which attempts to stop and whether to leave."""
        usage = usage or {}

        def attempt(job_id: int, number: int) -> pb.RunningAttempt:
            figures = usage.get((job_id, number))
            if figures is None:
                return pb.RunningAttempt(job_id=job_id, attempt=number)
            cpu, rss, sandbox = figures
            return pb.RunningAttempt(job_id=job_id, attempt=number, usage=pb.AttemptUsage(
                cpu_seconds=cpu, rss_bytes=max(0, rss), sandbox_bytes=max(0, sandbox)))

        response = self._call("PilotHeartbeat", self._stub.PilotHeartbeat, pb.PilotHeartbeatRequest(
            pilot_id=pilot_id, node=node, cores_in_use=cores_in_use, running=[attempt(j, a) for j, a in running]))
        return HeartbeatAnswer([(r.job_id, r.attempt) for r in response.stop], response.leave)

    def report_pilot_end(self, pilot_id: str, node: str, jobs_run: int, reason: str, abandoned: bool = False) -> None:
        """The pilot leaves; the broker ends whatever attempts it still holds (ABANDONED: its agent died)."""
        self._call("ReportPilotEnd", self._stub.ReportPilotEnd, pb.ReportPilotEndRequest(
            pilot_id=pilot_id, node=node, jobs_run=jobs_run, reason=reason, abandoned=abandoned))

    def report_attempt_failure(self, job_id: int, attempt: int, failure: str | int, detail: str,
                               pilot_id: str) -> JobState | int:
        """FAILURE: 'wrapper', 'infrastructure', 'stopped', 'limit', 'agent' (or the AttemptFailure value)."""
        if isinstance(failure, str):
            if failure not in _FAILURES:
                raise UsageError(f"failure {failure!r}: use one of {', '.join(_FAILURES)}")
            failure = _FAILURES[failure]
        response = self._call("ReportAttemptFailure", self._stub.ReportAttemptFailure,
                              # cast: protoc's .pyi types enum fields by their own int subclass
                              pb.ReportAttemptFailureRequest(job_id=job_id, attempt=attempt,
                                                             failure=cast(pb.AttemptFailure, failure),
                                                             detail=detail, pilot_id=pilot_id))
        return read_state(response.state)


# ------------------------------------------------------------------ admins

_SITE_STATES = {"enabled": pb.SITE_STATE_ENABLED, "draining": pb.SITE_STATE_DRAINING,
                "disabled": pb.SITE_STATE_DISABLED}


class AdminClient(_TokenClient):
    """Calls with an admin token: AdminService."""

    CHECKS_OWN_TOKEN = True

    def _stubs(self) -> None:
        self._stub = rpc_pb.AdminServiceStub(self._channel)

    def set_site_state(self, site: str, state: str, reason: str = "") -> str:
        """STATE: 'enabled', 'draining' or 'disabled'; returns the previous state."""
        if state not in _SITE_STATES:
            raise UsageError(f"site state {state!r}: use one of {', '.join(_SITE_STATES)}")
        response = self._call("SetSiteState", self._stub.SetSiteState,
                              pb.SetSiteStateRequest(site=site, state=_SITE_STATES[state], reason=reason))
        return {v: k for k, v in _SITE_STATES.items()}.get(response.previous, "unknown")

    def list_pilots(self, seen_within_s: int = 0, *, site: str = "", state: str = "",
                    limit: int = 0) -> list[PilotInfo]:
        """Pilots seen within SEEN_WITHIN_S (0: an hour), most recent first; SITE and STATE ('alive',
        'ended') filter; LIMIT 0: the broker's default page (1,000)."""
        response = self._call("ListPilots", self._stub.ListPilots, pb.ListPilotsRequest(
            seen_within_s=seen_within_s, site=site, state=state, limit=limit))
        return [PilotInfo(p.pilot_id, p.site, p.node, _from_ms(p.first_seen_unix_ms), _from_ms(p.last_seen_unix_ms),
                          p.jobs_matched, p.end_reason, p.certificate_serial, p.alive, p.jobs_run,
                          tuple(p.current_job_ids), _from_ms(p.ended_unix_ms) if p.ended_unix_ms else None)
                for p in response.pilots]

    def list_sites(self, failures_within_s: int = 0) -> list[SiteInfo]:
        """Every site the broker knows, by name; failures counted over FAILURES_WITHIN_S (0: an hour)."""
        response = self._call("ListSites", self._stub.ListSites,
                              pb.ListSitesRequest(failures_within_s=failures_within_s))
        names = {v: k for k, v in _SITE_STATES.items()}
        return [SiteInfo(s.site, names.get(s.state, "unknown"), s.reason,
                         _from_ms(s.state_updated_unix_ms) if s.state_updated_unix_ms else None, s.pilots_alive,
                         s.jobs_running, s.jobs_waiting,
                         {name.removeprefix("JOB_STATE_"): n for name, n in sorted(s.failures_by_class.items())},
                         s.empty_pilots) for s in response.sites]

    def requeue(self, job_id: int, reason: str = "") -> int:
        """End the job's current attempt and queue the next; returns the new attempt number."""
        return self._call("Requeue", self._stub.Requeue, pb.RequeueRequest(job_id=job_id, reason=reason)).attempt

    def list_all_jobs(self, states: Iterable[JobState] = (), limit: int = 0, before_job_id: int = 0, *,
                      owner: str = "", site: str = "", updated_since: datetime.datetime | None = None,
                      batch_id: str = "") -> JobListing:
        """Any owner's jobs, newest first; OWNER, SITE (of the current or last attempt) and UPDATED_SINCE
        filter (the counts cover OWNER's jobs, or everyone's)."""
        since_ms = int(updated_since.timestamp() * 1000) if updated_since is not None else 0
        response = self._call("ListAllJobs", self._stub.ListAllJobs, pb.ListAllJobsRequest(
            states=_wire_states(states), limit=limit, before_job_id=before_job_id, owner=owner, site=site,
            updated_since_unix_ms=since_ms, batch_id=batch_id))
        return _listing(response)

    def revoke_token(self, reason: str, *, serial: str | None = None, subject: str | None = None,
                     role: str | None = None, certificate_pem: bytes | None = None) -> tuple[RevokedToken, bool]:
        """Revoke one token by SERIAL (hex) or by its CERTIFICATE_PEM (never its key), or every token of
        SUBJECT in ROLE issued until now. Returns (the revocation, whether it already existed)."""
        chosen = [serial is not None, subject is not None or role is not None, certificate_pem is not None]
        if sum(chosen) != 1 or (chosen[1] and not (subject and role)):
            raise UsageError("name the token to revoke in one way: serial, certificate_pem, or subject with role")
        request = pb.RevokeTokenRequest(reason=reason)
        if serial is not None:
            request.serial = serial
        elif certificate_pem is not None:
            request.certificate_pem = certificate_pem
        elif subject is not None and role is not None:   # (checked above: the only way left)
            request.holder.subject, request.holder.role = subject, role
        response = self._call("RevokeToken", self._stub.RevokeToken, request)
        return _revoked(response.revoked), response.already_revoked

    def list_revoked(self, *, page: int = 0) -> list[RevokedToken]:
        """Every revocation, oldest first, asked PAGE at a time (0: the broker's largest page, 10,000).
        An older broker answers everything at once (no `more`): one call then."""
        found: list[RevokedToken] = []
        after = 0
        while True:
            response = self._call("ListRevoked", self._stub.ListRevoked,
                                  pb.ListRevokedRequest(limit=page, after_id=after))
            found.extend(_revoked(r) for r in response.revoked)
            if not response.more or not response.revoked:
                return found
            after = response.revoked[-1].id


def _revoked(info: pb.RevokedToken) -> RevokedToken:
    return RevokedToken(id=info.id, serial=info.serial, subject=info.subject, role=info.role, reason=info.reason,
                        revoked=_from_ms(info.revoked_unix_ms), revoked_by=info.revoked_by,
                        not_after=_from_ms(info.not_after_unix_ms) if info.not_after_unix_ms else None)


__all__ = [
    "AccessDenied", "AdminClient", "AgentClient", "BatchInfo", "BrokerClient", "BrokerError", "BrokerUnavailable",
    "Download",
    "HeartbeatAnswer", "InvalidRequest", "JobClient", "JobEvent", "JobListing", "JobStatus", "MatchedJob",
    "NoMatch", "NotFound", "OutputFile", "PilotInfo", "PreconditionFailed", "RevokedToken", "SiteInfo", "SiteWait",
    "SubmitWarning", "Submission", "TokenUnusable", "Unmet", "UpdateResult", "WaitReport", "WrongBroker",
    "token_problem",
]
