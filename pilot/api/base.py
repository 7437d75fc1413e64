"""What every broker client shares, with no certificate library: the TLS channel, the error mapping, file streams.

The channel is built from PEM bytes handed straight to gRPC (which has its own
TLS): nothing here parses a certificate, so a process that only holds a job
token (the wrapper, through `pilot.api.jobclient`) never loads `cryptography`
(~10 MiB of its resident memory). The clients of people and agents
(`pilot.api.client`) parse their tokens before they get here.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from pilot.api.files import copy_verified
from pilot.errors import SplitpilotError, UsageError
from splitpilot.broker.v1 import broker_pb2 as pb

DEFAULT_TIMEOUT = 30.0
STREAM_TIMEOUT = 3600.0
CLIENT_OPTIONS = (
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 32 << 20),
    ("grpc.keepalive_time_ms", 120_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)

_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PEM_CERTIFICATE_END = b"-----END CERTIFICATE-----"


# ------------------------------------------------------------------ errors

class BrokerError(SplitpilotError):
    """A broker call failed. Attributes: method, code (grpc.StatusCode), details (the broker's message)."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str, address: str = "") -> None:
        self.method = method
        self.code = code
        self.details = details
        self.address = address
        super().__init__(self._message())

    def _message(self) -> str:
        return f"broker refused {self.method} ({self.code.name}): {self.details}"


class BrokerUnavailable(BrokerError):
    """The broker could not be reached, or did not answer in time (retrying may help)."""

    def _message(self) -> str:
        return (f"cannot reach the broker at {self.address} ({self.method}, {self.code.name}: {self.details}); "
                "fix: check that it runs (splitpilot broker serve), the address (--broker), and that the CA "
                "certificate (--ca-cert) is the broker's")


class WrongBroker(BrokerUnavailable):
    """The TLS handshake failed because the broker's certificate is not from the CA this client trusts."""

    def _message(self) -> str:
        return (f"the broker at {self.address} presented a certificate that is not from the CA this client trusts "
                f"({self.method}: {self.details}): your token is not from this broker's CA, or the address is "
                "another service's; fix: use a token issued by the broker's CA (its ca.crt: `splitpilot ca show` on "
                "the broker), or pass that CA with --ca-cert")


class AccessDenied(BrokerError):
    """The token was refused (UNAUTHENTICATED) or may not do this (PERMISSION_DENIED)."""


class TokenUnusable(AccessDenied):
    """The client's own token cannot work (expired, not yet valid, or not from the CA it trusts): found
    before connecting, or when the broker could not be reached. Attributes: as AccessDenied (code
    UNAUTHENTICATED, method: the call about to be made)."""

    def _message(self) -> str:
        return self.details


class NotFound(BrokerError):
    """No such job, input or output (NOT_FOUND)."""


class PreconditionFailed(BrokerError):
    """The job's state does not allow this (FAILED_PRECONDITION): for a job client,
    usually that its attempt is over (fencing) and the wrapper must stop."""


class InvalidRequest(BrokerError):
    """The request was malformed or over a limit (INVALID_ARGUMENT)."""

    exit_code = 2


_ERRORS = {
    grpc.StatusCode.UNAVAILABLE: BrokerUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: BrokerUnavailable,
    grpc.StatusCode.UNAUTHENTICATED: AccessDenied,
    grpc.StatusCode.PERMISSION_DENIED: AccessDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: PreconditionFailed,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.RESOURCE_EXHAUSTED: InvalidRequest,
}



def _broker_error(method: str, exc: grpc.RpcError, address: str) -> BrokerError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    if code is grpc.StatusCode.UNAVAILABLE and "CERTIFICATE_VERIFY_FAILED" in details:
        return WrongBroker(method, code, details, address)
    return _ERRORS.get(code, BrokerError)(method, code, details, address)


# ------------------------------------------------------------------ results both sides read

@dataclass(frozen=True)
class OutputFile:
    name: str
    size: int
    sha256: str


# ------------------------------------------------------------------ PEM, as bytes

def leaf_pem(chain_pem: bytes, source: str) -> bytes:
    """The first certificate of the PEM chain CHAIN_PEM (the client certificate TLS presents), by its markers."""
    start = chain_pem.find(_PEM_CERTIFICATE)
    end = chain_pem.find(_PEM_CERTIFICATE_END, start)
    if start < 0 or end < 0:
        raise UsageError(f"{source}: no PEM certificate found")
    return chain_pem[start:end + len(_PEM_CERTIFICATE_END)] + b"\n"


def read_ca_pem(ca_pem: bytes | str | os.PathLike) -> bytes:
    """The CA certificate(s) CA_PEM as PEM bytes: given as bytes, or read from a file (at most 1 MiB)."""
    if isinstance(ca_pem, (bytes, bytearray)):
        data = bytes(ca_pem)
    else:
        try:
            with open(os.path.expanduser(os.fspath(ca_pem)), "rb") as handle:
                data = handle.read(1 << 20)
        except OSError as exc:
            raise UsageError(f"cannot read the CA certificate {ca_pem}: {exc.strerror}; fix: give the broker's "
                             "ca.crt (splitpilot ca show)") from None
    if _PEM_CERTIFICATE not in data:
        raise UsageError("CA certificate: no PEM certificate found; fix: give the broker's ca.crt "
                         "(splitpilot ca show)")
    return data


# ------------------------------------------------------------------ the base client

class BaseClient:
    """A channel with a client certificate (PEM bytes), and the error mapping."""

    def __init__(self, address: str, certificate_pem: bytes, key_pem: bytes, ca_pem: bytes, *,
                 timeout: float = DEFAULT_TIMEOUT, server_name: str | None = None,
                 idle_timeout: float | None = None) -> None:
        self.address = address
        self.timeout = timeout
        # gRPC closes the connection after this long without a call and reopens it for the next one
        # (grpc.client_idle_timeout_ms): a client that calls rarely holds no connection at the broker between.
        self._idle_timeout = idle_timeout
        self.ca_pem = ca_pem
        self._server_name = server_name
        problem = self._token_problem()
        if problem is not None:  # before connecting: the handshake would only say "cannot reach the broker"
            raise TokenUnusable("(connecting)", grpc.StatusCode.UNAUTHENTICATED, problem, address)
        self._open(certificate_pem, key_pem)

    def _token_problem(self) -> str | None:
        """Why this client's own token cannot work, or None. Checked before connecting and when the broker
        cannot be reached; only the clients of people check (pilot.api.client)."""
        return None

    def _open(self, certificate_pem: bytes, key_pem: bytes) -> None:
        credentials = grpc.ssl_channel_credentials(root_certificates=self.ca_pem, private_key=key_pem,
                                                   certificate_chain=certificate_pem)
        options: list[tuple[str, int | str]] = list(CLIENT_OPTIONS)
        if self._idle_timeout is not None:
            options.append(("grpc.client_idle_timeout_ms", max(1000, int(self._idle_timeout * 1000))))
        if self._server_name:
            options.append(("grpc.ssl_target_name_override", self._server_name))
        self._channel = grpc.secure_channel(self.address, credentials, options=options)
        self._stubs()

    def _stubs(self) -> None:
        pass

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _failure(self, method: str, exc: grpc.RpcError) -> BrokerError:
        """The BrokerError for a failed call; an unreachable broker is first checked against this client's
        own token (it may have expired since the client was made)."""
        error = _broker_error(method, exc, self.address)
        if isinstance(error, BrokerUnavailable) and not isinstance(error, WrongBroker):
            problem = self._token_problem()
            if problem is not None:
                return TokenUnusable(method, grpc.StatusCode.UNAUTHENTICATED, problem, self.address)
        return error

    def _call(self, method: str, stub_method, request, *, timeout: float | None = None):
        try:
            return stub_method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise self._failure(method, exc) from None

    def _stream(self, method: str, stub_method, request, *,
                timeout: float = STREAM_TIMEOUT) -> Generator[Any, None, None]:
        """A server stream whose errors arrive as BrokerError."""
        call = stub_method(request, timeout=timeout)
        try:
            yield from call
        except grpc.RpcError as exc:
            raise self._failure(method, exc) from None
        finally:
            call.cancel()  # a consumer that stopped early (e.g. a checksum mismatch) ends the stream


def _receive(chunks: Iterable[pb.GetInputResponse | pb.DownloadOutputResponse], dest: str, expect_name: str,
             expect: tuple[int, str] | None = None) -> str:
    """Write a file stream (header, then data) to DEST atomically, verifying size and sha256."""
    iterator = iter(chunks)
    first = next(iterator, None)
    if first is None or first.WhichOneof("kind") != "header":
        raise SplitpilotError(f"{expect_name}: the broker's stream did not start with a header")
    header = first.header
    if expect is not None and (header.size, header.sha256) != expect:
        raise SplitpilotError(f"{expect_name}: the broker announced size {header.size} sha256 {header.sha256}, "
                              f"expected {expect[0]} {expect[1]}")
    copy_verified((c.data for c in iterator), dest, header.sha256, header.size, expect_name)
    return dest
