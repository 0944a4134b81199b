"""Spectra with one wavelength grid each: fitted grid by grid."""

from __future__ import annotations

import numpy as np

from .._validate import as_float_array
from ..observe import fill_grid
from ._visits import pad_visits


def fit_per_star_grids(
    fit_spectra, flux, flux_err, emulator, wavelength, *, mask, p0, instrument,
    settings, group=None,
):  # fmt: skip
    """:func:`fit_spectra` with one wavelength grid per spectrum, (n, P).

    ``fit_spectra``: :func:`payne_lite.fitting._fit.fit_spectra`, called once per
    distinct grid (passed in: that module calls this one).

    Spectra on identical grids (and identical per-pixel ``resolution`` /
    ``lsf_sigma`` rows of ``instrument``) are fitted in one call, with every other
    setting (``settings``: the keyword arguments of :func:`fit_spectra`) passed on
    whole; the tables are stacked back in the input order, with a ``grid_group``
    column (index of the distinct grid). Every grid is checked against the
    emulator's range before anything is fitted.

    ``group`` (n,) (joint fits of visits): each grid's spectra are fitted with
    their star ids; all visits of a star must be on one grid (refused before any
    fit otherwise). The star tables are padded to the most visits of any
    (:func:`pad_visits`), their ``visit_rows`` made rows of the input, and stacked
    in the order of each star's first appearance.
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
    _, first, grid_of = np.unique(key, axis=0, return_index=True, return_inverse=True)
    grid_of = np.asarray(grid_of).reshape(-1)
    star = None if group is None else _check_star_grids(group, grid_of, per_star)
    p0_arr = None if p0 is None else np.asarray(p0, np.float64)
    tables, rows = [], []
    for g in range(first.size):
        sel = np.flatnonzero(grid_of == g)
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
            **({} if star is None else {"group": star[sel]}),
        )
        t["grid_group"] = np.full(len(t), g, np.int32)
        if star is not None:  # rows of this grid's call -> rows of the input
            vr = np.asarray(t["visit_rows"])
            t["visit_rows"] = np.where(vr >= 0, sel[np.maximum(vr, 0)], -1)
        tables.append(t)
        rows.append(sel)
    if star is not None:
        n_vis = max(int(t.meta["n_visits_max"]) for t in tables)
        tables = [pad_visits(t, n_vis) for t in tables]
        out = vstack(tables, metadata_conflicts="silent")
        out.meta = _merged_meta([t.meta for t in tables])
        # stars in the order of first appearance: of their first visit's row
        out = out[np.argsort(np.asarray(out["visit_rows"])[:, 0], kind="stable")]
        out["grid_group"].description = "index of the star's distinct wavelength grid"
        out.meta["n_wavelength_grids"] = int(first.size)
        return out
    out = vstack(tables, metadata_conflicts="silent")
    out.meta = _merged_meta([t.meta for t in tables])
    order = np.empty(n, np.int64)
    order[np.concatenate(rows)] = np.arange(n)
    out = out[order]
    out["grid_group"].description = "index of the spectrum's distinct wavelength grid"
    out.meta["n_wavelength_grids"] = int(first.size)
    return out


def _check_star_grids(group, grid_of, per_star) -> np.ndarray:
    """The star ids ``group`` (n,) as an array, after refusing a star whose visits
    are on more than one of the distinct grids ``grid_of`` (n,) int."""
    star = np.asarray(group)
    _, inv = np.unique(star, return_inverse=True)
    inv = np.asarray(inv).reshape(-1)
    pairs = np.unique(np.stack([inv, grid_of]), axis=1)
    n_grids = np.bincount(pairs[0], minlength=inv.max() + 1)
    bad = np.flatnonzero(n_grids[inv] > 1)
    if bad.size:
        i = bad[0]  # the first spectrum of a star on several grids
        what = "wavelength grids"
        if per_star:
            what += " (or per-spectrum " + " / ".join(per_star) + " rows)"
        raise ValueError(
            f"group=: the visits of star {star.tolist()[i]!r} are on "
            f"{n_grids[inv[i]]} different {what}; resample them onto one grid"
        )
    return star


def _merged_meta(metas) -> dict:
    """The meta of the grids' tables stacked: the first's (vstack would concatenate
    their lists, e.g. ``label_names``), with the largest ``lsf_sigma_pixels_max``
    and the summed ``mdn_seconds`` and ``rv_rescanned``."""
    import copy

    out = copy.deepcopy(dict(metas[0]))
    for key, how in (
        ("lsf_sigma_pixels_max", max),
        ("mdn_seconds", sum),
        ("rv_rescanned", sum),
    ):
        vals = [m[key] for m in metas if m.get(key) is not None]
        if vals:
            out[key] = how(vals)
    return out
