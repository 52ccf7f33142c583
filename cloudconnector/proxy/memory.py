"""glibc allocator setting for a process holding thousands of idle TLS sessions.

Measured with ``bench/load.py`` (docs/benchmarks.md, "Memory and set-up cost"): under uvloop every
TLS connection it terminates owns a 256 KiB read buffer, of which an idle session touches a page or
two. (The cloud side no longer uses it, see ``upstream_tls``; devices on 8883 still do.)
glibc serves the first such buffers with ``mmap``, but once one is freed it raises its mmap
threshold above 256 KiB and serves the rest from the heap, onto pages dirtied by earlier
connections, which then stay resident. A fixed threshold keeps every buffer page-mapped (only the
touched pages count) and hands it back to the system when its connection closes. (``malloc_trim``
after a burst of set-ups was measured as well and gained nothing: the rest is live memory.)

Nothing here changes behaviour; where the C library has no ``mallopt`` (musl) it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable

M_MMAP_THRESHOLD = -3  # the mallopt parameter number in glibc's malloc.h
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, made fixed


def _mallopt() -> Callable[[int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt  # type: ignore[no-any-return]


def settle_startup_objects() -> None:
    """Move everything alive at start-up (modules, the loaded directory) out of the collector's view.

    A full collection walks every tracked object; with thousands of sessions it already pauses the
    event loop for tens of milliseconds, which shows in the paced latency tail (docs/benchmarks.md).
    Start-up objects live as long as the process, so leaving them out of every later walk is safe.
    """
    gc.collect()
    gc.freeze()


def tune_allocator() -> bool:
    """Fix glibc's mmap threshold (idempotent); False where that cannot be done."""
    mallopt = _mallopt()
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
