"""UserService: submit, inspect and kill jobs; upload inputs, download outputs (user or admin tokens).

Content is stored once by sha256, but used per owner: a job may name as
inputs only content its owner uploaded or its owner's jobs produced. Any
other sha256, even one the broker holds, is refused exactly like unknown
content (same status, same words), and the size is compared only after
that check passed: knowing another user's sha256 and size reveals nothing
and grants nothing. Admins submitting act as themselves.

Every spec is checked before anything is stored (broker.specs: what a node can
run, and the ranges of every number): a refusal is INVALID_ARGUMENT naming the
job and the field, and leaves no row behind. A job no site has ever been able
to run is queued with a warning in the answer (broker.waiting); GetJob says
why a waiting job has not matched.
"""

from __future__ import annotations

import datetime
import logging
import re
from collections.abc import Sequence

from broker import waiting
from broker.files import StoredFile
from broker.services.base import (
    BadRequest,
    Broker,
    Conflict,
    NotFound,
    check_job_total,
    check_owner,
    job_info,
    receive_file,
    rpc,
    rpc_stream,
    send_file,
    text,
    to_ms,
    utcnow,
)
from broker.specs import MAX_PATTERN, SpecProblem, check_spec
from broker.store.base import UnknownBatch
from broker.store.classes import RequirementClass
from broker.store.sql import BATCH_LABEL_FORM, BATCH_LABEL_RE
from pilot.api.files import BadFileHeader, check_sandbox_name, check_sha256, name_problem, shown
from pilot.api.states import JobState
from pilot.tokens import Identity
from pilot.tokens.errors import IssueError
from pilot.tokens.identity import check_name
from splitpilot.broker.v1 import broker_pb2 as pb
from splitpilot.broker.v1 import broker_pb2_grpc as rpc_pb
from splitpilot.job.v1 import job_pb2

log = logging.getLogger("splitpilot.broker")

SERVICE = "UserService"
#: The last millisecond a time filter may name (datetime's range ends in year 9999).
LAST_MS = int(datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC).timestamp() * 1000)
#: Most digests one FindFiles may ask about (one submission's inputs, as --max-jobs-per-submit).
MAX_FIND_FILES = 10_000
SHA256_RE = re.compile(r"[0-9a-f]{64}")


class UserServicer(rpc_pb.UserServiceServicer):
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    @rpc(SERVICE)
    async def Submit(self, identity: Identity, request: pb.SubmitRequest, context) -> pb.SubmitResponse:
        broker = self.broker
        specs = list(request.jobs)
        limit = broker.store.settings.max_jobs_per_submit
        if not specs:
            raise BadRequest("the request holds no jobs; fix: add at least one JobSpec")
        if len(specs) > limit:
            raise BadRequest(f"{len(specs)} jobs in one request; the broker takes at most {limit}; fix: submit "
                             "them in several requests (the first one's batch_id in the others)")
        label = request.batch_label
        if label and request.batch_id:
            raise BadRequest("batch_label goes with a new batch only (a batch keeps the label it was made with); "
                             "fix: leave batch_label empty when naming batch_id")
        if label and not BATCH_LABEL_RE.fullmatch(label):
            raise BadRequest(f"batch_label {shown(label[:64])!r} is not {BATCH_LABEL_FORM}")
        # Big batches are checked off the event loop, so that matching goes on meanwhile; so are batches
        # with inputs (their check takes the file store's lock).
        cleaned, (batch, ids) = await broker.call(self._check_and_store, specs, identity.subject,
                                                  request.batch_id, label, heavy=True)
        log.info("%s submitted %d job(s) in batch %s: %s", identity.subject, len(ids), batch, _id_range(ids))
        warnings = await broker.call(self._never_runnable, cleaned, heavy=True)
        for warning in warnings:
            log.info("%s: %d job(s) no site has ever been able to run: %s", identity.subject,
                     len(warning.job_indexes), warning.message)
        return pb.SubmitResponse(job_ids=ids, warnings=warnings, batch_id=batch)

    def _never_runnable(self, specs: Sequence[job_pb2.JobSpec]) -> list[pb.SubmitWarning]:
        """One warning per requirement class of SPECS that no site has ever offered (none while no pilot was
        ever seen: nothing is known then)."""
        broker = self.broker
        try:
            broker.flush_offers()
            all_time = [r for r in broker.store.offers(2**62) if r.bucket == 0]  # no bucket is that late: all-time
        except Exception:  # noqa: BLE001 (a warning is advice: the jobs are queued already)
            log.exception("submit: the sites' offers could not be read; no never-runnable warnings")
            return []
        if not all_time:
            return []
        by_class: dict[RequirementClass, list[int]] = {}
        for index, spec in enumerate(specs):
            by_class.setdefault(RequirementClass.of(spec.requirements), []).append(index)
        found = []
        for requirement, indexes in by_class.items():
            unmet = waiting.never_offered(requirement, all_time)
            if unmet:
                found.append(pb.SubmitWarning(job_indexes=indexes, unmet=unmet, message=(
                    f"jobs[{_index_range(indexes)}]: no pilot of any site has ever offered what "
                    f"{'this job needs' if len(indexes) == 1 else 'these jobs need'}: {waiting.describe(unmet)}; "
                    "queued anyway, they wait until a site offers it; fix: ask for less (kill and resubmit), or "
                    "ask the sites' operators for such slots")))
        return found

    def _check_and_store(self, specs: list[job_pb2.JobSpec], owner: str, batch: str,
                         label: str) -> tuple[list[job_pb2.JobSpec], tuple[str, list[int]]]:
        """Check SPECS and store them (in a thread). With inputs, under the file store's lock from the input
        check to the commit: the local store's garbage collection (which takes the lock) then never removes
        content between the two. (The database store locks the content rows in the submission's own
        transaction instead: SqlStore.submit_batch.)"""
        if not any(spec.input_files for spec in specs):
            cleaned = self._checked_specs(specs, owner)
            return cleaned, self.broker.store.submit_batch(owner, cleaned, utcnow(), batch, label)
        with self.broker.files.lock:
            cleaned = self._checked_specs(specs, owner)
            return cleaned, self.broker.store.submit_batch(owner, cleaned, utcnow(), batch, label)

    def _checked_specs(self, specs: list[job_pb2.JobSpec], owner: str) -> list[job_pb2.JobSpec]:
        cleaned = [self._checked_spec(index, spec, owner) for index, spec in enumerate(specs)]
        self._check_inputs(specs, owner)
        return cleaned

    def _checked_spec(self, index: int, spec: job_pb2.JobSpec, owner: str) -> job_pb2.JobSpec:
        """The spec's own rules (what a node can run, names, digests, patterns, limits); its content is
        checked by _check_inputs."""
        where = _where(index, spec)
        try:
            check_spec(spec, self.broker.spec_budget)
        except SpecProblem as exc:
            raise BadRequest(f"{where}: {exc}") from None
        names: set[str] = set()
        total = 0
        for i, item in enumerate(spec.input_files):
            here = f"{where}: input_files[{i}]"
            try:
                check_sandbox_name(item.name, "input name")
                check_sha256(item.sha256, item.name)
            except BadFileHeader as exc:
                raise BadRequest(f"{here}: {exc}") from None
            if item.name in names:
                raise BadRequest(f"{here}: two inputs are named {item.name!r}; fix: rename one of them")
            names.add(item.name)
            total += item.size
        check_job_total(where, total, self.broker.files.max_job_bytes, "broker's per-job input limit")
        for i, pattern in enumerate(spec.output_patterns):
            problem = name_problem(pattern) if pattern else None
            if problem or len(pattern) > MAX_PATTERN:
                raise BadRequest(f"{where}: output_patterns[{i}] {pattern[:MAX_PATTERN]!r} "
                                 f"{problem or f'is longer than {MAX_PATTERN} characters'}; fix: write a pattern "
                                 "of printable characters, like '*.out'")
            if not pattern or pattern.startswith("/") or ".." in pattern.split("/"):
                raise BadRequest(f"{where}: output_patterns[{i}] {pattern!r} must be relative to the sandbox, "
                                 "without '..'; fix: write a pattern like '*.out'")
        clean = job_pb2.JobSpec()
        clean.CopyFrom(spec)
        clean.owner = owner
        return clean

    def _check_inputs(self, specs: list[job_pb2.JobSpec], owner: str) -> None:
        """Every input is content OWNER may use (uploaded by them, or produced by their jobs), present in
        the file store, of the size stated. Anything OWNER may not use gets the words of unknown content;
        the size is compared only after that."""
        wanted = {item.sha256 for spec in specs for item in spec.input_files}
        if not wanted:
            return
        store, files = self.broker.store, self.broker.files
        # Under the file store's lock: no replaced output frees content between this check and the owner
        # records claim_inputs writes (which keep it alive from then on).
        with files.lock:
            usable = store.claim_inputs(owner, sorted(wanted), utcnow())
            sizes = {sha: files.size_of(sha) if sha in usable else None for sha in wanted}
        for index, spec in enumerate(specs):
            for i, item in enumerate(spec.input_files):
                here = f"{_where(index, spec)}: input_files[{i}]"
                stored = sizes[item.sha256]
                if stored is None:
                    raise Conflict(f"{here} {item.name!r}: sha256 {item.sha256} is not in the broker's file store; "
                                   "fix: upload the file first (BrokerClient.upload; `splitpilot job submit` does "
                                   "this for the inputs of a job file)")
                if stored != item.size:
                    raise BadRequest(f"{here} {item.name!r}: size {item.size} differs from the stored content's "
                                     f"{stored} bytes; fix: take size and sha256 from the same file")

    @rpc(SERVICE)
    async def UploadFile(self, identity: Identity, request_iterator, context) -> pb.UploadFileResponse:
        store = self.broker.store

        def record(header: pb.FileHeader, stored: StoredFile) -> tuple[StoredFile, bool]:
            # The uploader sent every byte (the digest was verified): from now on it may use this content.
            return stored, store.add_file_owner(identity.subject, stored.sha256, stored.size, utcnow())

        header, (stored, new) = await receive_file(self.broker, request_iterator, what="input name", record=record)
        log.debug("%s uploaded %s (%d bytes, %s)", identity.subject, header.name, stored.size, stored.sha256)
        # Only whether *this* owner had it: another user's copy of the same bytes is never revealed.
        return pb.UploadFileResponse(sha256=stored.sha256, size=stored.size,
                                     already_present=stored.already_present and not new)

    @rpc(SERVICE)
    async def GetJob(self, identity: Identity, request: pb.GetJobRequest, context) -> pb.GetJobResponse:
        broker = self.broker
        record = await broker.call(broker.store.get, request.job_id, with_history=True, heavy=True)
        check_owner(identity, record)
        info = job_info(record)
        if record.state is JobState.WAITING:
            try:
                info.wait.CopyFrom(await broker.call(self._wait_analysis, record, heavy=True))
            except Exception:  # noqa: BLE001 (advice: the job itself is still answered)
                log.exception("GetJob %d: why the job waits could not be worked out", record.job_id)
        return pb.GetJobResponse(job=info)

    def _wait_analysis(self, record) -> pb.WaitAnalysis:
        """Why the waiting job of RECORD has not matched (in a thread: a few reads)."""
        broker = self.broker
        settings = broker.settings.offers
        now = utcnow()
        broker.flush_offers(now)
        since = to_ms(now) - (settings.window_s + settings.bucket_s) * 1000
        return waiting.analyse(RequirementClass.of(record.spec.requirements), broker.store.offers(since),
                               broker.store.site_states(), now, settings, broker.store.jobs_ahead(record.job_id))

    @rpc(SERVICE)
    async def ListJobs(self, identity: Identity, request: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        return await list_jobs(self.broker, identity.subject, request)

    @rpc(SERVICE)
    async def KillJob(self, identity: Identity, request: pb.KillJobRequest, context) -> pb.KillJobResponse:
        broker = self.broker
        owner = None if identity.role.value == "admin" else identity.subject
        state = await broker.call(broker.store.kill, request.job_id, owner, text(request.reason), utcnow())
        log.info("%s killed job %d (%s): now %s", identity.subject, request.job_id, request.reason or "no reason",
                 JobState(state).name)
        return pb.KillJobResponse(state=int(state))

    @rpc(SERVICE)
    async def FindFiles(self, identity: Identity, request: pb.FindFilesRequest, context) -> pb.FindFilesResponse:
        digests = list(request.sha256)
        if len(digests) > MAX_FIND_FILES:
            raise BadRequest(f"{len(digests)} digests in one FindFiles; the broker takes at most {MAX_FIND_FILES}; "
                             "fix: ask in several calls")
        for i, digest in enumerate(digests):
            if not SHA256_RE.fullmatch(digest):
                raise BadRequest(f"sha256[{i}] {digest[:80]!r} is not 64 lower-case hexadecimal characters; fix: "
                                 "send hashlib.sha256(content).hexdigest()")
        if not digests:
            return pb.FindFilesResponse()
        found = await self.broker.call(self._find_files, identity.subject, sorted(set(digests)), heavy=True)
        return pb.FindFilesResponse(files=[pb.FoundFile(sha256=sha, size=size) for sha, size in found])

    def _find_files(self, owner: str, digests: list[str]) -> list[tuple[str, int]]:
        """(sha256, size) of the DIGESTS OWNER may name as inputs (Submit's own rule, claim_inputs), and
        that the file store holds. Claiming is what Submit would do with them: an output of OWNER's
        job asked for here is OWNER's from now on (kept alive when the output is replaced)."""
        store, files = self.broker.store, self.broker.files
        with files.lock:   # as in _check_inputs: nothing frees content between the claim and the size
            usable = store.claim_inputs(owner, digests, utcnow())
            sizes = {sha: files.size_of(sha) for sha in usable}
        return [(sha, size) for sha, size in sorted(sizes.items()) if size is not None]

    @rpc(SERVICE)
    async def ListBatches(self, identity: Identity, request: pb.ListBatchesRequest,
                          context) -> pb.ListBatchesResponse:
        broker = self.broker
        limit = min(request.limit or broker.settings.list_default, broker.settings.list_max)

        def build() -> pb.ListBatchesResponse:
            response = pb.ListBatchesResponse()
            for batch in broker.store.list_batches(identity.subject, limit, request.before_batch_id):
                info = response.batches.add(batch_id=batch.batch_id, owner=batch.owner, label=batch.label,
                                            created_unix_ms=to_ms(batch.created), jobs=batch.jobs)
                for state, count in batch.counts.items():
                    info.counts_by_state[job_pb2.JobState.Name(int(state))] = count
            return response
        return await broker.call(build, heavy=True)

    @rpc_stream(SERVICE)
    async def DownloadOutput(self, identity: Identity, request: pb.DownloadOutputRequest, context):
        broker = self.broker
        record = await broker.call(broker.store.get, request.job_id, with_history=False)
        check_owner(identity, record)
        for output in record.outputs:
            if output.name == request.name:
                break
        else:
            names = ", ".join(repr(o.name) for o in record.outputs) or "none yet"
            raise NotFound(f"job {request.job_id} has no output named {request.name!r} (outputs: {names}); "
                           "fix: use a name listed by GetJob / `splitpilot job status ID`")
        async for chunk in send_file(broker, output.name, output.size, output.sha256, pb.DownloadOutputResponse):
            yield chunk


async def list_jobs(broker: Broker, owner: str | None, request: pb.ListJobsRequest | pb.ListAllJobsRequest,
                    response_type: type = pb.ListJobsResponse):
    """ListJobs for OWNER (None: every owner, for admins: ListAllJobs, answered as RESPONSE_TYPE)."""
    settings = broker.settings
    try:
        states = [JobState(s) for s in request.states]
    except ValueError:
        raise BadRequest(f"states {list(request.states)} holds an unknown state; fix: use JobState values "
                         "(JOB_STATE_WAITING ...)") from None
    limit = min(request.limit or settings.list_default, settings.list_max)
    before = request.before_job_id or None
    site, since = "", None
    batch = request.batch_id
    if batch:   # a user's own batch only; an admin's any batch (ListAllJobs): else the same NOT_FOUND
        batch_owner = await broker.call(broker.store.batch_owner, batch)
        if batch_owner is None or (owner is not None and batch_owner != owner):
            raise UnknownBatch(batch)
    if isinstance(request, pb.ListAllJobsRequest):  # the admin's filters
        if request.owner:
            owner = checked_name("owner", request.owner)
        site = checked_name("site", request.site) if request.site else ""
        if request.updated_since_unix_ms:
            if not 0 < request.updated_since_unix_ms <= LAST_MS:
                raise BadRequest(f"updated_since_unix_ms {request.updated_since_unix_ms} is not a time between 1970 "
                                 "and 9999; fix: send a Unix time in milliseconds, or 0 for any time")
            since = datetime.datetime.fromtimestamp(request.updated_since_unix_ms / 1000, datetime.UTC)

    def build():  # in a thread: thousands of records are converted here
        records = broker.store.list(owner, states, limit, before, site=site, updated_since=since, batch=batch)
        response = response_type(jobs=[job_info(r, history=False) for r in records])
        for state, count in broker.store.counts(owner, batch).items():
            response.counts_by_state[job_pb2.JobState.Name(int(state))] = count
        return response
    return await broker.call(build, heavy=True)


def checked_name(field: str, value: str) -> str:
    """VALUE of the request's FIELD as a subject or site name; INVALID_ARGUMENT naming FIELD otherwise."""
    try:
        return check_name(field, value)
    except IssueError as exc:
        raise BadRequest(f"{field}: {exc.detail}; fix: send a {field} name as tokens carry it, or leave "
                         f"{field} empty for any") from None


def _where(index: int, spec: job_pb2.JobSpec) -> str:
    return f"jobs[{index}]" + (f" ({spec.name!r})" if spec.name else "")


def _index_range(indexes: list[int]) -> str:
    return ", ".join(map(str, indexes)) if len(indexes) <= 5 else f"{indexes[0]}, {indexes[1]}, ... {indexes[-1]}"


def _id_range(ids: list[int]) -> str:
    if len(ids) <= 3:
        return ", ".join(map(str, ids))
    return f"{ids[0]} .. {ids[-1]}"
