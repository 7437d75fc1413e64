"""The sandbox store in the database: content shared by every broker of one PostgreSQL database.

Several brokers on one database each keep their own state folder, so the
local store (broker.files.FileStore) cannot serve a job submitted through
one broker to a wrapper connected to another. This store keeps the content
in two tables (broker.store.schema): `contents` (sha256, size, created) and
`chunks` (sha256, seq, the chunk's own SHA-256, at most 1 MiB of data).

Writing: an upload is staged in a private temporary file (hashed on the way,
exactly as the local store does, so a refused or broken upload never touches
the database); once size and digest match, ONE transaction inserts the
content (ON CONFLICT DO NOTHING: identical content is stored once), locks its
row (shared) and writes the row that names it (the record: an owner row, an
output row): both commit together or not at all.

Reading streams one chunk per read (never the whole file in memory); every
chunk's digest is checked before its bytes are served, and the content's
whole digest before its last chunk is: a damaged chunk is reported
(LostContent, DATA_LOSS), never served.

Removing (a replaced output's old content, garbage collection) locks the
content row for update and checks the references in the same transaction:
an upload of the same bytes through another broker either committed its row
first (seen, the content stays) or waits for the removal and stores the
content again. Submissions lock their inputs' content rows (shared) in their
own transaction (SqlStore.submit_batch): a collection never removes content
a queued job needs.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from broker.files import (
    DEFAULT_MAX_FILE_SIZE,
    DEFAULT_MAX_JOB_BYTES,
    DEFAULT_MAX_JOB_FILES,
    Incoming,
    LostContent,
    StoredFile,
)
from broker.store.schema import to_ms
from pilot.api.files import CHUNK_SIZE, FileTooLarge, MissingFile, check_sandbox_name, check_sha256

T = TypeVar("T")


class DatabaseFileStore:
    """Content-addressed files in the job store's database (a broker.store.sql.SqlStore), with the same
    size limits and interface as broker.files.FileStore. STAGING: a private folder for uploads in flight."""

    kind = "database"
    #: The staged file is copied into the database and then removed: no need to make it durable.
    fsync_staged = False

    def __init__(self, store, staging: str, *, max_file_size: int = DEFAULT_MAX_FILE_SIZE,
                 max_job_bytes: int = DEFAULT_MAX_JOB_BYTES, max_job_files: int = DEFAULT_MAX_JOB_FILES) -> None:
        self.store = store
        self.max_file_size = max_file_size
        self.max_job_bytes = max_job_bytes
        self.max_job_files = max_job_files
        #: Orders this process's own callers only; the database's row locks are what make concurrent
        #: brokers safe (see the module's text).
        self.lock = threading.RLock()
        self._tmp = os.path.abspath(staging)
        os.makedirs(self._tmp, mode=0o700, exist_ok=True)
        os.chmod(self._tmp, 0o700)
        for leftover in os.listdir(self._tmp):  # a crash mid-upload: never part of the store
            try:
                os.unlink(os.path.join(self._tmp, leftover))
            except OSError:
                pass
        store.contents_in_database = True

    # ------------------------------------------------------------ the interface
    def check_header(self, name: str, size: int, sha256: str, *, what: str = "file name") -> None:
        check_sandbox_name(name, what)
        check_sha256(sha256, name)
        if size > self.max_file_size:
            raise FileTooLarge(name, size, self.max_file_size, "broker's per-file limit")

    def receive(self, name: str, size: int, sha256: str, *, what: str = "file name") -> Incoming:
        self.check_header(name, size, sha256, what=what)
        return Incoming(self, name, size, sha256)

    def size_of(self, sha256: str) -> int | None:
        check_sha256(sha256)
        return self.store.content_size(sha256)

    def open(self, sha256: str, name: str = "") -> ChunkReader:
        check_sha256(sha256)
        size = self.store.content_size(sha256)
        if size is None:
            raise MissingFile(name, sha256)
        return ChunkReader(self.store, sha256, size, name)

    def free(self, sha256: str) -> bool:
        check_sha256(sha256)
        return self.store.free_content(sha256)

    def usage(self) -> tuple[int, int]:
        return self.store.content_usage()

    def temp_files(self) -> list[str]:
        return os.listdir(self._tmp)

    def collect(self, referee, cutoff, limit: int = 100) -> list[tuple[str, int]]:
        """Remove up to LIMIT unreferenced contents created before CUTOFF (REFEREE is the store itself)."""
        return self.store.collect_contents(cutoff, limit)

    def import_folder(self, root: str) -> tuple[int, int]:
        """Copy the content of a local file store folder (a broker of schema 5 on PostgreSQL kept its content
        there) into the database, each file checked against its name (the digest) first; content already
        in the database is skipped, so a second start copies nothing. Returns (files, bytes) copied."""
        copied = total = 0
        for directory, _dirs, files in os.walk(root):
            if os.path.basename(directory) == "tmp":
                continue
            for entry in files:
                sha = os.path.basename(directory) + entry
                path = os.path.join(directory, entry)
                if len(sha) != 64 or self.store.content_size(sha) is not None:
                    continue
                digest = hashlib.sha256()
                with open(path, "rb") as source:
                    while block := source.read(CHUNK_SIZE):
                        digest.update(block)
                if digest.hexdigest() != sha:
                    continue   # damaged in the folder: never imported (a download says it is lost)
                size = os.path.getsize(path)
                created = int(os.path.getmtime(path) * 1000)

                def chunks(path: str = path) -> Iterator[bytes]:
                    with open(path, "rb") as staged:
                        while block := staged.read(CHUNK_SIZE):
                            yield block
                self.store.transaction(lambda cur, sha=sha, size=size, chunks=chunks, created=created:
                                       self.store.put_content(cur, sha, size, chunks, created))
                copied += 1
                total += size
        return copied, total

    # ------------------------------------------------------------ writing
    def _place(self, incoming: Incoming, record: Callable[[StoredFile], T]) -> T:
        """One transaction: the content (unless present; its row locked shared to the commit) and RECORD."""
        path = incoming._tmp_path

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as staged:
                while block := staged.read(CHUNK_SIZE):
                    yield block

        def body(cur) -> T:
            now = to_ms(datetime.datetime.now(datetime.UTC))
            present = self.store.put_content(cur, incoming.sha256, incoming.size, chunks, now)
            return record(StoredFile(incoming.sha256, incoming.size, present))
        try:
            return self.store.transaction(body)
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


class ChunkReader:
    """A stored content, read chunk by chunk from the database, each chunk checked before it is served."""

    def __init__(self, store, sha256: str, size: int, name: str) -> None:
        self.store, self.sha256, self.size, self.name = store, sha256, size, name
        self._seq = 0
        self._sent = 0
        self._digest = hashlib.sha256()

    def read(self, _size: int = -1) -> bytes:
        """The next chunk (at most 1 MiB, whatever the size asked), b'' at the end."""
        if self._sent >= self.size:
            return b""
        found = self.store.content_chunk(self.sha256, self._seq)
        if found is None:
            raise LostContent(self.name, self.sha256, f"lacks chunk {self._seq} in the broker's database "
                                                      f"(after {self._sent} of {self.size} bytes)")
        digest, data = found
        if hashlib.sha256(data).digest() != digest or not data or self._sent + len(data) > self.size:
            raise LostContent(self.name, self.sha256, f"is damaged in the broker's database (chunk {self._seq} "
                                                      "fails its checksum); it is not served")
        self._digest.update(data)
        if self._sent + len(data) == self.size and self._digest.hexdigest() != self.sha256:
            raise LostContent(self.name, self.sha256, "is damaged in the broker's database (the whole content "
                                                      "fails its checksum); it is not served")
        self._seq += 1
        self._sent += len(data)
        return data

    def close(self) -> None:
        pass

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["ChunkReader", "DatabaseFileStore"]
