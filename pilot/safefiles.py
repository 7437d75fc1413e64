"""Writing files atomically, private ones created 0600 from the first byte.

A crash leaves the old file or the new one, never half of one, and a private
file is never readable by others, not even for a moment (it is created 0600
under a temporary name in the same directory, fsync'd, then renamed).
"""

from __future__ import annotations

import os


def write_private(path: str, data: bytes) -> None:
    """Write DATA to PATH as a 0600 file, atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)


def write_public(path: str, data: bytes) -> None:
    """Write a certificate or other public file (0644), atomically."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
