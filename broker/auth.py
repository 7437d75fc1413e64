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

Revocation: every call, cache hit or not, is checked against the
`RevocationList` (two dict look-ups), which the server refreshes from the
store every few seconds; so a cached identity never outlives its
revocation. First sightings of user, admin and agent certificates are noted
(`take_seen`) so that an admin can revoke them by serial.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Iterable, Sequence

from broker.store.base import Revocation, SeenToken
from pilot.errors import SplitpilotError
from pilot.tokens import Identity, TokenRole, TokenVerifier
from pilot.tokens.errors import WrongRole

#: Roles allowed per service (admins may do what users do, on any job).
SERVICE_ROLES: dict[str, tuple[TokenRole, ...]] = {
    "UserService": (TokenRole.USER, TokenRole.ADMIN),
    "AgentService": (TokenRole.AGENT,),
    "JobService": (TokenRole.JOB,),
    "AdminService": (TokenRole.ADMIN,),
    # grpc.health.v1.Health: any client token (broker/health.py says why).
    "Health": (TokenRole.USER, TokenRole.ADMIN, TokenRole.AGENT, TokenRole.JOB),
}


class Unauthenticated(SplitpilotError):
    """No usable client certificate came with the call."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"{detail}; fix: connect with a token file (certificate and key) issued by this "
                         "broker's CA")
        self.detail = detail


class TokenRevoked(Unauthenticated):
    """The caller's token was revoked. Attributes: revocation."""

    def __init__(self, identity: Identity, revocation: Revocation) -> None:
        which = (f"token {identity.describe()} (serial {identity.serial:x})" if revocation.serial else
                 f"token {identity.describe()} (serial {identity.serial:x}, issued before every "
                 f"{revocation.role} token of {revocation.subject} was revoked)")
        SplitpilotError.__init__(self, f"{which} was revoked at {revocation.revoked:%Y-%m-%d %H:%M:%S}Z "
                                       f"({revocation.reason}); fix: ask for a new token")
        self.detail = str(self)
        self.revocation = revocation


class RevocationList:
    """The revoked tokens, in memory: by serial, and the latest revocation per (role, holder).

    A holder revocation covers the tokens issued up to it: their not_before is the issue time
    less the CA's clock skew, so a token counts as issued at not_before + CLOCK_SKEW.
    Lookups read two dicts without a lock; `replace` swaps both at once (a reference assignment).
    """

    def __init__(self, clock_skew: datetime.timedelta) -> None:
        self._skew = clock_skew
        self._lock = threading.Lock()
        self._tables: tuple[dict[int, Revocation], dict[tuple[str, str], Revocation]] = ({}, {})
        #: The store's revocation_generation() the tables were loaded at (None: never loaded).
        self.generation: tuple[int, int] | None = None

    def replace(self, revocations: Iterable[Revocation], generation: tuple[int, int] | None) -> None:
        tables: tuple[dict, dict] = ({}, {})
        for revocation in revocations:
            self._put(tables, revocation)
        with self._lock:
            self._tables = tables
            self.generation = generation

    def add(self, revocation: Revocation) -> None:
        """One new revocation (this broker made it: effective here at once)."""
        with self._lock:
            by_serial, by_holder = self._tables
            tables = (dict(by_serial), dict(by_holder))
            self._put(tables, revocation)
            self._tables = tables

    @staticmethod
    def _put(tables: tuple[dict, dict], revocation: Revocation) -> None:
        by_serial, by_holder = tables
        if revocation.serial:
            by_serial.setdefault(int(revocation.serial, 16), revocation)
        else:
            key = (revocation.role, revocation.subject)
            known = by_holder.get(key)
            if known is None or known.revoked < revocation.revoked:
                by_holder[key] = revocation

    def check(self, identity: Identity) -> None:
        """TokenRevoked if IDENTITY's token is revoked."""
        by_serial, by_holder = self._tables
        if not (by_serial or by_holder):
            return
        revocation = by_serial.get(identity.serial)
        if revocation is None:
            revocation = by_holder.get((identity.role.value, identity.subject))
            if revocation is None or identity.not_before + self._skew > revocation.revoked:
                return
        raise TokenRevoked(identity, revocation)

    def __len__(self) -> int:
        return sum(len(table) for table in self._tables)


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


#: Roles whose certificates are noted for revocation by serial (job tokens are many, short-lived and
#: fenced by attempt; host tokens never call).
NOTED_ROLES = (TokenRole.USER, TokenRole.ADMIN, TokenRole.AGENT)


class Authoriser:
    """Identifies the caller of a gRPC call, refuses revoked tokens, and checks the role its service needs."""

    MAX_SEEN = 100_000  # bound on first sightings waiting to be written (a database outage)

    def __init__(self, verifier: TokenVerifier, clock_skew: datetime.timedelta = datetime.timedelta(minutes=5)
                 ) -> None:
        self.cache = IdentityCache(verifier)
        self.revoked = RevocationList(clock_skew)
        self._seen: dict[int, SeenToken] = {}
        self._noted: set[int] = set()
        self._seen_lock = threading.Lock()

    def identify(self, context, roles: Sequence[TokenRole]) -> Identity:
        """The caller's identity if its role is one of ROLES.

        Raises Unauthenticated (no certificate), TokenRevoked, TokenRefused
        (bad or expired token) or WrongRole (another role: the message names
        the one needed).
        """
        try:
            certificates = context.auth_context().get("x509_pem_cert")
        except Exception:  # a call without TLS context at all
            certificates = None
        if not certificates:
            raise Unauthenticated("the call carries no client certificate")
        identity = self.cache.identify(certificates[0])
        self.revoked.check(identity)  # on every call: a cached identity never outlives its revocation
        if identity.role in NOTED_ROLES and identity.serial not in self._noted:
            self._note(identity)
        if identity.role not in roles:
            raise WrongRole(identity.role.value, tuple(r.value for r in roles))
        return identity

    def _note(self, identity: Identity) -> None:
        with self._seen_lock:
            if len(self._noted) >= self.MAX_SEEN:
                self._noted.clear()
            self._noted.add(identity.serial)
            if len(self._seen) < self.MAX_SEEN:
                self._seen[identity.serial] = SeenToken(f"{identity.serial:x}", identity.role.value,
                                                        identity.subject, identity.not_after)

    def take_seen(self) -> list[SeenToken]:
        """The certificates first seen since the last call (to be written to the store)."""
        with self._seen_lock:
            seen, self._seen = self._seen, {}
        return list(seen.values())

    def give_back_seen(self, seen: Sequence[SeenToken]) -> None:
        """Sightings that could not be written: keep them for the next attempt."""
        with self._seen_lock:
            for token in seen:
                if len(self._seen) < self.MAX_SEEN:
                    self._seen.setdefault(int(token.serial, 16), token)


__all__ = ["NOTED_ROLES", "SERVICE_ROLES", "Authoriser", "IdentityCache", "RevocationList", "TokenRevoked",
           "Unauthenticated"]
