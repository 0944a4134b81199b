"""QA flags of the fit results, the covariance and the results table.

QA bitmask (column ``flags``):

===  ==========  =================================================================
bit  value       meaning
===  ==========  =================================================================
0    1           not converged (iteration cap, or no downhill step at float precision
                 while the Gauss-Newton step is still > ``XTOL_STALL`` sigma)
1    2           a label at an edge of the training box, or rv at an edge of its window
2    4           failed: fewer usable pixels than free parameters (results are NaN;
                 bit 0 is set too, so a failed row has flags 5)
3    8           ill-conditioned covariance (condition number of the correlation form
                 of J^T W J above ``COND_LIMIT`` for the dtype, or not invertible)
4    16          outside the training box: a label sits at an edge of the box and the
                 chi2 gradient points out of it, so the best fit (and likely the
                 star) lies outside the emulator's training box; bit 1 is set too
5    32          low S/N: the median |flux| / error of the pixels used is below
                 ``LOW_SNR`` (10); the fit is made, the numbers are less certain
6    64          MDN disagrees (``fit(..., mdn=...)`` only): a label or rv lies more
                 than ``MDN_FLAG_NSIGMA`` (4) MDN sigmas from the MDN mean: the
                 spectrum is unlike the MDN's training spectra, or the fit or the
                 MDN went wrong (the cheapest out-of-distribution signal)
7    128         poor fit: the model does not describe the spectrum (a double-lined
                 binary, a star unlike the training set, bad data). Both:
                 ``chi2_red > 1 + POOR_FIT_NSIGMA sqrt(2 / ndof)`` (beyond what noise
                 explains: 5 sigma of the chi2 distribution with ``ndof = n_good -
                 n_free`` degrees of freedom, so the threshold falls with the number
                 of pixels: 1.09 for 6,000 pixels) and ``sqrt(chi2_red - 1) / snr >
                 POOR_FIT_MISFIT`` (0.012: the residuals' RMS beyond the noise is more
                 than 1.2 % of the flux). chi2_red alone grows with S/N for any model
                 error: The Payne's APOGEE network fits a real single dwarf
                 (2M13012770+5754582, S/N 197) with chi2_red 4.0, a 0.9 % misfit,
                 while single-star fits of a double-lined binary's visits
                 (2M06133561+2433362, S/N 100) have chi2_red 3.6-8.6, misfits
                 1.6-2.7 % (cont_deg 0-2). The 1.2 % is set between those two real
                 cases; a fit of a joint group uses the visits' S/N
===  ==========  =================================================================

The point fit itself is described in :mod:`payne_lite.fitting`.
"""

from __future__ import annotations

import numpy as np

#: Covariance condition-number limit (correlation form) per dtype.
COND_LIMIT = {np.dtype(np.float32): 1e6, np.dtype(np.float64): 1e12}
#: Distance from a bound counted as "at the bound": scaled labels, rv [km/s].
AT_BOUND_TOL = (1e-6, 1e-4)

FLAG_NOT_CONVERGED = 1
FLAG_AT_BOUND = 2
FLAG_FAILED = 4
FLAG_ILL_CONDITIONED = 8
FLAG_OUTSIDE_BOX = 16
FLAG_LOW_SNR = 32
FLAG_MDN_DISAGREE = 64
FLAG_POOR_FIT = 128
FLAG_BITS = {
    0: "not converged",
    1: "at a bound (training box or rv window)",
    2: "failed: too few usable pixels",
    3: "ill-conditioned covariance",
    4: "outside the training box: a label at a box edge with chi2 still falling outwards",
    5: "low S/N: median |flux| / error of the used pixels below LOW_SNR",
    6: "MDN disagrees: a label or rv more than MDN_FLAG_NSIGMA MDN sigmas from the "
    "MDN mean (fits with an MDN only)",
    7: "poor fit: chi2_red > 1 + POOR_FIT_NSIGMA sqrt(2 / ndof) and the misfit beyond "
    "noise, sqrt(chi2_red - 1) / snr, above POOR_FIT_MISFIT of the flux",
}
#: QA bit 7 (poor fit): chi2_red beyond 1 + POOR_FIT_NSIGMA sqrt(2 / ndof) ...
POOR_FIT_NSIGMA = 5.0
#: ... and an RMS misfit beyond the noise, sqrt(chi2_red - 1) / snr, above this
#: fraction of the flux.
POOR_FIT_MISFIT = 0.012
#: With an MDN: QA bit 6 when the fit is more than this many MDN sigmas from its mean.
MDN_FLAG_NSIGMA = 4.0
#: Median S/N per pixel below which a fit is flagged low_snr (bit 5).
LOW_SNR = 10.0


def poor_fit(chi2_red, ndof, snr) -> np.ndarray:
    """QA bit 7 (see the module docstring): True where the fit is beyond noise
    (``chi2_red > 1 + POOR_FIT_NSIGMA sqrt(2 / ndof)``) and the RMS misfit beyond
    noise, ``sqrt(chi2_red - 1) / snr``, exceeds ``POOR_FIT_MISFIT`` of the flux.

    Args:
        chi2_red: (n,) reduced chi2; ndof: (n,) degrees of freedom; snr: (n,)
            median |flux| / error of the pixels used.

    Returns:
        (n,) bool (False where any input is NaN or ``ndof`` < 1).
    """
    chi2_red = np.asarray(chi2_red, np.float64)
    ndof = np.asarray(ndof, np.float64)
    snr = np.asarray(snr, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        beyond = chi2_red > 1.0 + POOR_FIT_NSIGMA * np.sqrt(2.0 / ndof)
        misfit = np.sqrt(np.clip(chi2_red - 1.0, 0.0, None)) / snr
        out = beyond & (ndof >= 1) & (misfit > POOR_FIT_MISFIT)
    return np.asarray(out & np.isfinite(chi2_red), bool)


def _covariance(a, free, dtype):
    """Covariance (n, k, k) in fit space from J^T W J, and an ill-conditioned flag.

    Inverted in the correlation form (Jacobi-scaled), all stars at once; a star whose
    matrix has a non-finite entry, a non-positive diagonal, or is singular gets NaN
    and the flag.
    """
    n, k, _ = a.shape
    cov = np.full((n, k, k), 0.0)
    idx = np.flatnonzero(free)
    limit = COND_LIMIT.get(np.dtype(dtype), 1e6)
    af = a[:, idx[:, None], idx[None, :]]
    d = np.diagonal(af, axis1=1, axis2=2)
    ok = np.all(np.isfinite(af), axis=(1, 2)) & np.all(d > 0, axis=1)
    s = 1.0 / np.sqrt(np.where(ok[:, None], d, 1.0))
    corr = np.where(
        ok[:, None, None], af * s[:, :, None] * s[:, None, :], np.eye(idx.size)
    )
    with np.errstate(all="ignore"):
        sv = np.linalg.svd(corr, compute_uv=False)
        cond = sv[:, 0] / sv[:, -1]
    ok &= sv[:, -1] > 0
    ci = np.full_like(corr, np.nan)
    if ok.any():
        try:
            ci[ok] = np.linalg.inv(corr[ok])
        except np.linalg.LinAlgError:  # a singular one among them: star by star
            for i in np.flatnonzero(ok):
                try:
                    ci[i] = np.linalg.inv(corr[i])
                except np.linalg.LinAlgError:
                    ok[i] = False
    ill = ~ok | ~(np.isfinite(cond) & (cond < limit))
    block = np.where(ok[:, None, None], ci * s[:, :, None] * s[:, None, :], np.nan)
    cov[:, idx[:, None], idx[None, :]] = block
    return cov, ill


def results_table(
    emulator,
    layout,
    obs,
    free,
    p,
    chi2,
    a,
    g,
    snr,
    n_iter,
    conv,
    n_good,
    rv_lo,
    rv_hi,
    model_flux,
    *,
    method,
    rv_range,
    scale_errors=False,
    emulator_error_used=False,
    n_par=None,
    meat=None,
):
    """The results table; ``n_par`` (n,) overrides the number of free parameters of
    each row (joint fits of stars with fewer visits than the longest); ``meat``
    (n, k, k): the covariance is the sandwich ``A^-1 meat A^-1`` instead of
    ``A^-1`` (the emulator's correlated error, :func:`._lm.sandwich_meat`)."""
    from astropy.table import Table

    n, k = p.shape
    n_lab = layout.n_labels
    n_free = int(free.sum()) if n_par is None else np.asarray(n_par)
    # A broadening parameter whose derivative vanishes (vsini = 0: rotation changes
    # the spectrum at second order) has no error: held for the covariance, NaN.
    a = a.copy()
    held = np.zeros((n, k), bool)
    for j in range(layout.broad_slice.start, k):
        if free[j]:
            aj = a[:, j, j]
            scale = np.max(np.abs(np.diagonal(a, axis1=1, axis2=2)), axis=1)
            held[:, j] = ~(aj > 1e-9 * scale)
            a[held[:, j], j, :] = 0.0
            a[held[:, j], :, j] = 0.0
            a[held[:, j], j, j] = 1.0
    cov, ill = _covariance(a, free, obs.x_obs.dtype)
    if meat is not None:
        m = np.where(held[:, :, None] | held[:, None, :], 0.0, np.nan_to_num(meat))
        cov = cov @ m @ cov
    for j in np.flatnonzero(held.any(axis=0)):
        cov[held[:, j], j, :] = np.nan
        cov[held[:, j], :, j] = np.nan
    # scaled -> physical: x = (s + 0.5) (hi - lo) + lo
    span = np.concatenate([emulator.label_hi - emulator.label_lo, np.ones(k - n_lab)])
    cov = cov * span[None, :, None] * span[None, None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        chi2_red = np.where(n_good > n_free, chi2 / (n_good - n_free), np.nan)
    if scale_errors:
        cov = cov * np.maximum(np.nan_to_num(chi2_red, nan=1.0), 1.0)[:, None, None]
    err = np.sqrt(np.clip(np.diagonal(cov, axis1=1, axis2=2), 0.0, None))
    err = np.where(np.isnan(np.diagonal(cov, axis1=1, axis2=2)), np.nan, err)
    phys = p.copy()
    phys[:, :n_lab] = emulator.unscale(p[:, :n_lab])

    failed = n_good <= n_free
    at_bound = np.zeros(n, bool)
    outside = np.zeros(n, bool)
    tol_s, tol_rv = AT_BOUND_TOL
    for j in range(n_lab):
        if free[j]:
            at_bound |= np.abs(np.abs(p[:, j]) - 0.5) < tol_s
            # at an edge with chi2 still falling outwards (g = J^T W r = chi2'/2)
            outside |= (p[:, j] > 0.5 - tol_s) & (g[:, j] < 0)
            outside |= (p[:, j] < -0.5 + tol_s) & (g[:, j] > 0)
    for j in range(layout.broad_slice.start, k):
        if free[j]:  # the upper bound only: 0 is a physical value
            at_bound |= np.abs(p[:, j] - layout.upper[j]) < tol_rv
    if free[n_lab]:
        at_bound |= (np.abs(p[:, n_lab] - rv_lo) < tol_rv) & (rv_lo > rv_range[0])
        at_bound |= (np.abs(p[:, n_lab] - rv_hi) < tol_rv) & (rv_hi < rv_range[1])
        at_bound |= np.abs(p[:, n_lab] - rv_range[0]) < tol_rv
        at_bound |= np.abs(p[:, n_lab] - rv_range[1]) < tol_rv
    conv = conv & ~failed
    flags = (
        np.where(conv, 0, FLAG_NOT_CONVERGED)
        | np.where(at_bound & ~failed, FLAG_AT_BOUND, 0)
        | np.where(failed, FLAG_FAILED, 0)
        | np.where(ill & ~failed, FLAG_ILL_CONDITIONED, 0)
        | np.where(outside & ~failed, FLAG_OUTSIDE_BOX, 0)
        | np.where((snr < LOW_SNR) & ~failed, FLAG_LOW_SNR, 0)
        | np.where(poor_fit(chi2_red, n_good - n_free, snr) & ~failed, FLAG_POOR_FIT, 0)
    ).astype(np.int32)
    phys[failed] = np.nan
    err[failed] = np.nan
    cov[failed] = np.nan
    chi2 = np.where(failed, np.nan, chi2)
    n_iter = np.where(failed, 0, n_iter)

    t = Table()
    n_broad = len(layout.broadening)
    units = (
        list(emulator.label_units)
        + ["km/s"]
        + [""] * (k - n_lab - 1 - n_broad)
        + ["km/s"] * n_broad
    )
    for j, name in enumerate(layout.names):
        unit = units[j] or None
        t[name] = phys[:, j]
        t[f"{name}_err"] = err[:, j]
        if unit is not None:
            t[name].unit = unit
            t[f"{name}_err"].unit = unit
    t["chi2"] = chi2
    t["chi2_red"] = chi2_red
    t["n_good_pixels"] = n_good
    t["snr"] = snr
    t["n_iter"] = n_iter
    t["converged"] = conv
    t["flags"] = flags
    t["covariance"] = cov
    if model_flux is not None:
        t["model_flux"] = model_flux
    t["flags"].description = "QA bitmask, see meta['flag_bits']"
    t["covariance"].description = "covariance of meta['cov_params'], physical units"
    t["n_good_pixels"].description = "pixels with weight > 0 over the whole RV window"
    t["snr"].description = "median |flux| / error over those pixels"
    t.meta.update(
        label_names=list(emulator.label_names),
        label_units=list(emulator.label_units),
        emulator_source=str(
            emulator.meta.get("source", emulator.meta.get("trained_by", ""))
        ),
        n_pix_emulator=int(emulator.n_pix),
        method=method,
        cont_deg=layout.cont_deg,
        rv_range=list(rv_range),
        cov_params=list(layout.names),
        errors_scaled_by_chi2_red=bool(scale_errors),
        emulator_error_in_likelihood=emulator_error_used,
        emulator_error_correlated=meat is not None,
        flag_bits={str(b): s for b, s in FLAG_BITS.items()},
        fit_dtype=str(np.dtype(obs.x_obs.dtype)),
        reference="Ting et al. 2019, ApJ 879, 69 (The Payne)",
    )
    return t
