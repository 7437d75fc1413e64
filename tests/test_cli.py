"""The `splitpilot` command: version, help, demo, pipe dump, exit codes."""

from __future__ import annotations

import os
import pathlib
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
