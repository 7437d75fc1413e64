"""How environment reaches the wrapper: a minimal start, then a sourced setup script.

Two rules, the same for every runtime:

1. The process we start (the runtime, or the wrapper itself without one)
   gets a small environment built here from named parts, never a copy of
   ours. The agent's own secrets (its token, whatever the batch system set)
   therefore cannot reach the wrapper through the environment, with any
   runtime, whatever the runtime's own rules for passing variables are.
2. What the wrapper needs beyond that (PATH and PYTHONPATH for its runtime,
   site settings) comes from the software area's setup script, sourced inside
   the container right before the wrapper starts: `setup_command`. This is
   JAliEn's "environment crosses the container through a sourced script",
   without its string building: the command is passed as positional
   parameters, never pasted into the shell text, so no argument can inject
   shell code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

#: The shell text run by `setup_command`. $1 is the setup script; after
#: `shift` the positional parameters are exactly the wrapper's argv. The
#: script's own stdout goes to stderr (`>&2`, for the `.` only): stdout is the
#: protocol pipe, and site setup scripts like to print.
SETUP_SHELL = '. "$1" >&2 && shift && exec "$@"'

#: The search path a wrapper starts with (its setup script extends it).
CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"
#: Where runtimes are looked for when the caller has no PATH.
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LANG = "C.UTF-8"


def setup_command(argv: Sequence[str], setup_script: str = "/sw/setup.sh") -> list[str]:
    """ARGV run by a POSIX shell after it sources SETUP_SCRIPT.

    The script is sourced with its own path as $1 (so it can find the area
    it belongs to: `${1%/*}`), with its stdout sent to stderr (whatever it
    prints cannot reach the protocol pipe), and any non-zero status of the
    script stops the start (the shell exits with it). ARGV is never
    interpolated into the shell text: quotes, `$(...)`, newlines and spaces
    reach the program as they are.
    """
    argv = list(argv)
    if not argv:
        raise ValueError("setup_command needs a program to run")
    return ["/bin/sh", "-c", SETUP_SHELL, "sh", setup_script, *argv]


def minimal_environment(*, home: str, tmpdir: str, path: str = CHILD_PATH) -> dict[str, str]:
    """The whole environment of a wrapper started without a container runtime between."""
    return {"PATH": path, "HOME": home, "LANG": LANG, "TMPDIR": tmpdir}


def runtime_environment(caller: Mapping[str, str], names: Sequence[str]) -> dict[str, str]:
    """The environment of a container runtime process (podman, docker, apptainer).

    PATH and HOME of the caller (a runtime finds its helpers and its own
    configuration and image storage through them; neither reaches the
    container), LANG, and only the variables NAMES lists (the runtime's own
    settings, such as XDG_RUNTIME_DIR for rootless podman). Nothing else of
    CALLER is taken.
    """
    env = {"PATH": caller.get("PATH") or HOST_PATH, "HOME": caller.get("HOME") or "/", "LANG": LANG}
    env.update({name: caller[name] for name in names if name in caller})
    return env
