"""The few prctl(2) controls the agent and the wrapper set on themselves.

- non-dumpable: other processes of the same user can no longer read this
  one's memory (/proc/PID/mem, ptrace) or environment (/proc/PID/environ),
  and no core dump is written. Set first thing by every process that holds
  a token (agent, guardian, wrapper); it survives fork, and exec of an
  ordinary program resets it (a payload is dumpable again).
- child subreaper: orphaned descendants are re-parented to this process
  instead of init, so they stay visible and can be killed.

Both return False instead of raising where the kernel refuses (non-Linux).
"""

from __future__ import annotations

import ctypes

PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, arg: int = 0) -> int:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)
    except (OSError, AttributeError):
        return -1


def make_non_dumpable() -> bool:
    """prctl(PR_SET_DUMPABLE, 0); True when it took effect."""
    return _prctl(PR_SET_DUMPABLE, 0) == 0 and _prctl(PR_GET_DUMPABLE) == 0


def is_dumpable() -> bool:
    return _prctl(PR_GET_DUMPABLE) != 0


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux >= 3.4); False if refused."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1) == 0
