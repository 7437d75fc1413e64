"""`splitpilot broker serve` and `splitpilot job submit|status|output|kill`.

Clients find the broker and their token from, in this order: the command
line (--broker, --token, --ca-cert), the config file (--config FILE, else
$SPLITPILOT_CONFIG, else ~/.splitpilot/config.toml if it exists), and the
defaults (localhost:7443, ~/.splitpilot/token.pem, the CA certificate at
the end of the token file). Tokens are never read from the environment:
only the path of the config file may be.

    # ~/.splitpilot/config.toml
    [client]
    broker = "broker.example.org:7443"
    token = "~/.splitpilot/token.pem"
    ca_cert = "~/.splitpilot/ca.crt"    # optional
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import signal
import sys
import time

from broker.jobids import FORMS, parse_job_ids
from pilot import logconfig
from pilot.api.files import format_size, parse_size, shown
from pilot.api.jobfile import load_job_file
from pilot.api.states import JobState
from pilot.configfile import ConfigSpec, make_configurable, resolve
from pilot.durations import format_duration, parse_duration
from pilot.errors import SplitpilotError, UsageError
from pilot.tomlschema import Checker

DEFAULT_BROKER = "localhost:7443"
DEFAULT_TOKEN = "~/.splitpilot/token.pem"
DEFAULT_CONFIG = "~/.splitpilot/config.toml"
CONFIG_ENV = "SPLITPILOT_CONFIG"
CONFIG_KEYS = ("broker", "token", "ca_cert")
CONFIG_EXAMPLES = {"broker": '"host:7443"', "token": f'"{DEFAULT_TOKEN}"', "ca_cert": '"~/.splitpilot/ca.crt"'}
STATE_NAMES = [s.name for s in JobState]
PROGRESS_MODES = ("auto", "always", "never")   # broker.progress.MODES, without importing it for --help

#: `broker serve --config FILE`: a [broker] table, one key per option (pilot.configfile).
SERVE_CONFIG = ConfigSpec(
    section="broker",
    examples={"state_dir": '"/var/lib/splitpilot/broker"', "db": '"postgresql://splitpilot@db/splitpilot"',
              "listen": '"0.0.0.0:7443"', "metrics": '"127.0.0.1:9100"', "ca": '"/var/lib/splitpilot/broker/ca"',
              "host_name": '["broker.example.org"]'},
    validators={"max_file_size": lambda v: parse_size(v, "max_file_size"),
                "max_job_size": lambda v: parse_size(v, "max_job_size"),
                "heartbeat_timeout": lambda v: _heartbeat_check(v)},
    minimum={"max_attempts": 1, "max_outputs": 1, "threads": 1, "max_jobs_per_submit": 1})

SERVE_EPILOG = """\
a configuration file (--config FILE) sets any option as a key of its [broker] table
(--state-dir -> state_dir, --host-name -> host_name = [...]); flags override it. See docs/operations.md.

state directory:
  DIR/ca/         the CA, created on first start (unless --ca names an existing one)
  DIR/host.pem    the broker's TLS certificate (a host token), renewed when needed
  DIR/broker.db   the SQLite database (unless --db names another store)
  DIR/files/      the content-addressed input and output store (--file-store local)
  DIR/staging/    uploads in flight (--file-store database or xrootd://: the content is elsewhere)
  DIR/address     the address actually bound (with port 0, the chosen port); removed at stop

Give each user a token:  splitpilot token issue --ca DIR/ca --role user --subject alice --out alice.pem
Stop with SIGTERM or Ctrl-C: running calls get --grace seconds to finish. Exit code after a
clean stop: 0 for SIGTERM (how a service manager stops it), 130 for Ctrl-C (SIGINT).
"""

CLIENT_EPILOG = f"""\
connection settings come from the options, then the config file ([client] table with
broker, token, ca_cert; --config FILE, ${CONFIG_ENV}, or {DEFAULT_CONFIG}), then the
defaults: broker {DEFAULT_BROKER}, token {DEFAULT_TOKEN}, CA certificate from the token file.
Tokens are never taken from environment variables.
exit codes: 0 success, 1 the operation failed, 2 bad usage or input.
"""

JOBFILE_HELP = """\
A job file is TOML:

  [job]
  name = "hello"
  executable = "run.sh"
  arguments = ["--events", "10"]
  count = 1                      # N copies; {index} in name/arguments/environment -> 0..N-1
  [job.requirements]
  cores = 1
  memory_mb = 2000
  walltime = "1h"
  [[job.inputs]]
  path = "data/input.txt"        # relative to the job file; uploaded before submitting
  [job.outputs]
  patterns = ["*.out"]

Several different jobs: [[jobs]] tables (and an optional [defaults] table). See docs/broker.md.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_broker(subparsers)
    _register_job(subparsers)


# ------------------------------------------------------------------ broker serve

def _register_broker(subparsers) -> None:
    broker = subparsers.add_parser("broker", help="run the broker (the central job queue and matcher)",
                                   description="The broker: job queue, matcher and file store, served over "
                                               "gRPC with mutual TLS.")
    sub = broker.add_subparsers(title="broker commands", metavar="BROKER_COMMAND")
    serve = sub.add_parser("serve", help="serve until SIGTERM/SIGINT",
                           description="Run the broker in the foreground, logging to stderr.",
                           epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--state-dir", required=True, metavar="DIR", help="the broker's directory (created if absent)")
    serve.add_argument("--db", metavar="URL", help="store: sqlite:///PATH or postgresql://USER@HOST/DB "
                                                   "(default: DIR/broker.db)")
    serve.add_argument("--listen", default="127.0.0.1:7443", metavar="HOST:PORT",
                       help="gRPC address (default: %(default)s; 0.0.0.0:7443 for every interface; port 0: any)")
    serve.add_argument("--metrics", metavar="[HOST:]PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off; PORT alone: "
                            "127.0.0.1:PORT). The endpoint has no authentication, so an address other than "
                            "loopback also needs --metrics-public")
    serve.add_argument("--metrics-public", action="store_true",
                       help="allow --metrics on an address other machines reach: anyone who reaches it reads job "
                            "counts, RPC rates and pilots seen (logged as a warning); use it only behind a firewall")
    serve.add_argument("--metrics-timeout", default="10s", metavar="DURATION",
                       help="a metrics connection must send its request within this (default: %(default)s)")
    serve.add_argument("--monitor", metavar="[HOST:]PORT",
                       help="serve the live web monitor at http://HOST:PORT/ (default: off; PORT alone: "
                            "127.0.0.1:PORT); read-only, no authentication, so an address other than loopback "
                            "also needs --monitor-public")
    serve.add_argument("--monitor-public", action="store_true",
                       help="allow --monitor on an address other machines reach; it then shows aggregated counts "
                            "only (no site names, job ids or messages)")
    serve.add_argument("--ca", metavar="DIR", help="an existing CA directory (default: DIR/ca, created on first "
                                                      "start)")
    serve.add_argument("--host-name", action="append", default=[], metavar="NAME",
                       help="a DNS name or IP address clients use to reach the broker, for its certificate "
                            "(repeatable; the --listen host, localhost and 127.0.0.1 are always included)")
    serve.add_argument("--reap-interval", default="5s", metavar="DURATION",
                       help="how often lost and never-started attempts are re-queued (default: %(default)s)")
    serve.add_argument("--heartbeat-timeout", default="5m", metavar="DURATION",
                       help="an attempt without heartbeat for this long is lost (default: %(default)s); wrappers "
                            "heartbeat every third of it (at most every 30s), so it must be 3s or more")
    serve.add_argument("--start-timeout", default="10m", metavar="DURATION",
                       help="a matched job not started within this is re-queued (default: %(default)s)")
    serve.add_argument("--queue-timeout", metavar="DURATION",
                       help="a job waiting longer than this expires (default: never)")
    serve.add_argument("--max-attempts", type=int, default=3, metavar="N",
                       help="attempts per job when its spec does not say (default: %(default)s)")
    serve.add_argument("--max-file-size", default="2G", metavar="SIZE",
                       help="largest single input or output file (default: %(default)s)")
    serve.add_argument("--max-job-size", default="8G", metavar="SIZE",
                       help="largest total of a job's inputs, and of its outputs (default: %(default)s)")
    serve.add_argument("--max-outputs", type=int, default=1000, metavar="N",
                       help="most output files one job attempt may save (default: %(default)s)")
    serve.add_argument("--file-store", default=None, metavar="local|database|xrootd://...",
                       help="where input and output content lives: local (DIR/files, one broker), database (in "
                            "the PostgreSQL store, shared by every broker of it) or xrootd://HOST:PORT/PATH"
                            "[?keytab=FILE] (an XRootD server, sss authentication, catalogued in PostgreSQL; "
                            "keytab default DIR/xrootd.keytab) (default: database with a PostgreSQL --db, local "
                            "otherwise)")
    serve.add_argument("--file-grace", default="1d", metavar="DURATION",
                       help="content no job refers to any more is removed once older than this; an upload not "
                            "yet used by a submission is kept this long (default: %(default)s)")
    serve.add_argument("--history-retention", default="90d", metavar="DURATION",
                       help="the history events of jobs final for longer than this are pruned; the job keeps its "
                            "final state, message and outputs (default: %(default)s)")
    serve.add_argument("--output-retention", default=None, metavar="DURATION",
                       help="the outputs of jobs final for longer than this are forgotten and their content "
                            "collected (fetch them before; default: kept for ever)")
    serve.add_argument("--revocation-refresh", default="2s", metavar="DURATION",
                       help="how often revoked tokens are reloaded from the database: a token revoked through "
                            "another broker on the same database is refused here within this (default: "
                            "%(default)s)")
    serve.add_argument("--job-token-ttl", metavar="DURATION",
                       help="lifetime of the job token handed out at a match (default: the CA's maximum for job "
                            "tokens; wrappers refresh it while the job runs)")
    serve.add_argument("--empty-retry", default="30s", metavar="DURATION",
                       help="how long an agent is told to wait after a match found no job (default: %(default)s)")
    serve.add_argument("--threads", type=int, default=8, metavar="N",
                       help="threads for database calls and file I/O (default: %(default)s)")
    serve.add_argument("--max-jobs-per-submit", type=int, default=10_000, metavar="N",
                       help="most jobs one submission may hold (default: %(default)s)")
    serve.add_argument("--grace", default="5s", metavar="DURATION",
                       help="time running calls get to finish on shutdown (default: %(default)s)")
    serve.add_argument("--log-level", default="info", choices=logconfig.LEVELS,
                       help="log level (default: %(default)s; times are UTC)")
    serve.add_argument("--log-file", metavar="FILE",
                       help="append the log lines to FILE (created 0600) instead of stderr (default: stderr, which "
                            "a systemd unit sends to the journal)")
    make_configurable(serve, SERVE_CONFIG)
    serve.set_defaults(handler=_serve)
    broker.set_defaults(handler=lambda _a: broker.print_help(sys.stderr) or 2)


def _heartbeat_check(text: str) -> None:
    from broker.services.base import heartbeat_interval  # why: the broker's services, loaded when checking

    heartbeat_interval(parse_duration(text, what="heartbeat_timeout"))


def _serve(args: argparse.Namespace) -> int:
    from broker.server import BrokerConfig, BrokerServer  # why: the server and the broker extra
    from broker.services.base import ServiceSettings, heartbeat_interval  # why: as above
    from broker.store.base import StoreSettings  # why: as above

    resolve(args)   # --config FILE: flag, else file, else default
    # The broker's lines keep their form (`INFO store ...`): its loggers all say `broker`, so no source word.
    logconfig.configure(args.log_level, source=False, log_file=args.log_file)
    if args.max_attempts < 1:
        raise UsageError("--max-attempts must be at least 1")
    for flag, value in (("--max-outputs", args.max_outputs), ("--threads", args.threads),
                        ("--max-jobs-per-submit", args.max_jobs_per_submit)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1")
    heartbeat_interval(parse_duration(args.heartbeat_timeout, what="--heartbeat-timeout"))  # refused early
    store_settings = StoreSettings(
        default_max_attempts=args.max_attempts,
        heartbeat_timeout=parse_duration(args.heartbeat_timeout, what="--heartbeat-timeout"),
        start_timeout=parse_duration(args.start_timeout, what="--start-timeout"),
        queue_timeout=parse_duration(args.queue_timeout, what="--queue-timeout") if args.queue_timeout else None,
        max_jobs_per_submit=args.max_jobs_per_submit)
    config = BrokerConfig(
        state_dir=args.state_dir, db_url=args.db, listen=args.listen, metrics=args.metrics, ca_dir=args.ca,
        metrics_public=args.metrics_public, monitor=args.monitor, monitor_public=args.monitor_public,
        metrics_timeout=parse_duration(args.metrics_timeout, what="--metrics-timeout").total_seconds(),
        revocation_refresh=parse_duration(args.revocation_refresh, what="--revocation-refresh").total_seconds(),
        max_job_files=args.max_outputs,
        host_names=tuple(args.host_name),
        reap_interval=parse_duration(args.reap_interval, what="--reap-interval").total_seconds(),
        max_file_size=parse_size(args.max_file_size, "--max-file-size"),
        max_job_bytes=parse_size(args.max_job_size, "--max-job-size"),
        file_store=args.file_store,
        file_grace=parse_duration(args.file_grace, what="--file-grace"),
        history_retention=parse_duration(args.history_retention, what="--history-retention"),
        output_retention=(None if args.output_retention is None
                          else parse_duration(args.output_retention, what="--output-retention")),
        store_settings=store_settings, grace=parse_duration(args.grace, what="--grace").total_seconds())
    # The offload choice stays the server's (a network database: every store call in a thread).
    config.service = ServiceSettings(
        empty_retry_s=int(parse_duration(args.empty_retry, what="--empty-retry").total_seconds()),
        threads=args.threads, offload_store=config.store_url.startswith(("postgres:", "postgresql:", "postgresql+")),
        job_token_ttl=parse_duration(args.job_token_ttl, what="--job-token-ttl") if args.job_token_ttl else None)
    server = BrokerServer(config)
    caught: list[int] = []

    def on_signal(signum, _frame) -> None:
        caught.append(signum)
        server.request_stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    log = logging.getLogger("splitpilot.broker")
    try:
        server.start()
        _tune_gc()
        log.info("ready: limits %s per file, %s per job; reaper every %s", format_size(config.max_file_size),
                 format_size(config.max_job_bytes), args.reap_interval)
        while not server.wait(1.0):
            pass
        log.info("shutting down (grace %s)", args.grace)
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # SIGTERM is how a service manager stops it: a normal end (the systemd unit in contrib/ counts on 0).
    # Ctrl-C is an interruption, as for every other long-running command: 130, after the same clean stop.
    return 130 if caught and caught[0] == signal.SIGINT else 0


def _tune_gc() -> None:
    """Fewer, shorter collector pauses for a long-running server: every gRPC
    call allocates hundreds of short-lived objects, and with the default
    thresholds the full collections that follow scan everything imported at
    start-up (measured: 15-30 ms pauses several times per 10 s under load).
    Objects alive now are moved out of the collector's sight (gc.freeze)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)


# ------------------------------------------------------------------ job commands

def _client_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument("--broker", metavar="HOST:PORT", help=f"the broker (default: config, else {DEFAULT_BROKER})")
    group.add_argument("--token", metavar="FILE", help=f"your token file (default: config, else {DEFAULT_TOKEN})")
    group.add_argument("--ca-cert", metavar="FILE",
                       help="the broker's CA certificate (default: config, else the last certificate of the "
                            "token file)")
    group.add_argument("--config", metavar="FILE", help=f"client config file (default: ${CONFIG_ENV}, else "
                                                        f"{DEFAULT_CONFIG} if it exists)")


def listing_limit(text: str) -> int:
    """argparse type of every --limit N: 1 to 10,000 (a listing's most per call), checked before anything
    is read or dialled (a negative one used to reach protobuf's uint32 as a traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give 1 to 10000") from None
    if not 1 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"{value}: give 1 to 10000 (the broker's most per call)")
    return value


def _register_job(subparsers) -> None:
    job = subparsers.add_parser("job", help="submit jobs to the broker, follow them, fetch outputs, kill them",
                                description="Jobs on the broker, with a user (or admin) token.",
                                epilog=CLIENT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = job.add_subparsers(title="job commands", metavar="JOB_COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    submit = sub.add_parser("submit", help="upload the inputs and queue the jobs of job files",
                            description="Validate job files, upload their inputs (sha256 computed here, verified "
                                        "by the broker), and queue the jobs. Prints one job id per line.",
                            epilog=JOBFILE_HELP + "\n" + CLIENT_EPILOG, formatter_class=fmt)
    submit.add_argument("files", nargs="+", metavar="FILE", help="job description files (TOML)")
    submit.add_argument("--dry-run", action="store_true", help="validate the files and print the jobs; submit nothing")
    _progress_option(submit, "upload")
    submit.add_argument("--json", action="store_true",
                        help="print one JSON object (batch_id, job_ids, uploaded, reused, warnings) instead of the ids")
    submit.add_argument("--label", default="", metavar="LABEL",
                        help="a label for the batch, shown by job batches (1-64 letters, digits, . _ - or spaces)")
    _client_options(submit)
    submit.set_defaults(handler=_submit)

    status = sub.add_parser("status", help="a table of your jobs, or one job with its history",
                            description="Without ID: your newest jobs and the count per state. With one ID: that "
                                        "job, its attempts' history and its outputs. With several IDs or a range: "
                                        "a table of those jobs. With --batch B: the jobs of that batch of yours.",
                            epilog="job ids: " + FORMS + ".\n"
                                   "--batch B names a whole submission (job submit and job batches print the id); "
                                   "it goes with --state but not with ids.\n"
                                   "with --watch: exit 0 when every job shown ends DONE, 1 otherwise.\n"
                                   "--json: one JSON object per job and line (fields: docs/broker.md).\n"
                                   + CLIENT_EPILOG, formatter_class=fmt)
    status.add_argument("job_ids", nargs="*", metavar="ID", help="job ids or ranges (default: your newest jobs)")
    status.add_argument("--watch", action="store_true",
                        help="refresh until every job shown is in a final state")
    status.add_argument("--interval", default="2s", metavar="DURATION",
                        help="--watch refresh period (default: %(default)s)")
    status.add_argument("--state", action="append", choices=STATE_NAMES, metavar="STATE",
                        help="only jobs in this state (repeatable): " + ", ".join(STATE_NAMES))
    status.add_argument("--limit", type=listing_limit, default=50, metavar="N",
                        help="jobs in the table, 1 to 10000 (default: %(default)s)")
    status.add_argument("--batch", metavar="BATCH", help="only the jobs of this batch of yours")
    status.add_argument("--json", action="store_true",
                        help="print one JSON object per job and line, with stable field names (not with --watch)")
    _client_options(status)
    status.set_defaults(handler=_status)

    output = sub.add_parser("output", help="download jobs' outputs (sha256 verified, never over existing files)",
                            usage="splitpilot job output [-h] [--name NAME] [--force] ID [ID ...] DIR\n"
                                  "       splitpilot job output [-h] [--name NAME] [--force] --batch BATCH DIR",
                            description="Download every output of job ID into DIR (created if needed); with\n"
                                        "several jobs, a range or --batch, each into DIR/ID/. Outputs are written\n"
                                        "only below DIR: a name with control characters, or a symbolic link or a file\n"
                                        "in the way, fails that output (the others are still fetched). Existing\n"
                                        "files are left alone unless --force.",
                            epilog="exit code 1 when any output failed (each is listed on stderr with the fix).\n"
                                   + CLIENT_EPILOG, formatter_class=fmt)
    output.add_argument("targets", nargs="+", metavar="ID [ID ...] DIR",
                        help="job ids or ranges (" + FORMS + "), then the folder")
    output.add_argument("--name", action="append", metavar="NAME", help="only this output (repeatable)")
    output.add_argument("--batch", metavar="BATCH", help="every job of this batch of yours (then give only DIR)")
    output.add_argument("--force", action="store_true",
                        help="replace existing regular files of the same name (never symbolic links or folders)")
    _progress_option(output, "download")
    _client_options(output)
    output.set_defaults(handler=_output)

    kill = sub.add_parser("kill", help="kill jobs (at once if queued, at their next heartbeat if running)",
                          epilog="job ids: " + FORMS + ".\n"
                                 "exit code 1 when any job could not be killed (each is listed on stderr).\n"
                                 + CLIENT_EPILOG, formatter_class=fmt)
    kill.add_argument("job_ids", nargs="*", metavar="ID", help="job ids or ranges (or --batch)")
    kill.add_argument("--batch", metavar="BATCH", help="every job of this batch of yours (not with ids)")
    kill.add_argument("--reason", default="", metavar="TEXT", help="recorded in the job's history")
    _client_options(kill)
    kill.set_defaults(handler=_kill)

    batches = sub.add_parser("batches", help="your batches (one per submission) with their jobs per state",
                             description="Your batches, newest first: each `job submit` makes one (however many "
                                         "jobs it queues). Use an id with job status|kill|output --batch.",
                             epilog="--json: one JSON object per batch and line (fields: docs/broker.md).\n"
                                    + CLIENT_EPILOG, formatter_class=fmt)
    batches.add_argument("--limit", type=listing_limit, default=50, metavar="N",
                         help="batches shown (default: %(default)s)")
    batches.add_argument("--json", action="store_true",
                         help="print one JSON object per batch and line, with stable field names")
    _client_options(batches)
    batches.set_defaults(handler=_batches)
    job.set_defaults(handler=lambda _a: job.print_help(sys.stderr) or 2)


def _progress_option(parser: argparse.ArgumentParser, transfer: str) -> None:
    parser.add_argument("--progress", choices=PROGRESS_MODES, default="auto", metavar="WHEN",
                        help=f"show each {transfer} on one updating line on stderr (file, bytes, percent, rate, "
                             "file k/n): auto (the default) only when stderr is a terminal, always, or never")


def _transfer_progress(args: argparse.Namespace, files: int = 0):
    from broker.progress import TransferProgress
    return TransferProgress.for_stream(sys.stderr, args.progress, files=files)


def client_settings(args: argparse.Namespace) -> tuple[str, str, str | None]:
    """(broker address, token path, CA certificate path or None) from options, config file, defaults."""
    config_path = args.config or os.environ.get(CONFIG_ENV)
    explicit = config_path is not None
    config_path = os.path.expanduser(config_path or DEFAULT_CONFIG)
    values: dict = {}
    if explicit or os.path.exists(config_path):
        try:
            with open(config_path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise UsageError(f"config file {config_path}: {exc.strerror}; fix: check --config / "
                             f"${CONFIG_ENV}") from None
        check = Checker(f"config file {config_path}", examples=CONFIG_EXAMPLES)
        document = check.load_text(data.decode("utf-8", errors="replace"),
                                   'write e.g. [client] broker = "host:7443"')
        check.unknown(document, ("client",), "")
        values = check.table(document.get("client", {}), "client", "client") or {}
        check.unknown(values, CONFIG_KEYS, "client")
        for key in CONFIG_KEYS:
            if key in values:
                check.string(values[key], f"client.{key}", key)
        check.raise_problems()
    broker = args.broker or values.get("broker") or DEFAULT_BROKER
    token = os.path.expanduser(args.token or values.get("token") or DEFAULT_TOKEN)
    ca_cert = args.ca_cert or values.get("ca_cert")
    if not os.path.exists(token):
        raise UsageError(f"no token file {token}; fix: ask the broker's operator for a user token and save it "
                         f"there, or pass --token FILE (or set token in {config_path})")
    return broker, token, os.path.expanduser(ca_cert) if ca_cert else None


def _user_client(args: argparse.Namespace):
    from pilot.api.client import BrokerClient  # why: grpc; `splitpilot` loads every command's module
    broker, token, ca_cert = client_settings(args)
    return BrokerClient(broker, token, ca_cert)


def _submit(args: argparse.Namespace) -> int:
    from broker.store.sql import BATCH_LABEL_FORM, BATCH_LABEL_RE  # why: only submit checks a label

    if args.label and not BATCH_LABEL_RE.fullmatch(args.label):   # before any file is read or uploaded
        raise UsageError(f"--label {_safe(args.label[:64])!r} is not {BATCH_LABEL_FORM}")
    descriptions = []
    for path in args.files:
        descriptions.extend(load_job_file(path))  # every file checked before anything is uploaded
    if args.dry_run:
        for d in descriptions:
            print(f"{d.source}: {d.spec.name or '(no name)'}: {d.spec.executable} {' '.join(d.spec.arguments)}"
                  f"  inputs: {', '.join(i.name for i in d.inputs) or 'none'}")
        print(f"{len(descriptions)} job(s) valid; nothing submitted (--dry-run)", file=sys.stderr)
        return 0
    progress = _transfer_progress(args, files=len({ref.path for d in descriptions for ref in d.inputs}))
    with _user_client(args) as client, progress:
        submission = client.submit_checked(descriptions, label=args.label, on_progress=progress.callback)
    ids = submission.job_ids
    if args.json:
        print(json.dumps({"batch_id": submission.batch_id or None, "job_ids": ids, "uploaded": submission.uploaded,
                          "reused": submission.reused,
                          "warnings": [{"job_indexes": list(w.job_indexes), "message": w.message}
                                       for w in submission.warnings]}, sort_keys=True))
    else:
        for job_id in ids:
            print(job_id)
    print(f"submitted {len(ids)} job(s) to {client.address}" +
          (f": {ids[0]}" if len(ids) == 1 else f": {ids[0]} .. {ids[-1]}" if ids else ""), file=sys.stderr)
    if submission.batch_id:   # its own line: the one above is pasted as a range
        print(f"batch {submission.batch_id}: splitpilot job status|kill|output --batch {submission.batch_id}",
              file=sys.stderr)
    if submission.reused:
        print(f"{submission.reused} input file(s) already on the broker: named by sha256, not uploaded again"
              f"; {submission.uploaded} uploaded", file=sys.stderr)
    for warning in submission.warnings:  # queued all the same: a warning, not a failure
        names = ", ".join(descriptions[i].source for i in warning.job_indexes[:3] if i < len(descriptions))
        more = f" and {len(warning.job_indexes) - 3} more" if len(warning.job_indexes) > 3 else ""
        print(f"warning: {names}{more}: {_safe(warning.message)}", file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    interval = parse_duration(args.interval, what="--interval").total_seconds()
    states = [JobState[s] for s in args.state or ()]
    if args.json and args.watch:
        raise UsageError("--json prints the jobs once; fix: leave out --watch (or poll: repeat the command)")
    job_ids = parse_job_ids(args.job_ids) if args.job_ids else []
    if job_ids and args.state:
        raise UsageError("--state filters your newest jobs, not the ids given; fix: give either ids or --state")
    batch = _batch_option(args, job_ids)
    with _user_client(args) as client:
        if args.json:
            jobs = [client.status(i) for i in job_ids] if job_ids else client.list(
                states=states, limit=args.limit, batch_id=batch).jobs
            for job in jobs:
                print(json.dumps(job_record(job), sort_keys=True))
            return 0
        if len(args.job_ids) == 1 and args.job_ids[0].isdigit():   # one id, not a range: the detailed view
            return _status_one(client, job_ids[0], args.watch, interval)
        if job_ids:
            return _status_ids(client, job_ids, args.watch, interval)
        return _status_table(client, states, args.limit, args.watch, interval, batch)


def _batch_option(args: argparse.Namespace, job_ids: list[int]) -> str:
    """--batch, checked: ids and a batch are not mixed (which would win is not obvious: a job of another
    batch, a range reaching past the batch), so that a kill or a download does exactly what was named."""
    batch = (args.batch or "").strip()
    if args.batch is not None and not batch:
        raise UsageError("--batch is empty; fix: give a batch id as job submit or job batches prints it")
    if batch and job_ids:
        raise UsageError("give either job ids or --batch, not both; fix: run the command once per batch, or "
                         "name the jobs by id only")
    return batch


def job_record(job) -> dict:
    """One job for --json: the stable field names of docs/broker.md ("job status --json"). Times are
    UTC, ISO 8601 with a Z; texts are as the broker has them (JSON escapes what needs escaping)."""
    def when(moment: datetime.datetime) -> str:
        return moment.astimezone(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {
        "job_id": job.job_id, "batch_id": job.batch_id or None, "name": job.name, "owner": job.owner,
        "state": job.state.name,
        "final": job.final, "attempt": job.attempt, "exit_code": job.exit_code, "message": job.message,
        "site": job.site, "node": job.node, "pilot_id": job.pilot_id,
        "submitted": when(job.submitted), "updated": when(job.updated),
        "executable": job.spec.executable, "arguments": list(job.spec.arguments),
        "history": [{"time": when(e.time), "attempt": e.attempt, "state": e.state.name, "detail": e.detail}
                    for e in job.history],
        "outputs": [{"name": o.name, "size": o.size, "sha256": o.sha256} for o in job.outputs],
        "waiting": job.wait.summary if job.wait is not None else None,
        "cpu_seconds": job.cpu_seconds, "rss_bytes": job.rss_bytes,
        "usage_time": when(job.usage_at) if job.usage_at else None,
    }


def _status_ids(client, job_ids: list[int], watch: bool, interval: float) -> int:
    """A table of the jobs JOB_IDS (one GetJob each: the broker lists by owner and state, not by id)."""
    from pilot.api.client import JobListing  # why: grpc; `splitpilot` loads every command's module

    while True:
        jobs = [client.status(i) for i in job_ids]
        counts: dict[JobState, int] = {}
        for job in jobs:
            counts[job.state] = counts.get(job.state, 0) + 1
        listing = JobListing(jobs=jobs, counts=counts, other_counts={})
        final = all(j.final for j in jobs)
        if not watch or final:
            _print_table(listing)
            return 0 if not watch or all(j.state is JobState.DONE for j in jobs) else 1
        print(f"{_when(datetime.datetime.now(datetime.UTC))}  {_progress(jobs)}", flush=True)
        time.sleep(interval)


def _status_one(client, job_id: int, watch: bool, interval: float) -> int:
    job = client.status(job_id)
    if not watch:
        _print_job(job)
        _print_stderr_tail(client, job)
        return 0
    shown = 0
    print(f"job {job.job_id} {job.name or ''}".rstrip())
    while True:
        for event in job.history[shown:]:
            print(f"  {_when(event.time)}  attempt {event.attempt}  {event.state.name:<16} {event.detail}",
                  flush=True)
        shown = len(job.history)
        if job.final:
            break
        time.sleep(interval)
        job = client.status(job_id)
    _print_job(job)
    _print_stderr_tail(client, job)
    return 0 if job.state is JobState.DONE else 1


#: The payload's stderr, as the wrapper saves it among a job's outputs (pilot.wrapper.payload.STDERR_FILE).
STDERR_OUTPUT = "payload.stderr"
#: Lines of a failed job's stderr `job status ID` shows.
STDERR_TAIL_LINES = 20


def _print_stderr_tail(client, job) -> None:
    """The last lines of a failed job's stderr, escaped (the job wrote them: no escape sequence reaches
    the terminal). Only for jobs that failed; nothing when the job saved no stderr."""
    if not job.state.name.startswith("FAILED_") or not any(o.name == STDERR_OUTPUT for o in job.outputs):
        return
    try:
        data = client.output_tail(job.job_id, STDERR_OUTPUT)
    except SplitpilotError as exc:
        print(f"stderr:    not shown: {_safe(str(exc))}")
        return
    lines = data.decode("utf-8", errors="replace").splitlines()
    size = next(o.size for o in job.outputs if o.name == STDERR_OUTPUT)
    if size > len(data):
        lines = lines[1:]   # the tail kept starts inside a line: not shown cut
    lines = lines[-STDERR_TAIL_LINES:]
    if not lines:
        print(f"stderr:    ({STDERR_OUTPUT} is empty)")
        return
    print(f"stderr (last {len(lines)} lines of {STDERR_OUTPUT}):")
    for line in lines:
        print(f"  {shown(line)}")


def _status_table(client, states, limit: int, watch: bool, interval: float, batch: str = "") -> int:
    tty = sys.stdout.isatty()
    last_progress = None
    while True:
        listing = client.list(states=states, limit=limit, batch_id=batch)
        final = all(j.final for j in listing.jobs)
        if not watch:
            _print_table(listing)
            return 0
        if tty:
            sys.stdout.write("\x1b[H\x1b[2J")
            _print_table(listing)
            every = format_duration(datetime.timedelta(seconds=interval))
            note = "all final" if final else f"refreshing every {every}; Ctrl-C stops watching"
            print(f"\n{_progress(listing.jobs)}   ({note})", flush=True)
        else:
            progress = _progress(listing.jobs)
            if progress != last_progress:
                print(f"{_when(datetime.datetime.now(datetime.UTC))}  {progress}", flush=True)
                last_progress = progress
        if final:
            if not tty:
                _print_table(listing)
            return 0 if all(j.state is JobState.DONE for j in listing.jobs) else 1
        time.sleep(interval)


def _progress(jobs) -> str:
    counts: dict[JobState, int] = {}
    for job in jobs:
        counts[job.state] = counts.get(job.state, 0) + 1
    done = sum(1 for j in jobs if j.final)
    width = 20
    filled = int(width * done / len(jobs)) if jobs else width
    parts = ", ".join(f"{n} {s.name}" for s, n in sorted(counts.items()))
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{len(jobs)} final: {parts or 'no jobs'}"


def _print_table(listing) -> None:
    # Cut to fit a terminal only: into a file or a pipe, every cell goes whole (escaped all the same).
    cut = _cut if sys.stdout.isatty() else (lambda text, _width: text)
    rows = [("ID", "BATCH", "NAME", "STATE", "TRY", "SITE", "UPDATED", "MESSAGE")]
    for job in listing.jobs:
        rows.append((str(job.job_id), _safe(job.batch_id) or "-", _safe(cut(job.name, 24)), job.state.name,
                     str(job.attempt),
                     _safe(cut(job.site, 16)), _when(job.updated), _safe(cut(job.message, 40))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    total = sum(listing.counts.values()) + sum(listing.other_counts.values())
    summary = ", ".join([f"{n} {s.name}" for s, n in sorted(listing.counts.items()) if n]
                        + [f"{n} {_safe(name)} (unknown to this version)" for name, n in
                           sorted(listing.other_counts.items()) if n])
    shown = f"{len(listing.jobs)} shown" if len(listing.jobs) < total else "all shown"
    print(f"\n{total} job(s) ({shown}): {summary or 'none'}")


def _print_job(job) -> None:
    # Texts a job (its wrapper, its outputs' names) chose are shown escaped: no escape sequence reaches
    # the terminal.
    print(f"job:       {job.job_id}" + (f" ({_safe(job.name)})" if job.name else ""))
    print(f"owner:     {job.owner}")
    print(f"batch:     {_safe(job.batch_id) or '-'}")
    print(f"state:     {job.state.name}" + (f", exit code {job.exit_code}" if job.exit_code is not None else ""))
    if job.message:
        print(f"message:   {_safe(job.message)}")
    print(f"attempt:   {job.attempt}" + (f" at {job.site} on {_safe(job.node)} (pilot {_safe(job.pilot_id)})"
                                         if job.site else ""))
    print(f"submitted: {_when(job.submitted)}")
    print(f"updated:   {_when(job.updated)}")
    if job.wait is not None:
        _print_wait(job.wait)
    if job.cpu_seconds is not None:
        print(f"usage:     CPU {format_duration(datetime.timedelta(seconds=round(job.cpu_seconds)))}, memory "
              f"{format_size(job.rss_bytes or 0)}" + (f" (heartbeat {_when(job.usage_at)})" if job.usage_at else ""))
    spec = job.spec
    print(_safe(f"runs:      {spec.executable} {' '.join(spec.arguments)}".rstrip()))
    if job.history:
        print("history:")
        for event in job.history:
            print(f"  {_when(event.time)}  attempt {event.attempt}  {event.state.name:<16} "
                  f"{_safe(event.detail)}".rstrip())
    if job.outputs:
        print("outputs:")
        for out in job.outputs:
            print(f"  {_safe(out.name)}  {format_size(out.size)}  sha256:{out.sha256}")


def _print_wait(wait) -> None:
    """Why a waiting job has not matched: the summary, then each site's unmet requirements."""
    print(f"waiting:   {_safe(wait.summary)}")
    for site in wait.sites:
        seen = f"last offer {_when(site.last_offer)}" if site.last_offer else "no offer"
        state = "" if site.state == "enabled" else f", {site.state}"
        if not site.unmet:
            print(f"  {site.site} ({seen}{state}): offers everything the job needs")
            continue
        print(f"  {site.site} ({seen}{state}): " + "; ".join(
            f"{u.requirement} wanted {_safe(u.wanted)}, offered {_safe(u.offered)}" for u in site.unmet))
    if wait.jobs_ahead:
        print(f"  {wait.jobs_ahead} waiting job(s) with the same requirements match before this one")


def _safe(text: str) -> str:
    """TEXT for the terminal: control characters and escape sequences a job (or its outputs' names) chose
    are shown escaped, never interpreted."""
    return shown(text, backslash=False)


def _output_targets(targets: list[str]) -> tuple[list[int], str, bool]:
    """(job ids, DIR, whether each job gets DIR/ID/) from `ID [ID ...] DIR`: one folder per job unless
    a single plain id was given (a range gets them even when it names one job: the layout follows what
    was asked, not what it expanded to)."""
    if len(targets) < 2:
        raise UsageError("give the job id(s) and the folder: splitpilot job output ID [ID ...] DIR")
    *words, directory = targets
    try:
        job_ids = parse_job_ids(words)
    except UsageError as exc:
        raise UsageError(f"{exc} (splitpilot job output ID [ID ...] DIR: the folder comes last)") from None
    return job_ids, directory, not (len(words) == 1 and words[0].isdigit())


def _output(args: argparse.Namespace) -> int:
    if args.batch is not None:
        if len(args.targets) != 1:
            raise UsageError("give either job ids or --batch, not both; fix: splitpilot job output --batch BATCH DIR "
                             "(the folder only), or name the jobs by id")
        job_ids, directory, several = [], args.targets[0], True
        batch = _batch_option(args, [])
    else:
        job_ids, directory, several = _output_targets(args.targets)
        batch = ""
    written = failed = 0
    progress = _transfer_progress(args)
    with _user_client(args) as client, progress:
        if batch:   # (a listing carries no outputs: each job is asked for them below, as by id)
            job_ids = [job.job_id for job in client.batch_jobs(batch)]
            print(f"batch {batch}: {len(job_ids)} job(s)", file=sys.stderr)
        for job_id in job_ids:
            job = client.status(job_id)
            if not job.outputs and not args.name:
                print(f"job {job_id} has no outputs (state {job.state.name})", file=sys.stderr)
                failed += 1
                continue
            target = os.path.join(directory, str(job_id)) if several else directory
            progress.expect(len(args.name) if args.name else len(job.outputs))
            on_progress = progress.callback
            if on_progress is not None and several:  # the same output name in every job: say whose
                def on_progress(done, total, name, _job=job_id, _show=progress.update):
                    _show(done, total, f"{_job}/{name}")
            results = client.download(job_id, target, args.name, force=args.force, job=job,
                                      on_progress=on_progress)
            progress.end_line()  # the finished line stays; the paths and errors go below it
            for result in results:
                if result.ok:
                    written += 1
                    print(_safe(result.path))
                else:
                    failed += 1
                    print(f"error: job {job_id}: {_safe(str(result.error))}", file=sys.stderr)
            ok = sum(1 for r in results if r.ok)
            note = "" if job.final else f"; job is still {job.state.name}: more may come"
            print(f"job {job_id}: {ok} of {len(results)} output(s) downloaded to {_safe(target)}, sha256 "
                  f"verified{note}", file=sys.stderr)
    if failed:
        print(f"{failed} output(s) failed, {written} downloaded; see the errors above", file=sys.stderr)
        return 1
    return 0


def _kill(args: argparse.Namespace) -> int:
    from pilot.api.base import BrokerUnavailable, TokenUnusable  # why: grpc, as in _user_client

    job_ids = parse_job_ids(args.job_ids) if args.job_ids or args.batch is None else []
    batch = _batch_option(args, job_ids)
    failed = 0
    with _user_client(args) as client:
        if batch:
            jobs = client.batch_jobs(batch)
            job_ids = [job.job_id for job in jobs if not job.final]
            print(f"batch {batch}: {len(jobs)} job(s), {len(job_ids)} not ended", file=sys.stderr)
        for job_id in job_ids:
            try:
                state = client.kill(job_id, args.reason)
            except (BrokerUnavailable, TokenUnusable):
                raise   # the same for every job: stop at the first
            except SplitpilotError as exc:   # this job's refusal (unknown, not yours): the others go on
                failed += 1
                print(f"error: job {job_id}: {_safe(str(exc))}", file=sys.stderr)
                continue
            if state is JobState.KILLED:
                print(f"job {job_id}: KILLED")
            elif state.final:
                print(f"job {job_id} had already ended: {state.name}")
            else:
                print(f"job {job_id}: kill requested; it is {state.name} and stops at its next heartbeat")
    if failed:
        print(f"{failed} of {len(job_ids)} job(s) could not be killed; see the errors above", file=sys.stderr)
        return 1
    return 0


def _batches(args: argparse.Namespace) -> int:
    with _user_client(args) as client:
        batches = client.list_batches(limit=args.limit)
    if args.json:
        for batch in batches:
            print(json.dumps(batch_record(batch), sort_keys=True))
        return 0
    rows = [("BATCH", "LABEL", "CREATED", "JOBS", "STATES")]
    for batch in batches:
        states = ", ".join([f"{n} {s.name}" for s, n in sorted(batch.counts.items()) if n]
                           + [f"{n} {_safe(name)}" for name, n in sorted(batch.other_counts.items()) if n])
        rows.append((_safe(batch.batch_id), _safe(batch.label) or "-", _when(batch.created), str(batch.jobs),
                     states or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:   # never cut: the states go whole, on a terminal or not
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(f"\n{len(batches)} batch(es) shown" + (f" (the newest {args.limit}: --limit N shows more)"
                                                 if len(batches) == args.limit else ""))
    return 0


def batch_record(batch) -> dict:
    """One batch for --json: the stable field names of docs/broker.md ("job batches --json")."""
    return {"batch_id": batch.batch_id, "owner": batch.owner, "label": batch.label,
            "created": batch.created.astimezone(datetime.UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"),
            "jobs": batch.jobs,
            "counts": {**{s.name: n for s, n in batch.counts.items()}, **batch.other_counts}}


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _when(moment: datetime.datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S}Z"
