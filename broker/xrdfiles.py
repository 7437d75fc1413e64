"""The sandbox store on an XRootD server: content shared by every broker of one PostgreSQL database.

`--file-store xrootd://HOST:PORT/PATH` (or `root://...`, XRootD's own scheme).
The bytes live on the XRootD server as PATH/<sha256>; the catalogue (sha256,
size, created) is the job store's `contents` table, exactly as for the
database store (broker.dbfiles), and so are the row locks that keep garbage
collection, frees, uploads and submissions of several brokers apart: a
submission locks its inputs' rows (shared), a collection or free locks a row
for update and removes the object *while* it holds that lock, and an upload
renames its object into place only after it inserted the row (which nobody
else can lock before the commit). No `chunks` rows are written.

Writing: the upload is staged in a private local file (hashed on the way by
broker.files.Incoming, so a refused or broken upload never reaches the
server); once size and digest match, one transaction inserts the catalogue
row (ON CONFLICT DO NOTHING: content already there is not sent again), and
if the row is new, copies the staged file to PATH/tmp/<sha256>.<random> in
chunks of 1 MiB and renames it to PATH/<sha256> (atomic on the server's
file system: a reader never sees half an object), then writes the record
(an owner row, an output row). An error before the commit removes the object
again (still under the row's lock). Temporary objects of uploads a crash
interrupted are removed at start once older than STALE_UPLOAD. An object
renamed into place whose commit then fails (the connection breaks at that
instant) has no row and stays on the server: nothing names it, nothing
collects it.

Reading streams one chunk per read. The object's size is checked against the
catalogue when it is opened, and the whole digest before the last chunk is
served: a truncated, extended or altered object is reported (LostContent,
DATA_LOSS: the broker's fault) and its last chunk never served (the clients
check the digest of what they received as well: pilot.api.files). Unlike the
database store there are no per-chunk digests, so the chunks before the last
of a damaged object do go out before the damage is noticed.

Security: the server must authenticate its clients. The broker authenticates
with XRootD's `sss` (simple shared secret) protocol: the keytab (made by
`xrdsssadmin`) must be a regular file of the broker's OS user, mode 0600, and
the server must require `sss` (`sec.protbind * only sss`); docs/broker.md
gives the server's configuration. The keytab's *path* is handed to the XRootD
client library through its environment variables (XrdSecPROTOCOL,
XrdSecSSSKT: that is how the library takes it; the key itself stays in the
file).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

from broker.files import (
    DEFAULT_MAX_FILE_SIZE,
    DEFAULT_MAX_JOB_BYTES,
    DEFAULT_MAX_JOB_FILES,
    Incoming,
    LostContent,
    StoredFile,
)
from broker.store.base import StoreError, StoreUnavailable
from broker.store.schema import to_ms
from pilot.api.files import CHUNK_SIZE, FileTooLarge, MissingFile, check_sandbox_name, check_sha256

T = TypeVar("T")

SCHEMES = ("xrootd", "root")
#: Seconds one XRootD request may take before it fails (the client library's own default is 30 minutes).
TIMEOUT = 60
#: A temporary object this old is a crashed upload's (the largest upload takes minutes), removed at start.
STALE_UPLOAD = datetime.timedelta(hours=6)


class XRootDSettingsError(StoreError):
    """The xrootd file store's URL or keytab is unusable (the broker refuses to start)."""


class XRootDUnavailable(StoreUnavailable):
    """The XRootD server cannot be reached or refused a request (UNAVAILABLE: retry later)."""

    def __init__(self, what: str, detail: str) -> None:
        StoreError.__init__(self, f"the broker's XRootD file store is unavailable ({what}: {detail}); fix: retry "
                                  "later (the broker's operator sees the cause in its log)")


def parse_url(url: str, state_dir: str) -> tuple[str, str, str]:
    """(server URL root://HOST:PORT, base path, keytab path) of a --file-store xrootd://HOST:PORT/PATH[?keytab=F]
    (default keytab: STATE_DIR/xrootd.keytab)."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname or not parts.path.strip("/"):
        raise XRootDSettingsError(f"file store {url!r} is not an XRootD URL; fix: xrootd://HOST:PORT/PATH "
                                  "(PATH: the folder of the broker's content on the server)")
    if parts.username or parts.password:
        raise XRootDSettingsError("the xrootd file store URL holds a user or password; fix: remove it (the broker "
                                  "authenticates with its sss keytab, ?keytab=FILE)")
    try:
        port = parts.port or 1094
    except ValueError:
        raise XRootDSettingsError(f"file store {url!r} has a bad port; fix: xrootd://HOST:PORT/PATH") from None
    query = parse_qs(parts.query)
    unknown = sorted(set(query) - {"keytab"})
    if unknown:
        raise XRootDSettingsError(f"file store URL option(s) {', '.join(unknown)} unknown; fix: only ?keytab=FILE")
    keytab = query.get("keytab", [os.path.join(state_dir, "xrootd.keytab")])[-1]
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"root://{host}:{port}", "/" + parts.path.strip("/"), os.path.abspath(keytab)


def check_keytab(path: str) -> None:
    """The keytab must be a regular file of this process's user that nobody else may read or write."""
    fix = (f"fix: create it with `xrdsssadmin -k NAME -u USER -g GROUP add {path}` (the server's keytab holds the "
           f"same key), owned by the broker's user, chmod 600")
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise XRootDSettingsError(f"the XRootD keytab {path} cannot be read ({exc.strerror}); {fix}") from None
    if not stat.S_ISREG(info.st_mode):
        raise XRootDSettingsError(f"the XRootD keytab {path} is not a regular file; {fix}")
    if info.st_uid != os.geteuid():
        raise XRootDSettingsError(f"the XRootD keytab {path} belongs to uid {info.st_uid}, not to the broker's "
                                  f"user (uid {os.geteuid()}); {fix}")
    if info.st_mode & 0o077:
        raise XRootDSettingsError(f"the XRootD keytab {path} is readable or writable by others (mode "
                                  f"{stat.S_IMODE(info.st_mode):o}): whoever reads it reads and replaces every "
                                  f"job's content; {fix}")


_env_lock = threading.Lock()


def use_keytab(path: str) -> None:
    """Make the XRootD client library of this process authenticate with sss and PATH (and nothing else)."""
    with _env_lock:
        current = os.environ.get("XrdSecSSSKT")
        if current not in (None, path):
            raise XRootDSettingsError(f"this process already uses the XRootD keytab {current}; fix: one keytab per "
                                      "broker process (the XRootD client takes it from the process environment)")
        os.environ["XrdSecPROTOCOL"] = "sss"
        os.environ["XrdSecSSSKT"] = path
        # Fail fast when the server is down (the library's default waits out 5 connection windows of
        # 120 s): the caller gets UNAVAILABLE and retries, instead of an RPC hanging for minutes. Read
        # once, when the library first connects; an operator's own values win.
        os.environ.setdefault("XRD_CONNECTIONRETRY", "1")
        os.environ.setdefault("XRD_CONNECTIONWINDOW", "10")


class XRootDFileStore:
    """Content-addressed files on an XRootD server, catalogued in the job store's database (a PostgreSQL
    broker.store.sql.SqlStore); the same size limits and interface as broker.files.FileStore.
    STAGING: a private local folder for uploads in flight."""

    kind = "xrootd"
    #: The staged file is copied to the server and then removed: no need to make it durable here.
    fsync_staged = False

    def __init__(self, store, server: str, base: str, staging: str, keytab: str, *,
                 max_file_size: int = DEFAULT_MAX_FILE_SIZE, max_job_bytes: int = DEFAULT_MAX_JOB_BYTES,
                 max_job_files: int = DEFAULT_MAX_JOB_FILES) -> None:
        check_keytab(keytab)
        use_keytab(keytab)   # before the library is loaded: it reads some of its settings once
        from XRootD import client  # why: the optional `xrootd` extra, only for this store
        from XRootD.client.flags import MkDirFlags

        self._client = client
        self.store = store
        self.server, self.base = server, base
        self.max_file_size = max_file_size
        self.max_job_bytes = max_job_bytes
        self.max_job_files = max_job_files
        #: Orders this process's own callers only; the database's row locks make concurrent brokers safe.
        self.lock = threading.RLock()
        self._tmp = os.path.abspath(staging)
        os.makedirs(self._tmp, mode=0o700, exist_ok=True)
        os.chmod(self._tmp, 0o700)
        for leftover in os.listdir(self._tmp):  # a crash mid-upload: never part of the store
            try:
                os.unlink(os.path.join(self._tmp, leftover))
            except OSError:
                pass
        self.fs = client.FileSystem(self.server)
        status, _ = self.fs.mkdir(self._remote_tmp(), MkDirFlags.MAKEPATH, timeout=TIMEOUT)
        if not status.ok and not self.fs.stat(self._remote_tmp(), timeout=TIMEOUT)[0].ok:
            raise XRootDSettingsError(f"the XRootD server {self.server} refused the broker ({status.message.strip()}); "
                                      f"fix: start it, give it the same sss key as {keytab} "
                                      "(sec.protocol sss -s SERVER_KEYTAB; sec.protbind * only sss), and export "
                                      f"{self.base} writable")
        self._remove_stale_uploads()
        store.contents_in_database = True

    def _remove_stale_uploads(self) -> None:
        """Temporary objects of uploads interrupted by a crash (of any broker of the server) are never part
        of the store; those older than STALE_UPLOAD go (younger ones may be another broker's upload in
        flight)."""
        from XRootD.client.flags import DirListFlags
        status, listing = self.fs.dirlist(self._remote_tmp(), DirListFlags.STAT, timeout=TIMEOUT)
        if not status.ok or listing is None:
            return
        oldest = time.time() - STALE_UPLOAD.total_seconds()
        for entry in listing:
            if entry.statinfo is not None and entry.statinfo.modtime < oldest:
                self.fs.rm(self._remote_tmp(entry.name), timeout=TIMEOUT)

    @classmethod
    def from_url(cls, store, url: str, state_dir: str, staging: str, **limits) -> XRootDFileStore:
        server, base, keytab = parse_url(url, state_dir)
        return cls(store, server, base, staging, keytab, **limits)

    # ------------------------------------------------------------ paths
    def _remote(self, sha256: str) -> str:
        return f"{self.base}/{sha256}"

    def _remote_tmp(self, name: str = "") -> str:
        return f"{self.base}/tmp/{name}" if name else f"{self.base}/tmp"

    def _url(self, path: str) -> str:
        return f"{self.server}/{path}"

    def _check(self, status, what: str) -> None:
        if not status.ok:
            raise XRootDUnavailable(what, status.message.strip())

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

    def open(self, sha256: str, name: str = "") -> ObjectReader:
        check_sha256(sha256)
        size = self.store.content_size(sha256)
        if size is None:
            raise MissingFile(name, sha256)
        handle = self._client.File()
        status, _ = handle.open(self._url(self._remote(sha256)), timeout=TIMEOUT)
        if not status.ok:
            if _not_found(status):
                raise LostContent(name, sha256, "is no longer on the broker's XRootD server")
            raise XRootDUnavailable(f"opening {self._remote(sha256)}", status.message.strip())
        status, info = handle.stat(timeout=TIMEOUT)
        if not status.ok:
            handle.close(timeout=TIMEOUT)
            raise XRootDUnavailable(f"stat of {self._remote(sha256)}", status.message.strip())
        if info.size != size:
            handle.close(timeout=TIMEOUT)
            raise LostContent(name, sha256, f"is damaged on the broker's XRootD server ({info.size} bytes instead "
                                            f"of {size}); it is not served")
        return ObjectReader(handle, sha256, size, name)

    def free(self, sha256: str) -> bool:
        check_sha256(sha256)
        return self.store.free_content(sha256, remove=self._remove)

    def usage(self) -> tuple[int, int]:
        return self.store.content_usage()

    def temp_files(self) -> list[str]:
        return os.listdir(self._tmp)

    def remote_temp_files(self) -> list[str]:
        status, listing = self.fs.dirlist(self._remote_tmp(), timeout=TIMEOUT)
        self._check(status, f"listing {self._remote_tmp()}")
        return [entry.name for entry in listing]

    def collect(self, referee, cutoff, limit: int = 100) -> list[tuple[str, int]]:
        """Remove up to LIMIT unreferenced contents created before CUTOFF (REFEREE is the store itself): the
        database decides (under its row locks), this store deletes the objects before the rows go."""
        return self.store.collect_contents(cutoff, limit, remove=self._remove)

    def _remove(self, sha256s: Sequence[str]) -> list[str]:
        """Delete the objects of SHA256S (their catalogue rows locked for update by the caller); the ones
        deleted or already absent. One that cannot be deleted keeps its row (a later pass tries again)."""
        gone = []
        for sha in sha256s:
            status, _ = self.fs.rm(self._remote(sha), timeout=TIMEOUT)
            if status.ok or _not_found(status):
                gone.append(sha)
            elif not status.errno:   # the server is unreachable, not refusing this one: stop this batch
                break
        return gone

    # ------------------------------------------------------------ writing
    def _place(self, incoming: Incoming, record: Callable[[StoredFile], T]) -> T:
        """One transaction: the catalogue row (the object sent and renamed into place unless present; the row
        locked to the commit) and RECORD."""
        def body(cur) -> T:
            now = to_ms(datetime.datetime.now(datetime.UTC))
            present = self.store.put_content(cur, incoming.sha256, incoming.size, lambda: iter(()), now)
            if present:
                return record(StoredFile(incoming.sha256, incoming.size, True))
            # Our row is new and uncommitted: no other broker can lock it, so nobody removes the object
            # between our rename and our commit, and on an error we remove it ourselves before the rollback.
            final = self._remote(incoming.sha256)
            try:
                self._send(incoming._tmp_path, incoming.sha256, final)
                return record(StoredFile(incoming.sha256, incoming.size, False))
            except BaseException:
                self.fs.rm(final, timeout=TIMEOUT)
                raise
        try:
            return self.store.transaction(body)
        finally:
            try:
                os.unlink(incoming._tmp_path)
            except FileNotFoundError:
                pass

    def _send(self, local: str, sha256: str, final: str) -> None:
        """Copy LOCAL to the server under a temporary name, then rename it to FINAL (atomic there)."""
        from XRootD.client.flags import OpenFlags
        temporary = self._remote_tmp(f"{sha256[:16]}.{uuid.uuid4().hex}")
        handle = self._client.File()
        status, _ = handle.open(self._url(temporary), OpenFlags.NEW | OpenFlags.MAKEPATH, timeout=TIMEOUT)
        self._check(status, f"creating {temporary}")
        try:
            with open(local, "rb") as staged:
                offset = 0
                while block := staged.read(CHUNK_SIZE):
                    status, _ = handle.write(block, offset, timeout=TIMEOUT)
                    self._check(status, f"writing {temporary}")
                    offset += len(block)
            status, _ = handle.close(timeout=TIMEOUT)
            self._check(status, f"closing {temporary}")
            status, _ = self.fs.mv(temporary, final, timeout=TIMEOUT)
            self._check(status, f"renaming {temporary} to {final}")
        except BaseException:
            if handle.is_open():
                handle.close(timeout=TIMEOUT)
            self.fs.rm(temporary, timeout=TIMEOUT)
            raise


def _not_found(status) -> bool:
    """Whether an XRootD status says the file does not exist (kXR_NotFound)."""
    return status.errno == 3011 or "No such file" in status.message


class ObjectReader:
    """A stored object, read chunk by chunk from the XRootD server; the whole digest is checked before
    the last chunk is served."""

    def __init__(self, handle, sha256: str, size: int, name: str) -> None:
        self._handle, self.sha256, self.size, self.name = handle, sha256, size, name
        self._sent = 0
        self._digest = hashlib.sha256()

    def read(self, _size: int = -1) -> bytes:
        """The next chunk (at most 1 MiB, whatever the size asked), b'' at the end."""
        if self._sent >= self.size:
            return b""
        want = min(CHUNK_SIZE, self.size - self._sent)
        status, data = self._handle.read(self._sent, want, timeout=TIMEOUT)
        if not status.ok:
            raise XRootDUnavailable(f"reading {self.sha256}", status.message.strip())
        if len(data) != want:
            raise LostContent(self.name, self.sha256, f"is damaged on the broker's XRootD server (it ends after "
                                                      f"{self._sent + len(data)} of {self.size} bytes); it is not "
                                                      "served")
        self._digest.update(data)
        if self._sent + len(data) == self.size and self._digest.hexdigest() != self.sha256:
            raise LostContent(self.name, self.sha256, "is damaged on the broker's XRootD server (the content "
                                                      "fails its checksum); it is not served")
        self._sent += len(data)
        return data

    def close(self) -> None:
        if self._handle.is_open():
            self._handle.close(timeout=TIMEOUT)

    def __enter__(self) -> ObjectReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["ObjectReader", "XRootDFileStore", "XRootDSettingsError", "XRootDUnavailable", "parse_url"]
