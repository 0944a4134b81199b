"""What a sampler reports for one star (:class:`StarDraws`) and the LM solution
that starts its chains (:class:`LMSolution`): host-side NumPy records that
:mod:`payne_lite.posterior._table` turns into the results table's columns (see
:mod:`payne_lite.posterior._sample`)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._diagnostics import Summary


class StarDraws(NamedTuple):
    """One star's posterior draws and diagnostics, as a sampler reports them.

    Every method (``"emcee"``, ``"nuts"``, ``"mdn-is"``, an mdn-is star that fell
    back to emcee, and ``"failed"``) gives one; a field a method does not report
    keeps its default (NaN, 0, False, "" or None), which is also the table's value.
    Fit space: scaled labels in [-0.5, 0.5], rv [km/s], broadening [km/s],
    continuum coefficients; ``kf`` sampled parameters.

    Attributes:
        method: the sampler that produced the draws: "emcee", "nuts", "mdn-is", or
            "failed" (no sampler ran; ``failure`` says why).
        failure: why the star failed ("" otherwise).
        summary: the draws' p16, p50, p84, mean, std (kf,) each in fit space
            (weighted for mdn-is; emcee: every kept step, before thinning); None
            when failed.
        x: (m, kf) the kept draws in fit space (emcee: after burn-in, thinned,
            walkers flattened; nuts: chains flattened, thinned; mdn-is: the last
            stage's draws); None when failed.
        weights: (m,) mdn-is: the self-normalised importance weights of ``x``
            (summing to 1); None for MCMC draws.
        lp: (m,) the log posterior at each draw of ``x`` (fit space, up to a
            constant); None when failed.
        diverging: (m,) bool, nuts: the transition to each draw of ``x``
            diverged; None for the other methods.
        converged: the method's convergence rule held (emcee: >= N_TAU_MIN tau and
            R-hat < RHAT_MAX; nuts: ESS >= ess_target, R-hat <
            NUTS_RHAT_MAX, no divergence; mdn-is: ESS >= ess_min).
        fallback: mdn-is's ESS was below ``ess_min``, so emcee sampled the star;
            ``is_ess``, ``is_ess_mdn`` are then the IS run's (on an mdn-is record:
            the star is handed over to emcee).
        n_steps: emcee: steps per walker run; nuts: draws per chain after the
            warm-up; 0 for mdn-is.
        n_burn: emcee: burn-in steps discarded; nuts: warm-up steps; 0 for mdn-is.
        acceptance: emcee: mean acceptance fraction over walkers; nuts: mean
            acceptance statistic; NaN for mdn-is.
        tau: (kf,) integrated autocorrelation time per parameter [steps]; NaN for
            mdn-is; None when failed.
        rhat: (kf,) rank-normalised split R-hat per parameter; NaN for mdn-is;
            None when failed.
        ess_bulk, ess_tail: (kf,) ArviZ's bulk and tail ESS per parameter (MCMC,
            with ArviZ installed; else NaN); None when not computed.
        mcse_mean, mcse_sd: (kf,) ArviZ's Monte Carlo standard errors of the mean
            and the sd per parameter, fit space (as ``ess_bulk``).
        tau_max: the largest finite ``tau`` [steps].
        rhat_max: the largest finite ``rhat``.
        ess: effective sample size: MCMC the smallest over parameters of
            ``n_chains n_kept / tau``; mdn-is Kish's ``(sum w)^2 / sum w^2``.
        is_ess: mdn-is: Kish ESS of the last IS stage (also on a fallback star).
        is_ess_mdn: mdn-is: Kish ESS of stage 0, the MDN's own proposal.
        is_max_weight: mdn-is: the largest normalised weight.
        n_divergent: nuts: divergent transitions after the warm-up.
        step_size: nuts: the adapted step size, median over chains.
        n_leapfrog: nuts: mean leapfrog steps per draw.
        n_draws: draws behind the summaries (emcee: kept steps x walkers; nuts:
            draws x chains; mdn-is: the last stage's draws).
        n_evals: log-posterior evaluations (nuts: gradient evaluations with the
            warm-up's; a fallback star counts the IS stages' too).
        n_good: pixels of nonzero weight in the likelihood.
        lp_best: the largest log posterior sampled (``-chi2 / 2`` for the box
            prior), up to the sampler's constant.
        seconds: wall-clock time of the star's sampling [s] (a fallback star's
            includes its IS run).
    """

    method: str
    failure: str = ""
    summary: Summary | None = None
    x: np.ndarray | None = None
    weights: np.ndarray | None = None
    lp: np.ndarray | None = None
    diverging: np.ndarray | None = None
    converged: bool = False
    fallback: bool = False
    n_steps: int = 0
    n_burn: int = 0
    acceptance: float = np.nan
    tau: np.ndarray | None = None
    rhat: np.ndarray | None = None
    tau_max: float = np.nan
    rhat_max: float = np.nan
    ess: float = np.nan
    ess_bulk: np.ndarray | None = None
    ess_tail: np.ndarray | None = None
    mcse_mean: np.ndarray | None = None
    mcse_sd: np.ndarray | None = None
    is_ess: float = np.nan
    is_ess_mdn: float = np.nan
    is_max_weight: float = np.nan
    n_divergent: int = 0
    step_size: float = np.nan
    n_leapfrog: float = np.nan
    n_draws: int = 0
    n_evals: int = 0
    n_good: int = 0
    lp_best: float = np.nan
    seconds: float = np.nan


def failed_star(reason: str) -> StarDraws:
    """The record of a star no sampler could run for, and why."""
    return StarDraws("failed", failure=reason)


class LMSolution(NamedTuple):
    """One star's Levenberg-Marquardt fit (:func:`payne_lite.fitting.fit_spectra`),
    the start of its chains and the table's ``<name>_lm`` columns (k parameters of
    the layout, fixed ones included).

    Attributes:
        p: (k,) the solution in fit space (labels scaled to [-0.5, 0.5]).
        cov: (k, k) its covariance in fit space.
        phys: (k,) the solution in physical units (labels, rv [km/s], ...).
        err: (k,) its 1-sigma errors in physical units.
        flags: the fit's QA bitmask (:data:`payne_lite.fitting.FLAG_BITS`).
    """

    p: np.ndarray
    cov: np.ndarray
    phys: np.ndarray
    err: np.ndarray
    flags: int
