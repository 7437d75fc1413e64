"""Writing downloaded outputs under a directory without ever leaving it or overwriting anything.

A job names its outputs, so the names are the job's choice, i.e. possibly
hostile: `.bashrc`, `.ssh/authorized_keys`, `clash` next to `clash/inner`,
names with escape sequences. `OutputDirectory` writes each output below DIR
so that:

  * every name is checked again here, with the broker's rules
    (`check_sandbox_name`: relative, no '..', no control characters or
    bidirectional overrides), whatever the broker let through;
  * every folder on the way is opened relative to the descriptor of its
    parent with O_NOFOLLOW | O_DIRECTORY (openat-style), so a symbolic link
    planted in DIR (DIR/.ssh -> /root/.ssh) is refused, never followed;
  * the content goes to a fresh temporary file (O_CREAT | O_EXCL |
    O_NOFOLLOW) in the final folder, is verified (size, sha256), and only
    then gets its name: with `os.link` (linkat), which fails if the name
    exists in any form, so an existing file is never replaced; with
    force=True, with `os.rename` (renameat), and only over a regular file:
    rename replaces a directory entry, it never writes through a link.

A failure concerns one output (`OutputRefused`); the caller goes on with
the others.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Iterable

from pilot.api.files import BadFileHeader, ChecksumMismatch, FileRefused, SizeMismatch, check_sandbox_name, shown

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FIX_DOWNLOAD = "the download was discarded; fix: download it again (if it persists, the broker's copy is damaged)"


class OutputRefused(FileRefused):
    """One output could not be written safely. Attributes: name, detail."""

    exit_code = 1

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(name, detail)


class OutputDirectory:
    """DIR, opened once (created if missing); outputs are written relative to its descriptor.

    DIR itself is the caller's choice and may be a symbolic link they made; nothing below it may be.
    """

    def __init__(self, path: str | os.PathLike, *, force: bool = False) -> None:
        self.path = os.fspath(path)
        self.force = force
        os.makedirs(self.path, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> OutputDirectory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, name: str, chunks: Iterable[bytes], size: int, sha256: str) -> str:
        """Write output NAME from CHUNKS (SIZE bytes hashing to SHA256) below DIR; return its path.

        Raises OutputRefused (the name, an existing file, a link or a file in the way),
        SizeMismatch or ChecksumMismatch (nothing is left behind)."""
        try:
            check_sandbox_name(name, "output name")
        except BadFileHeader as exc:
            raise OutputRefused(name, f"{exc.detail}; it was not written") from None
        parts = name.split("/")
        parent = self._folder(name, parts[:-1])
        try:
            self._place(parent, name, parts[-1], chunks, size, sha256)
        finally:
            if parent != self.fd:
                os.close(parent)
        return os.path.join(self.path, name)

    # ------------------------------------------------------------ the pieces

    def _folder(self, name: str, parts: list[str]) -> int:
        """A descriptor of DIR/PARTS, creating missing folders, following no link."""
        fd = self.fd
        for depth, part in enumerate(parts):
            where = "/".join(parts[:depth + 1])
            try:
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    try:
                        os.mkdir(part, 0o777, dir_fd=fd)  # the umask decides, as for any new folder
                    except FileExistsError:
                        pass  # made meanwhile: opened (and checked) below
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EEXIST):
                    raise OutputRefused(name, f"cannot open the folder {shown(where)!r} in {self.path}: "
                                              f"{exc.strerror}") from None
                raise OutputRefused(name, self._in_the_way(fd, part, where)) from None
            finally:
                if fd != self.fd and fd >= 0:
                    os.close(fd)
                fd = -1
            fd = child
        return fd

    def _in_the_way(self, dir_fd: int, part: str, where: str) -> str:
        try:
            mode = os.stat(part, dir_fd=dir_fd, follow_symlinks=False).st_mode
        except OSError:
            mode = 0
        if stat.S_ISLNK(mode):
            return (f"{shown(where)!r} in {self.path} is a symbolic link, which is never followed; it was not "
                    "written; fix: remove the link, or download into an empty folder")
        return (f"{shown(where)!r} in {self.path} is a file, not a folder (another output, or a file that was "
                "there), so it cannot hold this output; fix: download this output into another folder "
                "(--name NAME with another DIR)")

    def _place(self, parent: int, name: str, leaf: str, chunks: Iterable[bytes], size: int, sha256: str) -> None:
        # A short random name: LEAF may already be 255 bytes long.
        tmp = f".splitpilot-{secrets.token_hex(8)}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
                     dir_fd=parent)
        try:
            try:
                _write_verified(fd, chunks, size, sha256, name)
                os.fsync(fd)
            finally:
                os.close(fd)
            if self.force:
                self._replace(parent, name, tmp, leaf)
            else:
                self._link(parent, name, tmp, leaf)
        finally:
            try:
                os.unlink(tmp, dir_fd=parent)
            except FileNotFoundError:
                pass  # renamed into place

    def _link(self, parent: int, name: str, tmp: str, leaf: str) -> None:
        try:
            os.link(tmp, leaf, src_dir_fd=parent, dst_dir_fd=parent, follow_symlinks=False)
        except FileExistsError:
            raise OutputRefused(name, f"{shown(os.path.join(self.path, name))!r} exists and was left as it is; fix: "
                                      "add --force to replace existing files, or download into an empty "
                                      "folder") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            self._copy_exclusive(parent, name, tmp, leaf)  # a file system without hard links

    def _copy_exclusive(self, parent: int, name: str, tmp: str, leaf: str) -> None:
        try:
            out = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
                          dir_fd=parent)
        except FileExistsError:
            raise OutputRefused(name, f"{shown(os.path.join(self.path, name))!r} exists and was left as it is; fix: "
                                      "add --force to replace existing files") from None
        source = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            while block := os.read(source, 1 << 20):
                view = memoryview(block)
                while view:
                    view = view[os.write(out, view):]
            os.fsync(out)
        finally:
            os.close(source)
            os.close(out)

    def _replace(self, parent: int, name: str, tmp: str, leaf: str) -> None:
        try:
            mode = os.stat(leaf, dir_fd=parent, follow_symlinks=False).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None and not stat.S_ISREG(mode):
            kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
            raise OutputRefused(name, f"{shown(os.path.join(self.path, name))!r} is {kind}; --force replaces "
                                      "regular files only and never writes through a link; fix: remove it, or "
                                      "download into an empty folder")
        try:
            # renameat replaces the directory entry: a link swapped in meanwhile is replaced, not written through.
            os.rename(tmp, leaf, src_dir_fd=parent, dst_dir_fd=parent)
        except OSError as exc:
            raise OutputRefused(name, f"cannot replace {shown(os.path.join(self.path, name))!r}: {exc.strerror}"
                                ) from None


def _write_verified(fd: int, chunks: Iterable[bytes], size: int, sha256: str, name: str) -> None:
    digest = hashlib.sha256()
    received = 0
    for block in chunks:
        received += len(block)
        if received > size:
            raise SizeMismatch(name, size, received, _FIX_DOWNLOAD)
        digest.update(block)
        view = memoryview(block)
        while view:
            view = view[os.write(fd, view):]
    if received != size:
        raise SizeMismatch(name, size, received, _FIX_DOWNLOAD)
    if digest.hexdigest() != sha256:
        raise ChecksumMismatch(name, sha256, digest.hexdigest(), _FIX_DOWNLOAD)


__all__ = ["OutputDirectory", "OutputRefused"]
