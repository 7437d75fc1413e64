"""Who a token speaks for: roles, their names in X.509, and parsing them back.

A token is an X.509 certificate from the installation's CA. Its subject DN
carries the role and the scope, for people and logs:

    user    O=splitpilot, OU=user,  CN=<name>
    admin   O=splitpilot, OU=admin, CN=<name>
    host    O=splitpilot, OU=host,  CN=<host name>
    agent   O=splitpilot, OU=agent, CN=<pilot name>, CN=site=<site>, CN=queue=<queue>
    job     O=splitpilot, OU=job,   CN=<owner>, CN=job=<id>, CN=attempt=<n>

and its subjectAltName carries the same as one URI for machines (and for the
path verifier, which needs a SAN): urn:splitpilot:<role>:<scope...>:<name>,
e.g. urn:splitpilot:job:<id>:<attempt>. Parsing checks that both agree, so
a certificate whose DN and SAN tell different stories is malformed.
"""

from __future__ import annotations

import datetime
import enum
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pilot.tokens.errors import IssueError, MalformedToken

ORGANISATION = "splitpilot"
URN_PREFIX = "urn:splitpilot:"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
_DAY = datetime.timedelta(days=1)


class TokenRole(enum.StrEnum):
    """What a token may do; each role is a separate kind of certificate."""

    USER = "user"     # a person submitting and managing jobs
    AGENT = "agent"   # a job agent: match jobs and report pilot health, at one site
    JOB = "job"       # one job attempt: its own states, inputs, outputs, token refresh
    HOST = "host"     # the broker's server certificate
    ADMIN = "admin"   # operators: drain sites, list pilots, requeue


#: Longest lifetime each role may be issued with (JAliEn's values; a CA may
#: configure them down, never up).
DEFAULT_MAX_LIFETIME: dict[TokenRole, datetime.timedelta] = {
    TokenRole.USER: 31 * _DAY,
    TokenRole.AGENT: 2 * _DAY,
    TokenRole.JOB: 2 * _DAY,
    TokenRole.HOST: 365 * _DAY,
    TokenRole.ADMIN: 31 * _DAY,
}

#: Extended key usage per role: only the broker serves TLS.
ROLE_EKU: dict[TokenRole, x509.ObjectIdentifier] = {
    TokenRole.USER: ExtendedKeyUsageOID.CLIENT_AUTH,
    TokenRole.AGENT: ExtendedKeyUsageOID.CLIENT_AUTH,
    TokenRole.JOB: ExtendedKeyUsageOID.CLIENT_AUTH,
    TokenRole.HOST: ExtendedKeyUsageOID.SERVER_AUTH,
    TokenRole.ADMIN: ExtendedKeyUsageOID.CLIENT_AUTH,
}


def check_name(kind: str, value: str) -> str:
    """A subject, site or queue name: short, printable, no separators."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise IssueError(f"{kind} {value!r} is not a valid name: use 1-64 letters, digits and . _ @ + - "
                         "(starting with a letter or digit)")
    return value


@dataclass(frozen=True)
class Identity:
    """What a verified (or merely parsed) token says about its holder."""

    role: TokenRole
    subject: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    serial: int
    fingerprint: str                 # SHA-256 of the DER certificate, hex
    issuer: str                      # RFC 4514
    site: str | None = None          # agent
    queue: str | None = None         # agent
    job_id: int | None = None        # job
    attempt: int | None = None       # job
    dns_names: tuple[str, ...] = ()  # host

    @property
    def dn(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in dn_attributes(self))

    def describe(self) -> str:
        scope = {TokenRole.AGENT: f" at site {self.site} queue {self.queue}",
                 TokenRole.JOB: f" for job {self.job_id} attempt {self.attempt}"}.get(self.role, "")
        return f"{self.role.value} token of {self.subject}{scope}"


def dn_attributes(identity: Identity) -> list[tuple[str, str]]:
    """The subject DN, as (short name, value) pairs in order."""
    pairs = [("O", ORGANISATION), ("OU", identity.role.value), ("CN", identity.subject)]
    if identity.role is TokenRole.AGENT:
        pairs += [("CN", f"site={identity.site}"), ("CN", f"queue={identity.queue}")]
    elif identity.role is TokenRole.JOB:
        pairs += [("CN", f"job={identity.job_id}"), ("CN", f"attempt={identity.attempt}")]
    return pairs


def subject_name(role: TokenRole, subject: str, *, site: str | None = None, queue: str | None = None,
                 job_id: int | None = None, attempt: int | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANISATION),
             x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
             x509.NameAttribute(NameOID.COMMON_NAME, subject)]
    if role is TokenRole.AGENT:
        attrs += [x509.NameAttribute(NameOID.COMMON_NAME, f"site={site}"),
                  x509.NameAttribute(NameOID.COMMON_NAME, f"queue={queue}")]
    elif role is TokenRole.JOB:
        attrs += [x509.NameAttribute(NameOID.COMMON_NAME, f"job={job_id}"),
                  x509.NameAttribute(NameOID.COMMON_NAME, f"attempt={attempt}")]
    return x509.Name(attrs)


def subject_urn(role: TokenRole, subject: str, *, site: str | None = None, queue: str | None = None,
                job_id: int | None = None, attempt: int | None = None) -> str:
    if role is TokenRole.AGENT:
        return f"{URN_PREFIX}agent:{site}:{queue}:{subject}"
    if role is TokenRole.JOB:
        return f"{URN_PREFIX}job:{job_id}:{attempt}"
    return f"{URN_PREFIX}{role.value}:{subject}"


def parse_identity(cert: x509.Certificate, *, subject: x509.Name | None = None,
                   issuer: x509.Name | None = None,
                   alt_names: list[x509.GeneralName] | None = None) -> Identity:
    """Read the identity a certificate claims (no trust decision is made here).

    SUBJECT, ISSUER and ALT_NAMES (the subjectAltName entries) may be passed
    when the caller has them already: cryptography rebuilds Name and
    extension objects on every access, which costs more than anything else
    here (the path verifier returns the alt names of a client certificate).
    """
    org: list[str] = []
    units: list[str] = []
    commons: list[str] = []
    by_oid = {NameOID.ORGANIZATION_NAME: org, NameOID.ORGANIZATIONAL_UNIT_NAME: units,
              NameOID.COMMON_NAME: commons}
    try:
        name = cert.subject if subject is None else subject
        for attribute in name:
            bucket = by_oid.get(attribute.oid)
            if bucket is None:
                raise MalformedToken(f"unexpected attribute {attribute.oid.dotted_string} in the subject")
            if not isinstance(attribute.value, str):   # O, OU and CN are strings; never bytes here
                raise MalformedToken(f"attribute {attribute.oid.dotted_string} in the subject is not a string")
            bucket.append(attribute.value)
    except ValueError as exc:
        raise MalformedToken(f"unreadable subject name ({exc})") from None
    if org != [ORGANISATION] or len(units) != 1:
        raise MalformedToken(f"subject {name.rfc4514_string()!r} is not a splitpilot token name")
    try:
        role = TokenRole(units[0])
    except ValueError:
        raise MalformedToken(f"unknown role {units[0]!r} in the subject") from None
    if not commons or "=" in commons[0]:
        raise MalformedToken("subject has no holder name (first CN)")
    holder = commons[0]
    extra = dict(_key_value(c) for c in commons[1:])
    if len(extra) != len(commons) - 1:
        raise MalformedToken("a scope field appears twice in the subject")
    site = queue = None
    job_id = attempt = None
    expected_keys = {TokenRole.AGENT: {"site", "queue"}, TokenRole.JOB: {"job", "attempt"}}.get(role, set())
    if set(extra) != expected_keys:
        raise MalformedToken(f"a {role.value} token's subject needs exactly {sorted(expected_keys) or 'no'} "
                             f"scope fields, found {sorted(extra)}")
    if role is TokenRole.AGENT:
        site, queue = extra["site"], extra["queue"]
    elif role is TokenRole.JOB:
        try:
            job_id, attempt = int(extra["job"]), int(extra["attempt"])
        except ValueError:
            raise MalformedToken("job id and attempt in the subject must be integers") from None
    if alt_names is None:
        try:
            alt_names = list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        except x509.ExtensionNotFound:
            raise MalformedToken("no subjectAltName") from None
        except ValueError as exc:
            raise MalformedToken(f"unreadable extensions ({exc})") from None
    urns = [n.value for n in alt_names
            if isinstance(n, x509.UniformResourceIdentifier) and n.value.startswith(URN_PREFIX)]
    expected_urn = subject_urn(role, holder, site=site, queue=queue, job_id=job_id, attempt=attempt)
    if urns != [expected_urn]:
        raise MalformedToken(f"subjectAltName {urns} does not match the subject (expected {expected_urn})")
    return Identity(
        role=role, subject=holder, site=site, queue=queue, job_id=job_id, attempt=attempt,
        not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
        serial=cert.serial_number, fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        issuer=(cert.issuer if issuer is None else issuer).rfc4514_string(),
        dns_names=tuple(n.value for n in alt_names if isinstance(n, x509.DNSName)),
    )


def _key_value(common_name: str) -> tuple[str, str]:
    key, sep, value = common_name.partition("=")
    if not sep or not value:
        raise MalformedToken(f"unexpected CN {common_name!r} in the subject")
    return key, value
