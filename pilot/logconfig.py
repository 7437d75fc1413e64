"""One `logging` configuration per process, set once at its entry point.

Every splitpilot process (agent and its guardian, wrapper, factory, broker)
calls `configure` first thing; modules only ever do
`logging.getLogger("splitpilot.<part>")`. A line reads

    2026-03-01 11:59:02,123 INFO agent: job 12.1 matched (...)

time in UTC (the glidein's own lines, the tokens' times and the broker's
answers are UTC too), the level, the logger's last name part (the word the
old `agent:`/`wrapper:`/`guardian:` lines began with, which docs and tests
look for), then the message. The broker keeps its lines without that word
(`source=False`): its loggers all say `broker`.

Logging goes to stderr (or a file), never stdout: the wrapper's stdout is
the pipe, and a command's stdout is its output.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

#: The levels a --log-level flag (or the wrapper's) accepts.
LEVELS = ("debug", "info", "warning", "error")
#: The format of a node or factory line; the broker's leaves out the source word.
FORMAT = "%(asctime)s %(levelname)s %(source)s: %(message)s"
BROKER_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class _Source(logging.Filter):
    """Adds `source`: the last part of the logger's name (splitpilot.agent -> agent)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.source = record.name.rpartition(".")[2]
        return True


def level_of(name: str | int) -> int:
    """The logging level NAME ('debug', 'INFO', ... or a number); ValueError naming the choices."""
    if isinstance(name, int):
        return name
    if name.lower() not in LEVELS:
        raise ValueError(f"log level {name!r} is not one of {', '.join(LEVELS)}")
    return logging.getLevelNamesMapping()[name.upper()]


def configure(level: str | int = "info", *, stream: TextIO | None = None, log_file: str | None = None,
              source: bool = True) -> None:
    """Send this process's log lines to STREAM (default: stderr at call time) or append them to LOG_FILE,
    at LEVEL and above. Replaces any earlier configuration of the root logger (a forked child that
    configures again, a test calling twice): one handler per process, never two copies of a line."""
    threshold = level_of(level)     # refused before anything changes
    handler: logging.Handler
    if log_file is not None:
        # Private from the first byte: a log holds no secret, but it names jobs, paths and the broker.
        os.close(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600))
        handler = logging.FileHandler(log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    formatter = logging.Formatter(FORMAT if source else BROKER_FORMAT)
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    handler.addFilter(_Source())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(threshold)


#: First words of a progress line that make it a WARNING or an ERROR (the factory's and package builder's).
_WARNING_WORDS = ("warning:", "could not")
_ERROR_WORDS = ("ATTENTION:", "cycle failed:", "FAILED:")


def progress_logger(name: str) -> Callable[[str], None]:
    """A `progress(line)` callback (the factory's, the package builder's) that logs LINE to logger NAME, at
    the level its first words name: `ATTENTION:`, `cycle failed:` ERROR; `warning:`, `could not` WARNING;
    else INFO. The line's text is kept as it is (docs and tests look for it)."""
    logger = logging.getLogger(name)

    def progress(line: str) -> None:
        level = (logging.ERROR if line.startswith(_ERROR_WORDS) else
                 logging.WARNING if line.startswith(_WARNING_WORDS) else logging.INFO)
        logger.log(level, line)
    return progress
