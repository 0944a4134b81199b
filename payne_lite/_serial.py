"""Compile lane-sequential JAX functions without XLA:CPU's intra-op task splitting.

XLA:CPU splits large loop fusions into tasks for its intra-op thread pool
("outer_dimension_partitions" in the compiled HLO), as many as there are CPUs the
compiling thread may run on. Inside the fitter's per-star loops (``lax.map`` over
lanes, a ``while_loop`` per lane) every such fusion is a few thousand elements, the
hand-off costs more than it saves, and the fitter already runs one batch per core in
threads: measured on 512 APOGEE-network fits, one thread, the LM stage took 0.52 s
with the split and 0.35 s without (the rest of the fit unchanged).

XLA reads that CPU count from the compiling thread's affinity
(``tsl::port::NumSchedulableCPUs``; JAX exposes no option for it), so
:class:`serial_jit` compiles each new signature ahead of time
(``lower().compile()``) with the process's threads pinned to one CPU, the one the
compiling thread runs on (XLA compiles on threads of its own; processes compiling at
the same time keep their own CPUs), then restores every thread's affinity; the
executable runs with the normal affinity. Compiles happen once per batch shape;
while one runs, other threads of the process share one CPU. Other backends (and
systems without ``sched_setaffinity``) call the jitted function as it is.

Every XLA:CPU executable keeps its machine code in memory mappings of its own (about
a hundred per fitter program; a first fit adds ~1,600), and Linux allows a process
``vm.max_map_count`` of them (65,530 by default). A process that compiles for many
grids, instruments and options and keeps every executable (a test suite; a
notebook or service that fits for many set-ups) reaches that limit, and then LLVM
aborts the process in the middle of a compilation ("Unable to allocate section
memory"; measured: the core of a crashed test worker held 65,531 mappings). So
before a compilation :func:`guard_memory_maps` forgets every compiled executable
(this module's and JAX's: :func:`clear_caches`) once the process holds more than
:data:`MAP_FRACTION` of the limit; what is needed again is recompiled, or loaded
from the persistent compilation cache. (Dropping executables from this module's
cache alone frees nothing: JAX's own caches hold them too, measured: 40 shapes with
only 2 kept here still held 243 mappings, 15 after ``jax.clear_caches``.)
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import weakref
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

#: :func:`guard_memory_maps` clears the compiled executables above this fraction of
#: the process's memory-map limit.
MAP_FRACTION = 0.5
_INSTANCES: weakref.WeakSet = weakref.WeakSet()
_REGISTRY_LOCK = threading.Lock()
#: No clear below this many mappings (raised when a clear leaves the process above
#: the fraction: the mappings are not executables', and clearing again at every
#: compilation would only make the threads recompile each other's kernels).
_quiet_below = 0


def memory_maps() -> tuple[int, int] | None:
    """``(mappings the process holds, the system's limit)``, or None where they are
    not readable (not Linux)."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        with open("/proc/self/maps", "rb") as f:
            n = sum(1 for _ in f)
    except (OSError, ValueError):
        return None
    return n, limit


def clear_caches() -> None:
    """Forget every compiled executable: each :class:`serial_jit`'s and JAX's
    (``jax.clear_caches``), which frees their memory and memory mappings. Later
    calls compile again (or load from the persistent compilation cache)."""
    with _REGISTRY_LOCK:
        instances = list(_INSTANCES)
    for f in instances:
        f.clear()
    jax.clear_caches()


def guard_memory_maps(fraction: float | None = None) -> bool:
    """:func:`clear_caches` if the process holds more than ``fraction`` (default
    :data:`MAP_FRACTION`) of its memory-map limit (see the module docstring); True if
    it did. If a clear leaves the process above the fraction, the next one waits
    until another 5 % of the limit has been mapped."""
    global _quiet_below
    m = memory_maps()
    frac = MAP_FRACTION if fraction is None else fraction
    if m is None or m[0] <= max(frac * m[1], _quiet_below):
        return False
    clear_caches()
    after = memory_maps()
    if after is not None and after[0] > frac * after[1]:
        _quiet_below = after[0] + 0.05 * after[1]
    return True


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def current_cpu(cpus) -> int:
    """The CPU the calling thread runs on (``/proc/thread-self/stat``, field 39), if
    it is one of ``cpus``; else (or where that file is missing) the lowest of
    ``cpus``."""
    try:
        with open("/proc/thread-self/stat") as f:
            cpu = int(f.read().rsplit(")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return min(cpus)
    return cpu if cpu in cpus else min(cpus)


@contextlib.contextmanager
def one_cpu():
    """Pin every thread of the process to one CPU for the ``with`` block: the one the
    calling thread runs on (:func:`current_cpu`), so that processes compiling at
    the same time keep the CPUs the system gave them. (Pinned to the lowest CPU,
    every process compiled on that one: two test workers on two CPUs left them
    20 % idle over a full run of the suite.)

    Every thread, because XLA compiles on threads of its own; the previous masks are
    restored after (a thread that ends meanwhile is skipped)."""
    get = getattr(os, "sched_getaffinity", None)
    cpus = get(0) if get is not None else set()
    if len(cpus) <= 1:
        yield
        return
    pin = {current_cpu(cpus)}
    saved = {}
    for tid in _threads():
        try:
            saved[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, pin)
        except OSError:
            pass
    try:
        yield
    finally:
        # threads started meanwhile (XLA's pools) inherited the pinned mask
        for tid in _threads():
            try:
                os.sched_setaffinity(tid, saved.get(tid, cpus))
            except OSError:
                pass


def _signature(x):
    """(shape, dtype) of a leaf; arrays by their attributes (``result_type`` costs
    ~10 us a leaf, and an observation model has dozens: a fit makes ~30 calls a
    batch)."""
    if isinstance(x, (jax.Array, np.ndarray)):
        return x.shape, x.dtype
    return np.shape(x), jax.dtypes.result_type(x)


def to_device(x, dtype=None):
    """``jnp.asarray(x, dtype)`` for host data, cast on the host first.

    ``jnp.asarray`` of a NumPy float64 array with ``dtype=float32`` runs an eager
    XLA conversion (a dispatch, ~0.1-0.5 ms, holding the GIL part of that time);
    the fitter makes a few dozen a batch. A NumPy cast and a ``device_put`` cost a
    copy. JAX arrays pass to ``jnp.asarray`` unchanged."""
    if isinstance(x, jax.Array):
        return x if dtype is None or x.dtype == dtype else jnp.asarray(x, dtype)
    return jax.device_put(np.asarray(x, dtype))


class serial_jit:  # noqa: N801 - used like jax.jit
    """A jitted function whose CPU executables are compiled under :func:`one_cpu`.

    Args:
        fn: the ``jax.jit``-ed function.
        static_argnames: its static keyword arguments (passed by keyword).
        key: optional callable whose result is part of the cache key (module
            switches read at trace time).
    """

    def __init__(self, fn, static_argnames=(), key: Callable[[], object] | None = None):
        self._fn = fn
        self._static = tuple(static_argnames)
        self._key = key
        self._cache: dict = {}
        self._lock = threading.Lock()
        functools.update_wrapper(self, fn)
        with _REGISTRY_LOCK:
            _INSTANCES.add(self)

    def __call__(self, *args, **kwargs):
        if jax.default_backend() != "cpu":
            return self._fn(*args, **kwargs)
        compiled, dyn = self._compiled(args, kwargs)
        return compiled(*args, **dyn)

    def warm(self, *args, **kwargs) -> None:
        """Compile for these arguments' shapes (if not yet) without running: a path
        that only some inputs take is then compiled by the first call of the code
        that has it, not by a later one (no-op off CPU)."""
        if jax.default_backend() == "cpu":
            self._compiled(args, kwargs)

    def _compiled(self, args, kwargs):
        """The executable for these arguments (compiled on a miss) and the dynamic
        keyword arguments to call it with."""
        dyn = {k: v for k, v in kwargs.items() if k not in self._static}
        leaves, tree = jax.tree_util.tree_flatten((args, dyn))
        key = (
            tree,
            tuple(sorted((k, kwargs[k]) for k in self._static if k in kwargs)),
            tuple(_signature(x) for x in leaves),
            None if self._key is None else self._key(),
        )
        compiled = self._cache.get(key)
        if compiled is None:
            guard_memory_maps()
            with self._lock:
                compiled = self._cache.get(key)
                if compiled is None:
                    with one_cpu():
                        compiled = self._fn.lower(*args, **kwargs).compile()
                    self._cache[key] = compiled
        return compiled, dyn

    def clear(self) -> None:
        """Forget this function's compiled executables (:func:`clear_caches`: all)."""
        with self._lock:
            self._cache.clear()

    def lower(self, *args, **kwargs):
        return self._fn.lower(*args, **kwargs)


_HOST_POOL = None
_HOST_POOL_LOCK = threading.Lock()


def host_pool():
    """Threads for NumPy work on the host (:func:`default_threads` of them): NumPy
    releases the GIL inside its array loops, so row blocks run on every core, or
    beside a batch's XLA programs."""
    global _HOST_POOL
    with _HOST_POOL_LOCK:
        if _HOST_POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            _HOST_POOL = ThreadPoolExecutor(default_threads(), "payne_lite-host")
    return _HOST_POOL


def default_threads() -> int:
    """Batches fitted at once: one per CPU core on the CPU backend, else one."""
    if jax.default_backend() != "cpu":
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
