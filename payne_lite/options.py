"""Settings of each fitting method, one frozen object per method.

The model (emulator, instrument, continuum degree, rv range, fixed parameters,
priors) is described by the arguments of :func:`payne_lite.fit` and
:func:`payne_lite.sample`; *how* a method works through it is its options object,
as optimistix keeps tolerances in its solver and emcee its strategy in ``moves=``:

==================  ===========================  =====================================
method              options                      what they set
==================  ===========================  =====================================
``"lm"``            :class:`LMOptions`           iterations, batching, threads, MDN
                                                 starts, profiled continuum, error
                                                 scaling
``"curve_fit"``     :class:`CurveFitOptions`     function evaluations, batching, MDN
                                                 starts, error scaling
``"emcee"``         :class:`EmceeOptions`        walkers, steps, convergence checks,
                                                 moves, backend, thinning, start
``"nuts"``          :class:`NUTSOptions`         chains, warm-up, draws, ESS target,
                                                 mass matrix, thinning, start
``"mdn-is"``,       :class:`ISOptions`           draws, ESS threshold, proposal
``"flow-is"``                                    scale, adaptation, emcee fallback
==================  ===========================  =====================================

A method refuses another method's options, naming the class it takes
(:func:`options_for`). Every field is validated when the object is made, so a bad
setting fails before any work starts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CONTINUUM_MODES",
    "CurveFitOptions",
    "ESTIMATORS",
    "EmceeOptions",
    "ISOptions",
    "LMOptions",
    "NUTSOptions",
    "OPTIONS_BY_METHOD",
    "options_for",
]

#: ``LMOptions(continuum=...)``: Chebyshev coefficients as LM parameters, or profiled.
CONTINUUM_MODES = ("fit", "profile")
#: ``LMOptions(estimator=...)``: least squares with the per-pixel weights
#: ``1 / diag(C)`` and the sandwich covariance, or generalised least squares under
#: the whole error model ``C`` (:mod:`payne_lite.fitting._gls`).
ESTIMATORS = ("wls", "gls")
#: Where emcee's walkers / NUTS's chains start: around the LM solution, or from the
#: MDN's Gaussians.
INITS = ("lm", "mdn")

#: mdn-is: stars with an effective sample size below this fall back to emcee.
IS_ESS_MIN = 200.0
#: mdn-is: the proposal's sigma is the MDN's times this (a wider proposal is safer
#: against an MDN that is too confident, at the cost of ESS).
IS_SCALE = 1.5
#: flow-is: the flow's base distribution's standard deviation. 1 (the trained
#: density): the flow is already ~1.8x wider than the posterior at S/N 50; on 100
#: APOGEE mock stars (lm_share 0) 1.0 gave ESS/s 11,690 and no fallback, 1.5
#: 8,172 and 2 fallbacks (benchmarks/README.md, "Flow proposal").
FLOW_IS_SCALE = 1.0
#: mdn-is: at most this many adapted stages after the MDN stage (0 = the MDN
#: proposal only).
IS_ADAPT = 4
#: mdn-is: the share of stage 0's draws from the LM solution's Student-t (the rest
#: from the MDN's Gaussians; 0 = the MDN alone, no LM fit). 0.8: on 1000 APOGEE mock
#: stars at S/N 50 (seeds 0-4) stage 0 alone reached ESS 512 for 97 %, median 663
#: of 1024 draws, 5x fewer seconds per star than the MDN alone, no star below
#: ``IS_ESS_MIN``, the same coverage (benchmarks/README.md).
IS_LM_SHARE = 0.8
#: nuts: independent chains (each with its own window adaptation).
NUTS_CHAINS = 4
#: nuts: warm-up (window adaptation) steps per chain, discarded.
NUTS_WARMUP = 500
#: nuts, ``adaptation="lm"``: warm-up (step-size dual averaging) steps per chain.
NUTS_LM_WARMUP = 100
#: nuts: how the warm-up sets the inverse mass matrix and step size.
NUTS_ADAPTATIONS = ("lm", "window")
#: nuts: draws per chain between two checks of the convergence rule.
NUTS_BLOCK = 50
#: nuts: converged when the smallest ESS reaches this (Vehtari et al. 2021: 400) ...
NUTS_ESS_MIN = 400.0
#: emcee: steps between two checks of the convergence rule (at most).
EMCEE_CHECK_EVERY = 500
#: emcee: walkers start at the LM solution + init_scale x (LM covariance)^(1/2) z;
#: 1 draws them from the LM Gaussian (the old small ball was 0.1).
EMCEE_INIT_SCALE = 1.0
#: emcee: the autocorrelation times of two successive checks agree to this
#: (relative) before the chain counts as converged.
EMCEE_TAU_RTOL = 0.05


def _int(value, name: str, minimum: int, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{owner}.{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}.{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _positive(value, name: str, owner: str, *, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}.{name} must be a number, got {value!r}") from None
    ok = v >= 0 if allow_zero else v > 0
    if not (np.isfinite(v) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{owner}.{name} must be finite and {bound}, got {value!r}")
    return v


def _bool(value, name: str, owner: str) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{owner}.{name} must be True or False, got {value!r}")
    return bool(value)


class _Options:
    """Shared validation helpers; subclasses are frozen keyword-only dataclasses."""

    method: str = ""

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def to_meta(self) -> dict:
        """JSON-compatible record of the settings (for a results table's meta)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, _Options):
                v = v.to_meta()
            elif isinstance(v, Path):
                v = str(v)
            elif v is not None and not isinstance(v, bool | int | float | str):
                v = repr(v)  # e.g. emcee moves
            out[f.name] = v
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class _PointFitOptions(_Options):
    """The settings the two point fits share (see :class:`LMOptions`)."""

    max_iter: int = 100
    batch_size: int = 128
    n_threads: int | None = None
    mdn_starts: int = 0
    scale_errors: bool = False
    refine_continuum: int = 0
    refine_deg: int = 2
    estimator: str = "wls"

    def __post_init__(self):
        owner = type(self).__name__
        if self.estimator not in ESTIMATORS:
            raise ValueError(
                f"{owner}.estimator must be one of {ESTIMATORS}, got {self.estimator!r}"
            )
        passes = _int(self.refine_continuum, "refine_continuum", 0, owner)
        if passes > 10:
            raise ValueError(f"{owner}.refine_continuum must be <= 10, got {passes}")
        self._set("refine_continuum", passes)
        self._set("refine_deg", _int(self.refine_deg, "refine_deg", 0, owner))
        self._set("max_iter", _int(self.max_iter, "max_iter", 1, owner))
        self._set("batch_size", _int(self.batch_size, "batch_size", 1, owner))
        if self.n_threads is not None:
            self._set("n_threads", _int(self.n_threads, "n_threads", 1, owner))
        self._set("mdn_starts", _int(self.mdn_starts, "mdn_starts", 0, owner))
        self._set("scale_errors", _bool(self.scale_errors, "scale_errors", owner))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMOptions(_PointFitOptions):
    """Batched Levenberg-Marquardt in JAX (``method="lm"``).

    Args:
        max_iter: LM iterations per start (an input of the compiled LM, not part
            of it: another value compiles nothing new).
        batch_size: spectra per jitted call. Every call has this many rows (the
            last batch is padded with rows of zero weight, whose LM lanes do not
            run), so one compilation serves any number of spectra. 128 measured
            best here: fits of 1,000 APOGEE spectra as fast as with 256, a fit of
            one spectrum 2x faster (the RV scan and screening do pay for padding).
        n_threads: batches fitted at once, in threads (JAX releases the GIL while a
            batch runs); None = one per CPU core on the CPU backend, else 1. Results
            do not depend on it.
        mdn_starts: with an MDN, this many extra starting points per star drawn from
            its Gaussians within its +- 3 sigma bounds (screened by chi2 with the
            others).
        continuum: with ``cont_deg >= 1``: ``"fit"`` (the Chebyshev coefficients are
            LM parameters) or ``"profile"`` (variable projection: solved by linear
            least squares at every step; the same minimum and errors).
        scale_errors: multiply each covariance by its reduced chi2 when that is
            above 1; recorded in the table's meta.
        refine_continuum: passes of continuum refinement, for flux normalised
            through a few pixels (apStar files read with
            ``continuum="continuum-pixels"``: The Cannon's 529): after the fit, the
            flux (and its errors) is divided by a polynomial of degree
            ``refine_deg`` per chip (the grid split at its gaps and at runs of
            masked pixels) fitted by weighted least squares to flux / best-fit
            model over every good pixel, and fitted again; 0 = none. Alternating
            labels and continuum approaches their joint fit: on 200 mocks of the
            real APOGEE network at S/N 50 times a random quadratic continuum per
            chip, normalised through The Cannon's pixels (degree 2), four passes of
            degree 2 bring the labels' robust scatter from 1.09-1.77x to
            1.02-1.09x that of the same mocks perfectly normalised (two passes:
            1.05-1.10x), no fit more than 5 sigma from the latter's
            (``benchmarks/bench_continuum.py``). ``meta["continuum_refined"]``
            records it.
        refine_deg: degree of the refinement's polynomial per chip: the
            normalisation's own (2 for ``ContinuumPixels.apogee()``; a degree more
            than the continuum needs costs logg precision: 1.14x instead of 1.03x
            with 3 on the mocks above).
        estimator: ``"wls"``: least squares with the per-pixel weights
            ``1 / (err^2 + pixel_error^2)``, its covariance the sandwich under the
            emulator's correlated error (``error_basis``) scaled by its
            ``error_scale``. ``"gls"`` (needs an ``error_basis`` or a
            ``local_error``): from that fit,
            Gauss-Newton steps to the minimum of ``r^T C^-1 r`` under the whole
            error model ``C = diag(D) + U^T U`` (the samplers' likelihood), its
            covariance ``(J^T C^-1 J)^-1`` and its ``chi2`` ``r^T C^-1 r``: the
            same width as the samplers' posterior, and 2-5x more precise than
            "wls" at S/N 300 where the emulator's error dominates, *if* ``C`` is
            right: with 32 components too narrow at high S/N; with ~256 of
            >= 500 held-out spectra (:meth:`payne_lite.Emulator.with_error_basis`)
            calibrated on a student of The Payne's APOGEE network, but still too
            narrow on the shipped default emulator (sd of z 1.1-1.8 at S/N 300,
            its error depends on the labels: ``benchmarks/bench_gls_default.py``).
            With a label-dependent covariance
            (:meth:`payne_lite.Emulator.with_local_error`, 100 nearest of 4,000
            held-out errors) the shipped default's GLS errors covered 0.63-0.76
            of the truths at S/N 30, 100 and 300. Check its coverage on held-out
            mocks of your emulator first. Costs ``K^2 P`` per star: with K = 256
            on APOGEE's pixels ~22 ms a star on one core against ~3 ms for
            "wls" (a local covariance of 100 neighbours, 14-24 ms).
            See :mod:`payne_lite.fitting._gls`.
    """

    method = "lm"
    continuum: str = "fit"

    def __post_init__(self):
        super().__post_init__()
        if self.continuum not in CONTINUUM_MODES:
            raise ValueError(
                f"{type(self).__name__}.continuum must be one of {CONTINUUM_MODES}, "
                f"got {self.continuum!r}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CurveFitOptions(_PointFitOptions):
    """``scipy.optimize.curve_fit`` (trf) with a JAX Jacobian, one star at a time
    (``method="curve_fit"``).

    Args:
        max_iter: function evaluations per start (``max_nfev``).
        batch_size: spectra per batch of the shared steps (RV scan, starts).
        n_threads: batches at once, in threads; None = 1.
        mdn_starts: as :class:`LMOptions`.
        scale_errors: as :class:`LMOptions`.
        refine_continuum: as :class:`LMOptions`.
        estimator: as :class:`LMOptions` (the GLS steps start from curve_fit's fit).
    """

    method = "curve_fit"


def _check_init(self, owner: str) -> None:
    if self.init not in INITS:
        raise ValueError(f"{owner}.init must be one of {INITS}, got {self.init!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmceeOptions(_Options):
    """emcee's affine-invariant ensemble sampler (``method="emcee"``).

    Args:
        n_walkers: walkers (even, >= 2 kf + 2 for kf sampled parameters); None =
            ``max(32, 4 kf)`` rounded up to even.
        n_steps: the most steps per star.
        check_every: the convergence rule is checked at most this many steps
            apart (sooner when the last check's tau says the chain is nearly long
            enough) and the chain stops when it holds (``>= n_steps``: one run of
            ``n_steps``).
        moves: emcee moves (``emcee.EnsembleSampler(moves=...)``); None =
            ``emcee.moves.DEMove()`` (differential evolution: autocorrelation times
            ~3x shorter than the stretch move's on 6-parameter near-Gaussian
            posteriors); ``emcee.moves.StretchMove()`` is emcee's own default.
        init_scale: with ``init="lm"`` the walkers start at ``p_LM + init_scale
            chol(C_LM) z``: 1 draws them from the LM Gaussian (a short burn-in
            suffices when it is close to the posterior); 0.1 is the small ball
            of before.
        tau_rtol: the convergence rule also asks that every parameter's
            autocorrelation time changed by less than this fraction since the
            previous check (emcee's advice; None = no such check).
        backend_path: HDF5 file for the chains (group ``star_<i>``); an existing
            group with the same data and settings is continued.
        thin: keep every ``thin``-th step in the returned or saved samples.
        init: walkers around the LM solution (``"lm"``) or drawn from the MDN's
            Gaussians (``"mdn"``, needs an MDN).
    """

    method = "emcee"
    n_walkers: int | None = None
    n_steps: int = 10_000
    check_every: int = EMCEE_CHECK_EVERY
    moves: Any = None
    backend_path: str | Path | None = None
    thin: int = 1
    init: str = "lm"
    init_scale: float = EMCEE_INIT_SCALE
    tau_rtol: float | None = EMCEE_TAU_RTOL

    def __post_init__(self):
        owner = type(self).__name__
        if self.n_walkers is not None:
            n = _int(self.n_walkers, "n_walkers", 2, owner)
            if n % 2:
                raise ValueError(f"{owner}.n_walkers must be even, got {n}")
            self._set("n_walkers", n)
        self._set("n_steps", _int(self.n_steps, "n_steps", 4, owner))
        self._set("check_every", _int(self.check_every, "check_every", 1, owner))
        self._set("thin", _int(self.thin, "thin", 1, owner))
        _check_init(self, owner)
        self._set("init_scale", _positive(self.init_scale, "init_scale", owner))
        if self.tau_rtol is not None:
            self._set("tau_rtol", _positive(self.tau_rtol, "tau_rtol", owner))


@dataclasses.dataclass(frozen=True, kw_only=True)
class NUTSOptions(_Options):
    """The No-U-Turn sampler (blackjax) (``method="nuts"``).

    Args:
        n_chains: independent chains, each with its own adaptation.
        adaptation: ``"lm"``: the LM covariance (mapped to the unconstrained
            coordinates) is the inverse mass matrix and the warm-up tunes the step
            size alone (dual averaging); needs ``init="lm"`` (a star whose LM
            covariance is unusable gets the window adaptation). ``"window"``:
            Stan's window adaptation of the mass matrix and step size (blackjax).
        n_warmup: warm-up steps per chain (discarded); None = ``NUTS_LM_WARMUP``
            (100) with ``adaptation="lm"``, ``NUTS_WARMUP`` (500) with
            ``"window"``.
        n_steps: the most draws per chain after the warm-up.
        check_every: draws per chain between two checks of the convergence rule.
        ess_target: the smallest ESS over parameters the rule asks for.
        dense_mass: a dense (else diagonal) inverse mass matrix.
        thin: keep every ``thin``-th draw in the returned or saved samples.
        init: chains around the LM solution (``"lm"``) or from the MDN (``"mdn"``).
    """

    method = "nuts"
    n_chains: int = NUTS_CHAINS
    adaptation: str = "lm"
    n_warmup: int | None = None
    n_steps: int = 10_000
    check_every: int = NUTS_BLOCK
    ess_target: float = NUTS_ESS_MIN
    dense_mass: bool = True
    thin: int = 1
    init: str = "lm"

    def __post_init__(self):
        owner = type(self).__name__
        self._set("n_chains", _int(self.n_chains, "n_chains", 1, owner))
        if self.adaptation not in NUTS_ADAPTATIONS:
            raise ValueError(
                f"{owner}.adaptation must be one of {NUTS_ADAPTATIONS}, "
                f"got {self.adaptation!r}"
            )
        if self.n_warmup is not None:  # None stays None: see warmup_steps
            self._set("n_warmup", _int(self.n_warmup, "n_warmup", 10, owner))
        self._set("n_steps", _int(self.n_steps, "n_steps", 4, owner))
        self._set("check_every", _int(self.check_every, "check_every", 1, owner))
        self._set("ess_target", _positive(self.ess_target, "ess_target", owner))
        self._set("dense_mass", _bool(self.dense_mass, "dense_mass", owner))
        self._set("thin", _int(self.thin, "thin", 1, owner))
        _check_init(self, owner)

    @property
    def warmup_steps(self) -> int:
        """The warm-up steps per chain: ``n_warmup``, or the adaptation's default
        when it is None (resolved here, not stored at construction, so that
        ``dataclasses.replace(opts, adaptation="window")`` gets the window's 500)."""
        return self.warmup_steps_for(self.adaptation)

    def warmup_steps_for(self, adaptation: str) -> int:
        """:attr:`warmup_steps` for the adaptation that actually runs: a star
        whose LM covariance is unusable falls back to ``"window"``, which needs
        its own default (500), not the LM warm-up's 100."""
        if self.n_warmup is not None:
            return self.n_warmup
        return NUTS_LM_WARMUP if adaptation == "lm" else NUTS_WARMUP

    def to_meta(self) -> dict:
        # the configured adaptation's steps (a star that fell back to the window
        # adaptation ran warmup_steps_for("window"): its n_burn column says)
        return {**super().to_meta(), "n_warmup": self.warmup_steps}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ISOptions(_Options):
    """Importance sampling from the MDN's proposal (``method="mdn-is"``) or its
    flow's (``method="flow-is"``).

    Args:
        n_draws: draws per star.
        ess_min: stars with a smaller effective sample size fall back to emcee.
        scale: the proposal's sigma over the MDN's (mdn-is) or the flow's base
            distribution's standard deviation (flow-is); None = the method's
            default (``IS_SCALE`` 1.5, ``FLOW_IS_SCALE`` 1.0: :meth:`scale_for`).
        adapt: adapted stages after the MDN stage (0 = the MDN proposal alone).
        lm_share: the share of stage 0's draws from a multivariate Student-t with
            the LM fit's mean and covariance, a defensive second proposal where the
            MDN is poor (0 = the MDN alone; > 0 runs the LM fit, or takes
            ``lm_table``).
        fallback: the emcee settings of the stars that fall back.
    """

    method = "mdn-is"
    n_draws: int = 2048
    ess_min: float = IS_ESS_MIN
    scale: float | None = None
    adapt: int = IS_ADAPT
    lm_share: float = IS_LM_SHARE
    fallback: EmceeOptions = dataclasses.field(default_factory=EmceeOptions)

    def __post_init__(self):
        owner = type(self).__name__
        self._set("n_draws", _int(self.n_draws, "n_draws", 2, owner))
        self._set("ess_min", _positive(self.ess_min, "ess_min", owner, allow_zero=True))
        if self.scale is not None:
            self._set("scale", _positive(self.scale, "scale", owner))
        self._set("adapt", _int(self.adapt, "adapt", 0, owner))
        share = _positive(self.lm_share, "lm_share", owner, allow_zero=True)
        if share > 1.0:
            raise ValueError(f"{owner}.lm_share must be in [0, 1], got {share!r}")
        self._set("lm_share", share)
        if not isinstance(self.fallback, EmceeOptions):
            raise ValueError(
                f"{owner}.fallback must be an EmceeOptions, got "
                f"{type(self.fallback).__name__}"
            )

    def scale_for(self, method: str) -> float:
        """The proposal's scale for ``method`` ("mdn-is" or "flow-is"): ``scale``,
        or that method's default when it is None (one options object serves both
        methods, whose proposals need different widening)."""
        if self.scale is not None:
            return self.scale
        return FLOW_IS_SCALE if method == "flow-is" else IS_SCALE


#: The options class of each method (ISOptions serves both IS methods).
OPTIONS_BY_METHOD: dict[str, type] = {
    cls.method: cls
    for cls in (LMOptions, CurveFitOptions, EmceeOptions, NUTSOptions, ISOptions)
} | {"flow-is": ISOptions}


def options_for(method: str, options=None):
    """``options`` checked against ``method`` (None = the method's defaults).

    Raises:
        ValueError: an unknown method, or options of another method's class (named
            with the class ``method`` takes).
    """
    if method not in OPTIONS_BY_METHOD:
        raise ValueError(
            f"method must be one of {tuple(OPTIONS_BY_METHOD)}, got {method!r}"
        )
    cls = OPTIONS_BY_METHOD[method]
    if options is None:
        return cls()
    if type(options) is not cls:
        other = getattr(options, "method", None)
        given = type(options).__name__
        what = f"{given} is for method={other!r}" if other else f"a {given}"
        raise ValueError(
            f"options: {what}; method={method!r} takes payne_lite.{cls.__name__}(...)"
        )
    return options
