"""The garbage collector in tele's long-running daemon: keep full collections short.

CPython's full (oldest-generation) collection walks every object the collector tracks. Most of
them are modules, classes and functions loaded once, which never become garbage; a daemon with
many open connections through the VIF pays for walking them again and again, in pauses that
stall every connection at once. `settle()` collects what is garbage now and moves the rest into
the permanent generation (`gc.freeze`), so that later collections walk only what was made since.
Measured (prof harness around bench/vif.py's row c, 1,000 idle connections open through the VIF,
load ~1.2): a full collection took 85 ms before, 56 ms after; 39 ms -> 11 ms with none open.

Call it at quiet moments, after a burst of long-lived allocations: the daemon once started, a
session once connected and once ended. Each call first returns what an earlier call froze to
the collector (`gc.unfreeze`), so the cyclic garbage of an ended session is still collected.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable


def settle() -> None:
    """Collect everything collectable, then exempt the survivors from later collections."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim this way
        return None
    return trim


_malloc_trim = _find_malloc_trim()


def release_memory() -> None:
    """After a burst that ended (a flood of streams): collect its cycles, then give the heap's
    free pages back to the OS.

    glibc keeps freed memory in its heap for reuse: pages in the middle of the heap (and of
    every arena) are returned only by `malloc_trim`, not by free() (which trims the top only).
    Measured with bench/flood.py (1 link x 10,000 bodiless streams; RSS before -> during ->
    after the flood): collect only 30 -> 132 -> 44-62 MiB; collect and trim 30 -> 132 -> 34.
    The trim walks the heap: ~ms for ~100 MiB, so call it only after a burst, not per request.
    """
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)
