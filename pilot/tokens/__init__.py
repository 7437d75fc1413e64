"""Token certificates: the internal CA, role-scoped X.509 tokens, verification.

- `pilot.tokens.identity`: roles, how they are named in certificates, parsing;
- `pilot.tokens.ca`: the CA on disk and issuance (job tokens on a worker-made key);
- `pilot.tokens.verify`: verification with specific refusals;
- `pilot.tokens.files`: private, atomic key and token files;
- `pilot.tokens.cli`: `splitpilot ca ...` and `splitpilot token ...`.
"""

from pilot.tokens.ca import CAPolicy, CertificateAuthority, public_key_from_request
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
    "ANY_ROLE", "CAPolicy", "CertificateAuthority", "CertificateAuthorityError", "Expectation",
    "ExpiredToken", "Identity", "IssueError", "KeyFileError", "KeyPermissions", "MalformedToken",
    "NotYetValidToken", "StaleAttempt", "TokenError", "TokenFile", "TokenRefused", "TokenRole",
    "TokenVerifier", "UntrustedIssuer", "WrongJob", "WrongRole", "WrongSite", "generate_key",
    "parse_identity", "parse_token_pem", "public_key_from_request", "read_token_file",
]
