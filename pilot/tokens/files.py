"""Keys and token files on disk: private, atomic, checked when read.

A token file holds the certificate chain (leaf first) followed by the
private key, all PEM, mode 0600: one file a glidein or a user carries around,
like a grid proxy. Private keys are written atomically (a temporary file in
the same directory, created 0600, fsync'd, renamed), so a crash leaves the
old file or the new one, never half of one, and never a readable moment.
"""

from __future__ import annotations

import enum
import os
import stat
import sys
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pilot.safefiles import write_private, write_public  # noqa: F401 (re-exported)
from pilot.tokens.errors import KeyFileError, MalformedToken

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class KeyPermissions(enum.Enum):
    """What to do when a private key file is readable by group or others."""

    REFUSE = "refuse"
    WARN = "warn"


def generate_key(kind: str = "ec") -> PrivateKey:
    """A new private key: ECDSA P-256 (default, ~70,000/s) or RSA-3072 (slow)."""
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise ValueError(f"key type must be 'ec' or 'rsa', not {kind!r}")


def private_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def certificate_pem(chain: list[x509.Certificate]) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in chain)


def read_private(path: str, policy: KeyPermissions = KeyPermissions.REFUSE, *, warn=None) -> bytes:
    """Read a file holding a private key, checking nobody else can read it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyFileError(path, "no such file") from None
    except PermissionError:
        raise KeyFileError(path, "permission denied") from None
    try:
        mode = os.fstat(fd).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            message = (f"private key file is accessible to group or others (mode {stat.S_IMODE(mode):04o}); "
                       f"fix: chmod 600 {path}")
            if policy is KeyPermissions.REFUSE:
                raise KeyFileError(path, message)
            (warn or _stderr_warning)(f"warning: {path}: {message}")
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            if sum(map(len, chunks)) > 1 << 20:
                raise KeyFileError(path, "larger than 1 MiB: not a key or token file")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _stderr_warning(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass(frozen=True)
class TokenFile:
    """A certificate chain and its private key, as read from a token file."""

    chain: tuple[x509.Certificate, ...]
    key: PrivateKey

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]

    def to_pem(self) -> bytes:
        return certificate_pem(list(self.chain)) + private_key_pem(self.key)


def parse_token_pem(data: bytes, source: str = "token") -> TokenFile:
    """Split PEM DATA into chain and key; the key must match the leaf."""
    chain = load_certificates(data, source)
    try:
        key = serialization.load_pem_private_key(_pem_block(data, b"PRIVATE KEY", source), password=None)
    except (ValueError, TypeError) as exc:
        raise MalformedToken(f"{source}: unreadable private key ({exc})") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise MalformedToken(f"{source}: unsupported key type {type(key).__name__}")
    if key.public_key() != chain[0].public_key():
        raise KeyFileError(source, "the private key does not belong to the certificate; "
                                   "fix: re-issue the token (key and certificate are written together)")
    return TokenFile(tuple(chain), key)


def load_certificates(data: bytes, source: str = "token") -> list[x509.Certificate]:
    """All PEM certificates in DATA, in order (at least one)."""
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise MalformedToken(f"{source}: no PEM certificate found")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise MalformedToken(f"{source}: unreadable certificate ({exc})") from None


def read_token_file(path: str, policy: KeyPermissions = KeyPermissions.REFUSE) -> TokenFile:
    return parse_token_pem(read_private(path, policy), path)


def _pem_block(data: bytes, label: bytes, source: str) -> bytes:
    """The first PEM block whose label ends with LABEL (e.g. PRIVATE KEY)."""
    for line_start in _find_all(data, b"-----BEGIN "):
        header_end = data.find(b"-----", line_start + 11)
        block_label = data[line_start + 11:header_end]
        if block_label.endswith(label):
            end_marker = b"-----END " + block_label + b"-----"
            end = data.find(end_marker, header_end)
            if end < 0:
                raise MalformedToken(f"{source}: truncated {block_label.decode(errors='replace')} block")
            return data[line_start:end + len(end_marker)] + b"\n"
    raise MalformedToken(f"{source}: no private key found (a token file holds the certificate and its key)")


def _find_all(data: bytes, needle: bytes):
    start = data.find(needle)
    while start >= 0:
        yield start
        start = data.find(needle, start + 1)
