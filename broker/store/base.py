"""The storage interface of the broker, shared by the SQLite and PostgreSQL stores.

A store owns every piece of durable broker state: jobs, attempts, their
history, pilots, sites and output records. Each method is one transaction:
a state and its last-update time are always written together, and a match
claims exactly one job attempt even under concurrency (several threads of
one broker, or several broker processes on one PostgreSQL database).

Matching cost does not grow with the queue: jobs are grouped into
requirement classes (identical cores, memory, disk, walltime, platform,
container, site lists), and a match looks at the head job of each class that
fits the slot through an index (class, priority, id) over waiting jobs only.
"""

from __future__ import annotations

import abc
import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from broker.lifecycle import RequeueCause
from pilot.api.states import JobState
from pilot.errors import SplitpilotError
from splitpilot.job.v1 import job_pb2

# ------------------------------------------------------------------ errors

class StoreError(SplitpilotError):
    """Root of store errors."""


class UnknownJob(StoreError):
    """Attributes: job_id."""

    exit_code = 2

    def __init__(self, job_id: int) -> None:
        super().__init__(f"no job {job_id}; fix: check the id with `splitpilot job status`")
        self.job_id = job_id


class InvalidTransition(StoreError):
    """A state change the life cycle does not allow. Attributes: job_id, current, requested."""

    def __init__(self, job_id: int, current: JobState, requested: JobState, why: str = "") -> None:
        super().__init__(f"job {job_id}: {current.name} -> {requested.name} is not allowed"
                         + (f" ({why})" if why else ""))
        self.job_id = job_id
        self.current = current
        self.requested = requested


class StaleAttemptError(StoreError):
    """The caller acts for an attempt that is no longer current (fencing).

    Attributes: job_id, attempt (presented), current (the job's attempt).
    """

    def __init__(self, job_id: int, attempt: int, current: int) -> None:
        super().__init__(f"job {job_id}: attempt {attempt} is over (the job is at attempt {current}); "
                         "this wrapper must stop")
        self.job_id = job_id
        self.attempt = attempt
        self.current = current


class OutOfOrderUpdate(StoreError):
    """An update whose sequence number is not the next one.

    Attributes: job_id, attempt, sequence (presented), expected.
    """

    def __init__(self, job_id: int, attempt: int, sequence: int, expected: int) -> None:
        super().__init__(f"job {job_id} attempt {attempt}: update {sequence} arrived, expected {expected}")
        self.job_id = job_id
        self.attempt = attempt
        self.sequence = sequence
        self.expected = expected


class NotYours(StoreError):
    """The caller may not act on this job (another owner, another pilot)."""


class PilotNotYours(NotYours):
    """The pilot id is bound to another agent certificate. Attributes: pilot_id."""

    def __init__(self, pilot_id: str) -> None:
        super().__init__(f"pilot id {pilot_id!r} belongs to another agent certificate (its first call bound it "
                         "to that certificate's serial, holder and site); nothing was changed; fix: use a pilot id "
                         "of your own (each agent makes a fresh random one), and the agent token that first used it")
        self.pilot_id = pilot_id


class LimitExceeded(StoreError):
    """An upload would take a job over one of its output limits. Attributes: job_id, name."""

    exit_code = 2

    def __init__(self, job_id: int, name: str, detail: str) -> None:
        super().__init__(f"job {job_id} output {name!r}: {detail}")
        self.job_id = job_id
        self.name = name


class NotRevocable(StoreError):
    """RevokeToken names a serial no broker on this database has seen. Attributes: serial."""

    exit_code = 1

    def __init__(self, serial: str) -> None:
        super().__init__(f"no token with serial {serial} has been used with this broker, so its holder and role "
                         "are unknown; fix: revoke it with its certificate (--token-file FILE, the key is not "
                         "needed), or every token of its holder (--subject NAME --role ROLE); check the serial "
                         "with `splitpilot token show FILE`")
        self.serial = serial


class BadValue(StoreError):
    """A value the database cannot hold (a number beyond 64 bits, a NUL in a text): the caller's
    mistake, which the services normally refuse before it reaches the store (INVALID_ARGUMENT)."""

    exit_code = 2

    def __init__(self, detail: str) -> None:
        super().__init__(f"a value of the request cannot be stored ({detail}); fix: send numbers within the "
                         "ranges broker.proto gives and text without NUL characters")


class StoreUnavailable(StoreError):
    """The database cannot be reached or is busy beyond its timeout (UNAVAILABLE: retry later)."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"the broker's database is unavailable ({detail}); fix: retry later (the broker's "
                         "operator sees the cause in its log)")


class TooManyJobs(StoreError):
    """A submission larger than StoreSettings.max_jobs_per_submit. Attributes: count, limit."""

    exit_code = 2

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(f"{count} jobs in one submission; at most {limit} are accepted at once; "
                         "fix: submit them in several batches")
        self.count = count
        self.limit = limit


class MissingContent(StoreError):
    """A submission names content the file store no longer holds (collected as garbage after the
    inputs were checked, or never there): nothing was stored. Attributes: sha256s."""

    def __init__(self, sha256s: Sequence[str]) -> None:
        shown_digests = ", ".join(sha256s[:3]) + (f" and {len(sha256s) - 3} more" if len(sha256s) > 3 else "")
        super().__init__(f"input content sha256 {shown_digests} is not in the broker's file store (removed as "
                         "unused content while this submission was checked); nothing was submitted; fix: upload "
                         "the file again and submit again")
        self.sha256s = list(sha256s)


class UnknownBatch(StoreError):
    """A batch id that names no batch of the caller's: unknown, or another user's (the same words for
    both: the id is a handle, ownership the authority, and the answer no oracle). Attributes: batch_id."""

    exit_code = 2

    def __init__(self, batch_id: str) -> None:
        shown = batch_id[:40].encode("unicode_escape").decode("ascii")
        super().__init__(f"no batch {shown!r} of yours; fix: check the id with `splitpilot job batches` (job "
                         "submit prints it), or leave the batch out")
        self.batch_id = batch_id


# ------------------------------------------------------------------ values

@dataclass(frozen=True)
class SlotOffer:
    """What an agent's slot offers (from MatchRequest.slot and its token)."""

    site: str
    cores: int
    memory_mb: int
    disk_mb: int
    time_left_s: int
    platforms: tuple[str, ...] = ()
    containers: bool = False
    #: How the slot isolates a job (pilot.launch.isolation), recorded in the job's history.
    isolation: str = ""


@dataclass(frozen=True)
class OfferRecord:
    """The most a site's pilots offered in one time bucket (BUCKET: its start, Unix ms; 0: all time):
    what `why is my job waiting` compares a job's requirements with."""

    site: str
    bucket: int
    cores: int
    memory_mb: int
    disk_mb: int
    time_left_s: int
    containers: bool
    platforms: frozenset[str]
    #: The last offer counted, Unix ms.
    last_offer: int

    def merged(self, other: OfferRecord) -> OfferRecord:
        """The larger of both, field by field (the same site and bucket)."""
        return OfferRecord(self.site, self.bucket, max(self.cores, other.cores),
                           max(self.memory_mb, other.memory_mb), max(self.disk_mb, other.disk_mb),
                           max(self.time_left_s, other.time_left_s), self.containers or other.containers,
                           self.platforms | other.platforms, max(self.last_offer, other.last_offer))


@dataclass(frozen=True)
class PilotRef:
    """Which pilot asks: the pilot id from the request; site, subject, serial and not_after from the
    agent certificate that calls. The first call binds the pilot id to (serial, subject, site); later
    calls naming it must come from the same certificate (PilotNotYours)."""

    pilot_id: str
    site: str
    node: str
    subject: str = ""
    #: The agent certificate's serial, lower-case hex.
    serial: str = ""
    #: The agent certificate's end of validity: refreshed job tokens of the pilot's jobs never outlive it.
    not_after: datetime.datetime | None = None


@dataclass(frozen=True)
class Assignment:
    """A job claimed for a pilot: what Match answers (before the token is issued)."""

    job_id: int
    attempt: int
    spec: job_pb2.JobSpec
    owner: str
    submitted: datetime.datetime  # for the queue-wait histogram: returned by the claim, no second read


@dataclass(frozen=True)
class JobEventRecord:
    time: datetime.datetime
    state: JobState
    attempt: int
    detail: str


@dataclass(frozen=True)
class OutputRecord:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class JobRecord:
    job_id: int
    spec: job_pb2.JobSpec
    owner: str
    state: JobState
    attempt: int
    max_attempts: int
    submitted: datetime.datetime
    updated: datetime.datetime
    site: str = ""
    node: str = ""
    pilot_id: str = ""
    exit_code: int | None = None
    message: str = ""
    kill_requested: bool = False
    history: tuple[JobEventRecord, ...] = ()
    outputs: tuple[OutputRecord, ...] = ()
    #: The payload's use at the current attempt's last heartbeat (None: no heartbeat yet this attempt).
    usage: Usage | None = None
    #: The batch (submission) of the job (None: queued before batches existed, schema version 4).
    batch: str | None = None


@dataclass(frozen=True)
class BatchRecord:
    """One batch: the jobs of one submission (see broker.proto BatchInfo)."""

    batch_id: str
    owner: str
    created: datetime.datetime
    #: Its jobs per state (states with none left out).
    counts: dict[JobState, int] = field(default_factory=dict)
    #: The label it was made with ('' for none).
    label: str = ""

    @property
    def jobs(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class Usage:
    """What a job's last heartbeat reported: CPU seconds, resident memory, and when."""

    cpu_seconds: float
    rss_bytes: int
    time: datetime.datetime


@dataclass(frozen=True)
class UpdateResult:
    state: JobState
    replay: bool = False


@dataclass(frozen=True)
class PilotRecord:
    pilot_id: str
    site: str
    node: str
    first_seen: datetime.datetime
    last_seen: datetime.datetime
    jobs_matched: int
    end_reason: str = ""
    #: Serial (hex) of the agent certificate the pilot id is bound to ('' for a pilot not yet bound).
    certificate_serial: str = ""
    #: Not ended, and seen within the heartbeat timeout (as of the listing).
    alive: bool = False
    #: Jobs it reported having run when it ended.
    jobs_run: int = 0
    #: Jobs it holds now (an attempt under way), lowest id first.
    current_job_ids: tuple[int, ...] = ()
    #: When it reported its end (None: not reported).
    ended: datetime.datetime | None = None


#: Pilot states a listing may ask for.
PILOT_STATES = ("alive", "ended")


@dataclass(frozen=True)
class SiteRecord:
    """One site as ListSites reports it (see broker.proto SiteInfo)."""

    site: str
    state: str = "enabled"
    reason: str = ""
    #: When an admin set the state (None: never).
    state_updated: datetime.datetime | None = None
    pilots_alive: int = 0
    jobs_running: int = 0
    #: Waiting jobs whose site lists allow the site (resources not compared).
    jobs_waiting: int = 0
    #: Jobs that ended unsuccessfully there within the window, by final state.
    failures: dict[JobState, int] = field(default_factory=dict)
    #: Pilots that ended within the window without running a job.
    empty_pilots: int = 0


#: Final states counted as a site's failures (KILLED and EXPIRED are the owner's or the queue's doing).
FAILURE_STATES = (JobState.FAILED_INPUT, JobState.FAILED_EXECUTION, JobState.FAILED_OUTPUT,
                  JobState.FAILED_WRAPPER, JobState.FAILED_LIMIT, JobState.LOST)


@dataclass(frozen=True)
class Revocation:
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


@dataclass(frozen=True)
class SeenToken:
    """A non-job certificate a broker verified: what RevokeToken by serial knows of it."""

    serial: str
    role: str
    subject: str
    not_after: datetime.datetime


@dataclass(frozen=True)
class Reaped:
    """One attempt the reaper ended (cause None: a waiting job expired)."""

    job_id: int
    attempt: int
    cause: RequeueCause | None
    new_state: JobState


@dataclass(frozen=True)
class StoreSettings:
    """Tunables of a store (the broker's configuration passes them in)."""

    default_max_attempts: int = 3
    #: An attempt with no heartbeat for this long is lost (a multiple of the
    #: wrappers' heartbeat interval: DIRAC uses 2.5 missed cycles).
    heartbeat_timeout: datetime.timedelta = datetime.timedelta(minutes=5)
    #: ASSIGNED without STARTED for this long: re-queued (the wrapper never came up).
    start_timeout: datetime.timedelta = datetime.timedelta(minutes=10)
    #: WAITING for this long: EXPIRED. None: never.
    queue_timeout: datetime.timedelta | None = None
    max_jobs_per_submit: int = 10_000
    #: An output upload's reservation older than this is dropped by the reaper (its broker died
    #: mid-upload); longer than the clients' stream timeout (1 h).
    reservation_timeout: datetime.timedelta = datetime.timedelta(hours=2)
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------- interface

class JobStore(abc.ABC):
    """Durable broker state. Implementations: SqliteStore, PostgresStore.

    All times are aware UTC datetimes; `now` parameters exist so that tests
    and the reaper can move time explicitly.
    """

    settings: StoreSettings

    # --- users
    def submit(self, owner: str, specs: Sequence[job_pb2.JobSpec], now: datetime.datetime) -> list[int]:
        """Queue SPECS (all or none) for OWNER in a new batch; return their ids in order."""
        return self.submit_batch(owner, specs, now)[1]

    @abc.abstractmethod
    def submit_batch(self, owner: str, specs: Sequence[job_pb2.JobSpec], now: datetime.datetime,
                     batch: str = "", label: str = "") -> tuple[str, list[int]]:
        """Queue SPECS (all or none) for OWNER into BATCH (one of OWNER's: else UnknownBatch, nothing
        written), or into a new batch labelled LABEL when BATCH is ''; return (the batch id, the job
        ids in order)."""

    @abc.abstractmethod
    def batch_owner(self, batch: str) -> str | None:
        """The owner of BATCH (None: no such batch)."""

    @abc.abstractmethod
    def list_batches(self, owner: str, limit: int = 1000, before: str = "") -> list[BatchRecord]:
        """OWNER's batches, newest first, with their jobs counted per state; BEFORE: only those made
        before that batch of OWNER's (UnknownBatch when it is not one)."""

    @abc.abstractmethod
    def get(self, job_id: int, *, with_history: bool = True) -> JobRecord:
        """One job; raises UnknownJob."""

    @abc.abstractmethod
    def list(self, owner: str | None, states: Sequence[JobState] = (), limit: int = 1000,
             before_job_id: int | None = None, *, site: str = "",
             updated_since: datetime.datetime | None = None, batch: str = "") -> list[JobRecord]:
        """Jobs of OWNER (None: everyone's), newest first, without history; SITE: only jobs whose
        current or last attempt is there; UPDATED_SINCE: only jobs whose state changed since; BATCH:
        only that batch's jobs (the caller checks whose it is: batch_owner)."""

    @abc.abstractmethod
    def counts(self, owner: str | None = None, batch: str = "") -> dict[JobState, int]:
        """Number of jobs per state (of OWNER, or all; of BATCH only, if given)."""

    @abc.abstractmethod
    def kill(self, job_id: int, owner: str | None, reason: str, now: datetime.datetime) -> JobState:
        """Kill: WAITING/ASSIGNED become KILLED at once; an active job gets
        kill_requested (its wrapper is told at the next heartbeat). OWNER None
        means an admin (any job); otherwise NotYours for another's job."""

    # --- agents
    @abc.abstractmethod
    def match(self, slot: SlotOffer, pilot: PilotRef, now: datetime.datetime) -> Assignment | None:
        """Claim the best waiting job that fits SLOT (priority, then age) for
        PILOT: WAITING -> ASSIGNED, attempt + 1, in one transaction; exactly one
        caller wins each job attempt. None when nothing fits (or the site is
        not enabled)."""

    @abc.abstractmethod
    def pilot_heartbeat(self, pilot: PilotRef, running: Sequence[tuple[int, int]], now: datetime.datetime,
                        usage: Mapping[tuple[int, int], tuple[float, int]] | None = None) -> list[tuple[int, int]]:
        """Record the pilot; return the (job, attempt) pairs it must stop.

        USAGE maps attempts whose wrapper the agent heard from to (CPU seconds, RSS bytes): each such
        attempt that this pilot holds, current, unfenced and active, is kept alive exactly as by its own
        job heartbeat (heartbeat time and usage figures); any other entry changes nothing."""

    @abc.abstractmethod
    def pilot_end(self, pilot: PilotRef, jobs_run: int, reason: str, now: datetime.datetime, *,
                  abandoned: bool = False) -> list[Reaped]:
        """Record the pilot's end, and end every active attempt it still holds at once, as the
        reaper would for a lost heartbeat (cause LOST: charged, re-queued or failed); ABANDONED
        says its agent died without ending them. Returns the attempts ended."""

    @abc.abstractmethod
    def attempt_failed(self, job_id: int, attempt: int, pilot: PilotRef, cause: RequeueCause | None,
                       detail: str, now: datetime.datetime) -> JobState:
        """The agent reports an attempt that ended without the wrapper's own
        final report. Only the pilot holding the attempt may (NotYours);
        StaleAttemptError if the attempt is over. CAUSE WRAPPER,
        INFRASTRUCTURE, STOPPED or AGENT re-queues per lifecycle.requeue_target;
        None means the agent killed it for exceeding a limit: FAILED_LIMIT, final."""

    @abc.abstractmethod
    def site_state(self, site: str) -> str:
        """'enabled' (default for unknown sites), 'draining' or 'disabled'."""

    @abc.abstractmethod
    def site_states(self) -> dict[str, str]:
        """The state of every site an admin ever set (the others are 'enabled')."""

    # --- why jobs wait
    @abc.abstractmethod
    def merge_offers(self, offers: Sequence[OfferRecord], drop_before_ms: int) -> None:
        """Fold OFFERS into the recorded ones (field-wise maximum, union of platforms, per site and
        bucket), and drop the buckets (except 0, all time) that started before DROP_BEFORE_MS."""

    @abc.abstractmethod
    def offers(self, since_ms: int) -> list[OfferRecord]:
        """The all-time records (bucket 0) and those of the buckets starting at SINCE_MS or later."""

    @abc.abstractmethod
    def jobs_ahead(self, job_id: int) -> int:
        """Waiting jobs of JOB_ID's requirement class that match before it (0 when it is not waiting)."""

    # --- jobs (the wrapper, through its job token)
    @abc.abstractmethod
    def job_update(self, job_id: int, attempt: int, state: JobState, sequence: int, detail: str,
                   exit_code: int | None, now: datetime.datetime) -> UpdateResult:
        """Apply a state change reported by the job: fencing (StaleAttemptError),
        sequence (replay of the last update is acknowledged with replay=True;
        others OutOfOrderUpdate), lifecycle (InvalidTransition). Also counts as
        a heartbeat."""

    @abc.abstractmethod
    def job_heartbeat(self, job_id: int, attempt: int, cpu_seconds: float, rss_bytes: int,
                      sandbox_bytes: int, now: datetime.datetime) -> bool:
        """Record liveness; return True when the job must stop (killed). Fencing applies."""

    @abc.abstractmethod
    def reserve_output(self, job_id: int, attempt: int, name: str, size: int, max_bytes: int, max_files: int,
                       now: datetime.datetime) -> int:
        """Reserve SIZE bytes for output NAME of the current attempt (fencing applies) before its data
        is read, atomically with every other upload of the job: LimitExceeded when the recorded
        outputs (except NAME, which the upload replaces), the other reservations and SIZE exceed
        MAX_BYTES, or when the outputs would be more than MAX_FILES names. Returns the reservation id
        (release it with release_reservation, or hand it to add_output)."""

    @abc.abstractmethod
    def release_reservation(self, reservation: int) -> None:
        """Drop a reservation (the upload failed); nothing if it is gone already."""

    @abc.abstractmethod
    def pending_outputs(self, job_id: int) -> list[tuple[int, str, int]]:
        """The reservations of JOB_ID: (attempt, name, size) (diagnostics and tests)."""

    @abc.abstractmethod
    def add_output(self, job_id: int, attempt: int, output: OutputRecord, now: datetime.datetime, *,
                   reservation: int | None = None) -> str | None:
        """Record an uploaded output of the current attempt (fencing applies), dropping RESERVATION in
        the same transaction. Returns the sha256 of the content it replaced (same name), if any and
        different: the caller frees it when nothing else refers to it."""

    # --- content ownership
    @abc.abstractmethod
    def add_file_owner(self, owner: str, sha256: str, size: int, now: datetime.datetime) -> bool:
        """OWNER uploaded this content; True if OWNER did not have it before."""

    @abc.abstractmethod
    def claim_inputs(self, owner: str, sha256s: Sequence[str], now: datetime.datetime) -> set[str]:
        """The contents among SHA256S that OWNER may use as inputs: uploaded by OWNER, or output of a
        job of OWNER. Those found only as outputs are recorded as OWNER's from now on (a job's input
        keeps its content alive when the output it came from is replaced)."""

    @abc.abstractmethod
    def content_referenced(self, sha256: str) -> bool:
        """Whether any output row or owner record refers to this content."""

    # --- admins and the reaper
    @abc.abstractmethod
    def set_site_state(self, site: str, state: str, reason: str, now: datetime.datetime) -> str:
        """Set 'enabled' / 'draining' / 'disabled'; return the previous state."""

    @abc.abstractmethod
    def list_pilots(self, seen_since: datetime.datetime, *, now: datetime.datetime | None = None, site: str = "",
                    state: str = "", limit: int = 1000) -> list[PilotRecord]:
        """Pilots seen since SEEN_SINCE, most recent first; SITE and STATE ('alive', 'ended', '': both) filter.
        A pilot is alive when it has not ended and was seen within the heartbeat timeout before NOW."""

    @abc.abstractmethod
    def list_sites(self, now: datetime.datetime, failures_since: datetime.datetime) -> list[SiteRecord]:
        """Every site with an admin state, a pilot seen within 30 days, a job under way or a failure within the
        window, by name, with its counts."""

    @abc.abstractmethod
    def pilot_expiry(self, pilot_id: str) -> datetime.datetime | None:
        """The not_after of the agent certificate PILOT_ID is bound to (None: unknown or not bound)."""

    # --- revocation
    @abc.abstractmethod
    def revoke(self, serial: str, subject: str, role: str, reason: str, revoked_by: str,
               not_after: datetime.datetime | None, now: datetime.datetime) -> tuple[Revocation, bool]:
        """Record a revocation: of one certificate (SERIAL) or, with SERIAL '', of every token of
        SUBJECT in ROLE issued up to NOW. Returns (the revocation, True) when an identical one
        existed already (nothing added)."""

    @abc.abstractmethod
    def revocations(self, after_id: int = 0, limit: int | None = None) -> list[Revocation]:
        """The revocations with an id above AFTER_ID, oldest first (at most LIMIT; None: all)."""

    @abc.abstractmethod
    def revocation_generation(self) -> tuple[int, int]:
        """A cheap fingerprint of the revoked table (highest id, count): when it changes, reload."""

    @abc.abstractmethod
    def note_tokens(self, tokens: Sequence[SeenToken], now: datetime.datetime) -> None:
        """Remember certificates a broker verified (first sighting kept)."""

    @abc.abstractmethod
    def seen_token(self, serial: str) -> SeenToken | None:
        """A certificate noted by note_tokens, by serial."""

    @abc.abstractmethod
    def requeue(self, job_id: int, cause: RequeueCause, detail: str, now: datetime.datetime) -> int:
        """End the current attempt and queue the next; return the new attempt
        (or raise InvalidTransition for a final job)."""

    @abc.abstractmethod
    def reap(self, now: datetime.datetime) -> list[Reaped]:
        """End attempts whose heartbeat is older than heartbeat_timeout (LOST
        cause) or that stayed ASSIGNED longer than start_timeout
        (NEVER_STARTED), and expire jobs waiting longer than queue_timeout.
        From then on the old attempt's token is refused (fencing)."""

    # --- metrics
    @abc.abstractmethod
    def stats(self) -> dict[str, int]:
        """Counters for the metrics endpoint: lost_attempts_total, pilots_seen,
        empty_pilots_total, matches_total (since the store was created)."""

    @abc.abstractmethod
    def close(self) -> None: ...
