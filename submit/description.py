"""Glidein submit descriptions: settings -> a dict of submit lines -> a .sub file or an htcondor2.Submit.

    request = GlideinRequest(executable=Path("/srv/factory/glidein_startup.sh"),
                             log_dir=Path("/srv/factory/log"), site="SITE-A", factory="f1")
    description = build_description(request)          # dict[str, str], in submit-language syntax
    text = render_sub_file(description, queue=10)      # for a person: condor_submit FILE
    schedd.submit(to_submit(description), count=10)    # for the bindings

The dict is the one place where the submit lines are decided (the
dask-jobqueue way); both renderings write the same lines. Every value in it
is already in submit-language syntax: ClassAd strings quoted by the
bindings (classad2.quote), and no value in which a macro could start (see
`submit.quoting`). The glidein takes no arguments and no environment: its
settings are in its startup script (condor_plugin.glidein). A site's own
lines (an accounting group, requirements) go in `extra`, raw submit
language, checked against the generator's keys and for credentials.

Two universes: vanilla for a local pool (`ce=None`), grid for an HTCondor-CE
(`ce=CondorCE("ce.example.org")`: `universe = grid`, `grid_resource = condor
HOST HOST:9619`, SciTokens for the CE).

Lifetime and stuck glideins. The bounds are job attributes, so an operator
can change them for one glidein with condor_qedit, and the expressions name
them instead of repeating numbers:

    +SplitpilotLifetime  seconds the glidein may run; the startup script reads it from its job ad
    +SplitpilotGrace     seconds past the lifetime before HTCondor stops it
    +SplitpilotMaxIdle   seconds a glidein may stay idle (queued) before it is put on hold
    +SplitpilotMaxHeld   seconds a held glidein stays before it is removed

    (JobStatus numbers: htcondor2.JobStatus IDLE 1, RUNNING 2, HELD 5.)

    periodic_hold   = JobStatus == 1 && time() - EnteredCurrentStatus > SplitpilotMaxIdle
        Idle too long: no slot (vanilla) or no CE batch slot (grid) took it,
        or it went back to idle after an eviction. Held rather than removed,
        so that `condor_q -hold` shows why (periodic_hold_reason) until the
        removal below.
    periodic_remove = (JobStatus == 2 && time() - EnteredCurrentStatus > SplitpilotLifetime + SplitpilotGrace)
                   || (JobStatus == 5 && HoldReasonCode =!= 1 && time() - EnteredCurrentStatus > SplitpilotMaxHeld)
        Running past its lifetime and grace: the glidein failed to stop by
        itself (hung). Held too long: whatever held it (the idle rule above,
        allowed_job_duration, a CE or transfer failure) is not going to heal;
        a new glidein is cheaper. A hold put by a person (HoldReasonCode 1,
        condor_hold) is left alone: someone is looking at it.
    allowed_job_duration = lifetime + grace (vanilla only)
        The same running bound enforced by the shadow itself, to the second,
        as a hold with HoldReasonCode 46; the held rule then removes it.
        The schedd evaluates periodic expressions only every
        PERIODIC_EXPR_INTERVAL (60 s by default), so the bounds are that
        coarse. In the grid universe there is no local shadow: the periodic
        rule is the bound, and +maxWallTime tells the CE's batch system.

Preemption. When HTCondor takes the slot back (condor_vacate_job, a
startd's PREEMPT, condor_rm) the starter sends the glidein SIGTERM; the
startup script passes it to the agent, which gives each job a Stop with its
stop deadline (pilot.agent.jobrun.RunSettings.stop_deadline_s, 30 s) and
reports the stopped attempts so that the broker re-queues them at once.

    job_max_vacate_time = max_vacate (60 s: the stop deadline plus time to report)
        How long HTCondor waits after SIGTERM before SIGKILL. The machine's
        MACHINE_MAX_VACATE_TIME caps it (600 s by default; a site may set
        less) unless the job has retirement time left (MAXJOBRETIREMENTTIME),
        which is then converted. Killed sooner, the agent reports nothing and
        the broker's reaper re-queues the jobs only when their heartbeats
        stop; given much longer, a hung glidein holds the preempted slot.
        Observed in the mini-condor (HTCondor 23.9): condor_vacate_job of a
        glidein whose script did not pass SIGTERM on was SIGKILLed 60 s later.

EnteredCurrentStatus rather than JobStartDate/QDate: it is maintained in
every universe (the gridmanager updates it from the CE) and restarts with
each state, which is what "stuck in this state" means.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
import types
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import htcondor2
from htcondor2 import JobStatus

import pilot
from pilot.durations import parse_duration
from submit.errors import Problem, SubmitDescriptionError
from submit.quoting import check_line_value, check_representable, classad_string, refuse_macros

#: The port HTCondor-CE listens on.
CE_PORT = 9619
#: The agent's default stop deadline (pilot.agent.jobrun.RunSettings.stop_deadline_s; not imported:
#: building a description must stay light), what it needs at least to report after it, and the default
#: job_max_vacate_time. tests/test_submit.py checks the first against the agent's.
AGENT_STOP_DEADLINE_S = 30
MIN_REPORT_MARGIN_S = 10
DEFAULT_MAX_VACATE_S = 60

#: HoldReasonCode of a hold put by a person (condor_hold); the bindings have no enum for hold codes.
HOLD_BY_USER = 1
PERIODIC_HOLD = f"JobStatus == {JobStatus.IDLE:d} && time() - EnteredCurrentStatus > SplitpilotMaxIdle"
PERIODIC_HOLD_REASON = ('strcat("splitpilot: glidein idle for more than ", SplitpilotMaxIdle, '
                        '" s: no slot took it; it is removed after ", SplitpilotMaxHeld, " s on hold")')
PERIODIC_REMOVE = (f"(JobStatus == {JobStatus.RUNNING:d} && time() - EnteredCurrentStatus > SplitpilotLifetime"
                   f" + SplitpilotGrace) || (JobStatus == {JobStatus.HELD:d} && HoldReasonCode =!= {HOLD_BY_USER}"
                   " && time() - EnteredCurrentStatus > SplitpilotMaxHeld)")

#: Comments written above these keys in a .sub file, for the person reading it.
KEY_NOTES: dict[str, str] = {
    "universe": "Generated by splitpilot: change the settings (GlideinRequest), not this file.",
    "executable": "The glidein startup script; the agent token travels as a transfer input or inside it, "
                  "never in this file.",
    "encrypt_input_files": "The agent token is transferred encrypted, whatever the pool's default: from here, "
                           "and from the schedd's SPOOL (*/NAME) when the inputs are spooled.",
    "transfer_output_files": "Nothing comes back but output and error: results go through the broker.",
    "+SplitpilotLifetime": "Bounds in seconds, read by the expressions below (condor_qedit one job to change them).",
    "allowed_job_duration": "Running past lifetime + grace: the shadow holds the glidein (HoldReasonCode 46).",
    "job_max_vacate_time": "After SIGTERM (preemption, removal), seconds before SIGKILL: the agent's stop "
                           "deadline plus time to report its jobs.",
    "periodic_hold": "Idle (queued, or evicted) for longer than SplitpilotMaxIdle: hold it, with a reason.",
    "periodic_remove": "Running past lifetime + grace (hung), or held longer than SplitpilotMaxHeld "
                       "(except holds by a person): remove it.",
    "+maxWallTime": "HTCondor-CE's names for the batch system's request (minutes, cores, MB).",
}

_SUBMIT_KEY = re.compile(r"(\+|[Mm][Yy]\.)?[A-Za-z_][A-Za-z0-9_.]*")
_BATCH = re.compile(r"[A-Za-z0-9._:@+-]{1,128}")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*")
_PEM = re.compile(r"-----begin", re.IGNORECASE)
#: A JSON Web Token (an IDTOKEN or SciToken): base64url of '{"' starts both header and payload.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.")

_FIX_CE = "set GlideinRequest.ce to a CondorCE (grid universe), or leave it None (vanilla universe)"
_FIX_BOUNDS = "set GlideinRequest.lifetime, grace, max_idle and max_held: the expressions read them"
_FIX_VACATE = ("set GlideinRequest.max_vacate (the glidein must get SIGTERM and time to stop its jobs and "
               "report them)")
_FIX_SETTINGS = ("the glidein takes its settings from its startup script, not from arguments or the "
                 "environment: set them in condor_plugin.glidein.GlideinSettings (the glidein/factory CLI flags)")
_FIX_TRANSFER = "the generator always transfers files (should_transfer_files = YES, ON_EXIT); list inputs " \
                "in GlideinRequest.transfer_input_files"

#: Submit commands the generator owns (lower case), and how to get what the caller wanted.
RESERVED_COMMANDS: dict[str, str] = {
    "universe": _FIX_CE, "grid_resource": _FIX_CE,
    "use_scitokens": "set GlideinRequest.ce (CondorCE.scitokens_file)",
    "scitokens_file": "set GlideinRequest.ce (CondorCE.scitokens_file)",
    "executable": "set GlideinRequest.executable",
    "arguments": _FIX_SETTINGS, "args": _FIX_SETTINGS, "environment": _FIX_SETTINGS, "env": _FIX_SETTINGS,
    "getenv": "the glidein's settings are in its startup script (condor_plugin.glidein.GlideinSettings); "
              "getenv would copy the factory's own environment into the job, credentials included",
    "request_cpus": "set GlideinRequest.cpus",
    "request_memory": "set GlideinRequest.memory_mb",
    "request_disk": "set GlideinRequest.disk_mb",
    "periodic_hold": _FIX_BOUNDS, "periodic_hold_reason": _FIX_BOUNDS, "periodic_hold_subcode": _FIX_BOUNDS,
    "periodic_remove": _FIX_BOUNDS, "periodic_release": _FIX_BOUNDS, "periodic_vacate": _FIX_BOUNDS,
    "allowed_job_duration": _FIX_BOUNDS, "allowed_execute_duration": _FIX_BOUNDS,
    "job_max_vacate_time": _FIX_VACATE,
    "transfer_input_files": "set GlideinRequest.transfer_input_files",
    "encrypt_input_files": "set GlideinRequest.encrypt_input_files",
    "dont_encrypt_input_files": "set GlideinRequest.encrypt_input_files (the token must travel encrypted)",
    "transfer_output_files": _FIX_TRANSFER, "should_transfer_files": _FIX_TRANSFER,
    "when_to_transfer_output": _FIX_TRANSFER,
    "output": "set GlideinRequest.log_dir", "error": "set GlideinRequest.log_dir",
    "log": "set GlideinRequest.log_dir", "initialdir": "set GlideinRequest.log_dir",
    "batch_name": "set GlideinRequest.batch",
    "queue": "pass queue=N to render_sub_file, or count=N to Schedd.submit",
}

#: Job attributes (lower case) the generator sets, directly or through a command above.
RESERVED_ATTRIBUTES: dict[str, str] = {
    "jobuniverse": _FIX_CE, "gridresource": _FIX_CE,
    "cmd": "set GlideinRequest.executable",
    "args": _FIX_SETTINGS, "arguments": _FIX_SETTINGS, "env": _FIX_SETTINGS, "environment": _FIX_SETTINGS,
    "requestcpus": "set GlideinRequest.cpus", "xcount": "set GlideinRequest.cpus",
    "requestmemory": "set GlideinRequest.memory_mb", "maxmemory": "set GlideinRequest.memory_mb",
    "requestdisk": "set GlideinRequest.disk_mb",
    "maxwalltime": _FIX_BOUNDS, "periodichold": _FIX_BOUNDS, "periodicholdreason": _FIX_BOUNDS,
    "periodicremove": _FIX_BOUNDS, "periodicrelease": _FIX_BOUNDS, "allowedjobduration": _FIX_BOUNDS,
    "jobmaxvacatetime": _FIX_VACATE,
    "transferinput": "set GlideinRequest.transfer_input_files", "transferoutput": _FIX_TRANSFER,
    "encryptinputfiles": "set GlideinRequest.encrypt_input_files",
    "dontencryptinputfiles": "set GlideinRequest.encrypt_input_files (the token must travel encrypted)",
    "shouldtransferfiles": _FIX_TRANSFER, "whentotransferoutput": _FIX_TRANSFER,
    "out": "set GlideinRequest.log_dir", "err": "set GlideinRequest.log_dir", "userlog": "set GlideinRequest.log_dir",
    "iwd": "set GlideinRequest.log_dir",
    "jobbatchname": "set GlideinRequest.batch",
}
_FIX_SPLITPILOT = ("set the GlideinRequest fields (site, factory, batch, lifetime, ...): the Splitpilot "
                   "attribute prefix belongs to the generator")


# ---------------------------------------------------------------------------
# Settings

@dataclass(frozen=True)
class CondorCE:
    """An HTCondor-CE to submit glideins to (grid universe)."""

    host: str
    port: int = CE_PORT
    #: The SciToken the CE accepts; None lets HTCondor look in its default places (BEARER_TOKEN_FILE, ...).
    scitokens_file: Path | None = None

    def __post_init__(self) -> None:
        if not _HOSTNAME.fullmatch(self.host) or len(self.host) > 253:
            raise SubmitDescriptionError("ce.host", Problem.INVALID, "not a host name",
                                         "give the CE's DNS name, e.g. ce.example.org (no port, no scheme)")
        if not 1 <= self.port <= 65535:
            raise SubmitDescriptionError("ce.port", Problem.INVALID, "not a TCP port",
                                         f"give 1-65535 (HTCondor-CE listens on {CE_PORT})")
        if self.scitokens_file is not None:
            object.__setattr__(self, "scitokens_file", _absolute_path(self.scitokens_file, "ce.scitokens_file"))

    @property
    def grid_resource(self) -> str:
        return f"condor {self.host} {self.host}:{self.port}"


Duration = datetime.timedelta | str | int


@dataclass(frozen=True)
class GlideinRequest:
    """What one batch of glideins looks like. Validated on construction; see the module for the policy."""

    #: The glidein startup script (absolute path on the submit side).
    executable: Path
    #: Where output, error and the job event log go: glidein.CLUSTER.PROC.{out,err,log}.
    log_dir: Path
    #: Site and factory names, as +SplitpilotSite / +SplitpilotFactory.
    site: str
    factory: str
    #: Identifies one submission of glideins (+SplitpilotBatch, and condor_q -batch).
    batch: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    #: None: vanilla universe in the local pool; a CondorCE: grid universe to that CE.
    ce: CondorCE | None = None
    #: Absolute paths or URLs, without commas or whitespace.
    transfer_input_files: Sequence[str | Path] = ()
    #: Those of transfer_input_files HTCondor must transfer encrypted whatever the pool's default
    #: (encrypt_input_files): the agent token.
    encrypt_input_files: Sequence[str | Path] = ()
    cpus: int = 1
    memory_mb: int = 2048
    disk_mb: int = 4096
    #: Durations: a timedelta, seconds, or text like "24h", "15m", "1h30m".
    lifetime: Duration = datetime.timedelta(hours=24)
    grace: Duration = datetime.timedelta(minutes=15)
    max_idle: Duration = datetime.timedelta(hours=12)
    max_held: Duration = datetime.timedelta(hours=2)
    #: After SIGTERM, how long HTCondor waits before SIGKILL (job_max_vacate_time): at least the agent's
    #: stop deadline (30 s) plus the time to report the stopped jobs.
    max_vacate: Duration = datetime.timedelta(seconds=DEFAULT_MAX_VACATE_S)
    #: More submit lines, raw submit language, passed through (site specifics: accounting_group,
    #: requirements, +Attribute = "text"); not the generator's keys, no credentials.
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "executable", _absolute_path(self.executable, "executable"))
        set_(self, "log_dir", _absolute_path(self.log_dir, "log_dir"))
        for name in ("site", "factory"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise SubmitDescriptionError(name, Problem.INVALID, "empty", f"give the {name} name")
            _string_value(value, name)
        if not isinstance(self.batch, str) or not _BATCH.fullmatch(self.batch):
            raise SubmitDescriptionError("batch", Problem.INVALID, "not a batch identifier",
                                         "use 1-128 of letters, digits and . _ : @ + -")
        set_(self, "transfer_input_files", tuple(str(p) for p in self.transfer_input_files))
        set_(self, "encrypt_input_files", tuple(str(p) for p in self.encrypt_input_files))
        for entry in self.encrypt_input_files:
            if entry not in self.transfer_input_files:
                raise SubmitDescriptionError("encrypt_input_files", Problem.INVALID,
                                             f"{entry!r} is not one of transfer_input_files",
                                             "list the file in transfer_input_files too (HTCondor encrypts only "
                                             "files it transfers)")
        set_(self, "extra", types.MappingProxyType(dict(self.extra)))
        for name, low in (("cpus", 1), ("memory_mb", 1), ("disk_mb", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SubmitDescriptionError(name, Problem.INVALID, "not a positive whole number",
                                             f"give {name} as an int >= {low}")
        for name in ("lifetime", "grace", "max_idle", "max_held", "max_vacate"):
            set_(self, name, _duration(getattr(self, name), name))
        if self.seconds("max_vacate") < AGENT_STOP_DEADLINE_S + MIN_REPORT_MARGIN_S:
            raise SubmitDescriptionError("max_vacate", Problem.INVALID,
                                         f"shorter than the agent's stop deadline ({AGENT_STOP_DEADLINE_S} s) plus "
                                         f"{MIN_REPORT_MARGIN_S} s to report",
                                         f"give at least {AGENT_STOP_DEADLINE_S + MIN_REPORT_MARGIN_S} s: HTCondor "
                                         "would SIGKILL the agent before it reports its stopped jobs")

    @property
    def universe(self) -> str:
        return "vanilla" if self.ce is None else "grid"

    def seconds(self, name: str) -> int:
        """A duration setting (lifetime, grace, max_idle, max_held, max_vacate) in whole seconds."""
        value = getattr(self, name)
        assert isinstance(value, datetime.timedelta)
        return int(value.total_seconds())

    def replace(self, **changes: Any) -> GlideinRequest:
        return dataclasses.replace(self, **changes)


def _absolute_path(path: object, key: str) -> Path:
    text = str(path)
    check_representable(text, key=key)
    if not Path(text).is_absolute():
        raise SubmitDescriptionError(key, Problem.INVALID, "a relative path",
                                     "give an absolute path: condor_submit resolves relative paths against its "
                                     "working directory, the bindings against this process's")
    if any(c.isspace() for c in text) or "," in text:
        raise SubmitDescriptionError(key, Problem.UNREPRESENTABLE, "the path contains whitespace or a comma",
                                     "use a path without them (HTCondor splits file lists on both)")
    return Path(text)


def _duration(value: object, key: str) -> datetime.timedelta:
    if isinstance(value, datetime.timedelta):
        delta = value
    elif isinstance(value, int) and not isinstance(value, bool):
        delta = datetime.timedelta(seconds=value)
    elif isinstance(value, str):
        delta = parse_duration(value, what=key)
    else:
        raise SubmitDescriptionError(key, Problem.INVALID, "not a duration", "give a timedelta, seconds, or '24h'")
    if delta.total_seconds() < 1 or delta.total_seconds() != int(delta.total_seconds()):
        raise SubmitDescriptionError(key, Problem.INVALID, "not a whole positive number of seconds",
                                     "give at least 1 s, in whole seconds")
    return delta


# ---------------------------------------------------------------------------
# Checks shared by the builder and the renderers

def _refuse_secret(key: str, value: str) -> None:
    """Refuse VALUE if it looks like a credential (a PEM block or a JSON Web Token)."""
    if _PEM.search(value):
        what = "a PEM block (-----BEGIN ...)"
    elif _JWT.search(value):
        what = "a JSON Web Token (an IDTOKEN or SciToken)"
    else:
        return
    raise SubmitDescriptionError(
        key, Problem.SECRET,
        f"the value looks like {what}; a credential in a submit description is readable by anyone who can "
        "run condor_q, and in the job's arguments or environment by everything the job runs",
        "the agent token must travel as a transfer input file (mode 0600 or encrypted; the glidein packager "
        "makes it) or inside the startup script: list the file in GlideinRequest.transfer_input_files and pass "
        "only its name")


def _attribute_name(key: str) -> str | None:
    """The job attribute a submit KEY sets (`+Name` or `My.Name`), or None for a command."""
    if key.startswith("+"):
        return key[1:]
    if key[:3].lower() == "my.":
        return key[3:]
    return None


def _identity(key: str) -> tuple[bool, str]:
    """What KEY sets, as HTCondor compares it: (is an attribute, lower-case name)."""
    attribute = _attribute_name(key)
    return (True, attribute.lower()) if attribute is not None else (False, key.lower())


def _reserved_fix(key: str) -> str | None:
    """How to set KEY properly if the generator owns it, else None."""
    attribute = _attribute_name(key)
    if attribute is None:
        return RESERVED_COMMANDS.get(key.lower())
    if attribute.lower().startswith("splitpilot"):
        return _FIX_SPLITPILOT
    return RESERVED_ATTRIBUTES.get(attribute.lower())


def check_description(description: Mapping[str, str]) -> None:
    """Refuse a description that would not render faithfully, or that carries a credential."""
    for key, value in description.items():
        if not isinstance(key, str) or not _SUBMIT_KEY.fullmatch(key):
            raise SubmitDescriptionError(str(key), Problem.INVALID, "not a submit key",
                                         "use a command name (letters, digits, _ and .) or +Attribute")
        if not isinstance(value, str):
            raise SubmitDescriptionError(key, Problem.INVALID, f"the value is a {type(value).__name__}, not text",
                                         "give submit-language text (str)")
        _refuse_secret(key, value)
        check_line_value(value, key=key)


# ---------------------------------------------------------------------------
# The builder

def build_description(request: GlideinRequest) -> dict[str, str]:
    """The submit lines for REQUEST, in a fixed order, every value in submit-language syntax."""
    d: dict[str, str] = {"universe": request.universe}
    if request.ce is not None:
        d["grid_resource"] = request.ce.grid_resource
        d["use_scitokens"] = "true"
        if request.ce.scitokens_file is not None:
            d["scitokens_file"] = _path_value(request.ce.scitokens_file, "ce.scitokens_file")
    d["executable"] = _path_value(request.executable, "executable")
    d["request_cpus"] = str(request.cpus)
    d["request_memory"] = f"{request.memory_mb}MB"
    d["request_disk"] = f"{request.disk_mb}MB"
    d["should_transfer_files"] = "YES"
    d["when_to_transfer_output"] = "ON_EXIT"
    if request.transfer_input_files:
        d["transfer_input_files"] = ",".join(_transfer_entry(str(entry), index)
                                             for index, entry in enumerate(request.transfer_input_files))
    if request.encrypt_input_files:
        # HTCondor matches these against the path each file is sent from: the submit side's path
        # (condor_submit without -spool, and the bindings' upload into the spool), and for spooled
        # jobs the schedd's SPOOL/.../NAME, which only a wildcard covers (observed with 23.9: the
        # shadow sent a spooled token unencrypted when only its submit path was listed).
        entries: list[str] = []
        for entry in map(str, request.encrypt_input_files):   # (strings already: __post_init__)
            entries.append(_transfer_entry(entry, request.transfer_input_files.index(entry)))
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if "://" not in entry and "*" not in name:
                entries.append(refuse_macros(f"*/{name}", key="encrypt_input_files"))
        d["encrypt_input_files"] = ",".join(entries)
    d["transfer_output_files"] = '""'
    logs = _path_value(request.log_dir, "log_dir").rstrip("/")
    # Set, not left to the default: condor_submit takes its own working directory, the bindings
    # this process's, which may not even exist where the shadow runs.
    d["initialdir"] = logs or "/"
    d["output"] = f"{logs}/glidein.$(Cluster).$(Process).out"
    d["error"] = f"{logs}/glidein.$(Cluster).$(Process).err"
    d["log"] = f"{logs}/glidein.$(Cluster).$(Process).log"
    d["batch_name"] = request.batch
    d["+SplitpilotSite"] = _string_value(request.site, "site")
    d["+SplitpilotFactory"] = _string_value(request.factory, "factory")
    d["+SplitpilotBatch"] = _string_value(request.batch, "batch")
    d["+SplitpilotVersion"] = _string_value(pilot.__version__, "version")
    d["+SplitpilotLifetime"] = str(request.seconds("lifetime"))
    d["+SplitpilotGrace"] = str(request.seconds("grace"))
    d["+SplitpilotMaxIdle"] = str(request.seconds("max_idle"))
    d["+SplitpilotMaxHeld"] = str(request.seconds("max_held"))
    if request.ce is None:
        d["allowed_job_duration"] = str(request.seconds("lifetime") + request.seconds("grace"))
    d["job_max_vacate_time"] = str(request.seconds("max_vacate"))
    d["periodic_hold"] = PERIODIC_HOLD
    d["periodic_hold_reason"] = PERIODIC_HOLD_REASON
    d["periodic_remove"] = PERIODIC_REMOVE
    if request.ce is not None:
        d["+maxWallTime"] = str(math.ceil((request.seconds("lifetime") + request.seconds("grace")) / 60))
        d["+xcount"] = str(request.cpus)
        d["+maxMemory"] = str(request.memory_mb)
    for key, value in request.extra.items():
        if not isinstance(key, str) or not _SUBMIT_KEY.fullmatch(key):
            raise SubmitDescriptionError(f"extra[{key!r}]", Problem.INVALID, "not a submit key",
                                         "use a command name (letters, digits, _ and .) or +Attribute")
        _refuse_reserved(key, f"extra[{key}]")
        if any(_identity(k) == _identity(key) for k in d):
            raise SubmitDescriptionError(f"extra[{key}]", Problem.INVALID, "the key is set twice (keys and "
                                         "attribute names are case-insensitive; +Name is My.Name)",
                                         "set it once")
        if not isinstance(value, str):
            raise SubmitDescriptionError(f"extra[{key}]", Problem.INVALID, "not text",
                                         "give raw submit-language text (a ClassAd string in double quotes: "
                                         "+Name = \"text\")")
        _refuse_secret(f"extra[{key}]", value)
        check_line_value(value, key=f"extra[{key}]")
        d[key] = value
    check_description(d)
    return d


def _refuse_reserved(key: str, where: str) -> None:
    fix = _reserved_fix(key)
    if fix is not None:
        raise SubmitDescriptionError(where, Problem.RESERVED_KEY,
                                     f"'{key}' is set by the glidein submit generator and cannot be overridden",
                                     fix)


def _path_value(path: Path, key: str) -> str:
    return refuse_macros(str(path), key=key)


def _string_value(value: str, key: str) -> str:
    return refuse_macros(classad_string(value, key=key), key=key)


def _transfer_entry(entry: str, index: int) -> str:
    key = f"transfer_input_files[{index}]"
    check_representable(entry, key=key)
    if "," in entry or any(c.isspace() for c in entry) or not entry:
        raise SubmitDescriptionError(key, Problem.UNREPRESENTABLE, "empty, or contains a comma or whitespace",
                                     "HTCondor splits this list on both: rename the file, or pack the inputs "
                                     "into one tarball")
    if not (entry.startswith("/") or re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", entry)):
        raise SubmitDescriptionError(key, Problem.INVALID, "neither an absolute path nor a URL",
                                     "give an absolute path (condor_submit and the bindings resolve relative "
                                     "ones differently) or a URL")
    _refuse_secret(key, entry)
    return refuse_macros(entry, key=key)


# ---------------------------------------------------------------------------
# Renderings

def render_sub_file(description: Mapping[str, str], queue: int = 1, *, comments: bool = True) -> str:
    """DESCRIPTION as a submit file a person can read and pass to condor_submit."""
    if isinstance(queue, bool) or not isinstance(queue, int) or queue < 1:
        raise SubmitDescriptionError("queue", Problem.INVALID, "not a positive number of glideins",
                                     "pass queue=N with N >= 1")
    check_description(description)
    lines = [f"# Glidein submit description generated by splitpilot {pilot.__version__}.",
             "# Submit it with: condor_submit FILE"]
    for key, value in description.items():
        note = KEY_NOTES.get(key) if comments else None
        if note:
            lines.append(f"# {note}")
        lines.append(f"{key} = {value}" if value else f"{key} =")
    lines.append(f"queue {queue}")
    return "\n".join(lines) + "\n"


def to_submit(description: Mapping[str, str]) -> htcondor2.Submit:
    """DESCRIPTION as an htcondor2.Submit; queue N of them with `schedd.submit(submit, count=N)`."""
    check_description(description)
    return htcondor2.Submit(dict(description))
