"""The job token's client: what the wrapper needs from the broker, without a certificate library.

`JobClient` holds a job token (certificate chain and key, PEM bytes) in memory
and hands the bytes to gRPC's own TLS. The wrapper uses nothing else of the
API, so it never loads `cryptography` (about 10 MiB of resident memory, a
fifth of the wrapper's): the token's end comes over the pipe
(JobToken.not_after_unix), and a refreshed token is checked to be for the same
job and attempt by reading the job URN of its subjectAltName with the small DER
reader below. `identity` (the token parsed in full) and `refresh_token` (a new
key) do load it, for the agent and tests that ask.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import grpc

from pilot.api.base import (
    DEFAULT_TIMEOUT,
    STREAM_TIMEOUT,
    BaseClient,
    OutputFile,
    _broker_error,
    _receive,
    leaf_pem,
    read_ca_pem,
)
from pilot.api.files import CHUNK_SIZE, check_sandbox_name
from pilot.api.states import JobState, read_state
from pilot.errors import SplitpilotError, UsageError
from splitpilot.broker.v1 import broker_pb2 as pb
from splitpilot.broker.v1 import broker_pb2_grpc as rpc_pb
from splitpilot.job.v1 import job_pb2

if TYPE_CHECKING:
    from pilot.tokens import Identity
    from pilot.tokens.files import PrivateKey

_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True)
class UpdateResult:
    state: JobState   # UNKNOWN(n) for a state this client does not know (lifecycle.read_state)
    replay: bool


class JobClient(BaseClient):
    """Calls with a job token: JobService. The token and its key stay in memory
    (the TLS credentials are built from bytes), never on disk.

    CERTIFICATE_PEM is the token's chain (leaf first, as Match returns it);
    PRIVATE_KEY_PEM its key, as PEM bytes or a key object. CA_PEM (bytes or a
    file) verifies the broker; None: the last certificate of the chain.
    """

    def __init__(self, address: str, certificate_pem: bytes, private_key_pem: bytes | PrivateKey,
                 ca_pem=None, *, timeout: float = DEFAULT_TIMEOUT, server_name: str | None = None,
                 retries: int = 3, first_sequence: int = 1, idle_timeout: float | None = None) -> None:
        self._job = _job_scope(certificate_pem)   # before connecting: another role's token is refused by name
        self._token_pem = certificate_pem
        self._key_pem = _key_bytes(private_key_pem)
        self._identity: Identity | None = None
        self.retries = retries
        self._next_sequence = first_sequence
        ca = read_ca_pem(ca_pem) if ca_pem is not None else _chain_root(certificate_pem)
        super().__init__(address, leaf_pem(certificate_pem, "job token"), self._key_pem, ca, timeout=timeout,
                         server_name=server_name, idle_timeout=idle_timeout)

    def _stubs(self) -> None:
        self._stub = rpc_pb.JobServiceStub(self._channel)

    @property
    def identity(self) -> Identity:
        """The token parsed in full (loads cryptography: the wrapper never asks)."""
        if self._identity is None:
            from pilot.tokens import parse_identity  # why: cryptography, only for callers that ask
            from pilot.tokens.files import load_certificates  # why: as above

            self._identity = parse_identity(load_certificates(self._token_pem, "job token")[0])
        return self._identity

    @property
    def job_id(self) -> int:
        return self._job[0]

    @property
    def attempt(self) -> int:
        return self._job[1]

    @property
    def token_pem(self) -> bytes:
        return self._token_pem

    @property
    def not_after(self) -> datetime.datetime:
        return self.identity.not_after

    @property
    def key_pem(self) -> bytes:
        """The current token's private key as PEM: for a holder that hands the token on (the agent passes a
        refreshed token to its wrapper over the pipe), never for a file."""
        return self._key_pem

    def update_state(self, state: JobState | int, detail: str = "", exit_code: int | None = None) -> UpdateResult:
        """Report a state change (numbered by this client). A transient failure
        is retried with the same sequence number: the broker acknowledges a
        replay of an update it already applied."""
        # cast: protoc's .pyi types an enum field by its own int subclass; any int is valid on the wire.
        request = pb.UpdateStateRequest(state=cast(job_pb2.JobState, int(state)), detail=detail,
                                        sequence=self._next_sequence)
        if exit_code is not None:
            request.exit_code = exit_code
        for attempt in range(self.retries + 1):
            try:
                response = self._stub.UpdateState(request, timeout=self.timeout)
                break
            except grpc.RpcError as exc:
                if exc.code() in _TRANSIENT and attempt < self.retries:
                    time.sleep(min(0.5 * 2 ** attempt, 5))
                    continue
                raise _broker_error("UpdateState", exc, self.address) from None
        self._next_sequence += 1
        return UpdateResult(read_state(response.state), response.replay)

    @property
    def next_sequence(self) -> int:
        return self._next_sequence

    def heartbeat(self, cpu_seconds: float = 0.0, rss_bytes: int = 0, sandbox_bytes: int = 0) -> bool:
        """Report liveness; True when the job was killed and must stop."""
        response = self._call("Heartbeat", self._stub.Heartbeat, pb.HeartbeatRequest(
            cpu_seconds=cpu_seconds, rss_bytes=rss_bytes, sandbox_bytes=sandbox_bytes))
        return response.kill

    def get_input(self, name: str, dest: str | os.PathLike) -> str:
        """Fetch input NAME to DEST (a directory: DEST/NAME), verifying its sha256; return the path."""
        dest = os.fspath(dest)
        if os.path.isdir(dest):
            dest = os.path.join(dest, check_sandbox_name(name, "input name"))
        stream = self._stream("GetInput", self._stub.GetInput, pb.GetInputRequest(name=name))
        return _receive(stream, dest, name)

    def put_output(self, path: str | os.PathLike, name: str | None = None) -> OutputFile:
        """Upload the file at PATH as output NAME (default: its base name).

        PATH is opened once; its checksum and its content are read from that
        one descriptor (put_output_fd)."""
        path = os.fspath(path)
        name = check_sandbox_name(name or os.path.basename(path), "output name")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return self.put_output_fd(fd, name)
        finally:
            os.close(fd)

    def put_output_fd(self, fd: int, name: str) -> OutputFile:
        """Upload the open file FD as output NAME, read from its start with pread (never reopened by path).

        The wrapper opens each output itself (refusing links and anything that
        is not a plain file of the sandbox) and uploads that very descriptor,
        so nothing can swap the file between the check and the upload. A file
        that changes while it is sent fails the upload (size or sha256)."""
        name = check_sandbox_name(name, "output name")
        sha256, size = _fd_digest(fd)
        try:
            response = self._stub.PutOutput(_fd_chunks(fd, name, size, sha256), timeout=STREAM_TIMEOUT)
        except grpc.RpcError as exc:
            raise _broker_error("PutOutput", exc, self.address) from None
        return OutputFile(name, response.size, response.sha256)

    def replace_token(self, certificate_pem: bytes, private_key_pem: bytes | PrivateKey) -> None:
        """Use a token refreshed elsewhere (e.g. by the agent) for later calls: same job and attempt."""
        new, current = job_of_token(certificate_pem), job_of_token(self._token_pem)
        if new != current:
            raise UsageError(f"the new token is for job {new[0]} attempt {new[1]}, not job {current[0]} attempt "
                             f"{current[1]}")
        self._switch(certificate_pem, _key_bytes(private_key_pem))

    def _switch(self, certificate_pem: bytes, key_pem: bytes) -> None:
        old = self._channel
        self._job = job_of_token(certificate_pem)
        self._key_pem, self._token_pem, self._identity = key_pem, certificate_pem, None
        self._open(leaf_pem(certificate_pem, "job token"), key_pem)
        old.close()

    def refresh_token(self, time_left_s: int = 0) -> datetime.datetime:
        """Get a new token for a new key (made here); later calls use it. Returns its not_after."""
        from cryptography.hazmat.primitives import serialization  # why: a new key; the agent refreshes, not the wrapper
        from cryptography.hazmat.primitives.asymmetric import ec  # why: as above

        from pilot.tokens.files import load_certificates, private_key_pem  # why: as above

        key = ec.generate_private_key(ec.SECP256R1())
        public_der = key.public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
        response = self._call("RefreshToken", self._stub.RefreshToken, pb.RefreshTokenRequest(
            public_key=public_der, time_left_s=time_left_s))
        load_certificates(response.job_token_pem, "refreshed job token")
        self._switch(response.job_token_pem, private_key_pem(key))
        return self.identity.not_after


def _key_bytes(key: bytes | PrivateKey) -> bytes:
    """KEY as PEM bytes, unparsed (gRPC reads it); a key object is serialised (its holder loaded cryptography).

    A job token's key is a P-256 key (Match and RefreshToken make them): any other kind is a holder's mistake,
    named here rather than left to a TLS handshake that fails without saying why."""
    if isinstance(key, (bytes, bytearray)):
        if b"PRIVATE KEY-----" not in key:
            raise UsageError("unreadable job token key (no PEM private key found)")
        if _SEC1_KEY_HEADER not in key and _EC_KEY_OID not in _pem_der(bytes(key)):
            raise UsageError(f"the job token key is a {_key_kind(bytes(key))}, not an "
                             "elliptic-curve key; fix: use the key that came with the job token (Match makes a "
                             "P-256 key)")
        return bytes(key)
    from pilot.tokens.files import private_key_pem  # why: only for a key object, whose holder loaded cryptography

    return private_key_pem(key)


#: The header of an elliptic-curve key in SEC 1 form (split: a marker, not a key in the sources).
_SEC1_KEY_HEADER = b"-----BEGIN EC " b"PRIVATE KEY-----"
#: id-ecPublicKey (1.2.840.10045.2.1) as DER: a PKCS#8 key of an elliptic curve names it.
_EC_KEY_OID = bytes.fromhex("06072a8648ce3d0201")


def _pem_der(pem: bytes) -> bytes:
    body = b"".join(line for line in pem.splitlines() if line and not line.startswith(b"-----"))
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        return b""


def _key_kind(pem: bytes) -> str:
    try:
        from cryptography.hazmat.primitives import serialization  # why: only to name a wrong key

        return type(serialization.load_pem_private_key(pem, password=None)).__name__
    except Exception:  # noqa: BLE001 - naming the kind is best effort; the refusal stands
        return "key of another kind"


def _job_scope(chain_pem: bytes) -> tuple[int, int]:
    """The job and attempt a job token is for; another role's token is a caller's mistake, named (parsing the
    token in full only on this refusal path: the wrapper's normal way never loads cryptography)."""
    try:
        return job_of_token(chain_pem)
    except UsageError as exc:
        try:
            from pilot.tokens import parse_identity  # why: only to name a wrong token
            from pilot.tokens.files import load_certificates  # why: as above

            what = parse_identity(load_certificates(chain_pem, "job token")[0]).describe()
        except Exception:  # noqa: BLE001 - naming it is best effort; the refusal stands
            raise exc from None
        raise UsageError(f"a job client needs a job token, got the {what}; fix: use the job token that came "
                         "with the match (MatchedJob.job_client())") from None


def _chain_root(chain_pem: bytes) -> bytes:
    """The CA that ends the token's chain, as PEM (parsed: cryptography, only when no CA is given)."""
    from pilot.tokens.files import certificate_pem, load_certificates  # why: as above; the wrapper gives its CA

    chain = load_certificates(chain_pem, "job token")
    root = chain[-1]
    if len(chain) < 2 or root.issuer != root.subject:
        raise UsageError("the token file holds no CA certificate; fix: pass the broker's CA certificate "
                         "(--ca-cert FILE, or ca_pem=...)")
    return certificate_pem([root])


def _fd_digest(fd: int) -> tuple[str, int]:
    """(hex sha256, size) of the open file FD from offset 0, read with pread (FD's offset is left alone)."""
    digest = hashlib.sha256()
    offset = 0
    while block := os.pread(fd, CHUNK_SIZE, offset):
        digest.update(block)
        offset += len(block)
    return digest.hexdigest(), offset


def _fd_chunks(fd: int, name: str, size: int, sha256: str) -> Iterator[pb.PutOutputRequest]:
    """The PutOutput stream of FD's first SIZE bytes (pread: no shared offset, no reopening)."""
    yield pb.PutOutputRequest(header=pb.FileHeader(name=name, size=size, sha256=sha256))
    offset = 0
    while offset < size:
        block = os.pread(fd, min(CHUNK_SIZE, size - offset), offset)
        if not block:
            raise SplitpilotError(f"output {name!r} shrank from {size} to {offset} bytes while it was uploaded")
        offset += len(block)
        yield pb.PutOutputRequest(data=block)


# ------------------------------------------------------------------ the job of a token, without cryptography

_JOB_URN = re.compile(rb"urn:splitpilot:job:([0-9]{1,19}):([0-9]{1,9})")
_SAN_OID = b"\x06\x03\x55\x1d\x11"   # the DER of OID 2.5.29.17, subjectAltName
_SEQUENCE, _OCTET_STRING, _EXTENSIONS, _URI = 0x30, 0x04, 0xA3, 0x86


def job_of_token(chain_pem: bytes) -> tuple[int, int]:
    """(job id, attempt) of the job token whose PEM chain (leaf first) is CHAIN_PEM, from the URN in its
    subjectAltName (urn:splitpilot:job:<id>:<attempt>, pilot.tokens.identity).

    A DER walk of the few fields on the way (Certificate, TBSCertificate, extensions, subjectAltName), every
    length checked against what encloses it: this checks that a token is for this job, it does not verify
    it (the broker does, at every call). Anything else is refused with UsageError."""
    pem = leaf_pem(chain_pem, "job token")
    body = b"".join(line for line in pem.splitlines() if line and not line.startswith(b"-----"))
    try:
        der = base64.b64decode(body, validate=True)
        certificate = _children(der, *_only(der, _SEQUENCE, 0, len(der)))
        tbs = next(certificate)
        if tbs[0] != _SEQUENCE:
            raise ValueError("no TBSCertificate")
        for tag, start, end in _children(der, tbs[1], tbs[2]):
            if tag != _EXTENSIONS:
                continue
            extensions = _only(der, _SEQUENCE, start, end)
            for _tag, ext_start, ext_end in _children(der, *extensions):
                if der.startswith(_SAN_OID, ext_start):
                    *_, (value_tag, value_start, value_end) = _children(der, ext_start, ext_end)
                    if value_tag != _OCTET_STRING:   # OID, [critical], then the value
                        raise ValueError("a subjectAltName without its value")
                    names = _only(der, _SEQUENCE, value_start, value_end)
                    for name_tag, name_start, name_end in _children(der, *names):
                        match = _JOB_URN.fullmatch(der, name_start, name_end) if name_tag == _URI else None
                        if match:
                            return int(match[1]), int(match[2])
        raise ValueError("no job URN in its subjectAltName")
    except (ValueError, IndexError, StopIteration, binascii.Error) as exc:
        raise UsageError(f"job token: not a job token this client can read ({exc}); fix: hand over the token "
                         "the broker issued for this job (RefreshToken)") from None


def _header(der: bytes, position: int, limit: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at POSITION, which must end by LIMIT."""
    if position + 2 > limit:
        raise ValueError("truncated DER")
    tag, length = der[position], der[position + 1]
    position += 2
    if length & 0x80:
        size = length & 0x7F
        if not 1 <= size <= 4 or position + size > limit:
            raise ValueError("bad DER length")
        length = int.from_bytes(der[position:position + size], "big")
        position += size
    if position + length > limit:
        raise ValueError("DER element longer than what holds it")
    return tag, position, position + length


def _only(der: bytes, tag: int, position: int, limit: int) -> tuple[int, int]:
    """(start, end) of the content of the element at POSITION of DER, which must be a TAG ending by LIMIT."""
    found, start, end = _header(der, position, limit)
    if found != tag:
        raise ValueError(f"DER tag {found:#x} where {tag:#x} was expected")
    return start, end


def _children(der: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """The elements one after the other between START and END."""
    while start < end:
        tag, content, start = _header(der, start, end)
        yield tag, content, start
