"""The CA on disk, token files, issuance rules, and the ca/token command line."""

from __future__ import annotations

import datetime
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tokens_helpers import HOUR, NOW, pem, token

from broker.ca import CAPolicy, CertificateAuthority, public_key_from_request
from pilot.durations import format_duration, parse_duration
from pilot.errors import UsageError
from pilot.tokens import (
    CertificateAuthorityError,
    Expectation,
    IssueError,
    KeyFileError,
    KeyPermissions,
    MalformedToken,
    TokenRole,
    TokenVerifier,
    generate_key,
    parse_token_pem,
    read_token_file,
)
from pilot.tokens.files import write_private

R = TokenRole
BIN = Path(sys.executable).parent / "splitpilot"
DAY = datetime.timedelta(days=1)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def ca_dir(tmp_path) -> str:
    path = str(tmp_path / "ca")
    CertificateAuthority.init(path)
    return path


# ------------------------------------------------------------------- the CA

def test_init_writes_private_key_and_reloads(ca_dir):
    assert stat.S_IMODE(os.stat(os.path.join(ca_dir, "ca.key")).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(ca_dir).st_mode) == 0o700
    ca = CertificateAuthority.load(ca_dir)
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey)
    constraints = ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0


def test_init_refuses_to_overwrite(ca_dir):
    before = Path(ca_dir, "ca.key").read_bytes()
    with pytest.raises(CertificateAuthorityError, match="exists already"):
        CertificateAuthority.init(ca_dir)
    assert Path(ca_dir, "ca.key").read_bytes() == before


def test_rsa_ca_for_sites_that_need_it(tmp_path):
    ca = CertificateAuthority.init(str(tmp_path / "rsa"), key_type="rsa")
    cert = token(ca, R.USER, now=datetime.datetime.now(datetime.UTC))
    assert TokenVerifier([ca.certificate]).verify(cert, Expectation.role(R.USER)).subject == "someone"


def test_load_refuses_open_key_permissions(ca_dir):
    os.chmod(os.path.join(ca_dir, "ca.key"), 0o644)
    with pytest.raises(CertificateAuthorityError, match="chmod 600"):
        CertificateAuthority.load(ca_dir)


def test_load_refuses_missing_or_incomplete_ca(tmp_path, ca_dir):
    with pytest.raises(CertificateAuthorityError, match="splitpilot ca init"):
        CertificateAuthority.load(str(tmp_path / "nowhere"))
    os.unlink(os.path.join(ca_dir, "ca.crt"))
    with pytest.raises(CertificateAuthorityError, match="ca.crt is missing"):
        CertificateAuthority.load(ca_dir)


def test_load_refuses_key_of_another_ca(tmp_path, ca_dir):
    other = str(tmp_path / "other")
    CertificateAuthority.init(other)
    os.replace(os.path.join(other, "ca.key"), os.path.join(ca_dir, "ca.key"))
    with pytest.raises(CertificateAuthorityError, match="does not belong"):
        CertificateAuthority.load(ca_dir)


def test_load_refuses_a_ca_key_of_another_kind_by_name(ca_dir):
    """An Ed25519 ca.key with its own matching ca.crt (a hand-made or tampered CA directory): named, not a
    crash (AttributeError: no public_numbers) that ends the broker's start with a traceback."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rogue CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(NOW - HOUR).not_valid_after(NOW + HOUR).sign(key, None))
    key_path, cert_path = Path(ca_dir, "ca.key"), Path(ca_dir, "ca.crt")
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    before = {path: path.read_bytes() for path in (key_path, cert_path)}
    with pytest.raises(CertificateAuthorityError, match="ca.key is a Ed25519PrivateKey, not an elliptic-curve or "
                                                        "RSA key") as err:
        CertificateAuthority.load(ca_dir)
    assert "fix: " in str(err.value)
    assert {path: path.read_bytes() for path in before} == before


def test_init_refuses_world_writable_directory(tmp_path):
    path = tmp_path / "open"
    path.mkdir()
    os.chmod(path, 0o777)
    with pytest.raises(CertificateAuthorityError, match="world-writable"):
        CertificateAuthority.init(str(path))


def test_policy_round_trips_and_only_lowers(tmp_path):
    policy = CAPolicy.with_limits({R.AGENT: 12 * HOUR})
    path = str(tmp_path / "ca")
    CertificateAuthority.init(path, policy=policy)
    assert CertificateAuthority.load(path).policy.max_lifetime[R.AGENT] == 12 * HOUR
    with pytest.raises(UsageError, match="may only be lowered"):
        CAPolicy.with_limits({R.JOB: 3 * DAY})


# ---------------------------------------------------------------- issuance

@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(now=NOW - DAY)


def test_lifetime_defaults_to_role_maximum_and_is_capped(ca):
    for role, days in ((R.USER, 31), (R.AGENT, 2), (R.JOB, 2), (R.HOST, 365), (R.ADMIN, 31)):
        cert = token(ca, role)
        assert cert.not_valid_after_utc - NOW == days * DAY
        assert NOW - cert.not_valid_before_utc == ca.policy.clock_skew
    with pytest.raises(IssueError, match="at most 2d"):
        token(ca, R.AGENT, ttl=3 * DAY)


def test_extended_key_usage_per_role(ca):
    for role in TokenRole:
        eku = token(ca, role).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        usages = x509.oid.ExtendedKeyUsageOID
        expected = usages.SERVER_AUTH if role is R.HOST else usages.CLIENT_AUTH
        assert list(eku) == [expected]


def test_job_token_never_outlives_its_agent(ca):
    verifier = TokenVerifier([ca.certificate])
    agent = verifier.verify(token(ca, R.AGENT, ttl=3 * HOUR), Expectation.role(R.AGENT), now=NOW)
    job = ca.issue_job_token(agent, job_id=1, attempt=1, owner="alice", public_key=generate_key().public_key(),
                             now=NOW)
    assert job.not_valid_after_utc == agent.not_after == NOW + 3 * HOUR
    with pytest.raises(IssueError, match="has expired"):
        ca.issue_job_token(agent, job_id=1, attempt=1, owner="alice", public_key=generate_key().public_key(),
                           now=NOW + 4 * HOUR)


def test_job_tokens_only_on_an_agents_request_and_only_for_p256(ca):
    user = TokenVerifier([ca.certificate]).verify(token(ca, R.USER), now=NOW)
    with pytest.raises(IssueError, match="agent's request"):
        ca.issue_job_token(user, job_id=1, attempt=1, owner="x", public_key=generate_key().public_key())
    with pytest.raises(IssueError, match="P-256"):
        ca.issue(R.JOB, "x", generate_key("rsa").public_key(), job_id=1, attempt=1, now=NOW)
    with pytest.raises(IssueError, match="P-256"):
        ca.issue(R.JOB, "x", ec.generate_private_key(ec.SECP384R1()).public_key(), job_id=1, attempt=1, now=NOW)


@pytest.mark.parametrize("kwargs,match", [
    ({"role": R.AGENT, "subject": "p", "site": None}, "site"),
    ({"role": R.AGENT, "subject": "p", "site": "bad site", "queue": "q"}, "not a valid name"),
    ({"role": R.USER, "subject": "CN=evil,O=x"}, "not a valid name"),
    ({"role": R.USER, "subject": "u", "site": "S"}, "only agent tokens"),
    ({"role": R.USER, "subject": "u", "job_id": 1, "attempt": 1}, "only job tokens"),
    ({"role": R.JOB, "subject": "u", "job_id": 1, "attempt": 0}, "attempt >= 1"),
    ({"role": R.USER, "subject": "u", "dns_names": ["h"]}, "only host tokens"),
    ({"role": R.USER, "subject": "u", "ttl": -HOUR}, "positive"),
])
def test_issue_refuses_bad_requests(ca, kwargs, match):
    role, subject = kwargs.pop("role"), kwargs.pop("subject")
    with pytest.raises(IssueError, match=match):
        ca.issue(role, subject, generate_key().public_key(), now=NOW, **kwargs)


def test_public_key_from_csr_and_bare_key():
    key = generate_key()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "anything")]))
           .sign(key, hashes.SHA256()))
    expected = key.public_key().public_numbers()
    for data in (csr.public_bytes(serialization.Encoding.PEM), csr.public_bytes(serialization.Encoding.DER),
                 key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo),
                 key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)):
        assert public_key_from_request(data).public_numbers() == expected
    forged = bytearray(csr.public_bytes(serialization.Encoding.DER))
    forged[-3] ^= 1  # the signature no longer matches: no proof of possession
    with pytest.raises(MalformedToken):
        public_key_from_request(bytes(forged))
    with pytest.raises(MalformedToken):
        public_key_from_request(b"not a key")


# ------------------------------------------------------------- token files

def test_token_file_round_trip_and_private(ca, tmp_path):
    path = str(tmp_path / "t.pem")
    tok = ca.new_token(R.USER, "alice", now=NOW)
    write_private(path, tok.to_pem())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = read_token_file(path)
    assert loaded.certificate == tok.certificate and loaded.chain[1] == ca.certificate
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no temporary left behind


def test_token_file_with_open_permissions(ca, tmp_path):
    path = str(tmp_path / "t.pem")
    write_private(path, ca.new_token(R.USER, "alice", now=NOW).to_pem())
    os.chmod(path, 0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        read_token_file(path)
    warnings = []
    from pilot.tokens.files import read_private
    read_private(path, KeyPermissions.WARN, warn=warnings.append)
    assert warnings and "group or others" in warnings[0]


def test_token_whose_key_does_not_match(ca):
    one, two = ca.new_token(R.USER, "a", now=NOW), ca.new_token(R.USER, "b", now=NOW)
    mixed = pem(one.certificate) + two.to_pem().split(b"-----END CERTIFICATE-----\n", 2)[-1]
    with pytest.raises(KeyFileError, match="does not belong"):
        parse_token_pem(mixed)


@pytest.mark.parametrize("data,match", [
    (b"", "no PEM certificate"),
    (b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n", "unreadable certificate"),
])
def test_corrupt_token_pem(data, match):
    with pytest.raises(MalformedToken, match=match):
        parse_token_pem(data)


def test_truncated_key_block(ca):
    data = ca.new_token(R.USER, "a", now=NOW).to_pem()
    with pytest.raises(MalformedToken, match="truncated|unreadable"):
        parse_token_pem(data[:-40])


# ---------------------------------------------------------------- durations

@pytest.mark.parametrize("text,seconds", [("90s", 90), ("30m", 1800), ("24h", 86400), ("2d", 172800),
                                          ("1w", 604800), ("1h30m", 5400), ("3600", 3600)])
def test_durations(text, seconds):
    assert parse_duration(text).total_seconds() == seconds
    assert parse_duration(format_duration(parse_duration(text))) == parse_duration(text)


@pytest.mark.parametrize("text", ["", "0s", "h", "5 hours", "1.5h", "-1h", "1h 30m"])
def test_bad_durations(text):
    with pytest.raises(UsageError, match="not a duration"):
        parse_duration(text)


# ---------------------------------------------------------------- the CLI

def test_cli_issue_show_verify(tmp_path):
    ca_path, agent = str(tmp_path / "ca"), str(tmp_path / "agent.pem")
    assert cli("ca", "init", ca_path).returncode == 0
    issued = cli("token", "issue", "--ca", ca_path, "--role", "agent", "--site", "SITE-A", "--subject", "g1",
                 "--ttl", "24h", "--out", agent)
    assert issued.returncode == 0, issued.stderr
    assert stat.S_IMODE(os.stat(agent).st_mode) == 0o600
    shown = cli("token", "show", agent, "--ca", ca_path)
    assert shown.returncode == 0
    for text in ("role:        agent", "site:        SITE-A", "fingerprint: SHA256:", "verified:    yes"):
        assert text in shown.stdout
    assert "PRIVATE KEY" not in shown.stdout + shown.stderr and "BEGIN" not in shown.stdout
    assert cli("token", "verify", agent, "--ca", ca_path, "--role", "agent", "--site", "SITE-A").returncode == 0
    refused = cli("token", "verify", agent, "--ca", ca_path, "--role", "agent", "--site", "SITE-B")
    assert refused.returncode == 1 and "SITE-B" in refused.stderr
    wrong = cli("token", "verify", agent, "--ca", ca_path, "--role", "job")
    assert wrong.returncode == 1 and "needs: job token" in wrong.stderr


def test_cli_issue_for_a_public_key_writes_no_key(tmp_path):
    ca_path = str(tmp_path / "ca")
    cli("ca", "init", ca_path)
    key = generate_key()
    pub = tmp_path / "job.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    out = str(tmp_path / "job.crt")
    result = cli("token", "issue", "--ca", ca_path, "--role", "job", "--subject", "alice", "--job-id", "5",
                 "--attempt", "1", "--public-key", str(pub), "--out", out)
    assert result.returncode == 0, result.stderr
    assert b"PRIVATE KEY" not in Path(out).read_bytes()
    shown = cli("token", "show", out, "--ca", ca_path)
    assert "job:         5" in shown.stdout and "attempt:     1" in shown.stdout


@pytest.mark.parametrize("args,match", [
    (["token", "issue", "--role", "agent", "--out", "x"], "--ca"),
    (["token", "issue", "--ca", "{ca}", "--role", "agent", "--out", "{tmp}/x"], "add --site"),
    (["token", "issue", "--ca", "{ca}", "--role", "job", "--out", "{tmp}/x"], "add --job-id"),
    (["token", "issue", "--ca", "{ca}", "--role", "host", "--out", "{tmp}/x"], "add --dns"),
    (["token", "issue", "--ca", "{ca}", "--role", "user", "--ttl", "40d", "--out", "{tmp}/x"], "at most 31d"),
    (["token", "issue", "--ca", "{ca}", "--role", "user", "--ttl", "soon", "--out", "{tmp}/x"], "not a duration"),
    (["token", "issue", "--ca", "{tmp}/missing", "--role", "user", "--out", "{tmp}/x"], "ca init"),
    (["ca", "init", "{ca}"], "exists already"),
    (["ca", "init", "{tmp}/new", "--max-ttl", "agent=5d"], "may only be lowered"),
    (["ca", "init", "{tmp}/new2", "--max-ttl", "pilot=1d"], "ROLE=DURATION"),
    (["token", "show", "{tmp}/missing.pem"], "cannot read"),
])
def test_cli_errors_are_clear_and_exit_2(tmp_path, args, match):
    ca_path = str(tmp_path / "ca")
    CertificateAuthority.init(ca_path)
    result = cli(*[a.format(ca=ca_path, tmp=tmp_path) for a in args])
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert match in result.stderr and result.stdout == ""


@pytest.mark.parametrize("text, words", [
    ('[max_lifetime]\nagnt = "1h"\n', ["max_lifetime.agnt", "did you mean 'agent'?", "fix: rename it to agent"]),
    ('[max_lifetime]\nroot = "1h"\n', ["max_lifetime.root", "unknown field", "known fields here"]),
    ('[max_lifetime]\nagent = "soon"\n', ["max_lifetime.agent", "expected a duration", 'agent = "12h"']),
    ('[max_lifetime]\nagent = true\n', ["max_lifetime.agent", "expected a duration"]),
    ('[max_lifetimes]\nagent = "1h"\n', ["max_lifetimes", "did you mean 'max_lifetime'?"]),
    ('max_lifetime = "1h"\n', ["max_lifetime", "expected a table"]),
    ('[max_lifetime\n', ["(syntax)", "not valid TOML", "[max_lifetime]"]),
])
def test_a_tampered_policy_file_is_refused_naming_the_key_and_the_fix(tmp_path, text, words):
    """A policy edited by hand (or by someone else) never loads half-read: the CA refuses to load, naming the
    key, the problem and the fix; the file is left as it is."""
    path = str(tmp_path / "ca")
    CertificateAuthority.init(path)
    policy = tmp_path / "ca" / "policy.toml"
    policy.write_text(text)
    with pytest.raises(CertificateAuthorityError) as err:
        CertificateAuthority.load(path)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    assert policy.read_text() == text


def test_a_policy_may_only_lower_limits_when_read_from_its_file(tmp_path):
    path = str(tmp_path / "ca")
    CertificateAuthority.init(path)
    (tmp_path / "ca" / "policy.toml").write_text('[max_lifetime]\njob = "30d"\n')
    with pytest.raises(UsageError, match="may only be lowered"):
        CertificateAuthority.load(path)
    (tmp_path / "ca" / "policy.toml").write_text('[max_lifetime]\nagent = 3600\n')
    assert CertificateAuthority.load(path).policy.max_lifetime[R.AGENT] == HOUR
