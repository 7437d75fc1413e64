"""Human durations on the command line and in files: 90s, 30m, 24h, 2d, 1w."""

from __future__ import annotations

import datetime
import re

from pilot.errors import UsageError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_RE = re.compile(r"(\d+)([smhdwy])")


def parse_duration(text: str, *, what: str = "duration") -> datetime.timedelta:
    """Parse e.g. '24h', '2d', '1h30m'; raise UsageError naming the fix."""
    cleaned = text.strip().lower()
    if cleaned.isdigit():
        return datetime.timedelta(seconds=int(cleaned))
    pos, total = 0, 0
    for match in _RE.finditer(cleaned):
        if match.start() != pos:
            break
        total += int(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not cleaned or pos != len(cleaned) or total <= 0:
        raise UsageError(f"{what} {text!r} is not a duration: write e.g. 90s, 30m, 24h, 2d, 1w or 1h30m")
    return datetime.timedelta(seconds=total)


def format_duration(delta: datetime.timedelta) -> str:
    """The inverse of parse_duration, largest units first (e.g. '1d2h')."""
    seconds = int(delta.total_seconds())
    if seconds <= 0:
        return "0s"
    parts = []
    for unit in ("d", "h", "m", "s"):  # days, not weeks: "31d" reads better than "4w3d"
        count, seconds = divmod(seconds, _UNITS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
