"""Finding and opening a job's outputs so that what is uploaded is what the payload left in its sandbox.

By the time outputs are collected every process of the payload is gone (the
wrapper kills its whole tree first), and everything here works from the
sandbox's descriptor, opened before the payload started: a payload cannot
redirect the wrapper by renaming the sandbox, and no path is opened twice.

- `find_outputs` walks the sandbox without following symbolic links and
  returns the names matching the job's patterns (glob rules: `*` stays
  within one folder and skips hidden names, `**` spans folders).
- `open_output` opens one name by walking from the sandbox descriptor, one
  component at a time with O_NOFOLLOW (O_DIRECTORY for folders), looks at
  the entry before opening it (a FIFO or a device is never opened, so it
  cannot hang the wrapper or trigger a driver), then checks the open
  descriptor: a regular file, the same inode it looked at, one link only
  (a hard link could point at a file outside the sandbox, e.g. in the
  agent's work dir), on the sandbox's own file system. Anything else is an
  `OutputRefused` naming why.

The wrapper uploads from the descriptor `open_output` returns.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import stat
from collections.abc import Iterable, Iterator

#: Never an output, whatever the patterns say: the job token, when the job asked for it on disk.
PRIVATE_NAMES = (".job-token*",)

_KINDS = {stat.S_IFLNK: "a symbolic link", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


class OutputRefused(Exception):
    """An output is not a plain file of the sandbox; the message says what it is instead."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name!r} {reason}")
        self.name, self.reason = name, reason


def _split(pattern: str) -> list[str] | None:
    """A pattern's components, or None for a pattern that could leave the sandbox."""
    if not pattern or pattern.startswith("/"):
        return None
    parts = [p for p in pattern.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return parts


def _match(pattern: list[str], name: list[str]) -> bool:
    """Glob matching of path components: `*`/`?`/`[...]` within one component, `**` across many."""
    if not pattern:
        return not name
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        for skip in range(len(name) + 1):
            if skip and name[skip - 1].startswith("."):
                break  # ** does not enter hidden folders, as glob
            if _match(rest, name[skip:]):
                return True
        return False
    if not name or (name[0].startswith(".") and not head.startswith(".")):
        return False
    return fnmatch.fnmatchcase(name[0], head) and _match(rest, name[1:])


def find_outputs(sandbox_fd: int, patterns: Iterable[str]) -> list[str]:
    """Sandbox-relative names of the non-folder entries matching PATTERNS, sorted, without following links.

    Entries that are not regular files (links, FIFOs, devices) are returned
    too: `open_output` refuses them by name, so the job says why.
    """
    split = [parts for parts in map(_split, patterns) if parts is not None]
    if not split:
        return []
    depth = max((len(parts) for parts in split if "**" not in parts), default=0)
    unbounded = any("**" in parts for parts in split)
    found = []
    for name in _entries(sandbox_fd, None if unbounded else depth):
        if any(fnmatch.fnmatchcase(name[-1], private) for private in PRIVATE_NAMES):
            continue
        if any(_match(parts, name) for parts in split):
            found.append("/".join(name))
    return sorted(found)


def _entries(sandbox_fd: int, depth: int | None) -> Iterator[list[str]]:
    """Every non-folder entry below the sandbox, as components; folders entered by descriptor with
    O_NOFOLLOW (a link to a folder is an entry, never entered), no deeper than DEPTH components."""
    stack: list[tuple[list[str], int]] = [([], os.dup(sandbox_fd))]
    while stack:
        prefix, fd = stack.pop()
        try:
            with os.scandir(fd) as listing:
                entries = list(listing)
            for entry in entries:
                if not entry.is_dir(follow_symlinks=False):
                    yield [*prefix, entry.name]
                elif depth is None or len(prefix) + 2 <= depth:
                    try:
                        inner = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                        dir_fd=fd)
                    except OSError:
                        continue  # replaced or unreadable: nothing of it is an output
                    stack.append(([*prefix, entry.name], inner))
        finally:
            os.close(fd)


def open_output(sandbox_fd: int, name: str) -> int:
    """A read-only descriptor of NAME inside the sandbox, checked; OutputRefused when it is not a plain file.

    FileNotFoundError when NAME does not exist.
    """
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise OutputRefused(name, "is not a plain name inside the sandbox")
    sandbox_dev = os.fstat(sandbox_fd).st_dev
    folder = os.dup(sandbox_fd)
    try:
        for part in parts[:-1]:
            try:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise OutputRefused(name, f"has a symbolic link or a file as folder {part!r} on its "
                                              "path") from None
                raise
            os.close(folder)
            folder = inner
        seen = os.stat(parts[-1], dir_fd=folder, follow_symlinks=False)
        kind = stat.S_IFMT(seen.st_mode)
        if kind != stat.S_IFREG:
            raise OutputRefused(name, f"is {_KINDS.get(kind, 'not a regular file')}, not a regular file")
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                     dir_fd=folder)
    finally:
        os.close(folder)
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode) or (opened.st_ino, opened.st_dev) != (seen.st_ino, seen.st_dev):
            raise OutputRefused(name, "was replaced while being opened")
        if opened.st_nlink != 1:
            raise OutputRefused(name, f"has {opened.st_nlink} hard links (it may be a file outside the sandbox)")
        if opened.st_dev != sandbox_dev:
            raise OutputRefused(name, "is on another file system than the sandbox")
    except BaseException:
        os.close(fd)
        raise
    return fd
