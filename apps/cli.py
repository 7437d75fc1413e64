"""The `splitpilot` command: one entry point, one subcommand per concern.

Each subcommand lives in the module of its concept and exposes
`register(subparsers)`, which adds its parser and sets `handler` to a
function taking the parsed arguments and returning an exit code. They are
found through the `splitpilot.commands` entry points (setup.cfg), not by
module names in this file: the layer a command lives in is its own, and this
root (the top layer) imports none of them by name. Nothing is configured at
import time: configuration files are read by the handlers.

Exit codes: 0 success, 1 the operation failed, 2 bad usage or input,
130 interrupted, 141 the reader of the output went away (`splitpilot ... |
head`: quietly, no traceback, as for any tool SIGPIPE ends).

gRPC's C core logs to stderr on its own (a failed TLS handshake, a refused
connection), around the command's own message: `main` turns that off before
anything imports grpc, unless GRPC_VERBOSITY is set (GRPC_VERBOSITY=ERROR,
INFO or DEBUG shows it again).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Callable, Sequence

from pilot import __version__
from pilot.cli import quiet_grpc, run

#: The entry point group every subcommand registers in.
GROUP = "splitpilot.commands"
#: The order `--help` lists the entry points in (others follow, by name).
HELP_ORDER: tuple[str, ...] = ("demo", "tokens", "broker", "admin", "agent", "wrapper", "minicondor", "condor",
                               "config", "pipe")

EPILOG = """\
exit codes: 0 success, 1 the operation failed, 2 bad usage or input, 130 interrupted,
141 the output's reader went away (as `splitpilot ... | head`: quietly, like any tool SIGPIPE ends).
Run 'splitpilot COMMAND --help' for the options of one command.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitpilot",
        description="A split, two-layer job pilot for HTCondor grid sites.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"splitpilot {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for register in commands():
        register(subparsers)
    return parser


def commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    """The `register` functions of the installed `splitpilot.commands` entry points, in HELP_ORDER."""
    found = importlib.metadata.entry_points(group=GROUP)
    if not found:
        sys.exit("splitpilot: no subcommands are registered (no splitpilot.commands entry points); "
                 "fix: install the package (make venv, or pip install -e .)")
    def rank(entry: importlib.metadata.EntryPoint) -> tuple[int, str]:
        return (HELP_ORDER.index(entry.name) if entry.name in HELP_ORDER else len(HELP_ORDER), entry.name)
    return [entry.load() for entry in sorted(found, key=rank)]


def main(argv: Sequence[str] | None = None) -> int:
    quiet_grpc()
    return run(build_parser(), argv)
