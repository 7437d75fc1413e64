"""The broker's content-addressed sandbox store: input and output files by SHA-256.

A file lives at ROOT/ab/cdef... (its hex digest split after two characters),
so identical content is stored once whoever uploads it. Who may *use* which
content is the store's business (file_owners: a user may only name content
they uploaded or their jobs produced); this module only holds the bytes.
Files arrive in chunks of at most 1 MiB after a header (name, size, sha256)
and are refused early, on the header alone, when they exceed the size
limits. The content is written to a temporary file under ROOT/tmp/, hashed
on the way, and only a file whose size and digest match its header is
fsync'd and renamed into place: a refused or interrupted upload leaves
nothing behind.

Content is freed when a replaced output leaves it unreferenced (`free`).
Placing content and recording the row that refers to it happen under one
process lock (`Incoming.commit`), and so does the reference check before a
free: a concurrent upload of the same bytes can never lose its file. (A
broker's state directory is locked to one broker process, so a process lock
is enough.)

Names (an input's name in the sandbox, an output's path) are relative paths
without "..", control characters or bidirectional overrides:
`check_sandbox_name` enforces it wherever a name crosses the network, and
`shown` escapes a name for messages and terminals.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pilot.errors import SplitpilotError

T = TypeVar("T")

#: Largest data chunk in a file stream (the proto's rule), and what we send.
CHUNK_SIZE = 1 << 20

MiB = 1 << 20
GiB = 1 << 30
DEFAULT_MAX_FILE_SIZE = 2 * GiB
DEFAULT_MAX_JOB_BYTES = 8 * GiB

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_MAX_NAME = 1024
_MAX_COMPONENT = 255
DEFAULT_MAX_JOB_FILES = 1000

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
    from pilot.errors import UsageError
    match = _SIZE_RE.fullmatch(str(text).strip())
    if not match:
        raise UsageError(f"{what} {text!r} is not a size: write e.g. 1048576, 500M, 2G or 2GiB")
    number = float(match.group(1))
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[match.group(2).lower()]
    value = int(number * scale)
    if value <= 0:
        raise UsageError(f"{what} {text!r} must be positive")
    return value


@dataclass(frozen=True)
class StoredFile:
    """A file as the store holds it."""

    sha256: str
    size: int
    already_present: bool = False


# ------------------------------------------------------------------ the store

class FileStore:
    """Content-addressed files under ROOT, with size limits.

    max_file_size bounds one file; max_job_bytes bounds all inputs of one
    job, and all outputs of one job, each (the broker checks the sums);
    max_job_files bounds the number of outputs of one job. REFERENCED(sha256)
    says whether the broker's records still refer to some content (`free`
    keeps it then).
    """

    def __init__(self, root: str, *, max_file_size: int = DEFAULT_MAX_FILE_SIZE,
                 max_job_bytes: int = DEFAULT_MAX_JOB_BYTES, max_job_files: int = DEFAULT_MAX_JOB_FILES,
                 referenced: Callable[[str], bool] | None = None) -> None:
        self.root = os.path.abspath(root)
        self.max_file_size = max_file_size
        self.max_job_bytes = max_job_bytes
        self.max_job_files = max_job_files
        self.referenced = referenced
        #: Held while content is placed and the row referring to it recorded, and while a free checks
        #: references and unlinks: the two never interleave.
        self.lock = threading.RLock()
        self._tmp = os.path.join(self.root, "tmp")
        os.makedirs(self._tmp, mode=0o700, exist_ok=True)
        # Left over by a crash mid-upload: never part of the store.
        for leftover in os.listdir(self._tmp):
            try:
                os.unlink(os.path.join(self._tmp, leftover))
            except OSError:
                pass

    def path(self, sha256: str) -> str:
        check_sha256(sha256)
        return os.path.join(self.root, sha256[:2], sha256[2:])

    def size_of(self, sha256: str) -> int | None:
        """Size of the stored content, or None when absent."""
        try:
            return os.stat(self.path(sha256)).st_size
        except FileNotFoundError:
            return None

    def check_header(self, name: str, size: int, sha256: str, *, what: str = "file name") -> None:
        """Refuse a header before any data is read (name, digest, size limit)."""
        check_sandbox_name(name, what)
        check_sha256(sha256, name)
        if size > self.max_file_size:
            raise FileTooLarge(name, size, self.max_file_size, "broker's per-file limit")

    def receive(self, name: str, size: int, sha256: str, *, what: str = "file name") -> Incoming:
        """Start receiving a file announced by its header (checked here)."""
        self.check_header(name, size, sha256, what=what)
        return Incoming(self, name, size, sha256)

    def open(self, sha256: str, name: str = ""):
        """A binary file object of the stored content (MissingFile if absent)."""
        try:
            return open(self.path(sha256), "rb")
        except FileNotFoundError:
            raise MissingFile(name, sha256) from None

    def free(self, sha256: str) -> bool:
        """Remove this content unless the records still refer to it; True if removed."""
        with self.lock:
            if self.referenced is None or self.referenced(sha256):
                return False
            try:
                os.unlink(self.path(sha256))
            except FileNotFoundError:
                return False
            return True

    def usage(self) -> tuple[int, int]:
        """(number of files, bytes) currently stored (walks the tree: for tests and tools)."""
        count = total = 0
        for directory, _dirs, files in os.walk(self.root):
            if directory == self._tmp:
                continue
            for entry in files:
                count += 1
                total += os.stat(os.path.join(directory, entry)).st_size
        return count, total

    def temp_files(self) -> list[str]:
        return os.listdir(self._tmp)


class Incoming:
    """One file being received: write() the chunks, then finish() or abort().

    Used as a context manager, an exception (or a missing finish) aborts and
    removes the temporary file.
    """

    def __init__(self, store: FileStore, name: str, size: int, sha256: str) -> None:
        self.store = store
        self.name = name
        self.size = size
        self.sha256 = sha256
        self.received = 0
        self._digest = hashlib.sha256()
        self._tmp_path = os.path.join(store._tmp, f"{sha256[:16]}.{os.getpid()}.{id(self):x}")
        self._fd: int | None = os.open(self._tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def write(self, data: bytes) -> None:
        if len(data) > CHUNK_SIZE:
            self.abort()
            raise BadFileHeader(self.name, f"a chunk of {len(data)} bytes exceeds the limit of {CHUNK_SIZE} "
                                           "bytes per chunk; fix: send at most 1 MiB per message")
        if self.received + len(data) > self.size:
            self.abort()
            raise SizeMismatch(self.name, self.size, self.received + len(data))
        self._digest.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self.received += len(data)

    def finish(self) -> StoredFile:
        """Verify size and digest; make the file part of the store (durably)."""
        return self.commit(lambda stored: stored)

    def commit(self, record: Callable[[StoredFile], T]) -> T:
        """Verify size and digest, then, under the store's lock, make the file part of the store and
        call RECORD(stored) to write the row that refers to it; RECORD's result is returned. If RECORD
        fails, content placed by this upload is removed again unless something else refers to it."""
        if self._fd is None:
            raise FileRefused(self.name, "upload was aborted")
        if self.received != self.size:
            self.abort()
            raise SizeMismatch(self.name, self.size, self.received)
        actual = self._digest.hexdigest()
        if actual != self.sha256:
            self.abort()
            raise ChecksumMismatch(self.name, self.sha256, actual)
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        final = self.store.path(self.sha256)
        with self.store.lock:
            present = os.path.exists(final)
            if present:
                os.unlink(self._tmp_path)
            else:
                directory = os.path.dirname(final)
                os.makedirs(directory, mode=0o755, exist_ok=True)
                os.chmod(self._tmp_path, stat.S_IRUSR | stat.S_IRGRP)  # immutable by convention
                os.replace(self._tmp_path, final)
                _fsync_directory(directory)
            try:
                return record(StoredFile(self.sha256, self.size, present))
            except BaseException:
                if not present:
                    try:
                        self.store.free(self.sha256)
                    except Exception:  # noqa: BLE001 (the record's error matters; an orphan file is harmless)
                        pass
                raise

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            try:
                os.unlink(self._tmp_path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> Incoming:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    "CHUNK_SIZE", "BadFileHeader", "ChecksumMismatch", "FileRefused", "FileStore", "FileTooLarge", "Incoming",
    "MissingFile", "SizeMismatch", "StoredFile", "check_sandbox_name", "check_sha256", "copy_verified",
    "format_size", "name_problem", "parse_size", "sha256_of_file", "shown",
]
