from splitpilot.job.v1 import job_pb2 as _job_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    STOP_REASON_SLOT_END: _ClassVar[StopReason]
    STOP_REASON_PREEMPTED: _ClassVar[StopReason]
    STOP_REASON_KILLED: _ClassVar[StopReason]
    STOP_REASON_LIMIT_EXCEEDED: _ClassVar[StopReason]
    STOP_REASON_AGENT_SHUTDOWN: _ClassVar[StopReason]

class LogStream(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOG_STREAM_UNSPECIFIED: _ClassVar[LogStream]
    LOG_STREAM_STDOUT: _ClassVar[LogStream]
    LOG_STREAM_STDERR: _ClassVar[LogStream]

class FailureClass(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAILURE_CLASS_UNSPECIFIED: _ClassVar[FailureClass]
    FAILURE_CLASS_PAYLOAD: _ClassVar[FailureClass]
    FAILURE_CLASS_INPUT: _ClassVar[FailureClass]
    FAILURE_CLASS_OUTPUT: _ClassVar[FailureClass]
    FAILURE_CLASS_WRAPPER: _ClassVar[FailureClass]
    FAILURE_CLASS_INFRASTRUCTURE: _ClassVar[FailureClass]
    FAILURE_CLASS_KILLED: _ClassVar[FailureClass]
    FAILURE_CLASS_STOPPED: _ClassVar[FailureClass]
    FAILURE_CLASS_NONE: _ClassVar[FailureClass]
    FAILURE_CLASS_LIMIT: _ClassVar[FailureClass]
    FAILURE_CLASS_FENCED: _ClassVar[FailureClass]

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    ERROR_CODE_PROTOCOL: _ClassVar[ErrorCode]
    ERROR_CODE_VERSION: _ClassVar[ErrorCode]
    ERROR_CODE_BAD_JOB: _ClassVar[ErrorCode]
    ERROR_CODE_INTERNAL: _ClassVar[ErrorCode]
STOP_REASON_UNSPECIFIED: StopReason
STOP_REASON_SLOT_END: StopReason
STOP_REASON_PREEMPTED: StopReason
STOP_REASON_KILLED: StopReason
STOP_REASON_LIMIT_EXCEEDED: StopReason
STOP_REASON_AGENT_SHUTDOWN: StopReason
LOG_STREAM_UNSPECIFIED: LogStream
LOG_STREAM_STDOUT: LogStream
LOG_STREAM_STDERR: LogStream
FAILURE_CLASS_UNSPECIFIED: FailureClass
FAILURE_CLASS_PAYLOAD: FailureClass
FAILURE_CLASS_INPUT: FailureClass
FAILURE_CLASS_OUTPUT: FailureClass
FAILURE_CLASS_WRAPPER: FailureClass
FAILURE_CLASS_INFRASTRUCTURE: FailureClass
FAILURE_CLASS_KILLED: FailureClass
FAILURE_CLASS_STOPPED: FailureClass
FAILURE_CLASS_NONE: FailureClass
FAILURE_CLASS_LIMIT: FailureClass
FAILURE_CLASS_FENCED: FailureClass
ERROR_CODE_UNSPECIFIED: ErrorCode
ERROR_CODE_PROTOCOL: ErrorCode
ERROR_CODE_VERSION: ErrorCode
ERROR_CODE_BAD_JOB: ErrorCode
ERROR_CODE_INTERNAL: ErrorCode

class AgentMessage(_message.Message):
    __slots__ = ("hello", "job_start", "stop", "token_refresh", "ping")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    JOB_START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    TOKEN_REFRESH_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    job_start: JobStart
    stop: Stop
    token_refresh: TokenRefresh
    ping: Ping
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., job_start: _Optional[_Union[JobStart, _Mapping]] = ..., stop: _Optional[_Union[Stop, _Mapping]] = ..., token_refresh: _Optional[_Union[TokenRefresh, _Mapping]] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ...) -> None: ...

class WrapperMessage(_message.Message):
    __slots__ = ("ready", "state_change", "heartbeat", "log_chunk", "result", "pong", "error")
    READY_FIELD_NUMBER: _ClassVar[int]
    STATE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    LOG_CHUNK_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    PONG_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ready: Ready
    state_change: StateChange
    heartbeat: Heartbeat
    log_chunk: LogChunk
    result: Result
    pong: Pong
    error: Error
    def __init__(self, ready: _Optional[_Union[Ready, _Mapping]] = ..., state_change: _Optional[_Union[StateChange, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., log_chunk: _Optional[_Union[LogChunk, _Mapping]] = ..., result: _Optional[_Union[Result, _Mapping]] = ..., pong: _Optional[_Union[Pong, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol_major", "protocol_minor", "agent_id", "software_version")
    PROTOCOL_MAJOR_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_MINOR_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    protocol_major: int
    protocol_minor: int
    agent_id: str
    software_version: str
    def __init__(self, protocol_major: _Optional[int] = ..., protocol_minor: _Optional[int] = ..., agent_id: _Optional[str] = ..., software_version: _Optional[str] = ...) -> None: ...

class JobToken(_message.Message):
    __slots__ = ("certificate_pem", "private_key_pem", "not_after_unix")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_UNIX_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: bytes
    private_key_pem: bytes
    not_after_unix: int
    def __init__(self, certificate_pem: _Optional[bytes] = ..., private_key_pem: _Optional[bytes] = ..., not_after_unix: _Optional[int] = ...) -> None: ...

class BrokerEndpoint(_message.Message):
    __slots__ = ("address", "ca_pem")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    address: str
    ca_pem: bytes
    def __init__(self, address: _Optional[str] = ..., ca_pem: _Optional[bytes] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("cores", "memory_mb", "disk_mb", "walltime_s")
    CORES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    DISK_MB_FIELD_NUMBER: _ClassVar[int]
    WALLTIME_S_FIELD_NUMBER: _ClassVar[int]
    cores: int
    memory_mb: int
    disk_mb: int
    walltime_s: int
    def __init__(self, cores: _Optional[int] = ..., memory_mb: _Optional[int] = ..., disk_mb: _Optional[int] = ..., walltime_s: _Optional[int] = ...) -> None: ...

class JobStart(_message.Message):
    __slots__ = ("job_id", "attempt", "spec", "token", "broker", "sandbox_dir", "software_dir", "limits", "deadline_unix", "expose_token_to_payload", "broker_heartbeat_s", "liveness_from_agent")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    BROKER_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_DIR_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_DIR_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    EXPOSE_TOKEN_TO_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    BROKER_HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_FROM_AGENT_FIELD_NUMBER: _ClassVar[int]
    job_id: int
    attempt: int
    spec: _job_pb2.JobSpec
    token: JobToken
    broker: BrokerEndpoint
    sandbox_dir: str
    software_dir: str
    limits: Limits
    deadline_unix: int
    expose_token_to_payload: bool
    broker_heartbeat_s: int
    liveness_from_agent: bool
    def __init__(self, job_id: _Optional[int] = ..., attempt: _Optional[int] = ..., spec: _Optional[_Union[_job_pb2.JobSpec, _Mapping]] = ..., token: _Optional[_Union[JobToken, _Mapping]] = ..., broker: _Optional[_Union[BrokerEndpoint, _Mapping]] = ..., sandbox_dir: _Optional[str] = ..., software_dir: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., deadline_unix: _Optional[int] = ..., expose_token_to_payload: _Optional[bool] = ..., broker_heartbeat_s: _Optional[int] = ..., liveness_from_agent: _Optional[bool] = ...) -> None: ...

class Stop(_message.Message):
    __slots__ = ("reason", "detail", "deadline_s")
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    reason: StopReason
    detail: str
    deadline_s: int
    def __init__(self, reason: _Optional[_Union[StopReason, str]] = ..., detail: _Optional[str] = ..., deadline_s: _Optional[int] = ...) -> None: ...

class TokenRefresh(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: JobToken
    def __init__(self, token: _Optional[_Union[JobToken, _Mapping]] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    def __init__(self, nonce: _Optional[int] = ...) -> None: ...

class Ready(_message.Message):
    __slots__ = ("protocol_major", "protocol_minor", "pid", "capabilities", "software_version")
    PROTOCOL_MAJOR_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_MINOR_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    protocol_major: int
    protocol_minor: int
    pid: int
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    software_version: str
    def __init__(self, protocol_major: _Optional[int] = ..., protocol_minor: _Optional[int] = ..., pid: _Optional[int] = ..., capabilities: _Optional[_Iterable[str]] = ..., software_version: _Optional[str] = ...) -> None: ...

class StateChange(_message.Message):
    __slots__ = ("state", "detail", "time_unix_ms")
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    state: _job_pb2.JobState
    detail: str
    time_unix_ms: int
    def __init__(self, state: _Optional[_Union[_job_pb2.JobState, str]] = ..., detail: _Optional[str] = ..., time_unix_ms: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("payload_pid", "cpu_seconds", "rss_bytes", "sandbox_bytes", "wall_seconds", "processes", "time_unix_ms")
    PAYLOAD_PID_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_BYTES_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    payload_pid: int
    cpu_seconds: float
    rss_bytes: int
    sandbox_bytes: int
    wall_seconds: float
    processes: int
    time_unix_ms: int
    def __init__(self, payload_pid: _Optional[int] = ..., cpu_seconds: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., sandbox_bytes: _Optional[int] = ..., wall_seconds: _Optional[float] = ..., processes: _Optional[int] = ..., time_unix_ms: _Optional[int] = ...) -> None: ...

class LogChunk(_message.Message):
    __slots__ = ("stream", "offset", "data", "skipped_before")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    stream: LogStream
    offset: int
    data: bytes
    skipped_before: bool
    def __init__(self, stream: _Optional[_Union[LogStream, str]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., skipped_before: _Optional[bool] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("final_state", "exit_code", "signal", "failure_class", "message", "cpu_seconds", "wall_seconds", "max_rss_bytes", "outputs")
    FINAL_STATE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    FAILURE_CLASS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    final_state: _job_pb2.JobState
    exit_code: int
    signal: int
    failure_class: FailureClass
    message: str
    cpu_seconds: float
    wall_seconds: float
    max_rss_bytes: int
    outputs: _containers.RepeatedCompositeFieldContainer[_job_pb2.InputFile]
    def __init__(self, final_state: _Optional[_Union[_job_pb2.JobState, str]] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., failure_class: _Optional[_Union[FailureClass, str]] = ..., message: _Optional[str] = ..., cpu_seconds: _Optional[float] = ..., wall_seconds: _Optional[float] = ..., max_rss_bytes: _Optional[int] = ..., outputs: _Optional[_Iterable[_Union[_job_pb2.InputFile, _Mapping]]] = ...) -> None: ...

class Pong(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    def __init__(self, nonce: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    message: str
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ...) -> None: ...
