"""Fit observed spectra with an emulator: labels, radial velocity, continuum.

``fit(flux, flux_err, emulator, ...) -> astropy.table.Table``, one row per spectrum.

Steps, for a batch of spectra (the model is in :mod:`payne_lite.model`):

1. Validation at the NumPy boundary: shapes are checked (``ValueError`` naming them);
   masked pixels and pixels with non-finite flux or non-finite / non-positive errors
   get zero weight (``ivar = 0``); inputs are never modified.
2. RV scan: chi2 on a grid of radial velocities over ``rv_range``
   (``RV_SCAN_STEP`` = 4 km/s, about an APOGEE pixel) against the box-centre model,
   over the pixels valid at every RV of the scan (or per valid pixel when those are
   too few), refined to the vertex of the parabola through the lowest chi2 and its
   two neighbours; the continuum, if any, is solved linearly at each RV. The RV
   chi2 basin is only a few km/s wide, so the local fit must start inside it
   (measured on 400 spectra of the APOGEE network at S/N 100 and 30: the same LM
   steps per star, 3.9 and 4.8, from scans at 2, 4 and 6 km/s).
3. Local fit inside ``rv_scan +- RV_WINDOW`` and the training box, from several
   starting points per star (Teff at ``TEFF_STARTS`` of the box, other labels at the
   box centre, the scan's RV and continuum); the best chi2 is kept. Only pixels valid
   over the whole RV window are used, so the pixel set does not change during a fit.
   ``method="lm"``: batched Levenberg-Marquardt in JAX (:func:`_lm_lanes`), one
   compilation per batch shape; the starts are ranked by their chi2, the best is
   fitted, and the others too when that fit is doubtful (not converged, at an edge
   of the box, or chi2 beyond noise: :func:`_lm_with_starts`); best chi2 kept;
   ``method="curve_fit"``: ``scipy.optimize.curve_fit``
   (``method="trf"``) per star with the JAX Jacobian, same model, bounds and starts.
   The emulator's own per-pixel error, when it has one, is added in quadrature to
   the flux errors (``emulator_error=True``, the default; :func:`emulator_error_on`).
4. Errors from the covariance ``(J^T W J)^-1`` at the best fit, transformed from
   scaled to physical label units. By default not rescaled (the errors are then
   right when the flux errors are right and the model fits: their coverage is
   checked in ``benchmarks/bench_fit.py``); ``scale_errors=True`` multiplies the
   covariance by the reduced chi2 when it is above 1 (never shrinks it), the usual
   remedy when flux errors are underestimated or the model does not fit.

QA bitmask (column ``flags``):

===  ==========  =================================================================
bit  value       meaning
===  ==========  =================================================================
0    1           not converged (iteration cap, or no downhill step at float precision
                 while the Gauss-Newton step is still > ``XTOL_STALL`` sigma)
1    2           a label at an edge of the training box, or rv at an edge of its window
2    4           failed: fewer usable pixels than free parameters (results are NaN;
                 bit 0 is set too, so a failed row has flags 5)
3    8           ill-conditioned covariance (condition number of the correlation form
                 of J^T W J above ``COND_LIMIT`` for the dtype, or not invertible)
4    16          outside the training box: a label sits at an edge of the box and the
                 chi2 gradient points out of it, so the best fit (and likely the
                 star) lies outside the emulator's training box; bit 1 is set too
5    32          low S/N: the median |flux| / error of the pixels used is below
                 ``LOW_SNR`` (10); the fit is made, the numbers are less certain
6    64          MDN disagrees (``fit(..., mdn=...)`` only): a label or rv lies more
                 than ``MDN_FLAG_NSIGMA`` (4) MDN sigmas from the MDN mean: the
                 spectrum is unlike the MDN's training spectra, or the fit or the
                 MDN went wrong (the cheapest out-of-distribution signal)
===  ==========  =================================================================

With an MDN (``fit(..., mdn=mdn)``, :mod:`payne_lite.mdn`), as LUCI does: the MDN's
means (clipped into the box) are the one start per star, and its mean +-
``MDN_NSIGMA`` (3) sigma, intersected with the training box and ``rv_range``, bound
the labels and rv; there is no RV scan (the MDN locates the RV by cross-correlation
and gives its error, so the window is its own +-3 sigma instead of the scan's +-
``RV_WINDOW``; the scan remains the fallback). A star whose fit ends at an MDN bound
that is not the box's edge, or is NaN, or for which the MDN has no answer, is
refitted by the default path (RV scan, Teff starts, whole box) and the lower chi2
kept; ``mdn_refit`` marks them and their ``n_iter`` counts both passes. Columns
``<label>_mdn``, ``<label>_mdn_sigma``, ``rv_mdn``, ``rv_mdn_sigma`` hold the MDN's
Gaussians.

Precision: JAX's default float (float32 unless x64 is enabled); the covariance is
inverted on the host in float64.

References:
    Ting, Conroy, Rix & Cargile 2019, ApJ 879, 69 ("The Payne").
"""

from __future__ import annotations

import functools
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._serial import serial_jit
from ._validate import as_float_array
from .constants import C_KMS
from .emulator import KERNEL_COMPILER_OPTIONS, Emulator, forward
from .model import (
    LABEL_BOUND,
    ObsModel,
    _shift_pair,
    build_obs_model,
    embed_obs,
    normal_equations,
    observe,
    observe_jac_t,
    param_layout,
    window_valid,
)

Array = jax.Array

#: Step of the coarse RV chi2 scan [km/s].
RV_SCAN_STEP = 4.0
#: The RV scan compares chi2 over the pixels valid at every RV of the scan when
#: they are at least this fraction of the grid (see :func:`_scan_pixels`).
SCAN_COMMON_MIN = 0.75
#: Half-width of the RV window of the local fit around the scan's RV [km/s].
RV_WINDOW = 20.0
#: Scaled-Teff starting points of the local fit (other labels start at the centre).
TEFF_STARTS = (-0.3, 0.0, 0.3)
#: LM: a fit from the best-screened start with chi2 above ndof + RESCUE_SIGMA *
#: sqrt(2 ndof) is refitted from the other starts (see :func:`_lm_with_starts`).
RESCUE_SIGMA = 5.0
#: LM: initial, minimum and maximum damping.
LAM_INIT, LAM_MIN, LAM_MAX = 1e-3, 1e-9, 1e10
#: LM: converged when the Gauss-Newton step is below XTOL (in units of each
#: parameter's conditional 1-sigma error); after LAM_MAX, XTOL_STALL.
XTOL, XTOL_STALL = 1e-2, 0.1
#: Covariance condition-number limit (correlation form) per dtype.
COND_LIMIT = {np.dtype(np.float32): 1e6, np.dtype(np.float64): 1e12}
#: Distance from a bound counted as "at the bound": scaled labels, rv [km/s].
AT_BOUND_TOL = (1e-6, 1e-4)

FLAG_NOT_CONVERGED = 1
FLAG_AT_BOUND = 2
FLAG_FAILED = 4
FLAG_ILL_CONDITIONED = 8
FLAG_OUTSIDE_BOX = 16
FLAG_LOW_SNR = 32
FLAG_MDN_DISAGREE = 64
FLAG_BITS = {
    0: "not converged",
    1: "at a bound (training box or rv window)",
    2: "failed: too few usable pixels",
    3: "ill-conditioned covariance",
    4: "outside the training box: a label at a box edge with chi2 still falling outwards",
    5: "low S/N: median |flux| / error of the used pixels below LOW_SNR",
    6: "MDN disagrees: a label or rv more than MDN_FLAG_NSIGMA MDN sigmas from the "
    "MDN mean (fits with an MDN only)",
}
#: With an MDN: label and rv bounds are the MDN mean +- MDN_NSIGMA sigma (and box).
MDN_NSIGMA = 3.0
#: With an MDN: QA bit 6 when the fit is more than this many MDN sigmas from its mean.
MDN_FLAG_NSIGMA = 4.0
#: Median S/N per pixel below which a fit is flagged low_snr (bit 5).
LOW_SNR = 10.0

METHODS = ("lm", "curve_fit")
#: Posterior samplers ``fit`` hands to :func:`payne_lite.posterior.sample`.
SAMPLERS = ("emcee", "mdn-is", "nuts")


# --------------------------------------------------------------------------------------
# Pure, jitted core
# --------------------------------------------------------------------------------------
@functools.partial(
    jax.jit, static_argnames=("common",), compiler_options=KERNEL_COMPILER_OPTIONS
)
def _scan_batch(obs: ObsModel, s0, rv_grid, flux, w, *, common=False):
    """Best RV (n,) and continuum (n, n_c) from a chi2 scan over ``rv_grid`` (R,).

    The template is the model at scaled labels ``s0`` (L,), shifted to every RV once
    for the whole batch; chi2 for all stars and RVs comes from (n, P) @ (P, R)
    products. With a continuum (``cont_deg > 0``) its coefficients are solved
    linearly at each RV; without, the single coefficient is 1.

    ``common=True``: ``w`` is zero outside the pixels valid at every RV of the grid
    (:func:`_scan_weights`), so chi2 is compared over one pixel set and its
    constant term needs no product (2 products instead of 4 without a continuum).
    Otherwise chi2 per valid pixel is compared (the pixel set changes with RV).
    """
    f_rest = jax.lax.optimization_barrier(forward(obs.net, s0, obs.activation))

    def shifted(rv):
        ma, mb, t, _, valid = _shift_pair(obs, f_rest[None], rv)
        return (ma + t * (mb - ma))[0], valid

    t, v = _over(shifted, rv_grid)  # (R, P)
    vf = v.astype(t.dtype)
    t = t * vf
    basis = obs.basis  # (P, n_c)
    n_c = basis.shape[1]
    wf = w * flux
    if common:
        sff = jnp.sum(wf * flux, axis=1, keepdims=True)  # (n, 1)
    else:
        sff = (wf * flux) @ vf.T  # (n, R)
    b = jnp.stack([wf @ (t * basis[:, a]).T for a in range(n_c)], axis=-1)
    t2 = t * t
    m = [[None] * n_c for _ in range(n_c)]
    for a in range(n_c):
        for c in range(a, n_c):
            m[a][c] = m[c][a] = w @ (t2 * (basis[:, a] * basis[:, c])).T
    m = jnp.stack([jnp.stack(row, axis=-1) for row in m], axis=-2)  # (n, R, nc, nc)
    if obs.cont_deg > 0:
        scale = jnp.maximum(jnp.trace(m, axis1=-2, axis2=-1) / n_c, 1e-30)
        eye = jnp.eye(n_c, dtype=m.dtype)
        coef = jnp.linalg.solve(m + 1e-7 * scale[..., None, None] * eye, b[..., None])
        coef = coef[..., 0]
        chi2 = sff - jnp.sum(coef * b, axis=-1)
    else:
        coef = jnp.ones_like(b)
        chi2 = sff - 2.0 * b[..., 0] + m[..., 0, 0]
    if common:
        red = jnp.where(jnp.isfinite(chi2), chi2, jnp.inf)
    else:
        n_ok = (w > 0).astype(t.dtype) @ vf.T
        red = jnp.where(n_ok > 0, chi2 / jnp.maximum(n_ok, 1.0), jnp.inf)
        red = jnp.where(jnp.isfinite(red), red, jnp.inf)
    i = jnp.argmin(red, axis=1)
    return _parabola_vertex(red, i, rv_grid), jnp.take_along_axis(
        coef, i[:, None, None], axis=1
    )[:, 0]


def _parabola_vertex(red, i, rv_grid):
    """RV of the vertex of the parabola through chi2 at grid points i-1, i, i+1
    (n,), within half a step of ``rv_grid[i]``; ``rv_grid[i]`` at the grid's ends or
    where the three values are not convex and finite. ``rv_grid`` is uniform."""
    n_rv = rv_grid.shape[0]
    if n_rv < 3:
        return rv_grid[i]
    j = jnp.clip(i, 1, n_rv - 2)
    y = jnp.take_along_axis(red, jnp.stack([j - 1, j, j + 1], axis=1), axis=1)
    curv = y[:, 0] - 2.0 * y[:, 1] + y[:, 2]
    ok = (j == i) & (curv > 0) & jnp.all(jnp.isfinite(y), axis=1)
    delta = jnp.clip(0.5 * (y[:, 0] - y[:, 2]) / jnp.where(ok, curv, 1.0), -0.5, 0.5)
    step = rv_grid[1] - rv_grid[0]
    return rv_grid[i] + jnp.where(ok, delta, 0.0) * step


@functools.partial(jax.jit, compiler_options=KERNEL_COMPILER_OPTIONS)
def _chi2_batch(obs, p, flux, w):
    """chi2 (n, S) of the model at ``p`` (n, S, k) against each star's ``flux``."""
    n, n_s, k = p.shape
    star = jnp.repeat(jnp.arange(n), n_s)

    def one(args):
        q, i = args
        f, _ = observe(obs, q)
        return w[i] @ (f - flux[i]) ** 2

    return _over(one, (p.reshape(n * n_s, k), star)).reshape(n, n_s)


@jax.jit
def _window_batch(obs, rv_lo, rv_hi):
    return _over(lambda v: window_valid(obs, *v), (rv_lo, rv_hi))


def _normal(obs, p, flux, sw):
    """chi2, J^T J, J^T r and the weighted residual ``r`` (P,) at ``p`` (one star).

    The Jacobian is analytic (:func:`payne_lite.model.observe_jac`): the rest-frame
    derivatives come from forward-mode through the network and are shifted with the
    flux. ``jax.jacfwd`` through the Doppler-shift gather cost 0.8 ms per star and
    step on the APOGEE network; this, with the lanes of :func:`_lm_lanes` and the
    log-grid shift, about 0.16 ms; one-hidden-layer nets on a log grid (``obs.jet``)
    take :func:`payne_lite.model.normal_equations`, about 0.1 ms, with ``flux`` and
    ``sw`` in its layout (``r`` then is too).
    """
    if obs.jet is not None:  # flux, sw already in embed_obs's layout (_lm_lanes)
        return normal_equations(obs, p, flux, sw)
    f, _, jac = observe_jac_t(obs, p)
    r = sw * (f - flux)
    jw = jac * sw
    return r @ r, jw @ jw.T, jw @ r, r


#: How LM lanes are evaluated: None = by backend (one after the other on CPU, all at
#: once under vmap elsewhere); True / False force it (tests run both on CPU).
SEQUENTIAL_LANES = None


def _sequential_lanes() -> bool:
    """Read at trace time."""
    if SEQUENTIAL_LANES is not None:
        return bool(SEQUENTIAL_LANES)
    return jax.default_backend() == "cpu"


def _over(f, xs):
    """``f`` over the leading axis of ``xs``: ``lax.map`` on CPU (one item's arrays stay
    in cache), ``vmap`` on accelerators (see :data:`SEQUENTIAL_LANES`)."""
    return jax.lax.map(f, xs) if _sequential_lanes() else jax.vmap(f)(xs)


def _damped_step(a, g, lam, act):
    """Marquardt step ``(A + lam diag A) d = -g`` over the active parameters.

    Solved in the Jacobi-scaled form; returns the step and its size in units of each
    parameter's conditional 1-sigma, ``d_i sqrt(A_ii)``.
    """
    k = a.shape[0]
    d = jnp.diag(a)
    dmax = jnp.max(jnp.where(act, d, 0.0))
    d = jnp.where(act, jnp.maximum(d, 1e-12 * dmax + 1e-30), 1.0)
    s = 1.0 / jnp.sqrt(d)
    eye = jnp.eye(k, dtype=a.dtype)
    at = jnp.where(act[:, None] & act[None, :], a * s[:, None] * s[None, :], eye)
    gt = jnp.where(act, g * s, 0.0)
    y = jnp.linalg.solve(at + lam * eye, -gt)
    y = jnp.where(act, y, 0.0)
    return y * s, y


class _LMState(NamedTuple):
    """Levenberg-Marquardt state of one lane (one start of one star)."""

    p: Array  # (k,) parameters
    chi2: Array  # ()
    r: Array  # (P,) weighted residuals at p
    a: Array  # (k, k) J^T J at p
    g: Array  # (k,) J^T r at p
    lam: Array  # () damping
    it: Array  # () int, steps taken
    done: Array  # () bool
    conv: Array  # () bool


def _lm_one(obs, p0, alive, flux, sw, lo, hi, free, max_iter):
    """Levenberg-Marquardt for one lane; returns (p, chi2, n_iter, converged, A, g).

    ``p0``, ``lo``, ``hi`` (k,): start and box; ``flux``, ``sw`` (P,): the star's
    flux and sqrt(weights); ``alive`` False: do nothing (batch padding, or a start
    that needs no run); ``free`` (k,) False for fixed parameters.

    Damping (Marquardt, Jacobi-scaled): each iteration solves
    ``(A + lam diag A) d = -J^T r`` with ``A = J^T J`` of the weighted residuals and
    clips ``p + d`` into ``[lo, hi]``. A step that lowers chi2 is accepted and
    ``lam /= 10`` (not below ``LAM_MIN``); otherwise it is rejected and ``lam *= 10``.
    ``lam`` starts at ``LAM_INIT``. Parameters at a bound whose gradient points out of
    the box are held (active set), as are ``fixed`` ones (``free`` False).

    A step is accepted when chi2 decreases, the change summed pixel by pixel as
    ``sum((r - r_old) (r + r_old))`` from the residuals: its rounding error scales
    with the change, not with chi2 (in float32 two chi2 sums of 6,000 pixels differ
    by ~1e-5 of chi2 from rounding alone, enough to reject good steps near the
    minimum).

    Stopping:

    * converged: the undamped Gauss-Newton step from the current point is below
      ``XTOL`` (0.01) in every parameter, in units of its conditional 1-sigma error
      (``|d_i| sqrt(A_ii)``): a further step could not change the answer by more
      than 1 % of its error bar (1e-4 sigma, tried first, is below float32 precision
      and left most stars to stall out: median 25 steps instead of 10, same answers
      in ``benchmarks/bench_fit.py``);
    * settled: a step is rejected while the Gauss-Newton step is below
      ``XTOL_STALL`` (0.1) sigma: no lower chi2 is reachable at float precision;
      or the damped step is below ``XTOL`` sigma (lam has grown because the
      Gauss-Newton model promised a decrease that was not there: chi2 has a kink
      in rv where all pixels cross grid nodes at once, with linear interpolation
      on a log-uniform grid; on 500 S/N-30 spectra 6 lanes ran 35-100 steps there).
      Counted as converged;
    * stalled: ``lam > LAM_MAX`` (no downhill step even along the gradient); counted
      as converged when the Gauss-Newton step is below ``XTOL_STALL`` sigma;
    * not converged: ``max_iter`` steps taken.

    The Jacobian (analytic, :func:`_normal`) is evaluated once per step, at the trial
    point, which also gives the trial chi2; not at all on the step that finds
    convergence.
    """
    k = p0.shape[0]

    def start(_):
        chi2, a, g, r = _normal(obs, p0, flux, sw)
        return _LMState(
            p0, chi2, r, a, g, jnp.asarray(LAM_INIT, p0.dtype),
            jnp.zeros((), jnp.int32), jnp.zeros((), bool), jnp.zeros((), bool),
        )  # fmt: skip

    def body(st):
        blocked = ((st.p <= lo) & (st.g > 0)) | ((st.p >= hi) & (st.g < 0))
        act = free & ~blocked
        _, y_gn = _damped_step(st.a, st.g, 0.0, act)
        gn_size = jnp.max(jnp.abs(y_gn))
        conv = gn_size < XTOL
        step, y = _damped_step(st.a, st.g, st.lam, act)
        # Damped this far, the step cannot move the answer by 1 % of an error bar:
        # what the Gauss-Newton model still promises is not there (chi2 has a kink
        # in rv where every pixel crosses a grid node at once, or float rounding).
        tiny = ~conv & (jnp.max(jnp.abs(y)) < XTOL)
        p_new = jnp.clip(st.p + step, lo, hi)

        def trial(_):
            chi2, a, g, r = _normal(obs, p_new, flux, sw)
            return chi2, (r - st.r) @ (r + st.r), a, g, r

        def skip(_):
            zero = jnp.zeros((), p0.dtype)
            return zero, zero, st.a, st.g, st.r

        chi2_new, dchi2, a_new, g_new, r_new = jax.lax.cond(
            ~conv & ~tiny, trial, skip, None
        )
        acc = (dchi2 < 0) & ~conv & ~tiny
        lam = jnp.where(acc, jnp.maximum(st.lam / 10.0, LAM_MIN), st.lam * 10.0)
        stalled = (lam > LAM_MAX) & ~conv
        # A rejected step whose Gauss-Newton step is already below XTOL_STALL sigma:
        # chi2 cannot be lowered beyond float rounding; stop now instead of raising
        # lam 19 more times to LAM_MAX (which took lanes from ~5 to ~25 steps).
        settled = (~acc & ~conv & (gn_size < XTOL_STALL)) | tiny
        pick = lambda new, old: jnp.where(acc, new, old)  # noqa: E731
        return _LMState(
            pick(p_new, st.p),
            pick(chi2_new, st.chi2),
            pick(r_new, st.r),
            pick(a_new, st.a),
            pick(g_new, st.g),
            lam,
            st.it + (~conv).astype(jnp.int32),
            conv | stalled | settled,
            conv | settled | (stalled & (gn_size < XTOL_STALL)),
        )

    def run(_):
        st = jax.lax.while_loop(
            lambda st: ~st.done & (st.it < max_iter), body, start(None)
        )
        return st.p, st.chi2, st.it, st.conv, st.a, st.g

    def dead(_):
        zero = jnp.zeros((), p0.dtype)
        return (
            p0, zero, jnp.zeros((), jnp.int32), jnp.zeros((), bool),
            jnp.zeros((k, k), p0.dtype), jnp.zeros(k, p0.dtype),
        )  # fmt: skip

    return jax.lax.cond(alive, run, dead, None)


def _lm_lanes(obs, p0, star, alive, flux, w, lo, hi, free, max_iter):
    """:func:`_lm_one` for N lanes; returns (p, chi2, n_iter, converged, A, g).

    ``p0``, ``lo``, ``hi`` (N, k): start and box of each lane; ``star`` (N,): the row
    of ``flux``, ``w`` (n, P) it fits; ``alive`` (N,) False for lanes not to run.

    On CPU the lanes run one after the other (``lax.map``), each to its own end:
    this is the per-star early stopping inside a batch (a lane that stops, or never
    starts, costs nothing more), and one lane's state (a few (k, P) arrays) stays in
    cache. An earlier lock-step form (all lanes step together, the loop runs until
    the slowest lane stops, with (N, P) residuals carried through every step) spent
    half of its time on the lanes that had stopped. On GPUs and TPUs the lanes are
    vmapped (:data:`SEQUENTIAL_LANES`): the while loop runs in lock step and stopped
    lanes are computed and discarded, which a wide device prefers.
    """
    sw = jnp.sqrt(w)
    if obs.jet is not None:  # the layout of the fast normal equations
        flux, sw = embed_obs(obs, flux), embed_obs(obs, sw)

    def one(args):
        q, i, go, l, h = args
        return _lm_one(obs, q, go, flux[i], sw[i], l, h, free, max_iter)

    return _over(one, (p0, star, alive, lo, hi))


@functools.partial(
    jax.jit, static_argnames=("max_iter",), compiler_options=KERNEL_COMPILER_OPTIONS
)
def _lm_batch(obs, p0, alive, flux, w, lo, hi, free, *, max_iter):
    """LM over stars (axis 0) and starting points (axis 1 of ``p0`` (n, S, k)).

    The n * S (star, start) pairs are the lanes of :func:`_lm_lanes`; ``alive`` (n, S)
    says which to run; results come back as (n, S, ...).
    """
    n, n_s, k = p0.shape
    star = jnp.repeat(jnp.arange(n), n_s)
    rep = lambda b: jnp.repeat(b, n_s, axis=0)  # noqa: E731
    # Looked up at trace time, so a test can count traces by patching ``_lm_lanes``.
    p, chi2, it, conv, a, g = _lm_lanes_dispatch(
        obs,
        p0.reshape(n * n_s, k),
        star,
        alive.reshape(n * n_s),
        flux,
        w,
        rep(lo),
        rep(hi),
        free,
        max_iter,
    )
    return (
        p.reshape(n, n_s, k),
        chi2.reshape(n, n_s),
        it.reshape(n, n_s),
        conv.reshape(n, n_s),
        a.reshape(n, n_s, k, k),
        g.reshape(n, n_s, k),
    )


def _lm_lanes_dispatch(*args):
    return _lm_lanes(*args)


@jax.jit
def _final_batch(obs, p, flux, w):
    """chi2 (n,), J^T W J (n, k, k), J^T W r (n, k) and model flux (n, P) at the
    best fits."""

    def one(args):
        p, flux, w = args
        sw = jnp.sqrt(w)
        f, _, jac = observe_jac_t(obs, p)
        jw = jac * sw
        r = sw * (f - flux)
        return r @ r, jw @ jw.T, jw @ r, f

    return _over(one, (p, flux, w))


@jax.jit
def _model_batch(obs, p):
    """Model flux (n, P) at parameters ``p`` (n, k)."""
    return _over(lambda q: observe(obs, q)[0], p)


@jax.jit
def _model_one(obs, p):
    return observe(obs, p)[0]


@jax.jit
def _jac_one(obs, p):
    return observe_jac_t(obs, p)[2].T


# CPU executables of the per-star loops compiled without XLA's intra-op task
# splitting (payne_lite._serial: 1.5x faster LM here); the lane mode is in the key.
_scan_batch = serial_jit(_scan_batch, ("common",), key=_sequential_lanes)
_chi2_batch = serial_jit(_chi2_batch, key=_sequential_lanes)
_window_batch = serial_jit(_window_batch, key=_sequential_lanes)
_lm_batch = serial_jit(_lm_batch, ("max_iter",), key=_sequential_lanes)
_final_batch = serial_jit(_final_batch, key=_sequential_lanes)
_model_batch = serial_jit(_model_batch, key=_sequential_lanes)


# --------------------------------------------------------------------------------------
# NumPy boundary
# --------------------------------------------------------------------------------------
def _check_inputs(flux, flux_err, mask, n_pix):
    """(flux, ivar) as (n, P) float64 copies; bad pixels get ivar = 0."""
    f = as_float_array(flux, "flux", ndim=(1, 2))
    e = as_float_array(flux_err, "flux_err", ndim=(1, 2))
    if f.shape != e.shape:
        raise ValueError(
            f"flux {f.shape} and flux_err {e.shape} must have the same shape, "
            f"(n_spec, {n_pix}) or ({n_pix},)"
        )
    if f.shape[-1] != n_pix:
        raise ValueError(
            f"flux {f.shape} has {f.shape[-1]} pixels, the wavelength grid has "
            f"{n_pix}: expected (n_spec, {n_pix}) or ({n_pix},)"
        )
    f2 = np.atleast_2d(f)
    e2 = np.atleast_2d(e)
    if f2.shape[0] == 0:
        raise ValueError(f"flux {f.shape} holds no spectra")
    bad = ~np.isfinite(f2) | ~np.isfinite(e2) | ~(e2 > 0)
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype != bool:
            raise ValueError(f"mask must be boolean (True = ignore), got {m.dtype}")
        if m.shape not in ((n_pix,), f.shape, f2.shape):
            raise ValueError(
                f"mask {m.shape} must be ({n_pix},) or the shape of flux {f.shape}"
            )
        bad = bad | np.broadcast_to(m, f2.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        ivar = np.where(bad, 0.0, 1.0 / e2**2)
    f2 = np.where(bad, 0.0, f2)  # garbage in ignored pixels must not reach the model
    return f2, ivar


def _teff_index(names) -> int:
    for i, n in enumerate(names):
        if n.lower().replace("_", "") in ("teff", "t", "temperature"):
            return i
    return 0


def _check_fixed(fixed, emulator, rv_range):
    """{name: value} -> {index: value in fit space}; unknown names refused."""
    if not fixed:
        return {}
    valid = (*emulator.label_names, "rv")
    out = {}
    for name, value in dict(fixed).items():
        if name not in valid:
            raise ValueError(
                f"fixed: unknown parameter {name!r}; valid names are {list(valid)}"
            )
        v = float(value)
        if not np.isfinite(v):
            raise ValueError(f"fixed: {name} = {value!r} is not finite")
        if name == "rv":
            if not rv_range[0] <= v <= rv_range[1]:
                raise ValueError(
                    f"fixed: rv = {v:g} km/s is outside rv_range {rv_range}"
                )
            out[emulator.n_labels] = v
        else:
            j = emulator.label_names.index(name)
            lo, hi = emulator.label_lo[j], emulator.label_hi[j]
            if not lo <= v <= hi:
                raise ValueError(
                    f"fixed: {name} = {v:g} is outside the training box [{lo:g}, {hi:g}]"
                )
            out[j] = (v - lo) / (hi - lo) - 0.5
    return out


def _curve_fit_one(obs, p_starts, flux, w, lo, hi, free, max_iter):
    """scipy curve_fit (trf) from each start; best (p, chi2, nfev, converged)."""
    from scipy.optimize import curve_fit

    good = np.flatnonzero(w > 0)
    sigma = 1.0 / np.sqrt(w[good])
    idx = np.flatnonzero(free)
    best = None
    for start in p_starts:
        base = start.copy()

        def full(q, base=base):
            p = base.copy()
            p[idx] = q
            return jnp.asarray(p, dtype=obs.x_obs.dtype)

        def f(_x, *q, base=base):
            return np.asarray(_model_one(obs, full(q, base)), dtype=np.float64)[good]

        def jac(_x, *q, base=base):
            j = np.asarray(_jac_one(obs, full(q, base)), dtype=np.float64)
            return j[np.ix_(good, idx)]

        x0 = np.clip(start[idx], lo[idx], hi[idx])
        popt, _, info, _, ier = curve_fit(
            f,
            good,
            flux[good],
            p0=x0,
            sigma=sigma,
            absolute_sigma=True,
            bounds=(lo[idx], hi[idx]),
            method="trf",
            jac=jac,
            full_output=True,
            max_nfev=max_iter,
        )
        p = base.copy()
        p[idx] = popt
        chi2 = float(np.sum(info["fvec"] ** 2))
        if best is None or chi2 < best[1]:
            best = (p, chi2, int(info["nfev"]), ier > 0)
    return best


class _BatchContext(NamedTuple):
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
    max_iter: int
    return_model: bool
    emulator_error: tuple | None  # (wave_rest, wave_obs, pixel_error) or None


def emulator_error_on(wave_obs, wave_rest, pixel_error, rv) -> np.ndarray:
    """The emulator's per-pixel error (on its rest grid) at each star's observed pixels.

    Observed pixel ``lambda`` sees the rest-frame model at ``lambda / f(rv)``
    (relativistic Doppler factor), so the error is interpolated there (linearly; 0
    off the rest grid, where the pixel has no model anyway).

    Args:
        wave_obs: (P_obs,) observed wavelength [A]; wave_rest, pixel_error: (P_rest,).
        rv: (n,) radial velocity of each star [km/s].

    Returns:
        (n, P_obs) emulator error, to add in quadrature to the flux errors.
    """
    beta = np.asarray(rv, np.float64) / C_KMS
    inv_f = np.sqrt((1.0 - beta) / (1.0 + beta))
    lam = np.asarray(wave_obs, np.float64)[None, :] * inv_f[:, None]
    return np.stack(
        [np.interp(row, wave_rest, pixel_error, left=0.0, right=0.0) for row in lam]
    )


def _scan_pixels(obs: ObsModel, rv_range) -> np.ndarray | None:
    """Pixels valid at every RV of the scan, when they are at least SCAN_COMMON_MIN
    of the pixels (for APOGEE and +-500 km/s: 90 %); else None (chi2 per pixel over
    each RV's own pixel set)."""
    dt = obs.x_obs.dtype
    ok = np.asarray(
        window_valid(obs, jnp.asarray(rv_range[0], dt), jnp.asarray(rv_range[1], dt))
    )
    return ok if ok.mean() >= SCAN_COMMON_MIN else None


def _default_threads() -> int:
    """Batches fitted at once: one per CPU core on the CPU backend, else one."""
    if jax.default_backend() != "cpu":
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _lm_with_starts(ctx, p_start, alive, f_j, w_j, lo, hi, n_good):
    """LM from the best-screened start; the other starts only for doubtful fits.

    1. Screening: chi2 at every start (the model only, no Jacobian: ~1/5 of an LM
       step), ranked per star.
    2. LM from each star's best start, to convergence.
    3. Rescue: a star whose fit did not converge, stopped at an edge of the training
       box, or has ``chi2 > ndof + RESCUE_SIGMA sqrt(2 ndof)`` (more than noise can
       explain) is fitted again from each of its other starts, and the lowest chi2
       is kept.

    Measured on 512 noisy spectra of the real APOGEE network (S/N 100 and 30), the
    best of three starts after 8 steps was never more than chi2 + 1 below the centre
    start's: running all starts for every star spent 2/3 of the LM on insurance
    that did not pay. On data the emulator does not fit to the noise (real spectra,
    chi2_red of a few), every star is rescued, i.e. fitted from every start, as
    before.
    """
    obs, free = ctx.obs, ctx.free
    dt = obs.x_obs.dtype
    size, n_s, _ = p_start.shape
    rows = np.arange(size)
    bounds = (jnp.asarray(lo, dt), jnp.asarray(hi, dt), jnp.asarray(free))
    if n_s > 1:
        c0 = np.asarray(_chi2_batch(obs, jnp.asarray(p_start, dt), f_j, w_j))
        order = np.argsort(np.where(np.isfinite(c0), c0, np.inf), axis=1, kind="stable")
        p_start = p_start[rows[:, None], order]
    p, chi2, it, conv, a, g = _lm_batch(
        obs,
        jnp.asarray(p_start[:, :1], dt),
        jnp.asarray(alive[:, None]),
        f_j,
        w_j,
        *bounds,
        max_iter=ctx.max_iter,
    )
    p_best = np.array(p, np.float64)[:, 0]
    chi2_best = np.where(np.isfinite(chi2[:, 0]), np.asarray(chi2[:, 0]), np.inf)
    it_best = np.array(it)[:, 0].astype(np.int64)
    conv_best = np.array(conv)[:, 0]
    a_best = np.array(a, np.float64)[:, 0]
    g_best = np.array(g, np.float64)[:, 0]
    if n_s == 1:
        return p_best, it_best, conv_best, chi2_best, a_best, g_best
    n_lab = ctx.layout.n_labels
    ndof = np.maximum(n_good - int(free.sum()), 1)
    at_edge = np.any(
        free[:n_lab] & (np.abs(np.abs(p_best[:, :n_lab]) - 0.5) < AT_BOUND_TOL[0]),
        axis=1,
    )
    doubtful = (
        ~conv_best | at_edge | (chi2_best > ndof + RESCUE_SIGMA * np.sqrt(2 * ndof))
    )
    again = alive & doubtful
    if again.any():
        p2, chi2_2, it2, conv2, a2, g2 = _lm_batch(
            obs,
            jnp.asarray(p_start[:, 1:], dt),
            jnp.asarray(np.repeat(again[:, None], n_s - 1, axis=1)),
            f_j,
            w_j,
            *bounds,
            max_iter=ctx.max_iter,
        )
        chi2_2 = np.where(np.isfinite(chi2_2), np.asarray(chi2_2), np.inf)
        j = np.argmin(chi2_2, axis=1)
        better = again & (chi2_2[rows, j] < chi2_best)
        p_best[better] = np.asarray(p2, np.float64)[rows, j][better]
        it_best[better] = np.asarray(it2)[rows, j][better]
        conv_best[better] = np.asarray(conv2)[rows, j][better]
        chi2_best[better] = chi2_2[rows, j][better]
        a_best[better] = np.asarray(a2, np.float64)[rows, j][better]
        g_best[better] = np.asarray(g2, np.float64)[rows, j][better]
    return p_best, it_best, conv_best, chi2_best, a_best, g_best


def _fit_batch(ctx: _BatchContext, fb, wb, sb, m, prior=None) -> dict:
    """Fit one padded batch: ``fb``, ``wb`` (size, P) flux and inverse variance,
    ``sb`` (size, S, L) scaled starting labels; rows from ``m`` on are padding.

    ``prior`` (the MDN path): dict of per-row ``lo``, ``hi`` (size, L) scaled label
    bounds and ``rv0``, ``rv_lo``, ``rv_hi`` (size,) [km/s]; then there is no RV
    scan (the continuum, if any, starts flat) and the labels are bounded by
    ``lo``/``hi`` instead of the box."""
    obs, layout, fix, free = ctx.obs, ctx.layout, ctx.fix, ctx.free
    dt = obs.x_obs.dtype
    size, n_pix = fb.shape
    n_lab = layout.n_labels
    k = len(layout.names)
    n_free = int(free.sum())
    rv_range = ctx.rv_range
    f_j = jnp.asarray(fb, dt)
    w_j = jnp.asarray(wb, dt)

    # 1. RV scan (and linear continuum at the best RV).
    if prior is not None:
        rv0 = np.asarray(prior["rv0"], np.float64)
        rv_lo = np.asarray(prior["rv_lo"], np.float64)
        rv_hi = np.asarray(prior["rv_hi"], np.float64)
        c0 = np.zeros((size, max(obs.n_cont, 1)))
        c0[:, 0] = 1.0
    elif layout.rv_index in fix:
        rv0 = np.full(size, fix[layout.rv_index])
        _, c0 = _scan_batch(obs, ctx.s_scan, jnp.asarray(rv0[:1], dt), f_j, w_j)
        rv_lo, rv_hi = rv0, rv0
    else:
        if ctx.scan_pixels is None:
            rv0, c0 = _scan_batch(obs, ctx.s_scan, ctx.rv_grid, f_j, w_j)
        else:
            w_scan = jnp.asarray(np.where(ctx.scan_pixels, wb, 0.0), dt)
            rv0, c0 = _scan_batch(
                obs, ctx.s_scan, ctx.rv_grid, f_j, w_scan, common=True
            )
        rv0 = np.asarray(rv0, np.float64)
        rv_lo = np.maximum(rv0 - RV_WINDOW, rv_range[0])
        rv_hi = np.minimum(rv0 + RV_WINDOW, rv_range[1])
    c0 = np.asarray(c0, np.float64)

    # 2. Pixels valid over the whole RV window carry the weight.
    valid = np.asarray(
        _window_batch(obs, jnp.asarray(rv_lo, dt), jnp.asarray(rv_hi, dt))
    )
    wb = np.where(valid, wb, 0.0)
    w_data = wb  # the observed errors alone (for the S/N column)
    if ctx.emulator_error is not None:
        wave_rest, wave_obs, pixel_error = ctx.emulator_error
        pe = emulator_error_on(wave_obs, wave_rest, pixel_error, rv0)
        with np.errstate(divide="ignore"):
            wb = np.where(wb > 0, 1.0 / (1.0 / wb + pe**2), 0.0)
    w_j = jnp.asarray(wb, dt)
    n_good = np.count_nonzero(wb > 0, axis=1)
    # Padding rows, and stars with too few pixels (flagged failed later), do not run.
    alive = (np.arange(size) < m) & (n_good > n_free)

    # 3. Starting parameter vectors (size, S, k) and per-star bounds (size, k).
    n_s = sb.shape[1]
    p_start = np.zeros((size, n_s, k))
    p_start[:, :, :n_lab] = sb
    p_start[:, :, n_lab] = rv0[:, None]
    if obs.n_cont:
        p_start[:, :, layout.cont_slice] = c0[:, None, :]
    lo = np.broadcast_to(layout.lower, (size, k)).copy()
    hi = np.broadcast_to(layout.upper, (size, k)).copy()
    lo[:, n_lab], hi[:, n_lab] = rv_lo, rv_hi
    if prior is not None:
        lo[:, :n_lab], hi[:, :n_lab] = prior["lo"], prior["hi"]
    p_start = np.clip(p_start, lo[:, None], hi[:, None])

    model_f = None
    if ctx.method == "lm":
        # chi2, J^T W J and J^T W r at each fit come from its last LM evaluation
        p_best, it_best, conv_best, chi2_f, a_f, g_f = _lm_with_starts(
            ctx, p_start, alive, f_j, w_j, lo, hi, n_good
        )
        if ctx.return_model:
            model_f = _model_batch(obs, jnp.asarray(p_best, dt))
    else:
        p_best = p_start[:, 0].copy()
        it_best = np.zeros(size, np.int64)
        conv_best = np.zeros(size, bool)
        for i in np.flatnonzero(alive):
            p_i, _, it_i, conv_i = _curve_fit_one(
                obs, p_start[i], fb[i], wb[i], lo[i], hi[i], free, ctx.max_iter
            )
            p_best[i], it_best[i], conv_best[i] = p_i, it_i, conv_i
        chi2_f, a_f, g_f, model_f = _final_batch(obs, jnp.asarray(p_best, dt), f_j, w_j)
    # median S/N of the pixels that carry weight, |flux| / error (sorted rows, the
    # unused pixels as +inf at the end: 10x faster than nanmedian row by row)
    snr = np.where(wb > 0, np.sqrt(w_data) * np.abs(fb), np.inf).astype(np.float32)
    snr.sort(axis=1)
    cnt = np.count_nonzero(wb > 0, axis=1)
    rows = np.arange(size)
    lo_i, hi_i = np.maximum(cnt - 1, 0) // 2, np.minimum(cnt // 2, n_pix - 1)
    snr = np.where(cnt > 0, 0.5 * (snr[rows, lo_i] + snr[rows, hi_i]), 0.0)
    snr = snr.astype(np.float64)
    return dict(
        p=p_best,
        chi2=np.asarray(chi2_f, np.float64),
        a=np.asarray(a_f, np.float64),
        g=np.asarray(g_f, np.float64),
        snr=snr,
        it=it_best,
        conv=conv_best,
        n_good=n_good,
        rv_lo=rv_lo,
        rv_hi=rv_hi,
        lo=lo,
        hi=hi,
        model=None if model_f is None else np.asarray(model_f, np.float64),
    )


def fit(
    flux,
    flux_err,
    emulator: Emulator,
    *,
    mask=None,
    wavelength=None,
    method: str = "lm",
    cont_deg: int = 0,
    rv_range=(-500.0, 500.0),
    p0=None,
    fixed=None,
    max_iter: int = 100,
    seed: int = 0,
    return_model: bool = False,
    batch_size: int = 256,
    n_threads: int | None = None,
    scale_errors: bool = False,
    emulator_error: bool = True,
    progress: bool = False,
    mdn=None,
    mdn_starts: int = 0,
):
    """Fit labels, radial velocity and (optionally) a continuum to observed spectra.

    Args:
        flux: (n, P) or (P,) observed flux on ``wavelength``.
        flux_err: same shape, 1-sigma errors; non-finite or non-positive errors (and
            non-finite flux) give that pixel zero weight.
        emulator: the rest-frame spectrum emulator.
        mask: optional bool (P,) or (n, P), True = ignore the pixel.
        wavelength: (P,) observed wavelength [A]; None = the emulator's grid.
        method: ``"lm"`` (batched Levenberg-Marquardt in JAX, see :func:`_lm_lanes` for
            damping and stopping rules) or ``"curve_fit"`` (scipy, trf, JAX Jacobian);
            ``"emcee"``, ``"mdn-is"`` or ``"nuts"`` return posterior summaries from
            :func:`payne_lite.posterior.sample` (box prior, LM-ball start; call it
            directly for its other options).
        cont_deg: degree of the multiplicative Chebyshev continuum (0 = none).
        rv_range: (lo, hi) [km/s] searched by the RV scan and bounding the fit.
        p0: optional starting labels [physical], (L,) or (n, L); replaces the Teff
            starts. A 1-D ``p0`` is also the RV-scan template (else the box centre).
        fixed: ``{name: value}`` holds labels [physical] or ``"rv"`` [km/s] fixed.
        max_iter: LM iterations (curve_fit: function evaluations) per start.
        seed: seeds the random starts of ``mdn_starts`` (the default starts are a
            fixed Teff grid).
        return_model: add a ``model_flux`` (n, P) column with the best-fit spectra.
        batch_size: spectra per jitted call; batches are padded to a power of two
            (at least 8) up to this, so similar batch sizes share one compilation.
        n_threads: batches fitted at once, in threads (JAX releases the GIL while a
            batch runs). Default: the number of CPU cores for ``"lm"`` on the CPU
            backend, else 1. Results do not depend on it.
        scale_errors: multiply each covariance by its reduced chi2 when that is
            above 1 (see the module docstring); recorded in the table's meta.
        emulator_error: add the emulator's own per-pixel error (``pixel_error``,
            measured on held-out spectra when it was trained; shifted to each
            star's RV from the scan) in quadrature to the flux errors, when the
            emulator has one (emulators imported from The Payne have none).
        progress: show a tqdm progress bar over spectra.
        mdn: a :class:`payne_lite.MDN` trained for ``emulator``: its means start and
            its +- 3 sigma intervals bound each fit, with a fallback to the default
            path (see the module docstring). Not together with ``p0``; the spectra
            must be on the MDN's (the emulator's) wavelength grid.
        mdn_starts: with ``mdn``, this many extra starting points per star drawn
            from the MDN's Gaussian (mean, sigma) within its +- 3 sigma bounds; as
            with the default starts, all are screened by chi2, LM runs from the
            best, and the others only when that fit is doubtful.

    Returns:
        astropy Table, one row per spectrum: ``<label>``, ``<label>_err`` [label
        units], ``rv``, ``rv_err`` [km/s], ``cont_<k>``, ``cont_<k>_err`` (if
        ``cont_deg > 0``), ``chi2``, ``chi2_red``, ``n_good_pixels``, ``n_iter``,
        ``converged``, ``flags`` (bitmask, see the module docstring) and
        ``covariance`` (n, k, k) in physical units over ``meta["cov_params"]``,
        ``snr`` (median S/N of the used pixels). Errors are not rescaled by
        ``chi2_red`` unless ``scale_errors``. With an MDN also ``<label>_mdn``,
        ``<label>_mdn_sigma``, ``rv_mdn``, ``rv_mdn_sigma`` and ``mdn_refit``, and
        ``meta["mdn_seconds"]``.

    Raises:
        ValueError: shapes that do not fit together (named in the message), an unknown
            method or fixed parameter, a bad ``rv_range``, ``p0`` outside the box,
            ``p0`` with ``mdn``, an MDN trained for another emulator or grid.
    """
    if method in SAMPLERS:
        # posteriors: payne_lite.posterior.sample with the same model and options
        from .posterior import sample

        if p0 is not None or mdn_starts or return_model or scale_errors:
            raise ValueError(
                f"method={method!r}: p0, mdn_starts, return_model and scale_errors "
                "are LM options; see payne_lite.sample for the samplers' options"
            )
        return sample(
            flux, flux_err, emulator, method=method, mask=mask, wavelength=wavelength,
            mdn=mdn, cont_deg=cont_deg, rv_range=rv_range, fixed=fixed, seed=seed,
            emulator_error=emulator_error, progress=progress,
        )  # fmt: skip
    if method not in METHODS:
        raise ValueError(
            f"method must be one of {METHODS + SAMPLERS}, got {method!r}"
        )
    if isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter <= 0:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    rv_range = tuple(float(v) for v in rv_range)
    if len(rv_range) != 2 or not (
        np.all(np.isfinite(rv_range)) and rv_range[0] < rv_range[1]
    ):
        raise ValueError(f"rv_range must be (lo, hi) with lo < hi, got {rv_range}")
    if isinstance(mdn_starts, bool) or int(mdn_starts) != mdn_starts or mdn_starts < 0:
        raise ValueError(f"mdn_starts must be an int >= 0, got {mdn_starts!r}")
    if mdn_starts and mdn is None:
        raise ValueError("mdn_starts needs an mdn")
    if mdn is not None:
        if p0 is not None:
            raise ValueError("pass p0 or mdn, not both (the MDN sets the starts)")
        mdn.check_emulator(emulator)
        if wavelength is not None:
            mdn.check_wavelength(wavelength)
    obs = build_obs_model(
        emulator,
        wavelength=wavelength,
        cont_deg=cont_deg,
        rv_max=max(abs(v) for v in rv_range),
    )
    layout = param_layout(emulator, cont_deg=cont_deg, rv_range=rv_range)
    n_pix = obs.x_obs.shape[0]
    flux2, ivar = _check_inputs(flux, flux_err, mask, n_pix)
    n = flux2.shape[0]
    n_lab = emulator.n_labels
    k = len(layout.names)
    fix = _check_fixed(fixed, emulator, rv_range)
    free = np.ones(k, bool)
    for j in fix:
        free[j] = False

    # Starting labels (scaled), one row per start: (S, L) shared or (n, 1, L).
    if p0 is not None:
        p0_arr = emulator.check_labels(p0)
        if p0_arr.shape[0] not in (1, n):
            raise ValueError(f"p0 {np.shape(p0)} must be ({n_lab},) or ({n}, {n_lab})")
        starts = np.broadcast_to(emulator.scale(p0_arr), (n, n_lab))[:, None, :]
        s_scan = emulator.scale(p0_arr[0]) if p0_arr.shape[0] == 1 else np.zeros(n_lab)
    else:
        starts = np.zeros((len(TEFF_STARTS), n_lab))
        starts[:, _teff_index(emulator.label_names)] = TEFF_STARTS
        starts = np.broadcast_to(starts, (n, *starts.shape))
        s_scan = np.zeros(n_lab)
    starts = np.array(starts, dtype=np.float64)
    for j, v in fix.items():
        if j < n_lab:
            starts[:, :, j] = v
            s_scan[j] = v

    dt = obs.x_obs.dtype
    n_steps = int(np.ceil((rv_range[1] - rv_range[0]) / RV_SCAN_STEP))
    ctx = _BatchContext(
        obs=obs,
        layout=layout,
        fix=fix,
        free=free,
        method=method,
        rv_range=rv_range,
        rv_grid=jnp.asarray(np.linspace(rv_range[0], rv_range[1], n_steps + 1), dt),
        scan_pixels=_scan_pixels(obs, rv_range),
        s_scan=jnp.asarray(s_scan, dt),
        max_iter=int(max_iter),
        return_model=bool(return_model),
        emulator_error=(
            (
                np.asarray(emulator.wavelength, np.float64),
                np.asarray(
                    emulator.wavelength if wavelength is None else wavelength,
                    np.float64,
                ),
                np.asarray(emulator.pixel_error, np.float64),
            )
            if emulator_error and emulator.pixel_error is not None
            else None
        ),
    )
    if n_threads is None:
        n_threads = _default_threads() if method == "lm" else 1
    if isinstance(n_threads, bool) or int(n_threads) != n_threads or n_threads < 1:
        raise ValueError(f"n_threads must be a positive int, got {n_threads!r}")
    # Batches of a power of two (>= 8) spectra, so that similar sizes share one
    # compilation; small catalogs are split so that every thread gets a batch.
    per_thread = -(-n // int(n_threads))
    size = min(batch_size, max(8, 1 << int(np.ceil(np.log2(per_thread)))))

    rows_all = np.arange(n)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="fit", unit="spectrum")
    t_mdn = 0.0
    try:
        if mdn is None:
            res = _run_batches(ctx, flux2, ivar, starts, rows_all, size, n_threads, bar)
        else:
            t0 = time.perf_counter()
            prior, mdn_ok, mdn_mean, mdn_sigma = _mdn_prior(
                mdn, emulator, flux2, ivar, starts[:, 0], fix, rv_range
            )
            t_mdn = time.perf_counter() - t0
            res = _run_batches(
                ctx,
                flux2,
                ivar,
                _mdn_start_points(prior, int(mdn_starts), fix, seed),
                rows_all,
                size,
                n_threads,
                None,
                prior=prior,
            )
            refit = ~mdn_ok | _at_mdn_bound(res, prior, free, layout, rv_range)
            refit |= ~np.all(np.isfinite(res["p"]), axis=1) | ~np.isfinite(res["chi2"])
            rows = np.flatnonzero(refit)
            if rows.size:
                # batches sized for the stars refitted (a few %), not for all
                per = -(-rows.size // int(n_threads))
                size2 = min(size, max(8, 1 << int(np.ceil(np.log2(per)))))
                res2 = _run_batches(
                    ctx, flux2, ivar, starts, rows, size2, n_threads, None
                )
                first_it = res["it"][rows]
                better = (
                    ~np.isfinite(res["chi2"][rows])
                    | (res2["chi2"] < res["chi2"][rows])
                    | ~mdn_ok[rows]
                )
                for key, val in res2.items():
                    if val is not None:
                        res[key][rows[better]] = val[better]
                res["it"][rows] = first_it + res2["it"]  # the work done, both passes
            if bar is not None:
                bar.update(n)
    finally:
        if bar is not None:
            bar.close()

    t = _results_table(
        emulator,
        layout,
        obs,
        free,
        res["p"],
        res["chi2"],
        res["a"],
        res["g"],
        res["snr"],
        res["it"],
        res["conv"],
        res["n_good"],
        res["rv_lo"],
        res["rv_hi"],
        res["model"],
        method=method,
        rv_range=rv_range,
        scale_errors=scale_errors,
        emulator_error_used=ctx.emulator_error is not None,
    )
    if mdn is not None:
        _add_mdn_columns(t, layout, mdn_mean, mdn_sigma, refit, mdn_ok)
        t.meta.update(mdn_seconds=round(t_mdn, 4), mdn_n_components=mdn.n_components)
    return t


def _run_batches(ctx, flux2, ivar, starts, rows, size, n_threads, bar, prior=None):
    """Fit the spectra ``rows`` in padded batches of ``size``, ``n_threads`` at a time.

    Returns a dict of per-row arrays (``p``, ``chi2``, ``a``, ``g``, ``snr``, ``it``,
    ``conv``, ``n_good``, ``rv_lo``, ``rv_hi``, ``model`` or None) in the order of
    ``rows``; ``starts`` and ``prior`` are indexed by spectrum.
    """
    n = rows.size
    out_all: dict = {}

    def run(start):
        sel = rows[start : min(start + size, n)]
        m = sel.size
        pad = size - m
        idx = np.concatenate([sel, np.repeat(sel[:1], pad)])
        fb = flux2[idx]
        wb = ivar[idx]
        wb[m:] = 0.0
        pb = None if prior is None else {k: v[idx] for k, v in prior.items()}
        return start, m, _fit_batch(ctx, fb, wb, starts[idx], m, prior=pb)

    starts_at = range(0, n, size)
    pool = None
    if n_threads > 1 and len(starts_at) > 1:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(min(int(n_threads), len(starts_at)))
    try:
        # JAX releases the GIL while a program runs: one batch per thread keeps every
        # core busy (the LM runs its lanes one after the other, on one core).
        done = pool.map(run, starts_at) if pool is not None else map(run, starts_at)
        for start, m, out in done:
            for key in _RESULT_KEYS:
                val = out[key]
                if val is None:
                    out_all[key] = None
                    continue
                if key not in out_all:
                    out_all[key] = np.zeros((n, *val.shape[1:]), val.dtype)
                out_all[key][start : start + m] = val[:m]
            if bar is not None:
                bar.update(m)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if n == 0:
        return {key: None for key in _RESULT_KEYS}
    return out_all


_RESULT_KEYS = (
    "p",
    "chi2",
    "a",
    "g",
    "snr",
    "it",
    "conv",
    "n_good",
    "rv_lo",
    "rv_hi",
    "lo",
    "hi",
    "model",
)


def _mdn_prior(mdn, emulator, flux2, ivar, s_default, fix, rv_range):
    """Starts and bounds (fit space) from the MDN: mean clipped into the box, mean +-
    ``MDN_NSIGMA`` sigma intersected with the box (and ``rv_range``).

    Returns ``(prior, ok, mean, sigma)``: ``prior`` a dict of per-spectrum arrays
    (``s0``, ``lo``, ``hi`` (n, L) scaled; ``rv0``, ``rv_lo``, ``rv_hi`` (n,)
    [km/s]); ``ok`` (n,) False where the MDN gave no usable answer (non-finite, or
    an empty interval); those rows fall back to the default starts.
    """
    n_lab = emulator.n_labels
    with np.errstate(divide="ignore"):
        err = np.where(ivar > 0, 1.0 / np.sqrt(ivar), np.inf)
    mean, sigma = mdn.predict(flux2, err, mask=~(ivar > 0))
    span = emulator.label_hi - emulator.label_lo
    s_m = (mean[:, :n_lab] - emulator.label_lo) / span - 0.5
    s_sd = sigma[:, :n_lab] / span
    ok = np.all(np.isfinite(mean) & np.isfinite(sigma), axis=1)
    s_m = np.where(np.isfinite(s_m), s_m, 0.0)
    s_sd = np.where(np.isfinite(s_sd), s_sd, 1.0)
    lo = np.clip(s_m - MDN_NSIGMA * s_sd, -LABEL_BOUND, LABEL_BOUND)
    hi = np.clip(s_m + MDN_NSIGMA * s_sd, -LABEL_BOUND, LABEL_BOUND)
    ok &= np.all(hi - lo > AT_BOUND_TOL[0], axis=1)
    s0 = np.clip(s_m, lo, hi)
    rv_m = np.where(np.isfinite(mean[:, n_lab]), mean[:, n_lab], 0.0)
    rv_sd = np.where(np.isfinite(sigma[:, n_lab]), sigma[:, n_lab], 1.0)
    rv_lo = np.clip(rv_m - MDN_NSIGMA * rv_sd, *rv_range)
    rv_hi = np.clip(rv_m + MDN_NSIGMA * rv_sd, *rv_range)
    ok &= rv_hi - rv_lo > AT_BOUND_TOL[1]
    rv0 = np.clip(rv_m, rv_lo, rv_hi)
    for j, v in fix.items():
        if j < n_lab:
            s0[:, j], lo[:, j], hi[:, j] = v, -LABEL_BOUND, LABEL_BOUND
        else:
            rv0[:], rv_lo[:], rv_hi[:] = v, v, v
    # rows the MDN cannot inform: the default start, never used (they are refitted)
    s0 = np.where(ok[:, None], s0, s_default)
    prior = dict(s0=s0, sd=s_sd, lo=lo, hi=hi, rv0=rv0, rv_lo=rv_lo, rv_hi=rv_hi)
    return prior, ok, mean, sigma


def _mdn_start_points(prior, n_extra: int, fix, seed) -> np.ndarray:
    """Starts (n, 1 + n_extra, L) [scaled]: the MDN mean, then ``n_extra`` draws
    from its Gaussian clipped into the MDN bounds (fixed labels at their value)."""
    s0 = prior["s0"][:, None, :]
    if n_extra == 0:
        return s0
    rng = np.random.default_rng(seed)
    draws = s0 + prior["sd"][:, None, :] * rng.standard_normal(
        (s0.shape[0], n_extra, s0.shape[2])
    )
    draws = np.clip(draws, prior["lo"][:, None, :], prior["hi"][:, None, :])
    for j in fix:
        if j < s0.shape[2]:
            draws[:, :, j] = s0[:, :, j]
    return np.concatenate([s0, draws], axis=1)


def _at_mdn_bound(res, prior, free, layout, rv_range):
    """(n,) True where a free parameter ended at an MDN bound that is not the box's
    (or ``rv_range``'s) edge: the fit wanted to leave the MDN's interval."""
    n_lab = layout.n_labels
    tol_s, tol_rv = AT_BOUND_TOL
    p = res["p"]
    out = np.zeros(p.shape[0], bool)
    for j in range(n_lab):
        if not free[j]:
            continue
        lo, hi = prior["lo"][:, j], prior["hi"][:, j]
        out |= (np.abs(p[:, j] - lo) < tol_s) & (lo > -LABEL_BOUND + tol_s)
        out |= (np.abs(p[:, j] - hi) < tol_s) & (hi < LABEL_BOUND - tol_s)
    if free[n_lab]:
        lo, hi = prior["rv_lo"], prior["rv_hi"]
        out |= (np.abs(p[:, n_lab] - lo) < tol_rv) & (lo > rv_range[0] + tol_rv)
        out |= (np.abs(p[:, n_lab] - hi) < tol_rv) & (hi < rv_range[1] - tol_rv)
    return out


def _add_mdn_columns(t, layout, mean, sigma, refit, ok):
    """``<name>_mdn``, ``<name>_mdn_sigma`` for labels and rv, ``mdn_refit``, and the
    MDN-disagreement QA bit (see ``FLAG_MDN_DISAGREE``)."""
    names = layout.names[: layout.n_labels + 1]
    far = np.zeros(len(t), bool)
    for j, name in enumerate(names):
        unit = t[name].unit
        t[f"{name}_mdn"] = mean[:, j]
        t[f"{name}_mdn_sigma"] = sigma[:, j]
        if unit is not None:
            t[f"{name}_mdn"].unit = unit
            t[f"{name}_mdn_sigma"].unit = unit
        with np.errstate(invalid="ignore"):
            far |= (
                np.abs(np.asarray(t[name]) - mean[:, j]) > MDN_FLAG_NSIGMA * sigma[:, j]
            )
    failed = (np.asarray(t["flags"]) & FLAG_FAILED) > 0
    t["flags"] = np.asarray(t["flags"]) | np.where(
        far & ok & ~failed, FLAG_MDN_DISAGREE, 0
    ).astype(np.int32)
    t["flags"].description = "QA bitmask, see meta['flag_bits']"
    t["mdn_refit"] = refit
    t["mdn_refit"].description = (
        "refitted from the default starts over the box: the MDN-bounded fit ended at "
        "an MDN bound, or was NaN, or the MDN gave no answer"
    )


def _covariance(a, free, dtype):
    """Covariance (n, k, k) in fit space from J^T W J, and an ill-conditioned flag.

    Inverted in the correlation form (Jacobi-scaled), all stars at once; a star whose
    matrix has a non-finite entry, a non-positive diagonal, or is singular gets NaN
    and the flag.
    """
    n, k, _ = a.shape
    cov = np.full((n, k, k), 0.0)
    idx = np.flatnonzero(free)
    limit = COND_LIMIT.get(np.dtype(dtype), 1e6)
    af = a[:, idx[:, None], idx[None, :]]
    d = np.diagonal(af, axis1=1, axis2=2)
    ok = np.all(np.isfinite(af), axis=(1, 2)) & np.all(d > 0, axis=1)
    s = 1.0 / np.sqrt(np.where(ok[:, None], d, 1.0))
    corr = np.where(
        ok[:, None, None], af * s[:, :, None] * s[:, None, :], np.eye(idx.size)
    )
    with np.errstate(all="ignore"):
        sv = np.linalg.svd(corr, compute_uv=False)
        cond = sv[:, 0] / sv[:, -1]
    ok &= sv[:, -1] > 0
    ci = np.full_like(corr, np.nan)
    if ok.any():
        try:
            ci[ok] = np.linalg.inv(corr[ok])
        except np.linalg.LinAlgError:  # a singular one among them: star by star
            for i in np.flatnonzero(ok):
                try:
                    ci[i] = np.linalg.inv(corr[i])
                except np.linalg.LinAlgError:
                    ok[i] = False
    ill = ~ok | ~(np.isfinite(cond) & (cond < limit))
    block = np.where(ok[:, None, None], ci * s[:, :, None] * s[:, None, :], np.nan)
    cov[:, idx[:, None], idx[None, :]] = block
    return cov, ill


def _results_table(
    emulator,
    layout,
    obs,
    free,
    p,
    chi2,
    a,
    g,
    snr,
    n_iter,
    conv,
    n_good,
    rv_lo,
    rv_hi,
    model_flux,
    *,
    method,
    rv_range,
    scale_errors=False,
    emulator_error_used=False,
):
    from astropy.table import Table

    n, k = p.shape
    n_lab = layout.n_labels
    n_free = int(free.sum())
    cov, ill = _covariance(a, free, obs.x_obs.dtype)
    # scaled -> physical: x = (s + 0.5) (hi - lo) + lo
    span = np.concatenate([emulator.label_hi - emulator.label_lo, np.ones(k - n_lab)])
    cov = cov * span[None, :, None] * span[None, None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        chi2_red = np.where(n_good > n_free, chi2 / (n_good - n_free), np.nan)
    if scale_errors:
        cov = cov * np.maximum(np.nan_to_num(chi2_red, nan=1.0), 1.0)[:, None, None]
    err = np.sqrt(np.clip(np.diagonal(cov, axis1=1, axis2=2), 0.0, None))
    err = np.where(np.isnan(np.diagonal(cov, axis1=1, axis2=2)), np.nan, err)
    phys = p.copy()
    phys[:, :n_lab] = emulator.unscale(p[:, :n_lab])

    failed = n_good <= n_free
    at_bound = np.zeros(n, bool)
    outside = np.zeros(n, bool)
    tol_s, tol_rv = AT_BOUND_TOL
    for j in range(n_lab):
        if free[j]:
            at_bound |= np.abs(np.abs(p[:, j]) - 0.5) < tol_s
            # at an edge with chi2 still falling outwards (g = J^T W r = chi2'/2)
            outside |= (p[:, j] > 0.5 - tol_s) & (g[:, j] < 0)
            outside |= (p[:, j] < -0.5 + tol_s) & (g[:, j] > 0)
    if free[n_lab]:
        at_bound |= (np.abs(p[:, n_lab] - rv_lo) < tol_rv) & (rv_lo > rv_range[0])
        at_bound |= (np.abs(p[:, n_lab] - rv_hi) < tol_rv) & (rv_hi < rv_range[1])
        at_bound |= np.abs(p[:, n_lab] - rv_range[0]) < tol_rv
        at_bound |= np.abs(p[:, n_lab] - rv_range[1]) < tol_rv
    conv = conv & ~failed
    flags = (
        np.where(conv, 0, FLAG_NOT_CONVERGED)
        | np.where(at_bound & ~failed, FLAG_AT_BOUND, 0)
        | np.where(failed, FLAG_FAILED, 0)
        | np.where(ill & ~failed, FLAG_ILL_CONDITIONED, 0)
        | np.where(outside & ~failed, FLAG_OUTSIDE_BOX, 0)
        | np.where((snr < LOW_SNR) & ~failed, FLAG_LOW_SNR, 0)
    ).astype(np.int32)
    phys[failed] = np.nan
    err[failed] = np.nan
    cov[failed] = np.nan
    chi2 = np.where(failed, np.nan, chi2)
    n_iter = np.where(failed, 0, n_iter)

    t = Table()
    units = list(emulator.label_units) + ["km/s"] + [""] * (k - n_lab - 1)
    for j, name in enumerate(layout.names):
        unit = units[j] or None
        t[name] = phys[:, j]
        t[f"{name}_err"] = err[:, j]
        if unit is not None:
            t[name].unit = unit
            t[f"{name}_err"].unit = unit
    t["chi2"] = chi2
    t["chi2_red"] = chi2_red
    t["n_good_pixels"] = n_good
    t["snr"] = snr
    t["n_iter"] = n_iter
    t["converged"] = conv
    t["flags"] = flags
    t["covariance"] = cov
    if model_flux is not None:
        t["model_flux"] = model_flux
    t["flags"].description = "QA bitmask, see meta['flag_bits']"
    t["covariance"].description = "covariance of meta['cov_params'], physical units"
    t["n_good_pixels"].description = "pixels with weight > 0 over the whole RV window"
    t["snr"].description = "median |flux| / error over those pixels"
    t.meta.update(
        label_names=list(emulator.label_names),
        label_units=list(emulator.label_units),
        emulator_source=str(
            emulator.meta.get("source", emulator.meta.get("trained_by", ""))
        ),
        n_pix_emulator=int(emulator.n_pix),
        method=method,
        cont_deg=layout.cont_deg,
        rv_range=list(rv_range),
        cov_params=list(layout.names),
        errors_scaled_by_chi2_red=bool(scale_errors),
        emulator_error_in_likelihood=emulator_error_used,
        flag_bits={str(b): s for b, s in FLAG_BITS.items()},
        fit_dtype=str(np.dtype(obs.x_obs.dtype)),
        reference="Ting et al. 2019, ApJ 879, 69 (The Payne)",
    )
    return t
