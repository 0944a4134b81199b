"""Bound the C heap: at most one malloc arena per CPU core.

The fitter runs one batch per core on threads of a fresh thread pool per call
(:func:`payne_lite.fitting._driver.run_batches`), and each batch allocates and
frees (batch, P) arrays of a few MB. glibc gives threads up to 8 arenas per core
and keeps the memory freed in each of them for reuse, so resident memory crept up
with every call: fit_catalog of the real APOGEE network grew by 20-30 MB per chunk
of 512 spectra (534 -> 725 MB over 10 chunks) and 20,000 spectra peaked at
1.55 GB, while Python and NumPy never held more than 0.2 GB at once (tracemalloc).
With one arena per core (``mallopt(M_ARENA_MAX)``, what ``MALLOC_ARENA_MAX`` sets)
the memory freed by one batch is reused by the next: flat at 440 MB over the same
10 chunks, fits as fast (benchmarks/bench_catalog.py). ``import payne_lite`` sets
it, unless ``MALLOC_ARENA_MAX`` is in the environment (glibc then read it) or the C
library is not glibc (then nothing happens).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

#: glibc's mallopt parameter number of M_ARENA_MAX (malloc.h).
_M_ARENA_MAX = -8


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def limit_malloc_arenas() -> int | None:
    """Cap glibc's malloc arenas at the number of usable cores (at least 2);
    returns the cap, or None when not set (see the module's docstring)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None
    n = max(2, _cores())
    return n if mallopt(_M_ARENA_MAX, n) == 1 else None
