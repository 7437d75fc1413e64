"""Who is calling, and may they: mTLS identities and per-service roles.

The TLS layer (grpc, `require_client_auth=True`, the CA as the only root)
has already refused clients without a certificate or with one from another
CA when a handler runs. Each call then takes the peer certificate from the
auth context, turns it into an `Identity` with `TokenVerifier` (structure,
role, validity, path), and checks the role the service needs.

Verification costs ~0.2 ms; a call must not. Verified identities are cached
by the certificate's PEM bytes (what gRPC hands us) until their not_after,
so a long-lived agent channel pays once; a cache hit is one dict look-up and
one clock comparison.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from pilot.errors import SplitpilotError
from pilot.tokens import Identity, TokenRole, TokenVerifier
from pilot.tokens.errors import WrongRole

#: Roles allowed per service (admins may do what users do, on any job).
SERVICE_ROLES: dict[str, tuple[TokenRole, ...]] = {
    "UserService": (TokenRole.USER, TokenRole.ADMIN),
    "AgentService": (TokenRole.AGENT,),
    "JobService": (TokenRole.JOB,),
    "AdminService": (TokenRole.ADMIN,),
}


class Unauthenticated(SplitpilotError):
    """No usable client certificate came with the call."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"{detail}; fix: connect with a token file (certificate and key) issued by this "
                         "broker's CA")
        self.detail = detail


class IdentityCache:
    """Verified identities by certificate bytes, each valid until its not_after.

    Thread-safe: reads are plain dict look-ups; inserts and the occasional
    clean-up take a lock. At most MAX_ENTRIES are kept (expired ones go
    first, then the whole cache is dropped: a refill costs one verification
    per live certificate).
    """

    MAX_ENTRIES = 100_000

    def __init__(self, verifier: TokenVerifier, *, clock=time.time) -> None:
        self.verifier = verifier
        self._clock = clock
        self._entries: dict[bytes, tuple[Identity, float, float]] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def identify(self, certificate: bytes) -> Identity:
        """The verified identity of CERTIFICATE (PEM or DER); TokenRefused if not acceptable."""
        entry = self._entries.get(certificate)
        if entry is not None:
            now = self._clock()
            if entry[1] <= now <= entry[2]:
                self.hits += 1
                return entry[0]
        self.misses += 1
        identity = self.verifier.verify(certificate)  # any role: the service checks the role itself
        with self._lock:
            if len(self._entries) >= self.MAX_ENTRIES:
                self._prune()
            self._entries[certificate] = (identity, identity.not_before.timestamp(),
                                          identity.not_after.timestamp())
        return identity

    def _prune(self) -> None:
        now = self._clock()
        for key in [k for k, (_i, _b, after) in self._entries.items() if after < now]:
            del self._entries[key]
        if len(self._entries) >= self.MAX_ENTRIES:
            self._entries.clear()

    def prune(self) -> None:
        with self._lock:
            self._prune()

    def __len__(self) -> int:
        return len(self._entries)


class Authoriser:
    """Identifies the caller of a gRPC call and checks the role its service needs."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self.cache = IdentityCache(verifier)

    def identify(self, context, roles: Sequence[TokenRole]) -> Identity:
        """The caller's identity if its role is one of ROLES.

        Raises Unauthenticated (no certificate), TokenRefused (bad or expired
        token) or WrongRole (another role: the message names the one needed).
        """
        try:
            certificates = context.auth_context().get("x509_pem_cert")
        except Exception:  # a call without TLS context at all
            certificates = None
        if not certificates:
            raise Unauthenticated("the call carries no client certificate")
        identity = self.cache.identify(certificates[0])
        if identity.role not in roles:
            raise WrongRole(identity.role.value, tuple(r.value for r in roles))
        return identity


__all__ = ["SERVICE_ROLES", "Authoriser", "IdentityCache", "Unauthenticated"]
