"""The `splitpilot` command: one entry point, one subcommand per concern.

Each subcommand lives in the module of its concept and exposes
`register(subparsers)`, which adds its parser and sets `handler` to a
function taking the parsed arguments and returning an exit code. Nothing is
configured at import time: configuration files are read by the handlers.

Exit codes: 0 success, 1 the operation failed, 2 bad usage or input,
130 interrupted.

gRPC's C core logs to stderr on its own (a failed TLS handshake, a refused
connection), around the command's own message: `main` turns that off before
anything imports grpc, unless GRPC_VERBOSITY is set (GRPC_VERBOSITY=ERROR,
INFO or DEBUG shows it again).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from pilot import __version__
from pilot.errors import SplitpilotError

#: Modules that contribute subcommands, in the order `--help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "pilot.demo",
    "broker.tokens_cli",
    "broker.cli",
    "pilot.agent.cli",
    "pilot.wrapper.cli",
    "condor_plugin.minicondor_cli",
    "condor_plugin.factory_cli",
    "pilot.pipe.dump",
)

EPILOG = """\
exit codes: 0 success, 1 the operation failed, 2 bad usage or input, 130 interrupted.
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
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def quiet_grpc() -> None:
    """No gRPC log lines on stderr unless asked for: read by grpc when it is first imported, so this runs
    before the subcommand modules are."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def main(argv: Sequence[str] | None = None) -> int:
    quiet_grpc()
    parser = build_parser()
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
