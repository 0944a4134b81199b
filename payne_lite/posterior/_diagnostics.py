"""Sampling diagnostics on the host: autocorrelation times, split R-hat, the
convergence rule, Kish's ESS and (weighted) quantile summaries, float64 NumPy
(see :mod:`payne_lite.posterior._sample`)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: Converged (emcee): kept steps >= N_TAU_MIN * the largest autocorrelation time ...
N_TAU_MIN = 50.0
#: ... and the largest split R-hat below RHAT_MAX.
RHAT_MAX = 1.1
#: Burn-in: BURN_TAU autocorrelation times (at most half the chain).
BURN_TAU = 5.0


def _autocorr_time(chain: np.ndarray) -> np.ndarray:
    """emcee's integrated autocorrelation time (k,) of ``chain`` (n, W, k), tol=0;
    NaN for a parameter that does not move."""
    from emcee.autocorr import integrated_time

    if chain.shape[0] < 2:
        return np.full(chain.shape[2], np.nan)
    flat = np.std(chain, axis=(0, 1)) == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = integrated_time(chain, tol=0)
    return np.where(flat, np.nan, tau)


def split_rhat(chain: np.ndarray) -> np.ndarray:
    """Split R-hat (k,) of ``chain`` (n, W, k): each walker's chain cut in two halves.

    ``sqrt(((n - 1) / n W_ + B / n) / W_)`` over the 2 W half-chains of length n,
    with ``W_`` the mean within-chain variance and ``B / n`` the variance of the
    chain means (Gelman et al. 2013). NaN when fewer than 4 steps.
    """
    n = chain.shape[0] // 2
    if n < 2:
        return np.full(chain.shape[2], np.nan)
    halves = np.concatenate([chain[:n], chain[chain.shape[0] - n :]], axis=1)
    w_var = np.mean(np.var(halves, axis=0, ddof=1), axis=0)
    b_n = np.var(np.mean(halves, axis=0), axis=0, ddof=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sqrt(((n - 1) / n * w_var + b_n) / w_var)


def chain_diagnostics(chain, *, n_burn: int | None = None) -> dict:
    """Burn-in, autocorrelation times, ESS, split R-hat and the convergence rule.

    Args:
        chain: (n_steps, n_walkers, k) an ensemble's chain (emcee's ``get_chain()``).
        n_burn: steps to discard; None = the module's rule
            (``min(ceil(BURN_TAU * tau_0), n_steps // 2)``, ``tau_0`` from the
            chain's second half).

    Returns:
        dict with ``n_burn``, ``n_kept`` (steps), ``tau`` (k,) [steps], ``ess`` (k,),
        ``rhat`` (k,) and ``converged`` (``n_kept >= N_TAU_MIN * max(tau)`` and
        ``max(rhat) < RHAT_MAX``, tau finite).

    Raises:
        ValueError: ``chain`` is not 3-D, or ``n_burn`` leaves fewer than 2 steps.
    """
    chain = np.asarray(chain, np.float64)
    if chain.ndim != 3:
        raise ValueError(
            f"chain must be (n_steps, n_walkers, k), got shape {chain.shape}"
        )
    n_steps = chain.shape[0]
    if n_burn is None:
        tau0 = _autocorr_time(chain[n_steps // 2 :])
        tau0 = np.nanmax(tau0) if np.any(np.isfinite(tau0)) else 0.0
        n_burn = min(int(np.ceil(BURN_TAU * tau0)), n_steps // 2)
    n_burn = int(n_burn)
    if not 0 <= n_burn <= n_steps - 2:
        raise ValueError(
            f"n_burn={n_burn} must leave at least 2 of the chain's {n_steps} steps"
        )
    kept = chain[n_burn:]
    n_kept = kept.shape[0]
    tau = _autocorr_time(kept)
    rhat = split_rhat(kept)
    with np.errstate(invalid="ignore", divide="ignore"):
        ess = kept.shape[1] * n_kept / tau
    moving = np.isfinite(tau)
    tau_max = float(np.max(tau[moving])) if moving.any() else np.nan
    rhat_max = float(np.nanmax(rhat)) if np.any(np.isfinite(rhat)) else np.nan
    converged = bool(
        moving.any()
        and np.isfinite(tau_max)
        and n_kept >= N_TAU_MIN * tau_max
        and np.isfinite(rhat_max)
        and rhat_max < RHAT_MAX
    )
    return dict(
        n_burn=n_burn,
        n_kept=n_kept,
        tau=tau,
        ess=ess,
        rhat=rhat,
        tau_max=tau_max,
        rhat_max=rhat_max,
        ess_min=float(np.nanmin(ess)) if np.any(np.isfinite(ess)) else np.nan,
        converged=converged,
    )


def kish_ess(log_w) -> float:
    """Kish's effective sample size ``(sum w)^2 / sum w^2`` from log weights (m,)."""
    log_w = np.asarray(log_w, np.float64)
    ok = np.isfinite(log_w)
    if not ok.any():
        return 0.0
    w = np.exp(log_w[ok] - np.max(log_w[ok]))
    return float(w.sum() ** 2 / np.sum(w * w))


def weighted_quantiles(x, q, weights=None) -> np.ndarray:
    """Quantiles ``q`` (nq,) of each column of ``x`` (m, k), optionally weighted.

    Weighted: the inverse of the piecewise-linear CDF through the midpoints of the
    sorted samples' weights (equal weights give ``np.quantile``'s "hazen" rule).
    """
    x = np.asarray(x, np.float64)
    q = np.asarray(q, np.float64)
    if weights is None:
        return np.quantile(x, q, axis=0, method="hazen")
    w = np.asarray(weights, np.float64)
    out = np.empty((q.size, x.shape[1]))
    for j in range(x.shape[1]):
        order = np.argsort(x[:, j])
        xs, ws = x[order, j], w[order]
        cdf = (np.cumsum(ws) - 0.5 * ws) / ws.sum()
        out[:, j] = np.interp(q, cdf, xs)
    return out


class Summary(NamedTuple):
    """Quantiles and moments of one star's draws, per parameter.

    Attributes:
        p16, p50, p84: (kf,) the 16, 50 and 84 % quantiles.
        mean: (kf,) the mean.
        std: (kf,) the standard deviation.
    """

    p16: np.ndarray
    p50: np.ndarray
    p84: np.ndarray
    mean: np.ndarray
    std: np.ndarray


def summarise(x, w) -> Summary:
    """The :class:`Summary` of draws ``x`` (m, kf), weighted by ``w`` (m,) or
    None (equal weights), in the draws' units (fit space)."""
    q = weighted_quantiles(x, [0.16, 0.5, 0.84], w)
    if w is None:
        mean = np.mean(x, axis=0)
        std = np.std(x, axis=0)
    else:
        mean = w @ x
        std = np.sqrt(np.maximum(w @ (x - mean) ** 2, 0.0))
    return Summary(p16=q[0], p50=q[1], p84=q[2], mean=mean, std=std)
