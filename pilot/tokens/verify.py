"""Verifying presented tokens: trust, validity, then role and scope.

Used by the broker (every call) and the wrapper. The order of the checks
decides which error a bad token gets, so that the message names the real
problem: first who issued it, then when it is valid, then what it claims to
be (the name structure), then the signature chain (cryptography's path
verifier: signature, key usage, EKU, SAN), then whether that role and scope
may do what is asked.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from pilot.tokens.errors import (
    ExpiredToken,
    MalformedToken,
    NotYetValidToken,
    StaleAttempt,
    UntrustedIssuer,
    WrongJob,
    WrongRole,
    WrongSite,
)
from pilot.tokens.files import load_certificates
from pilot.tokens.identity import Identity, TokenRole, parse_identity


@dataclass(frozen=True)
class Expectation:
    """What a request needs from the token presented with it.

    roles: the roles allowed; site: for agent tokens, the site the request
    concerns; job_id/attempt: for job tokens, the job and its *current*
    attempt (a token of an earlier attempt is stale: fencing).
    """

    roles: tuple[TokenRole, ...]
    site: str | None = None
    job_id: int | None = None
    attempt: int | None = None

    @classmethod
    def role(cls, *roles: TokenRole, **scope) -> Expectation:
        return cls(tuple(roles), **scope)


ANY_ROLE = Expectation(tuple(TokenRole))


class TokenVerifier:
    """Verifies tokens against the trusted CA certificates."""

    def __init__(self, trusted: Sequence[x509.Certificate]) -> None:
        if not trusted:
            raise ValueError("a verifier needs at least one trusted CA certificate")
        self._trusted = list(trusted)
        self._store = Store(self._trusted)
        self._by_subject = {ca.subject: ca for ca in self._trusted}

    def verify(self, presented, expect: Expectation = ANY_ROLE, *,
               now: datetime.datetime | None = None) -> Identity:
        """Return the identity of PRESENTED (PEM chain, certificate or list of
        certificates, leaf first) if it is trusted, valid now, and meets
        EXPECT; raise the specific TokenRefused subclass otherwise."""
        chain = _as_chain(presented)
        leaf = chain[0]
        now = now or datetime.datetime.now(datetime.UTC)
        issuer = leaf.issuer  # each access rebuilds the Name: take it once
        ca = self._by_subject.get(issuer)
        if ca is None:
            raise UntrustedIssuer(issuer.rfc4514_string(), "no trusted CA has that name")
        if now < leaf.not_valid_before_utc:
            raise NotYetValidToken(leaf.not_valid_before_utc, now)
        if now > leaf.not_valid_after_utc:
            raise ExpiredToken(leaf.not_valid_after_utc, now)
        # The signature chain before the contents: altered bytes must read as
        # "not ours", not as whatever inconsistency the alteration made.
        intermediates = [c for c in chain[1:] if c not in self._trusted]
        subject = leaf.subject
        try:
            verified = self._path_verifier(leaf, subject, now).verify(leaf, intermediates)
        except VerificationError as exc:
            try:
                leaf.verify_directly_issued_by(ca)
            except (InvalidSignature, ValueError, TypeError):
                raise UntrustedIssuer(issuer.rfc4514_string(), "its signature does not verify with the "
                                      "trusted CA of that name (a look-alike CA, or altered bytes)") from None
            raise MalformedToken(f"refused by the certificate path check ({exc})") from None
        # A client verifier hands back the alt names it checked; a server one does not.
        alt_names = getattr(verified, "subjects", None)
        identity = parse_identity(leaf, subject=subject, issuer=issuer, alt_names=alt_names)
        check_expectation(identity, expect)
        return identity

    def _path_verifier(self, leaf: x509.Certificate, subject: x509.Name, now: datetime.datetime):
        policy = PolicyBuilder().store(self._store).time(now)
        units = [a.value for a in subject if a.oid == NameOID.ORGANIZATIONAL_UNIT_NAME]
        if units != [TokenRole.HOST.value]:
            return policy.build_client_verifier()
        return policy.build_server_verifier(_server_subject(leaf))


def check_expectation(identity: Identity, expect: Expectation) -> None:
    """Raise WrongRole / WrongSite / WrongJob / StaleAttempt as needed."""
    if identity.role not in expect.roles:
        raise WrongRole(identity.role.value, tuple(r.value for r in expect.roles))
    if identity.role is TokenRole.AGENT and expect.site is not None and identity.site != expect.site:
        raise WrongSite(identity.site or "", expect.site)
    if identity.role is TokenRole.JOB and expect.job_id is not None:
        if identity.job_id is None or identity.attempt is None:   # parse_identity never makes one
            raise MalformedToken("a job token without job id and attempt in its subject")
        presented = (identity.job_id, identity.attempt)
        if identity.job_id != expect.job_id:
            raise WrongJob(presented, (expect.job_id, expect.attempt or 0))
        if expect.attempt is not None and identity.attempt != expect.attempt:
            if identity.attempt < expect.attempt:
                raise StaleAttempt(expect.job_id, identity.attempt, expect.attempt)
            raise WrongJob(presented, (expect.job_id, expect.attempt))


def _as_chain(presented) -> list[x509.Certificate]:
    if isinstance(presented, x509.Certificate):
        return [presented]
    if isinstance(presented, (bytes, bytearray, memoryview)):
        data = bytes(presented)
        if data.lstrip().startswith(b"-----"):
            return load_certificates(data, "presented token")
        try:
            return [x509.load_der_x509_certificate(data)]
        except ValueError as exc:
            raise MalformedToken(f"neither PEM nor DER ({exc})") from None
    if isinstance(presented, (list, tuple)) and presented and all(isinstance(c, x509.Certificate) for c in presented):
        return list(presented)
    raise MalformedToken(f"cannot read a token from {type(presented).__name__}")


def _server_subject(leaf: x509.Certificate) -> x509.DNSName:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        raise MalformedToken("host token without a subjectAltName") from None
    names = san.get_values_for_type(x509.DNSName)
    if not names:
        raise MalformedToken("host token without a DNS name")
    return x509.DNSName(names[0])


