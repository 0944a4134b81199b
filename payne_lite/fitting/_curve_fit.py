"""``method="curve_fit"``: scipy's trf per star, with the JAX model and Jacobian."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ._lm import jac_one, model_one


def curve_fit_one(obs, p_starts, flux, w, lo, hi, free, max_iter):
    """scipy's curve_fit (trf) from each start; best (p, chi2, nfev, converged).

    Called as ``curve_fit`` calls it (residuals and Jacobian divided by sigma,
    ``scipy.optimize.least_squares`` with method "trf", the bounds and
    ``max_nfev``), but through ``least_squares`` itself: ``curve_fit`` raises a
    RuntimeError when a star reaches ``max_nfev``, which would stop every other
    star's fit; here that star is reported not converged instead.
    """
    good = np.flatnonzero(w > 0)
    sw = np.sqrt(w[good])
    idx = np.flatnonzero(free)
    best = None
    for start in p_starts:
        base = start.copy()

        def full(q, base=base):
            p = base.copy()
            p[idx] = q
            return jnp.asarray(p, dtype=obs.x_obs.dtype)

        def resid(q, base=base):
            m = np.asarray(model_one(obs, full(q, base)), dtype=np.float64)[good]
            return (m - flux[good]) * sw

        def jac(q, base=base):
            j = np.asarray(jac_one(obs, full(q, base)), dtype=np.float64)
            return j[np.ix_(good, idx)] * sw[:, None]

        best = _trf_best(best, base, idx, resid, jac, lo, hi, max_iter)
    return best


def curve_fit_joint(obs, p_starts, flux, w, lo, hi, free, max_iter, vidx):
    """:func:`curve_fit_one` for a joint fit of the visits of one star.

    ``flux``, ``w`` (V, P): the visits' flux and weights (a visit without weighted
    pixels is padding: its rv and continuum are not fitted); ``p_starts`` (S, k),
    ``lo``, ``hi``, ``free`` (k,): the joint vector of ``vidx`` (V, k_v), the
    :func:`payne_lite.fitting.visit_index` of the fit. The residuals of all visits
    are stacked; the Jacobian is each visit's own (:func:`jac_one` at its vector
    ``p[vidx[v]]``) scattered into the columns ``vidx[v]``. Returns the best
    ``(p, chi2, nfev, converged)`` over the starts.
    """
    n_vis, kv = vidx.shape
    n_lab = obs.n_labels
    good = [np.flatnonzero(w[v] > 0) for v in range(n_vis)]
    sws = [np.sqrt(w[v][g]) for v, g in enumerate(good)]
    live = [v for v in range(n_vis) if good[v].size]
    free = np.asarray(free, bool).copy()
    for v in range(n_vis):
        if not good[v].size:  # padding: its own rv and continuum stay put
            free[vidx[v, n_lab : n_lab + 1 + obs.n_cont]] = False
    idx = np.flatnonzero(free)
    col = np.full(len(free), -1)
    col[idx] = np.arange(idx.size)
    best = None
    for start in p_starts:
        base = np.asarray(start, np.float64).copy()

        def full(q, base=base):
            p = base.copy()
            p[idx] = q
            return p

        def resid(q, base=base):
            p = full(q, base)
            out = []
            for v in live:
                m = model_one(obs, jnp.asarray(p[vidx[v]], obs.x_obs.dtype))
                m = np.asarray(m, np.float64)[good[v]]
                out.append((m - flux[v][good[v]]) * sws[v])
            return np.concatenate(out)

        def jac(q, base=base):
            p = full(q, base)
            out = []
            for v in live:
                j = jac_one(obs, jnp.asarray(p[vidx[v]], obs.x_obs.dtype))
                j = np.asarray(j, np.float64)[good[v]] * sws[v][:, None]
                jv = np.zeros((good[v].size, idx.size))
                use = col[vidx[v]] >= 0
                jv[:, col[vidx[v]][use]] = j[:, use]
                out.append(jv)
            return np.concatenate(out)

        best = _trf_best(best, base, idx, resid, jac, lo, hi, max_iter)
    return best


def _trf_best(best, base, idx, resid, jac, lo, hi, max_iter):
    """One ``least_squares`` (trf) run of the free parameters ``idx`` of ``base``
    (k,) from ``base``; returns the better of it and ``best`` (``(p, chi2, nfev,
    converged)`` or None). A start with non-finite residuals (which scipy refuses)
    counts as chi2 inf, not converged: it never raises for one star."""
    from scipy.optimize import least_squares

    x0 = np.clip(base[idx], lo[idx], hi[idx])
    if not np.all(np.isfinite(resid(x0))):  # least_squares would raise
        cand = (base.copy(), np.inf, 0, False)
    else:
        res = least_squares(
            resid,
            x0,
            jac=jac,
            bounds=(lo[idx], hi[idx]),
            method="trf",
            max_nfev=max_iter,
        )
        p = base.copy()
        p[idx] = res.x
        chi2 = float(np.sum(res.fun**2))
        cand = (p, chi2 if np.isfinite(chi2) else np.inf, int(res.nfev), res.status > 0)
    if best is None or cand[1] < best[1]:
        return cand
    return best
