"""Bounded tails of the payload's output files, sent to the agent as LogChunks.

The payload may write gigabytes; the agent gets at most `chunk_limit` bytes
per stream per tick, always the newest: older unsent bytes are skipped and
the chunk says so (skipped_before). The files stay in the sandbox and are
uploaded whole with the outputs.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pilot.pipe.messages import LogStream

DEFAULT_CHUNK_LIMIT = 64 * 1024


class LogTail:
    """Reads what was appended to a file since the last call, bounded."""

    def __init__(self, path: str, stream: LogStream, chunk_limit: int = DEFAULT_CHUNK_LIMIT) -> None:
        self.path = path
        self.stream = stream
        self.chunk_limit = chunk_limit
        self.offset = 0

    def read_new(self) -> tuple[int, bytes, bool] | None:
        """(offset, data, skipped_before) of new bytes, or None if nothing new."""
        try:
            # Never through a link, never a FIFO: the payload owns the sandbox and may replace the file.
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size <= self.offset:
                return None
            size = info.st_size
            skipped = size - self.offset > self.chunk_limit
            start = size - self.chunk_limit if skipped else self.offset
            handle.seek(start)
            data = handle.read(size - start)
        self.offset = start + len(data)
        return start, data, skipped
