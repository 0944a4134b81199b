"""The NumPy boundary of a fit: batch context, starts and rescue, one batch, batches."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._serial import host_pool, to_device
from ..observe import RV_WINDOW, ObsModel, emulator_error_on
from ._curve_fit import curve_fit_one
from ._gls import gls_refine
from ._lm import (
    LMRows,
    final_batch,
    lm_batch,
    lm_rows,
    model_batch,
    sandwich_meat,
    visit_index,
)
from ._ppc import dip_batch
from ._rvscan import (
    RV_PROBE_CELLS,
    chi2_batch,
    rescan_batch,
    rv_pixel_kms,
    rv_polish,
    scan_batch,
    screen_starts,
    search_model,
    window_batch,
)
from ._schema import AT_BOUND_TOL

Array = jax.Array

#: LM: a fit from the best-screened start with chi2 above ndof + RESCUE_SIGMA *
#: sqrt(2 ndof) is refitted from the other starts (see :func:`lm_with_starts`).
RESCUE_SIGMA = 5.0


class BatchContext(NamedTuple):
    """What every batch of one :func:`fit` call shares."""

    obs: ObsModel
    layout: object
    fix: dict
    free: np.ndarray
    method: str
    rv_range: tuple
    rv_grid: Array
    scan_pixels: np.ndarray | None
    s_scan: Array
    b_scan: Array  # (n_broad,) start values of the broadening parameters [km/s]
    max_iter: int
    return_model: bool
    emulator_error: tuple | None  # (wave_rest, wave_obs, pixel_error) or None
    profile: bool = False  # continuum="profile": variable projection
    error_basis: Array | None = None  # (K, P_rest) Emulator.error_basis, or None
    gls: bool = False  # estimator="gls": GLS steps under C from each fit (._gls)
    # estimator="gls" with Emulator.local_error: (its stacked rows with the
    # error_basis (device array), the LocalError); None: error_basis for every star
    local_error: tuple | None = None


class FitPrior(NamedTuple):
    """Starts and bounds of fits that do not take them from the RV scan, one row
    per spectrum, in fit space: the MDN's (:func:`._mdn_bounds.mdn_prior`), or
    those of a second scan with the star's own labels (:func:`rescan_prior`).

    Attributes:
        s0: (n, L) starting labels, scaled (the box is -0.5 .. 0.5): the MDN mean
            clipped into ``lo`` .. ``hi`` (the default start where the MDN gave
            no answer); a rescan's: the fit's labels.
        sd: (n, L) the MDN's sigma, scaled (1 where not finite; a rescan's: 1).
        lo: (n, L) lower label bounds, scaled: mean - ``MDN_NSIGMA`` sigma, in the
            box (fixed labels, and a rescan's: the box).
        hi: (n, L) upper label bounds, scaled: mean + ``MDN_NSIGMA`` sigma, in the
            box (fixed labels, and a rescan's: the box).
        rv0: (n,) starting rv [km/s].
        rv_lo: (n,) lower end of the rv window [km/s], in ``rv_range``.
        rv_hi: (n,) upper end of the rv window [km/s], in ``rv_range``.
        c0: (n, max(n_cont, 1)) starting continuum coefficients (a rescan's, at
            its rv), or None: flat (the MDN knows no continuum).
    """

    s0: np.ndarray
    sd: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    rv0: np.ndarray
    rv_lo: np.ndarray
    rv_hi: np.ndarray
    c0: np.ndarray | None = None


class Prepared(NamedTuple):
    """Steps 1-2 of a fit (:func:`prepare_batch`), one row per spectrum.

    Attributes:
        rv0: (n,) rv of the scan (or the MDN's, or the fixed one) [km/s].
        rv_lo: (n,) lower end of the fit's rv window [km/s].
        rv_hi: (n,) upper end of the fit's rv window [km/s].
        c0: (n, max(n_cont, 1)) continuum coefficients at ``rv0`` (flat with an MDN).
        w_fit: (n, P) inverse variances of the fit [flux^-2]: zero outside the pixels
            valid over the whole rv window, the emulator's error added in quadrature.
        w_data: (n, P) those of the data alone [flux^-2] (for the S/N).
        snr: (n,) median |flux| / error of the pixels used (:func:`median_snr`), or
            None (:func:`prepare_batch` leaves it; the joint fits add it).
    """

    rv0: np.ndarray
    rv_lo: np.ndarray
    rv_hi: np.ndarray
    c0: np.ndarray
    w_fit: np.ndarray
    w_data: np.ndarray
    snr: np.ndarray | None = None


class BatchFit(NamedTuple):
    """The per-row results of point fits in fit space, one row per spectrum (per
    star for joint fits of visits): what :func:`._schema.results_table` turns
    into the table.

    Attributes:
        p: (n, k) best parameter vectors, ``layout.names``: scaled labels (the box
            is -0.5 .. 0.5), rv [km/s], continuum coefficients, broadening [km/s].
        chi2: (n,) chi2 at ``p`` (``estimator="gls"``: ``r^T C^-1 r``).
        a: (n, k, k) J^T W J at ``p`` (fit space; GLS: ``J^T C^-1 J``).
        g: (n, k) J^T W r at ``p``: half the chi2 gradient (GLS: ``J^T C^-1 r``).
        snr: (n,) median |flux| / error of the pixels used (joint fits: the
            visits' combined, sqrt(sum snr_v^2)).
        n_iter: (n,) int LM iterations (curve_fit: function evaluations); after an
            MDN refit, both passes'.
        converged: (n,) bool.
        n_good: (n,) int pixels with weight > 0 (joint fits: of all visits).
        rv_lo: (n,) lower end of the rv window [km/s] (joint fits: the first
            visit's).
        rv_hi: (n,) upper end of the rv window [km/s] (joint fits: the first
            visit's).
        model: (n, P) model flux at ``p`` ((n, V, P) for joint fits, NaN for
            padding visits), or None when not asked for.
        meat: (n, k, k) the sandwich meat of the flux errors, ``J^T W D W J``
            (:func:`._lm.sandwich_meat`), or None without the emulator's error
            basis.
        meat_emu: (n, k, k) that of the emulator's correlated error,
            ``J^T W B^T B W J``, or None likewise: kept apart, since the table
            scales it by the emulator's ``error_scale`` at the fitted labels.
        max_dip: (n,) largest window sum of the residuals in sigma
            (:func:`._ppc.max_dip`), or None (joint fits).
    """

    p: np.ndarray
    chi2: np.ndarray
    a: np.ndarray
    g: np.ndarray
    snr: np.ndarray
    n_iter: np.ndarray
    converged: np.ndarray
    n_good: np.ndarray
    rv_lo: np.ndarray
    rv_hi: np.ndarray
    model: np.ndarray | None = None
    meat: np.ndarray | None = None
    meat_emu: np.ndarray | None = None
    max_dip: np.ndarray | None = None


def take_rows(res, rows):
    """``res``, a NamedTuple of per-row arrays (:class:`BatchFit`,
    :class:`Prepared`, ``FitPrior`` ...), at ``rows`` (indices, mask or slice);
    None fields stay None."""
    return type(res)(*(None if val is None else val[rows] for val in res))


def scatter_rows(full, rows, part, n: int = 0):
    """Write ``part``'s rows into ``full`` (same NamedTuple type) at ``rows``, in
    place, and return ``full``; ``full`` None: zeros of ``n`` rows in ``part``'s
    shapes and dtypes first. A field None in either is left as it is."""
    if full is None:
        full = type(part)(
            *(
                None if val is None else np.zeros((n, *val.shape[1:]), val.dtype)
                for val in part
            )
        )
    for dst, src in zip(full, part, strict=True):
        if dst is not None and src is not None:
            dst[rows] = src
    return full


def lm_with_starts(
    ctx, p_start, alive, f_j, w_j, lo, hi, n_good, n_visits=0, free=None
):
    """LM from the best-screened start; the other starts only for doubtful fits.
    Returns the :class:`._lm.LMRows` of the best fit of each star.

    ``n_visits`` > 0: joint fits of several spectra per star (``f_j``, ``w_j``
    (n, V, P); parameters of :func:`visit_index`); ``free`` then replaces
    ``ctx.free`` (the joint vector's).

    1. Screening: chi2 at every start (the model only, no Jacobian), ranked per
       star; the default starts, the same for every star, are evaluated once per
       batch and shifted to each star's rv (:func:`._rvscan.screen_starts`).
    2. LM from each star's best start, to convergence.
    3. Rescue: a star whose fit did not converge, stopped at an edge of the training
       box, or has ``chi2 > ndof + RESCUE_SIGMA sqrt(2 ndof)`` (more than noise can
       explain) is fitted again from each of its other starts, and the lowest chi2
       is kept.
    4. RV polish (a free rv), for every fit: chi2 probed at rv offsets with the
       rest held (each visit's alone in joint fits); a star with a lower probe is
       fitted again from it (:func:`rv_polish`). With a smooth Doppler
       interpolant chi2(rv) has no kinks, but a fit can still stop in the basin
       next to the true one when the scan (box-centre template) started it there,
       and its chi2 does not tell: of 180 spectra of the APOGEE network at S/N 50
       (tests/test_visits.py's stars fitted one by one) two ended 8.5 and 11.9 km/s
       off, the second at chi2 +2.09 sigma of the noise, below the 98th percentile
       of all the fits (+2.11). Probing only the doubtful fits missed them; probing
       all finds them, and
       on 1,000 mocks at S/N 30 cut the rvs beyond 3 sigma from 0.8 % to 0.5 %
       (beyond 5 sigma 5 -> 2) for 0-10 % more fit time (one probe per star; the
       refits are few).

    Measured on 512 noisy spectra of the real APOGEE network (S/N 100 and 30), the
    best of three starts after 8 steps was never more than chi2 + 1 below the centre
    start's: running all starts for every star spent 2/3 of the LM on insurance
    that did not pay. On data the emulator does not fit to the noise (real spectra,
    chi2_red of a few), every star is rescued, i.e. fitted from every start, as
    before.
    """
    obs = ctx.obs
    free = ctx.free if free is None else free
    mode = (int(n_visits), ctx.profile)
    dt = obs.x_obs.dtype
    size, n_s, _ = p_start.shape
    rows = np.arange(size)
    bounds = (to_device(lo, dt), to_device(hi, dt), to_device(free))
    if n_s > 1 and n_visits:
        # screened visit by visit (one spectrum each), chi2 summed over visits
        idx = visit_index(ctx.layout.n_labels, n_visits, obs.n_cont, obs.n_broad)
        pv = np.swapaxes(p_start[:, :, idx], 1, 2).reshape(size * n_visits, n_s, -1)
        c0 = chi2_batch(
            search_model(obs),
            to_device(pv, dt),
            f_j.reshape(size * n_visits, -1),
            w_j.reshape(size * n_visits, -1),
        )
        c0 = np.asarray(c0, np.float64).reshape(size, n_visits, n_s).sum(axis=1)
    elif n_s > 1:
        c0 = screen_starts(obs, p_start, f_j, w_j)
    if n_s > 1:
        order = np.argsort(np.where(np.isfinite(c0), c0, np.inf), axis=1, kind="stable")
        p_start = p_start[rows[:, None], order]
    best = lm_rows(
        lm_batch(
            obs,
            to_device(p_start[:, :1], dt),
            to_device(alive[:, None]),
            f_j,
            w_j,
            *bounds,
            max_iter=ctx.max_iter,
            mode=mode,
        )
    )
    if n_s > 1:
        best = _rescue(ctx, p_start, alive, f_j, w_j, bounds, n_good, free, mode, best)
    if free[ctx.layout.rv_index] and alive.any():
        best = rv_polish(ctx, alive, f_j, w_j, bounds, lo, hi, mode, best, n_visits)
    return best


def doubtful_fits(ctx, best: LMRows, n_good, free) -> np.ndarray:
    """(n,) bool: fits that did not converge, stopped at an edge of the training
    box, or have ``chi2 > ndof + RESCUE_SIGMA * sqrt(2 ndof)`` (more than noise can
    explain)."""
    n_lab = ctx.layout.n_labels
    ndof = np.maximum(n_good - int(free.sum()), 1)
    at_edge = np.any(
        free[:n_lab] & (np.abs(np.abs(best.p[:, :n_lab]) - 0.5) < AT_BOUND_TOL[0]),
        axis=1,
    )
    return ~best.conv | at_edge | (best.chi2 > ndof + RESCUE_SIGMA * np.sqrt(2 * ndof))


def _rescue(ctx, p_start, alive, f_j, w_j, bounds, n_good, free, mode, best: LMRows):
    """Step 3 of :func:`lm_with_starts`: doubtful fits again from the other starts;
    returns ``best`` with the better ones replaced."""
    dt = ctx.obs.x_obs.dtype
    size, n_s, _ = p_start.shape
    again = alive & doubtful_fits(ctx, best, n_good, free)
    if not again.any():
        return best
    # one start per call: the (n, 1, k) shape of step 2's executable (a lane that
    # does not run costs nothing), so no shape of its own to compile
    tries = [
        lm_rows(
            lm_batch(
                ctx.obs,
                to_device(p_start[:, j : j + 1], dt),
                to_device(again[:, None]),
                f_j,
                w_j,
                *bounds,
                max_iter=ctx.max_iter,
                mode=mode,
            )
        )
        for j in range(1, n_s)
    ]
    j = np.argmin(np.stack([t.chi2 for t in tries], axis=1), axis=1)
    pick = LMRows(
        *(np.stack(f, axis=1)[np.arange(size), j] for f in zip(*tries, strict=True))
    )
    return best.where(again & (pick.chi2 < best.chi2), pick)


def prepare_batch(ctx: BatchContext, fb, wb, prior=None, f_j=None) -> Prepared:
    """Steps 1-2 of a fit for a padded batch of spectra ``fb``, ``wb`` (size, P):
    the RV scan (or the MDN's ``prior``, a :class:`FitPrior`, or a
    fixed rv), the pixels valid over each RV window and the emulator's error in
    the weights. Returns them as :class:`Prepared` (without ``snr``)."""
    obs, layout, fix = ctx.obs, ctx.layout, ctx.fix
    dt = obs.x_obs.dtype
    size = fb.shape[0]
    rv_range = ctx.rv_range
    f_j = to_device(fb, dt) if f_j is None else f_j  # the caller's, when it has one
    w_j = to_device(wb, dt)

    # 1. RV scan (and linear continuum at the best RV).
    if prior is not None:
        rv0 = np.asarray(prior.rv0, np.float64)
        rv_lo = np.asarray(prior.rv_lo, np.float64)
        rv_hi = np.asarray(prior.rv_hi, np.float64)
        if prior.c0 is not None:
            c0 = prior.c0
        elif obs.n_cont:
            c0 = np.broadcast_to(obs.cont.flat(), (size, obs.n_cont)).copy()
        else:
            c0 = np.ones((size, 1))
    elif layout.rv_index in fix:
        rv0 = np.full(size, fix[layout.rv_index])
        _, c0 = scan_batch(
            obs, ctx.s_scan, ctx.b_scan, to_device(rv0[:1], dt), f_j, w_j
        )
        rv_lo, rv_hi = rv0, rv0
    else:
        if ctx.scan_pixels is None:
            rv0, c0 = scan_batch(obs, ctx.s_scan, ctx.b_scan, ctx.rv_grid, f_j, w_j)
        else:
            w_scan = to_device(np.where(ctx.scan_pixels, wb, 0.0), dt)
            rv0, c0 = scan_batch(
                obs, ctx.s_scan, ctx.b_scan, ctx.rv_grid, f_j, w_scan, common=True
            )
        rv0 = np.asarray(rv0, np.float64)
        rv_lo, rv_hi = rv_window(rv0, rv_range)
    c0 = np.asarray(c0, np.float64)

    # 2. Pixels valid over the whole RV window carry the weight.
    valid = np.asarray(window_batch(obs, to_device(rv_lo, dt), to_device(rv_hi, dt)))
    wb = np.where(valid, wb, 0.0)
    w_data = wb  # the observed errors alone (for the S/N column)
    if ctx.emulator_error is not None:
        wave_rest, wave_obs, pixel_error = ctx.emulator_error
        pe = emulator_error_on(wave_obs, wave_rest, pixel_error, rv0)
        with np.errstate(divide="ignore"):
            wb = np.where(wb > 0, 1.0 / (1.0 / wb + pe**2), 0.0)
    return Prepared(rv0, rv_lo, rv_hi, c0, wb, w_data)


def rv_window(rv0, rv_range):
    """The fit's rv window around the scan's ``rv0`` (n,): ``rv0 +- RV_WINDOW``
    inside ``rv_range``; returns ``(rv_lo, rv_hi)``."""
    return np.maximum(rv0 - RV_WINDOW, rv_range[0]), np.minimum(
        rv0 + RV_WINDOW, rv_range[1]
    )


def median_snr(fb, wb, w_data):
    """(size,) median |flux| / error (data errors) over the pixels with ``wb > 0``
    (sorted rows, the unused pixels as +inf at the end: 10x faster than nanmedian
    row by row); 0 for rows without any."""
    size, n_pix = fb.shape
    snr = np.where(wb > 0, np.sqrt(w_data) * np.abs(fb), np.inf).astype(np.float32)
    snr.sort(axis=1)
    cnt = np.count_nonzero(wb > 0, axis=1)
    rows = np.arange(size)
    lo_i, hi_i = np.maximum(cnt - 1, 0) // 2, np.minimum(cnt // 2, n_pix - 1)
    snr = np.where(cnt > 0, 0.5 * (snr[rows, lo_i] + snr[rows, hi_i]), 0.0)
    return snr.astype(np.float64)


def cont_bounds(lo, hi, c0):
    """The continuum coefficients' bounds ``lo``, ``hi`` (n, n_cont) of the
    layout (+-``CONT_BOUND``, for normalised flux) scaled by each star's flux level,
    the largest of its starting coefficients ``c0`` (n, n_cont) (at least 1): the
    continuum of unnormalised flux is in the flux's units."""
    level = np.maximum(1.0, np.max(np.abs(np.nan_to_num(c0)), axis=1))[:, None]
    return lo * level, hi * level


def _fit_batch(ctx: BatchContext, fb, wb, sb, m, prior=None) -> BatchFit:
    """Fit one padded batch: ``fb``, ``wb`` (size, P) flux and inverse variance,
    ``sb`` (size, S, L) scaled starting labels; rows from ``m`` on are padding.

    ``prior`` (the MDN path, or a rescan's): the batch's rows of a
    :class:`FitPrior`; then there is no RV scan (the continuum, if any, starts at
    ``prior.c0``, flat without one), the rv window is the prior's and the labels
    are bounded by its ``lo``/``hi`` instead of the box."""
    obs, layout, free = ctx.obs, ctx.layout, ctx.free
    dt = obs.x_obs.dtype
    size, n_pix = fb.shape
    n_lab = layout.n_labels
    k = len(layout.names)
    n_free = int(free.sum())
    f_j = to_device(fb, dt)
    prep = prepare_batch(ctx, fb, wb, prior, f_j)
    wb, w_data = prep.w_fit, prep.w_data
    w_j = to_device(wb, dt)
    n_good = np.count_nonzero(wb > 0, axis=1)
    # The S/N (a sort of every row on the host) runs beside the fit's XLA programs,
    # on a core that a batch of its own does not use (measured, 7 interleaved runs
    # each: fits of 40 / 128 / 300 spectra 1.19x / 1.04x / 1.07x faster).
    snr_job = host_pool().submit(median_snr, fb[:m], wb[:m], w_data[:m])
    # Padding rows, and stars with too few pixels (flagged failed later), do not run.
    alive = (np.arange(size) < m) & (n_good > n_free)

    # 3. Starting parameter vectors (size, S, k) and per-star bounds (size, k).
    n_s = sb.shape[1]
    p_start = np.zeros((size, n_s, k))
    p_start[:, :, :n_lab] = sb
    p_start[:, :, n_lab] = prep.rv0[:, None]
    if obs.n_cont:
        p_start[:, :, layout.cont_slice] = prep.c0[:, None, :]
    if layout.broadening:
        p_start[:, :, layout.broad_slice] = np.asarray(ctx.b_scan, np.float64)
    lo = np.broadcast_to(layout.lower, (size, k)).copy()
    hi = np.broadcast_to(layout.upper, (size, k)).copy()
    lo[:, n_lab], hi[:, n_lab] = prep.rv_lo, prep.rv_hi
    if obs.n_cont:
        lo[:, layout.cont_slice], hi[:, layout.cont_slice] = cont_bounds(
            lo[:, layout.cont_slice], hi[:, layout.cont_slice], prep.c0
        )
    if prior is not None:
        lo[:, :n_lab], hi[:, :n_lab] = prior.lo, prior.hi
    p_start = np.clip(p_start, lo[:, None], hi[:, None])

    model_f = None
    if ctx.method == "lm":
        # chi2, J^T W J and J^T W r at each fit come from its last LM evaluation
        best = lm_with_starts(ctx, p_start, alive, f_j, w_j, lo, hi, n_good)
        p_best, it_best, conv_best = best.p, best.n_iter, best.conv
        chi2_f, a_f, g_f, dip_f = best.chi2, best.a, best.g, best.dip
        if ctx.profile:  # the full J^T W J at (theta, c*): the table's covariance
            chi2_f, a_f, g_f, _ = final_batch(obs, to_device(p_best, dt), f_j, w_j)
        if ctx.return_model:
            model_f = model_batch(obs, to_device(p_best, dt))
    else:
        p_best = p_start[:, 0].copy()
        it_best = np.zeros(size, np.int64)
        conv_best = np.zeros(size, bool)
        for i in np.flatnonzero(alive):
            p_i, _, it_i, conv_i = curve_fit_one(
                obs, p_start[i], fb[i], wb[i], lo[i], hi[i], free, ctx.max_iter
            )
            p_best[i], it_best[i], conv_best[i] = p_i, it_i, conv_i
        chi2_f, a_f, g_f, model_f = final_batch(obs, to_device(p_best, dt), f_j, w_j)
        dip_f = dip_batch(obs, to_device(p_best, dt), f_j, w_j)  # the residuals' check
    dips = np.where(np.arange(size) < m, np.asarray(dip_f, np.float64), 0.0)
    snr = np.zeros(size)
    snr[:m] = snr_job.result()  # the padding rows are not sorted
    meat = meat_emu = None
    if ctx.gls:  # the minimum of r^T C^-1 r; its covariance (J^T C^-1 J)^-1
        bank, local = ctx.local_error or (ctx.error_basis, None)
        p_best, chi2_f, a_f, g_f, gls_conv = gls_refine(
            obs, bank, p_best, f_j, wb, w_data, lo, hi, free, alive, local=local
        )
        conv_best = conv_best & gls_conv
        if ctx.return_model:
            model_f = model_batch(obs, to_device(p_best, dt))
    elif ctx.error_basis is not None:
        meat, m2 = sandwich_meat(ctx, p_best, wb, w_data)
        meat_emu = m2 @ np.swapaxes(m2, 1, 2)
    return BatchFit(
        p=p_best,
        chi2=np.asarray(chi2_f, np.float64),
        a=np.asarray(a_f, np.float64),
        g=np.asarray(g_f, np.float64),
        snr=snr,
        n_iter=it_best,
        converged=conv_best,
        n_good=n_good,
        rv_lo=prep.rv_lo,
        rv_hi=prep.rv_hi,
        model=np.asarray(model_f, np.float64) if ctx.return_model else None,
        meat=meat,
        meat_emu=meat_emu,
        max_dip=dips,
    )


def run_batches(ctx, flux2, ivar, starts, rows, size, n_threads, bar, prior=None):
    """Fit the spectra ``rows`` in batches padded to ``size``, ``n_threads`` at a time.

    Returns the :class:`BatchFit` of the rows, in the order of ``rows`` (all fields
    None when there are none); ``starts`` and ``prior`` (a
    :class:`FitPrior`) are indexed by spectrum.
    """
    n = rows.size
    full = None

    def run(bounds):
        start, stop = bounds
        sel = rows[start:stop]
        m = sel.size
        pad = size - m
        idx = np.concatenate([sel, np.repeat(sel[:1], pad)])
        fb = flux2[idx]
        wb = ivar[idx]
        wb[m:] = 0.0
        pb = None if prior is None else take_rows(prior, idx)
        return start, m, _fit_batch(ctx, fb, wb, starts[idx], m, prior=pb)

    # full batches, the last one padded: a batch has a fixed cost (RV scan of every
    # row, host work on (size, P) arrays) that splitting few rows over threads pays
    # twice (40 spectra: 0.155 s in two batches on two threads, 0.119 s in one).
    # Spreading the rows evenly over a multiple of the threads' number of batches
    # (300 spectra: 4 x 75 instead of 128 + 128 + 44) was slower for the same
    # reason: 0.574 s against 0.498 s (best of 6 interleaved, two threads).
    starts_at = [(a, min(a + size, n)) for a in range(0, n, size)]
    pool = None
    if n_threads > 1 and len(starts_at) > 1:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(min(int(n_threads), len(starts_at)))
    try:
        # JAX releases the GIL while a program runs: one batch per thread keeps every
        # core busy (the LM runs its lanes one after the other, on one core).
        done = pool.map(run, starts_at) if pool is not None else map(run, starts_at)
        for start, m, out in done:
            part = take_rows(out, slice(0, m))
            full = scatter_rows(full, slice(start, start + m), part, n)
            if bar is not None:
                bar.update(m)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if full is None:  # no rows
        return BatchFit(*(None,) * len(BatchFit._fields))
    return full


# --------------------------------------------------------------------------------------
# Step 5: a second RV scan for fits that ended near an end of their window
# --------------------------------------------------------------------------------------
def near_window_edge(ctx: BatchContext, rv, rv_lo, rv_hi) -> np.ndarray:
    """Bool, ``rv``'s shape: fitted rvs closer to an end of their window
    ``rv_lo`` .. ``rv_hi`` than the rv polish's probe reaches (``RV_PROBE_CELLS``
    pixels, at most a quarter of the window), at an end that is not
    ``ctx.rv_range``'s. The probe could not look past that end, and the truth may
    lie beyond it: the window is centred on a scan with the box-centre template,
    which can land more than ``RV_WINDOW`` from the truth. NaN rvs are False."""
    tol = AT_BOUND_TOL[1]
    lo_r, hi_r = ctx.rv_range
    with np.errstate(invalid="ignore"):
        reach = np.minimum(
            RV_PROBE_CELLS * rv_pixel_kms(ctx.obs), 0.25 * (rv_hi - rv_lo)
        )
        low = (rv - rv_lo < reach + tol) & (rv_lo > lo_r + tol)
        high = (rv_hi - rv < reach + tol) & (rv_hi < hi_r - tol)
    return low | high


def _warm_rescan(ctx: BatchContext, size: int) -> None:
    """Compile :func:`._rvscan.rescan_batch` for batches of ``size`` as
    :func:`rescan_prior` calls it, without running it."""
    obs = ctx.obs
    dt = obs.x_obs.dtype
    n_pix = obs.x_obs.shape[0]
    rescan_batch.warm(
        obs,
        jnp.zeros((size, obs.n_labels), dt),
        jnp.zeros((size, obs.n_broad), dt),
        ctx.rv_grid,
        jnp.zeros((size, n_pix), dt),
        jnp.zeros((size, n_pix), dt),
        jnp.zeros(size, bool),
        common=ctx.scan_pixels is not None,
    )


def rescan_prior(ctx: BatchContext, flux2, ivar, rows, p, size: int) -> FitPrior:
    """The :class:`FitPrior` of a second RV scan of the spectra ``rows`` (m,)
    (:func:`._rvscan.rescan_batch`, in batches of ``size``: one executable), each
    with the template of its fit ``p`` (m, k) (the single-spectrum vector: labels,
    rv, continuum, broadening): the new rv and its continuum, the window
    ``rv0 +- RV_WINDOW`` (:func:`rv_window`), the labels starting at the fit's and
    bounded by the box."""
    obs, layout = ctx.obs, ctx.layout
    dt = obs.x_obs.dtype
    n_lab = layout.n_labels
    m = rows.size
    s = p[:, :n_lab]
    b = p[:, p.shape[1] - obs.n_broad :]
    common = ctx.scan_pixels is not None
    rv0, c0 = np.zeros(m), None
    for a in range(0, m, size):
        sel = np.arange(a, min(a + size, m))
        k = sel.size
        pad = np.concatenate([sel, np.repeat(sel[:1], size - k)])
        wb = ivar[rows[pad]]
        if common:
            wb = np.where(ctx.scan_pixels, wb, 0.0)
        rv_b, c_b = rescan_batch(
            obs,
            to_device(s[pad], dt),
            to_device(b[pad], dt),
            ctx.rv_grid,
            to_device(flux2[rows[pad]], dt),
            to_device(wb, dt),
            to_device(np.arange(size) < k),
            common=common,
        )
        rv0[sel] = np.asarray(rv_b, np.float64)[:k]
        c_b = np.asarray(c_b, np.float64)[:k]
        if c0 is None:
            c0 = np.zeros((m, c_b.shape[1]))
        c0[sel] = c_b
    rv_lo, rv_hi = rv_window(rv0, ctx.rv_range)
    return FitPrior(
        s0=s.copy(),
        sd=np.ones_like(s),
        lo=np.broadcast_to(layout.lower[:n_lab], s.shape).copy(),
        hi=np.broadcast_to(layout.upper[:n_lab], s.shape).copy(),
        rv0=rv0,
        rv_lo=rv_lo,
        rv_hi=rv_hi,
        c0=c0 if obs.n_cont else None,
    )


def new_window(ctx: BatchContext, part: FitPrior, rv_lo, rv_hi) -> np.ndarray:
    """(m,) bool: the rescan's windows (``part``) that are not the old ones
    ``rv_lo`` .. ``rv_hi`` within a pixel at both ends (refitting there would
    repeat the fit)."""
    px = rv_pixel_kms(ctx.obs)
    return (np.abs(part.rv_lo - rv_lo) >= px) | (np.abs(part.rv_hi - rv_hi) >= px)


def per_pixel(chi2, n_good):
    """chi2 per pixel used: how fits over different pixel sets (different rv
    windows keep different pixels valid) are compared."""
    return chi2 / np.maximum(n_good, 1)


def rescan_fits(
    ctx: BatchContext, flux2, ivar, res: BatchFit, size, n_threads, scan_window
):
    """Step 5 of a fit of single spectra: the fits whose rv ended near an end of its
    window (:func:`near_window_edge`), where that window is the scan's
    (``scan_window`` (n,) bool: not an MDN's), are scanned again with their own
    labels (:func:`rescan_prior`) and fitted again (all of steps 2-4,
    :func:`run_batches`) in the new window from their labels, unless that window
    is the old one within a pixel; the lower chi2 per pixel is kept.

    Returns ``(res, rescanned)``: ``res`` updated in place (``n_iter``: both fits'
    steps) and (n,) bool the rows scanned again."""
    n = flux2.shape[0]
    n_lab = ctx.layout.n_labels
    edge = np.zeros(n, bool)
    if n == 0 or not ctx.free[n_lab]:
        return res, edge
    live = np.all(np.isfinite(res.p), axis=1) & np.isfinite(res.chi2) & scan_window
    edge = live & near_window_edge(ctx, res.p[:, n_lab], res.rv_lo, res.rv_hi)
    rows = np.flatnonzero(edge)
    if not rows.size:
        # compiled now all the same: the first fit compiles what a later one needs
        # (fits of 1,000 spectra compiled it after 300 had not)
        _warm_rescan(ctx, size)
        return res, edge
    part = rescan_prior(ctx, flux2, ivar, rows, res.p[rows], size)
    moved = new_window(ctx, part, res.rv_lo[rows], res.rv_hi[rows])
    rows, part = rows[moved], take_rows(part, moved)
    if not rows.size:
        return res, edge
    prior = scatter_rows(None, rows, part, n)
    starts = np.zeros((n, 1, n_lab))
    starts[rows, 0] = part.s0
    res2 = run_batches(ctx, flux2, ivar, starts, rows, size, n_threads, None, prior)
    better = np.isfinite(res2.chi2) & (
        per_pixel(res2.chi2, res2.n_good) < per_pixel(res.chi2[rows], res.n_good[rows])
    )
    first_it = res.n_iter[rows]
    scatter_rows(res, rows[better], take_rows(res2, better))
    res.n_iter[rows] = first_it + res2.n_iter
    return res, edge
