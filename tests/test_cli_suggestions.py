"""Every `splitpilot ...` command the code suggests (in an error's fix, a help text, a docstring) exists.

The suggestions are read from the string constants of the shipped packages: every backtick-quoted
`splitpilot ...`, and in texts that say `fix:` every `splitpilot WORD ...` whose WORD is a command.
Each is walked down the real parser (apps.cli.build_parser): every word at a level with subcommands
must name one (alternatives `a|b` each), and every --option must be one the command takes.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import re

import pytest

from apps.cli import build_parser

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("apps", "broker", "condor_plugin", "pilot", "submit")
QUOTED = re.compile(r"`(splitpilot(?: [^`]*)?)`")
IN_FIX = re.compile(r"splitpilot((?: (?:--[a-z][a-z-]*|[a-z][a-z-]*(?:\|[a-z][a-z-]*)*))+)")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return None


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def _remainder(parser: argparse.ArgumentParser, option: str) -> bool:
    return any(option in action.option_strings and action.nargs == argparse.REMAINDER for action in parser._actions)


def problem(command: str, parser: argparse.ArgumentParser) -> str | None:
    """Why COMMAND ('splitpilot job status ID') does not parse down PARSER's tree (None: it does)."""
    words = command.split()[1:]
    leaves = [parser]
    for word in words:
        if word in ("...", "[...]"):
            break
        if word.startswith("-"):
            name = word.split("=")[0]
            if not all(name in _options(leaf) for leaf in leaves):
                return f"{command!r}: no option {name}"
            if any(_remainder(leaf, name) for leaf in leaves):
                break   # the rest is another command's words (config show --for broker --config FILE ...)
            continue
        choices = [_subcommands(leaf) for leaf in leaves]
        if any(c is None for c in choices):   # a command's own arguments follow
            continue
        alternatives = word.split("|")
        missing = [w for w in alternatives for c in choices if c is not None and w not in c]
        if missing:
            return f"{command!r}: {missing[0]!r} is not a command there"
        leaves = [c[w] for w in alternatives for c in choices if c is not None]
    return None


def suggestions() -> list[tuple[str, str]]:
    top = set(_subcommands(build_parser()) or {})
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                    continue
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                text = node.value
                found += [(where, m.group(1)) for m in QUOTED.finditer(text)]
                if "fix" in text:
                    found += [(where, m.group(0)) for m in IN_FIX.finditer(text.replace("`", ""))
                              if m.group(1).split()[0] in top]
    return found


def test_every_suggested_command_exists():
    parser = build_parser()
    found = suggestions()
    assert len(found) > 30  # the scan sees the suggestions (it would pass vacuously otherwise)
    problems = [f"{where}: {why}" for where, command in found if (why := problem(command, parser))]
    assert problems == []


@pytest.mark.parametrize(("command", "words"), [
    ("splitpilot job list", "'list' is not a command there"),
    ("splitpilot admin site drain --force", "no option --force"),
    ("splitpilot token revoke|forget", "'forget' is not a command there"),
    ("splitpilot nothing", "'nothing' is not a command there"),
])
def test_a_suggestion_of_a_missing_command_is_caught(command, words):
    assert words in (problem(command, build_parser()) or "")
