"""Errors of the token layer: refusals of presented tokens, and CA/file problems.

One root, `TokenError`; a subclass per thing a caller (the broker, the
wrapper, a person at the CLI) reports or acts on differently. Details are
attributes; every message says what to do.
"""

from __future__ import annotations

import datetime

from pilot.errors import SplitpilotError


class TokenError(SplitpilotError):
    """Root of token errors."""


# ----------------------------------------------------------- refusals of a token

class TokenRefused(TokenError):
    """A presented token is not acceptable for the request (any reason below)."""


class MalformedToken(TokenRefused):
    """Not a parseable splitpilot token (bad PEM/DER, inconsistent names...).

    Attributes:
        detail: what is wrong with it.
    """

    def __init__(self, detail: str) -> None:
        super().__init__(f"malformed token: {detail}; fix: present a token file written by "
                         "`splitpilot token issue` (certificate PEM first, then the key)")
        self.detail = detail


class ExpiredToken(TokenRefused):
    """Attributes: not_after, now (aware UTC datetimes)."""

    def __init__(self, not_after: datetime.datetime, now: datetime.datetime) -> None:
        super().__init__(f"token expired at {not_after:%Y-%m-%d %H:%M:%S}Z (now {now:%Y-%m-%d %H:%M:%S}Z); "
                         "fix: get a fresh token")
        self.not_after = not_after
        self.now = now


class NotYetValidToken(TokenRefused):
    """Attributes: not_before, now (aware UTC datetimes)."""

    def __init__(self, not_before: datetime.datetime, now: datetime.datetime) -> None:
        super().__init__(f"token not valid before {not_before:%Y-%m-%d %H:%M:%S}Z (now {now:%Y-%m-%d %H:%M:%S}Z); "
                         "fix: check the clocks of issuer and this host (NTP)")
        self.not_before = not_before
        self.now = now


class UntrustedIssuer(TokenRefused):
    """Not signed by a CA this side trusts (another CA, a look-alike, tampered).

    Attributes:
        issuer: the issuer name the token claims (RFC 4514 string).
        detail: why the signature chain was refused.
    """

    def __init__(self, issuer: str, detail: str) -> None:
        super().__init__(f"token issued by {issuer!r} is not trusted: {detail}; fix: use a token "
                         "from this installation's CA (splitpilot ca show)")
        self.issuer = issuer
        self.detail = detail


class WrongRole(TokenRefused):
    """Attributes: presented (role value), expected (tuple of role values)."""

    def __init__(self, presented: str, expected: tuple[str, ...]) -> None:
        article = "an" if presented[:1] in "aeiou" else "a"
        super().__init__(f"{article} {presented} token cannot do this; it needs: {' or '.join(expected)} token")
        self.presented = presented
        self.expected = expected


class WrongSite(TokenRefused):
    """Attributes: presented, expected (site names)."""

    def __init__(self, presented: str, expected: str) -> None:
        super().__init__(f"agent token for site {presented!r} presented for site {expected!r}; "
                         "fix: issue the glidein's token with --site matching where it runs")
        self.presented = presented
        self.expected = expected


class WrongJob(TokenRefused):
    """Attributes: presented, expected ((job id, attempt) pairs)."""

    def __init__(self, presented: tuple[int, int], expected: tuple[int, int]) -> None:
        super().__init__(f"job token for job {presented[0]} attempt {presented[1]} cannot act on job "
                         f"{expected[0]} attempt {expected[1]}")
        self.presented = presented
        self.expected = expected


class StaleAttempt(TokenRefused):
    """A job token of an earlier attempt of the right job (fencing).

    Attributes: job_id, presented (attempt), current (attempt).
    """

    def __init__(self, job_id: int, presented: int, current: int) -> None:
        super().__init__(f"job {job_id}: token of attempt {presented}, but the job is at attempt {current}; "
                         "this attempt was given up (lost or re-queued) and may not act any more")
        self.job_id = job_id
        self.presented = presented
        self.current = current


# ------------------------------------------------------------- CA, keys, files

class CertificateAuthorityError(TokenError):
    """The CA directory is missing, incomplete, unsafe, or already exists.

    Attributes: path, detail.
    """

    exit_code = 2

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"certificate authority {path}: {detail}")
        self.path = path
        self.detail = detail


class KeyFileError(TokenError):
    """A key or token file cannot be used (permissions, mismatch, format).

    Attributes: path, detail.
    """

    exit_code = 2

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail


class IssueError(TokenError):
    """A token cannot be issued as asked (bad name, lifetime, key type...).

    Attributes: detail.
    """

    exit_code = 2

    def __init__(self, detail: str) -> None:
        super().__init__(f"cannot issue token: {detail}")
        self.detail = detail
