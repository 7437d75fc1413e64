"""Starting the wrapper: become non-dumpable, claim the pipe, run one job, exit.

Exit codes: 0 the conversation ended normally (the job's own outcome is in
the Result, not here), 2 the agent sent an unusable JobStart, 3 the pipe
protocol failed (the agent is told nothing more; it sees the error on its
side).
"""

from __future__ import annotations

import argparse
import sys

from pilot.pipe.channel import PipeChannel, claim_stdio
from pilot.pipe.errors import ProtocolError
from pilot.pipe.protocol import Role
from pilot.prctl import make_non_dumpable


def main() -> int:
    # Before the JobStart (the job token and its key) is read: other processes of this user, the
    # payload first, must not read this process's memory or environment (/proc/PID/mem, ptrace).
    make_non_dumpable()
    # fd 1 becomes frames-only before anything else can print.
    read_fd, write_fd = claim_stdio()
    from pilot.wrapper.run import Wrapper  # why: after the claim: imports may print warnings

    with PipeChannel(Role.WRAPPER, read_fd, write_fd) as channel:
        try:
            return Wrapper(channel).run()
        except ProtocolError as exc:
            print(f"splitpilot wrapper: pipe protocol error ({exc.side}): {exc}", file=sys.stderr)
            return 3


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "wrapper", help="run one job (started by the agent only; speaks the pipe protocol on stdin/stdout)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(handler=lambda _args: main())
