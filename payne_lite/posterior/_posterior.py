"""Posterior sampling of labels, radial velocity and continuum for observed spectra.

``sample(flux, flux_err, emulator, ...) -> astropy.table.Table``, one row per
spectrum, with posterior medians, 16/84 % quantiles and sampling diagnostics.

The target (one star)
---------------------
The parameters are those of :mod:`payne_lite.observe`, sampled in fit space:
scaled labels ``s`` (the training box -> [-0.5, 0.5]), ``rv`` [km/s], when
``cont_deg > 0`` the Chebyshev continuum coefficients, and with ``vsini=True`` /
``vmacro=True`` those broadening parameters [km/s] (uniform on their ranges);
parameters held by ``fixed`` are not sampled. The instrument options of
:func:`payne_lite.fit` (``air``, ``resolution``, ``lsf_sigma``,
``emulator_resolution``, ``limb_darkening``) build the same observation model. The
log posterior is ::

    log p(x | flux) = -1/2 sum_i w_i (model_i(x) - flux_i)^2 + log prior(x) + const

with the optimiser's likelihood (:func:`payne_lite.fit`): the same observation model
(:func:`payne_lite.observe.observe`), and the same weights ``w_i``: zero for masked
pixels, non-finite flux, non-finite or non-positive errors (the fitter's
``check_inputs``), zero for pixels not valid over the whole RV window (so that the
pixel set does not change with rv), else ``1 / (err_i^2 + e_i^2)`` with ``e_i`` the
emulator's own per-pixel error at the window's centre rv
(:func:`payne_lite.observe.emulator_error_on`, ``emulator_error=True``, when the
emulator has one).

The RV window is ``rv_c +- rv_window`` (default ``RV_WINDOW`` = 20 km/s, the
fitter's) intersected with ``rv_range``, around ``rv_c``: the LM fit's rv
(``init="lm"``) or the MDN's mean rv (``init="mdn"`` and ``method="mdn-is"``). The
fitter centres its window on its RV scan instead, a few km/s away at most: the
pixel sets can differ by a pixel at the window's edges.

Priors (``prior=``), all in fit space, all with rv uniform on the RV window and
continuum coefficients uniform on ``+-CONT_BOUND`` (the optimiser's bounds) and
broadening parameters on ``BROADENING_RANGE``:

* ``"box"`` (default): labels uniform on the training box.
* ``"mdn-uniform"``: LUCI's informed prior (Rhea et al. 2021): labels and rv
  uniform on the MDN's mean +- ``MDN_NSIGMA`` (3) sigma, intersected with the box
  and the RV window.
* ``"mdn-gauss"``: labels and rv Gaussian with the MDN's mean and sigma, truncated
  to the box and the RV window.

Samplers (``method=``)
----------------------
``"emcee"``: the affine-invariant ensemble sampler (Foreman-Mackey et al. 2013) with
``vectorize=True``: every log-probability call evaluates all the walkers it is given
by ONE jitted JAX function (:func:`_log_prob_batch`; emcee's stretch move calls it
twice per step, with half the walkers each), compiled once per shape and reused for
every star (the star's data are arguments, not constants). Walkers start in a small
ball around the LM solution (``init="lm"``: ``p_LM + BALL_SCALE * chol(C_LM) z``,
reflected into the prior's support) or are drawn from the MDN's Gaussians
(``init="mdn"``, truncated to the support). The chain runs in blocks of
``check_every`` steps until the convergence rule holds or ``n_steps`` are done.
An emcee HDF5 backend (``backend_path``, one group per star) keeps the chains; a run
on an existing file continues each star's chain where it stopped (the data and
settings must be the same: checked by a hash stored in the group's attributes).

``"mdn-is"``: importance sampling with the MDN as proposal ``q``. Stage 0 draws
from independent Gaussians per label and rv (the MDN's mean, its sigma times
``is_scale``), *truncated* to the prior's support (drawn by inverse CDF; ``log q``
includes the truncation's normalisation; clipping instead would put point masses on
the edges that no density accounts for). Weights ``log w = log L + log prior -
log q`` in float64 on the host, self-normalised; effective sample size is Kish's
``(sum w)^2 / sum w^2`` (column ``is_ess_mdn`` for stage 0). The MDN's Gaussians are
independent and, on the APOGEE network at S/N 50, about twice as wide as the
posterior: stage 0 alone keeps ESS ~ 3-15 of 512 draws. So up to ``is_adapt``
(default ``IS_ADAPT`` = 4) adapted stages of ``n_draws`` follow, each a
multivariate Student-t (``IS_DF`` = 5) with the previous stage's weighted mean and
covariance (shrunk towards stage 0's diagonal by ``kf + 2`` pseudo-samples), until
one's ESS reaches ``IS_ADAPT_DONE`` (1/4) of its draws (:func:`_run_is`); draws
outside the support get zero weight (the proposal truncated to the support: its
normalisation is a constant that self-normalised weights do not see). The last
stage gives the summaries, weights and ``ess``; ``n_evals`` counts every stage's
draws. ``ISOptions(adapt=0)`` is the MDN proposal alone, ``n_draws`` of it. Stars whose
ESS is below ``ISOptions.ess_min`` (default 200), or whose MDN gave no
answer, are sampled again by emcee (``init`` as given, default the LM solution):
column ``fallback``; their ``seconds`` and ``n_evals`` count both. Needs an MDN and ``cont_deg=0``.

``"nuts"``: the No-U-Turn sampler (Hoffman & Gelman 2014; blackjax's multinomial
NUTS) on the same log posterior, with JAX gradients. It samples unconstrained
coordinates ``u`` (kf,): ``x = lo + (hi - lo) sigmoid(u)`` maps R^kf onto the
prior's support (the box, the RV window, the continuum bounds, or the MDN's
+-3 sigma), and the log density of ``u`` adds the Jacobian
``sum log((hi - lo) sigmoid(u) sigmoid(-u))``, so a uniform prior stays uniform
in ``x`` and trajectories meet no wall (:func:`_log_density_u`). ``n_chains``
(default ``NUTS_CHAINS`` = 4) chains start at the LM solution plus
``NUTS_INIT_SCALE`` (1) x the LM covariance's square root times N(0, 1) draws
(``init="lm"``; the MDN's Gaussians with ``init="mdn"``), each adapts its step
size and (by default dense) inverse mass matrix with Stan's window adaptation
(``blackjax.window_adaptation``, ``NUTSOptions.n_warmup`` = 500 steps,
discarded), then draws in blocks of ``check_every`` (default ``NUTS_BLOCK`` =
100) per chain until its rule holds or ``n_steps`` draws per chain are done. The
warm-up and each block are one jitted call, vmapped over the chains; the star's
data are arguments, so the compilation is shared by every star of the same shape.

Diagnostics and the convergence rule (emcee)
--------------------------------------------
From the chain ``(n_steps, n_walkers, k)`` (:func:`chain_diagnostics`):

* burn-in: ``n_burn = min(ceil(BURN_TAU * tau_0), n_steps // 2)`` steps, with
  ``tau_0`` the largest autocorrelation time of the chain's second half (walkers
  started in a small ball need a few tau to spread out);
* ``tau``: per parameter, emcee's integrated autocorrelation time of the kept chain
  (``emcee.autocorr.integrated_time(..., tol=0)``: the estimate is always returned,
  and the rule below decides whether to trust it) [steps];
* ``ess``: per parameter ``n_walkers * n_kept / tau``; column ``ess`` is the smallest;
* ``rhat``: split R-hat (Gelman et al. 2013) over the walkers' chains, each split
  in halves (2 * n_walkers chains), per parameter; column ``rhat_max``;
* ``acceptance``: emcee's mean acceptance fraction over walkers;
* ``converged``: ``n_kept >= N_TAU_MIN * max(tau)`` (50, emcee's advice for a
  trustworthy tau) and ``max(rhat) < RHAT_MAX`` (1.1; with 25 tau per half-chain,
  R-hat of a converged ensemble is about 1.02, so 1.01 would reject good chains),
  with finite tau. A :class:`SamplingWarning` names the stars that fail.

For ``"mdn-is"``, ``converged`` means ``ess >= ess_min``.

For ``"nuts"`` the same ``chain_diagnostics`` run on the draws (chains as walkers,
no burn-in: the warm-up is already gone): ``tau``, ``ess`` (``n_chains * n / tau``;
above ``n_chains * n`` when draws anticorrelate), split R-hat over the 2
``n_chains`` half-chains; ``converged``: the smallest ESS >= ``ess_target``
(default ``NUTS_ESS_MIN`` = 400), max split R-hat < ``NUTS_RHAT_MAX`` (1.01;
Vehtari et al. 2021 advise both) and no divergent transition after the warm-up
(column ``n_divergent``; one in a posterior of smooth nets means the step size
is too large for some region, and the draws there are biased).

Summaries (columns, physical units)
-----------------------------------
For each label, ``rv`` [km/s] and continuum coefficient: ``<name>`` = posterior
median, ``<name>_err`` = half the 16-84 % range, ``<name>_p16``, ``<name>_p50``,
``<name>_p84``, ``<name>_std``; with ``init="lm"`` also the LM solution
``<name>_lm``, ``<name>_lm_err``; with an MDN ``<name>_mdn``, ``<name>_mdn_sigma``.
Then ``method`` (per row: "emcee", "mdn-is", "nuts"), ``converged``, ``fallback``,
``n_steps``, ``n_burn``, ``acceptance``, ``tau`` (n, k) and ``rhat`` (n, k) over
``meta["sample_params"]``, ``tau_max``, ``rhat_max``, ``ess``, ``n_draws``
(samples behind the summaries), ``n_evals`` (log-posterior evaluations), ``is_ess``, ``is_ess_mdn``,
``is_max_weight`` (mdn-is: the largest normalised weight), ``n_divergent``,
``step_size`` (median over chains), ``n_leapfrog`` (mean per draw; nuts: ``n_steps``
= draws per chain, ``n_burn`` = warm-up steps, ``acceptance`` = mean acceptance
statistic, ``n_evals`` = gradient evaluations with the warm-up's), ``n_good_pixels``,
``chi2_min`` (the best sample's chi2), ``seconds``.

Precision: the log probability in JAX's default float (float32 unless x64 is
enabled): chi2 of ~7000 pixels is then resolved to ~1e-3, far below the unit
changes that matter to a sampler. Weights and summaries are float64 on the host.

References:
    Ting, Conroy, Rix & Cargile 2019, ApJ 879, 69 ("The Payne").
    Foreman-Mackey, Hogg, Lang & Goodman 2013, PASP 125, 306 (emcee).
    Rhea et al. 2021, AJ 162, 4 (LUCI: MDN priors).
    Gelman et al. 2013, Bayesian Data Analysis, 3rd ed. (split R-hat).
    Hoffman & Gelman 2014, JMLR 15, 1593 (NUTS).
    Vehtari, Gelman, Simpson, Carpenter & Buerkner 2021, Bayesian Analysis 16, 667
    (R-hat < 1.01, ESS > 400).
    Cabezas et al. 2024, arXiv:2402.10797 (blackjax).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._validate import as_float_array
from ..emulator import Emulator
from ..errors import SamplingWarning
from ..fitting import FLAG_BITS, FLAG_FAILED, FLAG_NOT_CONVERGED, fit_spectra
from ..observe import (
    BROADENING_PARAMS,
    BROADENING_START,
    LABEL_BOUND,
    MDN_NSIGMA,
    RV_WINDOW,
    Instrument,
    ObsModel,
    build_obs_model,
    check_fixed,
    check_inputs,
    check_rv_range,
    emulator_error_on,
    observe,
    param_layout,
    window_valid,
)
from ..options import EmceeOptions, ISOptions, NUTSOptions, options_for

Array = jax.Array

METHODS = ("emcee", "mdn-is", "nuts")
PRIORS = ("box", "mdn-uniform", "mdn-gauss")

#: Converged (emcee): kept steps >= N_TAU_MIN * the largest autocorrelation time ...
N_TAU_MIN = 50.0
#: ... and the largest split R-hat below RHAT_MAX.
RHAT_MAX = 1.1
#: Burn-in: BURN_TAU autocorrelation times (at most half the chain).
BURN_TAU = 5.0
#: Walkers start at the LM solution + BALL_SCALE * (LM covariance)^(1/2) z.
BALL_SCALE = 0.1
#: mdn-is: adaptation stops after a stage whose ESS reaches this fraction of its
#: draws (512 of 2048, 2.5x IS_ESS_MIN: on 30 APOGEE mock stars at S/N 50, 0.5 made
#: most stars run all four stages for a median final ESS of 1340).
IS_ADAPT_DONE = 0.25
#: mdn-is: degrees of freedom of the adapted multivariate Student-t proposal.
IS_DF = 5.0
#: mdn-is: draws evaluated per jitted call.
IS_CHUNK = 64
#: ... the largest split R-hat over the chains is below this (Vehtari et al. 2021) ...
NUTS_RHAT_MAX = 1.01
#: ... and no transition diverged. Chains start at the LM solution plus
#: NUTS_INIT_SCALE x (LM covariance)^(1/2) z: dispersed as the posterior is, so that
#: R-hat can see chains that do not mix.
NUTS_INIT_SCALE = 1.0
#: Format tag and version of the saved-samples file.
SAMPLES_FORMAT = "payne_lite.samples"
SAMPLES_VERSION = 1


class PosteriorSamples(NamedTuple):
    """Samples of each star's posterior, physical units.

    Attributes:
        names: the k sampled parameters (labels, ``rv``, ``cont_<j>``; not fixed ones).
        units: their units.
        samples: one (m_i, k) array per star (emcee: the kept chain, flattened over
            walkers and thinned; mdn-is: the draws).
        weights: one (m_i,) array of normalised weights per star (mdn-is), or None
            (equal weights).
        method: per star, the sampler that produced them.
        n_chains: per star, the chains interleaved in ``samples`` (emcee: walkers,
            nuts: chains; rows are step-major, so ``samples.reshape(-1, n_chains,
            k)`` gives the (thinned) traces); 0 for mdn-is draws and failed stars.
        prior_lo, prior_hi: per star, (k,) the prior's support [physical units],
            or None where no sampler ran.
        prior_mu, prior_sd: per star, (k,) the Gaussian prior's mean and sd
            (``mdn-gauss``; sd = inf where the prior is flat), or None.
    """

    names: tuple[str, ...]
    units: tuple[str, ...]
    samples: list
    weights: list
    method: list
    n_chains: list | None = None
    prior_lo: list | None = None
    prior_hi: list | None = None
    prior_mu: list | None = None
    prior_sd: list | None = None


class _Target(NamedTuple):
    """One star's log posterior, as arrays (a pytree argument of the jitted core).

    ``x`` is the vector of the free parameters (kf,); ``base`` (k,) holds the fixed
    values; ``idx`` (kf,) int the positions of the free ones in ``base``.
    """

    base: Array  # (k,)
    idx: Array  # (kf,) int32
    flux: Array  # (P,)
    w: Array  # (P,) weights 1 / sigma^2 (0 = pixel unused)
    lo: Array  # (kf,) prior support
    hi: Array  # (kf,)
    mu: Array  # (kf,) Gaussian prior mean (where ivp > 0)
    ivp: Array  # (kf,) Gaussian prior 1 / sigma^2 (0 = flat)


# --------------------------------------------------------------------------------------
# Pure, jitted core
# --------------------------------------------------------------------------------------
def _log_like_prior(obs: ObsModel, x, t: _Target):
    """``-chi2 / 2`` plus the Gaussian prior term at free parameters ``x`` (kf,),
    with no support check (differentiable: the NUTS target builds on it)."""
    p = t.base.at[t.idx].set(x)
    f, _ = observe(obs, p)
    r = f - t.flux
    chi2 = jnp.sum(t.w * r * r)
    return -0.5 * chi2 - 0.5 * jnp.sum(t.ivp * (x - t.mu) ** 2)


def _log_prob_one(obs: ObsModel, x, t: _Target):
    """Log posterior (up to a constant) of one star at free parameters ``x`` (kf,);
    ``-inf`` outside the prior's support (and for a non-finite value)."""
    lp = _log_like_prior(obs, x, t)
    inside = jnp.all((x >= t.lo) & (x <= t.hi))
    return jnp.where(inside & jnp.isfinite(lp), lp, -jnp.inf)


@jax.jit
def _log_prob_batch(obs: ObsModel, xs, t: _Target):
    """(m,) log posterior of one star at ``xs`` (m, kf): one batched model call."""
    return jax.vmap(_log_prob_one, in_axes=(None, 0, None))(obs, xs, t)


@jax.jit
def _window_valid_batch(obs: ObsModel, rv_lo, rv_hi):
    return jax.vmap(window_valid, in_axes=(None, 0, 0))(obs, rv_lo, rv_hi)


# NUTS: the prior's support (a box in fit space) mapped onto R^kf, so that the
# sampler meets no hard walls: x = lo + (hi - lo) sigmoid(u), and the density of u
# carries the Jacobian |dx/du| = (hi - lo) sigmoid(u) sigmoid(-u).
def _from_unconstrained(u, lo, hi):
    return lo + (hi - lo) * jax.nn.sigmoid(u)


def _log_jacobian(u, lo, hi):
    return jnp.sum(jnp.log(hi - lo) + jax.nn.log_sigmoid(u) + jax.nn.log_sigmoid(-u))


def _log_density_u(obs: ObsModel, u, t: _Target):
    """Log posterior of one star in the unconstrained coordinates ``u`` (kf,)."""
    x = _from_unconstrained(u, t.lo, t.hi)
    lp = _log_like_prior(obs, x, t) + _log_jacobian(u, t.lo, t.hi)
    return jnp.where(jnp.isfinite(lp), lp, -jnp.inf)


def _warmup_info(state, info, adaptation_state):
    """What the window adaptation keeps per step: the gradient evaluations."""
    del state, adaptation_state
    return info.num_integration_steps


@functools.partial(jax.jit, static_argnames=("n_warmup", "dense"))
def _nuts_warmup(obs: ObsModel, t: _Target, keys, u0, *, n_warmup, dense):
    """Stan-style window adaptation (blackjax.window_adaptation) of each chain.

    ``keys`` (C,), ``u0`` (C, kf) starting points. Returns the chains' last states,
    step sizes (C,), inverse mass matrices (C, kf[, kf]) and gradient evaluations (C,).
    """
    import blackjax

    def one(key, u):
        def logdensity(v):
            return _log_density_u(obs, v, t)

        warmup = blackjax.window_adaptation(
            blackjax.nuts, logdensity, is_mass_matrix_diagonal=not dense,
            adaptation_info_fn=_warmup_info,
        )  # fmt: skip
        (state, params), n_int = warmup.run(key, u, num_steps=n_warmup)
        return (
            state,
            params["step_size"],
            params["inverse_mass_matrix"],
            jnp.sum(n_int),
        )

    return jax.vmap(one)(keys, u0)


@functools.partial(jax.jit, static_argnames=("n_draws",))
def _nuts_draws(obs: ObsModel, t: _Target, keys, state, step_size, imm, *, n_draws):
    """``n_draws`` NUTS transitions of each chain (vmapped over the C chains).

    Returns the new states and, per chain and draw, (position (C, n, kf),
    log density (C, n), divergent (C, n), integration steps (C, n), acceptance
    (C, n)).
    """
    import blackjax

    def one(key, st, eps, m):
        def logdensity(v):
            return _log_density_u(obs, v, t)

        kernel = blackjax.nuts(logdensity, eps, m)

        def body(s, k):
            s, info = kernel.step(k, s)
            out = (
                s.position,
                s.logdensity,
                info.is_divergent,
                info.num_integration_steps,
                info.acceptance_rate,
            )
            return s, out

        return jax.lax.scan(body, st, jax.random.split(key, n_draws))

    return jax.vmap(one)(keys, state, step_size, imm)


# --------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# Host side: per-star targets
# --------------------------------------------------------------------------------------
def _data_hash(flux, w, lo, hi, mu, ivp, base) -> str:
    h = hashlib.sha256()
    for a in (flux, w, lo, hi, mu, ivp, base):
        h.update(np.ascontiguousarray(a, np.float64).tobytes())
    return h.hexdigest()[:32]


def _truncnorm_logpdf(x, mu, sd, lo, hi):
    """log density of N(mu, sd) truncated to [lo, hi], elementwise (float64)."""
    from scipy.stats import truncnorm

    a, b = (lo - mu) / sd, (hi - mu) / sd
    return truncnorm.logpdf(x, a, b, loc=mu, scale=sd)


def _truncnorm_draw(rng, mu, sd, lo, hi, size):
    """(size, kf) draws of independent N(mu, sd) truncated to [lo, hi] (inverse CDF,
    scipy's ``truncnorm``, accurate in the tails)."""
    from scipy.stats import truncnorm

    a, b = (lo - mu) / sd, (hi - mu) / sd
    return truncnorm.rvs(a, b, loc=mu, scale=sd, size=(size, mu.size), random_state=rng)


def _reflect(x, lo, hi):
    """Reflect ``x`` into [lo, hi] (componentwise; for the starting ball)."""
    span = hi - lo
    y = np.mod(x - lo, 2.0 * span)
    y = np.where(y > span, 2.0 * span - y, y)
    return lo + np.clip(y, 1e-9 * span, (1.0 - 1e-9) * span)


def _linear_continuum(obs, p, flux, w, n_cont):
    """Continuum coefficients (n_cont,) solving weighted least squares at ``p``."""
    q = np.asarray(p, np.float64).copy()
    q[obs.n_labels + 1 :] = 0.0
    q[obs.n_labels + 1] = 1.0
    m, _ = observe(obs, jnp.asarray(q, obs.x_obs.dtype))
    m = np.asarray(m, np.float64)
    b = np.asarray(obs.basis, np.float64) * m[:, None]
    a = (b * w[:, None]).T @ b
    rhs = (b * w[:, None]).T @ flux
    try:
        return np.linalg.solve(a + 1e-9 * np.trace(a) * np.eye(n_cont), rhs)
    except np.linalg.LinAlgError:
        out = np.zeros(n_cont)
        out[0] = 1.0
        return out


def _check_int(value, name, minimum):
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class _Problem:
    """What every star of one :func:`sample` call shares (host side)."""

    emulator: Emulator
    obs: ObsModel
    layout: object
    flux2: np.ndarray  # (n, P)
    ivar: np.ndarray  # (n, P) 1 / err^2, 0 = unused
    fix: dict
    idx: np.ndarray  # (kf,) free parameters
    prior: str
    rv_range: tuple
    rv_window: float
    perr: np.ndarray | None  # (P_rest,) emulator error, or None
    wave_rest: np.ndarray
    wave_obs: np.ndarray
    mdn_mean: np.ndarray | None  # (n, L + 1) physical
    mdn_sigma: np.ndarray | None
    mdn_ok: np.ndarray  # (n,) bool

    def mdn_fit_space(self, i):
        """MDN mean and sigma (L + 1,) in fit space (scaled labels, rv) for star i."""
        emu = self.emulator
        n_lab = emu.n_labels
        m = np.array(self.mdn_mean[i], np.float64)
        s = np.array(self.mdn_sigma[i], np.float64)
        m[:n_lab] = emu.scale(m[:n_lab])
        s[:n_lab] = s[:n_lab] / (emu.label_hi - emu.label_lo)
        return m, s

    def target(self, i, centre) -> dict:
        """Star i's :class:`_Target` as a dict of NumPy arrays.

        ``centre`` (k,) in fit space: its rv is the RV window's centre, its values
        of fixed parameters are replaced by ``fixed``'s, its other entries unused.
        """
        layout, n_lab = self.layout, self.layout.n_labels
        k = len(layout.names)
        dt = self.obs.x_obs.dtype
        rv_c = float(np.clip(centre[n_lab], *self.rv_range))
        rv_lo = max(rv_c - self.rv_window, self.rv_range[0])
        rv_hi = min(rv_c + self.rv_window, self.rv_range[1])
        if n_lab in self.fix:
            rv_c = rv_lo = rv_hi = self.fix[n_lab]
        valid = np.asarray(
            _window_valid_batch(
                self.obs, jnp.asarray([rv_lo], dt), jnp.asarray([rv_hi], dt)
            )
        )[0]
        w = np.where(valid, self.ivar[i], 0.0)
        if self.perr is not None:
            pe = emulator_error_on(
                self.wave_obs, self.wave_rest, self.perr, np.array([rv_c])
            )[0]
            w = np.where(w > 0, 1.0 / (1.0 / np.where(w > 0, w, 1.0) + pe**2), 0.0)
        lo = layout.lower.copy()
        hi = layout.upper.copy()
        lo[n_lab], hi[n_lab] = rv_lo, rv_hi
        mu = np.zeros(k)
        ivp = np.zeros(k)
        if self.prior != "box" and self.mdn_ok[i]:
            m, s = self.mdn_fit_space(i)
            if self.prior == "mdn-uniform":
                lo[: n_lab + 1] = np.maximum(lo[: n_lab + 1], m - MDN_NSIGMA * s)
                hi[: n_lab + 1] = np.minimum(hi[: n_lab + 1], m + MDN_NSIGMA * s)
            else:
                mu[: n_lab + 1] = m
                ivp[: n_lab + 1] = 1.0 / s**2
        base = np.array(centre, np.float64)
        for j, v in self.fix.items():
            base[j] = v
        idx = self.idx
        return dict(
            base=base, idx=idx, flux=self.flux2[i], w=w, lo=lo[idx], hi=hi[idx],
            mu=mu[idx], ivp=ivp[idx],
        )  # fmt: skip


def _to_device(tg: dict, dt) -> _Target:
    return _Target(
        **{
            key: jnp.asarray(val, jnp.int32 if key == "idx" else dt)
            for key, val in tg.items()
        }
    )


def _check_instrument(instrument) -> Instrument:
    if instrument is None:
        return Instrument()
    if not isinstance(instrument, Instrument):
        raise ValueError(
            f"instrument must be a payne_lite.Instrument, got {type(instrument).__name__}"
        )
    return instrument


def _instrument(inst: Instrument, fixed, emulator, wavelength):
    """(broadening names, vacuum wavelength) of the samplers' one grid."""
    if wavelength is not None and np.ndim(wavelength) != 1:
        raise ValueError(
            f"the samplers take one wavelength grid (P,), got {np.shape(wavelength)}; "
            "sample spectra on different grids in separate calls"
        )
    if inst.per_star:
        raise ValueError(
            "the samplers take one wavelength grid: a per-star (n, P) resolution or "
            "lsf_sigma is refused; sample such spectra in separate calls"
        )
    return inst.broadening(fixed, emulator), inst.vacuum_wavelength(wavelength)


def _prepare(
    flux, flux_err, emulator, *, mask, wavelength, prior, mdn, cont_deg, rv_range,
    rv_window, fixed, emulator_error, model_options=None,
) -> _Problem:  # fmt: skip
    """Validate the inputs shared by :func:`sample` and :func:`log_posterior`.

    ``model_options``: ``resolution``, ``lsf_sigma``, ``emulator_resolution``,
    ``broadening`` (names) and ``limb_darkening``, for :func:`build_obs_model`."""
    opts = dict(model_options or {})
    broadening = tuple(opts.get("broadening", ()))
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
    if mdn is None and prior != "box":
        raise ValueError(f"prior={prior!r} needs an mdn")
    if not (np.isfinite(rv_window) and rv_window > 0):
        raise ValueError(f"rv_window must be > 0 [km/s], got {rv_window!r}")
    rv_range = check_rv_range(rv_range)
    if mdn is not None:
        mdn.check_emulator(emulator)
        if wavelength is not None:
            mdn.check_wavelength(wavelength)
    obs = build_obs_model(
        emulator,
        wavelength=wavelength,
        cont_deg=cont_deg,
        rv_max=max(abs(v) for v in rv_range),
        **opts,
    )
    layout = param_layout(
        emulator, cont_deg=cont_deg, rv_range=rv_range, broadening=broadening
    )
    flux2, ivar = check_inputs(flux, flux_err, mask, obs.x_obs.shape[0])
    n = flux2.shape[0]
    fix = check_fixed(fixed, emulator, rv_range, layout)
    free = np.ones(len(layout.names), bool)
    free[list(fix)] = False
    mdn_mean = mdn_sigma = None
    mdn_ok = np.zeros(n, bool)
    if mdn is not None:
        mdn_mean, mdn_sigma = mdn.predict(flux2, _err_from_ivar(ivar), mask=~(ivar > 0))
        mdn_mean = np.atleast_2d(np.asarray(mdn_mean, np.float64))
        mdn_sigma = np.atleast_2d(np.asarray(mdn_sigma, np.float64))
        if mdn_mean.shape != (n, emulator.n_labels + 1) or mdn_sigma.shape != (
            n,
            emulator.n_labels + 1,
        ):
            raise ValueError(
                f"mdn.predict returned mean {mdn_mean.shape} and sigma "
                f"{mdn_sigma.shape}, expected ({n}, {emulator.n_labels + 1})"
            )
        with np.errstate(invalid="ignore"):
            mdn_ok = np.all(np.isfinite(mdn_mean) & (mdn_sigma > 0), axis=1)
            mdn_ok &= np.all(np.isfinite(mdn_sigma), axis=1)
    return _Problem(
        emulator=emulator,
        obs=obs,
        layout=layout,
        flux2=flux2,
        ivar=ivar,
        fix=fix,
        idx=np.flatnonzero(free),
        prior=prior,
        rv_range=rv_range,
        rv_window=float(rv_window),
        perr=(
            np.asarray(emulator.pixel_error, np.float64)
            if emulator_error and emulator.pixel_error is not None
            else None
        ),
        wave_rest=np.asarray(emulator.wavelength, np.float64),
        wave_obs=np.asarray(
            emulator.wavelength if wavelength is None else wavelength, np.float64
        ),
        mdn_mean=mdn_mean,
        mdn_sigma=mdn_sigma,
        mdn_ok=mdn_ok,
    )


def log_posterior(
    flux,
    flux_err,
    emulator: Emulator,
    params,
    *,
    rv_centre: float,
    mask=None,
    wavelength=None,
    instrument: Instrument | None = None,
    prior: str = "box",
    mdn=None,
    cont_deg: int = 0,
    rv_range=(-500.0, 500.0),
    rv_window: float = RV_WINDOW,
    fixed=None,
    emulator_error: bool = True,
) -> np.ndarray:
    """The log posterior :func:`sample` samples, for one spectrum, up to a constant.

    Args:
        flux, flux_err: (P,) one observed spectrum and its errors.
        emulator: the rest-frame spectrum emulator.
        params: (m, k) or (k,) points [physical labels, rv [km/s], continuum
            coefficients], the parameters held by ``fixed`` left out.
        rv_centre: centre of the RV window [km/s] (:func:`sample` uses the LM or
            MDN rv); it also fixes the pixel set and the emulator-error shift.
        mask, wavelength, instrument, prior, mdn, cont_deg, rv_range, rv_window,
        fixed, emulator_error: as in :func:`sample`.

    Returns:
        (m,) float64 log posterior (``-inf`` outside the prior's support), or a
        float for one point.

    Raises:
        ValueError: more than one spectrum, or ``params`` of the wrong width.
    """
    if np.ndim(flux) != 1:
        raise ValueError(f"log_posterior takes one spectrum (P,), got {np.shape(flux)}")
    inst = _check_instrument(instrument)
    _, wavelength = _instrument(inst, fixed, emulator, wavelength)
    pb = _prepare(
        flux, flux_err, emulator, mask=mask, wavelength=wavelength, prior=prior,
        mdn=mdn, cont_deg=cont_deg, rv_range=rv_range, rv_window=rv_window,
        fixed=fixed, emulator_error=emulator_error,
        model_options=inst.model_options(fixed, emulator),
    )  # fmt: skip
    x = as_float_array(params, "params", ndim=(1, 2))
    x2 = np.atleast_2d(x)
    kf = pb.idx.size
    if x2.shape[1] != kf:
        names = [pb.layout.names[j] for j in pb.idx]
        raise ValueError(f"params {x.shape} must have {kf} columns {names}")
    n_lab = emulator.n_labels
    xs = x2.copy()
    lab = pb.idx < n_lab
    j = pb.idx[lab]
    xs[:, lab] = (x2[:, lab] - emulator.label_lo[j]) / (
        emulator.label_hi[j] - emulator.label_lo[j]
    ) - 0.5
    centre = np.zeros(len(pb.layout.names))
    centre[n_lab] = float(rv_centre)
    dt = pb.obs.x_obs.dtype
    tg = pb.target(0, centre)
    lp = np.asarray(
        _log_prob_batch(pb.obs, jnp.asarray(xs, dt), _to_device(tg, dt)), np.float64
    )
    return lp if x.ndim == 2 else float(lp[0])


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------
def sample(
    flux,
    flux_err,
    emulator: Emulator,
    *,
    method: str = "emcee",
    mask=None,
    wavelength=None,
    instrument: Instrument | None = None,
    prior: str = "box",
    mdn=None,
    cont_deg: int = 0,
    rv_range=(-500.0, 500.0),
    rv_window: float = RV_WINDOW,
    fixed=None,
    seed: int = 0,
    emulator_error: bool = True,
    options: EmceeOptions | NUTSOptions | ISOptions | None = None,
    lm_table=None,
    return_samples: bool = False,
    progress: bool = False,
):
    """Posterior samples of labels, rv (and continuum) per spectrum, summarised.

    Args:
        flux: (n, P) or (P,) observed flux on ``wavelength``.
        flux_err: same shape, 1-sigma errors; non-finite or non-positive errors (and
            non-finite flux) give that pixel zero weight, as in :func:`fit`.
        emulator: the rest-frame spectrum emulator.
        method: ``"emcee"``, ``"mdn-is"`` or ``"nuts"`` (see the module docstring).
        mask: optional bool (P,) or (n, P), True = ignore the pixel.
        wavelength: (P,) observed wavelength [A]; None = the emulator's grid.
        prior: ``"box"``, ``"mdn-uniform"`` or ``"mdn-gauss"`` (the last two need
            ``mdn``).
        instrument: the observation side (:class:`payne_lite.Instrument`), as in
            :func:`payne_lite.fit`; ``vsini`` / ``vmacro`` [km/s] are sampled with a
            uniform prior on their ranges unless ``fixed`` holds them.
            ``method="mdn-is"`` takes no free broadening parameter (the MDN has no
            proposal for it).
        prior: ``"box"``, ``"mdn-uniform"`` or ``"mdn-gauss"`` (the last two need
            ``mdn``).
        mdn: a :class:`payne_lite.MDN` for ``emulator`` (priors, ``init="mdn"``,
            ``method="mdn-is"``).
        cont_deg: degree of the multiplicative Chebyshev continuum (0 = none).
        rv_range: (lo, hi) [km/s] for the LM fit and the RV window's limits.
        rv_window: half-width of the RV window [km/s] (the rv prior's support).
        fixed: ``{name: value}`` holds labels [physical] or ``"rv"`` [km/s] fixed.
        seed: seeds the walkers, emcee's generator and the draws (star i uses
            ``seed + i``).
        emulator_error: add the emulator's per-pixel error in quadrature (as in
            :func:`fit`).
        options: the sampler's settings: :class:`payne_lite.EmceeOptions`,
            :class:`payne_lite.NUTSOptions` or :class:`payne_lite.ISOptions` (its
            ``fallback`` holds the emcee settings of stars that fall back); None =
            the method's defaults. Another method's options are refused.
        lm_table: a :func:`fit` table of these spectra (same ``cont_deg``,
            ``fixed``), to skip the LM fit of ``init="lm"``.
        return_samples: also return a :class:`PosteriorSamples` (save it with
            :func:`save_samples`).
        progress: a tqdm bar over stars.

        Stars that fail their convergence rule are named in a
        :class:`payne_lite.SamplingWarning` (filter it with :mod:`warnings` to
        silence it) and have ``converged`` False in the table.

    Returns:
        astropy Table, one row per spectrum (columns in the module docstring); with
        ``return_samples``, ``(table, PosteriorSamples)``.

    Raises:
        ValueError: bad shapes (named), an unknown method / prior / init, a prior or
            method that needs an MDN without one, ``mdn-is`` with a continuum, bad
            sampler settings, a backend group from other data or settings.

    Examples:
        >>> t = sample(flux, err, emu, options=EmceeOptions(n_steps=4000))  # doctest: +SKIP
        >>> t["Teff"], t["Teff_p16"], t["Teff_p84"], t["converged"]
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    opts = options_for(method, options)
    inst = _check_instrument(instrument)
    # emcee's settings: its own, or those of mdn-is's fallback
    em = opts.fallback if method == "mdn-is" else opts
    init = getattr(em, "init", "lm")
    nuts = opts if method == "nuts" else NUTSOptions()
    is_opts = opts if method == "mdn-is" else ISOptions()
    n_steps, check_every, thin = em.n_steps, em.check_every, em.thin
    if mdn is None and (init == "mdn" or method == "mdn-is"):
        need = "init='mdn'" if init == "mdn" else "method='mdn-is'"
        raise ValueError(f"{need} needs an mdn")
    if method == "mdn-is" and cont_deg:
        raise ValueError(
            "method='mdn-is' samples no continuum (the MDN has no proposal for it): "
            f"use cont_deg=0 or method='emcee', got cont_deg={cont_deg}"
        )
    broadening, wavelength = _instrument(inst, fixed, emulator, wavelength)
    inst = dataclasses.replace(
        inst, vsini="vsini" in broadening, vmacro="vmacro" in broadening
    )
    free_broad = [b for b in broadening if b not in dict(fixed or {})]
    if method == "mdn-is" and free_broad:
        raise ValueError(
            f"method='mdn-is' samples no broadening (the MDN has no proposal for "
            f"{free_broad}): fix them or use method='emcee' or 'nuts'"
        )
    model_options = inst.model_options(fixed, emulator)
    pb = _prepare(
        flux, flux_err, emulator, mask=mask, wavelength=wavelength, prior=prior,
        mdn=mdn, cont_deg=cont_deg, rv_range=rv_range, rv_window=rv_window,
        fixed=fixed, emulator_error=emulator_error, model_options=model_options,
    )  # fmt: skip
    obs, layout, fix, idx = pb.obs, pb.layout, pb.fix, pb.idx
    # the LM start: the same model (the wavelengths are vacuum already)
    fit_options = dict(
        wavelength=wavelength, cont_deg=cont_deg, rv_range=rv_range, fixed=fixed,
        emulator_error=emulator_error,
        instrument=dataclasses.replace(inst, air=False),
    )  # fmt: skip
    flux2, ivar = pb.flux2, pb.ivar
    rv_range = pb.rv_range
    n = flux2.shape[0]
    n_lab = emulator.n_labels
    k = len(layout.names)
    kf = idx.size
    n_walkers = getattr(em, "n_walkers", None)  # NUTSOptions has none
    if n_walkers is None:
        n_walkers = max(32, 4 * kf)
        n_walkers += n_walkers % 2
    elif n_walkers < 2 * kf + 2:
        raise ValueError(
            f"EmceeOptions.n_walkers must be >= 2 kf + 2 = {2 * kf + 2} for the "
            f"{kf} sampled parameters, got {n_walkers}"
        )
    if lm_table is not None and len(lm_table) != n:
        raise ValueError(f"lm_table has {len(lm_table)} rows for {n} spectra")
    mdn_ok = pb.mdn_ok
    mdn_fit_space = pb.mdn_fit_space
    target = pb.target
    dt = obs.x_obs.dtype
    perr = pb.perr

    # LM solutions, when needed (all stars for emcee with init="lm").
    lm = lm_table
    # "emcee" rows: run an MCMC sampler (emcee, or NUTS for method="nuts"; mdn-is
    # falls back to emcee)
    run_emcee = np.full(n, method in ("emcee", "nuts"))
    if method == "mdn-is":
        run_emcee = ~mdn_ok  # more join after the IS pass

    lm_cache: dict[int, dict] = {}

    def _fit_subset(rows):
        sub = fit_spectra(
            flux2[rows], _err_from_ivar(ivar[rows]), emulator, **fit_options
        )
        for j, i in enumerate(rows):
            lm_cache[int(i)] = _lm_row(sub, j, layout, emulator)
        return None

    def lm_of(i):
        if int(i) in lm_cache:
            return lm_cache[int(i)]
        return _lm_row(lm, i, layout, emulator)

    def to_device(tg):
        return _to_device(tg, dt)

    rows_out: list[dict] = [None] * n  # type: ignore[list-item]
    priors_out: list = [None] * n  # each star's target (its prior), last one used
    samples_out: list = [None] * n
    weights_out: list = [None] * n
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="sample", unit="spectrum")

    try:
        # 1. mdn-is for every star the MDN answers for.
        if method == "mdn-is":
            for i in np.flatnonzero(mdn_ok):
                t0 = time.perf_counter()
                m, s = mdn_fit_space(i)
                centre = np.zeros(k)
                centre[: n_lab + 1] = m
                centre[:n_lab] = np.clip(centre[:n_lab], -LABEL_BOUND, LABEL_BOUND)
                tg = target(i, centre)
                priors_out[i] = tg
                n_good = int(np.count_nonzero(tg["w"] > 0))
                if n_good <= kf:
                    rows_out[i] = _failed_row(
                        f"{n_good} usable pixels for {kf} parameters"
                    )
                    if bar is not None:
                        bar.update(1)
                    continue
                res = _run_is(
                    obs, to_device(tg), tg, m[idx], s[idx] * is_opts.scale,
                    is_opts.n_draws, seed + int(i), dt, is_opts.adapt,
                )  # fmt: skip
                res["seconds"] = time.perf_counter() - t0
                res["n_good"] = n_good
                if res["ess"] < is_opts.ess_min:
                    run_emcee[i] = True
                    res["fallback_from_is"] = True
                rows_out[i] = res
                if not run_emcee[i]:
                    samples_out[i] = res.pop("x")
                    weights_out[i] = res.pop("weights")
                    if bar is not None:
                        bar.update(1)

        # 2. emcee.
        em_rows = np.flatnonzero(run_emcee)
        if em_rows.size and init == "lm":
            if lm is None:
                if em_rows.size == n:
                    lm = fit_spectra(
                        flux2, _err_from_ivar(ivar), emulator, **fit_options
                    )
                else:
                    _fit_subset(em_rows)
        for i in em_rows:
            t0 = time.perf_counter()
            rng = np.random.default_rng(seed + int(i))
            if init == "lm":
                lmr = lm_of(i)
                centre = lmr["p"]
            else:
                if not mdn_ok[i]:
                    rows_out[i] = _failed_row("the MDN gave no answer")
                    if bar is not None:
                        bar.update(1)
                    continue
                m, s = mdn_fit_space(i)
                centre = np.zeros(k)
                centre[: n_lab + 1] = m
                centre[:n_lab] = np.clip(centre[:n_lab], -LABEL_BOUND, LABEL_BOUND)
                for b in layout.broadening:
                    centre[layout.names.index(b)] = BROADENING_START[b]
                if obs.n_cont:
                    tmp = target(i, centre)
                    centre[layout.cont_slice] = _linear_continuum(
                        obs, centre, flux2[i], tmp["w"], obs.n_cont
                    )
            if not np.all(np.isfinite(centre)):
                rows_out[i] = _failed_row("no finite starting point (LM failed)")
                if bar is not None:
                    bar.update(1)
                continue
            tg = target(i, centre)
            priors_out[i] = tg
            n_good = int(np.count_nonzero(tg["w"] > 0))
            if n_good <= kf:
                rows_out[i] = _failed_row(f"{n_good} usable pixels for {kf} parameters")
                if bar is not None:
                    bar.update(1)
                continue
            n_start = nuts.n_chains if method == "nuts" else n_walkers
            if init == "lm":
                p0 = _ball(
                    rng, centre[idx], lmr["cov"][np.ix_(idx, idx)], tg, n_start,
                    scale=NUTS_INIT_SCALE if method == "nuts" else BALL_SCALE,
                )  # fmt: skip
            else:
                m, s = mdn_fit_space(i)
                mi, si = centre[idx].copy(), np.full(kf, 1e-3)
                nl = np.flatnonzero(idx <= n_lab)
                mi[nl], si[nl] = m[idx[nl]], s[idx[nl]]
                mi = np.clip(mi, tg["lo"], tg["hi"])
                p0 = _truncnorm_draw(rng, mi, si, tg["lo"], tg["hi"], n_start)
            if method == "nuts":
                res = _run_nuts(
                    obs, to_device(tg), tg, p0, n_warmup=nuts.n_warmup,
                    n_steps=n_steps, block=check_every, ess_target=nuts.ess_target,
                    seed=seed + int(i), dense=nuts.dense_mass, dt=dt, thin=thin,
                )  # fmt: skip
            else:
                res = _run_emcee(
                    obs, to_device(tg), tg, p0, n_steps=n_steps,
                    check_every=check_every, seed=seed + int(i),
                    backend_path=em.backend_path, star=int(i), moves=em.moves, dt=dt,
                    thin=thin,
                )  # fmt: skip
            res["seconds"] = (
                time.perf_counter()
                - t0
                + (rows_out[i]["seconds"] if rows_out[i] is not None else 0.0)
            )
            if rows_out[i] is not None and rows_out[i].get("fallback_from_is"):
                res["fallback"] = True
                res["is_ess"] = rows_out[i]["ess"]
                res["is_ess_mdn"] = rows_out[i]["is_ess_mdn"]
                res["n_evals"] += rows_out[i]["n_evals"]
            res["n_good"] = n_good
            samples_out[i] = res.pop("x")
            weights_out[i] = None
            rows_out[i] = res
            if bar is not None:
                bar.update(1)
        # stars with neither (mdn-is, MDN failed and emcee from the MDN): failed
        for i in range(n):
            if rows_out[i] is None:
                rows_out[i] = _failed_row("no sampler ran")
    finally:
        if bar is not None:
            bar.close()

    table = _table(
        rows_out, samples_out, weights_out, emulator, layout, idx, fix,
        lm=(lm, lm_cache) if init == "lm" and (lm is not None or lm_cache) else None,
        mdn=(pb.mdn_mean, pb.mdn_sigma) if mdn is not None else None,
        meta=dict(
            method=method, prior=prior, init=init, cont_deg=int(cont_deg),
            rv_window=float(rv_window), rv_range=list(rv_range), seed=int(seed),
            options=opts.to_meta(), thin=int(thin),
            n_walkers=int(n_walkers) if method != "nuts" else None,
            n_chains=nuts.n_chains if method == "nuts" else None,
            emulator_error_in_likelihood=perr is not None,
            broadening=list(broadening), wavelength_air=inst.air,
            instrument=inst.to_meta(pb.wave_obs),
            instrumental_profile=(
                "resolution" if inst.resolution is not None
                else "lsf_sigma" if inst.lsf_sigma is not None else None
            ),
        ),
    )  # fmt: skip
    names = tuple(layout.names[j] for j in idx)
    units_all = _param_units(emulator, layout)
    units = tuple(units_all[j] for j in idx)
    phys = []
    for x in samples_out:
        if x is None:
            phys.append(np.empty((0, kf)))
            continue
        phys.append(_to_physical(x, idx, emulator, n_lab))
    span = np.concatenate([emulator.label_hi - emulator.label_lo, np.ones(k - n_lab)])
    pri = {key: [] for key in ("lo", "hi", "mu", "sd")}
    for i in range(n):
        tg = priors_out[i] if samples_out[i] is not None else None
        if tg is None:
            for key in pri:
                pri[key].append(None)
            continue
        for key in ("lo", "hi", "mu"):
            pri[key].append(_to_physical(tg[key][None], idx, emulator, n_lab)[0])
        with np.errstate(divide="ignore"):
            pri["sd"].append(
                np.where(tg["ivp"] > 0, 1.0 / np.sqrt(tg["ivp"]), np.inf) * span[idx]
            )
    n_ch = {"emcee": int(n_walkers), "nuts": nuts.n_chains}
    methods_out = [r.get("method", "") for r in rows_out]
    post = PosteriorSamples(
        names, units, phys, weights_out, methods_out,
        n_chains=[n_ch.get(m, 0) for m in methods_out],
        prior_lo=pri["lo"], prior_hi=pri["hi"], prior_mu=pri["mu"],
        prior_sd=pri["sd"],
    )  # fmt: skip
    bad = np.flatnonzero(~np.asarray(table["converged"]))
    if bad.size:
        rules = {
            "emcee": f"emcee needs >= {N_TAU_MIN:g} tau and split R-hat < {RHAT_MAX}",
            "mdn-is": f"mdn-is ESS >= {is_opts.ess_min:g}",
            "nuts": f"nuts ESS >= {nuts.ess_target:g}, split R-hat < "
            f"{NUTS_RHAT_MAX} and no divergence",
        }
        used = [m for m in METHODS if m in set(table["method"][bad])]
        warnings.warn(
            f"{bad.size} of {n} star(s) did not pass the convergence rule "
            f"(rows {bad[:10].tolist()}{' ...' if bad.size > 10 else ''}): "
            + ", ".join(rules[m] for m in used)
            + ("; " if used else "")
            + "see the table's diagnostics",
            SamplingWarning,
            stacklevel=2,
        )
    return (table, post) if return_samples else table


def _err_from_ivar(ivar):
    with np.errstate(divide="ignore"):
        return np.where(ivar > 0, 1.0 / np.sqrt(np.where(ivar > 0, ivar, 1.0)), np.inf)


def _lm_row(t, i, layout, emulator) -> dict:
    """The LM solution (k,) in fit space and its covariance (k, k) in fit space."""
    n_lab = layout.n_labels
    k = len(layout.names)
    phys = np.array([float(t[name][i]) for name in layout.names])
    p = phys.copy()
    p[:n_lab] = emulator.scale(phys[:n_lab])
    span = np.concatenate([emulator.label_hi - emulator.label_lo, np.ones(k - n_lab)])
    cov = np.asarray(t["covariance"][i], np.float64) / span[:, None] / span[None, :]
    err = np.array([float(t[f"{name}_err"][i]) for name in layout.names])
    return dict(p=p, cov=cov, phys=phys, err=err, flags=int(t["flags"][i]))


def _ball(rng, centre, cov, tg, n_walkers, scale=BALL_SCALE):
    """Walkers (n_walkers, kf) at ``centre + scale chol(cov) z``, reflected into
    the prior's support; a tiny isotropic ball where the covariance is unusable."""
    kf = centre.size
    lo, hi = tg["lo"], tg["hi"]
    try:
        if not np.all(np.isfinite(cov)):
            raise np.linalg.LinAlgError("non-finite covariance")
        chol = np.linalg.cholesky(
            cov + 1e-12 * np.diag(np.diag(cov)) + 1e-15 * np.eye(kf)
        )
    except np.linalg.LinAlgError:
        chol = np.diag(1e-3 * np.minimum(hi - lo, 1.0))
    z = rng.standard_normal((n_walkers, kf))
    x = centre[None, :] + scale * z @ chol.T
    return _reflect(x, lo[None, :], hi[None, :])


def _run_emcee(obs, tgt, tg, p0, *, n_steps, check_every, seed, backend_path, star,
               moves, dt, thin):  # fmt: skip
    """One star's ensemble; returns its row dict (with the kept samples ``x``)."""
    import emcee

    n_walkers, kf = p0.shape

    def log_prob(x):
        return np.asarray(_log_prob_batch(obs, jnp.asarray(x, dt), tgt), np.float64)

    backend = None
    resume = False
    if backend_path is not None:
        backend = emcee.backends.HDFBackend(str(backend_path), name=f"star_{star}")
        digest = _data_hash(tg["flux"], tg["w"], tg["lo"], tg["hi"], tg["mu"],
                            tg["ivp"], tg["base"])  # fmt: skip
        if backend.initialized:
            import h5py

            with h5py.File(backend_path, "r") as f:
                old = f[f"star_{star}"].attrs.get("payne_lite_target", "")
            if old != digest:
                raise ValueError(
                    f"{backend_path}: group star_{star} holds a chain of other data or "
                    "settings (target hash differs); use another backend_path"
                )
            if backend.shape != (n_walkers, kf):
                raise ValueError(
                    f"{backend_path}: group star_{star} has (n_walkers, k) = "
                    f"{backend.shape}, this run ({n_walkers}, {kf})"
                )
            resume = backend.iteration > 0
    sampler = emcee.EnsembleSampler(
        n_walkers, kf, log_prob, vectorize=True, backend=backend, moves=moves
    )
    if backend is not None and not resume:
        import h5py

        with h5py.File(backend_path, "a") as f:
            g = f[f"star_{star}"]
            g.attrs["payne_lite_target"] = digest
            g.attrs["payne_lite_format"] = "payne_lite.emcee_chain"
    if not resume:
        sampler.random_state = np.random.RandomState(seed % 2**32).get_state()
        state = p0
    else:
        state = None

    def judge():  # diagnostics need a few steps
        return (
            chain_diagnostics(sampler.get_chain()) if sampler.iteration >= 4 else None
        )

    # a resumed chain is judged before it is extended
    diag = judge() if resume else None
    while diag is None or not (diag["converged"] or sampler.iteration >= n_steps):
        todo = min(check_every, n_steps - sampler.iteration)
        sampler.run_mcmc(state, todo, progress=False)
        state = None
        diag = judge()
    chain = sampler.get_chain()
    log_p = sampler.get_log_prob()
    kept = chain[diag["n_burn"] :]
    best = np.nanmax(log_p[diag["n_burn"] :])
    xk = kept[::thin].reshape(-1, kf)
    return dict(
        method="emcee",
        x=xk,
        summary=_summarise(kept.reshape(-1, kf), None),
        n_steps=int(sampler.iteration),
        n_burn=diag["n_burn"],
        acceptance=float(np.mean(sampler.acceptance_fraction)),
        tau=diag["tau"],
        rhat=diag["rhat"],
        tau_max=diag["tau_max"],
        rhat_max=diag["rhat_max"],
        ess=diag["ess_min"],
        converged=diag["converged"],
        n_draws=int(kept.shape[0] * n_walkers),
        n_evals=int(sampler.iteration * n_walkers),
        lp_best=float(best),
        fallback=False,
        is_ess=np.nan,
        is_max_weight=np.nan,
    )


def _run_nuts(obs, tgt, tg, x0, *, n_warmup, n_steps, block, ess_target, seed,
              dense, dt, thin):  # fmt: skip
    """One star's NUTS chains; returns its row dict (with the kept samples ``x``).

    ``x0`` (C, kf) starting points in fit space, inside the support. Warm-up by
    window adaptation, then blocks of ``block`` draws per chain until the rule
    (ESS >= ``ess_target``, split R-hat < NUTS_RHAT_MAX, no divergence) holds or
    ``n_steps`` draws per chain are done.
    """
    from scipy.special import expit

    n_chains, kf = x0.shape
    lo, hi = tg["lo"], tg["hi"]
    z = np.clip((x0 - lo) / (hi - lo), 1e-6, 1.0 - 1e-6)
    u0 = np.log(z) - np.log1p(-z)
    key_w, key_d = jax.random.split(jax.random.key(seed))
    state, eps, imm, n_int_w = _nuts_warmup(
        obs, tgt, jax.random.split(key_w, n_chains), jnp.asarray(u0, dt),
        n_warmup=n_warmup, dense=dense,
    )  # fmt: skip
    pos, lpu, div, nint, acc = [], [], [], [], []
    n_done, i = 0, 0
    while True:
        todo = min(block, n_steps - n_done)
        keys = jax.random.split(jax.random.fold_in(key_d, i), n_chains)
        state, out = _nuts_draws(obs, tgt, keys, state, eps, imm, n_draws=todo)
        for lst, a in zip((pos, lpu, div, nint, acc), out, strict=True):
            lst.append(np.asarray(a))
        n_done += todo
        i += 1
        if n_done < 4 and n_done < n_steps:  # diagnostics need a few draws
            continue
        u = np.concatenate(pos, axis=1).astype(np.float64)  # (C, n, kf)
        x = lo + (hi - lo) * expit(u)
        chain = np.swapaxes(x, 0, 1)  # (n, C, kf)
        diag = chain_diagnostics(chain, n_burn=0)
        n_div = int(np.sum(np.concatenate(div, axis=1)))
        ok = bool(
            np.isfinite(diag["ess_min"])
            and diag["ess_min"] >= ess_target
            and np.isfinite(diag["rhat_max"])
            and diag["rhat_max"] < NUTS_RHAT_MAX
            and n_div == 0
        )
        if ok or n_done >= n_steps:
            break
    lp_u = np.concatenate(lpu, axis=1).astype(np.float64)  # (C, n)
    log_jac = np.sum(
        np.log(hi - lo) - np.logaddexp(0.0, -u) - np.logaddexp(0.0, u), axis=-1
    )
    lp = lp_u - log_jac
    n_int = np.concatenate(nint, axis=1)
    return dict(
        method="nuts",
        x=chain[::thin].reshape(-1, kf),
        summary=_summarise(chain.reshape(-1, kf), None),
        n_steps=int(n_done),
        n_burn=int(n_warmup),
        acceptance=float(np.mean(np.concatenate(acc, axis=1))),
        tau=diag["tau"],
        rhat=diag["rhat"],
        tau_max=diag["tau_max"],
        rhat_max=diag["rhat_max"],
        ess=diag["ess_min"],
        converged=ok,
        n_draws=int(n_done * n_chains),
        n_evals=int(np.sum(n_int) + np.sum(np.asarray(n_int_w))),
        lp_best=float(np.nanmax(lp)) if np.any(np.isfinite(lp)) else np.nan,
        n_divergent=n_div,
        step_size=float(np.median(np.asarray(eps, np.float64))),
        n_leapfrog=float(np.mean(n_int)),
        fallback=False,
        is_ess=np.nan,
        is_max_weight=np.nan,
    )


def _is_log_prob(obs, tgt, x, dt):
    """Log posterior (m,) float64 at draws ``x`` (m, kf), in IS_CHUNK-row calls."""
    n = x.shape[0]
    out = np.empty(n)
    for a in range(0, n, IS_CHUNK):
        chunk = x[a : a + IS_CHUNK]
        m = chunk.shape[0]
        if m < IS_CHUNK:  # one compiled shape
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], IS_CHUNK - m, 0)])
        lp = _log_prob_batch(obs, jnp.asarray(chunk, dt), tgt)
        out[a : a + m] = np.asarray(lp, np.float64)[:m]
    return out


def _normalised_weights(log_w):
    """(w (m,) summing to 1, Kish ESS) from log weights; zero weight where -inf."""
    ok = np.isfinite(log_w)
    if not ok.any():
        return np.full(log_w.size, 1.0 / log_w.size), 0.0
    w = np.where(ok, np.exp(log_w - np.max(np.where(ok, log_w, -np.inf))), 0.0)
    w /= w.sum()
    return w, float(1.0 / np.sum(w * w))


def _run_is(obs, tgt, tg, mu, sd, n_draws, seed, dt, n_adapt):
    """mdn-is for one star; returns its row dict (with draws ``x`` and ``weights``).

    Stage 0 draws from the MDN's Gaussians truncated to the support (``n_draws``
    when ``n_adapt == 0``, else ``n0 = max(IS_CHUNK, n_draws // 4)``). Then up to
    ``n_adapt`` adapted stages of ``n_draws``, each from a multivariate Student-t
    (``IS_DF`` degrees of freedom) with the previous stage's weighted mean and
    covariance (shrunk towards the stage-0 proposal's diagonal by ``kf + 2``
    pseudo-samples, so that a stage with a handful of effective samples still gives
    a usable proposal); adaptation stops after a stage whose ESS reaches
    ``IS_ADAPT_DONE`` (1/4) of its draws. (Measured on 6 stars of the APOGEE
    network at S/N 50: ESS after each stage of 2048 about 10-80, 30-900,
    130-1600, 550-1600; smaller intermediate stages adapted more slowly for the
    same cost.) Draws outside the prior's support get zero weight: that is the proposal
    truncated to the support, its normalisation a constant that the
    self-normalised weights do not see. The summaries, weights and ESS are the last
    stage's; ``is_ess_mdn`` is stage 0's.
    """
    from scipy.stats import multivariate_t

    rng = np.random.default_rng(seed)
    lo, hi = tg["lo"], tg["hi"]
    kf = mu.size
    mu = np.clip(mu, lo, hi)
    n0 = n_draws if n_adapt == 0 else max(IS_CHUNK, n_draws // 4)
    x = _truncnorm_draw(rng, mu, sd, lo, hi, n0)
    log_q = np.sum(_truncnorm_logpdf(x, mu, sd, lo, hi), axis=1)
    log_p = _is_log_prob(obs, tgt, x, dt)
    w, ess = _normalised_weights(log_p - log_q)
    ess_mdn, n_evals = ess, n0
    lp_best = np.max(log_p)
    for _ in range(n_adapt):
        if ess <= 0.0:
            break
        m = n_draws
        mean = w @ x
        d = x - mean
        cov = (d * w[:, None]).T @ d / max(1.0 - np.sum(w * w), 1e-12)
        n_prior = kf + 2.0
        cov = (ess * cov + n_prior * np.diag(sd**2)) / (ess + n_prior)
        prop = multivariate_t(loc=mean, shape=cov, df=IS_DF, allow_singular=True)
        x = np.atleast_2d(prop.rvs(size=m, random_state=rng)).reshape(m, kf)
        log_q = prop.logpdf(x)
        log_p = _is_log_prob(obs, tgt, x, dt)
        w, ess = _normalised_weights(log_p - log_q)
        n_evals += m
        lp_best = max(lp_best, np.max(log_p))
        if ess >= IS_ADAPT_DONE * m:
            break
    return dict(
        method="mdn-is",
        x=x,
        weights=w,
        summary=_summarise(x, w),
        n_steps=0,
        n_burn=0,
        acceptance=np.nan,
        tau=np.full(kf, np.nan),
        rhat=np.full(kf, np.nan),
        tau_max=np.nan,
        rhat_max=np.nan,
        ess=ess,
        converged=None,  # set by the caller's threshold (ess >= ess_min)
        n_draws=int(x.shape[0]),
        n_evals=int(n_evals),
        lp_best=float(lp_best) if np.isfinite(lp_best) else np.nan,
        fallback=False,
        is_ess=ess,
        is_ess_mdn=ess_mdn,
        is_max_weight=float(np.max(w)),
    )


def _summarise(x, w) -> dict:
    """p16, p50, p84, mean, std (kf,) each, in fit space."""
    q = weighted_quantiles(x, [0.16, 0.5, 0.84], w)
    if w is None:
        mean = np.mean(x, axis=0)
        std = np.std(x, axis=0)
    else:
        mean = w @ x
        std = np.sqrt(np.maximum(w @ (x - mean) ** 2, 0.0))
    return dict(p16=q[0], p50=q[1], p84=q[2], mean=mean, std=std)


def _failed_row(reason: str) -> dict:
    return dict(method="failed", failure=reason)


def _to_physical(x, idx, emulator, n_lab):
    out = np.array(x, np.float64, copy=True)
    lab = idx < n_lab
    j = idx[lab]
    out[:, lab] = (x[:, lab] + 0.5) * (emulator.label_hi[j] - emulator.label_lo[j])
    out[:, lab] += emulator.label_lo[j]
    return out


def _param_units(emulator, layout) -> list[str]:
    """Units of ``layout.names``: the labels', km/s for rv and broadening, "" for
    continuum coefficients."""
    rest = layout.names[layout.n_labels + 1 :]
    return [
        *emulator.label_units,
        "km/s",
        *("km/s" if name in BROADENING_PARAMS else "" for name in rest),
    ]


def _table(rows, samples, weights, emulator, layout, idx, fix, *, lm, mdn, meta):
    from astropy.table import Table

    del samples, weights
    n = len(rows)
    n_lab = layout.n_labels
    k = len(layout.names)
    kf = idx.size
    units = _param_units(emulator, layout)
    span = np.concatenate([emulator.label_hi - emulator.label_lo, np.ones(k - n_lab)])
    offset = np.concatenate([emulator.label_lo, np.zeros(k - n_lab)])
    label_shift = np.concatenate([np.full(n_lab, 0.5), np.zeros(k - n_lab)])

    def phys(j, v):  # fit space -> physical, a location
        return (v + label_shift[j]) * span[j] + offset[j]

    stats = {s: np.full((n, k), np.nan) for s in ("p16", "p50", "p84", "std")}
    for i, r in enumerate(rows):
        if "summary" not in r:
            continue
        for col, j in enumerate(idx):
            for s in ("p16", "p50", "p84"):
                stats[s][i, j] = phys(j, r["summary"][s][col])
            stats["std"][i, j] = r["summary"]["std"][col] * span[j]
    for j, v in fix.items():
        for s in ("p16", "p50", "p84"):
            stats[s][:, j] = phys(j, v)
        stats["std"][:, j] = 0.0

    t = Table()
    for j, name in enumerate(layout.names):
        unit = units[j] or None
        cols = {
            name: stats["p50"][:, j],
            f"{name}_err": 0.5 * (stats["p84"][:, j] - stats["p16"][:, j]),
            f"{name}_p16": stats["p16"][:, j],
            f"{name}_p50": stats["p50"][:, j],
            f"{name}_p84": stats["p84"][:, j],
            f"{name}_std": stats["std"][:, j],
        }
        if lm is not None:
            table_lm, cache = lm
            vals, errs = np.full(n, np.nan), np.full(n, np.nan)
            for i in range(n):
                if i in cache:
                    vals[i], errs[i] = cache[i]["phys"][j], cache[i]["err"][j]
                elif table_lm is not None:
                    vals[i] = float(table_lm[name][i])
                    errs[i] = float(table_lm[f"{name}_err"][i])
            cols[f"{name}_lm"] = vals
            cols[f"{name}_lm_err"] = errs
        if mdn is not None and j <= n_lab:
            cols[f"{name}_mdn"] = mdn[0][:, j]
            cols[f"{name}_mdn_sigma"] = mdn[1][:, j]
        for c, v in cols.items():
            t[c] = v
            if unit is not None:
                t[c].unit = unit

    def col(key, default, dtype=float):
        return np.array([r.get(key, default) for r in rows], dtype=dtype)

    method = [r.get("method", "failed") for r in rows]
    ess = col("ess", np.nan)
    conv = np.array(
        [
            bool(r["converged"])
            if r.get("converged") is not None
            else (
                r.get("method") == "mdn-is" and r["ess"] >= meta["options"]["ess_min"]
            )
            for r in rows
        ]
    )
    t["method"] = method
    t["converged"] = conv
    t["fallback"] = col("fallback", False, bool)
    t["n_steps"] = col("n_steps", 0, np.int64)
    t["n_burn"] = col("n_burn", 0, np.int64)
    t["acceptance"] = col("acceptance", np.nan)
    t["tau"] = np.array([r.get("tau", np.full(kf, np.nan)) for r in rows]).reshape(
        n, kf
    )
    t["rhat"] = np.array([r.get("rhat", np.full(kf, np.nan)) for r in rows]).reshape(
        n, kf
    )
    t["tau_max"] = col("tau_max", np.nan)
    t["rhat_max"] = col("rhat_max", np.nan)
    t["ess"] = ess
    t["is_ess"] = col("is_ess", np.nan)
    t["is_ess_mdn"] = col("is_ess_mdn", np.nan)
    t["is_max_weight"] = col("is_max_weight", np.nan)
    t["n_divergent"] = col("n_divergent", 0, np.int64)
    t["step_size"] = col("step_size", np.nan)
    t["n_leapfrog"] = col("n_leapfrog", np.nan)
    t["n_draws"] = col("n_draws", 0, np.int64)
    t["n_evals"] = col("n_evals", 0, np.int64)
    t["n_good_pixels"] = col("n_good", 0, np.int64)
    t["chi2_min"] = -2.0 * col("lp_best", np.nan)
    t["seconds"] = col("seconds", np.nan)
    t["failure"] = [r.get("failure", "") for r in rows]
    # the point fits' QA bits that apply to a posterior: not converged, failed
    failed = np.array([m == "failed" for m in method], bool)
    t["flags"] = (
        np.where(conv | failed, 0, FLAG_NOT_CONVERGED)
        | np.where(failed, FLAG_FAILED, 0)
    ).astype(np.int32)
    t["flags"].description = "QA bitmask, see meta['flag_bits'] (bits 0 and 2 here)"
    t["seconds"].unit = "s"
    t["tau"].unit = "steps"
    t["tau"].description = "integrated autocorrelation time per meta['sample_params']"
    t["rhat"].description = "split R-hat per meta['sample_params']"
    t["ess"].description = (
        "effective samples: emcee and nuts min over parameters of n_chains n_kept "
        "/ tau; mdn-is Kish's (sum w)^2 / sum w^2"
    )
    t["n_divergent"].description = "nuts: divergent transitions after the warm-up"
    t["step_size"].description = "nuts: adapted step size (median over chains)"
    t["n_leapfrog"].description = "nuts: mean leapfrog steps per draw"
    t[
        "chi2_min"
    ].description = "-2 x the largest log posterior sampled (chi2 for the box prior)"
    if lm is not None:
        flags = np.zeros(n, np.int32)
        table_lm, cache = lm
        for i in range(n):
            if i in cache:
                flags[i] = cache[i]["flags"]
            elif table_lm is not None:
                flags[i] = int(table_lm["flags"][i])
        t["lm_flags"] = flags
    t.meta.update(meta)
    t.meta.update(
        label_names=list(emulator.label_names),
        label_units=list(emulator.label_units),
        sample_params=[layout.names[j] for j in idx],
        flag_bits={str(b): text for b, text in FLAG_BITS.items()},
        fixed={layout.names[j]: float(phys(j, v)) for j, v in fix.items()},
        convergence_rule=(
            f"emcee: kept steps >= {N_TAU_MIN:g} x max tau and max split R-hat < "
            f"{RHAT_MAX}; burn-in min(ceil({BURN_TAU:g} tau_0), n_steps // 2); "
            f"mdn-is: Kish ESS >= ess_min; nuts: min ESS >= ess_target, max split "
            f"R-hat < {NUTS_RHAT_MAX} over the chains, no divergent transition"
        ),
        reference=(
            "Ting et al. 2019, ApJ 879, 69 (The Payne); Foreman-Mackey et al. 2013, "
            "PASP 125, 306 (emcee); Hoffman & Gelman 2014, JMLR 15, 1593 (NUTS); "
            "Cabezas et al. 2024, arXiv:2402.10797 (blackjax)"
        ),
    )
    return t


def save_samples(path, post: PosteriorSamples, meta: dict | None = None) -> None:
    """Write :class:`PosteriorSamples` to an HDF5 file (group ``star_<i>`` per star,
    datasets ``samples`` (m, k) physical and ``weights`` (m,) when weighted).

    The file is written beside ``path`` and renamed over it when complete, so an
    interrupted write never leaves a half file under that name.
    """
    from .._h5 import atomic_h5_writer, set_json_attr

    with atomic_h5_writer(path, SAMPLES_FORMAT, SAMPLES_VERSION) as f:
        f.attrs["names"] = list(post.names)
        f.attrs["units"] = list(post.units)
        if meta:
            set_json_attr(f, "meta", {k: v for k, v in meta.items()})
        for i, x in enumerate(post.samples):
            g = f.create_group(f"star_{i}")
            g.attrs["method"] = post.method[i]
            if post.n_chains is not None:
                g.attrs["n_chains"] = int(post.n_chains[i])
            g.create_dataset(
                "samples", data=np.asarray(x), compression="gzip", fletcher32=True
            )
            if post.weights[i] is not None:
                g.create_dataset(
                    "weights", data=np.asarray(post.weights[i]), fletcher32=True
                )
            for key in ("prior_lo", "prior_hi", "prior_mu", "prior_sd"):
                val = getattr(post, key)
                if val is not None and val[i] is not None:
                    g.create_dataset(key, data=np.asarray(val[i], np.float64))


def load_samples(path) -> tuple[PosteriorSamples, dict]:
    """Read a file written by :func:`save_samples` (``save_samples(path, samples, table.meta)``).

    Returns:
        (:class:`PosteriorSamples`, the sampling table's meta).

    Raises:
        FileNotFoundError: no such file.
        payne_lite.FileFormatError: not HDF5, corrupt or truncated, not a samples
            file, or of another format version.

    Examples:
        >>> post, meta = load_samples("samples.h5")              # doctest: +SKIP
        >>> x = post.samples[0]        # star 0: (m, k) in physical units
    """
    from .._h5 import get_json_attr, open_checked, read_dataset
    from ..errors import FileFormatError

    path = Path(path)
    with open_checked(path, SAMPLES_FORMAT, (SAMPLES_VERSION,)) as f:
        meta = get_json_attr(f, "meta", path) if "meta" in f.attrs else {}
        stars = sorted(
            (k for k in f if k.startswith("star_")), key=lambda k: int(k[5:])
        )
        keys = ("samples", "weights", "method", "n_chains", "prior_lo", "prior_hi",
                "prior_mu", "prior_sd")  # fmt: skip
        out = {key: [] for key in keys}
        for key in stars:
            g = f[key]
            if "samples" not in g:
                raise FileFormatError(f"{path}: {key} has no samples")
            out["samples"].append(read_dataset(g, "samples", path))
            out["weights"].append(
                read_dataset(g, "weights", path) if "weights" in g else None
            )
            out["method"].append(str(g.attrs["method"]))
            out["n_chains"].append(int(g.attrs.get("n_chains", 0)))
            for p in ("prior_lo", "prior_hi", "prior_mu", "prior_sd"):
                out[p].append(read_dataset(g, p, path) if p in g else None)
        post = PosteriorSamples(
            tuple(str(v) for v in f.attrs["names"]),
            tuple(str(v) for v in f.attrs["units"]),
            **out,
        )
    return post, meta
