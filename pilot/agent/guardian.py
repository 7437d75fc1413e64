"""The agent's guardian: a parent that notices at once when the agent dies, and says so to the broker.

A payload can kill its agent (without a container it runs as the agent's
user). Its jobs would then wait for the broker's reaper, minutes later. So
`splitpilot agent` forks right after it has read its token and chosen its
pilot id, before gRPC is imported or any thread started (gRPC's threads do
not survive a fork): the child is the agent; the parent, the guardian,
holds the token in its non-dumpable memory and does nothing but:

- pass SIGTERM, SIGINT and SIGHUP on to the agent (HTCondor's preemption
  reaches the glidein's top process, which is now the guardian);
- wait for the agent; when it ends by a signal, or without having written
  its end marker (it writes one once its own end report is done), call the
  broker's ReportPilotEnd with abandoned=True and a reason naming how it
  died: the broker ends every attempt the pilot still holds at once;
- exit with the agent's exit code (1 when it was killed by a signal).

Without isolation (the process launcher) a payload of the same user can
kill the guardian too, first; the broker's reaper is then the fallback.
Under the namespace launcher or a container the payload cannot see either.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable

from pilot.agent import exitcodes

#: What the agent writes on the end pipe once its normal end (and end report) is done.
END_MARKER = b"end-reported\n"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

#: reason -> None: report the pilot abandoned to the broker (raises on failure).
ReportAbandoned = Callable[[str], None]


#: The guardian's lines (`guardian: ...`), through the logging the agent's process set up before forking.
log = logging.getLogger("splitpilot.guardian")


class AgentEnd:
    """The agent's side of the end pipe: `done()` once the agent's normal end is reported."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def done(self) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, END_MARKER)
        except OSError:
            pass  # the guardian is gone: nobody to tell
        finally:
            os.close(self.fd)
            self.fd = None


def fork_agent(pilot_id: str, report: ReportAbandoned) -> AgentEnd | int:
    """Fork. The child (the agent) gets its AgentEnd; the parent guards it and gets the exit code to end with.

    Must be called before any thread is started (gRPC's included): a fork
    copies only the calling thread.
    """
    if threading.active_count() != 1:
        raise RuntimeError(f"the guardian must fork before any thread starts ({threading.active_count()} running)")
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    # Held back over the fork: a SIGTERM arriving before the guardian's handlers are in place would
    # otherwise end the guardian and leave the agent running unwatched (it is delivered once unblocked).
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    child = os.fork()
    if child == 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        os.close(read_end)
        return AgentEnd(write_end)
    os.close(write_end)
    return guard(child, read_end, pilot_id, report, unblock=previous)


def guard(child: int, end_fd: int, pilot_id: str, report: ReportAbandoned, *,
          unblock: Iterable[int] | None = None) -> int:
    """Wait for the agent CHILD, passing signals on; report it abandoned if it did not end normally.

    UNBLOCK: the signal mask to restore once the handlers are in place (fork_agent blocks them)."""
    def forward(signum, _frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for signum in FORWARDED:
        signal.signal(signum, forward)
    if unblock is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, unblock)
    while True:
        try:
            _pid, status = os.waitpid(child, 0)
            break
        except ChildProcessError:   # reaped elsewhere (cannot happen here): treat as an unknown end
            status = -1
            break
    for signum in FORWARDED:
        signal.signal(signum, signal.SIG_DFL)
    marker = _read_marker(end_fd)
    if status != -1 and os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        reason = f"agent killed by {name} (pilot {pilot_id}); its jobs were abandoned"
        code = exitcodes.FAILED
    else:
        code = os.waitstatus_to_exitcode(status) if status != -1 else exitcodes.FAILED
        if marker:
            return code
        reason = f"agent ended with exit code {code} without its end report (pilot {pilot_id}); its jobs were abandoned"
    log.warning(reason)
    try:
        report(reason)
        log.info("reported to the broker: the pilot is abandoned, its running jobs are ended and re-queued")
    except Exception as exc:  # noqa: BLE001 - the broker's reaper is the fallback
        log.error(f"could not report the abandoned pilot to the broker ({exc}); its reaper will re-queue the jobs "
                  "later")
    return code


def _read_marker(fd: int) -> bool:
    # Non-blocking: the marker, if any, was written before the agent ended; a descendant that
    # still holds the pipe (it is close-on-exec, but a fork without exec keeps it) must not hang us.
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, len(END_MARKER) + 1)
    except OSError:
        data = b""
    finally:
        os.close(fd)
    return data == END_MARKER
