"""Compilation: JAX's persistent compilation cache, and counting compilations.

Every process that fits pays XLA's compilation of the fitter's kernels (about 60
executables, 5-15 s on 2 cores) before the first spectrum is done. With JAX's
persistent compilation cache the executables are written to disk and a later
process loads them instead. ``import payne_lite`` turns the cache on, in
:func:`default_cache_dir`, unless

* the environment variable ``PAYNE_LITE_COMPILATION_CACHE`` is ``0``, ``off``,
  ``false`` or ``no`` (or names another directory, which is used instead), or
* JAX's own cache directory is already configured (``JAX_COMPILATION_CACHE_DIR``
  or ``jax.config.update("jax_compilation_cache_dir", ...)``): the user's setting
  is left as it is.

At run time: :func:`set_compilation_cache` (a directory, or None for off). The
cache is JAX's, so it is process-wide: it also serves the user's own jitted code.
It keys each executable on the program, the compile options, the XLA flags, the
jax/jaxlib versions and the device, so a stale or foreign entry is never loaded.
Its size is capped at ``CACHE_MAX_BYTES`` (least recently used entries go first)
when the ``filelock`` package is installed (JAX needs it for the cap).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter
from pathlib import Path

import jax

#: Environment switch of the persistent cache: off, or a directory.
CACHE_ENV = "PAYNE_LITE_COMPILATION_CACHE"
_OFF = ("0", "off", "false", "no")
#: The cache's size cap [bytes] when payne_lite configures it.
CACHE_MAX_BYTES = 2 << 30

#: ``jax.monitoring`` events of one new executable: tracing to a jaxpr, and the
#: backend step (XLA's compile, or a load from the persistent cache, which also
#: reports LOAD_EVENT).
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
BACKEND_EVENT = "/jax/core/compile/backend_compile_duration"
LOAD_EVENT = "/jax/compilation_cache/cache_retrieval_time_sec"

_state = {"dir": None}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/payne_lite/jax`` (``~/.cache/payne_lite/jax``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return Path(base) / "payne_lite" / "jax"


def compilation_cache_dir() -> str | None:
    """The persistent cache's directory now in use (payne_lite's or the user's),
    or None when it is off."""
    if not jax.config.jax_enable_compilation_cache:
        return None
    return jax.config.jax_compilation_cache_dir


def set_compilation_cache(path: str | os.PathLike | None = "default") -> str | None:
    """Turn JAX's persistent compilation cache on, in ``path`` (``"default"``:
    :func:`default_cache_dir`), or off (``None``). Returns the directory in use.

    Every compilation from then on is written there (JAX's minimum compile time
    for an entry is set to 0: the fitter's kernels compile in 0.1-3 s each, and a
    first fit needs about 60 of them), and looked up there first.
    """
    from jax.experimental.compilation_cache import compilation_cache as cc

    if path is None:
        jax.config.update("jax_compilation_cache_dir", None)
        _state["dir"] = None
        cc.reset_cache()
        return None
    target = default_cache_dir() if str(path) == "default" else Path(path)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # not writable (a read-only home): compile as without a cache
    jax.config.update("jax_compilation_cache_dir", str(target))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if jax.config.jax_compilation_cache_max_size == -1 and _has_filelock():
        # JAX's size cap needs filelock (it then locks the directory for eviction)
        jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    _state["dir"] = str(target)
    cc.reset_cache()  # take effect even after earlier compilations
    _quiet_aot_loader()
    return str(target)


def _quiet_aot_loader() -> None:
    """Raise XLA's C++ log threshold to FATAL, unless the user set one.

    jaxlib 0.9-0.10 on x86 CPUs logs an ERROR line pair for every executable
    loaded from the persistent cache ("Target machine feature +prefer-no-gather is
    not supported on the host machine ... could lead to SIGILL"; about 120 lines
    for a first fit): XLA:CPU's AOT loader compares the compiling machine's LLVM
    *tuning* attributes with the host's ISA features (jax-ml/jax#38445,
    openxla/xla#44565). The executables load and run correctly (they were compiled
    on this machine; the cache key holds the device); only the message is wrong.
    The threshold is the one ``TF_CPP_MIN_LOG_LEVEL`` sets; a user who set that
    (to other than JAX's default 1), or ``jax_logging_level``, keeps their own.
    """
    # ``import jax`` sets TF_CPP_MIN_LOG_LEVEL=1 when it is unset: 1 is JAX's
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "1") != "1" or (
        jax.config.jax_logging_level not in (None, "NOTSET")
    ):
        return
    try:
        from jax._src.lib import utils as _lib_utils

        _lib_utils.absl_set_min_log_level(3)
    except (ImportError, AttributeError):  # another jaxlib: messages stay
        pass


def _has_filelock() -> bool:
    try:
        import filelock  # noqa: F401
    except ImportError:
        return False
    return True


def enable_default_cache() -> str | None:
    """What ``import payne_lite`` does (see the module's docstring)."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env.lower() in _OFF:
        return None
    if jax.config.jax_compilation_cache_dir:  # the user's own setting
        return compilation_cache_dir()
    return set_compilation_cache(env or "default")


class CompileCounter:
    """Count JAX compilations in a ``with`` block (all threads of the process).

    ``traces``: programs traced to a jaxpr (every new executable, also one that the
    persistent cache then supplies); ``compiles``: XLA compilations; ``loads``:
    executables loaded from the persistent cache. ``events`` holds these and any
    other compile-time event JAX reports.
    """

    _lock = threading.Lock()

    def __init__(self):
        self.events: Counter = Counter()

    def _listen(self, name, _secs, **_kwargs):
        if name.startswith("/jax/core/compile/") or name.startswith(
            "/jax/compilation_cache/"
        ):
            with self._lock:
                self.events[name] += 1

    @property
    def traces(self) -> int:
        return self.events[TRACE_EVENT]

    @property
    def loads(self) -> int:
        return self.events[LOAD_EVENT]

    @property
    def compiles(self) -> int:
        return self.events[BACKEND_EVENT] - self.loads

    def __enter__(self) -> CompileCounter:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(Exception):
            jax.monitoring.unregister_event_duration_listener(self._listen)
