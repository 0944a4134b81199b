"""Validation at the NumPy boundary: every public entry point calls these before tracing."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import WavelengthGridWarning


def as_float_array(
    x,
    name: str,
    *,
    ndim: int | tuple[int, ...] | None = None,
    dtype=np.float64,
    copy: bool = True,
) -> np.ndarray:
    """Return ``x`` as a floating array, checking its number of dimensions: a new
    array, or with ``copy=False`` ``x`` itself when it already is one of ``dtype``
    (the caller must not write to it)."""
    try:
        arr = np.array(x, dtype=dtype, copy=True) if copy else np.asarray(x, dtype)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{name} must be a numeric array, got {type(x).__name__}"
        ) from err
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if arr.ndim not in allowed:
            raise ValueError(
                f"{name} must have {' or '.join(map(str, allowed))} "
                f"dimension(s), got shape {arr.shape}"
            )
    return arr


def check_finite(arr: np.ndarray, name: str) -> None:
    """Raise naming the first non-finite entry of ``arr``."""
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite value(s); "
            f"first at index {idx}: {float(arr[idx])}"
        )


def check_wavelength(wave: np.ndarray, name: str = "wavelength") -> None:
    """A wavelength grid must be 1-D, finite, positive and strictly increasing."""
    if wave.ndim != 1 or wave.size < 2:
        raise ValueError(
            f"{name} must be 1-D with at least 2 pixels, got shape {wave.shape}"
        )
    check_finite(wave, name)
    if np.any(wave <= 0):
        raise ValueError(
            f"{name} must be positive [Angstrom], min is {float(wave.min())}"
        )
    step = np.diff(wave)
    if np.any(step <= 0):
        i = int(np.argmax(step <= 0))
        raise ValueError(
            f"{name} must be strictly increasing; "
            f"{name}[{i + 1}]={float(wave[i + 1])} <= {name}[{i}]={float(wave[i])}"
        )


def check_names(names: Sequence[str], n: int, what: str) -> tuple[str, ...]:
    names = tuple(str(s) for s in names)
    if len(names) != n:
        raise ValueError(f"{what}: {len(names)} names {names} for {n} columns")
    if len(set(names)) != len(names):
        raise ValueError(f"{what}: names must be unique, got {names}")
    return names


def check_box(lo, hi, n: int) -> tuple[np.ndarray, np.ndarray]:
    lo = as_float_array(lo, "label box lower edge", ndim=1)
    hi = as_float_array(hi, "label box upper edge", ndim=1)
    if lo.shape != (n,) or hi.shape != (n,):
        raise ValueError(
            f"label box edges must both be ({n},), got {lo.shape} and {hi.shape}"
        )
    check_finite(lo, "label box lower edge")
    check_finite(hi, "label box upper edge")
    if np.any(hi <= lo):
        i = int(np.argmax(hi <= lo))
        raise ValueError(
            f"label box is empty for label {i}: lo={float(lo[i])} >= hi={float(hi[i])}"
        )
    return lo, hi


def existing_file(path: str | os.PathLike) -> Path:
    """An existing regular file, or FileNotFoundError / ValueError naming it."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if p.is_dir():
        raise ValueError(f"{p}: is a directory, expected a file")
    return p


def warn_if_near_grid(
    wave,
    reference,
    *,
    name: str = "wavelength",
    what: str = "the emulator's",
    hint: str = "pass wavelength=None if they are on it",
) -> bool:
    """Warn when ``wave`` has as many pixels as ``reference`` but other values.

    Spectra on another grid are legitimate (they are resampled), but a grid of the
    same length that differs is more likely a mistake (a shifted or air/vacuum grid,
    or spectra that are on the reference grid with a wrong ``wavelength``). A grid of
    another length, or one equal within 1e-9 (relative), passes silently.

    Returns:
        True when it warned.
    """
    import warnings

    try:
        w = np.asarray(wave, np.float64)
    except (TypeError, ValueError):
        return False  # not numbers: the caller's own validation names the problem
    ref = np.asarray(reference, np.float64)
    if w.shape != ref.shape or np.allclose(w, ref, rtol=1e-9, atol=0.0):
        return False
    if not (np.all(np.isfinite(w)) and np.all(np.diff(w) > 0)):
        return False  # an invalid grid: refused by the caller's validation
    if w[-1] <= ref[0] or w[0] >= ref[-1]:
        return False  # no overlap: refused by the caller
    diff = np.abs(w - ref)
    i = int(np.argmax(diff))
    warnings.warn(
        f"{name} has {what} {ref.size} pixels but is not {what} grid (max "
        f"|difference| {diff[i]:.3g} A at pixel {i}: {w[i]:.6g} vs {ref[i]:.6g}); "
        f"the spectra are resampled onto the model: {hint}",
        WavelengthGridWarning,
        stacklevel=3,
    )
    return True
