"""HTCondor's quoting rules as small pure functions, with reference parsers to test them against.

A value in a submit description goes through up to four readers before the
job sees it, and each function here answers one of them:

1. The submit language (`condor_submit` and `htcondor2.Submit` alike): a
   line is `key = value`; a newline ends it, a trailing backslash continues
   it, leading and trailing whitespace is dropped. `check_line_value`.
2. Macro expansion, twice. At submit time `$(NAME)` and `$NAME(...)` are
   macros, and `$(DOLLAR)` becomes `$` in a last pass that *rescans* from
   the start after each replacement (so `$(DOLLAR)(DOLLAR)` gives `$`, and
   `$(DOLLAR)INT(` makes a `$INT(` whose body hides what follows). At match
   time the schedd substitutes `$$(ATTR)` in the job's copy of the ad, where
   `$$(DOLLARDOLLAR)` becomes `$$` (no rescan). `escape_macros`, checked
   against `expand_macros`, a port of HTCondor's own scanner.
3. The value syntax of the key: the "new syntax" of `arguments` and
   `environment` (`quote_arguments` / `parse_arguments`, `quote_environment`
   / `parse_environment`), or a ClassAd string literal for `+Attribute`
   lines (`classad_string` / `parse_classad_string`).
4. The job: HTCondor passes each argument and environment value to the
   executable as is (no shell).

The rules of the new syntax (condor_submit(1), and `split_args` in HTCondor's
source): the whole value is in double quotes, a literal double quote is
written twice; whitespace (space, tab) separates arguments; a single-quoted
section is taken literally, and inside one a literal single quote is written
twice. So `it's` is written `'it''s'`; outside a quoted section `''` is an
empty section, not a quote (`it''s` means `its`).

Each quoting function refuses, with a `SubmitDescriptionError` naming the key
and the fix, what the chain above cannot carry: NUL, newline and carriage
return anywhere, `$(DOLLAR)` written literally, `$$(` outside arguments and
environment, and the rare `$` groups the macro passes cannot give back
(`$INT($(x)`).

The parsers (`parse_*`, `expand_*`) mirror HTCondor's rules and exist to
check the quoting functions; `escape_macros` also runs its output through
the macro port and refuses what does not come back unchanged. The port is
checked against condor_submit 23.9 (the mini-condor node) and against the
bindings' own expansion (htcondor2 25) by tests/test_submit.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from submit.errors import Problem, SubmitDescriptionError

#: Characters no submit description can carry: they end the line (or the C string).
_LINE_BREAKERS = {"\0": "NUL", "\n": "a newline", "\r": "a carriage return"}
#: Whitespace that separates arguments and environment entries (HTCondor's split_args).
_SEPARATORS = frozenset(" \t\n\r")
#: Environment variable names we accept: the portable POSIX set.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: A name right after `$` followed by `(` is a submit-time function macro ($ENV(, $F(, $INT(, ...).
_FUNCTION_AFTER_DOLLAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\(")
_DOLLAR_MACRO = "$(DOLLAR)"
_DOLLARDOLLAR_MACRO = "$$(DOLLARDOLLAR)"


def _unrepresentable(key: str, reason: str, fix: str) -> SubmitDescriptionError:
    return SubmitDescriptionError(key, Problem.UNREPRESENTABLE, reason, fix)


# ---------------------------------------------------------------------------
# 1. The submit language

def check_representable(text: str, *, key: str) -> None:
    """Refuse TEXT if it holds a character no submit description can carry (NUL, LF, CR)."""
    for char, name in _LINE_BREAKERS.items():
        if char in text:
            raise _unrepresentable(
                key, f"the value contains {name}, which a submit description cannot carry",
                "pass multi-line or binary data in a file (transfer_input_files) and its name here")


def check_line_value(value: str, *, key: str) -> None:
    """Refuse a raw VALUE that would not survive as the right-hand side of `key = value`."""
    check_representable(value, key=key)
    if value != value.strip(" \t\f\v"):
        raise _unrepresentable(key, "the value starts or ends with whitespace, which condor_submit drops",
                               "strip the value, or quote it in the syntax of the key")
    if value.endswith("\\"):
        raise _unrepresentable(key, "the value ends with a backslash, which continues the line in a submit file",
                               "end the value with another character")
    if value.startswith("@="):
        raise _unrepresentable(key, "the value starts with '@=', which opens a multi-line value in a submit file",
                               "start the value with another character")


# ---------------------------------------------------------------------------
# 2. Macros
#
# A port of HTCondor's macro scanner (next_config_macro in condor_config.cpp),
# used both as the reference parser and to check every escaped value before it
# is written: what the port cannot give back exactly is refused, not guessed.
# Where the source and the programs disagree, the port follows the programs
# (condor_submit 23.9, htcondor2 25): a `(` in a default value after `:` is
# jumped over to its `)` and the body goes on.

_ASCII_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_ID_CHARS = _ASCII_ALNUM | {"_", "."}
#: Submit-time macro functions whose body is anything up to the first `)`.
_FUNCTIONS = frozenset({"$RANDOM_CHOICE", "$RANDOM_INTEGER", "$CHOICE", "$SUBSTR", "$INT", "$REAL", "$STRING",
                        "$BASENAME", "$DIRNAME"})
_ANYTHING, _ID_COLON, _BRACKET = "anything", "id-colon", "bracket"


@dataclass(frozen=True)
class _Macro:
    start: int    # index of the first `$`
    end: int      # index just past the closing `)`
    kind: str     # "normal" ($(NAME)), "function" ($ENV( $F( $INT( ...), "match" ($$(NAME))
    body: str


def _submit_prefix(text: str, start: int, end: int) -> tuple[str, str] | None:
    """HTCondor's is_config_macro: what a submit-time `$PREFIX(` at TEXT[start:end] is, if a macro."""
    prefix = text[start:end]
    if prefix == "$":
        return "normal", _ID_COLON
    if prefix[1] == "$":
        return None  # `$$(`: left for match time
    if prefix[1] == "F" and all(c.lower() in "pnxdq" for c in prefix[2:]):
        return "function", _ANYTHING  # $F, $Fn, $Fpx, ...: file name parts
    if prefix == "$ENV":
        return "function", _ID_COLON
    if prefix in _FUNCTIONS:
        return "function", _ANYTHING
    return None


def _match_prefix(text: str, start: int, end: int) -> tuple[str, str] | None:
    """HTCondor's is_dollardollar_prefix: `$$(` is a match-time macro, `$$([` one with an expression."""
    if text[start:end] != "$$":
        return None
    return "match", (_BRACKET if text[end + 1:end + 2] == "[" else _ID_COLON)


def _next_macro(text: str, pos: int, prefix_of, skip) -> _Macro | None:
    """HTCondor's next_config_macro: the first macro at or after POS that SKIP does not skip over."""
    n = len(text)
    scan = pos
    while True:
        while True:  # the next `$`, `$$`, `$NAME` or `$$NAME` right before a `(` that PREFIX_OF accepts
            dollar = text.find("$", scan)
            if dollar < 0:
                return None
            p = dollar + 1
            if p < n and text[p] == "$":
                p += 1
            while p < n and (text[p] in _ASCII_ALNUM or text[p] == "_"):
                p += 1
            found = prefix_of(text, dollar, p) if p < n and text[p] == "(" else None
            if found:
                break
            scan = p
        kind, body_chars = found
        name = q = p + 1
        if body_chars == _ANYTHING:
            while q < n and text[q] != ")":
                q += 1
        elif body_chars == _BRACKET:
            close = text.find("])", q)
            if close < 0:
                scan = q
                continue
            q = close + 1
        else:  # identifier characters, then after a `:` a default value
            after_colon = restart = False
            while q < n and text[q] != ")":
                c = text[q]
                q += 1
                if c == ":" and not after_colon:
                    after_colon = True
                    continue
                if after_colon:
                    if c == "(":  # a parenthesised part of the default value: jump over it
                        close = text.find(")", q)
                        if close >= 0:
                            q = close + 1
                        continue
                    if c in "$ ,\\":
                        continue
                if c not in _ID_CHARS:
                    restart = True
                    break
            if restart:
                scan = name
                continue
        if q < n and text[q] == ")":
            body = text[name:q]
            if skip(kind, body):
                scan = q
                continue
            return _Macro(dollar, q + 1, kind, body)
        scan = name


def _is_dollar(kind: str, body: str) -> bool:
    return kind == "normal" and body.lower() == "dollar"


def expand_submit_macros(text: str) -> str:
    """Reference: what condor_submit makes of TEXT, a value holding no macro but `$(DOLLAR)`.

    A port of expand_macro: every macro but `$(DOLLAR)` first (any found
    raises ValueError: the escaping must never leave one), then `$(DOLLAR)`
    to `$`, scanning again from the start after each replacement.
    `$$(...)` is left for match time.
    """
    other = _next_macro(text, 0, _submit_prefix, _is_dollar)
    if other is not None:
        raise ValueError(f"submit-time macro {text[other.start:other.end]!r} at {other.start}")
    while (dollar := _next_macro(text, 0, _submit_prefix, lambda k, b: not _is_dollar(k, b))) is not None:
        text = text[:dollar.start] + "$" + text[dollar.end:]
    return text


def expand_match_macros(text: str) -> str:
    """Reference: the schedd's match-time pass over TEXT, for texts whose only `$$(...)` is `$$(DOLLARDOLLAR)`.

    `$$(DOLLARDOLLAR)` becomes `$$` and the scan goes on after it (no
    rescan); any other match-time macro raises ValueError.
    """
    pos = 0
    while (macro := _next_macro(text, pos, _match_prefix, lambda k, b: False)) is not None:
        if macro.body != "DOLLARDOLLAR":
            raise ValueError(f"match-time macro {text[macro.start:macro.end]!r} at {macro.start}")
        text = text[:macro.start] + "$$" + text[macro.end:]
        pos = macro.start + 2
    return text


def expand_macros(text: str, *, match_time: bool = True) -> str:
    """Reference: TEXT after condor_submit and, if MATCH_TIME, the schedd's match-time pass.

    Without MATCH_TIME (ClassAd attributes, file names) any match-time macro
    left raises ValueError: the job's copy of the ad would differ from the queue's.
    """
    text = expand_submit_macros(text)
    if match_time:
        return expand_match_macros(text)
    found = _next_macro(text, 0, _match_prefix, lambda k, b: False)
    if found is not None:
        raise ValueError(f"match-time macro {text[found.start:found.end]!r} at {found.start}")
    return text


def escape_macros(text: str, *, key: str, match_time: bool = True) -> str:
    """TEXT written so that HTCondor's macro expansion gives TEXT back, or a refusal.

    A `$` is left alone unless a macro could start there: a run of `$` signs
    right before `(` or before a name and `(`. Such a run is written as
    `$$(DOLLARDOLLAR)` for each pair and `$(DOLLAR)` for an odd one left
    (last, so that the rescanning `$(DOLLAR)` pass never sees a `$` before
    it). The result is then expanded by `expand_macros` and refused unless
    it gives TEXT back (e.g. `$INT($(x)`: the first `$(DOLLAR)` pass makes a
    `$INT(` whose body hides the next `$(DOLLAR)`).

    MATCH_TIME: whether the value reaches the job through the schedd's
    match-time substitution (arguments, environment), which is what turns
    `$$(DOLLARDOLLAR)` into `$$`. Elsewhere (ClassAd attributes read from the
    queue, file names) that escape would stay visible, so a run of two or more
    `$` before `(` is refused instead.
    """
    check_representable(text, key=key)
    if _DOLLAR_MACRO.lower() in text.lower():
        raise _unrepresentable(
            key, "the value contains '$(DOLLAR)', which condor_submit expands even when escaped",
            "avoid that exact text (e.g. pass the value in a file)")
    escaped = _escape_dollar_runs(text, key=key, match_time=match_time)
    try:
        faithful = expand_macros(escaped, match_time=match_time) == text
    except ValueError:
        faithful = False
    if not faithful:
        raise _unrepresentable(
            key, "HTCondor's macro expansion cannot give this exact text back ('$' signs before '(' or "
                 "before a macro function name such as INT( next to each other)",
            "HTCondor has no escape for this text: pass it in a file (transfer_input_files) and its name here")
    return escaped


def _escape_dollar_runs(text: str, *, key: str, match_time: bool) -> str:
    """The escaping of `escape_macros`, before its check."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] != "$":
            out.append(text[i])
            i += 1
            continue
        j = i
        while j < n and text[j] == "$":
            j += 1
        run = j - i
        rest = text[j:j + 64]
        if not (rest.startswith("(") or _FUNCTION_AFTER_DOLLAR.match(rest)):
            out.append("$" * run)  # `$HOME`, `${X}`, `$1`, `a$$b`: literal to every reader
        elif run == 1:
            out.append(_DOLLAR_MACRO)
        elif not match_time:
            raise _unrepresentable(
                key, "the value contains '$$' before '(' or before a name and '(', which HTCondor substitutes "
                     "at match time and which has no escape outside arguments and environment",
                "avoid '$$(' in this value")
        else:
            out.append(_DOLLARDOLLAR_MACRO * (run // 2) + (_DOLLAR_MACRO if run % 2 else ""))
        i = j
    return "".join(out)


# ---------------------------------------------------------------------------
# 3. Value syntaxes: arguments, environment, ClassAd strings

def _quote_word(word: str) -> str:
    """One argument (or environment value) in the raw new syntax: single-quoted if it must be."""
    if word and not any(c in _SEPARATORS or c == "'" for c in word):
        return word
    return "'" + word.replace("'", "''") + "'"


def _double_quoted(raw: str) -> str:
    return '"' + raw.replace('"', '""') + '"'


def quote_arguments(arguments: Sequence[str], *, key: str = "arguments") -> str:
    """ARGUMENTS in HTCondor's new syntax: `"one 'two words' ""quoted"" 'it''s'"`.

    An empty argument is written `''`. Macros are not escaped here: see
    `escape_macros` (the generator applies both).
    """
    if isinstance(arguments, str):
        raise TypeError("quote_arguments takes a list of arguments, not one string")
    for index, argument in enumerate(arguments):
        check_representable(argument, key=f"{key}[{index}]")
    return _double_quoted(" ".join(_quote_word(a) for a in arguments))


def quote_environment(environment: Mapping[str, str] | Iterable[tuple[str, str]], *,
                      key: str = "environment") -> str:
    """ENVIRONMENT in HTCondor's new syntax: `"NAME=value NAME2='value with spaces'"`."""
    pairs = list(environment.items()) if isinstance(environment, Mapping) else list(environment)
    words = []
    for name, value in pairs:
        if not ENV_NAME.fullmatch(name):
            raise SubmitDescriptionError(
                f"{key}[{name!r}]", Problem.INVALID,
                "not a portable environment variable name",
                "use letters, digits and underscores, not starting with a digit")
        check_representable(value, key=f"{key}[{name}]")
        words.append(f"{name}={_quote_word(value) if value else ''}")
    return _double_quoted(" ".join(words))


def _unquote_double(value: str) -> str:
    """Reference: HTCondor's V2QuotedToV2Raw (outer double quotes off, `""` to `"`)."""
    text = value.strip()
    if not text.startswith('"'):
        raise ValueError("not in the new syntax: no opening double quote")
    raw: list[str] = []
    i = 1
    while i < len(text):
        if text[i] == '"':
            if text[i + 1:i + 2] == '"':
                raw.append('"')
                i += 2
                continue
            if text[i + 1:].strip():
                raise ValueError("unexpected characters after the closing double quote")
            return "".join(raw)
        raw.append(text[i])
        i += 1
    raise ValueError("unterminated double quote")


def _split_words(raw: str) -> list[str]:
    """Reference: HTCondor's split_args on the raw new syntax."""
    words: list[str] = []
    buf: list[str] = []
    in_word = False
    i = 0
    while i < len(raw):
        char = raw[i]
        if char == "'":
            in_word = True
            i += 1
            while True:
                if i >= len(raw):
                    raise ValueError("unbalanced single quote")
                if raw[i] == "'":
                    if raw[i + 1:i + 2] == "'":
                        buf.append("'")
                        i += 2
                        continue
                    i += 1
                    break
                buf.append(raw[i])
                i += 1
        elif char in _SEPARATORS:
            i += 1
            if in_word:
                words.append("".join(buf))
                buf, in_word = [], False
        else:
            in_word = True
            buf.append(char)
            i += 1
    if in_word:
        words.append("".join(buf))
    return words


def parse_arguments(value: str) -> list[str]:
    """Reference: the argument list HTCondor reads from a new-syntax VALUE (macros already expanded)."""
    return _split_words(_unquote_double(value))


def parse_environment(value: str) -> dict[str, str]:
    """Reference: the environment HTCondor reads from a new-syntax VALUE (later names win)."""
    environment: dict[str, str] = {}
    for word in _split_words(_unquote_double(value)):
        name, equals, rest = word.partition("=")
        if not equals or not name:
            raise ValueError(f"environment entry without NAME=: {word!r}")
        environment[name] = rest
    return environment


def classad_string(value: str, *, key: str) -> str:
    """VALUE as a ClassAd string literal: in double quotes, backslash and double quote escaped.

    Control characters are refused rather than escaped: ClassAd escapes for
    them exist, but nothing downstream (condor_q, monitoring) expects them.
    """
    check_representable(value, key=key)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise _unrepresentable(key, "the value contains a control character",
                               "use printable characters in ClassAd attributes")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_classad_string(literal: str) -> str:
    """Reference: the string a ClassAd string LITERAL holds (escapes `\\\\`, `\\"`, and the rest)."""
    if len(literal) < 2 or literal[0] != '"' or literal[-1] != '"':
        raise ValueError("not a ClassAd string literal")
    body, out, i = literal[1:-1], [], 0
    simple = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f"}
    while i < len(body):
        char = body[i]
        if char == '"':
            raise ValueError("unescaped double quote inside a ClassAd string")
        if char == "\\":
            nxt = body[i + 1:i + 2]
            if nxt not in simple:
                raise ValueError(f"unknown escape \\{nxt}")
            out.append(simple[nxt])
            i += 2
            continue
        out.append(char)
        i += 1
    return "".join(out)
