"""`splitpilot ca ...` and `splitpilot token ...`: the CA and token files by hand.

    splitpilot ca init DIR [--key-type ec|rsa] [--name NAME] [--max-ttl ROLE=DURATION ...]
    splitpilot ca show DIR
    splitpilot token issue --ca DIR --role ROLE --subject NAME --out FILE [--ttl 24h] ...
    splitpilot token show FILE [--ca DIR]
    splitpilot token verify FILE --ca DIR [--role ROLE] [--site S] [--job-id N --attempt N]
    splitpilot token revoke --broker HOST:PORT --token ADMIN.pem
                            (--serial HEX | --subject NAME --role ROLE | --token-file FILE) --reason TEXT
    splitpilot token revoked --broker HOST:PORT --token ADMIN.pem [--json]

Token files hold the certificate chain and the private key (0600); `show`
never prints the key. `revoke` sends only the certificate of --token-file,
never its key; the admin token is read from its file (never from argv or
the environment).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.ca import CAPolicy, CertificateAuthority, public_key_from_request
from pilot.durations import format_duration, parse_duration
from pilot.errors import UsageError
from pilot.tokens.files import (
    KeyPermissions,
    TokenFile,
    certificate_pem,
    load_certificates,
    read_token_file,
    write_private,
    write_public,
)
from pilot.tokens.identity import Identity, TokenRole, parse_identity
from pilot.tokens.verify import Expectation, TokenVerifier

ROLES = [r.value for r in TokenRole]


def register(subparsers: argparse._SubParsersAction) -> None:
    ca = subparsers.add_parser("ca", help="create and inspect the internal certificate authority",
                               description="The internal certificate authority that signs every token.")
    ca_sub = ca.add_subparsers(title="ca commands", metavar="CA_COMMAND")
    init = ca_sub.add_parser("init", help="create a new CA in DIR (refuses to overwrite one)",
                             description="Create a CA: DIR/ca.key (0600), DIR/ca.crt, DIR/policy.toml.")
    init.add_argument("directory", metavar="DIR", help="the new CA's folder (created 0700; must not hold a CA)")
    init.add_argument("--key-type", choices=("ec", "rsa"), default="ec",
                      help="CA key: ECDSA P-256 (default) or RSA-3072 for sites that need RSA")
    init.add_argument("--name", default="splitpilot CA", metavar="NAME",
                      help="the CA's common name (default: %(default)s)")
    init.add_argument("--lifetime", default="3650d", metavar="DURATION",
                      help="validity of the CA certificate (default: %(default)s)")
    init.add_argument("--max-ttl", action="append", default=[], metavar="ROLE=DURATION",
                      help="lower the longest lifetime of a role's tokens, e.g. agent=1d (repeatable; "
                           "defaults: user 31d, agent 2d, job 2d, host 365d, admin 31d)")
    init.set_defaults(handler=_ca_init)
    show = ca_sub.add_parser("show", help="print the CA's name, validity, fingerprint and policy")
    show.add_argument("directory", metavar="DIR", help="the CA's folder (as given to ca init)")
    show.add_argument("--json", action="store_true",
                      help="one JSON object: subject, key, not_before, not_after (ISO 8601, UTC), fingerprint "
                           "(SHA-256 hex), max_lifetime_s {role: seconds}")
    show.set_defaults(handler=_ca_show)
    ca.set_defaults(handler=lambda _a: ca.print_help(sys.stderr) or 2)

    token = subparsers.add_parser("token", help="issue, show and verify token certificates",
                                  description="Token certificates: one per role, signed by the CA.")
    tok_sub = token.add_subparsers(title="token commands", metavar="TOKEN_COMMAND")
    issue = tok_sub.add_parser("issue", help="issue a token into a file (0600)",
                               description="Issue a token. The key is generated here unless --public-key or "
                                           "--csr gives one (then --out receives the certificate only).")
    issue.add_argument("--ca", required=True, metavar="DIR", help="the CA directory")
    issue.add_argument("--role", required=True, choices=ROLES,
                       help="what the token may do: user submits, agent matches jobs of its site, job serves "
                            "one attempt, admin operates the broker, host is a broker's own certificate")
    issue.add_argument("--subject", metavar="NAME",
                       help="holder name: user or admin name, pilot name, host name, or the job's owner "
                            "(default: the role name)")
    issue.add_argument("--site", metavar="SITE", help="agent tokens: the site the agent may match for")
    issue.add_argument("--queue", default=None, metavar="NAME", help="agent tokens: the queue (default: 'default')")
    issue.add_argument("--job-id", type=int, metavar="N", help="job tokens: the job id")
    issue.add_argument("--attempt", type=int, metavar="N", help="job tokens: the attempt number (from 1)")
    issue.add_argument("--dns", action="append", default=[], metavar="NAME",
                       help="host tokens: a DNS name of the broker (repeatable)")
    issue.add_argument("--ip", action="append", default=[], metavar="ADDRESS",
                       help="host tokens: an IP address of the broker (repeatable)")
    issue.add_argument("--ttl", metavar="DURATION", help="lifetime, e.g. 24h (default: the role's maximum)")
    keys = issue.add_mutually_exclusive_group()
    keys.add_argument("--public-key", metavar="FILE", help="issue for this public key (PEM or DER)")
    keys.add_argument("--csr", metavar="FILE", help="issue for this certificate request (signature checked)")
    issue.add_argument("--out", required=True, metavar="FILE", help="where to write the token")
    issue.set_defaults(handler=_token_issue)
    show = tok_sub.add_parser("show", help="print what a token says (never the key)")
    show.add_argument("file", metavar="FILE", help="the token file (its key, if there, is never printed)")
    show.add_argument("--ca", metavar="DIR", help="also verify it against this CA")
    show.add_argument("--json", action="store_true",
                      help="one JSON object: role, subject (the DN), holder, site, queue, job_id, attempt, "
                           "dns_names, issuer, not_before, not_after (ISO 8601, UTC), expired, serial (hex), "
                           "fingerprint (SHA-256 hex), verified (absent facts are null)")
    show.set_defaults(handler=_token_show)
    verify = tok_sub.add_parser("verify", help="verify a token against a CA and an expectation",
                                description="Exit 0 if FILE is a valid token meeting the expectation, "
                                            "1 with the reason otherwise.")
    verify.add_argument("file", metavar="FILE", help="the token file")
    verify.add_argument("--ca", required=True, metavar="DIR", help="the CA directory it must be signed by")
    verify.add_argument("--role", choices=ROLES, action="append", help="allowed role (repeatable; default: any)")
    verify.add_argument("--site", metavar="SITE", help="agent tokens: it must be scoped to this site")
    verify.add_argument("--job-id", type=int, metavar="N", help="job tokens: it must be bound to this job")
    verify.add_argument("--attempt", type=int, metavar="N", help="job tokens: and to this attempt")
    verify.set_defaults(handler=_token_verify)

    add_revocation_commands(tok_sub, _admin_options, lambda handler: handler)
    token.set_defaults(handler=lambda _a: token.print_help(sys.stderr) or 2)


def add_revocation_commands(sub: argparse._SubParsersAction,
                            connection: Callable[[argparse.ArgumentParser], None],
                            wrap: Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]
                            ) -> None:
    """`revoke` and `revoked` under SUB (`splitpilot token` and `splitpilot admin token`): CONNECTION adds the
    broker and token options, WRAP turns a handler into one that has args.broker, args.token and args.ca_cert."""
    revoke = sub.add_parser(
        "revoke", help="revoke a token at the broker (every broker on its database refuses it within seconds)",
        description="Revoke one token (by serial, or by its file: only its certificate is sent), or every token "
                    "of a holder and role issued until now. Needs an admin token. The holder of a revoked token "
                    "is refused with UNAUTHENTICATED and the reason.",
        epilog="a serial is accepted when some broker on the database has seen the token; a token never used "
               "is revoked with --token-file, or by --subject/--role.")
    connection(revoke)
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", metavar="HEX", help="the certificate serial (`splitpilot token show` prints it)")
    which.add_argument("--subject", metavar="NAME", help="every token of this holder (with --role) issued until now")
    which.add_argument("--token-file", metavar="FILE", help="the token (or certificate) file of the token to revoke")
    revoke.add_argument("--role", choices=("user", "admin", "agent", "job"), help="with --subject: the role")
    revoke.add_argument("--reason", required=True, metavar="TEXT",
                        help="why (recorded, and shown to the refused holder)")
    revoke.set_defaults(handler=wrap(_token_revoke))
    revoked = sub.add_parser("revoked", help="list the revocations the broker knows",
                                 description="The revocations recorded at the broker, oldest first.")
    connection(revoked)
    revoked.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    revoked.set_defaults(handler=wrap(_token_revoked))


def _admin_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", required=True, metavar="HOST:PORT", help="the broker")
    parser.add_argument("--token", required=True, metavar="FILE", help="your admin token file")
    parser.add_argument("--ca-cert", metavar="FILE",
                        help="the broker's CA certificate (default: the last certificate of the token file)")


# ------------------------------------------------------------------ handlers

def _ca_init(args: argparse.Namespace) -> int:
    limits = {}
    for item in args.max_ttl:
        role, sep, value = item.partition("=")
        if not sep or role not in ROLES:
            raise UsageError(f"--max-ttl {item!r}: write ROLE=DURATION with ROLE one of {', '.join(ROLES)}")
        limits[TokenRole(role)] = parse_duration(value, what=f"--max-ttl {role}")
    ca = CertificateAuthority.init(args.directory, key_type=args.key_type, name=args.name,
                                   lifetime=parse_duration(args.lifetime, what="--lifetime"),
                                   policy=CAPolicy.with_limits(limits))
    print(f"created CA {ca.certificate.subject.rfc4514_string()} in {args.directory}", file=sys.stderr)
    _print_ca(ca)
    return 0


def _ca_show(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.load(args.directory)
    if args.json:
        cert = ca.certificate
        print(json.dumps({"subject": cert.subject.rfc4514_string(), "key": _key_description(cert.public_key()),
                          "not_before": cert.not_valid_before_utc.isoformat(),
                          "not_after": cert.not_valid_after_utc.isoformat(),
                          "fingerprint": cert.fingerprint(hashes.SHA256()).hex(),
                          "max_lifetime_s": {r.value: int(t.total_seconds())
                                             for r, t in ca.policy.max_lifetime.items()}}))
    else:
        _print_ca(ca)
    return 0


def _print_ca(ca: CertificateAuthority) -> None:
    cert = ca.certificate
    print(f"subject:     {cert.subject.rfc4514_string()}")
    print(f"key:         {_key_description(cert.public_key())}")
    print(f"valid:       {_when(cert.not_valid_before_utc)} to {_when(cert.not_valid_after_utc)}")
    print(f"fingerprint: SHA256:{cert.fingerprint(hashes.SHA256()).hex()}")
    print("max lifetime: " + ", ".join(f"{r.value} {format_duration(t)}" for r, t in ca.policy.max_lifetime.items()))


def _token_issue(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.load(args.ca)
    role = TokenRole(args.role)
    if role is TokenRole.AGENT and not args.site:
        raise UsageError("agent tokens are scoped to a site: add --site NAME")
    if role is TokenRole.JOB and (args.job_id is None or args.attempt is None):
        raise UsageError("job tokens are bound to a job: add --job-id N --attempt N")
    if role is TokenRole.HOST and not (args.dns or args.ip):
        raise UsageError("host tokens need the broker's names: add --dns NAME and/or --ip ADDRESS")
    scope = dict(
        ttl=parse_duration(args.ttl, what="--ttl") if args.ttl else None,
        site=args.site if role is TokenRole.AGENT else None,
        queue=(args.queue or "default") if role is TokenRole.AGENT else None,
        job_id=args.job_id if role is TokenRole.JOB else None,
        attempt=args.attempt if role is TokenRole.JOB else None,
        dns_names=args.dns, ip_addresses=args.ip,
    )
    subject = args.subject or role.value
    args.out = os.path.expanduser(args.out)  # also when the shell left a quoted ~ alone
    _out_folder(args.out)
    request = args.public_key or args.csr
    if request:
        with open(request, "rb") as handle:
            public_key = public_key_from_request(handle.read())
        certificate = ca.issue(role, subject, public_key, **scope)
        write_public(args.out, certificate_pem([certificate, ca.certificate]))
        identity = parse_identity(certificate)
    else:
        token = ca.new_token(role, subject, **scope)
        write_private(args.out, token.to_pem())
        identity = parse_identity(token.certificate)
    print(f"issued {identity.describe()}, valid until {identity.not_after:%Y-%m-%d %H:%M:%S}Z, "
          f"written to {args.out}", file=sys.stderr)
    return 0


def _out_folder(out: str) -> None:
    """Create the folder of the token file OUT if it is missing, private (0700) like ~/.ssh: a token
    written into it is a credential. An existing folder is left as it is."""
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(folder):
        return
    try:
        os.makedirs(folder, mode=0o700)
    except OSError as exc:
        raise UsageError(f"cannot create the folder {folder} for --out {out}: {exc.strerror}; fix: create it, or "
                         "write the token elsewhere") from None
    print(f"created {folder} (0700) for the token", file=sys.stderr)


def _token_show(args: argparse.Namespace) -> int:
    chain = _read_chain(args.file)
    identity = parse_identity(chain[0])
    if args.ca:
        identity = TokenVerifier([CertificateAuthority.load(args.ca).certificate]).verify(list(chain))
    if args.json:
        print(json.dumps(identity_record(identity, verified=bool(args.ca))))
    else:
        _print_identity(identity, verified=bool(args.ca))
    return 0


def identity_record(identity: Identity, *, verified: bool) -> dict[str, object]:
    """`token show --json`: stable field names (documented in its --help and docs/tokens.md)."""
    return {"role": identity.role.value, "subject": identity.dn, "holder": identity.subject,
            "site": identity.site, "queue": identity.queue, "job_id": identity.job_id,
            "attempt": identity.attempt, "dns_names": list(identity.dns_names), "issuer": identity.issuer,
            "not_before": identity.not_before.isoformat(), "not_after": identity.not_after.isoformat(),
            "expired": identity.not_after <= datetime.datetime.now(datetime.UTC),
            "serial": f"{identity.serial:x}", "fingerprint": identity.fingerprint, "verified": verified}


def _token_verify(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.load(args.ca)
    roles = tuple(TokenRole(r) for r in args.role) if args.role else tuple(TokenRole)
    expect = Expectation(roles, site=args.site, job_id=args.job_id, attempt=args.attempt)
    identity = TokenVerifier([ca.certificate]).verify(list(_read_chain(args.file)), expect)
    print(f"ok: {identity.describe()}, valid until {identity.not_after:%Y-%m-%d %H:%M:%S}Z")
    return 0


def _admin_client(args: argparse.Namespace):
    from pilot.api.client import AdminClient  # why: grpc; `splitpilot` loads every command's module
    return AdminClient(args.broker, args.token, args.ca_cert)


def _token_revoke(args: argparse.Namespace) -> int:
    if (args.subject is None) != (args.role is None):
        raise UsageError("--subject and --role go together: every token of that holder in that role is revoked")
    target: dict = {}
    if args.serial:
        target["serial"] = args.serial
    elif args.subject:
        target.update(subject=args.subject, role=args.role)
    else:
        chain = _read_chain(args.token_file)  # certificates only: the key never leaves this machine
        target["certificate_pem"] = certificate_pem([chain[0]])
    with _admin_client(args) as admin:
        revocation, already = admin.revoke_token(args.reason, **target)
    what = (f"token serial {revocation.serial} ({revocation.role} {revocation.subject})" if revocation.serial
            else f"every {revocation.role} token of {revocation.subject} issued until {_when(revocation.revoked)}")
    print(f"{'already revoked' if already else 'revoked'}: {what} at {_when(revocation.revoked)} by "
          f"{revocation.revoked_by}: {revocation.reason}")
    print("every broker on the same database refuses it within its --revocation-refresh (2s by default)",
          file=sys.stderr)
    return 0


def _token_revoked(args: argparse.Namespace) -> int:
    with _admin_client(args) as admin:
        revocations = admin.list_revoked()
    if args.json:
        print(json.dumps([{"id": r.id, "serial": r.serial, "subject": r.subject, "role": r.role, "reason": r.reason,
                           "revoked": r.revoked.isoformat(), "revoked_by": r.revoked_by,
                           "not_after": r.not_after.isoformat() if r.not_after else None}
                          for r in revocations], indent=2))
        return 0
    rows = [("ID", "SERIAL", "ROLE", "HOLDER", "REVOKED", "BY", "REASON")]
    rows += [(str(r.id), r.serial or "(all issued before)", r.role, r.subject, _when(r.revoked), r.revoked_by,
              r.reason) for r in revocations]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(f"{len(revocations)} revocation(s)", file=sys.stderr)
    return 0


def _read_chain(path: str):
    """The certificates of a token file (with key: checked private) or a bare certificate file."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(1 << 20)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    if b"PRIVATE KEY" in data:
        token: TokenFile = read_token_file(path, KeyPermissions.REFUSE)
        return token.chain
    return tuple(load_certificates(data, path))


def _print_identity(identity: Identity, *, verified: bool) -> None:
    now = datetime.datetime.now(datetime.UTC)
    left = identity.not_after - now
    status = f"valid for {format_duration(left)} more" if left.total_seconds() > 0 else "EXPIRED"
    print(f"role:        {identity.role.value}")
    print(f"subject:     {identity.dn}")
    print(f"holder:      {identity.subject}")
    if identity.site is not None:
        print(f"site:        {identity.site}")
        print(f"queue:       {identity.queue}")
    if identity.job_id is not None:
        print(f"job:         {identity.job_id}")
        print(f"attempt:     {identity.attempt}")
    if identity.dns_names:
        print(f"dns names:   {', '.join(identity.dns_names)}")
    print(f"issuer:      {identity.issuer}")
    print(f"valid:       {_when(identity.not_before)} to {_when(identity.not_after)} ({status})")
    print(f"serial:      {identity.serial:x}")
    print(f"fingerprint: SHA256:{identity.fingerprint}")
    print(f"verified:    {'yes, against the CA given' if verified else 'no (add --ca DIR to verify)'}")


def _when(moment: datetime.datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S}Z"


def _key_description(key) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    return type(key).__name__


