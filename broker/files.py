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

Two backends offer the same interface (`ContentStore`): this folder
(`FileStore`, the default with SQLite) and the database (`broker.dbfiles`,
the default with PostgreSQL, shared by every broker of the database).
Garbage collection (`collect`) removes content nothing refers to any more;
the rule is the store's (`SqlStore.unreferenced_contents`, docs/broker.md).

The rules for names, sizes and digests, and the refusals, are shared with the
clients: pilot.api.files.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Protocol, TypeVar

from pilot.api.files import (
    CHUNK_SIZE,
    BadFileHeader,
    ChecksumMismatch,
    FileRefused,
    FileTooLarge,
    GiB,
    MissingFile,
    SizeMismatch,
    check_sandbox_name,
    check_sha256,
)

T = TypeVar("T")

DEFAULT_MAX_FILE_SIZE = 2 * GiB
DEFAULT_MAX_JOB_BYTES = 8 * GiB
DEFAULT_MAX_JOB_FILES = 1000


@dataclass(frozen=True)
class StoredFile:
    """A file as the store holds it."""

    sha256: str
    size: int
    already_present: bool = False


class LostContent(MissingFile):
    """Content a job's record names is gone from (or damaged in) the broker's file store: the broker's
    fault, never the job's or its owner's (DATA_LOSS)."""

    def __init__(self, name: str, sha256: str, why: str = "is no longer in the broker's file store") -> None:
        FileRefused.__init__(self, name, f"the content (sha256 {sha256}) {why}: the broker's fault, not the "
                                         "job's; fix: the broker's operator restores it (or the owner uploads "
                                         "the file again and resubmits)")
        self.sha256 = sha256


class Referee(Protocol):
    """What garbage collection asks the job store (broker.store.sql.SqlStore)."""

    def unreferenced_contents(self, sha256s: Sequence[str], cutoff) -> list[str]: ...

    def forget_contents(self, sha256s: Sequence[str]) -> None: ...


class ContentStore(Protocol):
    """What the services use of a file store (FileStore here, broker.dbfiles.DatabaseFileStore)."""

    kind: str
    max_file_size: int
    max_job_bytes: int
    max_job_files: int
    lock: threading.RLock

    def check_header(self, name: str, size: int, sha256: str, *, what: str = "file name") -> None: ...

    def receive(self, name: str, size: int, sha256: str, *, what: str = "file name") -> Incoming: ...

    def open(self, sha256: str, name: str = "") -> BinaryIO: ...

    def size_of(self, sha256: str) -> int | None: ...

    def free(self, sha256: str) -> bool: ...

    def usage(self) -> tuple[int, int]: ...

    def collect(self, referee, cutoff, limit: int = 100) -> list[tuple[str, int]]: ...


# ------------------------------------------------------------------ the store

class FileStore:
    """Content-addressed files under ROOT, with size limits.

    max_file_size bounds one file; max_job_bytes bounds all inputs of one
    job, and all outputs of one job, each (the broker checks the sums);
    max_job_files bounds the number of outputs of one job. REFERENCED(sha256)
    says whether the broker's records still refer to some content (`free`
    keeps it then).
    """

    kind = "local"
    #: The staged file becomes the stored one: durable before it is renamed into place.
    fsync_staged = True

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

    def _place(self, incoming: Incoming, record: Callable[[StoredFile], T]) -> T:
        """Make INCOMING's verified temporary file part of the store and call RECORD, under the lock."""
        final = self.path(incoming.sha256)
        with self.lock:
            present = os.path.exists(final)
            if present:
                os.unlink(incoming._tmp_path)
            else:
                directory = os.path.dirname(final)
                os.makedirs(directory, mode=0o755, exist_ok=True)
                os.chmod(incoming._tmp_path, stat.S_IRUSR | stat.S_IRGRP)  # immutable by convention
                os.replace(incoming._tmp_path, final)
                _fsync_directory(directory)
            try:
                return record(StoredFile(incoming.sha256, incoming.size, present))
            except BaseException:
                if not present:
                    try:
                        self.free(incoming.sha256)
                    except Exception:  # noqa: BLE001 (the record's error matters; an orphan file is harmless)
                        pass
                raise

    def temp_files(self) -> list[str]:
        return os.listdir(self._tmp)

    def collect(self, referee: Referee, cutoff, limit: int = 500) -> list[tuple[str, int]]:
        """Remove the files older than CUTOFF (a datetime) that REFEREE says nothing refers to (asked LIMIT
        at a time); return (sha256, size) of each. Under the lock, which a submission holds from its input
        check to its commit: a submission either sees the content present and its jobs keep it, or not
        at all."""
        removed: list[tuple[str, int]] = []
        batch: dict[str, int] = {}
        for sha, size in self._older_than(cutoff.timestamp()):
            batch[sha] = size
            if len(batch) >= limit:
                removed += self._remove_unreferenced(referee, batch, cutoff)
                batch = {}
        if batch:
            removed += self._remove_unreferenced(referee, batch, cutoff)
        return removed

    def _older_than(self, oldest: float):
        for directory, _dirs, files in os.walk(self.root):
            if directory == self._tmp:
                continue
            for entry in files:
                sha = os.path.basename(directory) + entry
                try:
                    info = os.stat(os.path.join(directory, entry))
                except FileNotFoundError:
                    continue
                if info.st_mtime < oldest and len(sha) == 64:
                    yield sha, info.st_size

    def _remove_unreferenced(self, referee: Referee, candidates: dict[str, int], cutoff) -> list[tuple[str, int]]:
        removed = []
        with self.lock:
            garbage = referee.unreferenced_contents(sorted(candidates), cutoff)
            if garbage:
                referee.forget_contents(garbage)   # first: a crash between leaves a file nobody may name
            for sha in garbage:
                try:
                    os.unlink(self.path(sha))
                except FileNotFoundError:
                    continue
                removed.append((sha, candidates[sha]))
        return removed


class Incoming:
    """One file being received: write() the chunks, then finish() or abort().

    Used as a context manager, an exception (or a missing finish) aborts and
    removes the temporary file.
    """

    def __init__(self, store, name: str, size: int, sha256: str) -> None:
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
        if self.store.fsync_staged:
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        return self.store._place(self, record)

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


__all__ = ["DEFAULT_MAX_FILE_SIZE", "DEFAULT_MAX_JOB_BYTES", "DEFAULT_MAX_JOB_FILES", "ContentStore", "FileStore",
           "Incoming", "LostContent", "StoredFile"]
