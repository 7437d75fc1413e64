"""The internal certificate authority: create it, load it, issue tokens.

A CA directory holds `ca.key` (0600, refused when others can read it),
`ca.crt`, and `policy.toml` (the longest lifetime per role; lowered from the
defaults, never raised). Tokens are issued against a public key: for job
tokens the key is made on the worker node and only its public half reaches
the broker, so the job's private key never crosses the network, and the
broker never pays for key generation (JAliEn's RSA key per job capped it at
~16 tokens/s per core).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from pilot.durations import format_duration
from pilot.errors import UsageError
from pilot.tokens.errors import CertificateAuthorityError, IssueError, KeyFileError, MalformedToken
from pilot.tokens.files import (
    KeyPermissions,
    PrivateKey,
    PublicKey,
    TokenFile,
    certificate_pem,
    generate_key,
    private_key_pem,
    read_private,
    write_private,
    write_public,
)
from pilot.tokens.identity import (
    DEFAULT_MAX_LIFETIME,
    ORGANISATION,
    ROLE_EKU,
    Identity,
    TokenRole,
    check_name,
    subject_name,
    subject_urn,
)
from pilot.tomlschema import Checker, TomlSchemaError

KEY_FILE = "ca.key"
CERT_FILE = "ca.crt"
POLICY_FILE = "policy.toml"

#: notBefore is set this far in the past, so that a verifier whose clock is
#: a little behind the issuer's accepts a fresh token.
CLOCK_SKEW = datetime.timedelta(minutes=5)


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


@dataclass(frozen=True)
class CAPolicy:
    """Issuance limits of one CA."""

    max_lifetime: Mapping[TokenRole, datetime.timedelta] = field(
        default_factory=lambda: types.MappingProxyType(dict(DEFAULT_MAX_LIFETIME)))
    clock_skew: datetime.timedelta = CLOCK_SKEW

    @classmethod
    def with_limits(cls, limits: Mapping[TokenRole, datetime.timedelta]) -> CAPolicy:
        merged = dict(DEFAULT_MAX_LIFETIME)
        for role, limit in limits.items():
            if limit > DEFAULT_MAX_LIFETIME[role]:
                raise UsageError(f"max lifetime of {role.value} tokens may only be lowered: "
                                 f"{format_duration(limit)} > {format_duration(DEFAULT_MAX_LIFETIME[role])}")
            merged[role] = limit
        return cls(types.MappingProxyType(merged))

    def to_toml(self) -> str:
        lines = ["# splitpilot CA policy: the longest lifetime each role may be issued with.",
                 "# Values may be lowered, never raised above the defaults.", "[max_lifetime]"]
        lines += [f'{role.value} = "{format_duration(limit)}"' for role, limit in self.max_lifetime.items()]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, text: str, source: str) -> CAPolicy:
        roles = tuple(role.value for role in TokenRole)
        check = Checker(source, examples={role: '"12h"' for role in roles})
        try:
            data = check.load_text(text, 'write e.g. [max_lifetime] agent = "12h"')
            check.unknown(data, ("max_lifetime",), "")
            table = check.table(data.get("max_lifetime", {}), "max_lifetime", "max_lifetime") or {}
            check.unknown(table, roles, "max_lifetime")
            limits = {}
            for role in TokenRole:
                if role.value in table:
                    # Above the default: with_limits says it may only be lowered.
                    seconds = check.duration_s(table[role.value], f"max_lifetime.{role.value}", role.value,
                                               low_s=1, high_s=10 * 366 * 86400)
                    if seconds is not None:
                        limits[role] = datetime.timedelta(seconds=seconds)
            check.raise_problems()
        except TomlSchemaError as exc:
            detail = "; ".join(f"{p.field}: {p.problem}; fix: {p.fix}" for p in exc.problems)
            raise CertificateAuthorityError(source, f"policy: {detail}") from None
        return cls.with_limits(limits)


class CertificateAuthority:
    """The CA key and certificate, and the rules it issues by."""

    def __init__(self, key: PrivateKey, certificate: x509.Certificate, policy: CAPolicy | None = None,
                 directory: str | None = None) -> None:
        self.key = key
        self.certificate = certificate
        self.policy = policy or CAPolicy()
        self.directory = directory
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
        self._hash = hashes.SHA256()

    # ------------------------------------------------------------ creation

    @classmethod
    def create(cls, *, key_type: str = "ec", name: str = "splitpilot CA",
               lifetime: datetime.timedelta = datetime.timedelta(days=3650),
               policy: CAPolicy | None = None, now: datetime.datetime | None = None) -> CertificateAuthority:
        """A new CA in memory (see `init` for one on disk)."""
        key = generate_key(key_type)
        now = now or _utcnow()
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANISATION),
                             x509.NameAttribute(NameOID.COMMON_NAME, name)])
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate, policy)

    @classmethod
    def init(cls, directory: str, **kwargs) -> CertificateAuthority:
        """Create a CA in DIRECTORY; refuse to overwrite an existing one."""
        for existing in (KEY_FILE, CERT_FILE):
            if os.path.exists(os.path.join(directory, existing)):
                raise CertificateAuthorityError(directory, f"a CA exists already ({existing}); refusing to "
                                                           "overwrite it: choose another directory")
        os.makedirs(directory, mode=0o700, exist_ok=True)
        mode = stat.S_IMODE(os.stat(directory).st_mode)
        if mode & stat.S_IWOTH:
            raise CertificateAuthorityError(directory, f"directory is world-writable (mode {mode:04o}); "
                                                       f"fix: chmod 700 {directory}")
        ca = cls.create(**kwargs)
        ca.directory = directory
        write_private(os.path.join(directory, KEY_FILE), private_key_pem(ca.key))
        write_public(os.path.join(directory, CERT_FILE), certificate_pem([ca.certificate]))
        write_public(os.path.join(directory, POLICY_FILE), ca.policy.to_toml().encode())
        return ca

    @classmethod
    def load(cls, directory: str, permissions: KeyPermissions = KeyPermissions.REFUSE) -> CertificateAuthority:
        """Load the CA in DIRECTORY, checking its key is private and matches."""
        if not os.path.isdir(directory):
            raise CertificateAuthorityError(directory, "no such directory; fix: splitpilot ca init "
                                                       f"{directory}")
        key_path, cert_path = os.path.join(directory, KEY_FILE), os.path.join(directory, CERT_FILE)
        for path in (key_path, cert_path):
            if not os.path.exists(path):
                raise CertificateAuthorityError(directory, f"{os.path.basename(path)} is missing; this is not "
                                                           "a complete CA (splitpilot ca init creates one)")
        try:
            key_pem = read_private(key_path, permissions)
        except KeyFileError as exc:
            raise CertificateAuthorityError(directory, exc.detail) from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
            with open(cert_path, "rb") as handle:
                certificate = x509.load_pem_x509_certificate(handle.read())
        except ValueError as exc:
            raise CertificateAuthorityError(directory, f"unreadable key or certificate ({exc})") from None
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise CertificateAuthorityError(directory, f"ca.key is a {type(key).__name__}, not an elliptic-curve or "
                                                       "RSA key; fix: make a new CA with splitpilot ca init")
        if key.public_key() != certificate.public_key():
            raise CertificateAuthorityError(directory, "ca.key does not belong to ca.crt")
        policy_path = os.path.join(directory, POLICY_FILE)
        policy = None
        if os.path.exists(policy_path):
            with open(policy_path, encoding="utf-8") as handle:
                policy = CAPolicy.from_toml(handle.read(), policy_path)
        return cls(key, certificate, policy, directory)

    # ------------------------------------------------------------- issuing

    def issue(self, role: TokenRole, subject: str, public_key: PublicKey, *,
              ttl: datetime.timedelta | None = None, site: str | None = None, queue: str | None = None,
              job_id: int | None = None, attempt: int | None = None, dns_names: Iterable[str] = (),
              ip_addresses: Iterable[str] = (), not_after_cap: datetime.datetime | None = None,
              now: datetime.datetime | None = None) -> x509.Certificate:
        """Sign a token certificate for PUBLIC_KEY.

        TTL defaults to, and may not exceed, the role's max lifetime;
        NOT_AFTER_CAP (e.g. the requesting agent's own expiry) shortens it.
        """
        check_name("subject", subject)
        limit = self.policy.max_lifetime[role]
        ttl = limit if ttl is None else ttl
        if ttl <= datetime.timedelta(0):
            raise IssueError("the lifetime must be positive")
        if ttl > limit:
            raise IssueError(f"{role.value} tokens live at most {format_duration(limit)} here, "
                             f"not {format_duration(ttl)}; fix: ask for a shorter --ttl")
        if role is TokenRole.AGENT:
            check_name("site", site or "")
            check_name("queue", queue or "")
        elif site is not None or queue is not None:
            raise IssueError(f"only agent tokens carry a site or queue, not {role.value} tokens")
        if role is TokenRole.JOB:
            if not isinstance(job_id, int) or job_id < 0 or not isinstance(attempt, int) or attempt < 1:
                raise IssueError("a job token needs a job id >= 0 and an attempt >= 1")
            if not (isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1)):
                raise IssueError("job tokens are issued for ECDSA P-256 keys only (cheap to make on the "
                                 "worker node); fix: generate the job key with splitpilot's key helper")
        elif job_id is not None or attempt is not None:
            raise IssueError(f"only job tokens carry a job id and attempt, not {role.value} tokens")
        if not isinstance(public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
            raise IssueError(f"unsupported public key type {type(public_key).__name__}")
        now = now or _utcnow()
        not_after = now + ttl
        if not_after_cap is not None:
            if not_after_cap <= now:
                raise IssueError("the requesting token has expired: no token can outlive it")
            not_after = min(not_after, not_after_cap)
        not_after = min(not_after, self.certificate.not_valid_after_utc)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(
            subject_urn(role, subject, site=site, queue=queue, job_id=job_id, attempt=attempt))]
        if role is TokenRole.HOST:
            names += [x509.DNSName(n) for n in dns_names]
            names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        elif dns_names or ip_addresses:
            raise IssueError("only host tokens carry DNS names or IP addresses")
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject_name(role, subject, site=site, queue=queue, job_id=job_id, attempt=attempt))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - self.policy.clock_skew)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ROLE_EKU[role]]), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(self._aki, critical=False)
        )
        return builder.sign(self.key, self._hash)

    def issue_job_token(self, agent: Identity, *, job_id: int, attempt: int, owner: str,
                        public_key: PublicKey, ttl: datetime.timedelta | None = None,
                        now: datetime.datetime | None = None) -> x509.Certificate:
        """A job token asked for by AGENT (already verified): never outlives it."""
        if agent.role is not TokenRole.AGENT:
            raise IssueError(f"job tokens are issued on an agent's request, not a {agent.role.value}'s")
        return self.issue(TokenRole.JOB, owner, public_key, ttl=ttl, job_id=job_id, attempt=attempt,
                          not_after_cap=agent.not_after, now=now)

    def new_token(self, role: TokenRole, subject: str, **kwargs) -> TokenFile:
        """Generate a key here and issue a token for it (CLI, tests, host certs)."""
        key = generate_key("ec")
        return TokenFile((self.issue(role, subject, key.public_key(), **kwargs), self.certificate), key)


def public_key_from_request(data: bytes) -> PublicKey:
    """The public key of a CSR (its signature checked: proof of possession)
    or of a bare SubjectPublicKeyInfo, PEM or DER."""
    stripped = data.strip()
    try:
        if stripped.startswith(b"-----BEGIN CERTIFICATE REQUEST-----"):
            csr = x509.load_pem_x509_csr(stripped)
        elif stripped.startswith(b"-----BEGIN PUBLIC KEY-----"):
            return _checked_public(serialization.load_pem_public_key(stripped))
        else:
            try:
                return _checked_public(serialization.load_der_public_key(data))
            except ValueError:
                csr = x509.load_der_x509_csr(data)
    except ValueError as exc:
        raise MalformedToken(f"not a certificate request or public key ({exc})") from None
    try:
        if not csr.is_signature_valid:
            raise MalformedToken("certificate request signature does not verify (not made with its key)")
    except InvalidSignature:
        raise MalformedToken("certificate request signature does not verify") from None
    return _checked_public(csr.public_key())


def _checked_public(key) -> PublicKey:
    if not isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise MalformedToken(f"unsupported public key type {type(key).__name__}")
    return key
