"""The node's command line: `python -m pilot agent|wrapper|pipe`, what a glidein or a container runs.

The full `splitpilot` command (broker, CA, jobs, HTCondor, demos) is `apps.cli`, which is not installed on
worker nodes; this one offers the node-side subcommands only, from the modules of their concepts, and the
dispatch both share (`run`).

Exit codes: 0 success, 1 the operation failed, 2 bad usage or input,
130 interrupted, 141 the reader of the output went away (`... | head`): as
for any tool a SIGPIPE ends, quietly, with no traceback.

gRPC's C core logs to stderr on its own (a failed TLS handshake, a refused
connection), around the command's own message: `main` turns that off before
anything imports grpc, unless GRPC_VERBOSITY is set (GRPC_VERBOSITY=ERROR,
INFO or DEBUG shows it again).
"""

from __future__ import annotations

import argparse
import os
import select
import sys
from collections.abc import Sequence

from pilot import __version__
from pilot.agent import cli as agent_cli
from pilot.errors import SplitpilotError
from pilot.pipe import dump
from pilot.wrapper import cli as wrapper_cli

EPILOG = """\
exit codes: 0 success, 1 the operation failed, 2 bad usage or input, 130 interrupted,
141 the output's reader went away (as `... | head`).
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
    try:
        try:
            args = parser.parse_args(argv)
        finally:
            sys.stdout.flush()  # --help into `| head`: its broken pipe is handled below, not at exit
        handler = getattr(args, "handler", None)
        if handler is None:
            parser.print_help(sys.stderr)
            return 2
        try:
            code = int(handler(args) or 0)
            sys.stdout.flush()  # here, not at exit: a reader gone shows now, where it is handled
            return code
        except SplitpilotError as exc:
            print(f"splitpilot: error: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            print("splitpilot: interrupted", file=sys.stderr)
            return 130
    except BrokenPipeError:
        if not _reader_gone():
            raise  # a pipe of the command's own (a child's), not its output: a real error
        return _quiet_after_broken_pipe()


#: Exit code when the output's reader went away: what a shell reports for a process SIGPIPE ended.
BROKEN_PIPE_EXIT = 128 + 13


def _reader_gone() -> bool:
    """Whether stdout or stderr is a pipe whose reader has closed it (poll reports POLLERR)."""
    poller = select.poll()
    fds = []
    for stream in (sys.stdout, sys.stderr):
        try:
            fds.append(stream.fileno())
        except (AttributeError, ValueError, OSError):
            continue
    for fd in fds:
        poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _fd, events in poller.poll(0))


def _quiet_after_broken_pipe() -> int:
    """`splitpilot ... | head`: stop quietly, as a tool SIGPIPE ends would (exit 141, nothing on stderr).

    Python ignores SIGPIPE, so the write failed with BrokenPipeError instead; what is left in stdout's
    buffer would fail again when the interpreter flushes it at exit ("Exception ignored ..."), so
    stdout (and stderr, if it went to the same reader) are pointed at /dev/null first."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for stream in (sys.stdout, sys.stderr):
            try:
                os.dup2(devnull, stream.fileno())
            except (AttributeError, ValueError, OSError):
                pass
    finally:
        os.close(devnull)
    return BROKEN_PIPE_EXIT


def main(argv: Sequence[str] | None = None) -> int:
    quiet_grpc()
    return run(build_parser(), argv)
