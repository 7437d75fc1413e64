"""The root of every error splitpilot raises on purpose.

Callers catch `SplitpilotError` to handle anything of ours; subclasses exist
only where a caller acts differently, and carry their details as attributes
(never as text to be parsed). Every message says what went wrong and, where
one is known, the fix.
"""

from __future__ import annotations


class SplitpilotError(Exception):
    """Base class of all splitpilot errors.

    `exit_code` is what the command line returns when this error ends a
    command: 1 for a failure of the operation, 2 for bad usage or input.
    """

    exit_code: int = 1


class UsageError(SplitpilotError):
    """The command line or a configuration value is wrong; fix the input."""

    exit_code = 2
