"""The job token's client without cryptography: pilot.api.jobclient.job_of_token.

The wrapper checks that a refreshed token (from the agent, over the pipe) is
for its own job and attempt by reading the job URN of the token's
subjectAltName with a small DER walk, so that it never loads `cryptography`.
These tests hand that reader what a confused or hostile sender could: tokens
of other roles and jobs, a URN put where the reader must not look, garbage,
and every truncation and byte flip of a real token. Each is refused with a
UsageError naming the problem, or read exactly as `cryptography` reads it;
nothing else ever escapes. (The real broker and the real wrapper process:
tests/test_broker_server.py and tests/test_pilot_e2e.py.)
"""

from __future__ import annotations

import base64
import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.ca import CertificateAuthority
from pilot.api.jobclient import job_of_token
from pilot.errors import UsageError
from pilot.tokens import TokenRole, parse_identity
from pilot.tokens.files import certificate_pem


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


def job_token(ca: CertificateAuthority, job_id: int, attempt: int) -> bytes:
    token = ca.new_token(TokenRole.JOB, "alice", job_id=job_id, attempt=attempt)
    return certificate_pem(list(token.chain))


def der_of(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def pem_of(der: bytes) -> bytes:
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return b"-----BEGIN CERTIFICATE-----\n" + b"\n".join(lines) + b"\n-----END CERTIFICATE-----\n"


def self_signed(subject_cn: str, uris: list[str]) -> bytes:
    """A certificate made by anyone (no CA of ours): what a sender could put together."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now)
               .not_valid_after(now + datetime.timedelta(hours=1)))
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("job_id, attempt", [(0, 1), (7, 3), (2**62, 999_999_999)])
def test_reads_the_job_and_attempt_cryptography_reads(ca, job_id, attempt):
    chain = job_token(ca, job_id, attempt)
    identity = parse_identity(x509.load_pem_x509_certificates(chain)[0])
    assert job_of_token(chain) == (identity.job_id, identity.attempt) == (job_id, attempt)


@pytest.mark.parametrize("role, kwargs", [
    (TokenRole.USER, {}), (TokenRole.ADMIN, {}), (TokenRole.AGENT, {"site": "S", "queue": "q"}),
])
def test_a_token_of_another_role_is_refused(ca, role, kwargs):
    chain = certificate_pem(list(ca.new_token(role, "alice", **kwargs).chain))
    with pytest.raises(UsageError, match="not a job token this client can read .*no job URN"):
        job_of_token(chain)


def test_a_job_urn_outside_the_subject_alt_name_is_not_read():
    """Only the subjectAltName counts: a URN in the subject's name (or anywhere else) is not a job."""
    with pytest.raises(UsageError, match="no job URN"):
        job_of_token(self_signed("urn:splitpilot:job:5:1", []))
    with pytest.raises(UsageError, match="no job URN"):
        job_of_token(self_signed("x", ["urn:splitpilot:job:5:1:extra", "urn:splitpilot:job:5"]))
    assert job_of_token(self_signed("urn:splitpilot:job:5:1", ["urn:splitpilot:job:6:2"])) == (6, 2)


@pytest.mark.parametrize("data, words", [
    (b"", "no PEM certificate"),
    (b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n", "not a job token"),
    (b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n", "not a job token"),
    (b"-----BEGIN CERTIFICATE-----\nMIQ=\n-----END CERTIFICATE-----\n", "not a job token"),
])
def test_garbage_is_refused_with_the_fix(data, words):
    with pytest.raises(UsageError, match=words) as refused:
        job_of_token(data)
    assert "fix:" in str(refused.value) or "no PEM certificate" in str(refused.value)


def test_a_length_claiming_more_than_the_certificate_holds_is_refused(ca):
    der = bytearray(der_of(job_token(ca, 4, 1)))
    assert der[1] == 0x82     # a long form length: two bytes follow
    der[2:4] = (0xFF, 0xFF)   # the outer SEQUENCE claims 64 KiB
    with pytest.raises(UsageError, match="longer than what holds it"):
        job_of_token(pem_of(bytes(der)))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_every_cut_or_flipped_byte_is_read_right_or_refused(ca_for_fuzz, data):
    """Truncations and byte flips of a real token: either refused with UsageError, or read as a job that
    the bytes really name (cryptography, when it can still parse them, agrees)."""
    der = bytearray(ca_for_fuzz)
    if data.draw(st.booleans()):
        der = der[:data.draw(st.integers(0, len(der) - 1))]
    else:
        at = data.draw(st.integers(0, len(der) - 1))
        der[at] = data.draw(st.integers(0, 255))
    try:
        found = job_of_token(pem_of(bytes(der)))
    except UsageError:
        return
    try:
        identity = parse_identity(x509.load_der_x509_certificate(bytes(der)))
    except Exception:  # noqa: BLE001 - cryptography refuses what our walk need not (e.g. a flipped signature bit)
        assert found[0] >= 0 and found[1] >= 0
        return
    assert found == (identity.job_id, identity.attempt)


@pytest.fixture(scope="module")
def ca_for_fuzz(ca) -> bytes:
    return der_of(job_token(ca, 12, 2))
