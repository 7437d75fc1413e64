"""The progress line of `splitpilot job submit` and `job output`: one updating line on a terminal.

The API reports a transfer through a callback, on_progress(done_bytes, total_bytes, name)
(`pilot.api.files.OnProgress`); this module only draws it. It lives beside the job commands
(broker/cli.py), which cannot import apps/ (imports point down the layers).

    reporter = TransferProgress.for_stream(sys.stderr, "auto", files=3)
    with reporter:                          # ends the line with a newline, also on Ctrl-C
        client.submit_checked(jobs, on_progress=reporter.callback)

The line shows the file's name, bytes done/total, percent, the transfer rate and the file's number
(k/n), redrawn at most every 0.1 s. With mode "auto" it is drawn only when the stream is a terminal:
scripts and tests reading stderr from a pipe or a file see nothing extra ("always" draws anyway,
"never" never).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TextIO

from pilot.api.files import OnProgress, format_size, shown

MODES = ("auto", "always", "never")

#: Seconds between two redraws: at most ten a second, whatever the chunk rate.
INTERVAL = 0.1

_CLEAR_TO_END = "\x1b[K"


class TransferProgress:
    """Draws the transfers reported to `update` on STREAM; inert (`callback` None) unless ENABLED."""

    def __init__(self, stream: TextIO, *, enabled: bool, files: int = 0,
                 clock: Callable[[], float] = time.monotonic, interval: float = INTERVAL) -> None:
        self.stream = stream
        self.enabled = enabled
        self.files = files
        self._clock = clock
        self._interval = interval
        # Upload callbacks run in gRPC's sending thread, the rest in the caller's: one lock for both.
        self._lock = threading.Lock()
        self._name = ""
        self._done = 0
        self._total = 0
        self._index = 0              # the current file's number, from 1
        self._moved = 0              # bytes that really crossed the network (not files already there)
        self._started: float | None = None
        self._last_draw: float | None = None
        self._dirty = False          # a state not drawn yet
        self._visible = False        # a line is on the screen, not yet ended by a newline
        self._closed = False

    @classmethod
    def for_stream(cls, stream: TextIO, mode: str, *, files: int = 0) -> TransferProgress:
        """A reporter for MODE (auto: only if STREAM is a terminal; always; never)."""
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r} is not one of {', '.join(MODES)}")
        if mode == "auto":
            try:
                enabled = stream.isatty()
            except (AttributeError, ValueError, OSError):
                enabled = False
        else:
            enabled = mode == "always"
        return cls(stream, enabled=enabled, files=files)

    @property
    def callback(self) -> OnProgress | None:
        """What to pass as on_progress: None when disabled, so the transfer does no extra work."""
        return self.update if self.enabled else None

    def expect(self, files: int) -> None:
        """FILES more files will be reported (the n of k/n)."""
        with self._lock:
            self.files += files

    def update(self, done: int, total: int, name: str) -> None:
        with self._lock:
            if self._closed or not self.enabled:
                return  # a late call from gRPC's thread after an interruption: the line is over
            now = self._clock()
            if self._started is None:
                self._started = now
            new_file = (name != self._name or done == 0 or done < self._done
                        or (self._total > 0 and self._done >= self._total))
            if new_file:
                self._index += 1
                self._name = name
                # A file reported whole at its first call (already on the broker) moved nothing.
                self._moved += done if done < total else 0
            else:
                self._moved += max(0, done - self._done)
            self._done = done
            self._total = total
            self._dirty = True
            if self._last_draw is None or now - self._last_draw >= self._interval:
                self._draw(now)

    def end_line(self) -> None:
        """Draw the latest state and end its line (before other messages are printed); the next
        update starts a new line."""
        with self._lock:
            self._end_line()

    def close(self) -> None:
        with self._lock:
            self._end_line()
            self._closed = True

    def __enter__(self) -> TransferProgress:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ drawing

    def _end_line(self) -> None:
        if not self.enabled:
            return
        if self._dirty:
            self._draw(self._clock())
        if self._visible:
            self._write("\n")
            self._visible = False

    def line(self, now: float) -> str:
        """The text of the progress line at NOW (without the terminal's control characters)."""
        percent = 100 if self._total <= 0 else min(100, self._done * 100 // self._total)
        parts = [f"{format_size(self._done)}/{format_size(self._total)}", f"{percent:3d}%"]
        elapsed = now - self._started if self._started is not None else 0.0
        if elapsed > 0 and self._moved > 0:
            parts.append(f"{format_size(int(self._moved / elapsed))}/s")
        count = max(self.files, self._index)
        parts.append(f"file {self._index}/{count}")
        tail = "  " + "  ".join(parts)
        name = shown(self._name)  # names come from job files and jobs: escaped, never interpreted
        room = max(8, self._width() - 1 - len(tail))
        if len(name) > room:
            name = "…" + name[-(room - 1):]
        return name + tail

    def _draw(self, now: float) -> None:
        self._write("\r" + self.line(now) + _CLEAR_TO_END)
        self._last_draw = now
        self._dirty = False
        self._visible = True

    def _width(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or 80
        except (AttributeError, ValueError, OSError):
            return 80

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            self.enabled = False  # stderr went away: the transfer goes on without its line


__all__ = ["INTERVAL", "MODES", "TransferProgress"]
