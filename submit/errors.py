"""The one error the submit generator raises, with its details as attributes."""

from __future__ import annotations

import enum

from pilot.errors import UsageError


class Problem(enum.StrEnum):
    """Why a submit description could not be built; the fix differs for each."""

    UNREPRESENTABLE = "unrepresentable"  # HTCondor's syntax cannot carry this value (newline, NUL, ...)
    RESERVED_KEY = "reserved-key"        # an extra line tries to set what the generator owns
    SECRET = "secret"                    # a credential would end up in the submit description
    INVALID = "invalid"                  # a setting is out of range or of the wrong form


class SubmitDescriptionError(UsageError):
    """A glidein submit description cannot be built from these settings.

    `key` names the submit key or setting at fault, `problem` says why (a
    `Problem`), `fix` says what to do. The offending value is never part of
    the message: it may be a credential.
    """

    def __init__(self, key: str, problem: Problem, reason: str, fix: str) -> None:
        super().__init__(f"submit description, {key}: {reason}; fix: {fix}")
        self.key = key
        self.problem = problem
        self.reason = reason
        self.fix = fix
