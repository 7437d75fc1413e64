"""The `splitpilot` command: version, help, demo, pipe dump, exit codes."""

from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
from conftest import sample_job_start

from pilot import __version__
from pilot.pipe import messages as m
from pilot.pipe.protocol import Connection, Role

BIN = pathlib.Path(sys.executable).parent / "splitpilot"


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN), *args], input=stdin, capture_output=True, timeout=120)


def test_console_script_is_installed():
    assert BIN.exists(), f"{BIN} missing: install the package (make venv)"


def test_version():
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.decode().strip() == f"splitpilot {__version__}"


def test_help_lists_every_command_and_exit_codes():
    result = run("--help")
    out = result.stdout.decode()
    assert result.returncode == 0
    for command in ("demo", "ca", "token", "broker", "job", "agent", "wrapper", "minicondor", "glidein",
                    "factory", "pipe"):
        assert command in out
    assert "exit codes" in out


def test_no_command_prints_help_to_stderr_and_fails():
    result = run()
    assert result.returncode == 2 and b"usage:" in result.stderr and result.stdout == b""


def test_unknown_option_is_usage_error():
    result = run("demo", "--no-such-option")
    assert result.returncode == 2 and b"unrecognized arguments" in result.stderr


def test_demo_runs_jobs_end_to_end():
    result = run("demo", "--protocol", "--jobs", "2", "--steps", "2")
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "between real processes" in out  # says what it runs
    assert "JOB_STATE_DONE" in out and "STOPPED" in out
    assert "ping p50" in out  # the summary table


def test_demo_bad_arguments():
    result = run("demo", "--protocol", "--jobs", "0")
    assert result.returncode == 2
    assert b"--jobs and --steps must be at least 1" in result.stderr
    result = run("demo", "--local", "--protocol")
    assert result.returncode == 2 and b"not allowed with" in result.stderr


def test_local_demo_runs_jobs_in_containers_end_to_end():
    """The README's `make demo`: broker, jobs, a real agent, outputs checked."""
    result = run("demo", "--local", "--jobs", "4")
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "all jobs DONE with the right outputs" in out
    assert out.count("ok (container: ") == 4 and "container: none" not in out  # each payload ran contained


@pytest.mark.condor
@pytest.mark.slow
def test_condor_demo_runs_every_job_through_glideins_in_apptainer():
    """The README's `make demo`: broker, mini-condor, factory, glideins, jobs in Apptainer, outputs checked,
    everything stopped and removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("the mini-condor needs root")
    result = subprocess.run([str(BIN), "demo", "--jobs", "6", "--glideins", "2"], capture_output=True, timeout=900)
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, out + err
    assert "all jobs DONE with the right outputs" in out
    # Every payload saw itself inside Apptainer (the image's runtime, not a fallback).
    assert out.count("ok (container: apptainer)") == 6, out
    assert "payload containers: apptainer x6" in out
    glideins = [line for line in out.splitlines() if line.startswith("glidein ") and "exit" in line]
    assert glideins and all("COMPLETED" in line and "exit 0" in line for line in glideins), out
    assert sum(int(line.split("agent ran ")[1].split()[0]) for line in glideins) == 6, out
    assert "runtime apptainer" in out
    assert "no process or mount left" in out
    assert "PRIVATE KEY" not in out + err
    state = out.split("(state in ", 1)[1].split(")", 1)[0]
    assert not os.path.exists(state), f"{state} left behind"


def test_pipe_dump_of_a_captured_stream(tmp_path):
    agent = Connection(Role.AGENT)
    stream = agent.send(m.make_hello("dump-me")) + agent.send(sample_job_start(job_id=77))
    capture = tmp_path / "agent.bin"
    capture.write_bytes(stream)
    result = run("pipe", "dump", "--from", "agent", str(capture))
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    assert "hello" in out and 'agent_id: "dump-me"' in out and "job_id: 77" in out
    assert b"2 frames" in result.stderr
    # Same from standard input.
    assert run("pipe", "dump", "--from", "agent", stdin=stream).stdout.decode() == out
    lines = run("pipe", "dump", "--from", "agent", "--json", str(capture)).stdout.decode().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["index"], r["kind"]) for r in records] == [(0, "hello"), (1, "job_start")]
    assert records[0]["message"]["agentId"] == "dump-me" and records[1]["offset"] == records[0]["bytes"] + 1
    assert records[1]["message"]["jobId"] == "77"   # 64-bit numbers as strings: protobuf's JSON mapping


def test_every_command_that_lists_or_shows_offers_json():
    """The issue: `--json` on every command that lists or shows; a new such command without it fails here."""
    shows = {"show", "status", "revoked", "sites", "pilots", "jobs", "batches", "dump", "remove"}
    leaves: dict[tuple[str, ...], set[str]] = {}
    for words, action in _every_action():
        leaves.setdefault(words, set()).update(action.option_strings)
    lacking = [" ".join(w) for w, flags in leaves.items() if w[-1] in shows and "--json" not in flags]
    assert lacking == [] and len([w for w in leaves if w[-1] in shows]) >= 12


def test_pipe_dump_refuses_garbage_and_missing_files(tmp_path):
    result = run("pipe", "dump", "--from", "wrapper", stdin=b"\x05hello")
    assert result.returncode == 1 and b"undecodable frame" in result.stderr
    result = run("pipe", "dump", "--from", "wrapper", str(tmp_path / "missing"))
    assert result.returncode == 2 and b"cannot read" in result.stderr
    result = run("pipe", "dump", "--from", "wrapper", "--max-frame-bytes", "0")
    assert result.returncode == 2 and b"--max-frame-bytes" in result.stderr


def test_python_dash_m_apps_is_the_same_command():
    result = subprocess.run([sys.executable, "-m", "apps", "--version"], capture_output=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parent.parent)})
    assert result.stdout.decode().strip() == f"splitpilot {__version__}"


def test_python_dash_m_pilot_is_the_node_command_and_offers_no_server_side():
    """What a glidein runs: the agent, the wrapper and the pipe's dump; asking it for the broker, the CA or
    the factory is a usage error, as these are not on a node."""
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parent.parent)}
    result = subprocess.run([sys.executable, "-m", "pilot", "--version"], capture_output=True, timeout=60, env=env)
    assert result.stdout.decode().strip() == f"splitpilot {__version__}"
    result = subprocess.run([sys.executable, "-m", "pilot", "--help"], capture_output=True, timeout=60, env=env)
    out = result.stdout.decode()
    assert result.returncode == 0 and "agent" in out and "wrapper" in out and "pipe" in out
    for command in ("broker", "token", "factory", "minicondor"):
        refused = subprocess.run([sys.executable, "-m", "pilot", command, "--help"], capture_output=True,
                                 timeout=60, env=env)
        assert refused.returncode == 2 and b"invalid choice" in refused.stderr, command


# ------------------------------------------------------------------ broken pipes and suggested commands

def run_into_closed_pipe(*args: str) -> subprocess.CompletedProcess:
    """ARGS with stdout a pipe whose reader is already gone (`splitpilot ... | head` after head left):
    every write to stdout fails with EPIPE, deterministically."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run([str(BIN), *args], stdout=writer, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(writer)


@pytest.mark.parametrize("args", [("minicondor", "status"), ("config", "show", "--for", "broker"),
                                  ("job", "submit", "--dry-run")])
def test_output_into_a_closed_pipe_ends_quietly_with_141(tmp_path, args):
    if args[0] == "minicondor":
        args = (*args, "--state-dir", str(tmp_path / "pool"))
    if args[:2] == ("job", "submit"):
        (tmp_path / "run.sh").write_text("#!/bin/sh\n")
        (tmp_path / "job.toml").write_text('[job]\nexecutable = "run.sh"\ncount = 3\n'
                                          '[job.requirements]\nwalltime = "1h"\n')
        args = (*args, str(tmp_path / "job.toml"))
    result = run_into_closed_pipe(*args)
    assert result.returncode == 141, result.stderr
    # No BrokenPipeError traceback, no "Exception ignored" at exit: only what the command says on stderr.
    assert b"Traceback" not in result.stderr and b"Exception ignored" not in result.stderr, result.stderr
    assert b"BrokenPipe" not in result.stderr
    if args[0] != "job":
        assert result.stderr == b"", result.stderr
    assert not (tmp_path / "pool").exists()  # status only looked


def test_help_into_a_closed_pipe_has_no_traceback():
    for args in (("--help",), ("job", "status", "--help"), ("broker", "serve", "--help")):
        result = run_into_closed_pipe(*args)
        assert result.returncode in (0, 141), result.stderr
        assert b"Traceback" not in result.stderr and b"Exception ignored" not in result.stderr, result.stderr


def test_a_pipe_of_the_command_s_own_still_fails_loudly():
    """A BrokenPipeError that is not about stdout (a child's pipe) is a real error: no quiet 141."""
    import argparse

    from pilot.cli import run as run_cli

    parser = argparse.ArgumentParser()

    def broken(_args):
        raise BrokenPipeError("a child's stdin")
    parser.set_defaults(handler=broken)
    with pytest.raises(BrokenPipeError):
        run_cli(parser, [])


#: Strings that say "splitpilot <word>" as prose, not as a command to run (each checked to still exist).
PROSE = ("splitpilot major version", "splitpilot token name", "splitpilot test root", "splitpilot readable",
         "splitpilot software area", "splitpilot mini-condor", "splitpilot node root", "splitpilot broker monitor")
SOURCES = ("apps", "broker", "pilot", "condor_plugin", "submit")
SUGGESTION = re.compile(r"splitpilot ([a-z][^`'\"();<\n]*)")


def suggested_commands() -> list[tuple[str, str]]:
    """(where, text after 'splitpilot ') of every string in the sources (docstrings excepted: they
    describe, they do not tell a user what to run) that names a splitpilot command."""
    root = pathlib.Path(__file__).resolve().parent.parent
    found = []
    for source in SOURCES:
        for path in sorted((root / source).rglob("*.py")):
            tree = ast.parse(path.read_text())
            docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                          if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                          and node.body and isinstance(node.body[0], ast.Expr)
                          and isinstance(node.body[0].value, ast.Constant)}
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in docstrings:
                    continue
                for match in SUGGESTION.finditer(node.value):
                    if any(match.group(0).startswith(p) for p in PROSE) or match.group(1).split()[0].endswith(":"):
                        continue  # prose, or "splitpilot isolate: ..." (the speaker of a message)
                    # A later word ending in ':' ends the command ("splitpilot factory run: stopped").
                    words = []
                    for word in match.group(1).split():
                        words.append(word.rstrip(":,."))
                        if word.endswith(":"):
                            break
                    found.append((f"{path.relative_to(root)}:{node.lineno}", " ".join(words)))
    return found


def check_suggestion(parser: argparse.ArgumentParser, text: str) -> str | None:
    """Why TEXT ("job status --watch ...") is not a command of PARSER's tree, or None if it is: every
    subcommand word exists, and every --option it names is an option of that (sub)command."""
    words = text.split()
    current = parser
    path = ["splitpilot"]
    while words:
        choices = next((a.choices for a in current._actions if isinstance(a, argparse._SubParsersAction)), None)
        if choices is None or words[0].startswith("-"):
            break
        if "|" in words[0]:   # alternatives ("token revoke|revoked"): each must be a command
            first, *rest = words
            return next((why for alternative in first.split("|")
                         if (why := check_suggestion(current, " ".join([alternative, *rest])))), None)
        if words[0] not in choices:
            return f"{' '.join(path)} has no command {words[0]!r} (it has: {', '.join(choices)})"
        path.append(words.pop(0))
        current = choices[path[-1]]
    options = {o: a for a in current._actions for o in a.option_strings}
    for word in words:
        for option in word.split("/") if word.startswith("--") else ():  # "--max-file-size/--max-job-size"
            action = options.get(option.split("=")[0])
            if action is None:
                return f"{' '.join(path)} has no option {option}"
            if action.nargs == argparse.REMAINDER:
                return None  # what follows is another command's options ("config show --for broker ...")
    return None


def test_every_suggested_command_exists():
    from apps.cli import build_parser

    parser = build_parser()
    suggestions = suggested_commands()
    assert len(suggestions) > 30  # the collector finds them (it would pass vacuously otherwise)
    assert any("job output" in text for _, text in suggestions)
    wrong = [f"{where}: splitpilot {text}: {why}" for where, text in suggestions
             if (why := check_suggestion(parser, text))]
    assert not wrong, "\n".join(wrong)
    # The check itself catches what the issue found.
    assert "no command 'list'" in check_suggestion(parser, "job list")
    assert "no option --all" in check_suggestion(parser, "job kill --all")
    assert "no command 'forget'" in check_suggestion(parser, "token revoke|forget")
    assert check_suggestion(parser, "admin site drain|enable|disable NAME --reason R") is None
    # Every prose phrase still occurs (a stale entry would hide a future wrong command).
    text = "\n".join(p.read_text() for s in SOURCES
                     for p in (pathlib.Path(__file__).resolve().parent.parent / s).rglob("*.py"))
    assert [p for p in PROSE if p not in text] == []


@pytest.mark.parametrize("state_dir, hint", [("/run/splitpilot-minicondor", 'splitpilot minicondor env)"'),
                                             ("/tmp/my pool", "splitpilot minicondor env --state-dir '/tmp/my pool')")])
def test_minicondor_status_hint_names_the_state_folder_it_was_started_in(capsys, state_dir, hint):
    """After `minicondor start --state-dir X`, the printed `env` hint must find the same pool."""
    from types import SimpleNamespace

    from condor_plugin.testing.cli import print_status
    from condor_plugin.testing.minicondor import PoolState

    status = SimpleNamespace(state=PoolState.READY, state_dir=pathlib.Path(state_dir), source="host", node_pid=1,
                             collector="127.0.0.1:9618", client_config="/x/condor_config", shared_dirs=[],
                             problem=None, daemons=[], slots=[])
    print_status(SimpleNamespace(status=lambda: status))
    out = capsys.readouterr().out
    assert hint in out, out


def _every_action():
    """(command words, action) for every option and positional of the whole `splitpilot` tree."""
    from apps.cli import build_parser

    def walk(parser, words):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, words + (name,))
            elif action.dest != "help" and not isinstance(action, argparse._VersionAction):
                yield words, action
    yield from walk(build_parser(), ())


def test_every_flag_and_argument_of_every_command_has_help_text():
    missing = [(" ".join(words), action.option_strings or action.dest) for words, action in _every_action()
               if not action.help or action.help == argparse.SUPPRESS]
    assert missing == []


# One long option meaning two different things: each pair here was looked at and is meant.
_TWO_MEANINGS = {"--dry-run": "agent: check a job file; glidein submit: print the description, submit nothing"}


def test_one_placeholder_per_concept_across_commands():
    """A flag spelled the same in two commands takes the same kind of value under the same placeholder
    (the issue met LIFETIME/DURATION, S/DURATION, RUNTIMES/LIST for one concept)."""
    seen: dict[str, dict[str, str]] = {}
    for words, action in _every_action():
        for flag in action.option_strings:
            if flag.startswith("--") and action.nargs != 0 and flag not in _TWO_MEANINGS:
                shown = action.metavar or (action.dest.upper() if action.choices is None else "{choices}")
                seen.setdefault(flag, {})[" ".join(words)] = str(shown)
    conflicting = {flag: uses for flag, uses in seen.items() if len(set(uses.values())) > 1}
    assert conflicting == {}
    durations = {flag for flag, uses in seen.items() if "DURATION" in uses.values()}
    seconds = {flag for flag, uses in seen.items() if set(uses.values()) & {"S", "SECS", "LIFETIME", "TIMEOUT"}}
    assert "--interval" in durations and seconds == set()
