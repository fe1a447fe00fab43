"""Give the memory a burst freed back to the operating system (glibc's `malloc_trim`).

After a burst of long prompts, torch frees the prefill activations, but glibc keeps most of them in its
heap for reuse (allocations under its mmap threshold, which grows after every large free, come from the
heap), so a server's RSS stays at the burst's high-water mark while it sits idle. `trim()` asks glibc to
return the free pages. It walks the heap (milliseconds to tens of them), so the serving loop calls it
only after it has been idle for a while, never between steps. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def trim() -> bool:
    """Return free heap memory to the OS; True if the C library did (glibc's malloc_trim(0))."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False
