"""Job ids and ranges on the command line: `job status|kill|output 7 4..53 60-62`.

`job submit` ends with `submitted 50 job(s) to HOST:PORT: 4 .. 53`; pasted as it is, that range
arrives as three words (`4`, `..`, `53`), so it is accepted in that form as well as `4..53` and
`4-53`. Ids keep the order given, without repeats. A range is bounded (MAX_IDS in all): a typo such
as 4..4000000000 is refused before any call reaches the broker.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pilot.errors import UsageError

#: Most job ids one command may name (the broker's default --max-jobs-per-submit: one submission's worth).
MAX_IDS = 10_000

_ONE = re.compile(r"[0-9]+")
_RANGE = re.compile(r"([0-9]+)(?:\.\.|-)([0-9]+)")
FORMS = "ids such as 7, ranges such as 4..53, 4-53 or 4 .. 53 (as job submit prints them)"


def is_job_id_word(word: str) -> bool:
    """Whether WORD is (part of) a job id or range: a number, a range, or the `..` of `4 .. 53`."""
    return word == ".." or bool(_ONE.fullmatch(word) or _RANGE.fullmatch(word))


def parse_job_ids(words: Sequence[str], limit: int = MAX_IDS) -> list[int]:
    """The job ids WORDS name, in order, without repeats; UsageError naming the word and the fix."""
    ids: dict[int, None] = {}   # ordered set
    i = 0
    while i < len(words):
        word = words[i]
        if word == "..":
            raise UsageError(f"'..' needs a job id on each side; fix: give {FORMS}")
        if i + 2 < len(words) and words[i + 1] == ".." and _ONE.fullmatch(word):
            first, last = _id(word), _id(words[i + 2])
            i += 3
        elif match := _RANGE.fullmatch(word):
            first, last = _id(match.group(1)), _id(match.group(2))
            i += 1
        else:
            first = last = _id(word)
            i += 1
        if last < first:
            raise UsageError(f"the range {first}..{last} runs backwards; fix: write {last}..{first}")
        if last - first + 1 + len(ids) > limit:
            raise UsageError(f"{first}..{last} would name more than {limit} jobs; fix: ask for at most {limit} "
                             "at once (a smaller range)")
        for job_id in range(first, last + 1):
            ids[job_id] = None
    if not ids:
        raise UsageError(f"no job id given; fix: give {FORMS}")
    return list(ids)


def _id(word: str) -> int:
    if not _ONE.fullmatch(word) or len(word) > 19:
        shown = word.encode("unicode_escape").decode("ascii")[:40]
        raise UsageError(f"{shown!r} is not a job id or range; fix: give {FORMS}")
    value = int(word)
    if value < 1:
        raise UsageError(f"{word!r} is not a job id (ids start at 1); fix: give {FORMS}")
    return value
