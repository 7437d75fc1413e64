"""Builders for token tests: CAs, tokens and hand-made bad certificates."""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.ca import CertificateAuthority
from pilot.tokens import TokenRole, generate_key

NOW = datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.UTC)
HOUR = datetime.timedelta(hours=1)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def token(ca: CertificateAuthority, role: TokenRole, subject: str = "someone", *, now=NOW, **scope):
    """Issue a certificate of ROLE (with the scope fields the role needs)."""
    defaults = {TokenRole.AGENT: {"site": "SITE-A", "queue": "default"},
                TokenRole.JOB: {"job_id": 7, "attempt": 2},
                TokenRole.HOST: {"dns_names": ["broker.example"]}}.get(role, {})
    return ca.issue(role, subject, generate_key().public_key(), now=now, **{**defaults, **scope})


def hand_made(signer_key, issuer: x509.Name, subject: x509.Name, *, san=None, eku=ExtendedKeyUsageOID.CLIENT_AUTH,
              now=NOW) -> x509.Certificate:
    """A certificate built outside CertificateAuthority.issue (for malformed cases)."""
    key = generate_key()
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - HOUR).not_valid_after(now + 24 * HOUR)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
                              critical=False))
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(signer_key, hashes.SHA256())


def name(*pairs: tuple[str, str]) -> x509.Name:
    oids = {"O": NameOID.ORGANIZATION_NAME, "OU": NameOID.ORGANIZATIONAL_UNIT_NAME, "CN": NameOID.COMMON_NAME}
    return x509.Name([x509.NameAttribute(oids[k], v) for k, v in pairs])


AGENT_DN = (("O", "splitpilot"), ("OU", "agent"), ("CN", "p1"), ("CN", "site=SITE-A"), ("CN", "queue=default"))
AGENT_URN = x509.UniformResourceIdentifier("urn:splitpilot:agent:SITE-A:default:p1")
