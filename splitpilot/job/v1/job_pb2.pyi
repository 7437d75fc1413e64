from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_WAITING: _ClassVar[JobState]
    JOB_STATE_ASSIGNED: _ClassVar[JobState]
    JOB_STATE_STARTED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SAVING: _ClassVar[JobState]
    JOB_STATE_DONE: _ClassVar[JobState]
    JOB_STATE_FAILED_INPUT: _ClassVar[JobState]
    JOB_STATE_FAILED_EXECUTION: _ClassVar[JobState]
    JOB_STATE_FAILED_OUTPUT: _ClassVar[JobState]
    JOB_STATE_FAILED_WRAPPER: _ClassVar[JobState]
    JOB_STATE_KILLED: _ClassVar[JobState]
    JOB_STATE_EXPIRED: _ClassVar[JobState]
    JOB_STATE_LOST: _ClassVar[JobState]
    JOB_STATE_FAILED_LIMIT: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_WAITING: JobState
JOB_STATE_ASSIGNED: JobState
JOB_STATE_STARTED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SAVING: JobState
JOB_STATE_DONE: JobState
JOB_STATE_FAILED_INPUT: JobState
JOB_STATE_FAILED_EXECUTION: JobState
JOB_STATE_FAILED_OUTPUT: JobState
JOB_STATE_FAILED_WRAPPER: JobState
JOB_STATE_KILLED: JobState
JOB_STATE_EXPIRED: JobState
JOB_STATE_LOST: JobState
JOB_STATE_FAILED_LIMIT: JobState

class InputFile(_message.Message):
    __slots__ = ("name", "size", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class Requirements(_message.Message):
    __slots__ = ("cores", "memory_mb", "disk_mb", "walltime_s", "container_image", "platform", "sites_allowed", "sites_denied")
    CORES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    DISK_MB_FIELD_NUMBER: _ClassVar[int]
    WALLTIME_S_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    SITES_ALLOWED_FIELD_NUMBER: _ClassVar[int]
    SITES_DENIED_FIELD_NUMBER: _ClassVar[int]
    cores: int
    memory_mb: int
    disk_mb: int
    walltime_s: int
    container_image: str
    platform: str
    sites_allowed: _containers.RepeatedScalarFieldContainer[str]
    sites_denied: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cores: _Optional[int] = ..., memory_mb: _Optional[int] = ..., disk_mb: _Optional[int] = ..., walltime_s: _Optional[int] = ..., container_image: _Optional[str] = ..., platform: _Optional[str] = ..., sites_allowed: _Optional[_Iterable[str]] = ..., sites_denied: _Optional[_Iterable[str]] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("executable", "arguments", "environment", "input_files", "output_patterns", "requirements", "max_attempts", "owner", "name", "priority")
    class EnvironmentEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EXECUTABLE_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    INPUT_FILES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATTERNS_FIELD_NUMBER: _ClassVar[int]
    REQUIREMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    executable: str
    arguments: _containers.RepeatedScalarFieldContainer[str]
    environment: _containers.ScalarMap[str, str]
    input_files: _containers.RepeatedCompositeFieldContainer[InputFile]
    output_patterns: _containers.RepeatedScalarFieldContainer[str]
    requirements: Requirements
    max_attempts: int
    owner: str
    name: str
    priority: int
    def __init__(self, executable: _Optional[str] = ..., arguments: _Optional[_Iterable[str]] = ..., environment: _Optional[_Mapping[str, str]] = ..., input_files: _Optional[_Iterable[_Union[InputFile, _Mapping]]] = ..., output_patterns: _Optional[_Iterable[str]] = ..., requirements: _Optional[_Union[Requirements, _Mapping]] = ..., max_attempts: _Optional[int] = ..., owner: _Optional[str] = ..., name: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...
