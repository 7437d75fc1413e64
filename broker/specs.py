"""What a job description may hold: the broker's checks of a JobSpec at submit.

A job's owner chooses every byte of its spec. Whatever a node cannot run
(a NUL in an argument, an environment name with '=', an argument longer than
the kernel takes, a spec whose JobStart exceeds the pipe's frame cap, no
walltime) must be refused here, with INVALID_ARGUMENT naming the field and
the fix: accepted, it would fail on a worker node as a wrapper or
infrastructure failure, be retried, and be counted against the node.

The limits follow the machines the job runs on:
  - an argument, and an environment entry NAME=value, at most 128 KiB - 1
    bytes (Linux's MAX_ARG_STRLEN, with the terminating NUL);
  - all arguments and environment entries together at most 1 MiB, counting
    each string's NUL and pointer (Linux's ARG_MAX is a quarter of the stack
    limit, 2 MiB by default; the rest is the node's own environment);
  - the JobStart the agent builds from the spec (with the largest job token
    this broker issues and the longest paths) within the pipe's frame cap
    (pilot.pipe.framing.DEFAULT_MAX_FRAME_BYTES);
  - numbers within what the store and the pipe hold (broker.proto / job.proto
    give the ranges).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pilot.pipe.framing import DEFAULT_MAX_FRAME_BYTES
from splitpilot.job.v1 import job_pb2
from splitpilot.pipe.v1 import pipe_pb2

MAX_ATTEMPTS = 100
MAX_CORES = 4096
MAX_MB = 2**40
MAX_WALLTIME_S = 366 * 86400
#: One argument, or one NAME=value environment entry, in bytes (MAX_ARG_STRLEN - 1).
MAX_ARG_BYTES = 128 * 1024 - 1
#: Arguments and environment together: bytes + NUL + pointer per string.
MAX_EXEC_BYTES = 1 << 20
MAX_EXECUTABLE_BYTES = 4095    # PATH_MAX - 1
MAX_NAME_CHARS = 1024
MAX_IMAGE_BYTES = 4096
MAX_PLATFORM_CHARS = 256
MAX_SITES = 1000
MAX_INPUTS = 10_000
MAX_PATTERNS = 1000
MAX_PATTERN = 1024
#: Paths the agent adds to a JobStart (sandbox and software folder), at most PATH_MAX each.
_PATH_BYTES = 4096
#: The broker address a JobStart names (a DNS name of 253 characters and a port).
_ADDRESS_BYTES = 300
_KEY_PEM_BYTES = 512           # a PKCS#8 P-256 key is 241 bytes in PEM
_SITE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")  # pilot.tokens.identity.check_name's


class SpecProblem(ValueError):
    """What is wrong with one field of a spec: FIELD (dotted, e.g. requirements.walltime_s) and DETAIL
    (the rest of a sentence that starts with the field: the problem and its fix)."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field} {detail}")
        self.field = field
        self.detail = detail


def _utf8(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _no_nul(field: str, value: str, fix: str) -> None:
    if "\x00" in value:
        raise SpecProblem(field, f"contains a NUL character (at {value.index(chr(0))}), which no program can "
                                 f"receive; fix: {fix}")


def _printable(field: str, value: str, limit: int, example: str) -> None:
    if len(value) > limit or not value.isprintable():
        raise SpecProblem(field, f"{_show(value)} must be at most {limit} printable characters; fix: write it "
                                 f"like {example!r}")


def _show(value: str, limit: int = 60) -> str:
    """VALUE quoted for a message: escaped, and cut."""
    text = repr(value[:limit])
    return text + (f" (and {len(value) - limit} more characters)" if len(value) > limit else "")


def _number(field: str, value: int, low: int, high: int, fix: str) -> None:
    if not low <= value <= high:
        raise SpecProblem(field, f"{value} is out of range ({low} to {high}); fix: {fix}")


@dataclass(frozen=True)
class JobStartBudget:
    """The bytes a JobStart frame has for the spec, once the agent's other fields (largest token,
    longest paths, the CA bundle) are counted."""

    frame_cap: int
    overhead: int

    @classmethod
    def for_broker(cls, token_chain_bytes: int, ca_bytes: int,
                   frame_cap: int = DEFAULT_MAX_FRAME_BYTES) -> JobStartBudget:
        """TOKEN_CHAIN_BYTES: the largest job token chain (PEM, leaf and CA) this broker issues;
        CA_BYTES: the CA bundle the agent passes on."""
        worst = pipe_pb2.AgentMessage(job_start=pipe_pb2.JobStart(
            job_id=2**64 - 1, attempt=2**32 - 1,
            token=pipe_pb2.JobToken(certificate_pem=b"x" * token_chain_bytes, private_key_pem=b"x" * _KEY_PEM_BYTES,
                                    not_after_unix=-(2**63)),
            broker=pipe_pb2.BrokerEndpoint(address="x" * _ADDRESS_BYTES, ca_pem=b"x" * ca_bytes),
            sandbox_dir="x" * _PATH_BYTES, software_dir="x" * _PATH_BYTES,
            limits=pipe_pb2.Limits(cores=2**32 - 1, memory_mb=2**64 - 1, disk_mb=2**64 - 1, walltime_s=2**64 - 1),
            deadline_unix=-(2**63), expose_token_to_payload=True, broker_heartbeat_s=2**32 - 1))
        # The spec's own tag and length, and the longer length prefixes around it: at most 3 x 10 bytes.
        return cls(frame_cap, worst.ByteSize() + 32)

    def check(self, spec: job_pb2.JobSpec) -> None:
        size = spec.ByteSize()
        if size + self.overhead <= self.frame_cap:
            return
        parts = {"arguments": sum(_utf8(a) + 3 for a in spec.arguments),
                 "environment": sum(_utf8(k) + _utf8(v) + 8 for k, v in spec.environment.items()),
                 "input_files": sum(i.ByteSize() + 3 for i in spec.input_files),
                 "output_patterns": sum(_utf8(p) + 3 for p in spec.output_patterns),
                 "requirements": spec.requirements.ByteSize()}
        largest = max(parts, key=parts.__getitem__)
        raise SpecProblem(largest, (
            f"take {parts[largest]:,} of the job description's {size:,} bytes; with the job token and "
            f"paths the agent adds, its JobStart would exceed the pipe's frame cap of {self.frame_cap:,} bytes "
            f"(at most {self.frame_cap - self.overhead:,} for the description); fix: move bulk data into input "
            "files (arguments and environment are for small values), or split the job"))


def check_spec(spec: job_pb2.JobSpec, budget: JobStartBudget) -> None:
    """SpecProblem for the first field SPEC may not hold; nothing when a node can run it."""
    executable = spec.executable
    if not executable.strip():
        raise SpecProblem("executable", "is empty; fix: name the program to run")
    _no_nul("executable", executable, "name the program without control characters")
    if _utf8(executable) > MAX_EXECUTABLE_BYTES:
        raise SpecProblem("executable", f"is {_utf8(executable):,} bytes, more than a path may hold "
                                        f"({MAX_EXECUTABLE_BYTES}); fix: name the program by a shorter path")
    exec_bytes = _utf8(executable) + 9
    for i, argument in enumerate(spec.arguments):
        field = f"arguments[{i}]"
        _no_nul(field, argument, "pass binary data in an input file")
        size = _utf8(argument)
        if size > MAX_ARG_BYTES:
            raise SpecProblem(field, f"is {size:,} bytes; Linux passes at most {MAX_ARG_BYTES:,} per argument; "
                                     "fix: pass large data in an input file and its name as the argument")
        exec_bytes += size + 9
    for name, value in spec.environment.items():
        field = f"environment[{_show(name, 40)}]"
        if not name:
            raise SpecProblem("environment", "holds an empty variable name; fix: name every variable, e.g. MODE")
        if "=" in name or "\x00" in name:
            raise SpecProblem(field, "has '=' or NUL in its name, which would change which variable the "
                                     "payload sees; fix: use letters, digits and _ (e.g. MODE)")
        _no_nul(field, value, "pass binary data in an input file")
        size = _utf8(name) + 1 + _utf8(value)
        if size > MAX_ARG_BYTES:
            raise SpecProblem(field, f"is {size:,} bytes as NAME=value; Linux passes at most {MAX_ARG_BYTES:,} per "
                                     "variable; fix: pass large data in an input file and its name here")
        exec_bytes += size + 9
    if exec_bytes > MAX_EXEC_BYTES:
        raise SpecProblem("arguments", f"and environment take {exec_bytes:,} bytes together, more than the "
                                       f"{MAX_EXEC_BYTES:,} a payload may be started with; fix: pass large data "
                                       "in input files")
    if len(spec.name) > MAX_NAME_CHARS:
        raise SpecProblem("name", f"is {len(spec.name):,} characters; at most {MAX_NAME_CHARS}; fix: a short "
                                  "name for listings")
    _no_nul("name", spec.name, "write a printable name")
    _number("max_attempts", spec.max_attempts, 0, MAX_ATTEMPTS, "ask for fewer (0 means the broker's default)")
    if len(spec.input_files) > MAX_INPUTS:
        raise SpecProblem("input_files", f"holds {len(spec.input_files):,} inputs; at most {MAX_INPUTS:,}; fix: "
                                         "pack small files into one archive")
    if len(spec.output_patterns) > MAX_PATTERNS:
        raise SpecProblem("output_patterns", f"holds {len(spec.output_patterns):,} patterns; at most "
                                             f"{MAX_PATTERNS}; fix: use wider globs")
    _check_requirements(spec.requirements)
    budget.check(spec)


def _check_requirements(req: job_pb2.Requirements) -> None:
    p = "requirements."
    _number(p + "cores", req.cores, 0, MAX_CORES, "ask for the cores one node has (0 means 1)")
    _number(p + "memory_mb", req.memory_mb, 0, MAX_MB, "give the memory in MiB, e.g. 2000")
    _number(p + "disk_mb", req.disk_mb, 0, MAX_MB, "give the sandbox disk in MiB, e.g. 10000")
    if req.walltime_s == 0:
        raise SpecProblem(p + "walltime_s", "is 0: every job needs a wall-clock limit (without one it would fit "
                                            "every slot and be cut off at each slot's end); fix: set it to the "
                                            'longest one attempt may run, e.g. walltime = "2h" in a job file')
    _number(p + "walltime_s", req.walltime_s, 1, MAX_WALLTIME_S, "split the work into jobs of at most 366 days")
    if req.container_image:
        if _utf8(req.container_image) > MAX_IMAGE_BYTES or not req.container_image.isprintable():
            raise SpecProblem(p + "container_image", f"{_show(req.container_image)} must be at most "
                                                     f"{MAX_IMAGE_BYTES} bytes of printable characters; fix: "
                                                     "give the image's path or reference")
    if req.platform:
        _printable(p + "platform", req.platform, MAX_PLATFORM_CHARS, "el9-x86_64")
    for key in ("sites_allowed", "sites_denied"):
        sites = getattr(req, key)
        if len(sites) > MAX_SITES:
            raise SpecProblem(p + key, f"holds {len(sites):,} sites; at most {MAX_SITES}; fix: name fewer sites")
        for i, site in enumerate(sites):
            if not _SITE_RE.fullmatch(site):
                raise SpecProblem(f"{p}{key}[{i}]", f"{_show(site)} is not a site name (1-64 letters, digits and "
                                                    ". _ @ + -, as in the agents' tokens); fix: write e.g. 'SITE-A'")


__all__ = ["JobStartBudget", "SpecProblem", "check_spec"]
