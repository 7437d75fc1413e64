"""Starting the wrapper: become non-dumpable, claim the pipe, run one job, exit.

    python3 -m pilot.wrapper [--log-level debug|info|warning|error]

The agent passes its own --log-level on (nothing at the default, info). Log
lines go to stderr (the agent's job-N-A.wrapper.log), never to stdout: that
is the pipe.

Exit codes: 0 the conversation ended normally (the job's own outcome is in
the Result, not here), 2 the agent sent an unusable JobStart, 3 the pipe
protocol failed (the agent is told nothing more; it sees the error on its
side).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pilot import logconfig
from pilot.pipe.channel import PipeChannel, claim_stdio
from pilot.pipe.errors import ProtocolError
from pilot.pipe.protocol import Role
from pilot.prctl import make_non_dumpable


def main(argv: Sequence[str] | None = None) -> int:
    level = _parser().parse_args(sys.argv[1:] if argv is None else argv).log_level
    # Before the JobStart (the job token and its key) is read: other processes of this user, the
    # payload first, must not read this process's memory or environment (/proc/PID/mem, ptrace).
    make_non_dumpable()
    # fd 1 becomes frames-only before anything else can print.
    read_fd, write_fd = claim_stdio()
    logconfig.configure(level, stream=sys.stderr)   # fd 2; fd 1 now is a copy of it, the frames have their own fd
    from pilot.wrapper.run import Wrapper  # why: after the claim: imports may print warnings

    with PipeChannel(Role.WRAPPER, read_fd, write_fd) as channel:
        try:
            return Wrapper(channel).run()
        except ProtocolError as exc:
            logging.getLogger("splitpilot.wrapper").error(f"pipe protocol error ({exc.side}): {exc}")
            return 3


def _add_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--log-level", default="info", choices=logconfig.LEVELS,
                        help="log level of the wrapper's stderr (default %(default)s; the agent passes its own)")
    return parser


def _parser() -> argparse.ArgumentParser:
    return _add_options(argparse.ArgumentParser(prog="python3 -m pilot.wrapper", description=__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "wrapper", help="run one job (started by the agent only; speaks the pipe protocol on stdin/stdout)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_options(parser)
    parser.set_defaults(handler=lambda args: main(["--log-level", args.log_level]))
