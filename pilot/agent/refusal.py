"""Refused agent tokens: telling "the broker will not accept this token" from "the broker is down".

A call of pilot.agent.brokerlink.GrpcAgentBroker that fails because the
broker will not accept this agent's token raises `AgentTokenRefused` instead of the client's error,
so that the agent stops (exit 4) instead of backing off until its idle
timeout as it does when the broker is down. `refusal_of` decides:

  PERMISSION_DENIED, UNAUTHENTICATED   the broker said so (wrong role, expired or
                                       untrusted token seen by the service)
  UNAVAILABLE "Tls handshake failed ... CERTIFICATE_VERIFY_FAILED: ..."
                                       this agent cannot verify the broker's
                                       certificate with its CA (by default the
                                       token's own): token and broker come from
                                       different CAs (or the broker's certificate
                                       is itself expired)
  UNAVAILABLE, any other detail        ambiguous: gRPC says "Socket closed" both
                                       when the broker rejects the client
                                       certificate (TLS 1.3: after the handshake,
                                       with no alert) and when a connection drops.
                                       `probe_tls` then connects once itself: a
                                       broker that completes the handshake and
                                       closes without sending its HTTP/2 settings
                                       refuses this certificate; connection
                                       refused, a timeout or any answer mean the
                                       broker is down or fine (not a refusal).

The agent leaves only after several refusals in a row (AgentSettings), so
a transient (a broker restarting mid-handshake) does not end a pilot.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import ssl
from collections.abc import Callable

from pilot.agent import exitcodes
from pilot.errors import SplitpilotError

#: What to check when the broker refuses a glidein's agent token.
REFUSED_FIX = ("the agent token must be issued by the broker's own CA, for the agent role, and be valid by the "
               "broker's clock: check the factory's CA (the --ca of splitpilot glidein submit or splitpilot factory "
               "run: the broker's CA folder), "
               "its --site, the --broker address, and the clocks of factory, broker and node")
EXPIRED_FIX = ("the glidein waited in the queue longer than its token lives, or this node's clock is wrong: "
               "submit fresh glideins (the factory mints a token per batch), shorten --max-idle, or fix the clock")


class AgentTokenRefused(SplitpilotError):
    """The broker will not accept this agent's token: retrying with it will not help (exit code 4).

    `cause` says what was observed (a gRPC code and message, or the TLS handshake), `fix` what to check."""

    exit_code = exitcodes.TOKEN_REFUSED
    lead = "the broker refused this agent token"

    def __init__(self, cause: str, fix: str = REFUSED_FIX) -> None:
        self.cause = cause
        self.fix = fix
        super().__init__(f"{self.lead} ({cause}); fix: {fix}")


class AgentTokenExpired(AgentTokenRefused):
    """The agent token has expired (exit code 5)."""

    exit_code = exitcodes.TOKEN_EXPIRED
    lead = "the agent token has expired"

    def __init__(self, not_after: datetime.datetime, now: datetime.datetime | None = None,
                 fix: str = EXPIRED_FIX) -> None:
        now = now or datetime.datetime.now(datetime.UTC)
        self.not_after = not_after
        super().__init__(f"valid until {not_after:%Y-%m-%d %H:%M:%S}Z, now {now:%Y-%m-%d %H:%M:%S}Z by this "
                         "node's clock", fix)


#: OpenSSL/BoringSSL reasons in a gRPC handshake failure that name a certificate problem (not a network one).
_HANDSHAKE_REFUSAL = re.compile(r"CERTIFICATE_VERIFY_FAILED|\b\w*ALERT_(UNKNOWN_CA|BAD_CERTIFICATE|CERTIFICATE_\w+|"
                                r"ACCESS_DENIED|DECRYPT_ERROR)", re.IGNORECASE)


def handshake_refusal(details: str) -> str | None:
    """The certificate problem gRPC reports in DETAILS of an UNAVAILABLE error, or None.

    Observed (grpcio 1.85, a token from another CA, the CA taken from its chain as the glidein does):
    'failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:PORT: Tls handshake
    failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:
    OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: self signed certificate in certificate chain: OK'
    """
    found = _HANDSHAKE_REFUSAL.search(details or "")
    if found is None:
        return None
    if found.group(0).upper() == "CERTIFICATE_VERIFY_FAILED":
        reason = details[found.end():].lstrip(": ").split(":")[0].strip() or "verification failed"
        return (f"TLS handshake: this agent cannot verify the broker's certificate with its CA: {reason}; "
                "the token and the broker come from different CAs")
    return f"TLS handshake: the broker answered {found.group(0).upper()}"


def refusal_of(error: BaseException, probe: Callable[[], str | None] | None = None) -> AgentTokenRefused | None:
    """AgentTokenRefused if ERROR (a pilot.api.client.BrokerError) means the broker refuses this agent's token.

    PROBE (called only for an UNAVAILABLE error whose details name no certificate problem) returns what
    it found (a cause) or None; see probe_tls."""
    code = getattr(getattr(error, "code", None), "name", "")
    details = str(getattr(error, "details", "") or error)
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        return AgentTokenRefused(f"{code}: {details}")
    if code != "UNAVAILABLE":
        return None
    cause = handshake_refusal(details)
    if cause is None and probe is not None:
        cause = probe()
    return AgentTokenRefused(cause) if cause else None


def probe_tls(address: str, certificate_pem: bytes, key_pem: bytes, ca_pem: bytes,
              timeout: float = 5.0) -> str | None:
    """Connect to the broker once with this certificate; the certificate problem found, or None.

    A gRPC server that accepts the client certificate sends its HTTP/2 settings
    right after the handshake; one that refuses it closes the connection (TLS
    1.3: after the client's side of the handshake is done; TLS 1.2: during it),
    without an alert. None when the broker cannot be reached, answers, or the
    probe itself cannot be made: only a certain refusal counts. The key goes to
    OpenSSL through a memfd (no file on disk)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False  # gRPC checks the name; the probe is about the certificates
        context.load_verify_locations(cadata=ca_pem.decode("ascii"))
        fd = os.memfd_create("splitpilot-probe", os.MFD_CLOEXEC)
        try:
            os.write(fd, certificate_pem + key_pem)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        context.set_alpn_protocols(["h2"])
    except (OSError, ValueError, ssl.SSLError, AttributeError):
        return None
    try:
        raw = socket.create_connection((host, int(port)), timeout=timeout)
    except (OSError, ValueError):
        return None  # down or unreachable: not a refusal
    with raw:
        try:
            tls = context.wrap_socket(raw, server_hostname=host or None)
        except ssl.SSLCertVerificationError as exc:
            return (f"TLS handshake: this agent cannot verify the broker's certificate with its CA: "
                    f"{exc.verify_message}; the token and the broker come from different CAs")
        except ssl.SSLEOFError:
            return "TLS handshake: the broker closed the connection during the handshake (no alert)"
        except ssl.SSLError as exc:
            reason = str(getattr(exc, "reason", "") or "")
            return f"TLS handshake: the broker answered {reason}" if "ALERT" in reason.upper() else None
        except OSError:
            return None
        with tls:
            try:
                # The HTTP/2 client preface and an empty SETTINGS frame, then the server's first bytes.
                tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                first = tls.recv(9)
            except ssl.SSLError as exc:
                reason = str(getattr(exc, "reason", "") or "")
                if "ALERT" in reason.upper():
                    return f"TLS: the broker answered {reason} after the handshake"
                if isinstance(exc, ssl.SSLEOFError):
                    first = b""
                else:
                    return None
            except (TimeoutError, OSError):
                return None  # slow or dropped: not a certain refusal
            if first:
                return None
            return ("TLS: the broker closed the connection right after the handshake without a word, as a gRPC "
                    "server does with a client certificate it does not accept (another CA, expired by its clock)")
