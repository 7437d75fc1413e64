from splitpilot.job.v1 import job_pb2 as _job_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AttemptFailure(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATTEMPT_FAILURE_UNSPECIFIED: _ClassVar[AttemptFailure]
    ATTEMPT_FAILURE_WRAPPER: _ClassVar[AttemptFailure]
    ATTEMPT_FAILURE_INFRASTRUCTURE: _ClassVar[AttemptFailure]
    ATTEMPT_FAILURE_STOPPED: _ClassVar[AttemptFailure]
    ATTEMPT_FAILURE_LIMIT: _ClassVar[AttemptFailure]
    ATTEMPT_FAILURE_AGENT: _ClassVar[AttemptFailure]

class SiteState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SITE_STATE_UNSPECIFIED: _ClassVar[SiteState]
    SITE_STATE_ENABLED: _ClassVar[SiteState]
    SITE_STATE_DRAINING: _ClassVar[SiteState]
    SITE_STATE_DISABLED: _ClassVar[SiteState]
ATTEMPT_FAILURE_UNSPECIFIED: AttemptFailure
ATTEMPT_FAILURE_WRAPPER: AttemptFailure
ATTEMPT_FAILURE_INFRASTRUCTURE: AttemptFailure
ATTEMPT_FAILURE_STOPPED: AttemptFailure
ATTEMPT_FAILURE_LIMIT: AttemptFailure
ATTEMPT_FAILURE_AGENT: AttemptFailure
SITE_STATE_UNSPECIFIED: SiteState
SITE_STATE_ENABLED: SiteState
SITE_STATE_DRAINING: SiteState
SITE_STATE_DISABLED: SiteState

class FileHeader(_message.Message):
    __slots__ = ("name", "size", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class UploadFileRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: FileHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[FileHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class DownloadOutputResponse(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: FileHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[FileHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetInputResponse(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: FileHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[FileHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutOutputRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: FileHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[FileHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadFileResponse(_message.Message):
    __slots__ = ("sha256", "size", "already_present")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size: int
    already_present: bool
    def __init__(self, sha256: _Optional[str] = ..., size: _Optional[int] = ..., already_present: _Optional[bool] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("jobs", "batch_id", "batch_label")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_LABEL_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[_job_pb2.JobSpec]
    batch_id: str
    batch_label: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[_job_pb2.JobSpec, _Mapping]]] = ..., batch_id: _Optional[str] = ..., batch_label: _Optional[str] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("job_ids", "warnings", "batch_id")
    JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    job_ids: _containers.RepeatedScalarFieldContainer[int]
    warnings: _containers.RepeatedCompositeFieldContainer[SubmitWarning]
    batch_id: str
    def __init__(self, job_ids: _Optional[_Iterable[int]] = ..., warnings: _Optional[_Iterable[_Union[SubmitWarning, _Mapping]]] = ..., batch_id: _Optional[str] = ...) -> None: ...

class SubmitWarning(_message.Message):
    __slots__ = ("job_indexes", "message", "unmet")
    JOB_INDEXES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    UNMET_FIELD_NUMBER: _ClassVar[int]
    job_indexes: _containers.RepeatedScalarFieldContainer[int]
    message: str
    unmet: _containers.RepeatedCompositeFieldContainer[UnmetRequirement]
    def __init__(self, job_indexes: _Optional[_Iterable[int]] = ..., message: _Optional[str] = ..., unmet: _Optional[_Iterable[_Union[UnmetRequirement, _Mapping]]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: int
    def __init__(self, job_id: _Optional[int] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: JobInfo
    def __init__(self, job: _Optional[_Union[JobInfo, _Mapping]] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("time_unix_ms", "state", "attempt", "detail")
    TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    time_unix_ms: int
    state: _job_pb2.JobState
    attempt: int
    detail: str
    def __init__(self, time_unix_ms: _Optional[int] = ..., state: _Optional[_Union[_job_pb2.JobState, str]] = ..., attempt: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class OutputFile(_message.Message):
    __slots__ = ("name", "size", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("job_id", "spec", "state", "attempt", "submitted_unix_ms", "updated_unix_ms", "site", "node", "pilot_id", "exit_code", "message", "history", "outputs", "wait", "cpu_seconds", "rss_bytes", "usage_unix_ms", "batch_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    PILOT_ID_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    USAGE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: int
    spec: _job_pb2.JobSpec
    state: _job_pb2.JobState
    attempt: int
    submitted_unix_ms: int
    updated_unix_ms: int
    site: str
    node: str
    pilot_id: str
    exit_code: int
    message: str
    history: _containers.RepeatedCompositeFieldContainer[JobEvent]
    outputs: _containers.RepeatedCompositeFieldContainer[OutputFile]
    wait: WaitAnalysis
    cpu_seconds: float
    rss_bytes: int
    usage_unix_ms: int
    batch_id: str
    def __init__(self, job_id: _Optional[int] = ..., spec: _Optional[_Union[_job_pb2.JobSpec, _Mapping]] = ..., state: _Optional[_Union[_job_pb2.JobState, str]] = ..., attempt: _Optional[int] = ..., submitted_unix_ms: _Optional[int] = ..., updated_unix_ms: _Optional[int] = ..., site: _Optional[str] = ..., node: _Optional[str] = ..., pilot_id: _Optional[str] = ..., exit_code: _Optional[int] = ..., message: _Optional[str] = ..., history: _Optional[_Iterable[_Union[JobEvent, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[OutputFile, _Mapping]]] = ..., wait: _Optional[_Union[WaitAnalysis, _Mapping]] = ..., cpu_seconds: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., usage_unix_ms: _Optional[int] = ..., batch_id: _Optional[str] = ...) -> None: ...

class WaitAnalysis(_message.Message):
    __slots__ = ("window_s", "sites", "summary", "never_runnable", "jobs_ahead")
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    NEVER_RUNNABLE_FIELD_NUMBER: _ClassVar[int]
    JOBS_AHEAD_FIELD_NUMBER: _ClassVar[int]
    window_s: int
    sites: _containers.RepeatedCompositeFieldContainer[SiteAnalysis]
    summary: str
    never_runnable: bool
    jobs_ahead: int
    def __init__(self, window_s: _Optional[int] = ..., sites: _Optional[_Iterable[_Union[SiteAnalysis, _Mapping]]] = ..., summary: _Optional[str] = ..., never_runnable: _Optional[bool] = ..., jobs_ahead: _Optional[int] = ...) -> None: ...

class SiteAnalysis(_message.Message):
    __slots__ = ("site", "state", "unmet", "last_offer_unix_ms")
    SITE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    UNMET_FIELD_NUMBER: _ClassVar[int]
    LAST_OFFER_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    site: str
    state: str
    unmet: _containers.RepeatedCompositeFieldContainer[UnmetRequirement]
    last_offer_unix_ms: int
    def __init__(self, site: _Optional[str] = ..., state: _Optional[str] = ..., unmet: _Optional[_Iterable[_Union[UnmetRequirement, _Mapping]]] = ..., last_offer_unix_ms: _Optional[int] = ...) -> None: ...

class UnmetRequirement(_message.Message):
    __slots__ = ("requirement", "wanted", "offered")
    REQUIREMENT_FIELD_NUMBER: _ClassVar[int]
    WANTED_FIELD_NUMBER: _ClassVar[int]
    OFFERED_FIELD_NUMBER: _ClassVar[int]
    requirement: str
    wanted: str
    offered: str
    def __init__(self, requirement: _Optional[str] = ..., wanted: _Optional[str] = ..., offered: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("states", "limit", "before_job_id", "batch_id")
    STATES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    BEFORE_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[_job_pb2.JobState]
    limit: int
    before_job_id: int
    batch_id: str
    def __init__(self, states: _Optional[_Iterable[_Union[_job_pb2.JobState, str]]] = ..., limit: _Optional[int] = ..., before_job_id: _Optional[int] = ..., batch_id: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "counts_by_state")
    class CountsByStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    JOBS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    counts_by_state: _containers.ScalarMap[str, int]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ..., counts_by_state: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ListAllJobsRequest(_message.Message):
    __slots__ = ("states", "limit", "before_job_id", "owner", "site", "updated_since_unix_ms", "batch_id")
    STATES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    BEFORE_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    UPDATED_SINCE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[_job_pb2.JobState]
    limit: int
    before_job_id: int
    owner: str
    site: str
    updated_since_unix_ms: int
    batch_id: str
    def __init__(self, states: _Optional[_Iterable[_Union[_job_pb2.JobState, str]]] = ..., limit: _Optional[int] = ..., before_job_id: _Optional[int] = ..., owner: _Optional[str] = ..., site: _Optional[str] = ..., updated_since_unix_ms: _Optional[int] = ..., batch_id: _Optional[str] = ...) -> None: ...

class ListAllJobsResponse(_message.Message):
    __slots__ = ("jobs", "counts_by_state")
    class CountsByStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    JOBS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    counts_by_state: _containers.ScalarMap[str, int]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ..., counts_by_state: _Optional[_Mapping[str, int]] = ...) -> None: ...

class KillJobRequest(_message.Message):
    __slots__ = ("job_id", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: int
    reason: str
    def __init__(self, job_id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class KillJobResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: _job_pb2.JobState
    def __init__(self, state: _Optional[_Union[_job_pb2.JobState, str]] = ...) -> None: ...

class DownloadOutputRequest(_message.Message):
    __slots__ = ("job_id", "name")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    job_id: int
    name: str
    def __init__(self, job_id: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class Slot(_message.Message):
    __slots__ = ("cores", "memory_mb", "disk_mb", "time_left_s", "platforms", "containers", "isolation")
    CORES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    DISK_MB_FIELD_NUMBER: _ClassVar[int]
    TIME_LEFT_S_FIELD_NUMBER: _ClassVar[int]
    PLATFORMS_FIELD_NUMBER: _ClassVar[int]
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    cores: int
    memory_mb: int
    disk_mb: int
    time_left_s: int
    platforms: _containers.RepeatedScalarFieldContainer[str]
    containers: bool
    isolation: str
    def __init__(self, cores: _Optional[int] = ..., memory_mb: _Optional[int] = ..., disk_mb: _Optional[int] = ..., time_left_s: _Optional[int] = ..., platforms: _Optional[_Iterable[str]] = ..., containers: _Optional[bool] = ..., isolation: _Optional[str] = ...) -> None: ...

class MatchRequest(_message.Message):
    __slots__ = ("slot", "pilot_id", "node", "job_public_key")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    PILOT_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    JOB_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    slot: Slot
    pilot_id: str
    node: str
    job_public_key: bytes
    def __init__(self, slot: _Optional[_Union[Slot, _Mapping]] = ..., pilot_id: _Optional[str] = ..., node: _Optional[str] = ..., job_public_key: _Optional[bytes] = ...) -> None: ...

class MatchedJob(_message.Message):
    __slots__ = ("job_id", "attempt", "spec", "job_token_pem", "token_not_after_unix", "broker_heartbeat_s", "liveness_from_pilot")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    JOB_TOKEN_PEM_FIELD_NUMBER: _ClassVar[int]
    TOKEN_NOT_AFTER_UNIX_FIELD_NUMBER: _ClassVar[int]
    BROKER_HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_FROM_PILOT_FIELD_NUMBER: _ClassVar[int]
    job_id: int
    attempt: int
    spec: _job_pb2.JobSpec
    job_token_pem: bytes
    token_not_after_unix: int
    broker_heartbeat_s: int
    liveness_from_pilot: bool
    def __init__(self, job_id: _Optional[int] = ..., attempt: _Optional[int] = ..., spec: _Optional[_Union[_job_pb2.JobSpec, _Mapping]] = ..., job_token_pem: _Optional[bytes] = ..., token_not_after_unix: _Optional[int] = ..., broker_heartbeat_s: _Optional[int] = ..., liveness_from_pilot: _Optional[bool] = ...) -> None: ...

class MatchResponse(_message.Message):
    __slots__ = ("job", "no_match")
    JOB_FIELD_NUMBER: _ClassVar[int]
    NO_MATCH_FIELD_NUMBER: _ClassVar[int]
    job: MatchedJob
    no_match: NoMatch
    def __init__(self, job: _Optional[_Union[MatchedJob, _Mapping]] = ..., no_match: _Optional[_Union[NoMatch, _Mapping]] = ...) -> None: ...

class NoMatch(_message.Message):
    __slots__ = ("reason", "retry_after_s", "leave")
    REASON_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    LEAVE_FIELD_NUMBER: _ClassVar[int]
    reason: str
    retry_after_s: int
    leave: bool
    def __init__(self, reason: _Optional[str] = ..., retry_after_s: _Optional[int] = ..., leave: _Optional[bool] = ...) -> None: ...

class PilotHeartbeatRequest(_message.Message):
    __slots__ = ("pilot_id", "node", "running", "cores_in_use")
    PILOT_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    CORES_IN_USE_FIELD_NUMBER: _ClassVar[int]
    pilot_id: str
    node: str
    running: _containers.RepeatedCompositeFieldContainer[RunningAttempt]
    cores_in_use: int
    def __init__(self, pilot_id: _Optional[str] = ..., node: _Optional[str] = ..., running: _Optional[_Iterable[_Union[RunningAttempt, _Mapping]]] = ..., cores_in_use: _Optional[int] = ...) -> None: ...

class RunningAttempt(_message.Message):
    __slots__ = ("job_id", "attempt", "usage")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    job_id: int
    attempt: int
    usage: AttemptUsage
    def __init__(self, job_id: _Optional[int] = ..., attempt: _Optional[int] = ..., usage: _Optional[_Union[AttemptUsage, _Mapping]] = ...) -> None: ...

class AttemptUsage(_message.Message):
    __slots__ = ("cpu_seconds", "rss_bytes", "sandbox_bytes")
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_BYTES_FIELD_NUMBER: _ClassVar[int]
    cpu_seconds: float
    rss_bytes: int
    sandbox_bytes: int
    def __init__(self, cpu_seconds: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., sandbox_bytes: _Optional[int] = ...) -> None: ...

class PilotHeartbeatResponse(_message.Message):
    __slots__ = ("stop", "leave")
    STOP_FIELD_NUMBER: _ClassVar[int]
    LEAVE_FIELD_NUMBER: _ClassVar[int]
    stop: _containers.RepeatedCompositeFieldContainer[RunningAttempt]
    leave: bool
    def __init__(self, stop: _Optional[_Iterable[_Union[RunningAttempt, _Mapping]]] = ..., leave: _Optional[bool] = ...) -> None: ...

class ReportPilotEndRequest(_message.Message):
    __slots__ = ("pilot_id", "node", "jobs_run", "reason", "abandoned")
    PILOT_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    JOBS_RUN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ABANDONED_FIELD_NUMBER: _ClassVar[int]
    pilot_id: str
    node: str
    jobs_run: int
    reason: str
    abandoned: bool
    def __init__(self, pilot_id: _Optional[str] = ..., node: _Optional[str] = ..., jobs_run: _Optional[int] = ..., reason: _Optional[str] = ..., abandoned: _Optional[bool] = ...) -> None: ...

class ReportPilotEndResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReportAttemptFailureRequest(_message.Message):
    __slots__ = ("job_id", "attempt", "failure", "detail", "pilot_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    PILOT_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: int
    attempt: int
    failure: AttemptFailure
    detail: str
    pilot_id: str
    def __init__(self, job_id: _Optional[int] = ..., attempt: _Optional[int] = ..., failure: _Optional[_Union[AttemptFailure, str]] = ..., detail: _Optional[str] = ..., pilot_id: _Optional[str] = ...) -> None: ...

class ReportAttemptFailureResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: _job_pb2.JobState
    def __init__(self, state: _Optional[_Union[_job_pb2.JobState, str]] = ...) -> None: ...

class UpdateStateRequest(_message.Message):
    __slots__ = ("state", "detail", "sequence", "exit_code")
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    state: _job_pb2.JobState
    detail: str
    sequence: int
    exit_code: int
    def __init__(self, state: _Optional[_Union[_job_pb2.JobState, str]] = ..., detail: _Optional[str] = ..., sequence: _Optional[int] = ..., exit_code: _Optional[int] = ...) -> None: ...

class UpdateStateResponse(_message.Message):
    __slots__ = ("state", "replay")
    STATE_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FIELD_NUMBER: _ClassVar[int]
    state: _job_pb2.JobState
    replay: bool
    def __init__(self, state: _Optional[_Union[_job_pb2.JobState, str]] = ..., replay: _Optional[bool] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("cpu_seconds", "rss_bytes", "sandbox_bytes")
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_BYTES_FIELD_NUMBER: _ClassVar[int]
    cpu_seconds: float
    rss_bytes: int
    sandbox_bytes: int
    def __init__(self, cpu_seconds: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., sandbox_bytes: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("kill",)
    KILL_FIELD_NUMBER: _ClassVar[int]
    kill: bool
    def __init__(self, kill: _Optional[bool] = ...) -> None: ...

class GetInputRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class PutOutputResponse(_message.Message):
    __slots__ = ("sha256", "size")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size: int
    def __init__(self, sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class RefreshTokenRequest(_message.Message):
    __slots__ = ("public_key", "time_left_s")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    TIME_LEFT_S_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    time_left_s: int
    def __init__(self, public_key: _Optional[bytes] = ..., time_left_s: _Optional[int] = ...) -> None: ...

class RefreshTokenResponse(_message.Message):
    __slots__ = ("job_token_pem", "token_not_after_unix")
    JOB_TOKEN_PEM_FIELD_NUMBER: _ClassVar[int]
    TOKEN_NOT_AFTER_UNIX_FIELD_NUMBER: _ClassVar[int]
    job_token_pem: bytes
    token_not_after_unix: int
    def __init__(self, job_token_pem: _Optional[bytes] = ..., token_not_after_unix: _Optional[int] = ...) -> None: ...

class SetSiteStateRequest(_message.Message):
    __slots__ = ("site", "state", "reason")
    SITE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    site: str
    state: SiteState
    reason: str
    def __init__(self, site: _Optional[str] = ..., state: _Optional[_Union[SiteState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class SetSiteStateResponse(_message.Message):
    __slots__ = ("previous",)
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    previous: SiteState
    def __init__(self, previous: _Optional[_Union[SiteState, str]] = ...) -> None: ...

class ListPilotsRequest(_message.Message):
    __slots__ = ("seen_within_s", "site", "state", "limit")
    SEEN_WITHIN_S_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    seen_within_s: int
    site: str
    state: str
    limit: int
    def __init__(self, seen_within_s: _Optional[int] = ..., site: _Optional[str] = ..., state: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class PilotInfo(_message.Message):
    __slots__ = ("pilot_id", "site", "node", "first_seen_unix_ms", "last_seen_unix_ms", "jobs_matched", "end_reason", "certificate_serial", "alive", "jobs_run", "current_job_ids", "ended_unix_ms")
    PILOT_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    JOBS_MATCHED_FIELD_NUMBER: _ClassVar[int]
    END_REASON_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_SERIAL_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    JOBS_RUN_FIELD_NUMBER: _ClassVar[int]
    CURRENT_JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    ENDED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    pilot_id: str
    site: str
    node: str
    first_seen_unix_ms: int
    last_seen_unix_ms: int
    jobs_matched: int
    end_reason: str
    certificate_serial: str
    alive: bool
    jobs_run: int
    current_job_ids: _containers.RepeatedScalarFieldContainer[int]
    ended_unix_ms: int
    def __init__(self, pilot_id: _Optional[str] = ..., site: _Optional[str] = ..., node: _Optional[str] = ..., first_seen_unix_ms: _Optional[int] = ..., last_seen_unix_ms: _Optional[int] = ..., jobs_matched: _Optional[int] = ..., end_reason: _Optional[str] = ..., certificate_serial: _Optional[str] = ..., alive: _Optional[bool] = ..., jobs_run: _Optional[int] = ..., current_job_ids: _Optional[_Iterable[int]] = ..., ended_unix_ms: _Optional[int] = ...) -> None: ...

class ListPilotsResponse(_message.Message):
    __slots__ = ("pilots",)
    PILOTS_FIELD_NUMBER: _ClassVar[int]
    pilots: _containers.RepeatedCompositeFieldContainer[PilotInfo]
    def __init__(self, pilots: _Optional[_Iterable[_Union[PilotInfo, _Mapping]]] = ...) -> None: ...

class RequeueRequest(_message.Message):
    __slots__ = ("job_id", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: int
    reason: str
    def __init__(self, job_id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class RequeueResponse(_message.Message):
    __slots__ = ("attempt",)
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    def __init__(self, attempt: _Optional[int] = ...) -> None: ...

class TokenHolder(_message.Message):
    __slots__ = ("subject", "role")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    subject: str
    role: str
    def __init__(self, subject: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("serial", "holder", "certificate_pem", "reason")
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    serial: str
    holder: TokenHolder
    certificate_pem: bytes
    reason: str
    def __init__(self, serial: _Optional[str] = ..., holder: _Optional[_Union[TokenHolder, _Mapping]] = ..., certificate_pem: _Optional[bytes] = ..., reason: _Optional[str] = ...) -> None: ...

class RevokedToken(_message.Message):
    __slots__ = ("id", "serial", "subject", "role", "reason", "revoked_unix_ms", "revoked_by", "not_after_unix_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REVOKED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_BY_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    id: int
    serial: str
    subject: str
    role: str
    reason: str
    revoked_unix_ms: int
    revoked_by: str
    not_after_unix_ms: int
    def __init__(self, id: _Optional[int] = ..., serial: _Optional[str] = ..., subject: _Optional[str] = ..., role: _Optional[str] = ..., reason: _Optional[str] = ..., revoked_unix_ms: _Optional[int] = ..., revoked_by: _Optional[str] = ..., not_after_unix_ms: _Optional[int] = ...) -> None: ...

class RevokeTokenResponse(_message.Message):
    __slots__ = ("revoked", "already_revoked")
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    ALREADY_REVOKED_FIELD_NUMBER: _ClassVar[int]
    revoked: RevokedToken
    already_revoked: bool
    def __init__(self, revoked: _Optional[_Union[RevokedToken, _Mapping]] = ..., already_revoked: _Optional[bool] = ...) -> None: ...

class ListSitesRequest(_message.Message):
    __slots__ = ("failures_within_s",)
    FAILURES_WITHIN_S_FIELD_NUMBER: _ClassVar[int]
    failures_within_s: int
    def __init__(self, failures_within_s: _Optional[int] = ...) -> None: ...

class SiteInfo(_message.Message):
    __slots__ = ("site", "state", "reason", "state_updated_unix_ms", "pilots_alive", "jobs_running", "jobs_waiting", "failures_by_class", "empty_pilots")
    class FailuresByClassEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SITE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STATE_UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PILOTS_ALIVE_FIELD_NUMBER: _ClassVar[int]
    JOBS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    JOBS_WAITING_FIELD_NUMBER: _ClassVar[int]
    FAILURES_BY_CLASS_FIELD_NUMBER: _ClassVar[int]
    EMPTY_PILOTS_FIELD_NUMBER: _ClassVar[int]
    site: str
    state: SiteState
    reason: str
    state_updated_unix_ms: int
    pilots_alive: int
    jobs_running: int
    jobs_waiting: int
    failures_by_class: _containers.ScalarMap[str, int]
    empty_pilots: int
    def __init__(self, site: _Optional[str] = ..., state: _Optional[_Union[SiteState, str]] = ..., reason: _Optional[str] = ..., state_updated_unix_ms: _Optional[int] = ..., pilots_alive: _Optional[int] = ..., jobs_running: _Optional[int] = ..., jobs_waiting: _Optional[int] = ..., failures_by_class: _Optional[_Mapping[str, int]] = ..., empty_pilots: _Optional[int] = ...) -> None: ...

class ListSitesResponse(_message.Message):
    __slots__ = ("sites", "failures_within_s")
    SITES_FIELD_NUMBER: _ClassVar[int]
    FAILURES_WITHIN_S_FIELD_NUMBER: _ClassVar[int]
    sites: _containers.RepeatedCompositeFieldContainer[SiteInfo]
    failures_within_s: int
    def __init__(self, sites: _Optional[_Iterable[_Union[SiteInfo, _Mapping]]] = ..., failures_within_s: _Optional[int] = ...) -> None: ...

class ListRevokedRequest(_message.Message):
    __slots__ = ("limit", "after_id")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    limit: int
    after_id: int
    def __init__(self, limit: _Optional[int] = ..., after_id: _Optional[int] = ...) -> None: ...

class ListRevokedResponse(_message.Message):
    __slots__ = ("revoked", "more")
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    revoked: _containers.RepeatedCompositeFieldContainer[RevokedToken]
    more: bool
    def __init__(self, revoked: _Optional[_Iterable[_Union[RevokedToken, _Mapping]]] = ..., more: _Optional[bool] = ...) -> None: ...

class FindFilesRequest(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sha256: _Optional[_Iterable[str]] = ...) -> None: ...

class FindFilesResponse(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[FoundFile]
    def __init__(self, files: _Optional[_Iterable[_Union[FoundFile, _Mapping]]] = ...) -> None: ...

class FoundFile(_message.Message):
    __slots__ = ("sha256", "size")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size: int
    def __init__(self, sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class ListBatchesRequest(_message.Message):
    __slots__ = ("limit", "before_batch_id")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    BEFORE_BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    limit: int
    before_batch_id: str
    def __init__(self, limit: _Optional[int] = ..., before_batch_id: _Optional[str] = ...) -> None: ...

class BatchInfo(_message.Message):
    __slots__ = ("batch_id", "owner", "created_unix_ms", "jobs", "counts_by_state", "label")
    class CountsByStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    owner: str
    created_unix_ms: int
    jobs: int
    counts_by_state: _containers.ScalarMap[str, int]
    label: str
    def __init__(self, batch_id: _Optional[str] = ..., owner: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., jobs: _Optional[int] = ..., counts_by_state: _Optional[_Mapping[str, int]] = ..., label: _Optional[str] = ...) -> None: ...

class ListBatchesResponse(_message.Message):
    __slots__ = ("batches",)
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    batches: _containers.RepeatedCompositeFieldContainer[BatchInfo]
    def __init__(self, batches: _Optional[_Iterable[_Union[BatchInfo, _Mapping]]] = ...) -> None: ...
