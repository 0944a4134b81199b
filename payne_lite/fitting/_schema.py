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
8    256         emulator poor here: the fitted labels fall in a cell of the
                 emulator's validation report (a label's bin, a distance to the box
                 edge, a number of labels near an edge) whose median held-out error
                 is above ``POOR_FACTOR`` (2) times the median over all held-out
                 spectra, with at least ``POOR_MIN_COUNT`` (10) spectra in the
                 cell (:class:`payne_lite.ValidationReport`); only for emulators
                 with a report (trained by payne_lite)
9    512         localised misfit: ``max_dip``, the largest sum of the
                 normalised residuals over 5 pixels in sigma, reaches
                 :func:`._ppc.dip_limit` (noise alone does so with a chance below
                 ``DIP_FALSE_ALARM``, 1e-3, per spectrum: 5.4 sigma for 6,000
                 pixels); a line missing from the training grid, a telluric
                 residual, an unmasked bad column (:mod:`._ppc`); joint fits of
                 visits: in any visit (``max_dip`` (n_star, V), each visit
                 against the limit of its own pixels)
10   1024        second set of lines (set after the fit by
                 :meth:`._companion.Companion.add_to`, which
                 :func:`payne_lite.check_catalog` calls; a joint fit's when any of
                 its visits has it): the residuals hold a copy of
                 the fitted star's lines at another velocity at least
                 ``COMPANION_DEPTH`` (0.05) as deep as its own, at
                 ``COMPANION_NSIGMA`` (5) or more: a double-lined binary. The real
                 binary's visits (S/N 100): 0.46-0.48 at -116 and +66 km/s, 0.06 in
                 a visit where the lines blend; the real single dwarf (S/N 197):
                 0.04, a line-shape misfit (:mod:`._companion`)
===  ==========  =================================================================

The point fit itself is described in :mod:`payne_lite.fitting`.

The results schema: what every results table has, whichever method made it
(``meta["kind"]``: ``"point"``, one row per spectrum, :func:`payne_lite.fit` with
lm or curve_fit; ``"group"``, one row per star, joint visit fits; ``"posterior"``,
one row per star, the samplers' summaries). Built here (:func:`schema_meta`,
:func:`param_units`) and checked by :func:`check_results_schema`:

=========================  ===================================================
column                     meaning
=========================  ===================================================
``<label>``                each of ``meta["label_names"]``, in its unit of
                           ``meta["label_units"]`` (posterior: the median)
``<label>_err``            its 1-sigma error (posterior: half the 16-84 %
                           interval), same unit
``rv``, ``rv_err``         radial velocity [km/s]; (n_star, V) per visit for
                           ``"group"`` (NaN after a star's last visit)
``converged``              bool
``flags``                  int32 QA bitmask (bits above; ``meta["flag_bits"]``)
``n_good_pixels``          pixels with weight > 0
=========================  ===================================================

meta: ``kind``, ``method``, ``label_names``, ``label_units``, ``flag_bits``,
``rv_range`` [km/s], ``instrument`` (:meth:`payne_lite.Instrument.to_meta`, the
instrument as fitted) and ``reference``. Each kind adds its own columns (point fits:
``chi2``, ``chi2_red``, ``snr``, ``n_iter``, ``covariance`` over
``meta["cov_params"]``; group: ``group``, ``n_visits``, ``visit_rows`` and the
per-visit columns; posterior: percentiles, ``ess``, ``rhat`` ... over
``meta["sample_params"]``).
"""

from __future__ import annotations

import re

import numpy as np

# QA bit 8's thresholds, named here with the other bits' (the docs table reads them)
from ..emulator import POOR_FACTOR, POOR_MIN_COUNT  # noqa: F401
from ..observe import continuum_meta
from ._companion import (  # noqa: F401 (QA bit 10)
    COMPANION_DEPTH,
    COMPANION_NSIGMA,
    FLAG_COMPANION,
)
from ._ppc import DIP_FALSE_ALARM, chi2_pvalue, dip_limit  # noqa: F401 (QA bit 9)

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
FLAG_EMULATOR_POOR = 256
FLAG_LOCAL_MISFIT = 512
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
    8: "emulator poor here: the labels fall in a cell of the emulator's validation "
    "report with a median held-out error above POOR_FACTOR times the overall median "
    "(emulators with a report only)",
    9: "localised misfit: max_dip, the largest sum of normalised residuals over 5 "
    "pixels / sqrt(5), beyond the normal quantile at DIP_FALSE_ALARM / n_good "
    "(5.4 sigma for 6,000 pixels; joint fits of visits: in any visit)",
    10: "second set of lines (a double-lined binary): companion_depth at least "
    "COMPANION_DEPTH of the fitted star's line depth at COMPANION_NSIGMA or more "
    "(set after the fit by payne_lite.companion_search(...).add_to(table), "
    "payne_lite.check_catalog or payne-lite check)",
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


#: ``meta["kind"]`` of a results table (see the module docstring).
RESULT_KINDS = ("point", "group", "posterior")
#: Columns every results table has besides each label's and its ``_err``.
SCHEMA_COLUMNS = ("rv", "rv_err", "converged", "flags", "n_good_pixels")
#: meta keys every results table has.
SCHEMA_META = (
    "kind", "method", "label_names", "label_units", "flag_bits", "rv_range",
    "instrument", "reference",
)  # fmt: skip
#: ``flags`` column description (all kinds).
FLAGS_DESCRIPTION = "QA bitmask, see meta['flag_bits']"
#: The papers a results table rests on.
REFERENCE_PAYNE = "Ting et al. 2019, ApJ 879, 69 (The Payne)"


def param_units(emulator, names) -> list[str]:
    """Units of the fit parameters ``names`` (a layout's): each label's, km/s for
    rv (and ``rv_<v>``) and the broadening parameters, "" for continuum
    coefficients."""
    from ..observe import BROADENING_PARAMS

    units = dict(zip(emulator.label_names, emulator.label_units, strict=True))
    out = []
    for name in names:
        if name in units:
            out.append(units[name])
        elif name == "rv" or name.startswith("rv_") or name in BROADENING_PARAMS:
            out.append("km/s")
        else:
            out.append("")
    return out


def schema_meta(emulator, *, kind: str, method: str, rv_range, reference: str) -> dict:
    """The meta keys of :data:`SCHEMA_META` that the emulator and the call fix (the
    caller adds ``instrument``, as fitted)."""
    if kind not in RESULT_KINDS:
        raise ValueError(f"kind must be one of {RESULT_KINDS}, got {kind!r}")
    return dict(
        kind=kind,
        method=method,
        label_names=list(emulator.label_names),
        label_units=list(emulator.label_units),
        flag_bits={str(b): text for b, text in FLAG_BITS.items()},
        rv_range=[float(v) for v in rv_range],
        reference=reference,
    )


def check_results_schema(table) -> None:
    """Raise ``ValueError`` listing what a results table lacks of the schema (the
    module docstring): the columns of every label and :data:`SCHEMA_COLUMNS`, the
    labels' units, ``flags`` as integers, the meta keys of :data:`SCHEMA_META`."""
    meta = table.meta
    problems = [f"meta[{k!r}]" for k in SCHEMA_META if k not in meta]
    if meta.get("kind") not in (None, *RESULT_KINDS):
        problems.append(f"meta['kind'] = {meta['kind']!r} not in {RESULT_KINDS}")
    names = list(meta.get("label_names", []))
    units = list(meta.get("label_units", [""] * len(names)))
    for name, unit in zip(names, units, strict=False):
        for col in (name, f"{name}_err"):
            if col not in table.colnames:
                problems.append(f"column {col!r}")
            elif unit and table[col].unit != _unit(unit):
                problems.append(f"column {col!r} in {table[col].unit}, not {unit}")
    problems += [f"column {c!r}" for c in SCHEMA_COLUMNS if c not in table.colnames]
    if "flags" in table.colnames and table["flags"].dtype.kind not in "iu":
        problems.append(f"flags of dtype {table['flags'].dtype}, not integer")
    if meta.get("kind") == "group" and "group" not in table.colnames:
        problems.append("column 'group' (kind 'group')")
    if problems:
        raise ValueError(
            "not a payne_lite results table: missing or wrong " + "; ".join(problems)
        )


def _unit(text: str):
    """``text`` as an astropy unit (an unrecognised one as astropy reads it)."""
    from astropy import units

    return units.Unit(text, parse_strict="silent")


def poor_fit(chi2_red, ndof, snr) -> np.ndarray:
    """QA bit 7 (see the module docstring): True where the fit is beyond noise
    (``chi2_red > 1 + POOR_FIT_NSIGMA sqrt(2 / ndof)``) and the RMS misfit beyond
    noise, ``sqrt(chi2_red - 1) / snr``, exceeds ``POOR_FIT_MISFIT`` of the flux.

    Args:
        chi2_red: (n,) reduced chi2; ndof: (n,) degrees of freedom; snr: (n,)
            median ``|flux| / error`` of the pixels used.

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


def emulator_poor(emulator, labels) -> np.ndarray:
    """QA bit 8: True where physical ``labels`` (n, L) fall in a cell where the
    emulator's validation report says it is poor (all False without a report)."""
    report = getattr(emulator, "report", None)
    if report is None:
        return np.zeros(len(labels), bool)
    return report.poor(labels)


def _covariance(a, free, dtype):
    """Covariance (n, k, k) in fit space from J^T W J, and an ill-conditioned flag.

    Inverted in the correlation form (Jacobi-scaled), all stars at once; a star whose
    matrix has a non-finite entry, a non-positive diagonal, or is singular gets NaN
    and the flag.
    """
    n, k, _ = a.shape
    cov = np.full((n, k, k), 0.0)
    idx = np.flatnonzero(free)
    if idx.size == 0:  # every parameter fixed: chi2 at the given values, no errors
        return cov, np.zeros(n, bool)
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


def _hold_flat_broadening(a, free, start):
    """A broadening parameter (``start`` on) whose derivative vanishes (vsini = 0:
    rotation changes the spectrum at second order) has no error: held for the
    covariance (unit diagonal in a copy of ``a`` (n, k, k)), NaN in the table.
    Returns ``(a, held)``, ``held`` (n, k) bool."""
    n, k, _ = a.shape
    a = a.copy()
    held = np.zeros((n, k), bool)
    for j in range(start, k):
        if free[j]:
            aj = a[:, j, j]
            scale = np.max(np.abs(np.diagonal(a, axis1=1, axis2=2)), axis=1)
            held[:, j] = ~(aj > 1e-9 * scale)
            a[held[:, j], j, :] = 0.0
            a[held[:, j], :, j] = 0.0
            a[held[:, j], j, j] = 1.0
    return a, held


def error_scale_vector(emulator, layout, p) -> np.ndarray:
    """(n, k) the factor on each parameter's emulator error at the fits ``p`` (n,
    k) (``layout.names``): the emulator's :meth:`~payne_lite.Emulator.error_scale_at`
    for the labels and every rv (``rv``, or ``rv_1`` ... of a joint fit), 1 for the
    continuum and broadening."""
    n_lab = layout.n_labels
    kappa = emulator.error_scale_at(p[:, :n_lab])
    out = np.ones(p.shape)
    out[:, :n_lab] = kappa[:, :n_lab]
    for j, name in enumerate(layout.names):
        if name == "rv" or re.fullmatch(r"rv_\d+", name):
            out[:, j] = kappa[:, n_lab]
    return out


def _fit_covariance(emulator, layout, obs, free, fit):
    """The covariance (n, k, k) of the fits ``fit`` in physical units, and the
    ill-conditioned flag (n,): ``A^-1``, or with ``fit.meat`` the sandwich
    ``A^-1 meat A^-1`` plus its emulator part (``fit.meat_emu``) scaled by
    :func:`error_scale_vector`; a flat broadening parameter NaN."""
    p = fit.p
    k = p.shape[1]
    a, held = _hold_flat_broadening(fit.a, free, layout.broad_slice.start)
    cov, ill = _covariance(a, free, obs.x_obs.dtype)
    if fit.meat is not None:
        hold = held[:, :, None] | held[:, None, :]
        m = np.where(hold, 0.0, np.nan_to_num(fit.meat))
        sandwich = cov @ m @ cov
        if fit.meat_emu is not None:
            m = np.where(hold, 0.0, np.nan_to_num(fit.meat_emu))
            kap = error_scale_vector(emulator, layout, p)
            sandwich += kap[:, :, None] * (cov @ m @ cov) * kap[:, None, :]
        cov = sandwich
    for j in np.flatnonzero(held.any(axis=0)):
        cov[held[:, j], j, :] = np.nan
        cov[held[:, j], :, j] = np.nan
    # scaled -> physical: x = (s + 0.5) (hi - lo) + lo
    n_lab = layout.n_labels
    span = np.concatenate([emulator.label_hi - emulator.label_lo, np.ones(k - n_lab)])
    return cov * span[None, :, None] * span[None, None, :], ill


def results_table(
    emulator,
    layout,
    obs,
    free,
    fit,
    *,
    method,
    rv_range,
    scale_errors=False,
    emulator_error_used=False,
    n_par=None,
):
    """The results table of the fits ``fit`` (a :class:`._driver.BatchFit`, one
    row per table row) with parameters ``layout.names`` (``free`` (k,) bool);
    ``n_par`` (n,) overrides the number of free parameters of each row (joint fits
    of stars with fewer visits than the longest). With ``fit.meat`` the covariance
    is the sandwich ``A^-1 meat A^-1`` instead of ``A^-1`` (the emulator's
    correlated error, :func:`._lm.sandwich_meat`), its emulator part
    (``fit.meat_emu``) scaled per label and rv by the emulator's ``error_scale``
    at the fitted labels (:func:`error_scale_vector`)."""
    from astropy.table import Table

    p, g, n_good, snr = fit.p, fit.g, fit.n_good, fit.snr
    n, k = p.shape
    n_lab = layout.n_labels
    n_free = int(free.sum()) if n_par is None else np.asarray(n_par)
    cov, ill = _fit_covariance(emulator, layout, obs, free, fit)
    with np.errstate(divide="ignore", invalid="ignore"):
        chi2_red = np.where(n_good > n_free, fit.chi2 / (n_good - n_free), np.nan)
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
        rv_lo, rv_hi = fit.rv_lo, fit.rv_hi
        at_bound |= (np.abs(p[:, n_lab] - rv_lo) < tol_rv) & (rv_lo > rv_range[0])
        at_bound |= (np.abs(p[:, n_lab] - rv_hi) < tol_rv) & (rv_hi < rv_range[1])
        at_bound |= np.abs(p[:, n_lab] - rv_range[0]) < tol_rv
        at_bound |= np.abs(p[:, n_lab] - rv_range[1]) < tol_rv
    conv = fit.converged & ~failed
    flags = (
        np.where(conv, 0, FLAG_NOT_CONVERGED)
        | np.where(at_bound & ~failed, FLAG_AT_BOUND, 0)
        | np.where(failed, FLAG_FAILED, 0)
        | np.where(ill & ~failed, FLAG_ILL_CONDITIONED, 0)
        | np.where(outside & ~failed, FLAG_OUTSIDE_BOX, 0)
        | np.where((snr < LOW_SNR) & ~failed, FLAG_LOW_SNR, 0)
        | np.where(poor_fit(chi2_red, n_good - n_free, snr) & ~failed, FLAG_POOR_FIT, 0)
        | np.where(
            emulator_poor(emulator, phys[:, :n_lab]) & ~failed, FLAG_EMULATOR_POOR, 0
        )
    ).astype(np.int32)
    if fit.max_dip is not None:
        local = fit.max_dip >= dip_limit(n_good)
        flags = flags | np.where(local & ~failed, FLAG_LOCAL_MISFIT, 0).astype(np.int32)
    phys[failed] = np.nan
    err[failed] = np.nan
    cov[failed] = np.nan
    chi2 = np.where(failed, np.nan, fit.chi2)
    n_iter = np.where(failed, 0, fit.n_iter)

    t = Table()
    units = param_units(emulator, layout.names)
    for j, name in enumerate(layout.names):
        unit = units[j] or None
        t[name] = phys[:, j]
        t[f"{name}_err"] = err[:, j]
        if unit is not None:
            t[name].unit = unit
            t[f"{name}_err"].unit = unit
    t["chi2"] = chi2
    t["chi2_red"] = chi2_red
    t["chi2_pvalue"] = chi2_pvalue(chi2, n_good - n_free)
    t["chi2_pvalue"].description = (
        "P(chi2 >= the fit's) for a chi2 distribution with n_good_pixels - n_free "
        "degrees of freedom: uniform when the model describes the spectrum"
    )
    if fit.max_dip is not None:
        t["max_dip"] = np.where(failed, 0.0, fit.max_dip)
        t["max_dip"].description = "largest residual sum over 5 pixels [sigma] (bit 9)"
    t["n_good_pixels"] = n_good
    t["snr"] = snr
    t["n_iter"] = n_iter
    t["converged"] = conv
    t["flags"] = flags
    t["covariance"] = cov
    if fit.model is not None:
        t["model_flux"] = fit.model
    t["flags"].description = FLAGS_DESCRIPTION
    t["covariance"].description = "covariance of meta['cov_params'], physical units"
    t["n_good_pixels"].description = "pixels with weight > 0 over the whole RV window"
    t["snr"].description = "median |flux| / error over those pixels"
    t.meta.update(
        schema_meta(
            emulator,
            kind="point",
            method=method,
            rv_range=rv_range,
            reference=REFERENCE_PAYNE,
        ),
        emulator_source=str(
            emulator.meta.get("source", emulator.meta.get("trained_by", ""))
        ),
        n_pix_emulator=int(emulator.n_pix),
        **continuum_meta(layout.cont),
        cov_params=list(layout.names),
        errors_scaled_by_chi2_red=bool(scale_errors),
        emulator_error_in_likelihood=emulator_error_used,
        emulator_error_correlated=fit.meat is not None,
        emulator_error_scaled=fit.meat is not None and emulator.error_scale is not None,
        fit_dtype=str(np.dtype(obs.x_obs.dtype)),
    )
    return t
