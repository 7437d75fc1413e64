"""Start a wrapper through a launcher, or show exactly how it would be started.

`spawn` is the one way every runtime is started: the launcher's command,
the launcher's minimal environment, the sandbox as working directory, and
the wrapper's stdin/stdout as the pipe channel. `dry_run` prints the same
three things, from the same functions, for the agent's --dry-run.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence

from pilot.launch.base import Launcher
from pilot.launch.mounts import Mounts
from pilot.pipe.channel import PipeChannel, spawn_with_channel
from pilot.pipe.framing import DEFAULT_MAX_FRAME_BYTES


def spawn(launcher: Launcher, argv: Sequence[str], mounts: Mounts, *, env: Mapping[str, str] | None = None,
          stderr=None, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> tuple[subprocess.Popen, PipeChannel]:
    """Start ARGV inside LAUNCHER's runtime; return the process and the agent's channel to it.

    ENV is the environment the launcher may take its runtime's own settings
    from (default: ours). Only the names the launcher lists are taken (see
    Launcher.environment), never the rest: variables such as the agent's
    token cannot reach the wrapper, under any runtime. The wrapper's stderr
    goes to STDERR (default: inherited), and so does anything the runtime
    says; stdout carries frames only.
    """
    command = launcher.wrap(argv, mounts)
    environment = launcher.environment(mounts, os.environ if env is None else env)
    return spawn_with_channel(command, env=environment, cwd=launcher.cwd(mounts), stderr=stderr,
                              max_frame_bytes=max_frame_bytes)


def dry_run(launcher: Launcher, argv: Sequence[str], mounts: Mounts, env: Mapping[str, str] | None = None) -> str:
    """The exact command, environment and directory `spawn` would use, as a shell snippet.

    Pasting it into a POSIX shell starts the same thing (`env -i` gives the
    process exactly the environment shown, nothing inherited).
    """
    command = launcher.wrap(argv, mounts)
    environment = launcher.environment(mounts, os.environ if env is None else env)
    assignments = [f"{name}={value}" for name, value in sorted(environment.items())]
    return "\n".join([
        f"# launcher: {launcher.describe()}",
        f"# the wrapper sees the sandbox at {launcher.workdir(mounts)} and the software area at "
        f"{launcher.software_dir(mounts)}",
        f"cd {shlex.quote(launcher.cwd(mounts))} &&",
        shlex.join(["env", "-i", *assignments, *command]),
    ]) + "\n"
