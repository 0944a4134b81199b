"""Sampling diagnostics on the host: autocorrelation times (emcee), rank-normalised
R-hat, bulk and tail ESS and MCSE (ArviZ), the convergence rule, Kish's ESS and
(weighted) quantile summaries, float64 NumPy (see
:mod:`payne_lite.posterior._sample`).

ArviZ is an optional extra (``pip install payne-lite[arviz]``). Without it R-hat
comes from :func:`_rank_rhat_numpy`, the same formula, so the convergence rules do
not depend on what is installed; bulk / tail ESS and MCSE are then NaN. Measured on
an emcee-shaped chain (32 walkers x 2000 steps x 7 parameters, AR(1) with rho 0.9,
2 shared cores, best of 5): ArviZ 0.23.4's rank R-hat 206-270 ms and the NumPy one
310 ms (both are scipy's ``rankdata``; equal to the last digit), bulk ESS 118-180 ms,
tail ESS 94-133 ms, MCSE of mean and sd 15 + 21 ms; emcee's tau 58 ms; the classic
split R-hat this replaced 5.5 ms. So R-hat is worked out only when the rest of the
emcee rule already holds (``chain_diagnostics(..., lazy_rhat=True)``), and ESS /
MCSE once per star (``full=True``).
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import numpy as np

#: Converged (emcee): kept steps >= N_TAU_MIN * the largest autocorrelation time ...
N_TAU_MIN = 50.0
#: ... and the largest rank-normalised R-hat below RHAT_MAX.
RHAT_MAX = 1.1
#: Burn-in: BURN_TAU autocorrelation times (at most half the chain).
BURN_TAU = 5.0


def import_arviz():
    """The ``arviz`` module (ImportError when the optional extra is missing).

    ArviZ 0.23 warns (FutureWarning) at its first import of each day, from a date
    stamp in the user's cache directory; under warnings-as-errors (the test suite,
    or a user's own setting) that made the first sampling call of a day fail,
    whatever it did. That one warning is silenced here; ArviZ's others are not.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", r"\s*ArviZ is undergoing a major refactor", FutureWarning
        )
        import arviz
    return arviz


@functools.cache
def _arviz():
    """The ``arviz`` module, or None when the optional extra is not installed."""
    try:
        return import_arviz()
    except ImportError:
        return None


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


def _per_parameter(func, chain: np.ndarray, **kw) -> np.ndarray:
    """``func`` (an ArviZ diagnostic) of each parameter's (chains, draws) array of
    ``chain`` (n, C, k): (k,) float64, NaN where it has no value (a parameter that
    does not move)."""
    out = np.empty(chain.shape[2])
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.filterwarnings("ignore", "More chains", UserWarning)
        for j in range(chain.shape[2]):
            out[j] = float(func(np.ascontiguousarray(chain[:, :, j].T), **kw))
    return out


def _rhat_of_splits(z: np.ndarray) -> np.ndarray:
    """Gelman-Rubin R-hat (k,) of half-chains ``z`` (n, C, k):
    ``sqrt(((n - 1) / n W + B / n) / W)``."""
    n = z.shape[0]
    w_var = np.mean(np.var(z, axis=0, ddof=1), axis=0)
    b_n = np.var(np.mean(z, axis=0), axis=0, ddof=1)
    return np.sqrt(((n - 1) / n * w_var + b_n) / w_var)


def _normal_scores(a: np.ndarray) -> np.ndarray:
    """Rank-normalised ``a`` (n, C, k): per parameter, ``Phi^-1((r - 3/8) / (S + 1/4))``
    of the average ranks ``r`` over all S draws (Blom 1958)."""
    from scipy.special import ndtri
    from scipy.stats import rankdata

    s = a.shape[0] * a.shape[1]
    r = rankdata(a.reshape(s, -1), axis=0)
    return ndtri((r - 0.375) / (s + 0.25)).reshape(a.shape)


def _rank_rhat_numpy(chain: np.ndarray) -> np.ndarray:
    """:func:`rank_rhat` without ArviZ: the same formula as ArviZ 0.23's
    ``_rhat_rank`` (tests/test_sample.py checks they agree)."""
    n = chain.shape[0] // 2
    halves = np.concatenate([chain[:n], chain[chain.shape[0] - n :]], axis=1)
    folded = np.abs(halves - np.median(halves.reshape(-1, halves.shape[2]), axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        bulk = _rhat_of_splits(_normal_scores(halves))
        tail = _rhat_of_splits(_normal_scores(folded))
    return np.maximum(bulk, tail)


def rank_rhat(chain) -> np.ndarray:
    """Rank-normalised split R-hat (k,) of ``chain`` (n_steps, n_chains, k).

    Vehtari et al. (2021): each chain cut in halves, the draws replaced by their
    normal scores (ranks over all chains), the classic R-hat of those and of the
    folded draws ``|x - median|``, the larger of the two. Computed by
    ``arviz.rhat(method="rank")`` when ArviZ is installed, else by the same formula
    in NumPy (equal to rounding). NaN for fewer than 4 steps or 2 chains, and for
    a parameter that does not move.

    Raises:
        ValueError: ``chain`` is not 3-D.
    """
    chain = np.asarray(chain, np.float64)
    if chain.ndim != 3:
        raise ValueError(
            f"chain must be (n_steps, n_chains, k), got shape {chain.shape}"
        )
    if chain.shape[0] < 4 or chain.shape[1] < 2:
        return np.full(chain.shape[2], np.nan)
    az = _arviz()
    if az is None:
        return _rank_rhat_numpy(chain)
    return _per_parameter(az.rhat, chain, method="rank")


def ess_mcse(chain) -> dict:
    """ArviZ's bulk and tail ESS and the Monte Carlo standard errors of the mean and
    the sd (Vehtari et al. 2021), each (k,), of ``chain`` (n_steps, n_chains, k).

    Returns:
        dict with ``ess_bulk``, ``ess_tail``, ``mcse_mean``, ``mcse_sd`` (in the
        chain's units); all NaN when ArviZ is not installed or the chain is shorter
        than 4 steps.
    """
    chain = np.asarray(chain, np.float64)
    keys = ("ess_bulk", "ess_tail", "mcse_mean", "mcse_sd")
    az = _arviz()
    if az is None or chain.ndim != 3 or chain.shape[0] < 4:
        return {key: np.full(chain.shape[-1], np.nan) for key in keys}
    return dict(
        ess_bulk=_per_parameter(az.ess, chain, method="bulk"),
        ess_tail=_per_parameter(az.ess, chain, method="tail"),
        mcse_mean=_per_parameter(az.mcse, chain, method="mean"),
        mcse_sd=_per_parameter(az.mcse, chain, method="sd"),
    )


def chain_diagnostics(
    chain, *, n_burn: int | None = None, lazy_rhat: bool = False, full: bool = False
) -> dict:
    """Burn-in, autocorrelation times, ESS, R-hat and the convergence rule.

    Args:
        chain: (n_steps, n_walkers, k) an ensemble's chain (emcee's ``get_chain()``).
        n_burn: steps to discard; None = the module's rule
            (``min(ceil(BURN_TAU * tau_0), n_steps // 2)``, ``tau_0`` from the
            chain's second half).
        lazy_rhat: skip R-hat (NaN; not converged) while the chain is shorter than
            ``N_TAU_MIN`` tau: the rule fails whatever R-hat is (R-hat of a long
            chain costs ~0.3 s; the emcee loop uses this between checks).
        full: also ArviZ's bulk / tail ESS and MCSE of the kept chain
            (:func:`ess_mcse`).

    Returns:
        dict with ``n_burn``, ``n_kept`` (steps), ``tau`` (k,) [steps], ``ess`` (k,)
        (``n_walkers n_kept / tau``), ``rhat`` (k,) (:func:`rank_rhat`) and
        ``converged`` (``n_kept >= N_TAU_MIN * max(tau)`` and ``max(rhat) <
        RHAT_MAX``, tau finite); with ``full`` the keys of :func:`ess_mcse`.

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
    with np.errstate(invalid="ignore", divide="ignore"):
        ess = kept.shape[1] * n_kept / tau
    moving = np.isfinite(tau)
    tau_max = float(np.max(tau[moving])) if moving.any() else np.nan
    long_enough = bool(
        moving.any() and np.isfinite(tau_max) and n_kept >= N_TAU_MIN * tau_max
    )
    if lazy_rhat and not long_enough:
        rhat = np.full(chain.shape[2], np.nan)
    else:
        rhat = rank_rhat(kept)
    rhat_max = float(np.nanmax(rhat)) if np.any(np.isfinite(rhat)) else np.nan
    converged = bool(long_enough and np.isfinite(rhat_max) and rhat_max < RHAT_MAX)
    out = dict(
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
    if full:
        out.update(ess_mcse(kept))
    return out


def kish_ess(log_w) -> float:
    """Kish's effective sample size ``(sum w)^2 / sum w^2`` from log weights (m,).

    Hand-written: ArviZ has no ESS of importance weights (its ``psislw`` smooths
    them, a different thing), and this is one line."""
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
    Hand-written: ``np.quantile`` takes weights only with the step-function
    "inverted_cdf" rule, ArviZ has no weighted quantile, and ``corner.quantile``
    interpolates another CDF (equal weights would not give ``np.quantile``'s).
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
