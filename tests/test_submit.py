"""The glidein submit generator (submit/): quoting, the description, its two renderings.

Pure tests check the quoting rules against the bindings (classad2's parser,
htcondor2.Submit's macro expansion), every rendering path and every error.
Tests marked `condor` use the real HTCondor of a mini-condor pool (one per
module, stopped at the end; see test_minicondor.py): condor_submit in the
node, the bindings from the host, hostile ClassAd strings and `$` texts
through condor_submit -dry-run, the grid universe through -dry-run, and the
periodic policy on a glidein that can never start.
"""

from __future__ import annotations

import datetime
import os
import random
import string
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import classad2
import htcondor2
import pytest
from htcondor2 import JobStatus
from hypothesis import given, settings
from hypothesis import strategies as st
from test_minicondor import JOB_TIMEOUT, job_dir, new_base_dir, stop_and_clean, write_script

import pilot
from condor_plugin.testing.minicondor import MiniCondor, MiniCondorSettings
from pilot.errors import UsageError
from submit import (
    PERIODIC_HOLD,
    PERIODIC_HOLD_REASON,
    PERIODIC_REMOVE,
    CondorCE,
    GlideinRequest,
    Problem,
    SubmitDescriptionError,
    build_description,
    check_description,
    render_sub_file,
    to_submit,
)
from submit.quoting import check_line_value, classad_string, refuse_macros

# Split so that no key-shaped literal stands in the repository.
PEM = "-----BEGIN EC " "PRIVATE KEY-----\nMHcCAQEEIA\n-----END EC " "PRIVATE KEY-----\n"
JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJnbGlkZWluIn0.c2lnbmF0dXJl"

#: Texts a macro could start in: refused wherever the generator writes a value.
MACROS = ["$(Cluster)", "$(x:default)", "$$(Memory)", "$$([1+2])", "$ENV(HOME)", "$INT(3)", "$$$(x)",
          "$$ENV(PATH)", "$Fn(x)", "$((1+2))", "a$(DOLLAR)b", "$_x(", "$1("]
#: Texts with `$` (and quotes, backslashes, non-ASCII) that every reader takes literally.
LITERAL = ["$HOME", "${X}", "$1", "a$b", "$", "$$", "$$$", "a $ (b)", 'say "hi"', '"', '""', "it's", "#comment",
           "key=value", '" || true || "', "~!@#%^&*()_+{}|:<>?`-=[];',./"]
#: Texts the job queue (old ClassAd syntax) and the queries (new syntax) would read differently.
QUEUE_DIFFERS = ["back\\slash", "ends\\", '\\"', "日本語", "ü", "\u00a0", "\u200b"]


def request(tmp: Path = Path("/srv/f"), **changes) -> GlideinRequest:
    settings_ = dict(executable=tmp / "glidein_startup.sh", log_dir=tmp / "log", site="SITE-A", factory="f1",
                     batch="b-0001")
    settings_.update(changes)
    return GlideinRequest(**settings_)


def refused(problem: Problem, *words: str):
    """A context asserting a SubmitDescriptionError of PROBLEM whose message holds WORDS."""
    class Check:
        def __enter__(self):
            self.raises = pytest.raises(SubmitDescriptionError)
            self.info = self.raises.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.raises.__exit__(*exc)
            error = self.info.value
            assert error.problem is problem, error
            assert isinstance(error, UsageError) and error.exit_code == 2
            for word in words:
                assert word in str(error), (word, str(error))
            return handled
    return Check()


# ---------------------------------------------------------------------------
# Quoting: ClassAd strings (classad2.quote), macros, submit lines

@pytest.mark.parametrize(("char", "name"), [("\n", "newline"), ("\r", "carriage return"), ("\0", "NUL")])
def test_unrepresentable_characters_are_refused_with_the_key(char, name):
    with refused(Problem.UNREPRESENTABLE, "site", name, "fix:", "file"):
        classad_string(f"a{char}b", key="site")
    with refused(Problem.UNREPRESENTABLE, "log_dir", name):
        refuse_macros(f"/srv/a{char}b", key="log_dir")
    with refused(Problem.UNREPRESENTABLE, "extra[requirements]", name):
        build_description(request(extra={"requirements": f"true{char}queue 1000"}))


def test_classad_string_escapes_double_quotes_and_refuses_what_the_queue_reads_differently():
    assert classad_string('a "b" c', key="k") == '"a \\"b\\" c"'
    assert classad2.unquote(classad_string('a "b" c', key="k")) == 'a "b" c'
    # classad2.quote would write these as escapes; nothing downstream expects them: refused.
    for control in ("a\tb", "\x01", "\x7f", "\x1b[31m"):
        with refused(Problem.UNREPRESENTABLE, "k", "control character"):
            classad_string(control, key="k")
    # classad2.quote escapes them for the new syntax; the job queue would store the escapes: refused.
    for text in QUEUE_DIFFERS:
        with refused(Problem.UNREPRESENTABLE, "k", "backslash or a non-ASCII", "fix:", "printable ASCII"):
            classad_string(text, key="k")
        with refused(Problem.UNREPRESENTABLE, "site"):
            request(site=f"SITE-{text}")


def test_classad_string_cannot_break_out_of_the_literal():
    """A hostile site name that tries to close the string and add an expression stays one string."""
    hostile = '" || true || "x" && (Owner = "root'
    literal = classad_string(hostile, key="site")
    ad = classad2.ClassAd(f"[Site = {literal}; Other = 1]")
    assert ad["Site"] == hostile and ad["Other"] == 1 and len(ad) == 2
    assert classad2.ExprTree(f"Site == {literal}").eval(ad) is True


@pytest.mark.parametrize("text", MACROS)
def test_macros_are_refused_where_the_generator_writes(text):
    with refused(Problem.UNREPRESENTABLE, "site", "macro", "fix:"):
        refuse_macros(text, key="site")
    with refused(Problem.UNREPRESENTABLE, "site", "macro"):
        request(site=f"SITE-{text}")
    with refused(Problem.UNREPRESENTABLE, "log_dir", "macro"):
        build_description(request(log_dir=f"/srv/f/{text.replace(' ', '')}/log"))


@pytest.mark.parametrize("text", LITERAL)
def test_literal_dollars_pass_through_the_bindings_unchanged(text):
    literal = classad_string(text, key="site")
    assert refuse_macros(literal, key="site") == literal
    submit = htcondor2.Submit({"executable": "/bin/true", "MY.Probe": literal})
    assert classad2.unquote(submit.expand("MY.Probe")) == text


# Texts from an alphabet heavy in what means something to some reader.
_SPECIAL = ["$", "$$", "(", ")", "'", '"', " ", "\t", "\\", "DOLLAR", "DOLLARDOLLAR", "ENV(", "INT(", "Fn(",
            "[1+2]", ":", "#", "=", "é", "日本", "\x0b", "\x01", "x", "Memory)"]
_chars = st.characters(blacklist_characters="\0\n\r", blacklist_categories=("Cs",))
texts = st.lists(st.one_of(st.sampled_from(_SPECIAL), _chars), max_size=12).map("".join)


@settings(max_examples=1000, deadline=None)
@given(texts)
def test_classad_strings_are_refused_or_read_back_exactly_by_the_bindings(text):
    """What classad_string and refuse_macros let through, the bindings' submit language and ClassAd parser
    give back exactly; what they refuse holds a control character or could start a macro."""
    try:
        literal = refuse_macros(classad_string(text, key="site"), key="site")
    except SubmitDescriptionError as error:
        assert error.problem is Problem.UNREPRESENTABLE
        assert "$" in text or "\\" in text or any(not 0x20 <= ord(c) <= 0x7E for c in text)
        return
    expanded = htcondor2.Submit({"executable": "/bin/true", "MY.Probe": literal}).expand("MY.Probe")
    assert expanded == literal
    assert classad2.ClassAd(f"[Probe = {literal}]")["Probe"] == text
    # `\"` is the only escape: the old ClassAd syntax of the job queue reads the literal the same way.
    assert literal == '"' + text.replace('"', '\\"') + '"'


@pytest.mark.parametrize(("value", "words"), [
    ("a\nb", ["newline"]),
    (" padded", ["whitespace"]),
    ("padded\t", ["whitespace"]),
    ("ends\\", ["backslash"]),
    ("@=end", ["@="]),
])
def test_check_line_value(value, words):
    with refused(Problem.UNREPRESENTABLE, "requirements", *words):
        check_line_value(value, key="requirements")


# ---------------------------------------------------------------------------
# The request

@pytest.mark.parametrize(("changes", "key", "problem"), [
    ({"executable": "glidein.sh"}, "executable", Problem.INVALID),
    ({"log_dir": "log"}, "log_dir", Problem.INVALID),
    ({"executable": "/a b/glidein.sh"}, "executable", Problem.UNREPRESENTABLE),
    ({"executable": "/a,b/glidein.sh"}, "executable", Problem.UNREPRESENTABLE),
    ({"site": ""}, "site", Problem.INVALID),
    ({"site": "a\nb"}, "site", Problem.UNREPRESENTABLE),
    ({"batch": "has space"}, "batch", Problem.INVALID),
    ({"cpus": 0}, "cpus", Problem.INVALID),
    ({"memory_mb": True}, "memory_mb", Problem.INVALID),
    ({"lifetime": "soon"}, "lifetime", None),
    ({"grace": 0}, "grace", Problem.INVALID),
    ({"max_idle": datetime.timedelta(seconds=1.5)}, "max_idle", Problem.INVALID),
    ({"site": "SITE$(Owner)"}, "site", Problem.UNREPRESENTABLE),
    ({"factory": "f\x1b[2J"}, "factory", Problem.UNREPRESENTABLE),
])
def test_request_validation_names_the_setting(changes, key, problem):
    with pytest.raises(UsageError) as info:
        request(**changes)
    message = str(info.value)
    assert key in message and ("fix:" in message or "write e.g." in message), message
    if problem is not None:
        assert info.value.problem is problem and info.value.key == key


def test_request_normalises_and_is_immutable():
    r = request(extra={"accounting_group": "group_a"}, lifetime="2h", grace=60,
                transfer_input_files=[Path("/srv/f/token.enc")])
    assert r.seconds("lifetime") == 7200 and r.seconds("grace") == 60
    assert r.transfer_input_files == ("/srv/f/token.enc",) and r.universe == "vanilla"
    with pytest.raises(TypeError):
        r.extra["B"] = "2"
    with pytest.raises(AttributeError):
        r.cpus = 3
    assert r.replace(cpus=4).cpus == 4 and r.cpus == 1


@pytest.mark.parametrize(("ce", "key"), [
    (dict(host="https://ce.example.org"), "ce.host"),
    (dict(host="ce.example.org:9619"), "ce.host"),
    (dict(host="ce.example.org", port=0), "ce.port"),
    (dict(host="ce.example.org", scitokens_file="token"), "ce.scitokens_file"),
])
def test_ce_validation(ce, key):
    with pytest.raises(SubmitDescriptionError) as info:
        CondorCE(**ce)
    assert info.value.key == key


# ---------------------------------------------------------------------------
# The description and its renderings

GOLDEN_VANILLA = f"""\
# Glidein submit description generated by splitpilot {pilot.__version__}.
# Submit it with: condor_submit FILE
# Generated by splitpilot: change the settings (GlideinRequest), not this file.
universe = vanilla
# The glidein startup script; the agent token travels as a transfer input or inside it, never in this file.
executable = /srv/f/glidein_startup.sh
request_cpus = 2
request_memory = 4000MB
request_disk = 20000MB
should_transfer_files = YES
when_to_transfer_output = ON_EXIT
transfer_input_files = /srv/f/agent-token.enc,https://example.org/pilot.tar.gz
# Nothing comes back but output and error: results go through the broker.
transfer_output_files = ""
initialdir = /srv/f/log
output = /srv/f/log/glidein.$(Cluster).$(Process).out
error = /srv/f/log/glidein.$(Cluster).$(Process).err
log = /srv/f/log/glidein.$(Cluster).$(Process).log
batch_name = b-0001
+SplitpilotSite = "SITE-A"
+SplitpilotFactory = "f1"
+SplitpilotBatch = "b-0001"
+SplitpilotVersion = "{pilot.__version__}"
# Bounds in seconds, read by the expressions below (condor_qedit one job to change them).
+SplitpilotLifetime = 43200
+SplitpilotGrace = 600
+SplitpilotMaxIdle = 21600
+SplitpilotMaxHeld = 3600
# Running past lifetime + grace: the shadow holds the glidein (HoldReasonCode 46).
allowed_job_duration = 43800
# After SIGTERM (preemption, removal), seconds before SIGKILL: the agent's stop deadline plus time to report its jobs.
job_max_vacate_time = 60
# Idle (queued, or evicted) for longer than SplitpilotMaxIdle: hold it, with a reason.
periodic_hold = {PERIODIC_HOLD}
periodic_hold_reason = {PERIODIC_HOLD_REASON}
# Running past lifetime + grace (hung), or held longer than SplitpilotMaxHeld (except holds by a person): remove it.
periodic_remove = {PERIODIC_REMOVE}
+ProjectName = "glidein \\"tests\\""
+Priority = 5
accounting_group = group_pilots.site_a
queue 10
"""


def golden_request(**changes) -> GlideinRequest:
    return request(
        transfer_input_files=["/srv/f/agent-token.enc", "https://example.org/pilot.tar.gz"],
        cpus=2, memory_mb=4000, disk_mb=20000, lifetime="12h", grace="10m", max_idle="6h", max_held="1h",
        extra={"+ProjectName": '"glidein \\"tests\\""', "+Priority": "5",
               "accounting_group": "group_pilots.site_a"}, **changes)


def test_vanilla_sub_file_golden():
    assert render_sub_file(build_description(golden_request()), queue=10) == GOLDEN_VANILLA


def test_grid_description_for_an_htcondor_ce():
    ce = CondorCE("ce.example.org", scitokens_file=Path("/srv/f/ce.scitoken"))
    d = build_description(golden_request(ce=ce))
    assert d["universe"] == "grid"
    assert d["grid_resource"] == "condor ce.example.org ce.example.org:9619"
    assert d["use_scitokens"] == "true" and d["scitokens_file"] == "/srv/f/ce.scitoken"
    assert d["+maxWallTime"] == "730" and d["+xcount"] == "2" and d["+maxMemory"] == "4000"
    assert "allowed_job_duration" not in d   # no local shadow: periodic_remove is the bound
    assert d["periodic_remove"] == PERIODIC_REMOVE
    assert list(d)[:4] == ["universe", "grid_resource", "use_scitokens", "scitokens_file"]
    assert "scitokens_file" not in build_description(golden_request(ce=CondorCE("ce.example.org", port=9620)))
    assert build_description(golden_request(ce=CondorCE("ce.example.org", port=9620)))["grid_resource"] == \
        "condor ce.example.org ce.example.org:9620"


def test_vacate_time_covers_the_agents_stop_deadline():
    """HTCondor waits job_max_vacate_time after SIGTERM before SIGKILL: the agent must get its jobs' stop
    deadline plus time to report them, or the broker learns of the preempted jobs only from the reaper."""
    from pilot.agent.jobrun import RunSettings
    from submit.description import AGENT_STOP_DEADLINE_S

    assert AGENT_STOP_DEADLINE_S == RunSettings().stop_deadline_s
    for ce in (None, CondorCE("ce.example.org")):
        d = build_description(request(ce=ce))
        assert int(d["job_max_vacate_time"]) >= RunSettings().stop_deadline_s + 10
        assert "\njob_max_vacate_time = 60\n" in render_sub_file(d)
        assert to_submit(d)["job_max_vacate_time"] == "60"
    assert build_description(request(max_vacate="2m"))["job_max_vacate_time"] == "120"
    with refused(Problem.INVALID, "max_vacate", "stop deadline"):
        request(max_vacate=30)
    with refused(Problem.RESERVED_KEY, "extra[job_max_vacate_time]", "GlideinRequest.max_vacate"):
        build_description(request(extra={"job_max_vacate_time": "5"}))


def test_token_file_travels_encrypted():
    files = ["/srv/f/batch/splitpilot-package.tar.gz", "/srv/f/batch/agent-token.pem"]
    d = build_description(request(transfer_input_files=files, encrypt_input_files=files[1:]))
    # The submit path, and the name wherever it is sent from: a spooled job's inputs leave from the
    # schedd's SPOOL/.../agent-token.pem, which HTCondor matches against these entries (full paths).
    expected = f"{files[1]},*/agent-token.pem"
    assert d["encrypt_input_files"] == expected
    text = render_sub_file(d)
    assert f"\nencrypt_input_files = {expected}\n" in text and "transferred encrypted" in text
    assert to_submit(d)["encrypt_input_files"] == expected
    with refused(Problem.INVALID, "encrypt_input_files", "not one of transfer_input_files"):
        request(transfer_input_files=files[:1], encrypt_input_files=files[1:])
    for key in ("encrypt_input_files", "dont_encrypt_input_files"):
        with refused(Problem.RESERVED_KEY, f"extra[{key}]", "GlideinRequest.encrypt_input_files"):
            build_description(request(extra={key: files[1]}))


def test_minimal_description_has_no_empty_lines():
    d = build_description(request())
    assert "arguments" not in d and "environment" not in d and "transfer_input_files" not in d
    assert not any(key.startswith("+") and not key.startswith("+Splitpilot") for key in d)
    text = render_sub_file(d, comments=False)
    assert not any(line.startswith("#") for line in text.splitlines()[2:])
    assert text.endswith("\nqueue 1\n")


def test_to_submit_has_the_same_lines():
    d = build_description(golden_request())
    submit = to_submit(d)
    for key, value in d.items():
        bindings_key = f"MY.{key[1:]}" if key.startswith("+") else key
        assert submit[bindings_key] == value


@pytest.mark.parametrize("queue", [0, -1, True, 1.5])
def test_render_refuses_a_bad_queue_count(queue):
    with refused(Problem.INVALID, "queue"):
        render_sub_file(build_description(request()), queue=queue)


def test_renderers_check_a_description_edited_after_building():
    d = build_description(request())
    for bad, problem in (({"requirements": "a\nb"}, Problem.UNREPRESENTABLE), ({"bad key": "x"}, Problem.INVALID),
                         ({"rank": 3}, Problem.INVALID), ({"+Key": PEM.strip()}, Problem.SECRET)):
        edited = {**d, **bad}
        for render in (render_sub_file, to_submit, check_description):
            with refused(problem):
                render(edited)


# ---------------------------------------------------------------------------
# Reserved keys and secrets

@pytest.mark.parametrize(("key", "fix"), [
    ("executable", "GlideinRequest.executable"),
    ("Universe", "GlideinRequest.ce"),
    ("grid_resource", "GlideinRequest.ce"),
    ("arguments", "GlideinSettings"),
    ("args", "GlideinSettings"),
    ("environment", "GlideinSettings"),
    ("env", "GlideinSettings"),
    ("+Environment", "GlideinSettings"),
    ("getenv", "credentials"),
    ("request_memory", "GlideinRequest.memory_mb"),
    ("REQUEST_CPUS", "GlideinRequest.cpus"),
    ("periodic_remove", "GlideinRequest.lifetime"),
    ("periodic_hold", "max_idle"),
    ("allowed_job_duration", "lifetime"),
    ("transfer_input_files", "GlideinRequest.transfer_input_files"),
    ("output", "GlideinRequest.log_dir"),
    ("initialdir", "GlideinRequest.log_dir"),
    ("queue", "queue=N"),
    ("+SplitpilotSite", "Splitpilot"),
    ("My.SplitpilotAnything", "Splitpilot"),
    ("+splitpilotlifetime", "Splitpilot"),
    ("+RequestMemory", "GlideinRequest.memory_mb"),
    ("MY.Cmd", "GlideinRequest.executable"),
    ("+maxWallTime", "lifetime"),
])
def test_reserved_keys_are_refused_with_the_proper_way(key, fix):
    with refused(Problem.RESERVED_KEY, f"extra[{key}]", f"'{key}'", "cannot be overridden", "fix:", fix):
        build_description(request(extra={key: "x"}))


def test_extra_lines_must_be_submit_keys_and_text():
    with refused(Problem.INVALID, "extra['Bad-Name']", "not a submit key"):
        build_description(request(extra={"Bad-Name": "x"}))
    with refused(Problem.INVALID, "extra['+a b']", "not a submit key"):
        build_description(request(extra={"+a b": "x"}))
    with refused(Problem.INVALID, "extra[+X]", "not text"):
        build_description(request(extra={"+X": 1}))
    with refused(Problem.UNREPRESENTABLE, "extra[+X]", "backslash"):
        build_description(request(extra={"+X": "continued\\"}))


def test_unknown_extra_keys_pass_through():
    extra = {"requirements": "(TARGET.HasSingularity =?= true)", "+AccountingGroup": '"group_a"',
             "My.SiteSpecific": "3", "request_gpus": "1", "accounting_group_user": "pilot", "rank": "Memory"}
    d = build_description(request(extra=extra))
    for key, value in extra.items():
        assert d[key] == value


def test_a_key_set_twice_is_refused():
    with refused(Problem.INVALID, "extra[my.foo]", "twice"):
        build_description(request(extra={"+Foo": "1", "my.foo": "2"}))
    with refused(Problem.INVALID, "twice"):
        build_description(request(extra={"Requirements": "true", "requirements": "false"}))


@pytest.mark.parametrize(("changes", "key"), [
    ({"extra": {"+Token": f'"{JWT}"'}}, "extra[+Token]"),
    ({"extra": {"+Key": '"x ' + PEM.replace("\n", " ").strip() + '"'}}, "extra[+Key]"),
    ({"extra": {"+Key": PEM}}, "extra[+Key]"),       # the secret is named before the newlines are
    ({"extra": {"accounting_group_user": JWT}}, "extra[accounting_group_user]"),
    ({"transfer_input_files": [f"https://example.org/?t={JWT}"]}, "transfer_input_files[0]"),
])
def test_credentials_never_enter_the_description(changes, key):
    with refused(Problem.SECRET, key, "transfer input file", "0600") as info:
        build_description(request(**changes))
    assert "MHcCAQEEIA" not in str(info.value) and JWT not in str(info.value)   # the error never shows it


def test_a_token_file_name_is_fine():
    d = build_description(request(extra={"+TokenFile": '"agent.token"'}, transfer_input_files=["/srv/f/agent.token"]))
    assert d["+TokenFile"] == '"agent.token"' and d["transfer_input_files"] == "/srv/f/agent.token"


# ---------------------------------------------------------------------------
# The periodic policy, evaluated by the ClassAd library

def job_ad(status: int, in_status_for: int, hold_code: int | None = None) -> classad2.ClassAd:
    # The clock read now, not at import: the module may be collected minutes before this test runs.
    ad = classad2.ClassAd({"JobStatus": status, "EnteredCurrentStatus": int(time.time()) - in_status_for,
                           "SplitpilotLifetime": 3600, "SplitpilotGrace": 600, "SplitpilotMaxIdle": 1800,
                           "SplitpilotMaxHeld": 900})
    if hold_code is not None:
        ad["HoldReasonCode"] = hold_code
    return ad


@pytest.mark.parametrize(("status", "age", "hold_code", "hold", "remove"), [
    (JobStatus.IDLE, 60, None, False, False),          # idle a minute
    (JobStatus.IDLE, 1801, None, True, False),         # idle past max_idle: held
    (JobStatus.RUNNING, 3600, None, False, False),     # running within lifetime
    (JobStatus.RUNNING, 4201, None, False, True),      # running past lifetime + grace: removed
    (JobStatus.HELD, 600, 3, False, False),            # held by policy, recently
    (JobStatus.HELD, 901, 3, False, True),             # held by policy too long: removed
    (JobStatus.HELD, 901, 46, False, True),            # held by allowed_job_duration too long: removed
    (JobStatus.HELD, 99999, 1, False, False),          # held by a person: left alone
    (JobStatus.COMPLETED, 99999, None, False, False),  # completed
])
def test_periodic_expressions(status, age, hold_code, hold, remove):
    ad = job_ad(status, age, hold_code)
    assert classad2.ExprTree(PERIODIC_HOLD).eval(ad) is hold
    assert classad2.ExprTree(PERIODIC_REMOVE).eval(ad) is remove


def test_hold_reason_names_the_bounds():
    reason = classad2.ExprTree(PERIODIC_HOLD_REASON).eval(job_ad(1, 2000))
    assert reason == "splitpilot: glidein idle for more than 1800 s: no slot took it; it is removed after 900 s on hold"


# ---------------------------------------------------------------------------
# The real HTCondor of a mini-condor

@pytest.fixture(scope="module")
def pool() -> Iterator[MiniCondor]:
    if os.geteuid() != 0:
        pytest.skip("the mini-condor needs root (namespaces, mounts)")
    base = new_base_dir()
    pool = MiniCondor(MiniCondorSettings(state_dir=base / "state", shared_dirs=(base / "shared",)),
                      progress=lambda line: None)
    try:
        pool.start(die_with_caller=True)
        yield pool
    finally:
        stop_and_clean(pool, base)


def glidein_folder(pool: MiniCondor, name: str) -> Path:
    """A folder in the shared folder with a log/ below, both owned by the job user."""
    folder = job_dir(pool, name)
    (folder / "log").mkdir()
    owner = folder.stat()
    os.chown(folder / "log", owner.st_uid, owner.st_gid)
    return folder


def node_request(folder: Path, script: Path, **changes) -> GlideinRequest:
    settings_ = dict(executable=script, log_dir=folder / "log", site="SITE-A", factory="test-factory",
                     batch=uuid.uuid4().hex, memory_mb=128, disk_mb=100, lifetime="1h", grace="5m")
    settings_.update(changes)
    return GlideinRequest(**settings_)


def finished(pool: MiniCondor, batch: str, count: int, projection: list[str],
             timeout: float = JOB_TIMEOUT) -> list[classad2.ClassAd]:
    """The history ads of the COUNT glideins of BATCH once all left the queue; fails at once on a hold."""
    schedd = pool.schedd()
    constraint = f'SplitpilotBatch == "{batch}"'
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queued = schedd.query(constraint=constraint, projection=["JobStatus", "HoldReason"])
        held = [ad.get("HoldReason") for ad in queued if ad.get("JobStatus") == JobStatus.HELD]
        if held:
            pytest.fail(f"glidein held: {held}")
        if not queued:
            ads = list(schedd.history(constraint=constraint, projection=[*projection, "ProcId", "ClusterId"],
                                      match=count))
            if len(ads) == count:
                return sorted(ads, key=lambda ad: ad["ProcId"])
        time.sleep(0.5)
    pytest.fail(f"the glideins of batch {batch} did not finish within {timeout:.0f} s")


GLIDEIN_SCRIPT = """
    #!/bin/sh
    echo "args: $*"
    cat payload.txt
    echo made > left-in-sandbox.txt
"""
PROJECTION = ["JobUniverse", "Owner", "AcctGroup", "ExitCode", "Iwd", "SplitpilotSite", "SplitpilotFactory",
              "SplitpilotVersion",
              "SplitpilotLifetime", "SplitpilotGrace", "SplitpilotMaxIdle", "SplitpilotMaxHeld", "AllowedJobDuration",
              "RequestCpus", "RequestMemory", "RequestDisk", "JobBatchName", "ProjectName", "PeriodicHold",
              "PeriodicRemove", "PeriodicHoldReason", "TransferOutput"]


def glidein_setup(pool: MiniCondor, name: str) -> tuple[Path, GlideinRequest]:
    folder = glidein_folder(pool, name)
    (folder / "payload.txt").write_text("input arrived\n")
    script = write_script(folder / "glidein_startup.sh", GLIDEIN_SCRIPT)
    return folder, node_request(folder, script, site=HOSTILE_SITE, transfer_input_files=[folder / "payload.txt"],
                                extra={"+ProjectName": '"splitpilot-tests"', "accounting_group": "group_pilots"})


#: A site name with double quotes (the one escape a ClassAd string in a submit line has), an attempt to
#: close the string, and literal dollars.
HOSTILE_SITE = 'SITE-A "quoted" $HOME ${X} $$ && true || "'



def check_glideins(ads: list[classad2.ClassAd], folder: Path, r: GlideinRequest, pool: MiniCondor) -> None:
    for ad in ads:
        assert ad["ExitCode"] == 0 and ad["JobUniverse"] == 5 and ad["Owner"] == pool.settings.job_user
        assert ad["Iwd"] == str(folder / "log")
        assert ad["SplitpilotSite"] == HOSTILE_SITE and ad["SplitpilotFactory"] == "test-factory"
        assert ad["SplitpilotVersion"] == pilot.__version__ and ad["JobBatchName"] == r.batch
        assert (ad["SplitpilotLifetime"], ad["SplitpilotGrace"], ad["AllowedJobDuration"]) == (3600, 300, 3900)
        assert (ad["SplitpilotMaxIdle"], ad["SplitpilotMaxHeld"]) == (r.seconds("max_idle"), r.seconds("max_held"))
        assert (ad["RequestCpus"], ad["RequestMemory"], ad["RequestDisk"]) == (1, 128, 100 * 1024)
        assert ad["ProjectName"] == "splitpilot-tests" and ad["TransferOutput"] == ""
        assert ad["AcctGroup"] == "group_pilots"
        for attribute, expression in (("PeriodicHold", PERIODIC_HOLD), ("PeriodicRemove", PERIODIC_REMOVE),
                                      ("PeriodicHoldReason", PERIODIC_HOLD_REASON)):
            assert str(ad.lookup(attribute)) == str(classad2.ExprTree(expression))
        stem = folder / "log" / f"glidein.{ad['ClusterId']}.{ad['ProcId']}"
        assert Path(f"{stem}.out").read_text() == "args: \ninput arrived\n"
        assert Path(f"{stem}.err").read_text() == ""
        assert "Job terminated" in Path(f"{stem}.log").read_text()
    # transfer_output_files = "": nothing came back but output and error.
    assert not list(folder.rglob("left-in-sandbox.txt"))


@pytest.mark.condor
def test_sub_file_accepted_by_condor_submit_in_the_node(pool):
    folder, r = glidein_setup(pool, "subfile")
    sub = folder / "glidein.sub"
    sub.write_text(render_sub_file(build_description(r), queue=2))
    # From / as working directory: nothing may depend on where condor_submit runs.
    result = pool.run_in_node(["condor_submit", str(sub)], user=pool.settings.job_user, cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 job(s) submitted" in result.stdout
    check_glideins(finished(pool, r.batch, 2, PROJECTION), folder, r, pool)


@pytest.mark.condor
def test_to_submit_with_the_bindings_from_the_host(pool):
    folder, r = glidein_setup(pool, "bindings")
    result = pool.schedd().submit(to_submit(build_description(r)), count=2)
    assert result.num_procs() == 2
    ads = finished(pool, r.batch, 2, PROJECTION)
    assert {ad["ClusterId"] for ad in ads} == {result.cluster()}
    check_glideins(ads, folder, r, pool)


@pytest.mark.condor
def test_classad_strings_and_dollars_through_the_real_queue(pool):
    """What classad_string and refuse_macros let through is stored in the job queue exactly, from the
    node's condor_submit (HTCondor 23.9) and from the bindings (another version), and the factory's
    constraint (new ClassAd syntax) finds it: hand-picked hostile texts and pseudo-random ones (a fixed
    seed: the same probes every run). The jobs are submitted on hold and removed."""
    rng = random.Random(20261125)
    alphabet = [part for part in _SPECIAL if part.isascii() and part.isprintable()] + ["x"]
    samples = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10))) for _ in range(120)]
    probes = []
    for text in dict.fromkeys([*LITERAL, HOSTILE_SITE, *samples]):
        try:
            probes.append((text, refuse_macros(classad_string(text, key="p"), key="p")))
        except SubmitDescriptionError:
            pass
    assert len(probes) > 60
    folder = glidein_folder(pool, "probes")
    lines = {"executable": "/bin/true", "hold": "true", "+ProbeRun": classad_string(folder.name, key="run"),
             **{f"+Probe{i}": literal for i, (_, literal) in enumerate(probes)}}
    sub = folder / "probes.sub"
    sub.write_text("".join(f"{key} = {value}\n" for key, value in lines.items()) + "queue\n")
    result = pool.run_in_node(["condor_submit", str(sub)], user=pool.settings.job_user, cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr
    pool.schedd().submit(htcondor2.Submit(lines))
    schedd = pool.schedd()
    try:
        ads = schedd.query(constraint=f"ProbeRun == {lines['+ProbeRun']}",
                           projection=[f"Probe{i}" for i in range(len(probes))])
        assert len(ads) == 2
        for ad in ads:
            for i, (text, _) in enumerate(probes):
                assert ad[f"Probe{i}"] == text, text
        for i, (text, literal) in enumerate(probes[:20]):     # the factory's way of selecting its glideins
            found = schedd.query(constraint=f"ProbeRun == {lines['+ProbeRun']} && Probe{i} == {literal}",
                                 projection=["ClusterId"])
            assert len(found) == 2, text
    finally:
        schedd.act(htcondor2.JobAction.Remove, f"ProbeRun == {lines['+ProbeRun']}")


def dry_run_ad(output: str) -> classad2.ClassAd:
    """The job ad condor_submit -dry-run printed (one `Name=value` line per attribute)."""
    lines = [line for line in output.splitlines()
             if line[:1] in string.ascii_letters and "=" in line and " " not in line.split("=", 1)[0]]
    return classad2.ClassAd("[\n" + ";\n".join(lines) + "\n]")


@pytest.mark.condor
def test_grid_universe_accepted_by_condor_submit_dry_run(pool):
    folder = glidein_folder(pool, "grid")
    script = write_script(folder / "glidein_startup.sh", GLIDEIN_SCRIPT)
    ce = CondorCE("ce.example.org", scitokens_file=folder / "ce.scitoken")
    r = node_request(folder, script, ce=ce, cpus=2, memory_mb=4000, lifetime="12h", grace="10m")
    sub = folder / "grid.sub"
    sub.write_text(render_sub_file(build_description(r), queue=3))
    result = pool.run_in_node(["condor_submit", "-dry-run", "-", str(sub)], cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr
    ad = dry_run_ad(result.stdout)
    assert ad["JobUniverse"] == 9
    assert ad["GridResource"] == "condor ce.example.org ce.example.org:9619"
    assert ad["ScitokensFile"] == str(folder / "ce.scitoken")
    assert (ad["maxWallTime"], ad["xcount"], ad["maxMemory"]) == (730, 2, 4000)
    assert ad["SplitpilotSite"] == "SITE-A" and ad["SplitpilotBatch"] == r.batch
    assert "AllowedJobDuration" not in ad
    assert str(ad.lookup("PeriodicRemove")) == str(classad2.ExprTree(PERIODIC_REMOVE))
    # A dry run queues nothing (there is no CE to run it).
    assert pool.schedd().query(constraint=f'SplitpilotBatch == "{r.batch}"', projection=["ClusterId"]) == []


@pytest.mark.condor
@pytest.mark.slow
def test_stuck_idle_glidein_is_held_then_removed(pool):
    """A glidein no slot can take: periodic_hold holds it with our reason, periodic_remove removes it.
    Takes up to two PERIODIC_EXPR_INTERVALs of the schedd (60 s each by default)."""
    folder = glidein_folder(pool, "stuck")
    script = write_script(folder / "glidein_startup.sh", "#!/bin/sh\ntrue\n")
    r = node_request(folder, script, memory_mb=10**6, max_idle=1, max_held=1)
    cluster = pool.schedd().submit(to_submit(build_description(r))).cluster()
    schedd = pool.schedd()
    constraint = f"ClusterId == {cluster}"
    deadline = time.monotonic() + 300
    hold_reasons: set[str] = set()
    while time.monotonic() < deadline:
        queued = schedd.query(constraint=constraint, projection=["JobStatus", "HoldReason", "HoldReasonCode"])
        if not queued:
            break
        if queued[0].get("JobStatus") == JobStatus.HELD:
            hold_reasons.add(f"{queued[0].get('HoldReasonCode')}: {queued[0].get('HoldReason')}")
        time.sleep(1)
    else:
        pytest.fail(f"glidein {cluster} still queued after 300 s; holds seen: {hold_reasons}")
    gone = list(schedd.history(constraint=constraint, projection=["JobStatus", "RemoveReason", "NumJobStarts"],
                               match=1))
    assert gone and gone[0]["JobStatus"] == JobStatus.REMOVED and gone[0].get("NumJobStarts", 0) == 0
    assert "PeriodicRemove" in gone[0].get("RemoveReason", ""), gone[0]
    # Held for one evaluation interval before the removal: seen, and ours.
    assert hold_reasons
    for reason in hold_reasons:
        assert reason.startswith("3: splitpilot: glidein idle for more than 1 s"), reason


# ---------------------------------------------------------------------------
# The factory's CLI: --ce, --scitoken, --submit-line

def factory_args(tmp_path: Path, *extra: str):
    import argparse

    from apps import factory_cli

    parser = argparse.ArgumentParser()
    factory_cli.register(parser.add_subparsers())
    return parser.parse_args(["glidein", "submit", "--site", "SITE-A", "--broker", "broker.example.org:7443",
                              "--ca", str(tmp_path / "no-ca"), "--work-dir", str(tmp_path / "work"), *extra])


def cli_description(tmp_path: Path, folder: Path, *extra: str) -> dict[str, str]:
    """The submit description `glidein submit EXTRA` would submit, with FOLDER's script, log and inputs."""
    from apps import factory_cli

    settings = factory_cli._settings(factory_args(tmp_path, *extra), None)
    request_ = settings.glidein_request(folder / "glidein_startup.sh", folder / "log", batch=uuid.uuid4().hex,
                                        inputs=(str(folder / "payload.txt"),))
    return build_description(request_)


def test_cli_ce_scitoken_and_submit_lines_reach_the_description(tmp_path):
    scitoken = tmp_path / "ce.scitoken"
    scitoken.write_text("not read here\n")
    d = cli_description(tmp_path, tmp_path, "--ce", "ce.example.org:9620", "--scitoken", str(scitoken),
                        "--submit-line", "accounting_group=group_pilots.site_a",
                        "--submit-line", '+ProjectName = "alice"', "--submit-line", "requirements=(OpSys == \"LINUX\")")
    assert d["universe"] == "grid" and d["grid_resource"] == "condor ce.example.org ce.example.org:9620"
    assert d["use_scitokens"] == "true" and d["scitokens_file"] == str(scitoken)
    assert d["accounting_group"] == "group_pilots.site_a" and d["+ProjectName"] == '"alice"'
    assert d["requirements"] == '(OpSys == "LINUX")'
    plain = cli_description(tmp_path, tmp_path)
    assert plain["universe"] == "vanilla" and "grid_resource" not in plain and "accounting_group" not in plain
    assert cli_description(tmp_path, tmp_path, "--ce", "ce.example.org")["grid_resource"].endswith(":9619")


@pytest.mark.parametrize(("extra", "words"), [
    (["--submit-line", "universe=vanilla"], ["extra[universe]", "cannot be overridden", "GlideinRequest.ce"]),
    (["--submit-line", "Executable=/bin/sh"], ["extra[Executable]", "cannot be overridden"]),
    (["--submit-line", '+SplitpilotSite="OTHER"'], ["extra[+SplitpilotSite]", "Splitpilot"]),
    (["--submit-line", "MY.Cmd=/bin/sh"], ["extra[MY.Cmd]", "cannot be overridden"]),
    (["--submit-line", "getenv=true"], ["extra[getenv]", "credentials"]),
    (["--submit-line", "environment=A=1"], ["extra[environment]", "GlideinSettings"]),
    (["--submit-line", "transfer_input_files=/etc/shadow"], ["extra[transfer_input_files]"]),
    (["--submit-line", "periodic_remove=false"], ["extra[periodic_remove]", "lifetime"]),
    (["--submit-line", f"accounting_group_user={JWT}"], ["extra[accounting_group_user]", "JSON Web Token"]),
    (["--submit-line", "requirements=true\\"], ["extra[requirements]", "backslash"]),
    (["--submit-line", "requirements"], ["not KEY=VALUE", "fix:"]),
    (["--submit-line", "=x"], ["not KEY=VALUE"]),
    (["--submit-line", "rank=1", "--submit-line", "RANK=2"], ["RANK is given twice"]),
    (["--scitoken", "/srv/ce.scitoken"], ["--scitoken is for an HTCondor-CE", "--ce"]),
    (["--ce", "https://ce.example.org"], ["--ce", "port is not a number"]),
    (["--ce", "ce example org"], ["ce.host", "not a host name"]),
    (["--ce", "ce.example.org:0"], ["ce.port"]),
    (["--ce", "ce.example.org", "--scitoken", "/nonexistent/ce.scitoken"], ["no such file"]),
])
def test_cli_refuses_hostile_submit_settings_before_minting_a_token(tmp_path, extra, words):
    """The operator's extra lines may not take over what the generator owns, carry a credential or break the
    file; the refusal comes before a token is minted, a CA read, or a batch folder written."""
    args = factory_args(tmp_path, *extra)
    with pytest.raises(UsageError) as info:
        args.handler(args)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    assert "fix:" in message and JWT not in message and info.value.exit_code == 2
    assert not (tmp_path / "work").exists()       # no batch folder, no token file


@pytest.mark.condor
def test_cli_ce_submission_accepted_by_condor_submit_dry_run(pool, tmp_path):
    """What `glidein submit --ce ... --scitoken ... --submit-line ...` builds, through the node's
    condor_submit -dry-run: the grid universe to the CE, its SciToken, the site's lines; nothing queued."""
    folder = glidein_folder(pool, "cli-grid")
    write_script(folder / "glidein_startup.sh", GLIDEIN_SCRIPT)
    (folder / "payload.txt").write_text("input\n")
    scitoken = folder / "ce.scitoken"
    scitoken.write_text("not a real token\n")
    d = cli_description(tmp_path, folder, "--ce", "ce.example.org:9620", "--scitoken", str(scitoken),
                        "--submit-line", "accounting_group=group_pilots", "--submit-line", '+ProjectName="alice"')
    sub = folder / "cli-grid.sub"
    sub.write_text(render_sub_file(d, queue=2))
    result = pool.run_in_node(["condor_submit", "-dry-run", "-", str(sub)], cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr
    ad = dry_run_ad(result.stdout)
    assert ad["JobUniverse"] == 9 and ad["GridResource"] == "condor ce.example.org ce.example.org:9620"
    assert ad["ScitokensFile"] == str(scitoken) and ad["AcctGroup"] == "group_pilots"
    assert ad["ProjectName"] == "alice" and ad["SplitpilotSite"] == "SITE-A"
    assert pool.schedd().query(constraint=f"SplitpilotBatch == {d['+SplitpilotBatch']}",
                               projection=["ClusterId"]) == []
