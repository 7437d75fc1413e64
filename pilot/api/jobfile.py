"""Job description files: TOML a person writes, turned into JobSpecs.

One job:

    [job]
    name = "hello"
    executable = "run.sh"
    arguments = ["--events", "10"]
    [job.requirements]
    memory_mb = 2000
    walltime = "1h"                  # required: the longest one attempt may run
    [[job.inputs]]
    path = "data/input.txt"          # uploaded before submit; sandbox name: input.txt
    [job.outputs]
    patterns = ["*.out"]

Many similar jobs: `count = N` in a job table queues N copies, and the text
`{index}` (0 .. N-1) in the name, arguments and environment values is
replaced in each. Several different jobs: `[[jobs]]` tables, each merged over
an optional `[defaults]` table (tables such as requirements and environment
merge key by key; any other value of a job replaces the default's). A file
has either `[job]` or `[[jobs]]`, not both.

Every problem is reported with the file, the field and the fix, all at once;
unknown fields are errors (with a "did you mean"). Relative input paths are
relative to the job file's directory. The reading and the checks common to
every TOML file a person writes are pilot.tomlschema's.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from pilot.api.files import BadFileHeader, check_sandbox_name
from pilot.durations import parse_duration
from pilot.errors import UsageError
from pilot.tomlschema import Checker, Problem, TomlSchemaError
from pilot.tomlschema import type_name as _type_name
from splitpilot.job.v1 import job_pb2

MAX_COUNT = 100_000
MAX_ATTEMPTS = 100
MAX_WALLTIME_S = 366 * 86400  # broker.specs.MAX_WALLTIME_S
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SITE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
INDEX_PLACEHOLDER = "{index}"


# ------------------------------------------------------------------ errors

#: One problem: the dotted field it concerns, what is wrong, and the fix.
JobFileProblem = Problem


class JobFileError(TomlSchemaError):
    """A job description file cannot be used.

    Attributes: path (as given), problems (list of JobFileProblem), and, for
    the first problem, field and fix.
    """


# ------------------------------------------------------------------ results

@dataclass(frozen=True)
class InputRef:
    """A local file to upload before submitting, and its name in the sandbox."""

    path: str
    name: str


@dataclass(frozen=True)
class JobDescription:
    """One job from a file: the spec (inputs not filled in yet) and its local inputs."""

    spec: job_pb2.JobSpec
    inputs: tuple[InputRef, ...] = ()
    source: str = ""


# ------------------------------------------------------------------ schema

#: Example values used in "fix: write KEY = VALUE" hints.
_EXAMPLES = {
    "name": '"hello"', "executable": '"run.sh"', "arguments": '["--events", "10"]', "priority": "0",
    "max_attempts": "3", "count": "10", "cores": "1", "memory_mb": "2000", "disk_mb": "1000",
    "walltime": '"1h"', "container_image": '"/cvmfs/unpacked.cern.ch/registry.hub.docker.com/library/alma9:latest"',
    "platform": '"el9-x86_64"', "sites_allowed": '["SITE-A"]', "sites_denied": '["SITE-B"]',
    "patterns": '["*.out"]', "path": '"data/input.txt"', "environment": '{ MODE = "test" }',
}

JOB_FIELDS = ("name", "executable", "arguments", "priority", "max_attempts", "count", "environment",
              "requirements", "inputs", "outputs")
REQUIREMENT_FIELDS = ("cores", "memory_mb", "disk_mb", "walltime", "container_image", "platform",
                      "sites_allowed", "sites_denied")
INPUT_FIELDS = ("path", "name")
OUTPUT_FIELDS = ("patterns",)
TOP_FIELDS = ("job", "jobs", "defaults")


class _Checker(Checker):
    """Collects problems while reading one job file; inputs are relative to BASE_DIR."""

    def __init__(self, path: str, base_dir: str) -> None:
        super().__init__(path, examples=_EXAMPLES, error=JobFileError)
        self.base_dir = base_dir


_SYNTAX_FIX = 'check quoting and brackets near that line; strings are quoted (name = "hello"), sections are [job]'


# ------------------------------------------------------------------ parsing

def load_job_file(path: str | os.PathLike) -> list[JobDescription]:
    """Read and validate the job file at PATH (JobFileError naming every problem)."""
    path = os.fspath(path)
    check = _Checker(path, os.path.dirname(os.path.abspath(path)))
    return _parse_document(check.load_file(_SYNTAX_FIX), check)


def parse_job_text(text: str, path: str = "<job description>", base_dir: str = ".") -> list[JobDescription]:
    """Validate the TOML TEXT (named PATH in messages); inputs relative to BASE_DIR."""
    check = _Checker(path, base_dir)
    return _parse_document(check.load_text(text, _SYNTAX_FIX), check)


def _parse_document(document: dict[str, Any], check: _Checker) -> list[JobDescription]:
    path = check.path
    check.unknown(document, TOP_FIELDS, "")
    tables: list[tuple[str, dict]] = []
    defaults: dict = {}
    if "job" in document and "jobs" in document:
        check.add("jobs", "a file has either one [job] table or [[jobs]] tables, not both",
                  "move [job] into a [[jobs]] entry")
    elif "job" in document:
        table = check.table(document["job"], "job", "job")
        if table is not None:
            tables.append(("job", table))
        if "defaults" in document:
            check.add("defaults", "[defaults] applies to [[jobs]] tables only", "put its fields into [job]")
    elif "jobs" in document:
        entries = document["jobs"]
        if not isinstance(entries, list) or not entries:
            check.add("jobs", f"expected one or more [[jobs]] tables, got {_type_name(entries)}",
                      "write each job as a [[jobs]] section")
        else:
            for i, entry in enumerate(entries):
                table = check.table(entry, f"jobs[{i}]", "jobs")
                if table is not None:
                    tables.append((f"jobs[{i}]", table))
        if "defaults" in document:
            raw = check.table(document["defaults"], "defaults", "defaults")
            if raw is not None:
                defaults = _parse_job_table(raw, "defaults", check)
    else:
        check.add("job", "no job in the file", 'add a [job] section with at least executable = "run.sh"')

    parsed = [(prefix, _parse_job_table(table, prefix, check)) for prefix, table in tables]
    jobs: list[JobDescription] = []
    total = 0
    for prefix, values in parsed:
        merged = _merge(defaults, values)
        if "executable" not in merged:
            if not any(p.field in (f"{prefix}.executable", "defaults.executable") for p in check.problems):
                check.add(f"{prefix}.executable", "missing: every job needs a program to run",
                          'write executable = "run.sh" (a path in the sandbox or a name on the PATH)')
            continue
        if "walltime_s" not in merged.get("requirements", {}):
            if not any(p.field in (f"{prefix}.requirements.walltime", "defaults.requirements.walltime")
                       for p in check.problems):
                check.add(f"{prefix}.requirements.walltime", "missing: every job needs a wall-clock limit (the "
                          "broker matches it to slots with that much time left, and stops it after that long)",
                          f'write walltime = "1h" under [{prefix}.requirements] (or [defaults.requirements])')
            continue
        count = merged.get("count", 1)
        total += count
        if total > MAX_COUNT:
            check.add(f"{prefix}.count", f"the file describes more than {MAX_COUNT} jobs",
                      "split it into several files")
            break
        jobs.extend(_expand(merged, prefix, path, count))
    check.raise_problems()
    return jobs


def _parse_job_table(table: dict, prefix: str, check: _Checker) -> dict:
    """Check one job (or defaults) table; return its valid values, converted."""
    out: dict[str, Any] = {}
    check.unknown(table, JOB_FIELDS, prefix)
    p = f"{prefix}."
    if "name" in table and (v := check.string(table["name"], p + "name", "name")) is not None:
        out["name"] = v
    if "executable" in table and (v := check.string(table["executable"], p + "executable", "executable",
                                                    nonempty=True)) is not None:
        out["executable"] = v
    if "arguments" in table and (args := check.strings(table["arguments"], p + "arguments", "arguments")) is not None:
        out["arguments"] = args
    if "priority" in table and (n := check.integer(table["priority"], p + "priority", "priority",
                                                   low=-(2**31), high=2**31 - 1, what="an integer")) is not None:
        out["priority"] = n
    if "max_attempts" in table and (n := check.integer(
            table["max_attempts"], p + "max_attempts", "max_attempts", low=0, high=MAX_ATTEMPTS,
            what="a number of attempts (0: the broker's default)")) is not None:
        out["max_attempts"] = n
    if "count" in table and (n := check.integer(table["count"], p + "count", "count", low=1, high=MAX_COUNT,
                                                what="a positive integer")) is not None:
        out["count"] = n
    if "environment" in table and (env := check.table(table["environment"], p + "environment",
                                                      "environment")) is not None:
        out["environment"] = _parse_environment(env, p + "environment", check)
    if "requirements" in table and (req := check.table(table["requirements"], p + "requirements",
                                                       "requirements")) is not None:
        out["requirements"] = _parse_requirements(req, p + "requirements", check)
    if "inputs" in table:
        out["inputs"] = _parse_inputs(table["inputs"], p + "inputs", check)
    if "outputs" in table and (outputs := check.table(table["outputs"], p + "outputs", "outputs")) is not None:
        check.unknown(outputs, OUTPUT_FIELDS, p + "outputs")
        if "patterns" in outputs:
            patterns = check.strings(outputs["patterns"], p + "outputs.patterns", "patterns", _pattern_problem)
            if patterns is not None:
                out["outputs"] = {"patterns": patterns}
    return out


def _pattern_problem(pattern: str) -> tuple[str, str] | None:
    if not pattern or pattern.startswith("/") or ".." in pattern.split("/"):
        return (f"pattern {pattern!r} must be relative to the sandbox, without '..'",
                'write a pattern like "*.out" or "results/**"')
    return None


def _parse_environment(env: dict, prefix: str, check: _Checker) -> dict[str, str]:
    out = {}
    for key, value in env.items():
        if not _ENV_NAME_RE.fullmatch(key):
            check.add(f"{prefix}.{key}", "not a valid environment variable name",
                      "use letters, digits and _ (not starting with a digit), e.g. MODE")
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            check.add(f"{prefix}.{key}", f"expected a string, got {_type_name(value)} {value!r}",
                      f'quote the value: {key} = "{value}"')
            continue
        out[key] = str(value)
    return out


def _site_problem(site: str) -> tuple[str, str] | None:
    if not _SITE_RE.fullmatch(site):
        return (f"{site!r} is not a site name", "use the site's name as in the agent tokens, e.g. \"SITE-A\"")
    return None


def _parse_requirements(req: dict, prefix: str, check: _Checker) -> dict:
    out: dict[str, Any] = {}
    check.unknown(req, REQUIREMENT_FIELDS, prefix)
    p = f"{prefix}."
    if "cores" in req and (v := check.integer(req["cores"], p + "cores", "cores", low=1, high=4096,
                                              what="a positive integer")) is not None:
        out["cores"] = v
    for key in ("memory_mb", "disk_mb"):
        if key in req and (v := check.integer(req[key], p + key, key, low=0, high=2**40,
                                              what="a positive integer")) is not None:
            out[key] = v
    if "walltime" in req:
        value = req["walltime"]
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            check.add(p + "walltime", f"expected a duration, got {_type_name(value)} {value!r}",
                      'write walltime = "1h" (or "90m", "2d", or seconds as an integer)')
        else:
            seconds = value if isinstance(value, int) else None
            if isinstance(value, str):
                try:
                    seconds = int(parse_duration(value, what="walltime").total_seconds())
                except UsageError:
                    check.add(p + "walltime", f"expected a duration, got {value!r}",
                              'write walltime = "1h" (units s, m, h, d, w; e.g. "1h30m")')
            if seconds is not None and not 1 <= seconds <= MAX_WALLTIME_S:
                check.add(p + "walltime", f"expected a duration from 1 second to 366 days, got {value!r}",
                          'write walltime = "1h" (the longest one attempt may run)')
            elif seconds is not None:
                out["walltime_s"] = seconds
    for key in ("container_image", "platform"):
        if key in req and (text := check.string(req[key], p + key, key)) is not None:
            out[key] = text
    for key in ("sites_allowed", "sites_denied"):
        if key in req and (sites := check.strings(req[key], p + key, key, _site_problem)) is not None:
            out[key] = sites
    return out


def _parse_inputs(value: Any, prefix: str, check: _Checker) -> list[InputRef]:
    if not isinstance(value, list):
        check.add(prefix, f"expected an array of inputs, got {_type_name(value)}",
                  f'write one [[{prefix}]] section per file, with path = "data/input.txt"')
        return []
    refs: list[InputRef] = []
    names: dict[str, int] = {}
    for i, item in enumerate(value):
        here = f"{prefix}[{i}]"
        if isinstance(item, str):
            item = {"path": item}
        elif not isinstance(item, dict):
            check.add(here, f"expected a table or a path string, got {_type_name(item)} {item!r}",
                      'write path = "data/input.txt" in a [[job.inputs]] section')
            continue
        check.unknown(item, INPUT_FIELDS, here)
        if "path" not in item:
            check.add(f"{here}.path", "missing: which local file to upload", 'write path = "data/input.txt"')
            continue
        local = check.string(item["path"], f"{here}.path", "path", nonempty=True)
        if local is None:
            continue
        full = os.path.normpath(os.path.join(check.base_dir, os.path.expanduser(local)))
        if not os.path.isfile(full):
            what = "is not a regular file" if os.path.exists(full) else "no such file"
            check.add(f"{here}.path", f"{what}: {local!r} (looked at {full})",
                      "give a path relative to the job file's directory, or an absolute one")
            continue
        name = os.path.basename(full)
        if "name" in item:
            given = check.string(item["name"], f"{here}.name", "name", nonempty=True)
            if given is None:
                continue
            name = given
        try:
            check_sandbox_name(name, "input name")
        except BadFileHeader as exc:
            check.add(f"{here}.name", exc.detail.split("; fix: ")[0],
                      'write name = "input.txt" (a relative path in the sandbox, without "..")')
            continue
        if name in names:
            check.add(f"{here}.name", f"two inputs are named {name!r} in the sandbox (also {prefix}[{names[name]}])",
                      'give one of them another name = "..."')
            continue
        names[name] = i
        refs.append(InputRef(full, name))
    return refs


def _merge(defaults: dict, job: dict) -> dict:
    merged = dict(defaults)
    for key, value in job.items():
        if key in ("environment", "requirements", "outputs") and key in merged:
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _expand(values: dict, prefix: str, path: str, count: int) -> list[JobDescription]:
    req = values.get("requirements", {})
    inputs = tuple(values.get("inputs", ()))
    jobs = []
    for index in range(count):
        def sub(text: str, index: int = index) -> str:
            return text.replace(INDEX_PLACEHOLDER, str(index)) if count > 1 else text
        spec = job_pb2.JobSpec(
            executable=values["executable"],
            arguments=[sub(a) for a in values.get("arguments", ())],
            environment={k: sub(v) for k, v in values.get("environment", {}).items()},
            output_patterns=values.get("outputs", {}).get("patterns", ()),
            requirements=job_pb2.Requirements(
                cores=req.get("cores", 1), memory_mb=req.get("memory_mb", 0), disk_mb=req.get("disk_mb", 0),
                walltime_s=req.get("walltime_s", 0), container_image=req.get("container_image", ""),
                platform=req.get("platform", ""), sites_allowed=req.get("sites_allowed", ()),
                sites_denied=req.get("sites_denied", ())),
            max_attempts=values.get("max_attempts", 0),
            name=sub(values.get("name", "")),
            priority=values.get("priority", 0),
        )
        jobs.append(JobDescription(spec, inputs, f"{path}:{prefix}" + (f"#{index}" if count > 1 else "")))
    return jobs


__all__ = ["InputRef", "JobDescription", "JobFileError", "JobFileProblem", "load_job_file", "parse_job_text"]
