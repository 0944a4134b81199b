"""Spectra with one wavelength grid each: fitted grid by grid."""

from __future__ import annotations

import numpy as np

from .._validate import as_float_array
from ..observe import fill_grid


def fit_per_star_grids(
    fit_spectra, flux, flux_err, emulator, wavelength, *, mask, p0, instrument, settings
):
    """:func:`fit_spectra` with one wavelength grid per spectrum, (n, P).

    ``fit_spectra``: :func:`payne_lite.fitting._fit.fit_spectra`, called once per
    distinct grid (passed in: that module calls this one).

    Spectra on identical grids (and identical per-pixel ``resolution`` /
    ``lsf_sigma`` rows of ``instrument``) are fitted in one call, with every other
    setting (``settings``: the keyword arguments of :func:`fit_spectra`) passed on
    whole; the tables are stacked back in the input order, with a ``grid_group``
    column (index of the distinct grid). Every grid is checked against the
    emulator's range before anything is fitted.
    """
    from astropy.table import vstack

    wave = as_float_array(wavelength, "wavelength", ndim=2)
    f2 = np.atleast_2d(as_float_array(flux, "flux", ndim=(1, 2)))
    e2 = np.atleast_2d(as_float_array(flux_err, "flux_err", ndim=(1, 2)))
    if f2.shape != wave.shape or e2.shape != wave.shape:
        raise ValueError(
            f"with one grid per spectrum, wavelength {wave.shape}, flux "
            f"{np.shape(flux)} and flux_err {np.shape(flux_err)} must all be (n, P)"
        )
    n, n_pix = wave.shape
    m2 = np.zeros((n, n_pix), bool)
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype != bool or m.shape not in ((n_pix,), (n, n_pix)):
            raise ValueError(
                f"mask must be boolean ({n_pix},) or ({n}, {n_pix}), got "
                f"{m.dtype} {m.shape}"
            )
        m2 |= m
    per_star = {}
    for name in ("resolution", "lsf_sigma"):
        val = getattr(instrument, name)
        if isinstance(val, np.ndarray) and val.ndim == 2:
            arr = val
            if arr.shape != wave.shape:
                raise ValueError(
                    f"{name} {arr.shape} must match wavelength {wave.shape} when 2-D"
                )
            per_star[name] = arr
    filled = np.empty_like(wave)
    wave_rest = np.asarray(emulator.wavelength, np.float64)
    for i in range(n):
        filled[i], missing = fill_grid(wave[i], i)
        m2[i] |= missing
        w = wave[i][~missing]
        if w[-1] <= wave_rest[0] or w[0] >= wave_rest[-1]:
            raise ValueError(
                f"wavelength row {i}: grid [{w[0]:g}, {w[-1]:g}] A does not overlap "
                f"the emulator's [{wave_rest[0]:g}, {wave_rest[-1]:g}] A"
            )
    key = np.concatenate([filled, *per_star.values()], axis=1)
    _, first, group = np.unique(key, axis=0, return_index=True, return_inverse=True)
    group = np.asarray(group).reshape(-1)
    p0_arr = None if p0 is None else np.asarray(p0, np.float64)
    tables, rows = [], []
    for g in range(first.size):
        sel = np.flatnonzero(group == g)
        i0 = sel[0]
        t = fit_spectra(
            f2[sel],
            e2[sel],
            emulator,
            mask=m2[sel],
            wavelength=filled[i0],
            p0=p0_arr if p0_arr is None or p0_arr.ndim == 1 else p0_arr[sel],
            instrument=instrument.for_star(i0),
            **settings,
        )
        t["grid_group"] = np.full(len(t), g, np.int32)
        tables.append(t)
        rows.append(sel)
    out = vstack(tables, metadata_conflicts="silent")
    order = np.empty(n, np.int64)
    order[np.concatenate(rows)] = np.arange(n)
    out = out[order]
    out["grid_group"].description = "index of the spectrum's distinct wavelength grid"
    out.meta["n_wavelength_grids"] = int(first.size)
    return out
