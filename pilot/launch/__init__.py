"""Launchers: start the job wrapper inside a container runtime, with its pipe intact.

    launcher = detect(["apptainer", "podman", "bubblewrap"], "require", image, mounts).require()
    argv = wrapper_command(launcher, mounts, ["python3", "-m", "pilot.wrapper"])
    process, channel = spawn(launcher, argv, mounts)

- `Launcher.wrap(argv, mounts) -> argv`: the one command that runs ARGV in the
  runtime (pure; see pilot.launch.runtimes for each runtime's exact form).
- `Mounts`: sandbox -> /workdir (read-write), software area -> /sw (read-only),
  /cvmfs (read-only, when the host has it), site binds.
- Environment: the started process gets PATH, HOME, LANG, TMPDIR (plus, for
  container runtimes, the runtime's own settings, which stay outside); the
  rest comes from the software area's setup.sh, sourced by `setup_command`.
  The agent's environment (its token) never reaches the wrapper.
- `detect`: probe, then self-test by a real wrapper start-up across the
  container boundary; policies require / prefer / off. Under prefer and off
  the `namespace` launcher (own namespaces and a new root made with the
  standard library: pilot.launch.isolate) comes before no isolation at all.
- `isolation_of(launcher)`: what a job is and is not isolated from.
- `dry_run`: the exact command and environment, for the agent's --dry-run.

What an image must offer (details in docs/containers.md): a POSIX /bin/sh; a
python3 >= 3.11 able to load the software area's compiled wheels (same
CPython minor version and a glibc at least as new as the wheels'
manylinux tag); mount points or overlay support for /workdir and /sw (all
runtimes here create them); network access to the broker (every launcher
shares the host's network). The image needs no splitpilot: the software
area brings it.
"""

from pilot.launch.base import Launcher, ProbeResult
from pilot.launch.detection import Attempt, Selection, clear_cache, detect, self_test
from pilot.launch.environment import setup_command
from pilot.launch.errors import LaunchConfigError, LaunchError, NoUsableRuntime
from pilot.launch.isolation import Isolation, isolation_of
from pilot.launch.mounts import CVMFS, SOFTWARE, WORKDIR, Bind, Mounts, check_site_binds, parse_bind
from pilot.launch.namespace import NamespaceLauncher
from pilot.launch.runtimes import (
    LAUNCHERS,
    ApptainerLauncher,
    BubblewrapLauncher,
    DockerLauncher,
    PodmanLauncher,
    ProcessLauncher,
    SingularityLauncher,
    make_launcher,
)
from pilot.launch.software import LOOPBACK_ARGV, build_software_area, wrapper_command
from pilot.launch.spawn import dry_run, spawn

__all__ = [
    "CVMFS", "LAUNCHERS", "LOOPBACK_ARGV", "SOFTWARE", "WORKDIR",
    "ApptainerLauncher", "Attempt", "Bind", "BubblewrapLauncher", "DockerLauncher", "Isolation", "LaunchConfigError",
    "LaunchError", "Launcher", "Mounts", "NamespaceLauncher", "NoUsableRuntime", "PodmanLauncher", "ProbeResult",
    "ProcessLauncher", "Selection", "SingularityLauncher", "build_software_area", "check_site_binds", "clear_cache",
    "detect", "dry_run", "isolation_of", "make_launcher", "parse_bind", "self_test", "setup_command", "spawn",
    "wrapper_command",
]
