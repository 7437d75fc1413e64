"""Choose the runtime: probe each candidate, then start a wrapper in it.

A runtime counts as working only after a real wrapper start-up inside it
worked: the pipe protocol across the container boundary (Hello, Ready, a
clean close), with the software area mounted and the sandbox writable, as
HTCondor's starter self-tests its container runtime before running jobs.
A `--version` that answers proves little (a docker client without a
daemon, an apptainer without user namespaces, podman on the wrong cgroup
manager all answer it).

Results are cached per process for each launcher (runtime, image and
settings): successes for good, failures for FAILURE_TTL seconds (a cold
CVMFS image mount can fail once and work a minute later).

Policies, as the site configures them:
    require  the first listed runtime that works; none -> Selection.launcher is
             None: do not match jobs
    prefer   the listed runtimes, then the `namespace` launcher (no container,
             but own namespaces and no capabilities), then ProcessLauncher (no
             isolation at all) with a loud warning in the log
    off      no container: the `namespace` launcher if it works, else
             ProcessLauncher, with the same loud warning

The namespace launcher is not a container (no image: it runs the host's own
system folders), so `off` may use it: it only takes away what a job should
not have (the other jobs, the agent, capabilities).
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pilot.errors import SplitpilotError
from pilot.launch.base import Launcher
from pilot.launch.errors import LaunchConfigError, NoUsableRuntime
from pilot.launch.mounts import Mounts
from pilot.launch.namespace import NamespaceLauncher
from pilot.launch.runtimes import ProcessLauncher, make_launcher
from pilot.launch.software import LOOPBACK_ARGV, wrapper_command
from pilot.launch.spawn import spawn
from pilot.pipe import messages as m
from pilot.pipe.protocol import ConnectionClosed

Policy = Literal["require", "prefer", "off"]
POLICIES: tuple[str, ...] = ("require", "prefer", "off")

#: Seconds a self-test may take from start to clean exit (image mounts on a
#: cold cache take seconds).
SELF_TEST_TIMEOUT = 60.0
#: Seconds a failed self-test is remembered before it is tried again.
FAILURE_TTL = 300.0
#: The fallback warnings (`launch: ...`), in the agent's log.
log = logging.getLogger("splitpilot.launch")

#: Bytes of the wrapper's stderr kept in a failure reason.
_STDERR_TAIL = 600
_EXIT_GRACE = 5.0  # seconds a failed wrapper gets to exit so its last stderr lines are in the reason

#: The self-test's command inside the software area: prove the sandbox is
#: writable, then start the protocol-only wrapper.
SELF_TEST_SHELL = ': > .splitpilot-self-test && rm -f .splitpilot-self-test && exec "$@"'

ArgvFor = Sequence[str] | Callable[[Launcher], Sequence[str]]


@dataclass(frozen=True)
class Attempt:
    """One candidate runtime, tried.

    Attributes:
        name: the runtime's configured name.
        ok: it passed its probe and self-test.
        reason: why not (with the fix), when `ok` is False.
        version: what its program said its version was.
        seconds: how long the self-test took (spawn to clean exit).
        cached: the result came from this process's cache.
    """

    name: str
    ok: bool
    reason: str = ""
    version: str = ""
    seconds: float = 0.0
    cached: bool = False


@dataclass(frozen=True)
class Selection:
    """The runtime chosen for this node, and why the others were not.

    Attributes:
        launcher: the launcher to use, or None: no runtime is usable under
            policy 'require' (the agent must not match jobs).
        policy: the policy applied.
        attempts: every candidate tried, in preference order.
        fell_back: policy 'prefer' fell back to no container (the namespace
            launcher, or no isolation at all).
    """

    launcher: Launcher | None
    policy: str
    attempts: tuple[Attempt, ...] = field(default=())
    fell_back: bool = False

    @property
    def reasons(self) -> dict[str, str]:
        """Runtime name -> why it was not chosen."""
        return {a.name: a.reason for a in self.attempts if not a.ok}

    def require(self) -> Launcher:
        """The launcher, or NoUsableRuntime (naming each runtime's failure) when there is none."""
        if self.launcher is None:
            raise NoUsableRuntime(self.reasons)
        return self.launcher


_cache: dict[Launcher, tuple[Attempt, float]] = {}
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Forget every self-test result of this process."""
    with _cache_lock:
        _cache.clear()


def default_self_test_argv(launcher: Launcher, mounts: Mounts) -> list[str]:
    """The self-test command: sandbox write check, then the loopback wrapper, via setup.sh."""
    return wrapper_command(launcher, mounts, ["/bin/sh", "-c", SELF_TEST_SHELL, "sh", *LOOPBACK_ARGV])


def self_test(launcher: Launcher, mounts: Mounts, argv: Sequence[str], *, timeout: float = SELF_TEST_TIMEOUT,
              env: Mapping[str, str] | None = None) -> str:
    """Start ARGV (a wrapper) through LAUNCHER and talk to it; '' if it worked, else why not.

    The wrapper must answer Hello with Ready, and end its stream and exit
    with status 0 when the agent closes the pipe. Its stderr is kept for
    the reason.
    """
    deadline = time.monotonic() + timeout
    try:
        launcher.prepare_sandbox(mounts.sandbox)  # the user inside must be able to write it
    except OSError as exc:
        return f"cannot give the sandbox {mounts.sandbox} to the user the wrapper runs as: {exc}"
    with tempfile.TemporaryFile() as errors:
        try:
            process, channel = spawn(launcher, argv, mounts, env=env, stderr=errors)
        except OSError as exc:
            return f"cannot start {launcher.binary or argv[0]}: {exc.strerror or exc}"
        stage = "sending Hello"
        try:
            with channel:
                channel.send(m.make_hello("runtime-self-test"), timeout=timeout)
                stage = "waiting for Ready"
                channel.expect(m.Ready, timeout=max(0.1, deadline - time.monotonic()))
                stage = "closing"
                channel.close_write()
                event = channel.receive(timeout=max(0.1, deadline - time.monotonic()))
                if event is not ConnectionClosed:
                    return f"the wrapper sent {type(event).__name__} after the agent closed; expected a clean end"
            stage = "waiting for exit"
            status = process.wait(timeout=max(0.1, deadline - time.monotonic()))
            if status != 0:
                return f"the wrapper exited with status {status} after a clean close{_tail(errors)}"
            return ""
        except SplitpilotError as exc:  # the protocol's errors name what the peer did
            _let_it_end(process, deadline)
            return f"self-test failed while {stage}: {exc}{_tail(errors)}"
        except Exception as exc:  # OSError, subprocess.TimeoutExpired, ...: still only a failed runtime
            _let_it_end(process, deadline)
            return f"self-test failed while {stage}: {type(exc).__name__}: {exc}{_tail(errors)}"
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()


def _let_it_end(process, deadline: float) -> None:
    """Give a failed wrapper a moment to exit before its stderr is read.

    A runtime that relays the container's stderr (podman's conmon, docker)
    may close the wrapper's stdout before the relay has written the last
    lines: the pipe's end is seen first, and the reason would miss the
    very message that explains it. The wait ends at the self-test's
    deadline (at most _EXIT_GRACE), then the process is killed as before.
    """
    try:
        process.wait(timeout=max(0.0, min(_EXIT_GRACE, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        pass


def _tail(errors) -> str:
    errors.flush()
    errors.seek(0, os.SEEK_END)
    size = errors.tell()
    errors.seek(max(0, size - _STDERR_TAIL))
    text = errors.read().decode(errors="replace").strip()
    return f"; its stderr ends: {text}" if text else "; it wrote nothing on stderr"


def _try(launcher: Launcher, mounts: Mounts, argv_for: ArgvFor | None, timeout: float,
         env: Mapping[str, str] | None, refresh: bool) -> Attempt:
    now = time.monotonic()
    with _cache_lock:
        known = _cache.get(launcher)
    if known is not None and not refresh:
        attempt, when = known
        if attempt.ok or now - when < FAILURE_TTL:
            return Attempt(attempt.name, attempt.ok, attempt.reason, attempt.version, attempt.seconds, cached=True)
    probe = launcher.probe(os.environ if env is None else env)
    if not probe.ok:
        attempt = Attempt(launcher.name, False, probe.reason)
    else:
        if argv_for is None:
            argv = default_self_test_argv(launcher, mounts)
        elif callable(argv_for):
            argv = list(argv_for(launcher))
        else:
            argv = list(argv_for)
        started = time.monotonic()
        reason = self_test(launcher, mounts, argv, timeout=timeout, env=env)
        attempt = Attempt(launcher.name, not reason, reason, probe.version, time.monotonic() - started)
    with _cache_lock:
        _cache[launcher] = (attempt, time.monotonic())
    return attempt


def _image_for(name: str, image: str | Mapping[str, str | None] | None) -> str | None:
    if isinstance(image, Mapping):
        return image.get(name)
    return image


def detect(preference: Sequence[str], policy: Policy, image: str | Mapping[str, str | None] | None,
           mounts: Mounts, self_test_argv: ArgvFor | None = None, *, timeout: float = SELF_TEST_TIMEOUT,
           env: Mapping[str, str] | None = None, refresh: bool = False) -> Selection:
    """Pick the first runtime of PREFERENCE that works here, under POLICY.

    IMAGE is the container image (one for all runtimes, or a mapping from
    runtime name to image: e.g. an image name for podman and an unpacked
    folder for apptainer and bubblewrap). SELF_TEST_ARGV is the wrapper
    start-up to try (a list, or a function of the launcher; default: the
    loopback wrapper through the software area's setup.sh, after a sandbox
    write check). Nothing is raised for a runtime that does not work: its
    Attempt says why. LaunchConfigError is raised for a bad policy only.
    """
    if policy not in POLICIES:
        raise LaunchConfigError(f"unknown container policy {policy!r}; fix: use one of {', '.join(POLICIES)}")
    attempts: list[Attempt] = []
    if policy != "off":
        for name in preference:
            try:
                launcher = make_launcher(name, _image_for(name, image))
            except LaunchConfigError as exc:
                attempts.append(Attempt(name, False, str(exc)))
                continue
            attempt = _try(launcher, mounts, self_test_argv, timeout, env, refresh)
            attempts.append(attempt)
            if attempt.ok:
                return Selection(launcher, policy, tuple(attempts))
        if policy == "require":
            return Selection(None, policy, tuple(attempts))
    fell_back = policy == "prefer"
    if not any(a.name == NamespaceLauncher.name for a in attempts):
        namespace = NamespaceLauncher()
        attempt = _try(namespace, mounts, self_test_argv, timeout, env, refresh)
        attempts.append(attempt)
        if attempt.ok:
            if fell_back:
                tried = "; ".join(f"{a.name}: {a.reason}" for a in attempts if not a.ok) or "none configured"
                log.warning(f"no container runtime works on this node ({tried}). Jobs will run in the namespace "
                            "launcher: no container image, the host's system folders read-only, own namespaces, no "
                            "capabilities.")
            return Selection(namespace, policy, tuple(attempts), fell_back=fell_back)
    tried = "; ".join(f"{a.name}: {a.reason}" for a in attempts if not a.ok) or "no runtime configured"
    log.warning(f"neither a container runtime nor the namespace launcher works on this node ({tried}). Jobs will "
                f"run WITHOUT a container or any isolation (policy '{policy}'): the payload sees this user's files "
                "and processes, so jobs run one at a time. Fix: allow unprivileged user namespaces or install a "
                "runtime (apptainer, podman or bubblewrap), or repair the one named above; set the policy to "
                "'require' to refuse jobs instead.")
    return Selection(ProcessLauncher(), policy, tuple(attempts), fell_back=True)
