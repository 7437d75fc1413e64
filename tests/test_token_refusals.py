"""The refusal matrix: every bad token refused with the right error; every role accepted.

Each case builds a token, presents it with an expectation, and names the
error class it must get. The CA and time are fixed so cases are exact.
"""

from __future__ import annotations

import itertools

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from tokens_helpers import AGENT_DN, AGENT_URN, HOUR, NOW, hand_made, name, pem, token

from broker.ca import CertificateAuthority
from pilot.tokens import (
    Expectation,
    ExpiredToken,
    MalformedToken,
    NotYetValidToken,
    StaleAttempt,
    TokenRefused,
    TokenRole,
    TokenVerifier,
    UntrustedIssuer,
    WrongJob,
    WrongRole,
    WrongSite,
)

R = TokenRole


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(name="splitpilot CA", now=NOW - 24 * HOUR)


@pytest.fixture(scope="module")
def verifier(ca) -> TokenVerifier:
    return TokenVerifier([ca.certificate])


def expect(role: TokenRole) -> Expectation:
    return {R.AGENT: Expectation.role(R.AGENT, site="SITE-A"),
            R.JOB: Expectation.role(R.JOB, job_id=7, attempt=2)}.get(role, Expectation.role(role))


# --------------------------------------------------------------- positive path

@pytest.mark.parametrize("role", list(TokenRole))
def test_every_role_is_accepted_where_it_is_required(ca, verifier, role):
    cert = token(ca, role)
    identity = verifier.verify(pem(cert) + pem(ca.certificate), expect(role), now=NOW + HOUR)
    assert identity.role is role and identity.subject == "someone"
    assert identity.not_after == cert.not_valid_after_utc


def test_accepted_forms_of_presentation(ca, verifier):
    cert = token(ca, R.USER)
    der = cert.public_bytes(serialization.Encoding.DER)
    for presented in (cert, [cert], pem(cert), der):
        assert verifier.verify(presented, Expectation.role(R.USER), now=NOW).subject == "someone"


def test_several_roles_may_be_allowed(ca, verifier):
    assert verifier.verify(token(ca, R.ADMIN), Expectation.role(R.USER, R.ADMIN), now=NOW).role is R.ADMIN


def test_job_scope_is_ignored_when_not_asked(ca, verifier):
    assert verifier.verify(token(ca, R.JOB), Expectation.role(R.JOB), now=NOW).job_id == 7


# ------------------------------------------------------------------ the matrix

def _role_cases():
    for required, presented in itertools.permutations(TokenRole, 2):
        yield (f"{presented.value}-as-{required.value}", lambda ca, p=presented: token(ca, p),
               expect(required), NOW, WrongRole)


def _other_ca_token(_ca):
    return token(CertificateAuthority.create(name="another CA", now=NOW - 24 * HOUR), R.AGENT)


def _look_alike_token(_ca):
    # Same CA name, another key: only the signature can tell.
    return token(CertificateAuthority.create(name="splitpilot CA", now=NOW - 24 * HOUR), R.AGENT)


def _self_signed_impostor(_ca):
    key = x509.CertificateBuilder  # noqa: F841 (documenting: no CA involved)
    from pilot.tokens import generate_key
    own = generate_key()
    return hand_made(own, name(*AGENT_DN), name(*AGENT_DN), san=[AGENT_URN])


def _impostor_claiming_our_ca(ca):
    from pilot.tokens import generate_key
    return hand_made(generate_key(), ca.certificate.subject, name(*AGENT_DN), san=[AGENT_URN])


def _tampered_site(ca):
    der = token(ca, R.AGENT, site="SITE-B").public_bytes(serialization.Encoding.DER)
    return der.replace(b"site=SITE-B", b"site=SITE-A")  # same length: parses, signature breaks


def _tampered_signature(ca):
    der = bytearray(token(ca, R.AGENT).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01
    return bytes(der)


def _truncated_pem(ca):
    text = pem(token(ca, R.AGENT))
    return text[: len(text) // 2]


def _no_san(ca):
    return hand_made(ca.key, ca.certificate.subject, name(*AGENT_DN), san=None)


def _san_disagrees(ca):
    return hand_made(ca.key, ca.certificate.subject, name(*AGENT_DN),
                     san=[x509.UniformResourceIdentifier("urn:splitpilot:agent:SITE-B:default:p1")])


def _unknown_role(ca):
    return hand_made(ca.key, ca.certificate.subject, name(("O", "splitpilot"), ("OU", "superuser"), ("CN", "x")),
                     san=[x509.UniformResourceIdentifier("urn:splitpilot:superuser:x")])


def _agent_without_queue(ca):
    return hand_made(ca.key, ca.certificate.subject, name(*AGENT_DN[:4]),
                     san=[x509.UniformResourceIdentifier("urn:splitpilot:agent:SITE-A:None:p1")])


def _agent_with_server_eku(ca):
    return hand_made(ca.key, ca.certificate.subject, name(*AGENT_DN), san=[AGENT_URN],
                     eku=ExtendedKeyUsageOID.SERVER_AUTH)


def _foreign_organisation(ca):
    return hand_made(ca.key, ca.certificate.subject, name(("O", "other"), ("OU", "agent"), ("CN", "p1")),
                     san=[AGENT_URN])


def _job_id_not_a_number(ca):
    return hand_made(ca.key, ca.certificate.subject,
                     name(("O", "splitpilot"), ("OU", "job"), ("CN", "a"), ("CN", "job=x"), ("CN", "attempt=1")),
                     san=[x509.UniformResourceIdentifier("urn:splitpilot:job:x:1")])


AGENT_A = Expectation.role(R.AGENT, site="SITE-A")
JOB_7_2 = Expectation.role(R.JOB, job_id=7, attempt=2)

CASES = [
    *_role_cases(),
    ("expired-agent", lambda ca: token(ca, R.AGENT), AGENT_A, NOW + 3 * 24 * HOUR, ExpiredToken),
    ("expired-job", lambda ca: token(ca, R.JOB, ttl=HOUR), JOB_7_2, NOW + 2 * HOUR, ExpiredToken),
    ("not-yet-valid", lambda ca: token(ca, R.AGENT, now=NOW + 48 * HOUR), AGENT_A, NOW, NotYetValidToken),
    ("job-for-another-job", lambda ca: token(ca, R.JOB, job_id=8), JOB_7_2, NOW, WrongJob),
    ("stale-attempt", lambda ca: token(ca, R.JOB, attempt=1), JOB_7_2, NOW, StaleAttempt),
    ("future-attempt", lambda ca: token(ca, R.JOB, attempt=3), JOB_7_2, NOW, WrongJob),
    ("agent-of-another-site", lambda ca: token(ca, R.AGENT, site="SITE-B"), AGENT_A, NOW, WrongSite),
    ("other-ca", _other_ca_token, AGENT_A, NOW, UntrustedIssuer),
    ("look-alike-ca", _look_alike_token, AGENT_A, NOW, UntrustedIssuer),
    ("self-signed-impostor-with-right-dn", _self_signed_impostor, AGENT_A, NOW, UntrustedIssuer),
    ("impostor-claiming-our-ca-name", _impostor_claiming_our_ca, AGENT_A, NOW, UntrustedIssuer),
    ("tampered-subject-bytes", _tampered_site, AGENT_A, NOW, UntrustedIssuer),
    ("tampered-signature-bytes", _tampered_signature, AGENT_A, NOW, (UntrustedIssuer, MalformedToken)),
    ("truncated-pem", _truncated_pem, AGENT_A, NOW, MalformedToken),
    ("garbage-bytes", lambda ca: b"\x30\x82garbage", AGENT_A, NOW, MalformedToken),
    ("pem-without-certificate", lambda ca: b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
     AGENT_A, NOW, MalformedToken),
    ("empty", lambda ca: b"", AGENT_A, NOW, MalformedToken),
    ("no-subject-alt-name", _no_san, AGENT_A, NOW, MalformedToken),
    ("san-disagrees-with-dn", _san_disagrees, AGENT_A, NOW, MalformedToken),
    ("unknown-role", _unknown_role, AGENT_A, NOW, MalformedToken),
    ("agent-without-queue", _agent_without_queue, AGENT_A, NOW, MalformedToken),
    ("agent-with-server-eku", _agent_with_server_eku, AGENT_A, NOW, MalformedToken),
    ("foreign-organisation", _foreign_organisation, AGENT_A, NOW, MalformedToken),
    ("job-id-not-a-number", _job_id_not_a_number, JOB_7_2, NOW, MalformedToken),
    ("the-ca-itself", lambda ca: ca.certificate, AGENT_A, NOW, MalformedToken),
    ("not-a-certificate-object", lambda ca: 12345, AGENT_A, NOW, MalformedToken),
]


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("label,build,expectation,now,error", CASES, ids=[c[0] for c in CASES])
def test_refusal(ca, verifier, label, build, expectation, now, error):
    with pytest.raises(TokenRefused) as caught:
        verifier.verify(build(ca), expectation, now=now)
    assert isinstance(caught.value, error), f"{label}: got {type(caught.value).__name__}: {caught.value}"
    assert str(caught.value)  # a message a person can read


def test_refusal_details_are_attributes(ca, verifier):
    with pytest.raises(StaleAttempt) as stale:
        verifier.verify(token(ca, R.JOB, attempt=1), JOB_7_2, now=NOW)
    assert (stale.value.job_id, stale.value.presented, stale.value.current) == (7, 1, 2)
    with pytest.raises(WrongSite) as site:
        verifier.verify(token(ca, R.AGENT, site="SITE-B"), AGENT_A, now=NOW)
    assert (site.value.presented, site.value.expected) == ("SITE-B", "SITE-A")
    with pytest.raises(WrongRole) as role:
        verifier.verify(token(ca, R.JOB), AGENT_A, now=NOW)
    assert role.value.presented == "job" and role.value.expected == ("agent",)
    with pytest.raises(ExpiredToken) as expired:
        verifier.verify(token(ca, R.USER, ttl=HOUR), Expectation.role(R.USER), now=NOW + 2 * HOUR)
    assert expired.value.not_after == NOW + HOUR
