"""One way to read and check the TOML files people write: job files, the client config, the CA policy.

    checker = Checker(path)
    document = checker.load_text(text)            # TomlSchemaError on bad TOML, with the fix
    checker.unknown(document, ("client",), "")     # unknown keys, with a did-you-mean
    broker = checker.string(document["client"]["broker"], "client.broker", "broker")
    checker.raise_problems()                      # every problem at once: file, key, problem, fix

Every problem names the file, the dotted key, what is wrong and the fix
(`PATH: KEY: PROBLEM; fix: FIX`); a checker collects them all, so a person
fixes a file in one round. The schema of each file lives with its reader
(broker.jobfile, broker.cli, pilot.tokens.ca): the fields it knows, with an
example value for each (used in "write KEY = VALUE" fixes). The standard
library reads TOML (tomllib); no schema library is used: the readers need
file-specific messages (did-you-mean, examples) that a generic validator
would have to be taught anyway, and the node side must stay light.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pilot.durations import parse_duration
from pilot.errors import UsageError


@dataclass(frozen=True)
class Problem:
    """One problem: the dotted FIELD it concerns, what is wrong, and the fix."""

    field: str
    problem: str
    fix: str

    def render(self, path: str) -> str:
        return f"{path}: {self.field}: {self.problem}; fix: {self.fix}"


class TomlSchemaError(UsageError):
    """A TOML file a person wrote cannot be used.

    Attributes: path (as given), problems (list of Problem), and, for the
    first problem, field and fix.
    """

    def __init__(self, path: str, problems: Sequence[Problem]) -> None:
        self.path = path
        self.problems = list(problems)
        self.field = self.problems[0].field
        self.fix = self.problems[0].fix
        lines = [p.render(path) for p in self.problems]
        if len(lines) == 1:
            message = lines[0]
        else:
            message = f"{path}: {len(lines)} problems:\n  " + "\n  ".join(lines)
        super().__init__(message)


def type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(value), type(value).__name__)


@dataclass
class Checker:
    """Collects the problems of one file while its reader checks it."""

    path: str
    #: Example values for "fix: write KEY = VALUE", by key.
    examples: Mapping[str, str] = field(default_factory=dict)
    #: Raised by raise_problems (a subclass of TomlSchemaError keeps a reader's own exception type).
    error: Callable[[str, Sequence[Problem]], TomlSchemaError] = TomlSchemaError
    problems: list[Problem] = field(default_factory=list)

    def add(self, field_path: str, problem: str, fix: str) -> None:
        self.problems.append(Problem(field_path, problem, fix))

    def raise_problems(self) -> None:
        if self.problems:
            raise self.error(self.path, self.problems)

    def load_text(self, text: str, syntax_fix: str) -> dict[str, Any]:
        """TEXT as a TOML document; a syntax error is raised at once (nothing else can be checked)."""
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise self.error(self.path, [Problem("(syntax)", f"not valid TOML: {exc}", syntax_fix)]) from None

    def load_file(self, syntax_fix: str) -> dict[str, Any]:
        """The file at self.path as a TOML document (unreadable, not UTF-8, bad TOML: raised at once)."""
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise self.error(self.path, [Problem("(file)", f"cannot read it: {exc.strerror}",
                                                 "check the path and its permissions")]) from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.error(self.path, [Problem("(file)", f"not UTF-8 text ({exc.reason} at byte {exc.start})",
                                                 "save the file as UTF-8")]) from None
        return self.load_text(text, syntax_fix)

    def fix_write(self, key: str) -> str:
        return f"write {key} = {self.examples.get(key, '...')}"

    def unknown(self, table: Mapping[str, Any], known: Sequence[str], prefix: str) -> None:
        for key in table:
            if key in known:
                continue
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            if close:
                self.add(f"{prefix}.{key}" if prefix else key, f"unknown field; did you mean '{close[0]}'?",
                         f"rename it to {close[0]}")
            else:
                self.add(f"{prefix}.{key}" if prefix else key, "unknown field",
                         f"remove it (known fields here: {', '.join(known)})")

    def table(self, value: Any, field_path: str, key: str) -> dict | None:
        if isinstance(value, dict):
            return value
        self.add(field_path, f"expected a table, got {type_name(value)}",
                 f"write it as a [{field_path}] section, or {key} = {{ ... }}")
        return None

    def string(self, value: Any, field_path: str, key: str, *, nonempty: bool = False) -> str | None:
        if not isinstance(value, str):
            self.add(field_path, f"expected a string, got {type_name(value)} {value!r}",
                     f"{self.fix_write(key)} (strings are quoted)")
            return None
        if nonempty and not value.strip():
            self.add(field_path, "must not be empty", self.fix_write(key))
            return None
        return value

    def integer(self, value: Any, field_path: str, key: str, *, low: int, high: int, what: str) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(field_path, f"expected {what}, got {value!r}", self.fix_write(key))
            return None
        if not low <= value <= high:
            self.add(field_path, f"expected {what}, got {value}", f"{self.fix_write(key)} (between {low} and {high})")
            return None
        return value

    def strings(self, value: Any, field_path: str, key: str,
                check: Callable[[str], tuple[str, str] | None] | None = None) -> list[str] | None:
        if not isinstance(value, list):
            self.add(field_path, f"expected an array of strings, got {type_name(value)} {value!r}",
                     self.fix_write(key))
            return None
        result = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.add(f"{field_path}[{i}]", f"expected a string, got {type_name(item)} {item!r}",
                         f"quote it: \"{item}\"")
                continue
            problem = check(item) if check else None
            if problem:
                self.add(f"{field_path}[{i}]", problem[0], problem[1])
                continue
            result.append(item)
        return result

    def duration_s(self, value: Any, field_path: str, key: str, *, low_s: int, high_s: int) -> int | None:
        """A duration ("1h30m", or whole seconds as an integer) in seconds, within LOW_S..HIGH_S."""
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            self.add(field_path, f"expected a duration, got {type_name(value)} {value!r}",
                     f'{self.fix_write(key)} (or "90m", "2d", or seconds as an integer)')
            return None
        seconds = value if isinstance(value, int) else None
        if isinstance(value, str):
            try:
                seconds = int(parse_duration(value, what=key).total_seconds())
            except UsageError:
                self.add(field_path, f"expected a duration, got {value!r}",
                         f'{self.fix_write(key)} (units s, m, h, d, w; e.g. "1h30m")')
                return None
        assert seconds is not None
        if not low_s <= seconds <= high_s:
            self.add(field_path, f"expected a duration from {low_s} to {high_s} seconds, got {value!r}",
                     self.fix_write(key))
            return None
        return seconds


__all__ = ["Checker", "Problem", "TomlSchemaError", "type_name"]
