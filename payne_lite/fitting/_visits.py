"""Joint fits of the visits of each star (``fit(..., group=...)``)."""

from __future__ import annotations

import re
import time
from typing import NamedTuple

import numpy as np

from .._serial import to_device
from ..observe import BROADENING_PARAMS
from ._curve_fit import curve_fit_joint
from ._driver import (
    BatchFit,
    Prepared,
    cont_bounds,
    lm_with_starts,
    median_snr,
    near_window_edge,
    new_window,
    per_pixel,
    prepare_batch,
    rescan_prior,
    scatter_rows,
    take_rows,
)
from ._gls import gls_refine
from ._lm import final_batch, sandwich_meat, visit_index
from ._mdn_bounds import mdn_prior, mdn_start_points
from ._ppc import dip_batch, dip_limit
from ._schema import (
    AT_BOUND_TOL,
    FLAG_AT_BOUND,
    FLAG_FAILED,
    FLAG_LOCAL_MISFIT,
    FLAG_MDN_DISAGREE,
    FLAG_POOR_FIT,
    FLAGS_DESCRIPTION,
    MDN_FLAG_NSIGMA,
    poor_fit,
    results_table,
)


class VisitFits(NamedTuple):
    """The per-visit results of joint fits of visits, (n_star, V) each, one row
    per star (:func:`_fit_star_batch`); padding visits (after a star's last) NaN,
    ``n_good`` 0.

    Attributes:
        chi2: (n_star, V) chi2 of each visit at the joint fit.
        n_good: (n_star, V) int pixels with weight > 0 of each visit.
        snr: (n_star, V) median |flux| / error of each visit's pixels used.
        rv_lo: (n_star, V) lower end of each visit's rv window [km/s].
        rv_hi: (n_star, V) upper end of each visit's rv window [km/s].
        max_dip: (n_star, V) each visit's largest window sum of the weighted
            residuals at the joint fit, in sigma (:func:`._ppc.dip_batch`, the
            statistic of QA bit 9 of point fits).
    """

    chi2: np.ndarray
    n_good: np.ndarray
    snr: np.ndarray
    rv_lo: np.ndarray
    rv_hi: np.ndarray
    max_dip: np.ndarray


class _StarMDN(NamedTuple):
    """The MDN's answers of a joint fit (:func:`_mdn_starts`): ``mean``, ``sigma``
    (n, L + 1) per spectrum, physical units; ``ok`` (n,) bool, the MDN answered;
    ``visit`` (n_star,) the visit whose labels started the star's fit, or -1;
    ``seconds`` the MDN's run time [s]."""

    mean: np.ndarray
    sigma: np.ndarray
    ok: np.ndarray
    visit: np.ndarray
    seconds: float


def _group_rows(group, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Stars in the order of first appearance: their identifiers (n_star,) and
    ``rows`` (n_star, V) int, the spectra of each star in input order, -1 after
    its last visit."""
    g = np.asarray(group)
    if g.shape != (n,):
        raise ValueError(f"group {g.shape} must be ({n},): one star id per spectrum")
    try:
        ids, first, inv = np.unique(g, return_index=True, return_inverse=True)
    except TypeError as err:
        raise ValueError(f"group: identifiers that cannot be sorted ({err})") from err
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    star = rank[inv.reshape(-1)]
    counts = np.bincount(star, minlength=ids.size)
    srt = np.argsort(star, kind="stable")
    pos = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
    rows = np.full((ids.size, int(counts.max())), -1, np.int64)
    rows[star[srt], pos] = srt
    return ids[order], rows


def check_group(group, n: int) -> None:
    """Refuse a ``group`` that is not one sortable star id per spectrum (n,)."""
    _group_rows(group, n)


def fit_groups(
    ctx, emulator, flux2, ivar, starts, group, *, batch_size, scale_errors,
    mdn=None, mdn_starts=0, seed=0,
):  # fmt: skip
    """``fit(..., group=...)``: joint fits of the visits of each star.

    Each spectrum is prepared alone (RV scan, RV window, emulator error:
    :func:`prepare_batch`); then the stars are fitted in padded batches of
    (stars, V visits) with the parameter vector of :func:`visit_index` (one
    compilation per V, the most visits of a star rounded up by
    :func:`visit_bucket`: the batch of stars is fixed by ``batch_size`` and V): LM
    (:func:`lm_with_starts`) or, with
    ``ctx.method == "curve_fit"``, scipy's trf star by star
    (:func:`curve_fit_joint`). Stars with fewer visits than V carry visits with no
    weight (their rv and continuum stay at their start and are reported as NaN).
    ``starts`` (S, L): the scaled starting labels of every star; with an ``mdn``,
    each star also starts from the MDN's labels of its highest-S/N visit (and
    ``mdn_starts`` draws from that visit's Gaussians), screened with the others.
    """
    obs, layout = ctx.obs, ctx.layout
    n = flux2.shape[0]
    n_lab, n_c = layout.n_labels, obs.n_cont
    ids, rows = _group_rows(group, n)
    n_star, n_most = rows.shape
    # fitted with room for V >= n_most visits (visit_bucket: one executable serves
    # every count up to V; the extra visits carry no weight), reported with n_most
    n_vis = visit_bucket(n_most)
    rows = np.pad(rows, ((0, 0), (0, n_vis - n_most)), constant_values=-1)
    real = rows >= 0
    n_visits = real.sum(axis=1)

    # 1-2. Every spectrum alone: RV scan, window, emulator error.
    prep = _prepare_visits(ctx, flux2, ivar, batch_size)
    star_starts = np.broadcast_to(starts, (n_star, *starts.shape))
    mdn_info = None
    if mdn is not None:
        star_starts, mdn_info = _mdn_starts(
            ctx, mdn, emulator, flux2, ivar, starts, rows, prep.snr, mdn_starts, seed
        )

    # The joint vector: [s (L), rv_1 .. rv_V, c_1 (n_c) .. c_V (n_c), b (B)].
    joint = _joint_layout(layout, n_vis, n_c)
    vidx0 = visit_index(n_lab, n_vis, n_c, len(layout.broadening))[0]
    free = np.ones(len(joint.names), bool)
    for j in ctx.fix:
        free[vidx0[j]] = False  # labels, broadening: a fixed rv is refused
    n_shared = int(free[:n_lab].sum()) + int(free[joint.broad_slice].sum())
    n_par = n_shared + n_visits * (1 + n_c)

    # 3. Stars in padded batches; a padding visit is row 0 with no weight.
    # (batch_size // V rounded down to a power of two, >= 8): one executable per V
    g_size = max(8, 1 << int(np.floor(np.log2(max(1, batch_size // n_vis)))))
    fit, visits = _fit_stars(
        ctx, flux2, prep, star_starts, rows, np.arange(n_star), joint, free, n_par,
        g_size,
    )  # fmt: skip
    # 5. A second RV scan for the visits whose rv ended near an end of its window.
    n_rescanned = _rescan_visits(
        ctx, flux2, ivar, prep, rows, fit, visits, joint, free, n_par, g_size,
        batch_size,
    )  # fmt: skip

    t = results_table(
        emulator,
        joint,
        obs,
        free,
        fit,
        method=ctx.method,
        rv_range=ctx.rv_range,
        scale_errors=scale_errors,
        emulator_error_used=ctx.emulator_error is not None,
        n_par=n_par,
    )
    t = _group_table(t, joint, ids, rows, visits, n_par, ctx)
    t.meta["rv_rescanned"] = n_rescanned
    if mdn_info is not None:
        _add_group_mdn_columns(t, layout, rows, mdn_info)
        t.meta.update(
            mdn_seconds=round(mdn_info.seconds, 4),
            mdn_n_components=mdn.n_components,
        )
    return trim_visits(t, n_most)


def _fit_stars(ctx, flux2, prep, starts, rows, stars, joint, free, n_par, g_size):
    """Step 3 of :func:`fit_groups` for the stars ``stars`` (indices into
    ``rows``, ``starts``, ``n_par``), in padded batches of ``g_size``
    (:func:`_fit_star_batch`); returns their ``(BatchFit, VisitFits)``, one row per
    star of ``stars``."""
    n = stars.size
    fit = visits = None
    for start in range(0, n, g_size):
        sel = np.arange(start, min(start + g_size, n))
        m = sel.size
        gi = stars[np.concatenate([sel, np.repeat(sel[:1], g_size - m)])]
        part, part_v = _fit_star_batch(
            ctx, flux2, prep, starts[gi], rows[gi], m, joint, free, n_par[gi]
        )
        fit = scatter_rows(fit, sel, take_rows(part, slice(0, m)), n)
        visits = scatter_rows(visits, sel, take_rows(part_v, slice(0, m)), n)
    return fit, visits


def _rescan_visits(
    ctx, flux2, ivar, prep, rows, fit, visits, joint, free, n_par, g_size, batch_size
):
    """Step 5 of :func:`fit_groups` (as :func:`._driver.rescan_fits` for single
    spectra): every visit whose rv ended near an end of its window
    (:func:`near_window_edge`) is scanned again with its star's labels and
    broadening (:func:`rescan_prior`) and prepared again in the new window; its
    star is fitted again jointly from its labels (unless no visit's window moved by
    a pixel), and the lower chi2 per pixel kept. ``fit`` and ``visits`` are
    updated in place; returns the number of visits scanned again."""
    obs = ctx.obs
    n_lab = joint.n_labels
    n_vis = rows.shape[1]
    live = np.all(np.isfinite(fit.p), axis=1) & np.isfinite(fit.chi2)
    rv = fit.p[:, n_lab : n_lab + n_vis]
    edge = (rows >= 0) & live[:, None]
    edge &= near_window_edge(ctx, rv, visits.rv_lo, visits.rv_hi)
    if not edge.any():
        return 0
    star, vis = np.nonzero(edge)
    spec = rows[star, vis]
    vidx = visit_index(n_lab, n_vis, obs.n_cont, obs.n_broad)
    p_one = fit.p[star[:, None], vidx[vis]]  # each visit's single-spectrum vector
    part = rescan_prior(ctx, flux2, ivar, spec, p_one, int(batch_size))
    moved = new_window(ctx, part, prep.rv_lo[spec], prep.rv_hi[spec])
    if not moved.any():
        return int(edge.sum())
    star, spec, part = star[moved], spec[moved], take_rows(part, moved)
    prep2 = type(prep)(*(None if v is None else v.copy() for v in prep))
    _prepare_visits(ctx, flux2, ivar, batch_size, spec, part, out=prep2)
    stars = np.unique(star)
    starts = fit.p[:, None, :n_lab]
    fit2, visits2 = _fit_stars(
        ctx, flux2, prep2, starts, rows, stars, joint, free, n_par, g_size
    )
    better = np.isfinite(fit2.chi2) & (
        per_pixel(fit2.chi2, fit2.n_good)
        < per_pixel(fit.chi2[stars], fit.n_good[stars])
    )
    first_it = fit.n_iter[stars]
    scatter_rows(fit, stars[better], take_rows(fit2, better))
    scatter_rows(visits, stars[better], take_rows(visits2, better))
    fit.n_iter[stars] = first_it + fit2.n_iter
    return int(edge.sum())


def visit_bucket(n_visits: int) -> int:
    """The visit count V that joint fits of at most ``n_visits`` visits per star
    are compiled for: the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two
    and 1.5 times them), so that catalogs whose chunks hold 5, 6 or 7 visits at
    most compile once, at the cost of at most a third more visits' work."""
    n = max(1, int(n_visits))
    v = 1
    while v < n:  # 1 -> 2; a power of two -> 1.5 times it -> the next power of two
        v = 2 if v == 1 else (v * 3 // 2 if v & (v - 1) == 0 else v * 4 // 3)
    return v


def _mdn_starts(ctx, mdn, emulator, flux2, ivar, starts, rows, snr1, n_extra, seed):
    """Starting labels (n_star, 1 + n_extra + S, L) of the joint fits with an MDN:
    the MDN's mean labels of each star's highest-S/N visit that the MDN answers
    (:func:`mdn_prior`; ``n_extra`` draws from its Gaussians:
    :func:`mdn_start_points`), then the default ``starts`` (S, L). A star none of
    whose visits the MDN answers starts from ``starts`` alone (its MDN rows repeat
    ``starts[0]``). The fits are bounded by the box, not the MDN: the MDN only
    starts them. Returns the starts and the MDN's answers (:class:`_StarMDN`)."""
    n_star, n_vis = rows.shape
    t0 = time.perf_counter()
    prior, ok, mean, sigma = mdn_prior(
        mdn, emulator, flux2, ivar, starts[0], ctx.fix, ctx.rv_range
    )
    seconds = time.perf_counter() - t0
    real = rows >= 0
    rr = np.where(real, rows, 0)
    score = np.where(real & ok[rr], snr1[rr], -np.inf)
    visit = np.argmax(score, axis=1)
    has = np.isfinite(score[np.arange(n_star), visit])
    pick = rr[np.arange(n_star), visit]
    s_mdn = mdn_start_points(take_rows(prior, pick), int(n_extra), ctx.fix, seed)
    s_mdn = np.where(has[:, None, None], s_mdn, starts[0])
    out = np.concatenate(
        [s_mdn, np.broadcast_to(starts, (n_star, *starts.shape))], axis=1
    )
    info = _StarMDN(mean, sigma, ok, np.where(has, visit, -1), seconds)
    return out, info


def _add_group_mdn_columns(t, layout, rows, info):
    """The MDN's answers in a group table: ``<label>_mdn``, ``<label>_mdn_sigma``
    (n_star,) of the visit whose labels started the fit (``mdn_visit``, -1: none,
    NaN), ``rv_mdn``, ``rv_mdn_sigma`` (n_star, V) of every visit; QA bit 6 where a
    label is more than ``MDN_FLAG_NSIGMA`` of that visit's sigmas from its mean,
    or a visit's rv from its own."""
    n_lab = layout.n_labels
    n_star = len(t)
    real = rows >= 0
    rr = np.where(real, rows, 0)
    has = info.visit >= 0
    pick = rr[np.arange(n_star), np.maximum(info.visit, 0)]
    mean, sigma, ok = info.mean, info.sigma, info.ok
    far = np.zeros(n_star, bool)
    for j, name in enumerate(layout.names[:n_lab]):
        mu = np.where(has, mean[pick, j], np.nan)
        sd = np.where(has, sigma[pick, j], np.nan)
        t[f"{name}_mdn"], t[f"{name}_mdn_sigma"] = mu, sd
        with np.errstate(invalid="ignore"):
            far |= np.abs(np.asarray(t[name]) - mu) > MDN_FLAG_NSIGMA * sd
    use = real & ok[rr]
    t["rv_mdn"] = np.where(use, mean[rr, n_lab], np.nan)
    t["rv_mdn_sigma"] = np.where(use, sigma[rr, n_lab], np.nan)
    with np.errstate(invalid="ignore"):
        dev = np.abs(np.asarray(t["rv"]) - t["rv_mdn"]) > MDN_FLAG_NSIGMA * np.asarray(
            t["rv_mdn_sigma"]
        )
    far |= np.any(dev & use, axis=1)
    for name in (*layout.names[:n_lab], "rv"):
        if t[name].unit is not None:
            t[f"{name}_mdn"].unit = t[f"{name}_mdn_sigma"].unit = t[name].unit
    failed = (np.asarray(t["flags"]) & FLAG_FAILED) > 0
    t["flags"] = (
        np.asarray(t["flags"]) | np.where(far & ~failed, FLAG_MDN_DISAGREE, 0)
    ).astype(np.int32)
    t["flags"].description = FLAGS_DESCRIPTION
    t["mdn_visit"] = info.visit.astype(np.int64)
    t[
        "mdn_visit"
    ].description = (
        "visit (index into visit_rows) whose MDN labels started the fit; -1: none"
    )


def _prepare_visits(
    ctx, flux2, ivar, batch_size, spec=None, prior=None, out=None
) -> Prepared:
    """Steps 1-2 of :func:`fit_groups`, every spectrum alone (:func:`prepare_batch`
    in padded batches): its :class:`Prepared`, one row per spectrum, with the
    median S/N. ``spec`` (m,): only these spectra, written into ``out`` (a
    :class:`Prepared` of every spectrum, returned), with ``prior`` (a
    :class:`._driver.FitPrior` of m rows, from :func:`rescan_prior`) instead of the scan."""
    n = flux2.shape[0]
    spec = np.arange(n) if spec is None else spec
    m = spec.size
    size = int(batch_size)  # fixed: the executables of the point fits' steps 1-2
    for start in range(0, m, size):
        sel = np.arange(start, min(start + size, m))
        pad = np.concatenate([sel, np.repeat(sel[:1], size - sel.size)])
        idx = spec[pad]
        wb = ivar[idx].copy()
        wb[sel.size :] = 0.0
        pb = None if prior is None else take_rows(prior, pad)
        res = prepare_batch(ctx, flux2[idx], wb, pb)
        res = res._replace(snr=median_snr(flux2[idx], res.w_fit, res.w_data))
        out = scatter_rows(out, spec[sel], take_rows(res, slice(0, sel.size)), n)
    return out


def _joint_layout(layout, n_vis, n_c):
    """The parameter layout of a joint fit of ``n_vis`` visits, the vector
    ``[s (L), rv_1 .. rv_V, c_1 (n_c) .. c_V (n_c), b (B)]`` of :func:`visit_index`,
    each visit's rv and continuum with the single-spectrum bounds, the broadening
    ``b`` (B = ``layout.broadening``, shared by the visits) last as there."""
    n_lab = layout.n_labels
    broad = tuple(layout.broadening)
    vidx = visit_index(n_lab, n_vis, n_c, len(broad))
    k = n_lab + n_vis * (1 + n_c) + len(broad)
    cs = layout.cont_slice
    names = (
        tuple(layout.names[:n_lab])
        + tuple(f"rv_{v + 1}" for v in range(n_vis))
        + tuple(f"{c}_{v + 1}" for v in range(n_vis) for c in layout.names[cs])
        + broad
    )
    lower = np.zeros(k)
    upper = np.zeros(k)
    for v in range(n_vis):
        lower[vidx[v]], upper[vidx[v]] = layout.lower, layout.upper
    return layout._replace(names=names, lower=lower, upper=upper)


def _fit_star_batch(ctx, flux2, prep, starts, r, m, joint, free, n_par):
    """Step 3 of :func:`fit_groups` for one padded batch of stars: ``r`` (size, V)
    their spectra's rows (-1 after a star's last visit), rows from ``m`` on
    padding; ``prep`` the per-spectrum :class:`._driver.Prepared` of
    :func:`_prepare_visits`; ``starts`` (size, S, L) each star's starting labels;
    ``n_par`` (size,) the free parameters of each star. Returns the batch's
    ``(BatchFit, VisitFits)``, (size, ...) arrays (``model`` and ``meat`` None
    when not asked for)."""
    obs = ctx.obs
    dt = obs.x_obs.dtype
    n_pix = flux2.shape[1]
    n_lab, n_c = joint.n_labels, obs.n_cont
    g_size, n_vis = r.shape
    k = len(joint.names)
    vidx = visit_index(n_lab, n_vis, n_c, obs.n_broad)
    ok = (r >= 0) & (np.arange(g_size) < m)[:, None]
    rr = np.where(ok, r, 0)
    fb = np.where(ok[..., None], flux2[rr], 0.0)
    wb = np.where(ok[..., None], prep.w_fit[rr], 0.0)
    wd = np.where(ok[..., None], prep.w_data[rr], 0.0)
    n_good = np.count_nonzero(wb > 0, axis=(1, 2))
    alive = (np.arange(g_size) < m) & (n_good > n_par)
    p_start, lo, hi = _joint_starts(ctx, prep, starts, ok, rr, joint, vidx)
    f_j, w_j = to_device(fb, dt), to_device(wb, dt)
    if ctx.method == "lm":
        best = lm_with_starts(
            ctx, p_start, alive, f_j, w_j, lo, hi, n_good, n_vis, free
        )
        p_best, it_best, conv_best = best.p, best.n_iter, best.conv
    else:
        p_best, it_best, conv_best = _curve_fit_stars(
            ctx, p_start, alive, fb, wb, lo, hi, free, vidx
        )
    gls = None
    if ctx.gls:  # the minimum of r^T C^-1 r over the visits, C coupling them
        bank, local = ctx.local_error or (ctx.error_basis, None)
        p_best, *gls, gls_conv = gls_refine(
            obs, bank, p_best, f_j.reshape(g_size * n_vis, n_pix),
            wb.reshape(g_size * n_vis, n_pix), wd.reshape(g_size * n_vis, n_pix),
            lo, hi, free, alive, local=local, visits=(vidx, ok),
        )  # fmt: skip
        conv_best = conv_best & gls_conv
    # the full normal equations at the best fits, visit by visit
    pv = p_best[:, vidx].reshape(g_size * n_vis, -1)
    chi2_v, a_v, g_v, model_v = final_batch(
        obs,
        to_device(pv, dt),
        f_j.reshape(g_size * n_vis, n_pix),
        w_j.reshape(g_size * n_vis, n_pix),
    )
    # each visit's predictive check (point fits take it from the LM's last
    # residuals; a joint lane's are its visits' end to end)
    dip_v = dip_batch(
        obs,
        to_device(pv, dt),
        f_j.reshape(g_size * n_vis, n_pix),
        w_j.reshape(g_size * n_vis, n_pix),
    )
    kv = vidx.shape[1]
    chi2_v = np.asarray(chi2_v, np.float64).reshape(g_size, n_vis)
    a_v = np.asarray(a_v, np.float64).reshape(g_size, n_vis, kv, kv)
    g_v = np.asarray(g_v, np.float64).reshape(g_size, n_vis, kv)
    a = np.zeros((g_size, k, k))
    g = np.zeros((g_size, k))
    for v in range(n_vis):
        a[:, vidx[v][:, None], vidx[v][None, :]] += a_v[:, v]
        g[:, vidx[v]] += g_v[:, v]
        own = vidx[v, n_lab : n_lab + 1 + n_c]
        a[:, own, own] += np.where(ok[:, v], 0.0, 1.0)[:, None]  # padding
    meat = meat_emu = None
    chi2 = np.where(ok, chi2_v, 0.0).sum(axis=1)
    if gls is not None:  # chi2 = r^T C^-1 r, covariance (J^T C^-1 J)^-1
        chi2, a, g = gls
    elif ctx.error_basis is not None:
        meat, meat_emu = _joint_meat(ctx, pv, wb, wd, ok, vidx, k)
    visits = VisitFits(
        chi2=np.where(ok, chi2_v, np.nan),
        n_good=np.where(ok, np.count_nonzero(wb > 0, axis=2), 0),
        snr=np.where(ok, prep.snr[rr], np.nan),
        rv_lo=np.where(ok, prep.rv_lo[rr], np.nan),
        rv_hi=np.where(ok, prep.rv_hi[rr], np.nan),
        max_dip=np.where(
            ok, np.asarray(dip_v, np.float64).reshape(g_size, n_vis), np.nan
        ),
    )
    fit = BatchFit(
        p=p_best,
        chi2=chi2,
        a=a,
        g=g,
        snr=np.sqrt(np.nansum(visits.snr**2, axis=1)),
        n_iter=it_best,
        converged=conv_best,
        n_good=n_good,
        rv_lo=visits.rv_lo[:, 0],
        rv_hi=visits.rv_hi[:, 0],
        model=np.where(  # NaN for padding visits
            ok[..., None],
            np.asarray(model_v, np.float64).reshape(g_size, n_vis, n_pix),
            np.nan,
        )
        if ctx.return_model
        else None,
        meat=meat,
        meat_emu=meat_emu,
    )
    return fit, visits


def _curve_fit_stars(ctx, p_start, alive, fb, wb, lo, hi, free, vidx):
    """``method="curve_fit"`` for a batch of joint fits: :func:`curve_fit_joint`
    star by star from all its starts (``p_start`` (size, S, k)); returns the best
    vectors (size, k), function evaluations and converged (size,) (the first
    start, 0 and False for stars that do not run)."""
    size = p_start.shape[0]
    p_best = p_start[:, 0].copy()
    it_best = np.zeros(size, np.int64)
    conv_best = np.zeros(size, bool)
    for i in np.flatnonzero(alive):
        p_i, _, it_i, conv_i = curve_fit_joint(
            ctx.obs, p_start[i], fb[i], wb[i], lo[i], hi[i], free, ctx.max_iter, vidx
        )
        p_best[i], it_best[i], conv_best[i] = p_i, it_i, conv_i
    return p_best, it_best, conv_best


def _joint_starts(ctx, prep, starts, ok, rr, joint, vidx):
    """Starting vectors (size, S, k) and bounds (size, k) of a batch of joint fits:
    the labels at ``starts`` (size, S, L), each visit's rv and continuum at its RV
    scan's (``prep``, a :class:`._driver.Prepared`; zero, and bounds zero, for
    padding visits: ``ok`` False), the broadening at ``ctx.b_scan`` (its start
    values, or the fixed ones)."""
    g_size, n_vis = ok.shape
    n_lab = joint.n_labels
    k = len(joint.names)
    n_s = starts.shape[1]
    p_start = np.zeros((g_size, n_s, k))
    p_start[:, :, :n_lab] = starts
    p_start[:, :, joint.broad_slice] = np.asarray(ctx.b_scan, np.float64)
    lo = np.broadcast_to(joint.lower, (g_size, k)).copy()
    hi = np.broadcast_to(joint.upper, (g_size, k)).copy()
    for v in range(n_vis):
        j_rv = n_lab + v
        rv_v = np.where(ok[:, v], prep.rv0[rr[:, v]], 0.0)
        p_start[:, :, j_rv] = rv_v[:, None]
        lo[:, j_rv] = np.where(ok[:, v], prep.rv_lo[rr[:, v]], 0.0)
        hi[:, j_rv] = np.where(ok[:, v], prep.rv_hi[rr[:, v]], 0.0)
        cs = vidx[v, n_lab + 1 : n_lab + 1 + ctx.obs.n_cont]
        if cs.size:
            c0_v = np.where(ok[:, v, None], prep.c0[rr[:, v]], 0.0)
            p_start[:, :, cs] = c0_v[:, None]
            lo_v, hi_v = cont_bounds(lo[:, cs], hi[:, cs], c0_v)
            lo[:, cs] = np.where(ok[:, v, None], lo_v, 0.0)
            hi[:, cs] = np.where(ok[:, v, None], hi_v, 0.0)
    return np.clip(p_start, lo[:, None], hi[:, None]), lo, hi


def _joint_meat(ctx, pv, wb, wd, ok, vidx, k):
    """The sandwich meats (size, k, k) of a batch of joint fits, the flux
    errors' and the emulator's (see :func:`sandwich_meat`), from the visits' own
    at their best vectors ``pv`` (size * V, kv), fit and data weights ``wb``,
    ``wd`` (size, V, P); unit diagonal for the rv and continuum of padding visits
    (in the first)."""
    g_size, n_vis = ok.shape
    n_lab = ctx.obs.n_labels
    n_own = 1 + ctx.obs.n_cont
    kv = vidx.shape[1]
    # the emulator's error is that of the star's labels, shared by its
    # visits: their J^T W B^T add up before the outer product
    m1, m2 = sandwich_meat(
        ctx, pv, wb.reshape(g_size * n_vis, -1), wd.reshape(g_size * n_vis, -1)
    )
    m1 = m1.reshape(g_size, n_vis, kv, kv)
    m2 = m2.reshape(g_size, n_vis, kv, -1)
    meat = np.zeros((g_size, k, k))
    m2_j = np.zeros((g_size, k, m2.shape[-1]))
    for v in range(n_vis):
        meat[:, vidx[v][:, None], vidx[v][None, :]] += m1[:, v]
        m2_j[:, vidx[v]] += m2[:, v]
        own = vidx[v, n_lab : n_lab + n_own]
        meat[:, own, own] += np.where(ok[:, v], 0.0, 1.0)[:, None]
    return meat, m2_j @ np.swapaxes(m2_j, 1, 2)


def _group_table(t, joint, ids, rows, visits, n_par, ctx):
    """Collapse the per-visit columns of a joint fit's table into (n_star, V)
    columns, NaN for padding, and add those of ``visits`` (:class:`VisitFits`);
    rv at a bound of any visit's window sets bit 1."""
    from astropy.table import Table

    n_lab = joint.n_labels
    n_vis = rows.shape[1]
    real = rows >= 0
    failed = (np.asarray(t["flags"]) & FLAG_FAILED) > 0
    rv = np.column_stack([np.asarray(t[f"rv_{v + 1}"]) for v in range(n_vis)])
    tol = AT_BOUND_TOL[1]
    with np.errstate(invalid="ignore"):
        rv_lo, rv_hi = visits.rv_lo, visits.rv_hi
        at_bound = (np.abs(rv - rv_lo) < tol) & (rv_lo > ctx.rv_range[0])
        at_bound |= (np.abs(rv - rv_hi) < tol) & (rv_hi < ctx.rv_range[1])
        at_bound |= (np.abs(rv - ctx.rv_range[0]) < tol) | (
            np.abs(rv - ctx.rv_range[1]) < tol
        )
    at_bound = np.any(at_bound & real, axis=1) & ~failed
    flags = np.asarray(t["flags"]) | np.where(at_bound, FLAG_AT_BOUND, 0)
    # poor fit: the misfit is per pixel of a visit, at the visits' own S/N (the
    # RMS of snr_visit over the used pixels), not at the combined S/N
    n_pix_v = visits.n_good
    snr_pix = np.sqrt(
        np.nansum(n_pix_v * visits.snr**2, axis=1) / np.maximum(n_pix_v.sum(axis=1), 1)
    )
    ndof = np.asarray(t["n_good_pixels"]) - n_par
    bad = poor_fit(t["chi2_red"], ndof, snr_pix) & ~failed
    flags = (flags & ~FLAG_POOR_FIT) | np.where(bad, FLAG_POOR_FIT, 0)
    # a localised misfit in any visit, each at its own pixels' noise threshold
    with np.errstate(invalid="ignore"):
        local = real & (visits.max_dip >= dip_limit(visits.n_good))
    flags = flags | np.where(local.any(axis=1) & ~failed, FLAG_LOCAL_MISFIT, 0)

    out = Table()
    out["group"] = ids
    out["n_visits"] = real.sum(axis=1)
    for name in joint.names[:n_lab]:
        out[name] = t[name]
        out[f"{name}_err"] = t[f"{name}_err"]

    def stack(fmt):
        cols = [np.asarray(t[fmt.format(v + 1)], np.float64) for v in range(n_vis)]
        return np.where(real, np.column_stack(cols), np.nan)

    out["rv"] = stack("rv_{}")
    out["rv_err"] = stack("rv_{}_err")
    out["rv"].unit = out["rv_err"].unit = "km/s"
    n_c = ctx.obs.n_cont
    for c in ctx.layout.names[ctx.layout.cont_slice]:
        out[c] = stack(f"{c}_{{}}")
        out[f"{c}_err"] = stack(f"{c}_{{}}_err")
    for name in joint.broadening:  # the star's, shared by its visits
        out[name] = t[name]
        out[f"{name}_err"] = t[f"{name}_err"]
    cov = np.array(t["covariance"])
    vidx = visit_index(n_lab, n_vis, n_c, len(joint.broadening))
    for v in range(n_vis):
        pad = ~real[:, v]
        own = vidx[v, n_lab : n_lab + 1 + n_c]
        cov[np.ix_(pad, own, np.arange(cov.shape[2]))] = np.nan
        cov[np.ix_(pad, np.arange(cov.shape[1]), own)] = np.nan
    for name in (
        "chi2", "chi2_red", "chi2_pvalue", "n_good_pixels", "snr", "n_iter",
        "converged",
    ):  # fmt: skip
        out[name] = t[name]
    out["flags"] = flags.astype(np.int32)
    out["covariance"] = cov
    out["visit_rows"] = rows
    out["chi2_visit"] = visits.chi2
    out["n_good_pixels_visit"] = visits.n_good
    out["snr_visit"] = visits.snr
    out["max_dip"] = np.where(failed[:, None] & real, 0.0, visits.max_dip)
    if "model_flux" in t.colnames:
        out["model_flux"] = t["model_flux"]
    for name in t.colnames:
        if name in out.colnames and t[name].description:
            out[name].description = t[name].description
    out["snr"].description = "combined S/N of the visits, sqrt(sum snr_visit^2)"
    out["n_good_pixels"].description = "weighted pixels of all visits"
    out["visit_rows"].description = "rows of the input of each visit; -1 = none"
    out["chi2_visit"].description = "chi2 of each visit at the joint fit"
    out["snr_visit"].description = "median |flux| / error of each visit's pixels"
    out["max_dip"].description = (
        "largest residual sum over 5 pixels of each visit at the joint fit [sigma] "
        "(bit 9: any visit)"
    )
    out["rv"].description = "rv of each visit; NaN after a star's last visit"
    out.meta.update(t.meta)
    out.meta.update(
        kind="group",
        group=True,
        n_visits_max=int(n_vis),
        continuum="profile" if ctx.profile else "fit",
    )
    return out


#: The (n_star, V, ...) columns of a group table (besides ``cont_<k>[_err]``) and
#: the value of a padding visit (NaN for the others).
_VISIT_COLUMNS = (
    "rv", "rv_err", "visit_rows", "chi2_visit", "n_good_pixels_visit", "snr_visit",
    "max_dip", "model_flux", "rv_mdn", "rv_mdn_sigma",
    "companion_depth", "companion_dv", "companion_nsigma",  # pl.companion_search
)  # fmt: skip
_VISIT_FILL = {"visit_rows": -1, "n_good_pixels_visit": 0}


def pad_visits(table, n_visits: int):
    """A group table (``fit(..., group=...)``) with room for ``n_visits`` visits.

    Tables of joint fits hold V columns of visits, V the most visits of any of
    their stars; to stack tables of different V (chunks of a catalog, grids of
    per-spectrum wavelength grids), pad them to the largest first. The visit-axis
    columns (``rv``, ``rv_err``, ``cont_<k>``, ``cont_<k>_err``, ``chi2_visit``,
    ``snr_visit``, ``model_flux``, ``rv_mdn``, ``rv_mdn_sigma``) get NaN visits,
    ``visit_rows`` -1 and ``n_good_pixels_visit`` 0; the covariance gets NaN rows
    and columns at the new visits' rv and continuum positions of the joint vector
    ``[labels, rv_1 .. rv_V, cont_<k>_<v> .., broadening]``, and
    ``meta["cov_params"]``, ``meta["n_visits_max"]`` follow.

    Args:
        table: an astropy Table from ``fit(..., group=...)`` (not modified).
        n_visits: the visits to hold, at least the table's V.

    Returns:
        A new table with (n_star, n_visits) visit columns.

    Raises:
        ValueError: not a group table, or ``n_visits`` below its V.
    """
    if not table.meta.get("group") or "visit_rows" not in table.colnames:
        raise ValueError("pad_visits: not the table of a fit(..., group=...)")
    n_old = int(np.shape(table["visit_rows"])[1])
    n_new = int(n_visits)
    if n_new < n_old:
        raise ValueError(
            f"pad_visits: n_visits = {n_new} is below the table's {n_old} visits"
        )
    out = table.copy(copy_data=True)
    if n_new == n_old:
        return out
    for name in filter(_is_visit_column, table.colnames):
        col = table[name]
        val = np.asarray(col)
        fill = _VISIT_FILL.get(name, np.nan)
        extra = np.full((val.shape[0], n_new - n_old, *val.shape[2:]), fill, val.dtype)
        new = type(col)(np.concatenate([val, extra], axis=1), name=name)
        new.unit, new.description = col.unit, col.description
        out.replace_column(name, new)
    names, n_lab, n_c = _joint_shape(table, n_old)
    to = _joint_positions(n_lab, n_old, n_new, n_c, len(names))
    cov = np.asarray(table["covariance"])
    k_new = len(names) + (n_new - n_old) * (1 + n_c)
    big = np.full((cov.shape[0], k_new, k_new), np.nan, cov.dtype)
    big[:, to[:, None], to[None, :]] = cov
    new = type(table["covariance"])(big, name="covariance")
    new.unit, new.description = (
        table["covariance"].unit,
        table["covariance"].description,
    )
    out.replace_column("covariance", new)
    new_names = [""] * k_new
    for i, j in enumerate(to):
        new_names[j] = names[i]
    # the continuum's names of visit 1, "cont_<k>_1" or "cont_<chip>_<k>_1"
    cont = [names[n_lab + n_old + j].rsplit("_", 1)[0] for j in range(n_c)]
    for v in range(n_old, n_new):
        new_names[n_lab + v] = f"rv_{v + 1}"
        for j in range(n_c):
            new_names[n_lab + n_new + v * n_c + j] = f"{cont[j]}_{v + 1}"
    out.meta["cov_params"] = new_names
    out.meta["n_visits_max"] = n_new
    return out


def trim_visits(table, n_visits: int):
    """A group table of V visit columns cut to its first ``n_visits`` (the inverse
    of :func:`pad_visits`): what :func:`fit_groups` reports after fitting with room
    for more visits than any star has. Returns ``table`` itself when nothing is
    cut."""
    n_old = int(np.shape(table["visit_rows"])[1])
    n_new = int(n_visits)
    if n_new >= n_old:
        return table
    if np.any(np.asarray(table["visit_rows"])[:, n_new:] >= 0):
        raise ValueError(f"trim_visits: a star has more than {n_new} visits")
    out = table.copy(copy_data=False)
    for name in filter(_is_visit_column, table.colnames):
        col = table[name]
        new = type(col)(np.asarray(col)[:, :n_new], name=name)
        new.unit, new.description = col.unit, col.description
        out.replace_column(name, new)
    names, n_lab, n_c = _joint_shape(table, n_old)
    k_new = len(names) - (n_old - n_new) * (1 + n_c)
    keep = _joint_positions(n_lab, n_new, n_old, n_c, k_new)
    cov = table["covariance"]
    new = type(cov)(np.asarray(cov)[:, keep[:, None], keep[None, :]], name=cov.name)
    new.unit, new.description = cov.unit, cov.description
    out.replace_column("covariance", new)
    out.meta = {**table.meta, "cov_params": [names[j] for j in keep]}
    out.meta["n_visits_max"] = n_new
    return out


def per_visit(table):
    """A group table (``fit(..., group=...)``) as one row per visit, in the layout
    of a point fit's table: what takes one spectrum per row
    (:func:`payne_lite.catalog.model_from_results`, :func:`payne_lite.check_catalog`)
    takes it.

    Each real visit of each star (``visit_rows >= 0``), star by star: the visit
    columns (``rv``, ``rv_err``, ``cont_<k>``, ``chi2_visit``, ``max_dip``,
    ``model_flux``, the ids of a catalog's visits ...) at that visit, the star's
    columns (labels, broadening, ``chi2``, ``flags`` ...) repeated; besides them
    ``row`` (the visit's row of the input), ``star`` (the star's row of ``table``)
    and ``visit`` (its visit index). The joint covariance is left out (its layout is
    the star's joint vector).

    Raises:
        ValueError: not the table of a group fit.
    """
    from astropy.table import Table

    if "visit_rows" not in table.colnames or np.ndim(table["visit_rows"]) != 2:
        raise ValueError("per_visit: not the table of a fit(..., group=...)")
    rows = np.asarray(table["visit_rows"])
    star, visit = np.nonzero(rows >= 0)
    out = Table()
    out["row"] = rows[star, visit]
    for name in table.colnames:
        if name in ("visit_rows", "covariance"):
            continue
        col = table[name]
        val = np.asarray(col)
        by_visit = _is_visit_column(name) or (name == "id" and val.ndim == 2)
        out[name] = val[star, visit] if by_visit else val[star]
        out[name].unit, out[name].description = col.unit, col.description
    out["star"] = star
    out["visit"] = visit
    out.meta.update(table.meta)
    out.meta.pop("cov_params", None)
    out.meta.update(group=False, kind="visits of a group table")
    return out


def _joint_shape(table, n_vis: int) -> tuple[list[str], int, int]:
    """The joint vector's names (``meta["cov_params"]``), its labels L and the
    continuum coefficients per visit of a group table of ``n_vis`` visits."""
    names = list(table.meta["cov_params"])
    n_lab = len(table.meta["label_names"])
    n_broad = sum(name in BROADENING_PARAMS for name in names[n_lab:])
    return names, n_lab, (len(names) - n_lab - n_vis - n_broad) // n_vis


def _is_visit_column(name: str) -> bool:
    """A (n_star, V, ...) column of a group table (:data:`_VISIT_COLUMNS`, and the
    continuum coefficients ``cont_<k>`` / ``cont_<chip>_<k>`` and their errors)."""
    return name in _VISIT_COLUMNS or _IS_CONT(name) is not None


_IS_CONT = re.compile(r"cont_\d+(_\d+)?(_err)?$").match


def _joint_positions(n_lab, n_old, n_new, n_c, k_old) -> np.ndarray:
    """(k_old,) int: where each entry of a joint vector of ``n_old`` visits sits
    in one of ``n_new`` (:func:`visit_index` layout)."""
    old = visit_index(n_lab, n_old, n_c, k_old - n_lab - n_old * (1 + n_c))
    new = visit_index(n_lab, n_new, n_c, k_old - n_lab - n_old * (1 + n_c))
    to = np.empty(k_old, np.int64)
    to[old] = new[:n_old]
    return to
