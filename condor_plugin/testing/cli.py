"""`splitpilot minicondor start|stop|status|env|build`: a real HTCondor pool on this machine.

  start    start the pool (building the cached node root first if needed) and wait
           until its schedd and a slot are advertised; nothing to do if it runs
  stop     stop it; checks that no process and no mount of it is left
  status   state, daemons and slots (--json: one object); exits 1 unless the pool is READY
  env      the environment a client needs, as shell lines:
               eval "$(splitpilot minicondor env)"
  build    build (or find) the cached node root only

Everything after the first start is kept in the state folder (default
/run/splitpilot-minicondor): later commands need only --state-dir, and a
later start reuses the earlier settings unless options change them.
Needs root: the pool runs in namespaces of its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from condor_plugin.testing.minicondor import (
    DEFAULT_STATE_DIR,
    DaemonSource,
    MiniCondor,
    MiniCondorSettings,
    PoolState,
    PoolStatus,
)
from condor_plugin.testing.noderoot import DEFAULT_CACHE_DIR, NodeRootCache, NodeRootRecipe


def register(subparsers: argparse._SubParsersAction) -> None:
    top = subparsers.add_parser("minicondor", help="a real HTCondor pool on this machine (tests, demo)",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(title="minicondor commands", metavar="MINICONDOR_COMMAND")

    def state_dir_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, metavar="DIR",
                            help=f"the pool's state folder (default {DEFAULT_STATE_DIR})")

    start = sub.add_parser("start", help="start the pool and wait until it is ready",
                           description="Start the pool (building the cached node root if needed) and wait until "
                                       "its schedd and a slot are advertised. Options left out keep the values "
                                       "of the previous start in the same state folder.")
    state_dir_option(start)
    start.add_argument("--shared-dir", type=Path, action="append", metavar="DIR",
                       help="a folder bound at the same path in the node (repeatable; default STATE_DIR/shared)")
    start.add_argument("--port", type=int, metavar="N", help="the collector's port on 127.0.0.1 (default: a free one)")
    start.add_argument("--cpus", type=int, metavar="N", help="CPUs the slot offers (default 2)")
    start.add_argument("--memory", type=int, metavar="MB", help="memory the slot offers (default 2048)")
    start.add_argument("--daemons", choices=[s.value for s in DaemonSource],
                       help="where the daemons come from (default auto: the host's condor_master if "
                            "installed, else the cached Debian 13 node root)")
    start.add_argument("--cache-dir", type=Path, metavar="DIR", help=f"node root cache (default {DEFAULT_CACHE_DIR})")
    start.add_argument("--mirror", metavar="URL", help="Debian mirror for the build (default: the host's apt sources)")
    start.add_argument("--timeout", type=float, metavar="SECONDS", help="seconds to wait for the pool (default 180)")
    start.add_argument("--condor-config", dest="config", action="append", metavar="'NAME = VALUE'",
                       help="a configuration line appended last to the daemons' configuration, overriding "
                            "ours (repeatable; e.g. 'CLAIM_WORKLIFE = 0')")
    start.set_defaults(handler=run_start)

    stop = sub.add_parser("stop", help="stop the pool (idempotent); no process or mount is left")
    state_dir_option(stop)
    stop.set_defaults(handler=run_stop)

    status = sub.add_parser("status", help="state, daemons and slots; exit 1 unless READY")
    state_dir_option(status)
    status.add_argument("--json", action="store_true",
                        help="one JSON object: state, state_dir, source, node_pid, collector, client_config, "
                             "shared_dirs, problem, daemons [{kind, name}], slots [{name, state, activity, cpus, "
                             "memory_mb}] (absent facts are null or empty)")
    status.set_defaults(handler=run_status)

    env = sub.add_parser("env", help="print the environment a client needs, as shell export lines")
    state_dir_option(env)
    env.set_defaults(handler=run_env)

    build = sub.add_parser("build", help="build (or find) the cached node root")
    build.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, metavar="DIR",
                       help=f"node root cache (default {DEFAULT_CACHE_DIR})")
    build.add_argument("--mirror", metavar="URL", help="Debian mirror (default: the host's apt sources)")
    build.set_defaults(handler=run_build)

    top.set_defaults(handler=lambda _args: top.print_help(sys.stderr) or 2)


def settings_for_start(args: argparse.Namespace) -> MiniCondorSettings:
    """The previous start's settings in this state folder (if any), changed by the options given."""
    settings_file = Path(args.state_dir).absolute() / "settings.json"
    if settings_file.is_file():
        base = MiniCondorSettings.from_json(settings_file.read_text())
    else:
        base = MiniCondorSettings(state_dir=args.state_dir)
    changes: dict[str, Any] = {}
    if args.shared_dir:
        changes["shared_dirs"] = tuple(args.shared_dir)
    for option, name in (("port", "port"), ("cpus", "cpus"), ("memory", "memory_mb"), ("cache_dir", "cache_dir"),
                         ("mirror", "mirror"), ("timeout", "start_timeout")):
        if getattr(args, option) is not None:
            changes[name] = getattr(args, option)
    if args.daemons is not None:
        changes["daemons"] = DaemonSource(args.daemons)
    if args.config:
        changes["extra_config"] = tuple(args.config)
    return dataclasses.replace(base, **changes)


def run_start(args: argparse.Namespace) -> int:
    pool = MiniCondor(settings_for_start(args))
    if pool.state is PoolState.READY:
        print(f"minicondor: already running in {pool.settings.state_dir}", file=sys.stderr)
    pool.start()
    print_status(pool)
    return 0


def run_stop(args: argparse.Namespace) -> int:
    if not (Path(args.state_dir) / "settings.json").is_file():
        print(f"minicondor: nothing was ever started in {args.state_dir}; nothing to stop", file=sys.stderr)
        return 0
    MiniCondor.from_state_dir(args.state_dir).stop()
    return 0


def run_status(args: argparse.Namespace) -> int:
    if not (Path(args.state_dir) / "settings.json").is_file():
        if args.json:
            print(json.dumps(status_record(PoolStatus(PoolState.STOPPED, Path(args.state_dir)))))
        else:
            print(f"state: {PoolState.STOPPED.value} (nothing was ever started in {args.state_dir})")
        return 1
    pool = MiniCondor.from_state_dir(args.state_dir)
    if args.json:
        status = pool.status()
        print(json.dumps(status_record(status)))
        return 0 if status.state is PoolState.READY else 1
    return 0 if print_status(pool) is PoolState.READY else 1


def status_record(status: PoolStatus) -> dict[str, object]:
    """`minicondor status --json`: stable field names (documented in --help and docs/htcondor.md)."""
    return {"state": status.state.value, "state_dir": str(status.state_dir), "source": status.source,
            "node_pid": status.node_pid, "collector": status.collector,
            "client_config": None if status.client_config is None else str(status.client_config),
            "shared_dirs": [str(p) for p in status.shared_dirs], "problem": status.problem,
            "daemons": [{"kind": d.kind, "name": d.name} for d in status.daemons],
            "slots": [{"name": s.name, "state": s.state, "activity": s.activity, "cpus": s.cpus,
                       "memory_mb": s.memory_mb} for s in status.slots]}


def print_status(pool: MiniCondor) -> PoolState:
    status = pool.status()
    print(f"state: {status.state.value}")
    print(f"state folder: {status.state_dir}")
    if status.state is PoolState.STOPPED:
        print(f"fix: splitpilot minicondor start --state-dir {status.state_dir}")
        return status.state
    print(f"daemons from: {status.source} (node PID {status.node_pid})")
    print(f"collector: {status.collector}")
    # The hint names the state folder when it is not the default: without it, `env` would look elsewhere.
    where = ("" if Path(status.state_dir) == Path(DEFAULT_STATE_DIR)
             else f" --state-dir {shlex.quote(str(status.state_dir))}")
    print(f"client config: {status.client_config}  (eval \"$(splitpilot minicondor env{where})\")")
    print(f"shared folders: {' '.join(str(p) for p in status.shared_dirs)}")
    if status.problem:
        print(f"collector problem: {status.problem}")
    print("daemons:")
    for daemon in status.daemons:
        print(f"  {daemon.kind:<14} {daemon.name}")
    print(f"slots: {len(status.slots)}")
    for slot in status.slots:
        print(f"  {slot.name:<24} {slot.state:<10} {slot.activity:<8} cpus={slot.cpus} memory={slot.memory_mb} MB")
    return status.state


def run_env(args: argparse.Namespace) -> int:
    pool = MiniCondor.from_state_dir(args.state_dir)
    if pool.state is PoolState.STOPPED:
        print(f"minicondor: not running in {args.state_dir}; fix: splitpilot minicondor start "
              f"--state-dir {args.state_dir}", file=sys.stderr)
        return 1
    for name, value in pool.env().items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


def run_build(args: argparse.Namespace) -> int:
    root = NodeRootCache(args.cache_dir).ensure(NodeRootRecipe(), args.mirror)
    print(root.path)
    return 0
