"""Running the payload: start it, watch it, stop it, and keep nothing behind.

The payload runs in its own session (so a signal reaches its whole process
group), with stdin on /dev/null and stdout/stderr in files of the sandbox:
never on the pipe to the agent, and no other descriptor inherited. The
wrapper makes itself a child subreaper, so descendants that daemonise are
re-parented to it instead of init: they stay visible and are killed at the
end.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pilot.prctl import become_subreaper
from pilot.procstat import TreeUsage, tree_usage

__all__ = ["STDERR_FILE", "STDOUT_FILE", "Exit", "Payload", "PayloadStartError", "become_subreaper", "spec_problem"]
STDOUT_FILE = "payload.stdout"
STDERR_FILE = "payload.stderr"


class PayloadStartError(Exception):
    """The payload could not be started (not found, not executable...)."""


@dataclass(frozen=True)
class Exit:
    """How the payload's main process ended."""

    exit_code: int | None
    signal: int | None

    @property
    def success(self) -> bool:
        return self.exit_code == 0

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:   # a real-time signal has no name
                name = f"SIGRTMIN+{self.signal - signal.SIGRTMIN}" if self.signal >= signal.SIGRTMIN else "?"
            return f"killed by signal {self.signal} ({name})"
        return f"exit code {self.exit_code}"


class Payload:
    """One started payload process and its descendants."""

    def __init__(self, argv: Sequence[str], sandbox: str, env: Mapping[str, str]) -> None:
        self.sandbox = sandbox
        executable = _resolve(argv[0], sandbox, env.get("PATH", os.defpath))
        self.stdout_path = os.path.join(sandbox, STDOUT_FILE)
        self.stderr_path = os.path.join(sandbox, STDERR_FILE)
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            try:
                self.process = subprocess.Popen(
                    [executable, *argv[1:]], cwd=sandbox, env=dict(env), stdin=subprocess.DEVNULL,
                    stdout=out, stderr=err, start_new_session=True, close_fds=True)
            except OSError as exc:
                hint = ""
                if exc.errno == errno.E2BIG:
                    hint = ("; the job's arguments and environment exceed what one program may get (each string "
                            f"at most {MAX_ARG_STRLEN // 1024} KiB, all together a few MiB); fix: pass large "
                            "data in an input file")
                elif exc.errno == errno.ENOEXEC:
                    hint = "; fix: give a script a '#!' line, or name its interpreter as the executable"
                raise PayloadStartError(f"cannot start {argv[0]!r}: {exc.strerror}{hint}") from None
            except ValueError as exc:   # what spec_problem checks first; kept as a last line of defence
                raise PayloadStartError(f"cannot start {argv[0]!r}: {exc}") from None
        self.pid = self.process.pid
        self.started = time.monotonic()
        self.exit: Exit | None = None
        self.max_rss = 0
        # Readable the moment the payload exits (Linux >= 5.3): the wrapper's loop wakes on it instead of
        # finding the exit at its next poll. None where pidfds are missing (the loop's poll still finds it).
        self.exit_fd: int | None = None
        try:
            self.exit_fd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            pass

    def poll(self) -> Exit | None:
        if self.exit is None:
            status = self.process.poll()
            if status is not None:
                self.exit = Exit(status, None) if status >= 0 else Exit(None, -status)
                self._close_exit_fd()
        return self.exit

    def _close_exit_fd(self) -> None:
        if self.exit_fd is not None:
            os.close(self.exit_fd)
            self.exit_fd = None

    def usage(self) -> TreeUsage:
        """The payload's live tree: its session, plus whatever was re-parented to us."""
        result = tree_usage(os.getpid(), session=self.pid, include_root=False)
        self.max_rss = max(self.max_rss, result.rss_bytes)
        return result

    @property
    def wall_seconds(self) -> float:
        return time.monotonic() - self.started

    def terminate(self, grace: float) -> Exit:
        """SIGTERM the payload's group, wait up to GRACE seconds, then SIGKILL
        everything that is left (descendants included)."""
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self.kill_everything()
        return self.wait()

    def wait(self) -> Exit:
        self.process.wait()
        return self.poll()  # type: ignore[return-value]

    def kill_everything(self) -> None:
        """SIGKILL the payload's group and every remaining descendant of ours."""
        self._signal_group(signal.SIGKILL)
        me = os.getpid()
        for _ in range(20):  # daemons may fork while we kill: repeat until none is left
            others = tree_usage(me, session=self.pid, include_root=False).pids
            if not others:
                break
            for pid in others:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.process.poll()  # Popen reaps its own child: keeps the real exit status
            _reap_adopted(me, keep=self.pid)
            time.sleep(0.02)
        self.process.wait()
        _reap_adopted(me, keep=self.pid)

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


#: Linux's limit on one argument or environment string (32 pages).
MAX_ARG_STRLEN = 32 * 4096


def spec_problem(executable: str, arguments: Sequence[str], environment: Mapping[str, str]) -> str:
    """Why a payload with this executable, arguments and environment cannot be started, or ''.

    These are the job owner's mistakes (the broker refuses them at submit;
    an older broker did not): the message names the field and the fix."""
    if not executable:
        return "the job names no executable; fix: set executable in the job file"
    if "\0" in executable:
        return "the executable's name contains a NUL character; fix: name a program or an input file"
    for index, argument in enumerate(arguments):
        if "\0" in argument:
            return f"argument {index + 1} contains a NUL character, which no program can receive; fix: remove it"
    for name, value in environment.items():
        if not name or "=" in name or "\0" in name:
            return (f"environment variable name {name[:60]!r} is empty or contains '=' or a NUL character; fix: "
                    "use names such as MY_SETTING")
        if "\0" in value:
            return f"the value of environment variable {name[:60]!r} contains a NUL character; fix: remove it"
    return ""


def _resolve(executable: str, sandbox: str, path: str) -> str:
    """A path inside the sandbox (made executable if it is an input), or a PATH lookup."""
    if not executable:
        raise PayloadStartError("the job names no executable")
    if "/" in executable:
        full = os.path.normpath(os.path.join(sandbox, executable))
        if os.path.isfile(full) and not os.access(full, os.X_OK):
            os.chmod(full, os.stat(full).st_mode | 0o100)
        return full
    found = shutil.which(executable, path=path)
    if found is None:
        in_sandbox = os.path.join(sandbox, executable)
        if os.path.isfile(in_sandbox):
            return _resolve("./" + executable, sandbox, path)
        raise PayloadStartError(f"{executable!r} is neither an input in the sandbox nor on the PATH ({path}); fix: "
                                "list it in the job's input files, or name a program the node has")
    return found


def _reap_adopted(me: int, keep: int) -> None:
    """Reap dead children of ours (adopted orphans), leaving KEEP to its Popen.

    waitpid(-1) would also reap the payload's main process and steal its exit
    status from subprocess (which then reports 0).
    """
    for pid in tree_usage(me, include_root=False).pids:
        if pid == keep:
            continue
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass  # not our direct child: its own parent reaps it
