"""A self-pipe: wake a waiting loop from another thread or from a signal handler.

`wake()` is one non-blocking write() of one byte: no lock, no allocation
that could interleave with what the interrupted thread holds, so a signal
handler may call it whatever the main thread was doing (a threading.Event
could not: its set() takes a lock the interrupted thread may hold). The
loop waits with `wait(timeout)` (select on the read end), or passes
`read_fd` to its own select, and `clear()`s before looking at its flags.
"""

from __future__ import annotations

import os
import select


class Waker:
    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        try:
            os.write(self.write_fd, b"w")
        except (BlockingIOError, OSError):
            pass  # full (a wake-up is pending anyway) or closed (nobody waits any more)

    def wait(self, timeout: float | None) -> bool:
        """Wait until woken or TIMEOUT seconds (None: for ever) pass; True when woken. Clears the wake-ups."""
        ready = select.select([self.read_fd], [], [], None if timeout is None else max(0.0, timeout))[0]
        self.clear()
        return bool(ready)

    def clear(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.read_fd = self.write_fd = -1
