"""Token certificates as a node holds and checks them: role-scoped X.509 tokens, verification.

- `pilot.tokens.identity`: roles, how they are named in certificates, parsing;
- `pilot.tokens.verify`: verification with specific refusals;
- `pilot.tokens.files`: private, atomic key and token files.

The CA that issues tokens is the broker's (`broker.ca`, and `broker.tokens_cli` for
`splitpilot ca ...` and `splitpilot token ...`): no node holds it.
"""

from pilot.tokens.errors import (
    CertificateAuthorityError,
    ExpiredToken,
    IssueError,
    KeyFileError,
    MalformedToken,
    NotYetValidToken,
    StaleAttempt,
    TokenError,
    TokenRefused,
    UntrustedIssuer,
    WrongJob,
    WrongRole,
    WrongSite,
)
from pilot.tokens.files import KeyPermissions, TokenFile, generate_key, parse_token_pem, read_token_file
from pilot.tokens.identity import Identity, TokenRole, parse_identity
from pilot.tokens.verify import ANY_ROLE, Expectation, TokenVerifier

__all__ = [
    "ANY_ROLE", "CertificateAuthorityError", "Expectation",
    "ExpiredToken", "Identity", "IssueError", "KeyFileError", "KeyPermissions", "MalformedToken",
    "NotYetValidToken", "StaleAttempt", "TokenError", "TokenFile", "TokenRefused", "TokenRole",
    "TokenVerifier", "UntrustedIssuer", "WrongJob", "WrongRole", "WrongSite", "generate_key",
    "parse_identity", "parse_token_pem", "read_token_file",
]
