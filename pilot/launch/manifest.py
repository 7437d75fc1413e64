"""The software area's manifest: what a wrapper will execute, recorded when the area is built.

A payload must not be able to change what a later wrapper runs (the wrapper
of another job, holding another user's token). Where the area is mounted
read-only (namespace, bubblewrap, containers) nothing inside can write it;
without isolation (the process launcher) the payload runs as the agent's
own user and could. So, in every case:

- `write_manifest(area)` records, when the area is built, every file,
  folder and link below it: type, mode, size and sha256 (links: target), in
  `.splitpilot-manifest.json` at the area's top.
- `SoftwareGuard.verify(area)`, when the agent starts, compares the area's
  content with its manifest (every byte hashed), and keeps the stat of every
  entry: inode, device, size, mode, mtime and ctime in nanoseconds.
- `SoftwareGuard.check()`, before each wrapper starts, stats every entry
  again (a few milliseconds for ~1000 files). Changing a file changes its
  ctime, which no unprivileged process can set back; replacing one changes
  its inode; adding or removing one changes its folder's mtime and ctime.

A difference raises `SoftwareAreaChanged` naming the path: the agent starts
no wrapper, reports the job as an infrastructure failure, stops taking work
and leaves with exit code 6 (pilot.agent.exitcodes.SOFTWARE_CHANGED).

The manifest itself lives in the area, so a payload that can write the area
can rewrite both before *another* agent starts on the same area: an area
reused across pilots must not be writable by the pilots' user (publish it
read-only, e.g. on CVMFS), or let each agent build its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pilot.errors import SplitpilotError, UsageError

MANIFEST_NAME = ".splitpilot-manifest.json"
MANIFEST_VERSION = 1
#: A manifest larger than this is not one (an area of ~1000 files needs ~150 KiB).
MAX_MANIFEST_BYTES = 16 << 20
#: Exit code of an agent that found its software area changed (pilot.agent.exitcodes.SOFTWARE_CHANGED).
SOFTWARE_CHANGED_EXIT = 6
_BLOCK = 1 << 20


class SoftwareAreaChanged(SplitpilotError):
    """The software area differs from its manifest, or from what it was when the agent started.

    Attributes:
        area: the area's path.
        path: the changed entry, relative to the area ('.' for the area itself).
        what: how it changed.
    """

    exit_code = SOFTWARE_CHANGED_EXIT

    def __init__(self, area: str, path: str, what: str) -> None:
        self.area, self.path, self.what = area, path, what
        super().__init__(
            f"the software area {area} changed: {path} {what}. A job may have tampered with it: no wrapper is "
            "started from it any more. Fix: rebuild the area (or let the agent build its own in its work dir), "
            "and run jobs with a launcher that mounts it read-only (namespace, bubblewrap or a container)")


class ManifestError(UsageError):
    """The area has no usable manifest (never written, unreadable, malformed): a configuration problem."""


@dataclass(frozen=True)
class _Seen:
    """What stat said of one entry: the fields no unprivileged process can restore once changed."""

    ino: int
    dev: int
    size: int
    mode: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, info: os.stat_result) -> _Seen:
        return cls(info.st_ino, info.st_dev, info.st_size, info.st_mode, info.st_mtime_ns, info.st_ctime_ns)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while block := os.read(fd, _BLOCK):
            digest.update(block)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _walk(area: str) -> list[str]:
    """Relative paths of every entry below AREA (not following links), folders before their content."""
    found = []
    for top, dirs, files in os.walk(area, followlinks=False):
        relative = os.path.relpath(top, area)
        dirs.sort()
        for name in sorted(dirs) + sorted(files):
            path = name if relative == "." else f"{relative}/{name}"
            if path != MANIFEST_NAME:
                found.append(path)
    return found


def _describe(area: str, path: str) -> dict:
    full = os.path.join(area, path)
    info = os.lstat(full)
    mode = stat.S_IMODE(info.st_mode)
    if stat.S_ISLNK(info.st_mode):
        return {"type": "link", "target": os.readlink(full)}
    if stat.S_ISDIR(info.st_mode):
        return {"type": "dir", "mode": mode}
    if stat.S_ISREG(info.st_mode):
        return {"type": "file", "mode": mode, "size": info.st_size, "sha256": _sha256(full)}
    return {"type": "other", "mode": mode}


def write_manifest(area: str | os.PathLike) -> Path:
    """Record AREA's content in AREA/.splitpilot-manifest.json (0644); return its path."""
    area = os.fspath(area)
    entries = {path: _describe(area, path) for path in _walk(area)}
    entries["."] = {"type": "dir", "mode": stat.S_IMODE(os.lstat(area).st_mode)}
    target = Path(area) / MANIFEST_NAME
    target.write_text(json.dumps({"version": MANIFEST_VERSION, "entries": entries}, sort_keys=True, indent=0))
    os.chmod(target, 0o644)
    return target


def _read_manifest(area: str) -> dict[str, dict]:
    path = os.path.join(area, MANIFEST_NAME)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ManifestError(f"the software area {area} has no readable manifest ({MANIFEST_NAME}: {exc.strerror}); "
                            "fix: rebuild it with pilot.launch.build_software_area, which writes one, or let the "
                            "agent build its own (no --software-dir)") from None
    try:
        data = os.read(fd, MAX_MANIFEST_BYTES + 1)
    finally:
        os.close(fd)
    try:
        if len(data) > MAX_MANIFEST_BYTES:
            raise ValueError(f"larger than {MAX_MANIFEST_BYTES} bytes")
        manifest = json.loads(data)
        if manifest.get("version") != MANIFEST_VERSION or not isinstance(manifest.get("entries"), dict):
            raise ValueError(f"not a version {MANIFEST_VERSION} manifest")
    except (ValueError, AttributeError) as exc:
        raise ManifestError(f"the manifest of the software area {area} is unusable ({exc}); fix: rebuild the "
                            "area with pilot.launch.build_software_area") from None
    return manifest["entries"]


class SoftwareGuard:
    """The area as it was verified at the agent's start; `check()` before every wrapper."""

    def __init__(self, area: str, seen: dict[str, _Seen]) -> None:
        self.area = area
        self._seen = seen

    @property
    def entries(self) -> int:
        return len(self._seen)

    @classmethod
    def verify(cls, area: str | os.PathLike) -> SoftwareGuard:
        """Compare AREA's content with its manifest (hashing every file); raise SoftwareAreaChanged or
        ManifestError, else return a guard holding every entry's stat."""
        area = os.path.realpath(os.fspath(area))
        expected = _read_manifest(area)
        before = cls._snapshot(area, [*expected, MANIFEST_NAME])
        present = set(_walk(area)) | {"."}
        for path in sorted(present - set(expected)):
            raise SoftwareAreaChanged(area, path, "is not in the manifest (added after the area was built)")
        for path, entry in expected.items():
            if path not in present:
                raise SoftwareAreaChanged(area, path, "is missing (removed after the area was built)")
            actual = _describe(area, path) if path != "." else {
                "type": "dir", "mode": stat.S_IMODE(os.lstat(area).st_mode)}
            if actual != entry:
                difference = ", ".join(f"{key} {entry.get(key)!r} -> {actual.get(key)!r}"
                                       for key in sorted(set(entry) | set(actual)) if entry.get(key) != actual.get(key))
                raise SoftwareAreaChanged(area, path, f"differs from the manifest ({difference})")
        guard = cls(area, before)
        guard.check()   # nothing changed while it was being hashed
        return guard

    @staticmethod
    def _snapshot(area: str, paths) -> dict[str, _Seen]:
        seen = {}
        for path in paths:
            try:
                seen[path] = _Seen.of(os.lstat(area if path == "." else os.path.join(area, path)))
            except FileNotFoundError:
                raise SoftwareAreaChanged(area, path, "is missing (removed after the area was built)") from None
        return seen

    def check(self) -> None:
        """Stat every entry again; raise SoftwareAreaChanged naming the first one that differs."""
        for path, seen in self._seen.items():
            try:
                now = _Seen.of(os.lstat(self.area if path == "." else os.path.join(self.area, path)))
            except FileNotFoundError:
                raise SoftwareAreaChanged(self.area, path, "was removed") from None
            except OSError as exc:
                raise SoftwareAreaChanged(self.area, path, f"cannot be examined any more ({exc.strerror})") from None
            if now != seen:
                changed = [name for name in ("ino", "dev", "size", "mode", "mtime_ns", "ctime_ns")
                           if getattr(now, name) != getattr(seen, name)]
                what = ("was replaced (new inode)" if "ino" in changed
                        else "was modified" if path != "." and not stat.S_ISDIR(seen.mode)
                        else "had entries added, removed or renamed")
                raise SoftwareAreaChanged(self.area, path, f"{what}: {', '.join(changed)} changed since the agent "
                                                           "verified the area")
