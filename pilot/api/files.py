"""Files as they cross the broker's API: sandbox names, sizes, digests, and the refusals.

Shared by the clients (pilot.api.client, what a node and a user run) and the
broker (broker.files, its content-addressed store): the rules a name must
follow are checked on both sides of the network with the same code.

Names (an input's name in the sandbox, an output's path) are relative paths
without "..", control characters or bidirectional overrides:
`check_sandbox_name` enforces it wherever a name crosses the network, and
`shown` escapes a name for messages and terminals.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable

from pilot.errors import SplitpilotError, UsageError

#: Largest data chunk in a file stream (the proto's rule), and what we send.
CHUNK_SIZE = 1 << 20

MiB = 1 << 20
GiB = 1 << 30

#: A transfer's progress: called as on_progress(done_bytes, total_bytes, name) with DONE_BYTES 0 when
#: a file's transfer starts, after each chunk, and equal to TOTAL_BYTES when it is whole (once, at
#: once, for a file already on the broker). It only watches: it changes no result and no message sent.
#: Upload callbacks may run in gRPC's thread that sends the request stream.
OnProgress = Callable[[int, int, str], None]

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_MAX_NAME = 1024
_MAX_COMPONENT = 255

#: Characters no name may hold: C0 controls, DEL, C1 controls, and the Unicode bidirectional
#: embeddings/overrides/isolates, which make a name display as something else ("Trojan Source").
_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


# ------------------------------------------------------------------ errors

class FileRefused(SplitpilotError):
    """A file (or its header) is not acceptable. Attributes: name, detail."""

    exit_code = 2

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"file {name!r}: {detail}" if name else detail)
        self.name = name
        self.detail = detail


class BadFileHeader(FileRefused):
    """The header is missing, or its name, size or digest is malformed."""


class FileTooLarge(FileRefused):
    """Over a size limit. Attributes: size (declared or received), limit, what (which limit)."""

    def __init__(self, name: str, size: int, limit: int, what: str) -> None:
        super().__init__(name, f"{format_size(size)} exceeds the {what} of {format_size(limit)}; "
                               "fix: split the data into smaller files, or ask the broker's operator to raise "
                               "the limit (splitpilot broker serve --max-file-size/--max-job-size)")
        self.size = size
        self.limit = limit
        self.what = what


class ChecksumMismatch(FileRefused):
    """The content does not hash to the declared digest. Attributes: expected, actual."""

    def __init__(self, name: str, expected: str, actual: str,
                 fix: str = "nothing was stored; fix: the file changed or was corrupted in transit: upload it again",
                 ) -> None:
        super().__init__(name, f"content has sha256 {actual}, but {expected} was declared; {fix}")
        self.expected = expected
        self.actual = actual


class SizeMismatch(FileRefused):
    """Fewer or more bytes than the header declared. Attributes: declared, received."""

    def __init__(self, name: str, declared: int, received: int,
                 fix: str = "nothing was stored; fix: upload the file again (did it change while being sent?)",
                 ) -> None:
        super().__init__(name, f"{declared} bytes were declared but {received} "
                               f"{'arrived' if received < declared else 'were sent (at least)'}; {fix}")
        self.declared = declared
        self.received = received


class MissingFile(FileRefused):
    """The store holds no content with this digest. Attributes: sha256."""

    exit_code = 1

    def __init__(self, name: str, sha256: str) -> None:
        super().__init__(name, f"no content with sha256 {sha256} in the broker's file store; "
                               "fix: upload it first")
        self.sha256 = sha256


# ------------------------------------------------------------------ helpers

def shown(name: str, *, backslash: bool = True) -> str:
    """NAME safe to print: every character that is not printable (controls, escape sequences,
    bidirectional overrides, ...) as a Python-style escape, and the backslash itself too (so that
    the escape is unambiguous) unless BACKSLASH is false (for messages that quote names already
    escaped)."""
    if name.isprintable() and not (backslash and "\\" in name):
        return name
    out = []
    for char in name:
        if char == "\\" and backslash:
            out.append("\\\\")
        elif char.isprintable():
            out.append(char)
        elif ord(char) < 0x100:
            out.append(f"\\x{ord(char):02x}")
        elif ord(char) < 0x10000:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    return "".join(out)


def name_problem(name: str) -> str | None:
    """Why NAME may not be a name (a control character or a bidirectional override), or None."""
    found = _FORBIDDEN.search(name)
    if found is None:
        return None
    char = found.group()
    kind = "a bidirectional override" if char >= "\u202a" else "a control character"
    return f"contains {kind} (U+{ord(char):04X})"


def check_sandbox_name(name: str, what: str = "file name") -> str:
    """NAME if it is a clean relative path without '..', control characters or bidirectional
    overrides, else BadFileHeader (whose message shows the name escaped, never raw)."""
    problem = forbidden = None
    if not isinstance(name, str) or not name:
        problem = "is empty"
    elif len(name.encode("utf-8", "surrogatepass")) > _MAX_NAME:
        problem = f"is longer than {_MAX_NAME} bytes"
    elif (forbidden := name_problem(name)) is not None:
        problem = forbidden
    elif "\\" in name:
        problem = "contains a backslash"
    elif name.startswith("/"):
        problem = "is absolute"
    else:
        parts = name.split("/")
        if any(p in ("", ".", "..") for p in parts):
            problem = "has an empty, '.' or '..' component"
        elif any(len(p.encode("utf-8", "surrogatepass")) > _MAX_COMPONENT for p in parts):
            problem = f"has a component longer than {_MAX_COMPONENT} bytes"
    if problem:
        fix = ("rename it with printable characters only" if forbidden else
               "use a relative path inside the sandbox, like 'data/input.txt'")
        # FileRefused shows the name with repr(): escaped, never raw.
        raise BadFileHeader(name if isinstance(name, str) else "", f"{what} {problem}; fix: {fix}")
    return name


def check_sha256(value: str, name: str = "") -> str:
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise BadFileHeader(name, f"sha256 {value!r} is not 64 lower-case hexadecimal characters")
    return value


def sha256_of_file(path: str) -> tuple[str, int]:
    """(hex digest, size) of the file at PATH, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK_SIZE):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def format_size(size: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if size >= scale:
            value = size / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size} bytes"


_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)", re.IGNORECASE)


def parse_size(text: str, what: str = "size") -> int:
    """'500M', '2GiB', '1024' (bytes) -> bytes (binary units)."""
    match = _SIZE_RE.fullmatch(str(text).strip())
    if not match:
        raise UsageError(f"{what} {text!r} is not a size: write e.g. 1048576, 500M, 2G or 2GiB")
    number = float(match.group(1))
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[match.group(2).lower()]
    value = int(number * scale)
    if value <= 0:
        raise UsageError(f"{what} {text!r} must be positive")
    return value


_DOWNLOAD_FIX = "the download was discarded; fix: download it again (if it persists, the broker's copy is damaged)"


def copy_verified(source, dest_path: str, expected_sha256: str, expected_size: int, name: str = "") -> None:
    """Write the bytes of iterator SOURCE to DEST_PATH atomically, refusing a
    size or digest mismatch (used by clients receiving a stream)."""
    directory = os.path.dirname(os.path.abspath(dest_path)) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(dest_path)}.{os.getpid()}.part")
    digest = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as handle:
            for block in source:
                size += len(block)
                if size > expected_size:
                    raise SizeMismatch(name, expected_size, size, _DOWNLOAD_FIX)
                digest.update(block)
                handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
        if size != expected_size:
            raise SizeMismatch(name, expected_size, size, _DOWNLOAD_FIX)
        if digest.hexdigest() != expected_sha256:
            raise ChecksumMismatch(name, expected_sha256, digest.hexdigest(), _DOWNLOAD_FIX)
        os.replace(tmp, dest_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


__all__ = [
    "CHUNK_SIZE", "BadFileHeader", "ChecksumMismatch", "FileRefused", "FileTooLarge", "MissingFile", "OnProgress",
    "SizeMismatch",
    "check_sandbox_name", "check_sha256", "copy_verified", "format_size", "name_problem", "parse_size",
    "sha256_of_file", "shown",
]
