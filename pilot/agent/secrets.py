"""The agent's own token: taken in once, kept in memory, never passed on.

The glidein hands the agent token over in one of three ways: a file the
agent removes after reading it, the agent's stdin, or the glidein script's
own embedding (which writes it to such a file). Afterwards the token exists
only in this process's memory; variables that could carry it are removed
from the environment before any child starts, and the process is marked
non-dumpable so that other processes of the same user cannot read its
memory (/proc/PID/mem, ptrace) or its environment (/proc/PID/environ).
"""

from __future__ import annotations

import os
import stat
import sys

from pilot.errors import UsageError
from pilot.prctl import make_non_dumpable

__all__ = ["SECRET_VARIABLES", "make_non_dumpable", "read_token", "scrub_environment"]

#: Environment variables removed before any child starts: whatever a site's
#: glidein wrapper may have used to carry credentials.
SECRET_VARIABLES = ("SPLITPILOT_AGENT_TOKEN", "SPLITPILOT_AGENT_TOKEN_FILE", "X509_USER_PROXY",
                    "BEARER_TOKEN", "BEARER_TOKEN_FILE", "_CONDOR_CREDS")

_MAX_TOKEN_BYTES = 1 << 20


def scrub_environment() -> list[str]:
    """Remove credential-carrying variables from os.environ; return their names."""
    removed = [name for name in SECRET_VARIABLES if name in os.environ]
    for name in removed:
        del os.environ[name]
    return removed


def read_token(source: str) -> bytes:
    """Read the agent token from SOURCE: '-' for stdin, else a file that is
    removed after reading (the glidein's copy must not linger on disk)."""
    if source == "-":
        data = sys.stdin.buffer.read(_MAX_TOKEN_BYTES + 1)
        where = "standard input"
    else:
        try:
            fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            raise UsageError(f"cannot read the agent token {source}: {exc.strerror}; fix: pass the file the "
                             "glidein wrote, or '-' to read it from standard input") from None
        try:
            mode = os.fstat(fd).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise UsageError(f"agent token {source} is readable by others (mode {stat.S_IMODE(mode):04o}); "
                                 "fix: the glidein must write it 0600")
            data = os.read(fd, _MAX_TOKEN_BYTES + 1)
        finally:
            os.close(fd)
        os.unlink(source)
        where = source
    if len(data) > _MAX_TOKEN_BYTES:
        raise UsageError(f"agent token from {where} is larger than 1 MiB: not a token")
    if b"CERTIFICATE" not in data or b"PRIVATE KEY" not in data:
        raise UsageError(f"agent token from {where} holds no certificate and key; fix: issue one with "
                         "`splitpilot token issue --role agent`")
    return data
