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
emulator has one). With the emulator's ``error_basis`` the sum becomes
``r^T C^-1 r`` of the error model :mod:`payne_lite.observe._noise` (the error
:func:`payne_lite.fit`'s sandwich covariance describes; the posterior, weighting by
all of ``C``, is narrower than the sandwich where ``U^T U`` dominates, high S/N):
``C = diag(D) + U^T U``, ``U`` the basis at the window's centre rv (and the
centre's continuum), ``D`` the flux variances plus the per-pixel emulator variance
``U`` does not hold; ``C^-1`` by the Woodbury identity, no P x P matrix.
With the emulator's ``local_error`` (:meth:`payne_lite.Emulator.with_local_error`)
``U`` is instead the error covariance's factor at the labels of the window's
centre (below; the nearest held-out errors), which holds all of the emulator's
error;
``log det C`` is constant in the parameters and omitted.

The RV window is ``rv_c +- rv_window`` (default ``RV_WINDOW`` = 20 km/s, the
fitter's) intersected with ``rv_range``, around ``rv_c``: the LM fit's rv
(``init="lm"``) or the MDN's mean rv (``init="mdn"``, ``"mdn-is"``, ``"flow-is"``). The
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
by ONE jitted JAX function (:func:`._likelihood.log_prob_batch`; emcee's stretch
move calls it twice per step, with half the walkers each), compiled once per shape
and reused for every star (the star's data are arguments, not constants); the
walkers are cast to its float on the host. The move is differential evolution
(``emcee.moves.DEMove()``, ``EmceeOptions.moves`` None): on the APOGEE network's
6-parameter posteriors its autocorrelation time is ~20 steps, the stretch move's
~65, so the 50 tau the rule asks for take a third of the steps. Walkers are
drawn from the LM Gaussian (``init="lm"``: ``p_LM + init_scale * chol(C_LM) z``,
``EmceeOptions.init_scale`` = 1; 0.1 is the small ball of before), reflected into
the prior's support, or from the MDN's Gaussians (``init="mdn"``, truncated to the
support). The chain runs in blocks until the convergence rule holds or
``n_steps`` are done: ``check_every`` steps, or fewer (at least a fifth of it)
when the last check's tau and burn-in say fewer reach 50 tau.
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
one's ESS reaches ``IS_ADAPT_DONE`` (1/4) of its draws (:func:`._is.run_is`); draws
outside the support get zero weight (the proposal truncated to the support: its
normalisation is a constant that self-normalised weights do not see). The last
stage gives the summaries, weights and ``ess``; ``n_evals`` counts every stage's
draws. ``ISOptions(adapt=0)`` is the MDN proposal alone, ``n_draws`` of it. With
``ISOptions.lm_share`` > 0 stage 0 is a defensive mixture: that share of its draws
from a Student-t with the LM fit's mean and covariance (the LM fit of every star runs
first unless ``lm_table`` is given; its time is not in ``seconds``; with the
emulator's ``error_basis`` it is the generalised least-squares fit under the
likelihood's own ``C``, ``LMOptions(estimator="gls")``, whose covariance is the
posterior's width at high S/N, where the per-pixel-weighted fit's is 3x wider), the mixture's
density in ``log q`` (:func:`._is.mixture_log_q`). Stars whose
ESS is below ``ISOptions.ess_min`` (default 200), or whose MDN gave no
answer, are sampled again by emcee (``init`` as given, default the LM solution):
column ``fallback``; their ``seconds`` and ``n_evals`` count both. Needs an MDN and ``cont_deg=0``.

``"flow-is"``: as mdn-is, with the MDN's conditional normalizing flow
(:mod:`payne_lite.mdn._flow`, trained by :func:`payne_lite.train_flow`) as stage
0's proposal: the joint density of the labels and rv given the spectrum, with the
correlations that the MDN's independent Gaussians miss. Its base distribution is
widened by ``ISOptions.scale`` (default ``FLOW_IS_SCALE`` = 1, the trained
density: it is already wider than the posterior); not truncated (draws outside the support get zero
weight). Every label and rv is sampled (no ``fixed``: the flow has no conditional
for them); the same adapted stages, LM share and emcee fallback.

``"nuts"``: the No-U-Turn sampler (Hoffman & Gelman 2014; blackjax's multinomial
NUTS) on the same log posterior, with JAX gradients. It samples unconstrained
coordinates ``u`` (kf,): ``x = lo + (hi - lo) sigmoid(u)`` maps R^kf onto the
prior's support (the box, the RV window, the continuum bounds, or the MDN's
+-3 sigma), and the log density of ``u`` adds the Jacobian
``sum log((hi - lo) sigmoid(u) sigmoid(-u))``, so a uniform prior stays uniform
in ``x`` and trajectories meet no wall (:func:`._likelihood.log_density_u`).
``n_chains`` (default ``NUTS_CHAINS`` = 4) chains start at the LM solution plus
``NUTS_INIT_SCALE`` (1) x the LM covariance's square root times N(0, 1) draws
(``init="lm"``; the MDN's Gaussians with ``init="mdn"``). With
``NUTSOptions.adaptation="lm"`` (default) the inverse mass matrix is the LM
covariance mapped to ``u`` (:func:`._nuts.lm_inverse_mass`; dense, or its
diagonal with ``dense_mass=False``) and the warm-up (``n_warmup`` =
``NUTS_LM_WARMUP`` = 100 steps, discarded) tunes each chain's step size alone by
dual averaging towards a mean acceptance of 0.8; with ``"window"`` (and for
``init="mdn"`` or a star whose LM covariance is unusable) each chain adapts its
step size and inverse mass matrix with Stan's window adaptation
(``blackjax.window_adaptation``, ``n_warmup`` = 500). Then draws in blocks of
``check_every`` (default ``NUTS_BLOCK`` = 50) per chain until its rule holds or
``n_steps`` draws per chain are done. The warm-up and each block are one jitted
call, vmapped over the chains; the star's data are arguments, so the compilation
is shared by every star of the same shape.

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
* ``rhat``: rank-normalised split R-hat (Vehtari et al. 2021; ArviZ's
  ``rhat(method="rank")``, or the same formula in NumPy without ArviZ,
  :func:`rank_rhat`) over the walkers' chains, each split in halves (2 *
  n_walkers chains), per parameter; column ``rhat_max``. It is worked out only
  when the chain is long enough for the tau rule (and at the last check);
* ``ess_bulk``, ``ess_tail``, ``mcse_mean``, ``mcse_sd``: per parameter, ArviZ's
  bulk and tail ESS and Monte Carlo standard errors of the mean and sd (physical
  units) of the kept chain, walkers as chains (:func:`ess_mcse`; NaN without the
  ``arviz`` extra); reported, not part of the rule;
* ``acceptance``: emcee's mean acceptance fraction over walkers;
* ``converged``: ``n_kept >= N_TAU_MIN * max(tau)`` (50, emcee's advice for a
  trustworthy tau), every tau within ``EmceeOptions.tau_rtol`` (5 %) of the
  previous check's (emcee's advice that the estimate be stable; so at least two
  checks) and ``max(rhat) < RHAT_MAX`` (1.1; with 25 tau per half-chain,
  R-hat of a converged ensemble is about 1.02, so 1.01 would reject good chains),
  with finite tau. A :class:`SamplingWarning` names the stars that fail.

For ``"mdn-is"`` and ``"flow-is"``, ``converged`` means ``ess >= ess_min``.

For ``"nuts"`` the same ``chain_diagnostics`` run on the draws (chains as walkers,
no burn-in: the warm-up is already gone): ``tau``, ``ess`` (``n_chains * n / tau``;
above ``n_chains * n`` when draws anticorrelate), rank-normalised R-hat over the 2
``n_chains`` half-chains, ArviZ's bulk / tail ESS and MCSE; ``converged``: the
smallest ``ess`` >= ``ess_target`` (default ``NUTS_ESS_MIN`` = 400), max R-hat <
``NUTS_RHAT_MAX`` (1.01;
Vehtari et al. 2021 advise both) and no divergent transition after the warm-up
(column ``n_divergent``; one in a posterior of smooth nets means the step size
is too large for some region, and the draws there are biased).

Summaries (columns, physical units)
-----------------------------------
For each label, ``rv`` [km/s] and continuum coefficient: ``<name>`` = posterior
median, ``<name>_err`` = half the 16-84 % range, ``<name>_p16``, ``<name>_p50``,
``<name>_p84``, ``<name>_std``; with ``init="lm"`` also the LM solution
``<name>_lm``, ``<name>_lm_err``; with an MDN ``<name>_mdn``, ``<name>_mdn_sigma``.
Then ``method`` (per row: "emcee", "mdn-is", "flow-is", "nuts"), ``converged``, ``fallback``,
``n_steps``, ``n_burn``, ``acceptance``, ``tau``, ``rhat``, ``ess_bulk``,
``ess_tail``, ``mcse_mean``, ``mcse_sd`` ((n, k) each, over
``meta["sample_params"]``), ``tau_max``, ``rhat_max``, ``ess``, ``n_draws``
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
    Kumar, Carroll, Hartikainen & Martin 2019, JOSS 4, 1143 (ArviZ).
    Hoffman & Gelman 2014, JMLR 15, 1593 (NUTS).
    Vehtari, Gelman, Simpson, Carpenter & Buerkner 2021, Bayesian Analysis 16, 667
    (rank-normalised R-hat, bulk and tail ESS; R-hat < 1.01, ESS > 400).
    Cabezas et al. 2024, arXiv:2402.10797 (blackjax).
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import jax.numpy as jnp
import numpy as np

from .._validate import as_float_array
from ..emulator import Emulator
from ..errors import ErrorModelWarning, SamplingWarning
from ..fitting import fit_spectra, param_units
from ..observe import (
    BROADENING_START,
    LABEL_BOUND,
    RV_WINDOW,
    Instrument,
    continuum_meta,
)
from ..options import EmceeOptions, ISOptions, LMOptions, NUTSOptions, options_for
from ..spectra import unpack
from ._diagnostics import N_TAU_MIN, RHAT_MAX
from ._emcee import run_emcee
from ._io import PosteriorSamples
from ._is import FlowProposal, MDNProposal, run_is
from ._likelihood import log_prob_batch
from ._nuts import NUTS_INIT_SCALE, NUTS_RHAT_MAX, lm_inverse_mass, run_nuts
from ._problem import (
    Problem,
    ball,
    check_instrument,
    err_from_ivar,
    linear_continuum,
    prepare,
    sampler_instrument,
    to_device,
    truncnorm_draw,
)
from ._rows import LMSolution, StarDraws, failed_star
from ._table import results_table, to_physical

METHODS = ("emcee", "mdn-is", "flow-is", "nuts")
#: The importance-sampling methods (ISOptions; emcee for the stars that fall back).
IS_METHODS = ("mdn-is", "flow-is")
#: :func:`log_posterior` evaluates its points in calls of this many.
LOG_POSTERIOR_ROWS = 64


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
            With the emulator's ``local_error`` its covariance is held at the
            first point's labels (:func:`sample` holds it at its start's).
        mask: as in :func:`sample`, as are ``wavelength``, ``instrument``,
            ``prior``, ``mdn``, ``cont_deg``, ``rv_range``, ``rv_window``, ``fixed``
            and ``emulator_error``.

    Returns:
        (m,) float64 log posterior (``-inf`` outside the prior's support), or a
        float for one point.

    Raises:
        ValueError: more than one spectrum, or ``params`` of the wrong width.
    """
    if np.ndim(flux) != 1:
        raise ValueError(f"log_posterior takes one spectrum (P,), got {np.shape(flux)}")
    inst = check_instrument(instrument)
    _, wavelength = sampler_instrument(inst, fixed, emulator, wavelength)
    pb = prepare(
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
    centre[j] = xs[0, lab]  # the labels of a local error model's C: the first point's
    centre[n_lab] = float(rv_centre)
    dt = pb.obs.x_obs.dtype
    tg = to_device(pb.target(0, centre), dt)
    # calls of LOG_POSTERIOR_ROWS points (the last padded with copies of its first):
    # one compilation for any number of points
    m = xs.shape[0]
    lp = np.empty(m)
    for a in range(0, m, LOG_POSTERIOR_ROWS):
        part = xs[a : a + LOG_POSTERIOR_ROWS]
        pad = np.repeat(part[:1], LOG_POSTERIOR_ROWS - part.shape[0], axis=0)
        out = log_prob_batch(pb.obs, jnp.asarray(np.vstack([part, pad]), dt), tg)
        lp[a : a + part.shape[0]] = np.asarray(out, np.float64)[: part.shape[0]]
    return lp if x.ndim == 2 else float(lp[0])


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------
def sample(
    flux,
    flux_err=None,
    emulator: Emulator | None = None,
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
        flux: (n, P) or (P,) observed flux on ``wavelength``; or a
            ``specutils.Spectrum`` (or a list of them, or a ``SpectrumCollection``) on
            one grid, with its uncertainty, mask, units and medium
            (:mod:`payne_lite.spectra`; then ``flux_err`` and ``wavelength`` are
            None and the table's ``meta["input"]`` says what was read).
        flux_err: same shape, 1-sigma errors; non-finite or non-positive errors (and
            non-finite flux) give that pixel zero weight, as in :func:`fit`.
        emulator: the rest-frame spectrum emulator (required).
        method: ``"emcee"``, ``"mdn-is"``, ``"flow-is"`` or ``"nuts"`` (see the
            module docstring).
        mask: optional bool (P,) or (n, P), True = ignore the pixel.
        wavelength: (P,) observed wavelength [A]; None = the emulator's grid.
        instrument: the observation side (:class:`payne_lite.Instrument`), as in
            :func:`payne_lite.fit`; ``vsini`` / ``vmacro`` [km/s] are sampled with a
            uniform prior on their ranges unless ``fixed`` holds them.
            ``method="mdn-is"`` and ``"flow-is"`` take no free broadening parameter
            (the MDN has no proposal for it).
        prior: ``"box"``, ``"mdn-uniform"`` or ``"mdn-gauss"`` (the last two need
            ``mdn``).
        mdn: a :class:`payne_lite.MDN` for ``emulator`` (priors, ``init="mdn"``,
            ``method="mdn-is"``; ``method="flow-is"``: one with a flow,
            :func:`payne_lite.train_flow`).
        cont_deg: degree of the multiplicative Chebyshev continuum (0 = none).
        rv_range: (lo, hi) [km/s] for the LM fit and the RV window's limits.
        rv_window: half-width of the RV window [km/s] (the rv prior's support).
        fixed: ``{name: value}`` holds labels [physical] or ``"rv"`` [km/s] fixed.
        seed: seeds the walkers, emcee's generator and the draws (star i uses
            ``seed + i``).
        emulator_error: the emulator's error in the likelihood, as in
            :func:`fit`: its per-pixel error in quadrature and, with an
            ``error_basis``, its correlated part (``C = diag(D) + U^T U``); with
            a ``local_error``, ``U`` is its factor at the start's labels.
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
    flux, flux_err, emulator, mask, wavelength, instrument, given = unpack(
        flux, flux_err, emulator, mask=mask, wavelength=wavelength,
        instrument=instrument, cont_deg=cont_deg,
    )  # fmt: skip
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    opts = options_for(method, options)
    inst = check_instrument(instrument)
    # emcee's settings: its own, or those of the IS methods' fallback
    is_method = method in IS_METHODS
    em = opts.fallback if is_method else opts
    init = getattr(em, "init", "lm")
    if mdn is None and (init == "mdn" or is_method):
        need = "init='mdn'" if init == "mdn" else f"method={method!r}"
        raise ValueError(f"{need} needs an mdn")
    if method == "flow-is":
        mdn._need_flow()
    if is_method and cont_deg:
        raise ValueError(
            f"method={method!r} samples no continuum (the MDN has no proposal for "
            f"it): use cont_deg=0 or method='emcee', got cont_deg={cont_deg}"
        )
    broadening, wavelength = sampler_instrument(inst, fixed, emulator, wavelength)
    inst = dataclasses.replace(
        inst, vsini="vsini" in broadening, vmacro="vmacro" in broadening
    )
    free_broad = [b for b in broadening if b not in dict(fixed or {})]
    if is_method and free_broad:
        raise ValueError(
            f"method={method!r} samples no broadening (the MDN has no proposal for "
            f"{free_broad}): fix them or use method='emcee' or 'nuts'"
        )
    model_options = inst.model_options(fixed, emulator)
    pb = prepare(
        flux, flux_err, emulator, mask=mask, wavelength=wavelength, prior=prior,
        mdn=mdn, cont_deg=cont_deg, rv_range=rv_range, rv_window=rv_window,
        fixed=fixed, emulator_error=emulator_error, model_options=model_options,
    )  # fmt: skip
    n = pb.flux2.shape[0]
    if method == "flow-is" and pb.idx.size != emulator.n_labels + 1:
        raise ValueError(
            "method='flow-is' samples every label and rv (the flow's joint density "
            "has no conditional for fixed ones): drop fixed="
            f"{sorted(dict(fixed or {}))} or use method='mdn-is'"
        )
    n_walkers = _n_walkers(em, pb.idx.size)
    if lm_table is not None and len(lm_table) != n:
        raise ValueError(f"lm_table has {len(lm_table)} rows for {n} spectra")
    run = _Run(
        pb=pb, method=method, init=init, em=em,
        nuts=opts if method == "nuts" else NUTSOptions(),
        is_opts=opts if is_method else ISOptions(),
        n_walkers=n_walkers, seed=seed, lm=lm_table, mdn=mdn,
        # the LM start: the same model (the wavelengths are vacuum already)
        fit_options=dict(
            wavelength=wavelength, cont_deg=cont_deg, rv_range=rv_range,
            fixed=fixed, emulator_error=emulator_error,
            instrument=dataclasses.replace(inst, air=False),
            # under the basis, the LM's centre and covariance are those of the
            # posterior's likelihood (GLS), not the wider per-pixel-weighted fit's
            options=LMOptions(
                estimator="wls" if pb.basis is None and pb.local is None else "gls"
            ),
        ),
    )  # fmt: skip
    _run_samplers(run, progress)
    lm_used = init == "lm" and (run.lm is not None or run.lm_cache)
    table = results_table(
        run.rows, emulator, pb.layout, pb.idx, pb.fix,
        lm=(run.lm, run.lm_cache) if lm_used else None,
        mdn=(pb.mdn_mean, pb.mdn_sigma) if mdn is not None else None,
        meta=dict(
            method=method, prior=prior, init=init, **continuum_meta(cont_deg),
            rv_window=float(rv_window), rv_range=list(pb.rv_range), seed=int(seed),
            options=(
                {**opts.to_meta(), "scale": opts.scale_for(method)}
                if is_method else opts.to_meta()
            ),
            thin=int(em.thin),
            n_walkers=int(n_walkers) if method != "nuts" else None,
            n_chains=run.nuts.n_chains if method == "nuts" else None,
            emulator_error_in_likelihood=pb.perr is not None,
            emulator_error_correlated=pb.basis is not None,
            broadening=list(broadening), wavelength_air=inst.air,
            instrument=inst.to_meta(pb.wave_obs),
            instrumental_profile=(
                "resolution" if inst.resolution is not None
                else "lsf_sigma" if inst.lsf_sigma is not None else None
            ),
        ),
    )  # fmt: skip
    if given is not None:
        table.meta["input"] = given
    post = _posterior_samples(run)
    _warn_unconverged(table, run)
    return (table, post) if return_samples else table


# --------------------------------------------------------------------------------------
# sample's stages (host side)
# --------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Run:
    """One :func:`sample` call: its settings and, per star, its results.

    ``rows`` (n,) each star's :class:`StarDraws` (None until a sampler ran; its
    draws ``x`` (m_i, kf) in fit space, ``weights`` (m_i,) or None), ``priors``
    each star's target dict (its prior; the last one used), ``run_emcee`` (n,)
    bool: the stars an MCMC sampler runs for (emcee, or NUTS for
    ``method="nuts"``; mdn-is falls back to emcee).
    """

    pb: Problem
    method: str
    init: str  # the MCMC start: "lm" or "mdn"
    em: EmceeOptions | NUTSOptions  # the MCMC settings (mdn-is: its fallback's)
    nuts: NUTSOptions
    is_opts: ISOptions
    n_walkers: int
    seed: int
    fit_options: dict  # fit_spectra's keywords for the LM start
    lm: object = None  # a fit table of all the stars, or None
    # star -> its LMSolution, when only some stars were fitted
    lm_cache: dict[int, LMSolution] = dataclasses.field(default_factory=dict)
    bar: object = None  # the tqdm bar, or None
    mdn: object = None  # the MDN (flow-is: its flow)
    # flow-is: per star the flow's context (standardised features (n, D), rv_ccf)
    flow_ctx: tuple | None = None

    def __post_init__(self):
        n = self.n
        self.rows: list[StarDraws | None] = [None] * n
        self.priors: list = [None] * n
        self.run_emcee = np.full(n, self.method in ("emcee", "nuts"))
        if self.method in IS_METHODS:
            self.run_emcee = ~self.pb.mdn_ok  # more join after the IS pass

    @property
    def n(self) -> int:
        return self.pb.flux2.shape[0]


def _n_walkers(em, kf) -> int:
    """emcee's walkers: ``EmceeOptions.n_walkers`` (>= 2 kf + 2), default
    ``max(32, 4 kf)`` rounded up to even."""
    n_walkers = getattr(em, "n_walkers", None)  # NUTSOptions has none
    if n_walkers is None:
        n_walkers = max(32, 4 * kf)
        n_walkers += n_walkers % 2
    elif n_walkers < 2 * kf + 2:
        raise ValueError(
            f"EmceeOptions.n_walkers must be >= 2 kf + 2 = {2 * kf + 2} for the "
            f"{kf} sampled parameters, got {n_walkers}"
        )
    return n_walkers


def _run_samplers(run: _Run, progress: bool) -> None:
    """Every star's sampler: mdn-is or flow-is first, then emcee or NUTS
    for the stars that need it; fills ``run``'s per-star lists."""
    if progress:
        from tqdm.auto import tqdm

        run.bar = tqdm(total=run.n, desc="sample", unit="spectrum")
    try:
        # 1. mdn-is / flow-is for every star the MDN answers for.
        if run.method in IS_METHODS:
            if run.is_opts.lm_share > 0 and run.lm is None:
                _lm_fits(run, np.arange(run.n))  # the LM proposal (and emcee's start)
            if run.method == "flow-is":
                pb = run.pb
                feat, rv_ccf, _ = run.mdn.flow_context(
                    pb.flux2, err_from_ivar(pb.ivar), mask=~(pb.ivar > 0)
                )
                run.flow_ctx = (feat, rv_ccf)
            for i in np.flatnonzero(run.pb.mdn_ok):
                _is_star(run, i)
        # 2. emcee (or NUTS).
        em_rows = np.flatnonzero(run.run_emcee)
        if em_rows.size and run.init == "lm" and run.lm is None:
            _lm_fits(run, em_rows)
        for i in em_rows:
            _mcmc_star(run, i)
        # stars with neither (mdn-is, MDN failed and emcee from the MDN): failed
        for i in range(run.n):
            if run.rows[i] is None:
                run.rows[i] = failed_star("no sampler ran")
    finally:
        if run.bar is not None:
            run.bar.close()


def _tick(run: _Run) -> None:
    if run.bar is not None:
        run.bar.update(1)


def _fail(run: _Run, i, reason: str) -> None:
    run.rows[i] = failed_star(reason)
    _tick(run)


def _mdn_centre(pb: Problem, m) -> np.ndarray:
    """(k,) fit-space point at the MDN's mean ``m`` (L + 1,) (labels clipped to the
    box), zero elsewhere."""
    n_lab = pb.emulator.n_labels
    centre = np.zeros(len(pb.layout.names))
    centre[: n_lab + 1] = m
    centre[:n_lab] = np.clip(centre[:n_lab], -LABEL_BOUND, LABEL_BOUND)
    return centre


def _is_star(run: _Run, i) -> None:
    """mdn-is or flow-is for star ``i``; a star whose ESS is below ``ess_min`` is
    marked for emcee (its record kept, ``fallback`` True, for the fallback
    columns)."""
    pb, o = run.pb, run.is_opts
    kf, dt = pb.idx.size, pb.obs.x_obs.dtype
    t0 = time.perf_counter()
    m, s = pb.mdn_fit_space(i)
    tg = pb.target(i, _mdn_centre(pb, m))
    run.priors[i] = tg
    n_good = int(np.count_nonzero(tg["w"] > 0))
    if n_good <= kf:
        _fail(run, i, f"{n_good} usable pixels for {kf} parameters")
        return
    if run.method == "flow-is":
        feat, rv_ccf = run.flow_ctx
        proposal = FlowProposal(
            run.mdn.flow, feat[i], rv_ccf[i], o.scale_for(run.method),
            pb.emulator.n_labels,
        )  # fmt: skip
    else:
        lo, hi = tg["lo"], tg["hi"]
        mu = np.clip(m[pb.idx], lo, hi)
        proposal = MDNProposal(mu, s[pb.idx] * o.scale_for(run.method), lo, hi)
    res = run_is(
        pb.obs, to_device(tg, dt), tg, proposal, o.n_draws, run.seed + int(i), dt,
        o.adapt, lm=_is_lm(run, i), share=o.lm_share, ess_min=o.ess_min,
        method=run.method,
    )  # fmt: skip
    fallback = bool(res.ess < o.ess_min)
    run.rows[i] = res._replace(
        converged=not fallback, fallback=fallback, n_good=n_good,
        seconds=time.perf_counter() - t0,
    )  # fmt: skip
    if fallback:
        run.run_emcee[i] = True
    else:
        _tick(run)


def _is_lm(run: _Run, i):
    """Star ``i``'s LM proposal (mean (kf,), covariance (kf, kf)) in fit space, or
    None (``lm_share`` 0, or the LM solution not finite or not positive definite)."""
    if run.is_opts.lm_share <= 0:
        return None
    lmr, idx = _lm_of(run, i), run.pb.idx
    mean, cov = lmr.p[idx], lmr.cov[np.ix_(idx, idx)]
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(cov))):
        return None
    try:
        np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        return None
    return mean, cov


def _lm_fits(run: _Run, rows) -> None:
    """The LM starts of ``rows``: one fit of all the stars (``run.lm``), or of the
    subset (``run.lm_cache``). The sampler's own GLS start does not warn of a small
    basis: the likelihood is the sampler's under that basis whatever the start."""
    pb = run.pb
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ErrorModelWarning)
        if rows.size == run.n:
            run.lm = fit_spectra(
                pb.flux2, err_from_ivar(pb.ivar), pb.emulator, **run.fit_options
            )
            return
        sub = fit_spectra(
            pb.flux2[rows], err_from_ivar(pb.ivar[rows]), pb.emulator,
            **run.fit_options,
        )  # fmt: skip
    for j, i in enumerate(rows):
        run.lm_cache[int(i)] = _lm_row(sub, j, pb.layout, pb.emulator)


def _lm_of(run: _Run, i) -> LMSolution:
    if int(i) in run.lm_cache:
        return run.lm_cache[int(i)]
    return _lm_row(run.lm, i, run.pb.layout, run.pb.emulator)


def _mcmc_centre(run: _Run, i):
    """Star ``i``'s MCMC centre (k,) in fit space and its LM row (None with
    ``init="mdn"``); None (the row failed) when the MDN gave no answer."""
    pb = run.pb
    if run.init == "lm":
        lmr = _lm_of(run, i)
        return lmr.p, lmr
    if not pb.mdn_ok[i]:
        _fail(run, i, "the MDN gave no answer")
        return None
    m, _ = pb.mdn_fit_space(i)
    centre = _mdn_centre(pb, m)
    layout, obs = pb.layout, pb.obs
    for b in layout.broadening:
        centre[layout.names.index(b)] = BROADENING_START[b]
    if obs.n_cont:
        tmp = pb.target(i, centre)
        centre[layout.cont_slice] = linear_continuum(
            obs, centre, pb.flux2[i], tmp["w"], obs.n_cont
        )
    return centre, None


def _start_points(run: _Run, i, centre, lmr, tg, rng) -> np.ndarray:
    """(n_walkers or n_chains, kf) starting points inside the prior's support: a
    ball around the LM solution (``init="lm"``) or the MDN's truncated Gaussians."""
    pb = run.pb
    idx, kf, n_lab = pb.idx, pb.idx.size, pb.emulator.n_labels
    n_start = run.nuts.n_chains if run.method == "nuts" else run.n_walkers
    if run.init == "lm":
        return ball(
            rng, centre[idx], lmr.cov[np.ix_(idx, idx)], tg, n_start,
            scale=NUTS_INIT_SCALE if run.method == "nuts" else run.em.init_scale,
        )  # fmt: skip
    m, s = pb.mdn_fit_space(i)
    mi, si = centre[idx].copy(), np.full(kf, 1e-3)
    nl = np.flatnonzero(idx <= n_lab)
    mi[nl], si[nl] = m[idx[nl]], s[idx[nl]]
    mi = np.clip(mi, tg["lo"], tg["hi"])
    return truncnorm_draw(rng, mi, si, tg["lo"], tg["hi"], n_start)


def _mcmc_star(run: _Run, i) -> None:
    """emcee (or NUTS) for star ``i``; a star that fell back from mdn-is keeps its
    IS diagnostics in the fallback columns, and its time and evaluations."""
    pb, em = run.pb, run.em
    kf, dt = pb.idx.size, pb.obs.x_obs.dtype
    t0 = time.perf_counter()
    rng = np.random.default_rng(run.seed + int(i))
    start = _mcmc_centre(run, i)
    if start is None:
        return
    centre, lmr = start
    if not np.all(np.isfinite(centre)):
        _fail(run, i, "no finite starting point (LM failed)")
        return
    tg = pb.target(i, centre)
    run.priors[i] = tg
    n_good = int(np.count_nonzero(tg["w"] > 0))
    if n_good <= kf:
        _fail(run, i, f"{n_good} usable pixels for {kf} parameters")
        return
    p0 = _start_points(run, i, centre, lmr, tg, rng)
    if run.method == "nuts":
        nuts = run.nuts
        imm = None
        if nuts.adaptation == "lm" and lmr is not None:
            ix = np.ix_(pb.idx, pb.idx)
            imm = lm_inverse_mass(
                centre[pb.idx], lmr.cov[ix], tg["lo"], tg["hi"], dense=nuts.dense_mass
            )
        adaptation = "lm" if imm is not None else "window"
        res = run_nuts(
            pb.obs, to_device(tg, dt), tg, p0,
            n_warmup=nuts.warmup_steps_for(adaptation),
            n_steps=em.n_steps, block=em.check_every, ess_target=nuts.ess_target,
            seed=run.seed + int(i), dense=nuts.dense_mass, dt=dt, thin=em.thin,
            imm=imm,
        )  # fmt: skip
    else:
        res = run_emcee(
            pb.obs, to_device(tg, dt), tg, p0, n_steps=em.n_steps,
            check_every=em.check_every, seed=run.seed + int(i),
            backend_path=em.backend_path, star=int(i), moves=em.moves, dt=dt,
            thin=em.thin, tau_rtol=em.tau_rtol,
        )  # fmt: skip
    seconds = time.perf_counter() - t0
    prev = run.rows[i]  # an mdn-is record handed over (fallback), or None
    if prev is not None:
        seconds += prev.seconds
    if prev is not None and prev.fallback:
        res = res._replace(
            fallback=True, is_ess=prev.ess, is_ess_mdn=prev.is_ess_mdn,
            n_evals=res.n_evals + prev.n_evals,
        )  # fmt: skip
    run.rows[i] = res._replace(n_good=n_good, seconds=seconds)
    _tick(run)


def _posterior_samples(run: _Run) -> PosteriorSamples:
    """The stars' samples and priors in physical units."""
    pb = run.pb
    emulator, layout, idx = pb.emulator, pb.layout, pb.idx
    n_lab, k, kf = emulator.n_labels, len(layout.names), idx.size
    names = tuple(layout.names[j] for j in idx)
    units_all = param_units(emulator, layout.names)
    units = tuple(units_all[j] for j in idx)
    phys = []
    for r in run.rows:
        if r.x is None:
            phys.append(np.empty((0, kf)))
            continue
        phys.append(to_physical(r.x, idx, emulator, n_lab))
    span = np.concatenate([emulator.label_hi - emulator.label_lo, np.ones(k - n_lab)])
    pri = {key: [] for key in ("lo", "hi", "mu", "sd")}
    for i in range(run.n):
        tg = run.priors[i] if run.rows[i].x is not None else None
        if tg is None:
            for key in pri:
                pri[key].append(None)
            continue
        for key in ("lo", "hi", "mu"):
            pri[key].append(to_physical(tg[key][None], idx, emulator, n_lab)[0])
        with np.errstate(divide="ignore"):
            pri["sd"].append(
                np.where(tg["ivp"] > 0, 1.0 / np.sqrt(tg["ivp"]), np.inf) * span[idx]
            )
    n_ch = {"emcee": int(run.n_walkers), "nuts": run.nuts.n_chains}
    methods_out = [r.method for r in run.rows]
    return PosteriorSamples(
        names, units, phys, [r.weights for r in run.rows], methods_out,
        n_chains=[n_ch.get(m, 0) for m in methods_out],
        prior_lo=pri["lo"], prior_hi=pri["hi"], prior_mu=pri["mu"],
        prior_sd=pri["sd"], log_prob=[r.lp for r in run.rows],
        diverging=[r.diverging for r in run.rows],
    )  # fmt: skip


def _warn_unconverged(table, run: _Run) -> None:
    """A :class:`SamplingWarning` naming the stars that failed their rule (at the
    caller of :func:`sample`)."""
    bad = np.flatnonzero(~np.asarray(table["converged"]))
    if bad.size:
        rules = {
            "emcee": f"emcee needs >= {N_TAU_MIN:g} tau, a stable tau and R-hat < "
            f"{RHAT_MAX}",
            "mdn-is": f"mdn-is ESS >= {run.is_opts.ess_min:g}",
            "flow-is": f"flow-is ESS >= {run.is_opts.ess_min:g}",
            "nuts": f"nuts ESS >= {run.nuts.ess_target:g}, R-hat < "
            f"{NUTS_RHAT_MAX} and no divergence",
        }
        used = [m for m in METHODS if m in set(table["method"][bad])]
        warnings.warn(
            f"{bad.size} of {run.n} star(s) did not pass the convergence rule "
            f"(rows {bad[:10].tolist()}{' ...' if bad.size > 10 else ''}): "
            + ", ".join(rules[m] for m in used)
            + ("; " if used else "")
            + "see the table's diagnostics",
            SamplingWarning,
            stacklevel=3,  # sample's caller
        )


def _lm_row(t, i, layout, emulator) -> LMSolution:
    """Star ``i``'s LM solution from the fit table ``t``, in fit space and physical."""
    n_lab = layout.n_labels
    k = len(layout.names)
    phys = np.array([float(t[name][i]) for name in layout.names])
    p = phys.copy()
    p[:n_lab] = emulator.scale(phys[:n_lab])
    span = np.concatenate([emulator.label_hi - emulator.label_lo, np.ones(k - n_lab)])
    cov = np.asarray(t["covariance"][i], np.float64) / span[:, None] / span[None, :]
    err = np.array([float(t[f"{name}_err"][i]) for name in layout.names])
    return LMSolution(p=p, cov=cov, phys=phys, err=err, flags=int(t["flags"][i]))
