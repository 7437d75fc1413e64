"""`splitpilot admin ...`: the operator's view of the broker, with an admin token.

    splitpilot admin sites [--window DURATION] [--json]
    splitpilot admin site drain|enable|disable NAME --reason TEXT
    splitpilot admin pilots [--site S] [--state alive|ended] [--seen-within DURATION] [--limit N] [--json]
    splitpilot admin requeue ID|FIRST..LAST ... [--reason TEXT]   (jobs under way, FAILED_*, LOST, EXPIRED)
    splitpilot admin jobs [--all] [--owner O] [--site S] [--batch B] [--state STATE] [--since DURATION] [--limit N]
                          [--json]
    splitpilot admin token revoke|revoked ...    (the same as `splitpilot token revoke|revoked`)

Every command talks to the broker through pilot.api's AdminClient only; the
connection options are those of `splitpilot job` (--broker, --token,
--ca-cert, --config with a [client] table). `--json` prints one JSON
document whose field names are stable (docs/broker.md, "admin --json");
the tables print every character of every field (no truncation), texts a
pilot or a job chose escaped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable, Sequence

from broker.cli import STATE_NAMES, _client_options, client_settings, listing_limit
from broker.tokens_cli import add_revocation_commands
from pilot.api.files import shown
from pilot.api.states import FINAL_STATES, JobState
from pilot.durations import parse_duration
from pilot.errors import UsageError

SITE_ACTIONS = {"drain": "draining", "enable": "enabled", "disable": "disabled"}
PILOT_STATES = ("alive", "ended")
#: The most job ids one `admin requeue` takes (a range counts each id).
MAX_REQUEUE = 10_000
EPILOG = ("needs an admin token (`splitpilot token issue --role admin`); a user, agent or job token is refused "
          "with PERMISSION_DENIED.\nexit codes: 0 success, 1 the broker refused (or, for requeue, any job "
          "was refused), 2 bad usage.")


def register(subparsers: argparse._SubParsersAction) -> None:
    admin = subparsers.add_parser("admin", help="operate the broker: sites, pilots, requeues, everyone's jobs, "
                                                "token revocation (admin token)",
                                  description="The operator's commands, with an admin token.", epilog=EPILOG,
                                 )
    sub = admin.add_subparsers(title="admin commands", metavar="ADMIN_COMMAND")

    sites = sub.add_parser("sites", help="every site: state, pilots alive, jobs running and waiting, failures",
                           description="Every site the broker knows (from its admin state or its pilots): its "
                                       "state and why, pilots alive now, jobs running there, waiting jobs whose "
                                       "site lists allow it (resources are not compared: `splitpilot job status "
                                       "ID` says per job why it waits), jobs failed there within --window by "
                                       "final state, and pilots that ended empty within --window.",
                           epilog=EPILOG)
    sites.add_argument("--window", default="1h", metavar="DURATION",
                       help="count failures and empty pilots over this past period (default: %(default)s, "
                            "at most 7d)")
    _listing_options(sites)
    sites.set_defaults(handler=_sites)

    site = sub.add_parser("site", help="drain, enable or disable a site",
                          description="drain: no new matches, running jobs finish, pilots are told to leave; "
                                      "disable: no matches and pilots told to leave at once; enable: match "
                                      "again. The reason is recorded and shown by `admin sites`.",
                          epilog=EPILOG)
    site.add_argument("action", choices=tuple(SITE_ACTIONS), metavar="ACTION",
                      help="drain, enable or disable")
    site.add_argument("name", metavar="SITE", help="the site's name, as its agent tokens carry it")
    site.add_argument("--reason", required=True, metavar="TEXT", help="why (recorded and shown)")
    _client_options(site)
    site.set_defaults(handler=_site)

    pilots = sub.add_parser("pilots", help="pilots: site, node, alive or ended, jobs run, current jobs, why ended",
                            description="Pilots seen within --seen-within, most recent first. alive: not ended "
                                        "and seen within the broker's heartbeat timeout; ended: reported its "
                                        "end, or silent for longer.",
                            epilog=EPILOG)
    pilots.add_argument("--site", metavar="SITE", help="only this site's pilots")
    pilots.add_argument("--state", choices=PILOT_STATES, metavar="STATE", help="alive or ended (default: both)")
    pilots.add_argument("--seen-within", default="1h", metavar="DURATION",
                        help="only pilots seen within this past period (default: %(default)s)")
    pilots.add_argument("--limit", type=listing_limit, default=1000, metavar="N",
                        help="at most N pilots (default: %(default)s; the broker caps it at 10000)")
    _listing_options(pilots)
    pilots.set_defaults(handler=_pilots)

    requeue = sub.add_parser("requeue", help="queue stuck or failed jobs again, with a new attempt",
                             description="Re-queue jobs stuck or failed: a job under way (ASSIGNED to "
                                         "SAVING), e.g. on a broken node, has its attempt ended (its wrapper is "
                                         "told to stop), not charged to the job; a job ended in FAILED_*, LOST "
                                         "or EXPIRED gets its attempts counted afresh. The next attempt waits "
                                         "for a match. DONE and KILLED jobs, and jobs their owner asked to kill, "
                                         "are refused by name (resubmit those).",
                             epilog=EPILOG)
    requeue.add_argument("ids", nargs="+", metavar="ID", help="job ids, or ranges FIRST..LAST (as `job submit` "
                                                              "prints them)")
    requeue.add_argument("--reason", default="", metavar="TEXT", help="recorded in each job's history")
    _client_options(requeue)
    requeue.set_defaults(handler=_requeue)

    jobs = sub.add_parser("jobs", help="any owner's jobs, filtered by owner, site, state and time",
                          description="Jobs of every owner, newest first. Without --all or --state: only jobs "
                                      "not yet final (waiting or under way), like condor_q; --all adds the "
                                      "ended ones, like condor_history.",
                          epilog=EPILOG)
    jobs.add_argument("--all", action="store_true", help="ended jobs too")
    jobs.add_argument("--owner", metavar="OWNER", help="only this owner's jobs")
    jobs.add_argument("--site", metavar="SITE", help="only jobs whose current or last attempt is at this site")
    jobs.add_argument("--state", action="append", choices=STATE_NAMES, metavar="STATE",
                      help="only jobs in this state (repeatable): " + ", ".join(STATE_NAMES))
    jobs.add_argument("--since", metavar="DURATION", help="only jobs whose state changed within this past period")
    jobs.add_argument("--batch", metavar="BATCH", help="only the jobs of this batch (any owner's)")
    jobs.add_argument("--limit", type=listing_limit, default=1000, metavar="N",
                      help="at most N jobs (default: %(default)s; the broker caps it at 10000)")
    _listing_options(jobs)
    jobs.set_defaults(handler=_jobs)

    token = sub.add_parser("token", help="revoke tokens and list revocations (as `splitpilot token revoke|revoked`)",
                           description="Token revocation: the same commands as `splitpilot token revoke` and "
                                       "`splitpilot token revoked`.")
    token_sub = token.add_subparsers(title="token commands", metavar="TOKEN_COMMAND")
    add_revocation_commands(token_sub, _client_options, _connected)
    token.set_defaults(handler=lambda _a: token.print_help(sys.stderr) or 2)
    admin.set_defaults(handler=lambda _a: admin.print_help(sys.stderr) or 2)


def _listing_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON document (stable field names: "
                                                            "docs/broker.md) instead of a table")
    _client_options(parser)


def _connected(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """HANDLER with args.broker, args.token and args.ca_cert resolved from the options and the config file."""
    def resolved(args: argparse.Namespace) -> int:
        args.broker, args.token, args.ca_cert = client_settings(args)
        return handler(args)
    return resolved


def _admin(args: argparse.Namespace):
    from pilot.api.client import AdminClient  # why: grpc; `splitpilot` loads every command's module
    broker, token, ca_cert = client_settings(args)
    return AdminClient(broker, token, ca_cert)


# ------------------------------------------------------------------ handlers

def _sites(args: argparse.Namespace) -> int:
    window = parse_duration(args.window, what="--window")
    with _admin(args) as admin:
        sites = admin.list_sites(failures_within_s=max(1, int(window.total_seconds())))
    if args.json:
        _print_json([{"site": s.site, "state": s.state, "reason": s.reason, "state_updated": _iso(s.state_updated),
                      "pilots_alive": s.pilots_alive, "jobs_running": s.jobs_running,
                      "jobs_waiting": s.jobs_waiting, "failures": s.failures, "empty_pilots": s.empty_pilots}
                     for s in sites])
        return 0
    rows = [("SITE", "STATE", "PILOTS", "RUNNING", "WAITING", f"FAILED ({args.window})", "EMPTY", "REASON")]
    for s in sites:
        failures = ", ".join(f"{n} {name}" for name, n in s.failures.items()) or "0"
        rows.append((s.site, s.state, str(s.pilots_alive), str(s.jobs_running), str(s.jobs_waiting), failures,
                     str(s.empty_pilots), shown(s.reason, backslash=False)))
    _print_rows(rows)
    print(f"{len(sites)} site(s); PILOTS: alive now; WAITING: jobs whose site lists allow the site",
          file=sys.stderr)
    return 0


def _site(args: argparse.Namespace) -> int:
    state = SITE_ACTIONS[args.action]
    with _admin(args) as admin:
        previous = admin.set_site_state(args.name, state, args.reason)
    print(f"site {args.name}: {previous} -> {state} ({args.reason})")
    return 0


def _pilots(args: argparse.Namespace) -> int:
    seen = parse_duration(args.seen_within, what="--seen-within")
    with _admin(args) as admin:
        pilots = admin.list_pilots(min(max(1, int(seen.total_seconds())), 2**32 - 1), site=args.site or "",
                                   state=args.state or "", limit=args.limit)
    if args.json:
        _print_json([{"pilot_id": p.pilot_id, "site": p.site, "node": p.node,
                      "state": "alive" if p.alive else "ended", "first_seen": _iso(p.first_seen),
                      "last_seen": _iso(p.last_seen), "ended": _iso(p.ended), "jobs_matched": p.jobs_matched,
                      "jobs_run": p.jobs_run, "current_jobs": list(p.current_job_ids), "end_reason": p.end_reason,
                      "certificate_serial": p.certificate_serial} for p in pilots])
        return 0
    rows = [("PILOT", "SITE", "NODE", "STATE", "STARTED", "LAST SEEN", "MATCHED", "RUN", "CURRENT JOBS", "ENDED")]
    for p in pilots:
        rows.append((shown(p.pilot_id), p.site, shown(p.node), "alive" if p.alive else "ended", _when(p.first_seen),
                     _when(p.last_seen), str(p.jobs_matched), str(p.jobs_run) if p.ended else "-",
                     " ".join(map(str, p.current_job_ids)) or "-",
                     shown(p.end_reason, backslash=False) if p.ended or p.end_reason else
                     ("" if p.alive else "(silent)")))
    _print_rows(rows)
    print(f"{len(pilots)} pilot(s) seen within {args.seen_within}", file=sys.stderr)
    return 0


def _requeue(args: argparse.Namespace) -> int:
    from pilot.api.client import BrokerError  # why: grpc, as in _admin
    ids = job_ids(args.ids)
    failed = 0
    with _admin(args) as admin:
        for job_id in ids:
            try:
                attempt = admin.requeue(job_id, args.reason)
            except BrokerError as exc:
                if exc.code.name == "PERMISSION_DENIED":  # the token, not the job: the next ids fail alike
                    raise
                failed += 1
                print(f"job {job_id}: not requeued: {exc.details}", file=sys.stderr)
                continue
            print(f"job {job_id}: requeued, attempt {attempt} waits for a match")
    if failed:
        print(f"{failed} of {len(ids)} job(s) not requeued (each is named above with the reason)", file=sys.stderr)
    return 1 if failed else 0


def _jobs(args: argparse.Namespace) -> int:
    if args.state:
        states: Sequence[JobState] = [JobState[name] for name in args.state]
    else:
        states = [] if args.all else [s for s in JobState if s not in FINAL_STATES]
    since = None
    if args.since:
        since = datetime.datetime.now(datetime.UTC) - parse_duration(args.since, what="--since")
    with _admin(args) as admin:
        listing = admin.list_all_jobs(states, limit=args.limit, owner=args.owner or "",
                                      site=args.site or "", updated_since=since, batch_id=args.batch or "")
    if args.json:
        _print_json({"jobs": [{"job_id": j.job_id, "batch_id": j.batch_id or None, "name": j.name, "owner": j.owner,
                               "state": j.state.name,
                               "attempt": j.attempt, "site": j.site, "node": j.node, "pilot_id": j.pilot_id,
                               "submitted": _iso(j.submitted), "updated": _iso(j.updated),
                               "exit_code": j.exit_code, "message": j.message} for j in listing.jobs],
                     "counts": {s.name: n for s, n in sorted(listing.counts.items()) if n}
                     | {name: n for name, n in listing.other_counts.items() if n}})
        return 0
    rows = [("ID", "OWNER", "NAME", "STATE", "TRY", "SITE", "NODE", "UPDATED", "MESSAGE")]
    for j in listing.jobs:
        rows.append((str(j.job_id), j.owner, shown(j.name), j.state.name, str(j.attempt), j.site or "-",
                     shown(j.node) or "-", _when(j.updated), shown(j.message, backslash=False)))
    _print_rows(rows)
    counts = ", ".join(f"{n} {s.name}" for s, n in sorted(listing.counts.items()) if n) or "none"
    scope = (f"of {args.owner}" if args.owner else "of every owner") + (f" in batch {args.batch}" if args.batch else "")
    print(f"{len(listing.jobs)} job(s) shown; all jobs {scope}: {counts}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------ helpers

def job_ids(texts: Sequence[str]) -> list[int]:
    """Job ids from 'ID' and 'FIRST..LAST' words, in order, without repeats (at most MAX_REQUEUE)."""
    ids: dict[int, None] = {}
    for text in texts:
        first, dots, last = text.partition("..")
        try:
            low, high = int(first), int(last if dots else first)
        except ValueError:
            raise UsageError(f"{text!r} is not a job id; fix: give ids like 42 or ranges like 4..53") from None
        if low < 1 or high < low:
            raise UsageError(f"{text!r}: ids start at 1 and a range goes from low to high, e.g. 4..53")
        if high - low + len(ids) >= MAX_REQUEUE:
            raise UsageError(f"more than {MAX_REQUEUE} job ids; fix: requeue in smaller ranges")
        ids.update(dict.fromkeys(range(low, high + 1)))
    return list(ids)


def _print_rows(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _print_json(document: object) -> None:
    print(json.dumps(document, indent=2, sort_keys=False))


def _iso(moment: datetime.datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _when(moment: datetime.datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S}Z"
