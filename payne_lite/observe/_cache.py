"""Observation models kept per emulator: :func:`cached_obs_model`."""

from __future__ import annotations

import collections
import dataclasses
import threading
import weakref

import jax
import numpy as np

from ..emulator import Emulator
from ._model import ObsModel, build_obs_model

#: Observation models kept per emulator by :func:`cached_obs_model` (the most recently
#: used settings).
OBS_CACHE_SIZE = 4
#: ... for arguments of at most this many bytes each (one grid's wavelengths, not
#: per-star grids: the key holds a copy).
OBS_CACHE_KEY_BYTES = 1 << 20
_OBS_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_OBS_CACHE_LOCK = threading.Lock()


def _cache_key(x):
    """A hashable stand-in for a :func:`build_obs_model` argument (arrays by their
    bytes, dataclasses by their fields); raises TypeError for anything else, and
    for arrays over ``OBS_CACHE_KEY_BYTES``."""
    if x is None or isinstance(x, (bool, int, float, str, np.generic)):
        return x
    if isinstance(x, (np.ndarray, jax.Array, list)):
        a = np.asarray(x)
        if a.nbytes > OBS_CACHE_KEY_BYTES:  # per-star grids: not kept
            raise TypeError(f"an array of {a.nbytes} bytes")
        return ("array", a.shape, a.dtype.str, a.tobytes())
    if isinstance(x, tuple):
        return tuple(_cache_key(v) for v in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        fields = dataclasses.fields(x)
        return (type(x), tuple(_cache_key(getattr(x, f.name)) for f in fields))
    raise TypeError(f"no cache key for {type(x).__name__}")


def cached_obs_model(emulator: Emulator, **kwargs) -> tuple[ObsModel, dict]:
    """:func:`build_obs_model` of ``emulator`` with ``kwargs``, kept with the
    emulator for the next call with the same settings (the last
    ``OBS_CACHE_SIZE``), and a dict kept with it for values derived from the model
    alone (the fit's scan pixels). A fit of a few spectra spent ~5 ms a call
    building them again (the model's JetNet is folded in float64)."""
    try:
        key = _cache_key(tuple(sorted(kwargs.items())))
    except TypeError:  # an argument without a key: built every time
        return build_obs_model(emulator, **kwargs), {}
    with _OBS_CACHE_LOCK:
        kept = _OBS_CACHE.setdefault(emulator, collections.OrderedDict())
        hit = kept.get(key)
        if hit is not None:
            kept.move_to_end(key)
            return hit
    made = (build_obs_model(emulator, **kwargs), {})
    with _OBS_CACHE_LOCK:
        kept[key] = made
        kept.move_to_end(key)
        while len(kept) > OBS_CACHE_SIZE:
            kept.popitem(last=False)
    return made
