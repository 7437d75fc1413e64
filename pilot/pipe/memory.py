"""Keep frame-sized buffers on the heap instead of fresh mmap()s.

glibc serves allocations above its mmap threshold (128 KiB at start, raised
dynamically only up to a point) with a fresh mmap() and returns them with
munmap() on free, so every 1 MiB frame serialised, read or parsed costs 256
page faults per copy. Measured here: 1 MiB LogChunks moved at 11% of the
raw pipe bandwidth with glibc's defaults, at 45-55% with the thresholds below,
and at 60-65% with the zero-copy paths (send_log_chunk, get_buffer) on top.
Raising the mmap threshold above the frame cap keeps those
buffers in the heap and reuses their pages; the trim threshold bounds how
much freed memory the process keeps.
"""

from __future__ import annotations

import ctypes

from pilot.pipe.framing import DEFAULT_MAX_FRAME_BYTES

# mallopt() parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# glibc clamps the mmap threshold to HEAP_MAX / 2 (32 MiB on 64-bit).
_MMAP_THRESHOLD_CEILING = 32 * 1024 * 1024

_outcome: bool | None = None  # None until tried: the lookup runs once per process


def keep_frames_on_heap(max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bool:
    """Tune glibc malloc for frames up to MAX_FRAME_BYTES; True if applied.

    Idempotent and process-wide. Without glibc (musl images) it does
    nothing: the protocol works the same, large frames are just slower.
    """
    global _outcome
    if _outcome is not None:
        return _outcome
    _outcome = False
    try:
        # The interpreter's own symbols: libc is already loaded, no lookup.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    threshold = min(_MMAP_THRESHOLD_CEILING, max(2 * max_frame_bytes, 1024 * 1024))
    _outcome = mallopt(_M_MMAP_THRESHOLD, threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, 2 * threshold) == 1
    return _outcome
