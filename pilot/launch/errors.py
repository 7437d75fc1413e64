"""Errors of the launcher layer.

Split only where a caller acts differently:

- `LaunchConfigError`: the configuration is wrong (a mount path the runtimes
  cannot express, an unknown runtime name, a container runtime without an
  image, a bad policy). Fix the configuration; retrying cannot help.
- `NoUsableRuntime`: the site demands a container (policy 'require') and no
  runtime passed its self-test on this node. The agent must not match jobs.

A runtime that is missing or fails its self-test is not an exception: it is
a failed `Attempt` inside a `Selection` (see pilot.launch.detect), because
detection goes on to the next candidate.
"""

from __future__ import annotations

from collections.abc import Mapping

from pilot.errors import SplitpilotError, UsageError


class LaunchError(SplitpilotError):
    """Root of the launcher errors."""


class LaunchConfigError(LaunchError, UsageError):
    """A launcher setting is wrong; the message names the setting and the fix."""


class NoUsableRuntime(LaunchError):
    """No container runtime works here, and the policy requires one.

    Attributes:
        reasons: runtime name -> why it was refused (missing, failed self-test).
    """

    def __init__(self, reasons: Mapping[str, str]) -> None:
        tried = "; ".join(f"{name}: {why}" for name, why in reasons.items()) or "no runtime was configured"
        super().__init__(
            f"no container runtime passed its self-test ({tried}). This node cannot run jobs "
            "under the container policy 'require'. Fix: install one of the runtimes named (or make "
            "the one present work, see the reason), or let the site set the policy to 'prefer' "
            "(fall back to no container, with a warning) or 'off'.")
        self.reasons = dict(reasons)
