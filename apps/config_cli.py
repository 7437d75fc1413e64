"""`splitpilot config show --for broker|agent|factory [--config FILE] [OPTION ...] [--json]`.

The effective settings of `broker serve`, `agent` or `factory run` (the factory's file is the one
`glidein submit|status|remove` read too) given a configuration file and options, with where each
value comes from: `flag`, `file:PATH:SECTION.KEY` or `default`. Nothing is started; the file is
checked as the command itself would check it (the same errors, naming the file, key and fix).

    splitpilot config show --for broker --config /etc/splitpilot/broker.toml --listen 0.0.0.0:7443
    splitpilot config show --json --for agent --config agent.toml
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pilot.configfile import describe, resolve
from pilot.errors import UsageError

#: The command whose options each target shows.
TARGETS = {"broker": ("broker", "serve"), "agent": ("agent",), "factory": ("factory", "run")}


def register(subparsers: argparse._SubParsersAction) -> None:
    config = subparsers.add_parser("config", help="show the effective settings of broker, agent or factory",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = config.add_subparsers(title="config commands", metavar="CONFIG_COMMAND")
    show = sub.add_parser("show", help="the effective settings and where each comes from",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("--json", action="store_true",
                      help="one JSON object: for, config, settings [{key, flag, value, source}] (give it before --for)")
    # Everything after --for is the command's own options (parsed by that command's parser).
    show.add_argument("--for", dest="request", nargs=argparse.REMAINDER, required=True,
                      metavar="broker|agent|factory [--config FILE] [OPTION ...]",
                      help="the command, then its options as you would give them to it")
    show.set_defaults(handler=run_show)
    config.set_defaults(handler=lambda _a: config.print_help(sys.stderr) or 2)


def run_show(args: argparse.Namespace) -> int:
    from apps.cli import build_parser  # why: the commands' own parsers (apps.cli imports this module's group)

    request = list(args.request or [])
    as_json = args.json
    if "--json" in request:      # also accepted after the options
        request.remove("--json")
        as_json = True
    if not request or request[0] not in TARGETS:
        raise UsageError(f"config show --for needs one of {', '.join(TARGETS)}; fix: e.g. "
                         "splitpilot config show --for broker --config /etc/splitpilot/broker.toml")
    target, options = request[0], request[1:]
    parsed = build_parser().parse_args([*TARGETS[target], *options])
    resolve(parsed, check_required=False)
    records = describe(parsed)
    if as_json:
        print(json.dumps({"for": target, "config": parsed.config, "settings": records}, indent=2, default=str))
        return 0
    rows = [("KEY", "VALUE", "SOURCE")] + [(r["key"], _shown(r["value"]), r["source"]) for r in records]
    width = [max(len(row[i]) for row in rows) for i in range(2)]
    for key, value, source in rows:
        print(f"{key.ljust(width[0])}  {value.ljust(width[1])}  {source}".rstrip())
    return 0


def _shown(value: object) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps([os.fspath(v) if isinstance(v, os.PathLike) else v for v in value])
    return str(value)
