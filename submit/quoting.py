"""What a submit description can carry, and ClassAd string literals (through the bindings' classad2.quote).

A value the generator writes goes through up to three readers before the
job or the queue sees it; each function here guards one of them:

1. The submit language (`condor_submit` and `htcondor2.Submit` alike): a
   line is `key = value`; a newline ends it, a trailing backslash continues
   it, leading and trailing whitespace is dropped. `check_representable`,
   `check_line_value`.
2. Macro expansion: at submit time `$(NAME)` and `$NAME(...)` are macros, at
   match time the schedd substitutes `$$(ATTR)`. The generator writes its
   values literally and escapes nothing: a value in which a macro could start
   (a `$`, then letters, digits, `_` or `$`, then `(`) is refused by
   `refuse_macros`. Every other `$` (`$HOME`, `${X}`, `a$b`) is literal to
   every reader. (HTCondor's `$(DOLLAR)` escape has cases no text survives,
   e.g. `$INT($(x)`; the values the factory writes, paths and names, never
   need it.)
3. ClassAd string literals for `+Attribute` lines and constraints:
   `classad_string`, which is `classad2.quote` after refusing what the job
   queue and the queries would read differently (control characters,
   backslashes, non-ASCII).

Each function refuses with a `SubmitDescriptionError` naming the key and the
fix; the offending value is never in the message (it may be a credential).
"""

from __future__ import annotations

import re

import classad2

from submit.errors import Problem, SubmitDescriptionError

#: Characters no submit description can carry: they end the line (or the C string).
_LINE_BREAKERS = {"\0": "NUL", "\n": "a newline", "\r": "a carriage return"}
#: Where HTCondor's macro scanner could find a macro: `$`, then name characters or `$`, then `(`
#: (`$(X)`, `$ENV(`, `$INT(`, `$Fn(`, `$$(X)`, `$$([expr])`).
_MACRO_START = re.compile(r"\$[$A-Za-z0-9_]*\(")


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

def refuse_macros(text: str, *, key: str) -> str:
    """TEXT itself, if no HTCondor macro can start in it; else a refusal naming KEY."""
    check_representable(text, key=key)
    if _MACRO_START.search(text):
        raise _unrepresentable(
            key, "the value holds '$' followed by '(' (or by a name and '('), which HTCondor would expand as "
                 "a macro",
            "use a value without '$(' and '$NAME(' (rename the folder, or the site, factory or batch)")
    return text


# ---------------------------------------------------------------------------
# 3. ClassAd strings

def classad_string(value: str, *, key: str) -> str:
    """VALUE as a ClassAd string literal (classad2.quote: in double quotes, `"` escaped as `\\"`).

    Only printable ASCII without backslashes is accepted, because the two
    readers of this literal disagree on the rest. Constraints (the factory's
    queries) are read with the new ClassAd syntax, which classad2.quote
    writes: `\\` for a backslash, octal escapes for control characters and
    for the UTF-8 bytes of non-ASCII text. A `+Attr = "..."` line of a submit
    description is stored in the job queue with the old syntax, where only
    `\\"` is an escape: observed with condor_submit 23.9 and the htcondor2 25
    bindings alike, `"a\\\\b"` is queued as `a\\\\b` (two backslashes) and
    `"\\303\\274"` as those eight characters, not `ü`; the factory would then
    not find its own glideins. For the accepted characters both syntaxes read
    the literal the same way (tests/test_submit.py checks it against the real
    queue).
    """
    check_representable(value, key=key)
    for char in value:
        if ord(char) < 0x20 or ord(char) == 0x7F:
            raise _unrepresentable(key, "the value contains a control character",
                                   "use printable ASCII characters (no backslash) in ClassAd attributes")
        if char == "\\" or ord(char) > 0x7E:
            raise _unrepresentable(key, "the value contains a backslash or a non-ASCII character, which "
                                        "HTCondor's job queue would store differently from what its queries read",
                                   "use printable ASCII characters (no backslash) in ClassAd attributes")
    return classad2.quote(value)
