"""The node's command line: `python -m pilot agent|wrapper|pipe`, what a glidein or a container runs.

The full `splitpilot` command (broker, CA, jobs, HTCondor, demos) is `apps.cli`, which is not installed on
worker nodes; this one offers the node-side subcommands only, from the modules of their concepts, and the
dispatch both share (`run`).

Exit codes: 0 success, 1 the operation failed, 2 bad usage or input,
130 interrupted.

gRPC's C core logs to stderr on its own (a failed TLS handshake, a refused
connection), around the command's own message: `main` turns that off before
anything imports grpc, unless GRPC_VERBOSITY is set (GRPC_VERBOSITY=ERROR,
INFO or DEBUG shows it again).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pilot import __version__
from pilot.agent import cli as agent_cli
from pilot.errors import SplitpilotError
from pilot.pipe import dump
from pilot.wrapper import cli as wrapper_cli

EPILOG = """\
exit codes: 0 success, 1 the operation failed, 2 bad usage or input, 130 interrupted.
Run 'python -m pilot COMMAND --help' for the options of one command.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pilot",
        description="The node side of splitpilot: the job agent, the job wrapper, the pipe's dump.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"splitpilot {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for module in (agent_cli, wrapper_cli, dump):
        module.register(subparsers)
    return parser


def quiet_grpc() -> None:
    """No gRPC log lines on stderr unless asked for: read by grpc when it is first imported, so this runs
    before the subcommand modules are."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ARGV with PARSER and run the chosen subcommand's handler; errors become exit codes."""
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(handler(args) or 0)
    except SplitpilotError as exc:
        print(f"splitpilot: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("splitpilot: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    quiet_grpc()
    return run(build_parser(), argv)
