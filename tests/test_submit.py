"""The glidein submit generator (submit/): quoting, the description, its two renderings.

Pure tests check every quoting rule against reference parsers (one of them a
port of HTCondor's own macro scanner), every rendering path and every error.
Tests marked `condor` use the real HTCondor of a mini-condor pool (one per
module, stopped at the end; see test_minicondor.py): condor_submit in the
node, the bindings from the host, jobs that echo their arguments and
environment back byte for byte, the grid universe through -dry-run, and the
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
import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
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
from submit.quoting import (
    _escape_dollar_runs,
    check_line_value,
    classad_string,
    escape_macros,
    expand_macros,
    expand_submit_macros,
    parse_arguments,
    parse_classad_string,
    parse_environment,
    quote_arguments,
    quote_environment,
)

# Split so that no key-shaped literal stands in the repository.
PEM = "-----BEGIN EC " "PRIVATE KEY-----\nMHcCAQEEIA\n-----END EC " "PRIVATE KEY-----\n"
JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJnbGlkZWluIn0.c2lnbmF0dXJl"

#: Arguments and environment values that exercise every quoting rule at once.
TRICKY = [
    "plain", "two words", "it's", '"double"', "'single'", "''", '""', "", "tab\there", "$HOME", "${X}", "$1",
    "a$b", "$", "$$", "$$$", "$(Cluster)", "$(x:default)", "$$(Memory)", "$$([1+2])", "$ENV(HOME)", "$INT(3)",
    "$$$(x)", "$$ENV(PATH)", "back\\slash\\", "#comment", "key=value", "--flag", "-", "日本語 ✓", "\x0bvt\x0c",
    "(paren)", "$((1+2))", "a'b\"c'd", "  lead and trail  ",
]


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
# Quoting: arguments and environment in the new syntax

@pytest.mark.parametrize(("value", "expected"), [
    # The examples of condor_submit(1).
    ('"3 simple arguments"', ["3", "simple", "arguments"]),
    ("\"one 'two with spaces' 3\"", ["one", "two with spaces", "3"]),
    ("\"one \"\"two\"\" 'spacey ''quoted'' argument'\"", ["one", '"two"', "spacey 'quoted' argument"]),
    # Outside a quoted section '' is an empty section, not a quote.
    ("\"it''s\"", ["its"]),
    ("\"'it''s'\"", ["it's"]),
    ("\"''\"", [""]),
    ('""', []),
    ('  "a\tb"  ', ["a", "b"]),
])
def test_reference_parser_follows_the_documented_examples(value, expected):
    assert parse_arguments(value) == expected


def test_reference_environment_parser_follows_the_documented_example():
    value = "\"one=1 two=\"\"2\"\" three='spacey ''quoted'' value'\""
    assert parse_environment(value) == {"one": "1", "two": '"2"', "three": "spacey 'quoted' value"}


@pytest.mark.parametrize("value", ['"unterminated', '"a" b', "no quotes", "\"'unbalanced\""])
def test_reference_parser_rejects_what_htcondor_rejects(value):
    with pytest.raises(ValueError):
        parse_arguments(value)


@pytest.mark.parametrize(("arguments", "quoted"), [
    (["a", "b"], '"a b"'),
    (["two words"], "\"'two words'\""),
    (["it's"], "\"'it''s'\""),
    (['say "hi"'], "\"'say \"\"hi\"\"'\""),
    (['"q"'], '"""q"""'),
    ([""], "\"''\""),
    ([], '""'),
    (["tab\tx"], "\"'tab\tx'\""),
    (["$HOME", "a=b", "#c"], '"$HOME a=b #c"'),
])
def test_quote_arguments(arguments, quoted):
    assert quote_arguments(arguments) == quoted
    assert parse_arguments(quoted) == arguments


def test_quote_environment():
    quoted = quote_environment({"A": "1", "B": "two words", "C": "", "D": "it's", "E": '"q"'})
    assert quoted == "\"A=1 B='two words' C= D='it''s' E=\"\"q\"\"\""
    assert parse_environment(quoted) == {"A": "1", "B": "two words", "C": "", "D": "it's", "E": '"q"'}


def test_quote_arguments_takes_a_list_not_a_string():
    with pytest.raises(TypeError):
        quote_arguments("--site X")


@pytest.mark.parametrize(("char", "name"), [("\n", "newline"), ("\r", "carriage return"), ("\0", "NUL")])
def test_unrepresentable_characters_are_refused_with_the_key(char, name):
    with refused(Problem.UNREPRESENTABLE, "arguments[1]", name, "fix:", "file"):
        quote_arguments(["ok", f"bad{char}value"])
    with refused(Problem.UNREPRESENTABLE, "environment[X]", name):
        quote_environment({"X": f"a{char}b"})
    with refused(Problem.UNREPRESENTABLE, "site", name):
        classad_string(f"a{char}b", key="site")


@pytest.mark.parametrize("name", ["1X", "A-B", "A B", "", "A=B", "é"])
def test_environment_names_must_be_portable(name):
    with refused(Problem.INVALID, "environment", "name"):
        quote_environment({name: "x"})


# Texts from an alphabet heavy in everything that means something to some reader.
_SPECIAL = ["$", "$$", "(", ")", "'", '"', " ", "\t", "\\", "DOLLAR", "DOLLARDOLLAR", "ENV(", "INT(", "Fn(",
            "[1+2]", ":", "#", "=", "é", "\x0b", "\x01", "x", "Memory)"]
_chars = st.characters(blacklist_characters="\0\n\r", blacklist_categories=("Cs",))
texts = st.lists(st.one_of(st.sampled_from(_SPECIAL), _chars), max_size=12).map("".join)


def _may_refuse(text: str) -> bool:
    """Only `$` groups may make a representable text unrepresentable."""
    return "$" in text


@settings(max_examples=1500, deadline=None)
@given(st.lists(texts, max_size=6))
def test_arguments_round_trip_through_the_reference_parsers(arguments):
    try:
        value = escape_macros(quote_arguments(arguments), key="arguments")
    except SubmitDescriptionError as error:
        assert error.problem is Problem.UNREPRESENTABLE and any(_may_refuse(a) for a in arguments)
        return
    check_line_value(value, key="arguments")
    assert parse_arguments(expand_macros(value)) == arguments


@settings(max_examples=1000, deadline=None)
@given(st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True), texts, max_size=5))
def test_environment_round_trips_through_the_reference_parsers(environment):
    try:
        value = escape_macros(quote_environment(environment), key="environment")
    except SubmitDescriptionError as error:
        assert error.problem is Problem.UNREPRESENTABLE and any(_may_refuse(v) for v in environment.values())
        return
    assert parse_environment(expand_macros(value)) == environment


@settings(max_examples=1000, deadline=None)
@given(texts)
def test_classad_strings_round_trip_without_match_time_escapes(text):
    try:
        literal = escape_macros(classad_string(text, key="site"), key="site", match_time=False)
    except SubmitDescriptionError as error:
        assert error.problem is Problem.UNREPRESENTABLE
        assert "$" in text or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)
        return
    assert "$$(" not in expand_macros(literal, match_time=False)
    assert parse_classad_string(expand_macros(literal, match_time=False)) == text


def test_tricky_values_are_all_representable():
    for arguments in [[value] for value in TRICKY] + [TRICKY, TRICKY[::-1]]:
        quoted = escape_macros(quote_arguments(arguments), key="a")
        assert parse_arguments(expand_macros(quoted)) == arguments


# ---------------------------------------------------------------------------
# Quoting: macros

@pytest.mark.parametrize(("text", "escaped"), [
    ("$HOME ${X} $1 a$b $ $$ a$$b", "$HOME ${X} $1 a$b $ $$ a$$b"),   # no macro can start: left alone
    ("$(Cluster)", "$(DOLLAR)(Cluster)"),
    ("$ENV(HOME)", "$(DOLLAR)ENV(HOME)"),
    ("$$(Memory)", "$$(DOLLARDOLLAR)(Memory)"),
    ("$$$(x)", "$$(DOLLARDOLLAR)$(DOLLAR)(x)"),
    ("$$$$(x)", "$$(DOLLARDOLLAR)$$(DOLLARDOLLAR)(x)"),
    ("$$ENV(PATH)", "$$(DOLLARDOLLAR)ENV(PATH)"),
    ("$(DOLLAR", "$(DOLLAR)(DOLLAR"),
])
def test_escape_macros(text, escaped):
    assert escape_macros(text, key="k") == escaped
    assert expand_macros(escaped) == text


@pytest.mark.parametrize(("text", "words"), [
    ("$(DOLLAR)", ["$(DOLLAR)"]),
    ("a $(dollar) b", ["$(DOLLAR)"]),
    ("$INT($(x)", ["cannot give this exact text back", "file"]),   # $INT( made by the first pass hides the next
    ("$Fn(a$(b)", ["cannot give this exact text back"]),
])
def test_escape_macros_refuses_what_htcondor_cannot_give_back(text, words):
    with refused(Problem.UNREPRESENTABLE, "k", *words):
        escape_macros(text, key="k")


def test_match_time_escape_only_where_the_job_sees_the_value():
    assert escape_macros("$$(x)", key="k", match_time=True) == "$$(DOLLARDOLLAR)(x)"
    with refused(Problem.UNREPRESENTABLE, "site", "match time", "$$("):
        escape_macros("$$(x)", key="site", match_time=False)
    assert escape_macros("$(x) $$y", key="site", match_time=False) == "$(DOLLAR)(x) $$y"


@pytest.mark.parametrize(("raw", "expanded"), [
    # What condor_submit 23.9 -dry-run gave for these values (checked against the
    # real thing by test_macro_port_agrees_with_condor_submit below).
    ("$(DOLLAR)(DOLLAR)", "$"),                     # the $(DOLLAR) pass rescans what it produced
    ("$(DOLLAR)(DOLLAR:x)", "$(DOLLAR:x)"),
    ("$(dollar)(x)", "$(x)"),                        # case-insensitive
    ("$(DOLLAR)ENV(HOME)$(DOLLAR)(x)", "$ENV(HOME)$(x)"),
    ("$(DOLLAR)INT($(DOLLAR)(x)", "$INT($(DOLLAR)(x)"),  # the made $INT( hides the next $(DOLLAR)
    ("$(DOLLAR)$(DOLLAR)", "$$(DOLLAR)"),           # then a match-time macro
    ("$$(DOLLARDOLLAR)$(DOLLAR)(x)", "$$(DOLLARDOLLAR)$(x)"),
    ("${X} $ $( $1(", "${X} $ $( $1("),
])
def test_macro_port_matches_observed_condor_submit(raw, expanded):
    import htcondor2

    assert expand_submit_macros(raw) == expanded
    assert htcondor2.Submit({"executable": "/bin/true", "probe": raw}).expand("probe") == expanded


_probe_parts = ["$", "$$", "(", ")", "x", " ", "DOLLAR", "dollar", "DOLLARDOLLAR", "INT(", "ENV(", "F(", "Fn(",
                "SUBSTR(", ":", ",", "[", "]", ".", "\\", "_", "'", '"']
_probe_text = st.lists(st.sampled_from(_probe_parts), max_size=12).map("".join)


@settings(max_examples=1500, deadline=None)
@given(_probe_text)
def test_macro_port_agrees_with_the_bindings(text):
    """The port of HTCondor's macro scanner against the bindings' own expansion (htcondor2.Submit.expand,
    the library behind to_submit), on raw texts and on what the escaping makes of them."""
    import htcondor2

    for raw in (text, _escape_dollar_runs(text, key="probe", match_time=True)):
        probe = f"<{raw}>"   # the bindings drop empty values and trim whitespace
        try:
            expected = expand_submit_macros(probe)
        except ValueError:
            continue   # holds a real macro: the bindings would evaluate it
        assert htcondor2.Submit({"executable": "/bin/true", "probe": probe}).expand("probe") == expected


def test_macro_port_refuses_real_macros():
    for raw in ("$(Cluster)", "$ENV(HOME)", "$Fn(x)", "$INT(3)", "a$(b:c)"):
        with pytest.raises(ValueError):
            expand_submit_macros(raw)
    with pytest.raises(ValueError):
        expand_macros("$$(Memory)")
    assert expand_macros("$$(DOLLARDOLLAR)(DOLLARDOLLAR)") == "$$(DOLLARDOLLAR)"   # no rescan at match time


# ---------------------------------------------------------------------------
# Quoting: ClassAd strings and submit lines

def test_classad_string_escapes_backslash_and_double_quote():
    assert classad_string('a "b" \\c', key="k") == '"a \\"b\\" \\\\c"'
    assert parse_classad_string(classad_string('a "b" \\c', key="k")) == 'a "b" \\c'
    with refused(Problem.UNREPRESENTABLE, "k", "control character"):
        classad_string("a\tb", key="k")


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
    ({"arguments": "--site X"}, "arguments", Problem.INVALID),
])
def test_request_validation_names_the_setting(changes, key, problem):
    with pytest.raises(UsageError) as info:
        request(**changes)
    message = str(info.value)
    assert key in message and ("fix:" in message or "write e.g." in message), message
    if problem is not None:
        assert info.value.problem is problem and info.value.key == key


def test_request_normalises_and_is_immutable():
    r = request(arguments=["a"], environment={"A": "1"}, lifetime="2h", grace=60,
                transfer_input_files=[Path("/srv/f/token.enc")])
    assert r.arguments == ("a",) and r.seconds("lifetime") == 7200 and r.seconds("grace") == 60
    assert r.transfer_input_files == ("/srv/f/token.enc",) and r.universe == "vanilla"
    with pytest.raises(TypeError):
        r.environment["B"] = "2"
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
arguments = "--broker broker.example.org:7443 'two words' 'it''s' ""q"" $(DOLLAR)(x) $HOME"
environment = "SPLITPILOT_SITE='SITE A' EMPTY="
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
+Flag = true
accounting_group = group_pilots.site_a
queue 10
"""


def golden_request(**changes) -> GlideinRequest:
    return request(
        arguments=["--broker", "broker.example.org:7443", "two words", "it's", '"q"', "$(x)", "$HOME"],
        environment={"SPLITPILOT_SITE": "SITE A", "EMPTY": ""},
        transfer_input_files=["/srv/f/agent-token.enc", "https://example.org/pilot.tar.gz"],
        cpus=2, memory_mb=4000, disk_mb=20000, lifetime="12h", grace="10m", max_idle="6h", max_held="1h",
        attributes={"ProjectName": 'glidein "tests"', "Priority": 5, "Flag": True},
        extra={"accounting_group": "group_pilots.site_a"}, **changes)


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
    ("arguments", "GlideinRequest.arguments"),
    ("args", "GlideinRequest.arguments"),
    ("environment", "GlideinRequest.environment"),
    ("env", "GlideinRequest.environment"),
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


def test_reserved_attributes_are_refused_in_attributes_too():
    with refused(Problem.RESERVED_KEY, "attributes[SplitpilotSite]"):
        build_description(request(attributes={"SplitpilotSite": "x"}))
    with refused(Problem.INVALID, "attributes"):
        build_description(request(attributes={"Bad-Name": "x"}))
    with refused(Problem.INVALID, "attributes[X]"):
        build_description(request(attributes={"X": [1]}))
    with refused(Problem.UNREPRESENTABLE, "attributes[X]"):
        build_description(request(attributes={"X": float("nan")}))


def test_unknown_extra_keys_pass_through():
    extra = {"requirements": "(TARGET.HasSingularity =?= true)", "+AccountingGroup": '"group_a"',
             "My.SiteSpecific": "3", "request_gpus": "1", "accounting_group_user": "pilot", "rank": "Memory"}
    d = build_description(request(extra=extra))
    for key, value in extra.items():
        assert d[key] == value


def test_a_key_set_twice_is_refused():
    with refused(Problem.INVALID, "extra[my.foo]", "twice"):
        build_description(request(attributes={"Foo": 1}, extra={"my.foo": "2"}))
    with refused(Problem.INVALID, "twice"):
        build_description(request(extra={"Requirements": "true", "requirements": "false"}))


@pytest.mark.parametrize(("changes", "key"), [
    ({"environment": {"AGENT_TOKEN": PEM}}, "environment[AGENT_TOKEN]"),
    ({"environment": {"T": "x " + PEM.replace("\n", " ")}}, "environment[T]"),
    ({"environment": {"BEARER_TOKEN": JWT}}, "environment[BEARER_TOKEN]"),
    ({"arguments": ["--token", PEM]}, "arguments[1]"),
    ({"attributes": {"Token": PEM.strip()}}, "attributes[Token]"),
    ({"extra": {"+Token": f'"{JWT}"'}}, "extra[+Token]"),
    ({"transfer_input_files": [f"https://example.org/?t={JWT}"]}, "transfer_input_files[0]"),
])
def test_credentials_never_enter_the_description(changes, key):
    with refused(Problem.SECRET, key, "transfer input file", "0600") as info:
        build_description(request(**changes))
    assert "MHcCAQEEIA" not in str(info.value) and JWT not in str(info.value)   # the error never shows it


def test_a_token_file_name_is_fine():
    d = build_description(request(environment={"BEARER_TOKEN_FILE": "agent.token"},
                                  transfer_input_files=["/srv/f/agent.token"]))
    assert d["environment"] == '"BEARER_TOKEN_FILE=agent.token"'


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
    (1, 60, None, False, False),         # idle a minute
    (1, 1801, None, True, False),        # idle past max_idle: held
    (2, 3600, None, False, False),       # running within lifetime
    (2, 4201, None, False, True),        # running past lifetime + grace: removed
    (5, 600, 3, False, False),           # held by policy, recently
    (5, 901, 3, False, True),            # held by policy too long: removed
    (5, 901, 46, False, True),           # held by allowed_job_duration too long: removed
    (5, 99999, 1, False, False),         # held by a person: left alone
    (4, 99999, None, False, False),      # completed
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
        held = [ad.get("HoldReason") for ad in queued if ad.get("JobStatus") == 5]
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
    echo "env: $GLIDEIN_NOTE"
    cat payload.txt
    echo made > left-in-sandbox.txt
"""
PROJECTION = ["JobUniverse", "Owner", "ExitCode", "Iwd", "SplitpilotSite", "SplitpilotFactory", "SplitpilotVersion",
              "SplitpilotLifetime", "SplitpilotGrace", "SplitpilotMaxIdle", "SplitpilotMaxHeld", "AllowedJobDuration",
              "RequestCpus", "RequestMemory", "RequestDisk", "JobBatchName", "ProjectName", "PeriodicHold",
              "PeriodicRemove", "PeriodicHoldReason", "TransferOutput"]


def glidein_setup(pool: MiniCondor, name: str) -> tuple[Path, GlideinRequest]:
    folder = glidein_folder(pool, name)
    (folder / "payload.txt").write_text("input arrived\n")
    script = write_script(folder / "glidein_startup.sh", GLIDEIN_SCRIPT)
    return folder, node_request(folder, script, site='SITE-A "quoted"', arguments=["--mode", "two words"],
                                environment={"GLIDEIN_NOTE": "it's $HOME"},
                                transfer_input_files=[folder / "payload.txt"],
                                attributes={"ProjectName": "splitpilot-tests"})


def check_glideins(ads: list[classad2.ClassAd], folder: Path, r: GlideinRequest, pool: MiniCondor) -> None:
    for ad in ads:
        assert ad["ExitCode"] == 0 and ad["JobUniverse"] == 5 and ad["Owner"] == pool.settings.job_user
        assert ad["Iwd"] == str(folder / "log")
        assert ad["SplitpilotSite"] == 'SITE-A "quoted"' and ad["SplitpilotFactory"] == "test-factory"
        assert ad["SplitpilotVersion"] == pilot.__version__ and ad["JobBatchName"] == r.batch
        assert (ad["SplitpilotLifetime"], ad["SplitpilotGrace"], ad["AllowedJobDuration"]) == (3600, 300, 3900)
        assert (ad["SplitpilotMaxIdle"], ad["SplitpilotMaxHeld"]) == (r.seconds("max_idle"), r.seconds("max_held"))
        assert (ad["RequestCpus"], ad["RequestMemory"], ad["RequestDisk"]) == (1, 128, 100 * 1024)
        assert ad["ProjectName"] == "splitpilot-tests" and ad["TransferOutput"] == ""
        for attribute, expression in (("PeriodicHold", PERIODIC_HOLD), ("PeriodicRemove", PERIODIC_REMOVE),
                                      ("PeriodicHoldReason", PERIODIC_HOLD_REASON)):
            assert str(ad.lookup(attribute)) == str(classad2.ExprTree(expression))
        stem = folder / "log" / f"glidein.{ad['ClusterId']}.{ad['ProcId']}"
        assert Path(f"{stem}.out").read_text() == "args: --mode two words\nenv: it's $HOME\ninput arrived\n"
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


ECHO_SCRIPT = """
    #!/bin/sh
    # Every argument and the whole environment, NUL-terminated, byte for byte.
    out="$RT_OUT/$RT_ID"
    : > "$out.args"
    for a in "$@"; do printf '%s\\0' "$a" >> "$out.args"; done
    env -0 > "$out.env"
"""


def echo_round_trip(pool: MiniCondor, name: str, cases: list[tuple[list[str], dict[str, str]]]) -> int:
    """Submit one echo glidein per case (alternately condor_submit in the node and the bindings);
    compare what each job received with what was asked, byte for byte. Returns how many ran."""
    folder = glidein_folder(pool, name)
    script = write_script(folder / "echo.sh", ECHO_SCRIPT)
    batch = uuid.uuid4().hex
    ran = 0
    for index, (arguments, environment) in enumerate(cases):
        r = node_request(folder, script, batch=batch, arguments=arguments,
                         environment={**environment, "RT_OUT": str(folder), "RT_ID": str(index)})
        description = build_description(r)
        if index % 2:
            pool.schedd().submit(to_submit(description))
        else:
            sub = folder / f"echo{index}.sub"
            sub.write_text(render_sub_file(description))
            result = pool.run_in_node(["condor_submit", str(sub)], cwd="/")
            assert result.returncode == 0, result.stdout + result.stderr
        ran += 1
    finished(pool, batch, ran, ["ExitCode"])
    for index, (arguments, environment) in enumerate(cases):
        got_args = (folder / f"{index}.args").read_bytes()
        assert got_args == b"".join(a.encode() + b"\0" for a in arguments), (arguments, got_args)
        got_env = dict(entry.split(b"=", 1) for entry in (folder / f"{index}.env").read_bytes().split(b"\0")
                       if entry)
        for name_, value in environment.items():
            assert got_env.get(name_.encode()) == value.encode(), (name_, value, got_env.get(name_.encode()))
    return ran


@pytest.mark.condor
def test_quoting_round_trip_byte_exact(pool):
    cases = [(TRICKY, {}), ([], {f"V{i}": value for i, value in enumerate(TRICKY)}),
             (["$", "$$(x)", "$ENV(X)"], {"A": "'", "B": '"', "C": "$$$(x)", "D": " "}), ([""], {"E": ""})]
    assert echo_round_trip(pool, "tricky", cases) == len(cases)


def _representable(case: tuple[list[str], dict[str, str]]) -> bool:
    arguments, environment = case
    try:
        escape_macros(quote_arguments(arguments), key="a")
        escape_macros(quote_environment(environment), key="e")
    except SubmitDescriptionError:
        return False
    return True


_case = st.tuples(st.lists(texts, max_size=4),
                  st.dictionaries(st.from_regex(r"V[A-Z0-9_]{0,6}", fullmatch=True), texts, max_size=3))


@pytest.mark.condor
@settings(max_examples=3, derandomize=True, deadline=None, database=None,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
@given(st.lists(_case, min_size=8, max_size=8))
def test_quoting_round_trip_property_against_real_condor(pool, cases):
    cases = [case for case in cases if _representable(case)]
    assume(cases)
    echo_round_trip(pool, "property", cases)


# Raw values (no quotes, no backslashes: they go into ClassAd strings) for the macro port's differential test.
_PORT_PROBES = [
    "$(DOLLAR)(DOLLAR)", "$(DOLLAR)(DOLLAR:x)", "$(dollar)(x)", "$(DOLLAR)ENV(HOME)$(DOLLAR)(x)",
    "$(DOLLAR)INT($(DOLLAR)(x)", "$(DOLLAR)Fn(a$(DOLLAR)(b)", "$$(DOLLARDOLLAR)$(DOLLAR)(x)",
    "$(DOLLAR)(x:$(DOLLAR)(y))", "$(DOLLAR)ENV($(DOLLAR)(x)", "${X} $ $( $1( $$ $$$", "$(DOLLAR)$(DOLLAR)x",
    "$(DOLLAR)( DOLLAR)", "$(DOLLAR)(DOLLAR", "$(DOLLAR)SUBSTR(a,$(DOLLAR)(b)", "$(DOLLAR)F(x)$(DOLLAR)(DOLLAR)",
]
_DRY_RUN_PARTS = [part for part in _probe_parts if part not in ("\\", '"')]   # they go into ClassAd strings


@pytest.mark.condor
def test_macro_port_agrees_with_condor_submit(pool):
    """The port of HTCondor's macro scanner, against the node's condor_submit (another HTCondor
    version than the bindings'), on hand-picked awkward values and on what the escaping makes of
    pseudo-random ones (a fixed seed: the same probes every run)."""
    rng = random.Random(20261125)
    samples = ["".join(rng.choice(_DRY_RUN_PARTS) for _ in range(rng.randint(0, 10))) for _ in range(120)]
    probes = _PORT_PROBES + [_escape_dollar_runs(text, key="probe", match_time=True) for text in samples]
    probes = [p for p in dict.fromkeys(probes) if _submit_safe(p)]
    folder = glidein_folder(pool, "port")
    lines = ["executable = /bin/true"] + [f'MY.Probe{i} = "{p}"' for i, p in enumerate(probes)] + ["queue"]
    sub = folder / "probes.sub"
    sub.write_text("\n".join(lines) + "\n")
    result = pool.run_in_node(["condor_submit", "-dry-run", "-", str(sub)], cwd=str(folder))
    assert result.returncode == 0, result.stdout + result.stderr
    ad = dry_run_ad(result.stdout)
    for i, probe in enumerate(probes):
        assert ad[f"Probe{i}"] == expand_submit_macros(probe), probe


def _submit_safe(raw: str) -> bool:
    """RAW holds no macro the port cannot evaluate (condor_submit would evaluate it for real)."""
    try:
        expand_submit_macros(raw)
    except ValueError:
        return False
    return True


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
    r = node_request(folder, script, ce=ce, arguments=["--mode", "grid"], cpus=2, memory_mb=4000,
                     lifetime="12h", grace="10m")
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
    assert ad["Arguments"] == "--mode grid" and "AllowedJobDuration" not in ad
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
        if queued[0].get("JobStatus") == 5:
            hold_reasons.add(f"{queued[0].get('HoldReasonCode')}: {queued[0].get('HoldReason')}")
        time.sleep(1)
    else:
        pytest.fail(f"glidein {cluster} still queued after 300 s; holds seen: {hold_reasons}")
    gone = list(schedd.history(constraint=constraint, projection=["JobStatus", "RemoveReason", "NumJobStarts"],
                               match=1))
    assert gone and gone[0]["JobStatus"] == 3 and gone[0].get("NumJobStarts", 0) == 0
    assert "PeriodicRemove" in gone[0].get("RemoveReason", ""), gone[0]
    # Held for one evaluation interval before the removal: seen, and ours.
    assert hold_reasons
    for reason in hold_reasons:
        assert reason.startswith("3: splitpilot: glidein idle for more than 1 s"), reason
