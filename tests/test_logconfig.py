"""pilot.logconfig: one logging configuration per process, lines with a UTC time, a level and the old prefix word.

In-process checks of the helper; the processes that use it (agent, wrapper, guardian, factory, broker) are
checked where they run: test_pilot_e2e.py (an agent at DEBUG: no token in any log), test_wrapper.py (a wrapper
at DEBUG: nothing but frames on stdout), test_guardian.py, test_broker_cli.py.
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat

import pytest

from pilot import logconfig

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) (\w+): (.*)$")


@pytest.fixture(autouse=True)
def restore_root_logger():
    """Each test configures the root logger as a process would; put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if handler not in handlers:
            handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_a_line_has_a_utc_time_a_level_and_the_old_prefix_word():
    out = io.StringIO()
    logconfig.configure("info", stream=out)
    logging.getLogger("splitpilot.agent").info("leaving: idle for 300 s; ran 2 job(s)")
    logging.getLogger("splitpilot.guardian").warning("agent killed by SIGKILL")
    logging.getLogger("splitpilot.agent").debug("not at info")
    lines = out.getvalue().splitlines()
    assert [LINE.match(line).groups() for line in lines] == [
        ("INFO", "agent", "leaving: idle for 300 s; ran 2 job(s)"),
        ("WARNING", "guardian", "agent killed by SIGKILL")]
    assert "agent: leaving:" in lines[0] and "guardian: agent killed by SIGKILL" in lines[1]


def test_the_broker_keeps_its_lines_without_the_source_word():
    out = io.StringIO()
    logconfig.configure("info", stream=out, source=False)
    logging.getLogger("splitpilot.broker").info("store sqlite:///x")
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO store sqlite:///x$", out.getvalue()), out.getvalue()


def test_configuring_twice_leaves_one_handler_not_two_copies_of_each_line():
    first, second = io.StringIO(), io.StringIO()
    logconfig.configure("info", stream=first)
    logconfig.configure("debug", stream=second)
    logging.getLogger("splitpilot.wrapper").debug("once")
    assert first.getvalue() == "" and second.getvalue().count("once") == 1


def test_a_log_file_is_private_and_nothing_goes_to_the_stream(tmp_path, capsys):
    path = tmp_path / "agent.log"
    old = os.umask(0o022)
    try:
        logconfig.configure("info", log_file=str(path))
    finally:
        os.umask(old)
    logging.getLogger("splitpilot.agent").info("into the file")
    logging.getLogger().handlers[0].flush()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "agent: into the file" in path.read_text()
    captured = capsys.readouterr()
    assert "into the file" not in captured.err and "into the file" not in captured.out


def test_an_unknown_level_is_refused_naming_the_choices():
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    with pytest.raises(ValueError, match=r"log level 'loud' is not one of debug, info, warning, error"):
        logconfig.configure("loud", stream=io.StringIO())
    assert (list(root.handlers), root.level) == before      # nothing changed


@pytest.mark.parametrize("line,level", [
    ("submitted 2 glidein(s): cluster 7, batch b1 (inputs spooled)", "INFO"),
    ("warning: cluster 7 was submitted and its inputs sent, but the schedd ...", "WARNING"),
    ("could not retrieve the output of glidein(s) 7.0: ...", "WARNING"),
    ("cycle failed: schedd away", "ERROR"),
    ("ATTENTION: glidein 7.0 (batch b1) ended with exit 4: THE BROKER REFUSES THIS FACTORY'S AGENT TOKENS.", "ERROR"),
])
def test_progress_lines_are_logged_at_the_level_their_first_words_name(line, level):
    out = io.StringIO()
    logconfig.configure("info", stream=out)
    logconfig.progress_logger("splitpilot.factory")(line)
    assert LINE.match(out.getvalue().rstrip("\n")).groups() == (level, "factory", line)
