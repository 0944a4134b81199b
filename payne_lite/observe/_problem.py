"""What every fitting method checks and shares: inputs, fixed parameters, rv range.

The point fits (:mod:`payne_lite.fitting`), the posteriors
(:mod:`payne_lite.posterior`) and the MDN validate through these, so that one rule
holds for every method.
"""

from __future__ import annotations

import numpy as np

from .._serial import host_pool
from .._validate import as_float_array
from ..constants import C_KMS
from ._model import BROADENING_RANGE

__all__ = [
    "BROADENING_START",
    "MDN_NSIGMA",
    "RV_WINDOW",
    "check_fixed",
    "check_inputs",
    "check_rv_range",
    "emulator_error_on",
    "fill_grid",
    "teff_index",
]


#: Half-width of the RV window of the local fit around the scan's RV [km/s].
RV_WINDOW = 20.0


#: With an MDN: label and rv bounds are the MDN mean +- MDN_NSIGMA sigma (and box).
MDN_NSIGMA = 3.0


#: Start (and RV-scan template) value of a fitted broadening parameter [km/s].
BROADENING_START = {"vsini": 10.0, "vmacro": 5.0}


#: Rows per block of :func:`check_inputs` (a block's temporaries stay in cache).
INPUT_BLOCK_ROWS = 16
#: :func:`check_inputs` spreads its blocks over the host's threads from this many
#: rows on (below, a thread hand-off costs more than it saves).
INPUT_THREADED_ROWS = 64


def check_inputs(flux, flux_err, mask, n_pix):
    """(flux, ivar) as (n, P) float64 copies; bad pixels (non-finite flux or error,
    error <= 0, masked) get flux = 0 and ivar = 0.

    Computed in blocks of ``INPUT_BLOCK_ROWS`` rows into the two outputs: on 1,024
    APOGEE spectra the whole-array form (eight (n, P) temporaries) took 1.1 s, a
    third of the fit; blocked, 0.1 s. From ``INPUT_THREADED_ROWS`` rows on the
    blocks run on the host's threads (:func:`payne_lite._serial.host_pool`): it
    runs before any batch, with the other cores idle."""
    f = as_float_array(flux, "flux", ndim=(1, 2), copy=False)
    e = as_float_array(flux_err, "flux_err", ndim=(1, 2), copy=False)
    if f.shape != e.shape:
        raise ValueError(
            f"flux {f.shape} and flux_err {e.shape} must have the same shape, "
            f"(n_spec, {n_pix}) or ({n_pix},)"
        )
    if f.shape[-1] != n_pix:
        raise ValueError(
            f"flux {f.shape} has {f.shape[-1]} pixels, the wavelength grid has "
            f"{n_pix}: expected (n_spec, {n_pix}) or ({n_pix},)"
        )
    f2 = np.atleast_2d(f)
    e2 = np.atleast_2d(e)
    if f2.shape[0] == 0:
        raise ValueError(f"flux {f.shape} holds no spectra")
    m2 = None
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype != bool:
            raise ValueError(f"mask must be boolean (True = ignore), got {m.dtype}")
        if m.shape not in ((n_pix,), f.shape, f2.shape):
            raise ValueError(
                f"mask {m.shape} must be ({n_pix},) or the shape of flux {f.shape}"
            )
        m2 = np.broadcast_to(m, f2.shape)
    flux_out = np.empty(f2.shape)
    ivar = np.empty(f2.shape)

    def clean(a):
        rows = slice(a, a + INPUT_BLOCK_ROWS)
        fb, eb = f2[rows], e2[rows]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            # error > 0 and finite, flux finite (NaN compares False)
            good = (eb > 0) & (eb < np.inf) & np.isfinite(fb)
            if m2 is not None:
                good &= ~m2[rows]
            # garbage in ignored pixels must not reach the model
            flux_out[rows] = np.where(good, fb, 0.0)
            ivar[rows] = np.where(good, 1.0 / (eb * eb), 0.0)

    blocks = range(0, f2.shape[0], INPUT_BLOCK_ROWS)
    if f2.shape[0] >= INPUT_THREADED_ROWS:
        list(host_pool().map(clean, blocks))
    else:
        for a in blocks:
            clean(a)
    return flux_out, ivar


def teff_index(names) -> int:
    for i, n in enumerate(names):
        if n.lower().replace("_", "") in ("teff", "t", "temperature"):
            return i
    return 0


def check_fixed(fixed, emulator, rv_range, layout=None):
    """{name: value} -> {index: value in fit space}; unknown names refused.

    Broadening parameters (``vsini``, ``vmacro`` [km/s]) are accepted when
    ``layout`` has them."""
    if not fixed:
        return {}
    broad = () if layout is None else tuple(layout.broadening)
    valid = (*emulator.label_names, "rv", *broad)
    out = {}
    for name, value in dict(fixed).items():
        if name not in valid:
            raise ValueError(
                f"fixed: unknown parameter {name!r}; valid names are {list(valid)}"
            )
        v = float(value)
        if not np.isfinite(v):
            raise ValueError(f"fixed: {name} = {value!r} is not finite")
        if name in broad:
            lo, hi = BROADENING_RANGE[name]
            if not lo <= v <= hi:
                raise ValueError(
                    f"fixed: {name} = {v:g} km/s is outside its range [{lo:g}, {hi:g}]"
                )
            out[layout.names.index(name)] = v
        elif name == "rv":
            if not rv_range[0] <= v <= rv_range[1]:
                raise ValueError(
                    f"fixed: rv = {v:g} km/s is outside rv_range {rv_range}"
                )
            out[emulator.n_labels] = v
        else:
            j = emulator.label_names.index(name)
            lo, hi = emulator.label_lo[j], emulator.label_hi[j]
            if not lo <= v <= hi:
                raise ValueError(
                    f"fixed: {name} = {v:g} is outside the training box [{lo:g}, {hi:g}]"
                )
            out[j] = (v - lo) / (hi - lo) - 0.5
    return out


def emulator_error_on(wave_obs, wave_rest, pixel_error, rv) -> np.ndarray:
    """The emulator's per-pixel error (on its rest grid) at each star's observed pixels.

    Observed pixel ``lambda`` sees the rest-frame model at ``lambda / f(rv)``
    (relativistic Doppler factor), so the error is interpolated there (linearly; 0
    off the rest grid, where the pixel has no model anyway).

    Args:
        wave_obs: (P_obs,) observed wavelength [A]; wave_rest, pixel_error: (P_rest,).
        rv: (n,) radial velocity of each star [km/s].

    Returns:
        (n, P_obs) emulator error, to add in quadrature to the flux errors.
    """
    beta = np.asarray(rv, np.float64) / C_KMS
    inv_f = np.sqrt((1.0 - beta) / (1.0 + beta))
    lam = np.asarray(wave_obs, np.float64)[None, :] * inv_f[:, None]
    return np.stack(
        [np.interp(row, wave_rest, pixel_error, left=0.0, right=0.0) for row in lam]
    )


def fill_grid(wave: np.ndarray, row: int) -> tuple[np.ndarray, np.ndarray]:
    """(filled grid (P,), missing (P,) bool) of a grid with NaN entries (row ``row``).

    Missing wavelengths are filled by linear interpolation in pixel index between
    their neighbours (the end steps extrapolated), so the grid stays strictly
    increasing; their pixels are masked."""
    ok = np.isfinite(wave)
    v = np.flatnonzero(ok)
    if v.size < 2:
        raise ValueError(
            f"wavelength row {row} has {v.size} finite value(s); at least 2 needed"
        )
    w = wave[v]
    if np.any(np.diff(w) <= 0):
        raise ValueError(
            f"wavelength row {row}: the finite wavelengths must be strictly increasing"
        )
    idx = np.arange(wave.size, dtype=np.float64)
    filled = np.interp(idx, v, w)
    head, tail = idx < v[0], idx > v[-1]
    filled[head] = w[0] - (w[1] - w[0]) * (v[0] - idx[head])
    filled[tail] = w[-1] + (w[-1] - w[-2]) * (idx[tail] - v[-1])
    return filled, ~ok


def check_rv_range(rv_range) -> tuple[float, float]:
    """``(lo, hi)`` [km/s] as floats: two finite values with lo < hi, else ValueError.

    The one rule for every method and the MDN (an infinite range cannot be scanned,
    bounded or simulated)."""
    try:
        lo, hi = (float(v) for v in rv_range)
    except (TypeError, ValueError):
        raise ValueError(
            f"rv_range must be (lo, hi) [km/s] with lo < hi, got {rv_range!r}"
        ) from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(
            f"rv_range must be (lo, hi) [km/s], finite, with lo < hi, got {(lo, hi)}"
        )
    return lo, hi
