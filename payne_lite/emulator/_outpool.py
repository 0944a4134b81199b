"""Reusable host memory for :meth:`Emulator.predict`'s large results.

A fresh NumPy array of 10,000 x 7214 float32 (288 MB) costs the operating system
a page fault and the zeroing of every page on first write: 30-40 ms on the 2-core
machine of benchmarks/bench_emulator.py when quiet, against about 150 ms for the
evaluation, and far more when the pages have to come back from the hypervisor
(0.4 s of page faults measured under other people's load). :func:`empty` hands
out arrays whose memory, once the last array (or view) using it is freed, is kept
for the next large result instead of being returned to the operating system, as
JAX's and PyTorch's device allocators do. At most :data:`MAX_FREE` freed buffers are
kept (one: a loop that keeps each result until the next call alternates between
two buffers, and only one is free at a time); :func:`clear` drops them.
"""

from __future__ import annotations

import threading

import numpy as np

#: Results smaller than this are plain ``np.empty`` (malloc reuses small blocks).
MIN_BYTES = 4 << 20
#: Freed buffers kept for reuse.
MAX_FREE = 1

_lock = threading.Lock()
_free: list[np.ndarray] = []  # raw uint8 storage, most recently freed last


class _Block:
    """Owns one pooled buffer for the arrays made from it (their ``.base``).

    NumPy keeps this object alive as long as any array or view uses the memory;
    when the last one is freed, the storage goes back to the pool.
    """

    def __init__(self, storage: np.ndarray, shape: tuple[int, ...], dtype):
        self._storage = storage
        self.__array_interface__ = dict(
            version=3,
            shape=shape,
            typestr=np.dtype(dtype).str,
            data=(storage.ctypes.data, False),  # writeable
            strides=None,
        )

    def __del__(self):
        try:
            _give_back(self._storage)
        except Exception:  # interpreter shutdown: module globals may be gone
            pass


def _give_back(storage: np.ndarray) -> None:
    with _lock:
        _free.append(storage)
        del _free[:-MAX_FREE]


def empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised, writeable C-contiguous array, like ``np.empty``.

    Large arrays reuse the memory of a freed earlier result of at least the same
    size (and at most twice it) when there is one.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < MIN_BYTES:
        return np.empty(shape, dtype)
    storage = None
    with _lock:
        for i, buf in enumerate(_free):
            if nbytes <= buf.nbytes <= 2 * nbytes:
                storage = _free.pop(i)
                break
    if storage is None:
        storage = np.empty(nbytes, np.uint8)
    return np.asarray(_Block(storage, tuple(shape), dtype))


def clear() -> None:
    """Release the freed buffers kept for reuse to the operating system."""
    with _lock:
        _free.clear()
