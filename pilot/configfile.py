"""Configuration files for long-running commands: every option of a command, also as a TOML key.

    [agent]                      # the command's section: broker, agent or factory
    broker = "broker.example.org:7443"
    work_dir = "/var/lib/splitpilot/agent"
    bind = ["/cvmfs/atlas.cern.ch", "/etc/grid-security:/etc/grid-security"]

A key is the option's long name without its dashes, with underscores (`--work-dir` -> `work_dir`,
`--bind` -> `bind`; a repeatable option takes an array). Flags override the file, the file overrides the defaults.
The schema is the command's own argparse parser, so every flag is reachable in the file and a new
flag needs nothing here; the file is checked with pilot.tomlschema (every problem names the file,
the key and the fix, with a did-you-mean).

How it works: `make_configurable` replaces each option's default with a marker (and drops
`required`), so that after parsing the handler can tell a flag from a default; `resolve` then
fills each option from the flag, else the file, else the real default, and records where each
value came from (`args.config_sources`: "flag", "file:PATH:SECTION.KEY" or "default"), which
`splitpilot config show` prints. The values are put in the namespace in the form argparse would
have produced (a duration stays the string "90s"), so the handlers stay as they were.

Secrets never go in a configuration file: keys naming a token hold its path; a PEM block or a
multi-line value there is refused.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pilot.durations import parse_duration
from pilot.errors import UsageError
from pilot.tomlschema import Checker, type_name

#: Options never read from a file: the file's own name, and one-shot actions.
NOT_IN_FILE = frozenset({"help", "config", "dry_run", "json", "handler", "version"})
#: Keys whose value is the path of a credential: never the credential itself.
SECRET_PATH_KEYS = frozenset({"token", "admin_token", "scitoken", "ca_cert"})


class _Unset:
    """The default of a configurable option: "not given on the command line"."""

    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset()


@dataclass(frozen=True)
class Option:
    """One configurable option of a parser: its key, its flag and how argparse would read it."""

    key: str
    dest: str
    flag: str
    default: Any
    required: bool
    kind: str           # "bool", "list", "int", "float", "str"
    type: Callable[[str], Any] | None
    choices: tuple[str, ...] | None
    metavar: str | None
    help: str


@dataclass(frozen=True)
class ConfigSpec:
    """The file of one command family: its section, its parsers' options, per-key checks."""

    section: str
    #: Example values for "fix: write KEY = VALUE".
    examples: Mapping[str, str] = field(default_factory=dict)
    #: Extra checks by key: value (as a string) -> None, or raise UsageError with the problem.
    validators: Mapping[str, Callable[[str], object]] = field(default_factory=dict)
    #: Lowest value of integer keys (default 0: no negative counts or seconds).
    minimum: Mapping[str, int] = field(default_factory=dict)
    #: Options of one run only, never from the file (e.g. glidein submit --count).
    exclude: frozenset[str] = frozenset()


#: Options registered per parser (a parser may be made configurable once).
_OPTIONS: dict[int, dict[str, Option]] = {}
#: Every key of a section, over the parsers that share its file (glidein status reads the factory's file
#: but has no use for its broker key: known, not applied).
_SECTION_KEYS: dict[str, set[str]] = {}


def make_configurable(parser: argparse.ArgumentParser, spec: ConfigSpec, *, config_help: str | None = None) -> None:
    """Add --config FILE to PARSER and make each of its options settable in SPEC's file (see the module doc).
    Call after every option is added; the handler calls `resolve(args)` first."""
    options: dict[str, Option] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in NOT_IN_FILE or action.dest in spec.exclude:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            kind = "bool"
        elif isinstance(action, argparse._AppendAction):
            kind = "list"
        elif action.type is int:
            kind = "int"
        elif action.type is float:
            kind = "float"
        else:
            kind = "str"
        if action.help and "%(default)s" in action.help:
            # The help shows the real default, not the marker.
            action.help = action.help.replace("%(default)s", str(action.default).replace("%", "%%"))
        long_flag = next((f for f in action.option_strings if f.startswith("--")), action.option_strings[0])
        key = long_flag.lstrip("-").replace("-", "_")
        options[key] = Option(
            key=key, dest=action.dest, flag=long_flag, default=action.default, required=action.required, kind=kind,
            type=action.type if callable(action.type) else None,
            choices=tuple(action.choices) if action.choices else None,
            metavar=action.metavar if isinstance(action.metavar, str) else None, help=action.help or "")
        # A marker instead of the default tells a flag from a default; append needs None (it copies the default).
        action.default = None if kind == "list" else UNSET
        action.required = False
    dashed = next((o for o in options.values() if "-" in o.flag[2:]), None)
    example = f" ({dashed.flag} -> {dashed.key})" if dashed else ""
    parser.add_argument("--config", metavar="FILE",
                        help=config_help or f"a TOML file whose [{spec.section}] table sets any option above as KEY = "
                                            f"VALUE{example}; flags override it (docs/operations.md)")
    _OPTIONS[id(parser)] = options
    _SECTION_KEYS.setdefault(spec.section, set()).update(options)
    parser.set_defaults(config_parser_id=id(parser), config_spec=spec)


def options_of(parser: argparse.ArgumentParser) -> dict[str, Option]:
    return dict(_OPTIONS[id(parser)])


def resolve(args: argparse.Namespace, *, check_required: bool = True) -> argparse.Namespace:
    """Fill ARGS in place: flag, else the --config file, else the default; `args.config_sources` says which.
    Each handler calls it first (once is enough: a second call changes nothing)."""
    if hasattr(args, "config_sources"):
        return args
    options = _OPTIONS[args.config_parser_id]
    spec: ConfigSpec = args.config_spec
    values = load(args.config, spec, options) if args.config else {}
    sources: dict[str, str] = {}
    missing = []
    for key, option in options.items():
        given = getattr(args, option.dest)
        if given is not UNSET and not (option.kind == "list" and given is None):
            sources[key] = "flag"
            continue
        if key in values:
            setattr(args, option.dest, values[key])
            sources[key] = f"file:{args.config}:{spec.section}.{key}"
            continue
        default = option.default
        if option.kind == "list":
            default = list(default or [])
        elif isinstance(default, str) and option.type is not None:
            default = option.type(default)   # what argparse does with a string default
        setattr(args, option.dest, default)
        sources[key] = "default"
        if option.required:
            missing.append(option)
    if missing and check_required:
        where = f"in {args.config} " if args.config else "in a --config file "
        raise UsageError("; ".join(f"{o.flag} is required" for o in missing)
                         + f"; fix: give {', '.join(o.flag for o in missing)} or set "
                         + ", ".join(o.key for o in missing) + f" {where}under [{spec.section}]")
    args.config_sources = sources
    return args


def load(path: str, spec: ConfigSpec, options: Mapping[str, Option]) -> dict[str, Any]:
    """The checked values of PATH's [SECTION] table for OPTIONS, as argparse would have produced them.
    TomlSchemaError (a UsageError) with every problem at once: file, key, problem, fix."""
    check = Checker(path, examples={**_examples(options), **spec.examples})
    document = check.load_file(f"write e.g. [{spec.section}] then KEY = VALUE lines")
    check.unknown(document, (spec.section,), "")
    table = check.table(document.get(spec.section, {}), spec.section, spec.section) or {}
    check.unknown(table, tuple(sorted(_SECTION_KEYS.get(spec.section, set()) | set(options))), spec.section)
    values: dict[str, Any] = {}
    for key, raw in table.items():
        option = options.get(key)
        if option is None:
            continue
        value = _value(check, spec, option, raw, f"{spec.section}.{key}")
        if value is not None:
            values[key] = value
    check.raise_problems()
    return values


def _value(check: Checker, spec: ConfigSpec, option: Option, raw: Any, where: str) -> Any:
    key = option.key
    if option.kind == "bool":
        if not isinstance(raw, bool):
            check.add(where, f"expected true or false, got {type_name(raw)} {raw!r}", f"write {key} = true")
            return None
        return raw
    if option.kind == "list":
        items = check.strings(raw, where, key)
        if items is None:
            return None
        return [v for i, v in enumerate(items) if _text(check, spec, option, v, f"{where}[{i}]") is not None]
    if option.kind == "int":
        return check.integer(raw, where, key, low=spec.minimum.get(key, 0), high=2**31 - 1,
                             what=f"a whole number of at least {spec.minimum.get(key, 0)}")
    if option.kind == "float":
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            check.add(where, f"expected a number, got {type_name(raw)} {raw!r}", check.fix_write(key))
            return None
        if raw < spec.minimum.get(key, 0):
            check.add(where, f"expected a number of at least {spec.minimum.get(key, 0)}, got {raw}",
                      check.fix_write(key))
            return None
        return float(raw)
    if option.metavar == "DURATION" and isinstance(raw, int) and not isinstance(raw, bool):
        raw = f"{raw}s" if raw > 0 else str(raw)  # whole seconds, as the flag takes them
    return _text(check, spec, option, raw, where)


def _text(check: Checker, spec: ConfigSpec, option: Option, raw: Any, where: str) -> Any:
    """A string value (of a key or an array item), checked like its flag would be, converted by its type."""
    key = option.key
    text = check.string(raw, where, key, nonempty=True)
    if text is None:
        return None
    if key in SECRET_PATH_KEYS and ("-----BEGIN" in text or "\n" in text):
        check.add(where, "holds a credential itself, not the path of its file (a configuration file is no "
                         "place for a secret)",
                  f"save it in a file only its user reads (chmod 600) and write {key} = \"/path/to/file\"")
        return None
    if "\n" in text or "\x00" in text:
        check.add(where, "contains a newline or NUL", check.fix_write(key))
        return None
    if option.choices is not None and text not in option.choices:
        check.add(where, f"{text!r} is not one of {', '.join(option.choices)}",
                  f"write {key} = \"{option.choices[0]}\" (or {', '.join(option.choices[1:])})")
        return None
    checker = spec.validators.get(key) or (_duration if option.metavar == "DURATION" else None)
    if checker is not None:
        try:
            checker(text)
        except UsageError as exc:
            check.add(where, str(exc).split("; fix:")[0], check.fix_write(key))
            return None
    if option.type is not None and option.type not in (int, float, str):
        return option.type(text)
    return text


def _duration(text: str) -> None:
    parse_duration(text, what="duration")


def _examples(options: Mapping[str, Option]) -> dict[str, str]:
    examples = {}
    for key, option in options.items():
        if option.kind == "bool":
            examples[key] = "true"
        elif option.kind == "list":
            examples[key] = '["..."]'
        elif option.kind in ("int", "float"):
            examples[key] = str(option.default if isinstance(option.default, (int, float)) else 1)
        elif option.metavar == "DURATION":
            examples[key] = f'"{option.default}"' if isinstance(option.default, str) else '"90s"'
        elif isinstance(option.default, str) and option.default:
            examples[key] = f'"{option.default}"'
    return examples


def describe(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The effective settings of a resolved namespace: one record per option, for `config show`."""
    options = _OPTIONS[args.config_parser_id]
    records = []
    for key, option in options.items():
        value = getattr(args, option.dest)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        records.append({"key": key, "flag": option.flag, "value": value,
                        "source": args.config_sources.get(key, "default")})
    return records


__all__ = ["ConfigSpec", "Option", "UNSET", "describe", "load", "make_configurable", "options_of",
           "resolve"]
