"""`splitpilot glidein submit|status` and `splitpilot factory run`: glideins through the htcondor2 bindings.

  glidein submit --count N   mint an agent token for the site, package the pilot (cached), write a
                             batch folder (0700: script, token, log folder), submit N glideins with
                             their inputs spooled into the schedd, and remove the token file at once
  glidein status [--json]    this factory's glideins for the site: in the queue and recently ended;
                             brings back the output, error and log of finished ones (into their
                             batch's log folder), after which they leave the queue
  glidein remove [--idle] [--batch B] [--json]
                             remove this factory's glideins (all, only the idle ones, one batch's);
                             the schedd drops their spooled agent tokens with them; a running one
                             gets SIGTERM (its agent stops and reports its jobs)
  factory run                keep queued glideins in line with the broker's waiting jobs for the site
                             that fit a glidein (bounded; none for a draining or disabled site; backs
                             off when glideins fail or come back having run no job, as the broker's
                             pilot records say; brings back finished glideins' output each cycle).
                             Ctrl-C (SIGINT) or SIGTERM: removes its idle glideins, then exits 130
                             (143 for SIGTERM); running glideins are left to end by themselves

Where the glideins run: the schedd's own pool (vanilla universe), or with
--ce HOST[:PORT] an HTCondor-CE the schedd forwards them to (grid universe;
--scitoken FILE names the SciToken the CE accepts, else HTCondor looks in its
default places). --submit-line KEY=VALUE (repeatable) adds a line of the
site's own to every glidein's submit description (accounting_group=...,
requirements=..., +Attr="text"); the lines the generator owns (universe,
executable, resources, the periodic policy, +Splitpilot*) and anything that
looks like a credential are refused before a token is minted.

The schedd: the mini-condor of --minicondor DIR (its client configuration;
batch folders in DIR/factory, which its node does not see); a remote schedd
located through a collector (--pool HOST[:PORT], --schedd NAME); else the
local one CONDOR_CONFIG names. The inputs are spooled, so the batch folder
(--work-dir) is read by this process only, on this host. Agent tokens are
minted from the CA in --ca (the broker's STATE/ca); the agent token never
appears on a command line, in the submit description or in the environment,
and its file lives only until the schedd holds it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import signal
import threading
from pathlib import Path

from broker.ca import CertificateAuthority
from pilot import logconfig
from pilot.configfile import ConfigSpec, make_configurable, resolve
from pilot.durations import parse_duration
from pilot.errors import UsageError

#: `glidein ...`/`factory run --config FILE`: one [factory] table for the site's glideins and the factory
#: loop, one key per option (pilot.configfile). Tokens (admin_token, scitoken) are paths.
FACTORY_CONFIG = ConfigSpec(
    section="factory",
    examples={"site": '"SITE-A"', "broker": '"broker.example.org:7443"', "ca": '"/var/lib/splitpilot/broker/ca"',
              "work_dir": '"/var/lib/splitpilot/factory"', "ce": '"ce.example.org:9619"',
              "scitoken": '"/etc/splitpilot/ce.scitoken"', "submit_line": '["accounting_group = group_pilots"]',
              "bind": '["/data/site:/site/data"]', "admin_token": '"/etc/splitpilot/factory-admin.pem"',
              "lifetime": '"6h"', "idle_timeout": '"2m"'},
    validators={"lifetime": lambda v: parse_duration(v, what="lifetime"),
                "grace": lambda v: parse_duration(v, what="grace"),
                "max_idle": lambda v: parse_duration(v, what="max_idle"),
                "idle_timeout": lambda v: parse_duration(v, what="idle_timeout"),
                "submit_line": lambda v: _submit_lines([v])},
    minimum={"cpus": 1, "memory": 1, "disk": 1, "max_per_cycle": 1, "jobs_per_glidein": 1},
    exclude=frozenset({"count", "idle", "batch"}))


def register(subparsers: argparse._SubParsersAction) -> None:
    glidein = subparsers.add_parser("glidein", help="submit and follow glideins (HTCondor)", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = glidein.add_subparsers(title="glidein commands", metavar="GLIDEIN_COMMAND")
    submit = sub.add_parser("submit", help="submit N glideins now")
    _common(submit, need_broker=True)
    submit.add_argument("--count", type=int, default=1, metavar="N", help="glideins to submit (default 1)")
    make_configurable(submit, FACTORY_CONFIG)
    submit.set_defaults(handler=run_submit)
    status = sub.add_parser("status", help="this factory's glideins")
    _common(status, need_broker=False)
    status.add_argument("--json", action="store_true", help="one JSON object per glidein, one a line")
    make_configurable(status, FACTORY_CONFIG)
    status.set_defaults(handler=run_status)
    remove = sub.add_parser("remove", help="remove this factory's glideins (all, idle only, or one batch's)")
    _common(remove, need_broker=False)
    remove.add_argument("--idle", action="store_true", help="only glideins still idle in the queue")
    remove.add_argument("--batch", metavar="BATCH", help="only this batch's glideins (see glidein status)")
    remove.add_argument("--json", action="store_true", help="the glideins removed, one JSON object a line")
    make_configurable(remove, FACTORY_CONFIG)
    remove.set_defaults(handler=run_remove)

    factory = subparsers.add_parser("factory", help="keep glideins in line with the broker's waiting jobs",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fsub = factory.add_subparsers(title="factory commands", metavar="FACTORY_COMMAND")
    run = fsub.add_parser("run", help="run the factory loop until interrupted")
    _common(run, need_broker=True)
    run.add_argument("--admin-token", required=True, metavar="FILE",
                     help="an admin token for the broker (to count the site's waiting jobs)")
    run.add_argument("--interval", default="15s", metavar="DURATION", help="time between cycles (default %(default)s)")
    run.add_argument("--max-queued", type=int, default=10, metavar="N", help="idle glideins at most (default 10)")
    run.add_argument("--max-running", type=int, default=50, metavar="N", help="running glideins at most (default 50)")
    run.add_argument("--max-per-cycle", type=int, default=5, metavar="N",
                     help="submitted per cycle at most (default 5)")
    run.add_argument("--jobs-per-glidein", type=int, default=1, metavar="N",
                     help="waiting jobs one glidein is counted for (default 1)")
    make_configurable(run, FACTORY_CONFIG)
    run.set_defaults(handler=run_factory)


def _common(parser: argparse.ArgumentParser, need_broker: bool) -> None:
    parser.add_argument("--site", required=True, metavar="SITE",
                        help="the site the glideins (and their agent tokens) are for")
    parser.add_argument("--factory", default="splitpilot", metavar="NAME",
                        help="this factory's name (default %(default)s)")
    parser.add_argument("--minicondor", type=Path, metavar="DIR",
                        help="use the mini-condor whose state folder is DIR (default: the schedd CONDOR_CONFIG names)")
    parser.add_argument("--pool", metavar="HOST[:PORT]",
                        help="the collector to find a remote schedd through (default: the local schedd)")
    parser.add_argument("--schedd", metavar="NAME",
                        help="the schedd's name in --pool's collector (default: the local schedd, or the only "
                             "one --pool lists)")
    parser.add_argument("--work-dir", type=Path, metavar="DIR",
                        help="batch folders, on this host (default with --minicondor: its state folder/factory)")
    parser.add_argument("--log-level", default="info", choices=logconfig.LEVELS,
                        help="log level of the `factory:` and `glidein:` lines on stderr (default %(default)s)")
    parser.add_argument("--log-file", type=Path, metavar="FILE",
                        help="append the log lines to FILE (created 0600) instead of stderr")
    if not need_broker:
        return
    parser.add_argument("--broker", required=True, metavar="HOST:PORT", help="the broker, as the nodes reach it")
    parser.add_argument("--ca", required=True, metavar="DIR", help="the CA that mints agent tokens (broker STATE/ca)")
    parser.add_argument("--container-policy", choices=("require", "prefer", "off"), default="prefer",
                        help="the agent's container policy (default %(default)s; `splitpilot agent "
                             "--container-policy`)")
    parser.add_argument("--runtimes", default="apptainer", metavar="LIST",
                        help="container runtimes for the agent, comma-separated (default %(default)s)")
    parser.add_argument("--image", default="", metavar="IMAGE",
                        help="container image for the agent (default with --minicondor: its apptainer sandbox image)")
    parser.add_argument("--lifetime", default="6h", metavar="DURATION", help="glidein lifetime (default %(default)s)")
    parser.add_argument("--bind", action="append", default=[], metavar="SRC[:DST]", dest="binds",
                        help="a site bind for the agent's jobs: the node's SRC read-only at DST (default SRC) "
                             "(repeatable; `splitpilot agent --bind`)")
    parser.add_argument("--idle-timeout", default="2m", metavar="DURATION",
                        help="the agent leaves after this long idle (default %(default)s)")
    parser.add_argument("--ce", metavar="HOST[:PORT]",
                        help="submit to this HTCondor-CE (grid universe; port 9619 unless given)")
    parser.add_argument("--scitoken", type=Path, metavar="FILE",
                        help="the SciToken file the CE accepts (with --ce; default: HTCondor's own search)")
    parser.add_argument("--submit-line", action="append", default=[], metavar="KEY=VALUE", dest="submit_lines",
                        help="an extra submit description line, e.g. accounting_group=group_pilots (repeatable)")
    parser.add_argument("--software-dir", default="", metavar="DIR",
                        help="the site's read-only software area on the nodes, e.g. under /cvmfs (default: each "
                             "agent builds its own; `splitpilot agent --software-dir`)")
    parser.add_argument("--platform", action="append", default=[], metavar="TAG",
                        help="a platform tag the agents offer (repeatable; `splitpilot agent --platform`)")
    parser.add_argument("--black-hole", type=int, metavar="K",
                        help="the agent stops taking work after K consecutive failures (default: the agent's, 3)")
    parser.add_argument("--stop-deadline", type=int, metavar="SECONDS",
                        help="the deadline jobs get at slot end or SIGTERM (default: the agent's, 30)")
    parser.add_argument("--grace", default="10m", metavar="DURATION",
                        help="time a glidein may run past its lifetime before HTCondor holds it (default %(default)s)")
    parser.add_argument("--max-idle", default="2h", metavar="DURATION",
                        help="a glidein idle in the queue longer than this is held, then removed (default %(default)s)")
    parser.add_argument("--queue", default="default", metavar="NAME",
                        help="the queue named in the agent tokens (default %(default)s)")
    parser.add_argument("--cpus", type=int, default=1, metavar="N", help="cores each glidein asks for (default 1)")
    parser.add_argument("--memory", type=int, default=1024, metavar="MB",
                        help="memory each glidein asks for, MB (default 1024)")
    parser.add_argument("--disk", type=int, default=2048, metavar="MB",
                        help="disk each glidein asks for, MB (default 2048)")


def _pool(args):
    if args.minicondor is None:
        return None
    from condor_plugin.testing.minicondor import MiniCondor  # why: the mini-condor, for --minicondor only

    return MiniCondor.from_state_dir(args.minicondor, progress=lambda line: None)


def _schedd(pool, collector: str | None = None, name: str | None = None):
    """The schedd to submit to: the mini-condor's, one located through a collector, or the local one."""
    if pool is not None:
        if collector or name:
            raise UsageError("--minicondor names the pool already; drop --pool/--schedd")
        return pool.schedd()
    import htcondor2  # why: the condor extra is optional; `splitpilot` loads every command's module

    if collector is None and name is None:
        return htcondor2.Schedd()
    try:
        ads = htcondor2.Collector(collector).locateAll(htcondor2.DaemonType.Schedd)
    except htcondor2.HTCondorException as exc:
        raise UsageError(f"cannot ask the collector {collector or '(CONDOR_CONFIG)'} for schedds: {exc}; fix: "
                         "check --pool (HOST[:PORT]) and that this host may read from it") from None
    names = sorted(str(ad.get("Name", "?")) for ad in ads)
    chosen = [ad for ad in ads if name is None or ad.get("Name") == name]
    if len(chosen) != 1:
        what = f"no schedd named {name!r}" if name else f"{len(chosen)} schedds"
        raise UsageError(f"the collector {collector or '(CONDOR_CONFIG)'} lists {what}: {', '.join(names) or 'none'}; "
                         "fix: pass --schedd with one of these names")
    return htcondor2.Schedd(chosen[0])


def _ce(args):
    """The CondorCE of --ce HOST[:PORT] and --scitoken FILE, or None."""
    from submit import CE_PORT, CondorCE  # why: htcondor2 (the condor extra)

    if args.ce is None:
        if args.scitoken is not None:
            raise UsageError("--scitoken is for an HTCondor-CE; fix: give --ce HOST[:PORT] too, or drop --scitoken")
        return None
    host, colon, port = args.ce.rpartition(":")
    if not colon:
        host, port = args.ce, str(CE_PORT)
    if not port.isdigit():
        raise UsageError(f"--ce {args.ce!r}: the port is not a number; fix: give HOST or HOST:PORT "
                         f"(e.g. ce.example.org:{CE_PORT})")
    scitoken = args.scitoken.absolute() if args.scitoken is not None else None
    if scitoken is not None and not scitoken.is_file():
        raise UsageError(f"--scitoken {scitoken}: no such file; fix: give the file holding the CE's SciToken")
    return CondorCE(host, int(port), scitokens_file=scitoken)


def _submit_lines(entries: list[str]) -> dict[str, str]:
    """--submit-line KEY=VALUE entries as a mapping (the generator checks keys and values)."""
    lines: dict[str, str] = {}
    for entry in entries:
        key, equals, value = entry.partition("=")
        key, value = key.strip(), value.strip()
        if not equals or not key:
            raise UsageError(f"--submit-line {entry!r} is not KEY=VALUE; fix: e.g. "
                             "--submit-line accounting_group=group_pilots")
        if key.lower() in (k.lower() for k in lines):
            raise UsageError(f"--submit-line {key} is given twice; fix: give each key once")
        lines[key] = value
    return lines


def _settings(args, pool):
    resolve(args)   # --config FILE: flag, else file, else default (every command comes through here)
    from condor_plugin.factory.factory import FactorySettings  # why: htcondor2 (the condor extra)
    from condor_plugin.glidein.package import GlideinSettings  # why: htcondor2 (the condor extra)

    # Not the pool's shared folder: the node sees that one, and nothing there needs to (inputs are spooled).
    work_dir = args.work_dir or (pool.settings.state_dir / "factory" if pool is not None else None)
    if work_dir is None:
        raise UsageError("--work-dir is required without --minicondor (where this factory keeps its batch folders "
                         "and the glideins' logs)")
    extra = {}
    if hasattr(args, "broker"):
        image = args.image or (pool.sandbox_image if pool is not None else "")
        extra = dict(glidein=GlideinSettings(broker=args.broker, container_policy=args.container_policy,
                                             runtimes=args.runtimes, image=image, idle_timeout=args.idle_timeout,
                                             binds=tuple(args.binds), software_dir=args.software_dir,
                                             platforms=tuple(args.platform), black_hole=args.black_hole,
                                             stop_deadline=args.stop_deadline),
                     lifetime=parse_duration(args.lifetime, what="--lifetime"), cpus=args.cpus,
                     grace=parse_duration(args.grace, what="--grace"),
                     max_idle=parse_duration(args.max_idle, what="--max-idle"), queue=args.queue,
                     memory_mb=args.memory, disk_mb=args.disk, ce=_ce(args),
                     submit_lines=_submit_lines(args.submit_lines))
    else:
        extra = dict(glidein=GlideinSettings(broker="unused:0"))
    for name in ("max_queued", "max_running", "max_per_cycle", "jobs_per_glidein"):
        if hasattr(args, name):
            extra[name] = getattr(args, name)
    return FactorySettings(work_dir=work_dir, site=args.site, factory=args.factory, **extra)


def _factory(args):
    from condor_plugin.factory.factory import Factory  # why: htcondor2 (the condor extra)

    # Every glidein/factory command starts here: its --config file, the process's one logging configuration.
    resolve(args)
    logconfig.configure(args.log_level, log_file=str(args.log_file) if args.log_file else None)
    pool = _pool(args)
    settings = _settings(args, pool)
    ca = None
    if getattr(args, "ca", None):
        ca = CertificateAuthority.load(args.ca)
    return Factory(settings, _schedd(pool, args.pool, args.schedd), ca)   # progress: `factory:` log lines


def run_submit(args) -> int:
    if args.count < 1:
        raise UsageError("--count must be at least 1")
    factory = _factory(args)
    batch = factory.submit(args.count)
    print(f"submitted {batch.count} glidein(s) to cluster {batch.cluster} (batch {batch.batch}); "
          f"logs in {batch.directory / 'log'}")
    return 0


def _record(glidein, now: float) -> dict:
    return {"cluster": glidein.cluster, "proc": glidein.proc, "batch": glidein.batch, "status": glidein.status_name,
            "seconds_in_status": round(now - glidein.entered) if glidein.entered else None,
            "exit_code": glidein.exit_code, "hold_reason": glidein.hold_reason}


def run_status(args) -> int:
    factory = _factory(args)
    glideins = factory.glideins()
    collected = factory.collect()
    now = datetime.datetime.now().timestamp()
    if args.json:
        for g in glideins:
            print(json.dumps(_record(g, now)))
        return 0
    if not glideins:
        print(f"no glideins of factory {args.factory} for site {args.site}")
    for g in glideins:
        detail = g.hold_reason or (f"exit {g.exit_code}" if g.exit_code is not None else "")
        print(f"{g.cluster}.{g.proc}  {g.status_name:<10} {now - g.entered:7.0f} s  batch {g.batch}  {detail}")
    if collected:
        print(f"retrieved the output, error and log of {len(collected)} finished glidein(s) into their batch's "
              f"log folder ({factory.batches_dir}/BATCH/log); they now leave the queue")
    return 0


def run_remove(args) -> int:
    factory = _factory(args)
    if args.batch is not None and not any(g.batch == args.batch for g in factory.glideins()):
        raise UsageError(f"factory {args.factory} has no glidein of batch {args.batch!r} for site {args.site}; "
                         "fix: copy the batch from `splitpilot glidein status`")
    which = ("idle " if args.idle else "") + (f"batch {args.batch} " if args.batch else "")
    removed = factory.remove(idle_only=args.idle, batch=args.batch,
                             reason=f"splitpilot glidein remove: {which or 'all'}".strip())
    now = datetime.datetime.now().timestamp()
    if args.json:
        for g in removed:
            print(json.dumps(_record(g, now)))
    elif removed:
        print(f"removed {len(removed)} {which}glidein(s): {', '.join(g.name for g in removed)}")
    else:
        print(f"no {which}glidein of factory {args.factory} for site {args.site} to remove")
    return 0


def run_factory(args) -> int:
    from condor_plugin.factory.brokerview import BrokerView  # why: grpc and htcondor2
    from pilot.api.client import AdminClient  # why: grpc; `splitpilot` loads every command's module

    factory = _factory(args)  # resolves the configuration file's settings into args first
    interval = parse_duration(args.interval, what="--interval").total_seconds()
    stop = threading.Event()
    caught: list[int] = []

    def on_signal(signum, frame):
        # Only flags: the loop notices at once (the pause waits on the event) and cleans up itself.
        caught.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with AdminClient(args.broker, args.admin_token) as admin:
            factory.broker = BrokerView(admin, args.site, ca=factory.ca, factory=args.factory)
            factory.run(interval=interval, should_stop=stop.is_set, wake=stop)
        if not caught:
            return 0
        # Idle glideins would start later with nobody to serve; their spooled tokens leave with them.
        removed = factory.remove(idle_only=True, reason="splitpilot factory run: stopped")
        logging.getLogger("splitpilot.factory").info(
            f"stopped by {signal.Signals(caught[0]).name}: removed {len(removed)} idle glidein(s)"
            f"{': ' + ', '.join(g.name for g in removed) if removed else ''}; running ones end by themselves")
        return 128 + caught[0]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
