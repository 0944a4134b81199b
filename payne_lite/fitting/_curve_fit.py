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
    from scipy.optimize import least_squares

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

        x0 = np.clip(start[idx], lo[idx], hi[idx])
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
        if best is None or chi2 < best[1]:
            best = (p, chi2, int(res.nfev), res.status > 0)
    return best
