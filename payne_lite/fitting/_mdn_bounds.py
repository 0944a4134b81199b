"""Fits with an MDN: starts and bounds from its Gaussians, refits, its columns."""

from __future__ import annotations

import numpy as np

from ..observe import LABEL_BOUND, MDN_NSIGMA
from ._driver import FitPrior
from ._schema import (
    AT_BOUND_TOL,
    FLAG_FAILED,
    FLAG_MDN_DISAGREE,
    FLAGS_DESCRIPTION,
    MDN_FLAG_NSIGMA,
)


def mdn_prior(mdn, emulator, flux2, ivar, s_default, fix, rv_range):
    """Starts and bounds (fit space) from the MDN: mean clipped into the box, mean +-
    ``MDN_NSIGMA`` sigma intersected with the box (and ``rv_range``).

    Returns ``(prior, ok, mean, sigma)``: ``prior`` the :class:`FitPrior`; ``ok``
    (n,) False where the MDN gave no usable answer (non-finite, or an empty
    interval), those rows fall back to the default starts; the MDN's ``mean`` and
    ``sigma`` (n, L + 1), physical units.
    """
    n_lab = emulator.n_labels
    with np.errstate(divide="ignore"):
        err = np.where(ivar > 0, 1.0 / np.sqrt(ivar), np.inf)
    mean, sigma = mdn.predict(flux2, err, mask=~(ivar > 0))
    span = emulator.label_hi - emulator.label_lo
    s_m = (mean[:, :n_lab] - emulator.label_lo) / span - 0.5
    s_sd = sigma[:, :n_lab] / span
    ok = np.all(np.isfinite(mean) & np.isfinite(sigma), axis=1)
    s_m = np.where(np.isfinite(s_m), s_m, 0.0)
    s_sd = np.where(np.isfinite(s_sd), s_sd, 1.0)
    lo = np.clip(s_m - MDN_NSIGMA * s_sd, -LABEL_BOUND, LABEL_BOUND)
    hi = np.clip(s_m + MDN_NSIGMA * s_sd, -LABEL_BOUND, LABEL_BOUND)
    ok &= np.all(hi - lo > AT_BOUND_TOL[0], axis=1)
    s0 = np.clip(s_m, lo, hi)
    rv_m = np.where(np.isfinite(mean[:, n_lab]), mean[:, n_lab], 0.0)
    rv_sd = np.where(np.isfinite(sigma[:, n_lab]), sigma[:, n_lab], 1.0)
    rv_lo = np.clip(rv_m - MDN_NSIGMA * rv_sd, *rv_range)
    rv_hi = np.clip(rv_m + MDN_NSIGMA * rv_sd, *rv_range)
    ok &= rv_hi - rv_lo > AT_BOUND_TOL[1]
    rv0 = np.clip(rv_m, rv_lo, rv_hi)
    for j, v in fix.items():
        if j < n_lab:
            s0[:, j], lo[:, j], hi[:, j] = v, -LABEL_BOUND, LABEL_BOUND
        elif j == n_lab:
            rv0[:], rv_lo[:], rv_hi[:] = v, v, v
    # rows the MDN cannot inform: the default start, never used (they are refitted)
    s0 = np.where(ok[:, None], s0, s_default)
    prior = FitPrior(s0=s0, sd=s_sd, lo=lo, hi=hi, rv0=rv0, rv_lo=rv_lo, rv_hi=rv_hi)
    return prior, ok, mean, sigma


def mdn_start_points(prior: FitPrior, n_extra: int, fix, seed) -> np.ndarray:
    """Starts (n, 1 + n_extra, L) [scaled]: the MDN mean, then ``n_extra`` draws
    from its Gaussian clipped into the MDN bounds (fixed labels at their value)."""
    s0 = prior.s0[:, None, :]
    if n_extra == 0:
        return s0
    rng = np.random.default_rng(seed)
    draws = s0 + prior.sd[:, None, :] * rng.standard_normal(
        (s0.shape[0], n_extra, s0.shape[2])
    )
    draws = np.clip(draws, prior.lo[:, None, :], prior.hi[:, None, :])
    for j in fix:
        if j < s0.shape[2]:
            draws[:, :, j] = s0[:, :, j]
    return np.concatenate([s0, draws], axis=1)


def at_mdn_bound(p, prior: FitPrior, free, layout, rv_range):
    """(n,) True where a free parameter of the fits ``p`` (n, k) ended at an MDN
    bound that is not the box's (or ``rv_range``'s) edge: the fit wanted to leave
    the MDN's interval."""
    n_lab = layout.n_labels
    tol_s, tol_rv = AT_BOUND_TOL
    out = np.zeros(p.shape[0], bool)
    for j in range(n_lab):
        if not free[j]:
            continue
        lo, hi = prior.lo[:, j], prior.hi[:, j]
        out |= (np.abs(p[:, j] - lo) < tol_s) & (lo > -LABEL_BOUND + tol_s)
        out |= (np.abs(p[:, j] - hi) < tol_s) & (hi < LABEL_BOUND - tol_s)
    if free[n_lab]:
        lo, hi = prior.rv_lo, prior.rv_hi
        out |= (np.abs(p[:, n_lab] - lo) < tol_rv) & (lo > rv_range[0] + tol_rv)
        out |= (np.abs(p[:, n_lab] - hi) < tol_rv) & (hi < rv_range[1] - tol_rv)
    return out


def add_mdn_columns(t, layout, mean, sigma, refit, ok):
    """``<name>_mdn``, ``<name>_mdn_sigma`` for labels and rv, ``mdn_refit``, and the
    MDN-disagreement QA bit (see ``FLAG_MDN_DISAGREE``)."""
    names = layout.names[: layout.n_labels + 1]
    far = np.zeros(len(t), bool)
    for j, name in enumerate(names):
        unit = t[name].unit
        t[f"{name}_mdn"] = mean[:, j]
        t[f"{name}_mdn_sigma"] = sigma[:, j]
        if unit is not None:
            t[f"{name}_mdn"].unit = unit
            t[f"{name}_mdn_sigma"].unit = unit
        with np.errstate(invalid="ignore"):
            far |= (
                np.abs(np.asarray(t[name]) - mean[:, j]) > MDN_FLAG_NSIGMA * sigma[:, j]
            )
    failed = (np.asarray(t["flags"]) & FLAG_FAILED) > 0
    t["flags"] = np.asarray(t["flags"]) | np.where(
        far & ok & ~failed, FLAG_MDN_DISAGREE, 0
    ).astype(np.int32)
    t["flags"].description = FLAGS_DESCRIPTION
    t["mdn_refit"] = refit
    t["mdn_refit"].description = (
        "refitted from the default starts over the box: the MDN-bounded fit ended at "
        "an MDN bound, or was NaN, or the MDN gave no answer"
    )
