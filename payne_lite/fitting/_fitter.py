"""Fit observed spectra with an emulator: labels, radial velocity, continuum.

``fit(flux, flux_err, emulator, ...) -> astropy.table.Table``, one row per spectrum.

Steps, for a batch of spectra (the model is in :mod:`payne_lite.observe`):

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
   the flux errors (``emulator_error=True``, the default; :func:`emulator_error_on`);
   with an ``error_basis`` too, step 4 treats it as correlated across pixels.
4. Errors from the covariance ``(J^T W J)^-1`` at the best fit, transformed from
   scaled to physical label units; with the emulator's ``error_basis`` B and
   ``emulator_error=True``, the sandwich ``A^-1 (J^T W D W J + J^T W B_s^T B_s W J)
   A^-1`` (``A = J^T W J``, D the data variances, ``B_s`` the basis shifted to the
   star's rv: :func:`_sandwich_meat`). By default not rescaled (the errors are then
   right when the flux errors are right and the model fits: their coverage is
   checked in ``benchmarks/bench_fit.py``); ``scale_errors=True`` multiplies the
   covariance by the reduced chi2 when it is above 1 (never shrinks it), the usual
   remedy when flux errors are underestimated or the model does not fit.

Several visits of one star (``group=``): each spectrum gets steps 1-2 alone; then
the visits of a star are fitted together (step 3) with the parameter vector
``[s (L), rv_1 .. rv_V, c_1 .. c_V]`` (:func:`visit_index`): the normal equations are
the sums of the visits' own (:func:`_lane_normal`), so the fast single-spectrum
kernels are reused; stars with fewer than V visits carry padding visits of zero
weight. One row per star (see :func:`fit`).

Profiled continuum (``continuum="profile"``): the Chebyshev coefficients are solved
by weighted linear least squares at every LM step and the step is taken in labels and
rv with the Schur complement ``J_perp^T J_perp`` (:func:`_profiled_normal`); same
minimum and covariance as fitting them (``continuum="fit"``).

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
7    128         poor fit: the model does not describe the spectrum (a double-lined
                 binary, a star unlike the training set, bad data). Both:
                 ``chi2_red > 1 + POOR_FIT_NSIGMA sqrt(2 / ndof)`` (beyond what noise
                 explains: 5 sigma of the chi2 distribution with ``ndof = n_good -
                 n_free`` degrees of freedom, so the threshold falls with the number
                 of pixels: 1.09 for 6,000 pixels) and ``sqrt(chi2_red - 1) / snr >
                 POOR_FIT_MISFIT`` (0.012: the residuals' RMS beyond the noise is more
                 than 1.2 % of the flux). chi2_red alone grows with S/N for any model
                 error: The Payne's APOGEE network fits a real single dwarf
                 (2M13012770+5754582, S/N 197) with chi2_red 4.0, a 0.9 % misfit,
                 while single-star fits of a double-lined binary's visits
                 (2M06133561+2433362, S/N 100) have chi2_red 3.6-8.6, misfits
                 1.6-2.7 % (cont_deg 0-2). The 1.2 % is set between those two real
                 cases; a fit of a joint group uses the visits' S/N
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

Real instruments (``resolution=``, ``lsf_sigma=``, ``vsini=``, ``vmacro=``, ``air=``,
per-star ``wavelength`` (n, P)): the model is :func:`payne_lite.observe.observe` with
the rest-frame broadening of :func:`payne_lite.observe.rest_model`; the RV-scan
template is broadened at the start values (``BROADENING_START``, or the fixed
ones); the Jacobian is ``jax.jacfwd`` of the model (the fast normal equations apply
to the unbroadened model only). Broadening parameters come after the continuum's in
the parameter vector and in ``meta["cov_params"]``; their columns are in km/s.
Spectra with per-star grids are grouped by grid and fitted group by group
(:func:`_fit_per_star_grids`).

Precision: JAX's default float (float32 unless x64 is enabled); the covariance is
inverted on the host in float64.

References:
    Ting, Conroy, Rix & Cargile 2019, ApJ 879, 69 ("The Payne").
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._serial import default_threads, serial_jit
from .._validate import as_float_array, warn_if_near_grid
from ..constants import C_KMS
from ..emulator import KERNEL_COMPILER_OPTIONS, Emulator
from ..observe import (
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
    embed,
    embed_obs,
    emulator_error_on,
    fill_grid,
    lsf_sigma_pixels,
    normal_equations,
    observe,
    observe_jac_t,
    param_layout,
    rest_model,
    shift_pair,
    teff_index,
    window_valid,
)
from ..options import CurveFitOptions, LMOptions, options_for

Array = jax.Array

#: Step of the coarse RV chi2 scan [km/s].
RV_SCAN_STEP = 4.0
#: The RV scan compares chi2 over the pixels valid at every RV of the scan when
#: they are at least this fraction of the grid (see :func:`_scan_pixels`).
SCAN_COMMON_MIN = 0.75
#: Scaled-Teff starting points of the local fit (other labels start at the centre).
TEFF_STARTS = (-0.3, 0.0, 0.3)
#: LM: a fit from the best-screened start with chi2 above ndof + RESCUE_SIGMA *
#: sqrt(2 ndof) is refitted from the other starts (see :func:`_lm_with_starts`).
RESCUE_SIGMA = 5.0
#: LM: after the fit, chi2 is probed with the labels held, at rv offsets of up to
#: RV_PROBE_CELLS pixels either side (on a log grid: its minimum within the current
#: pixel interval and each of those, exactly; elsewhere at the offsets
#: RV_PROBE_OFFSETS [pixels]); a star with a probe more than RV_PROBE_GAIN below its
#: chi2 is refitted from there (see :func:`_rv_polish`).
RV_PROBE_CELLS = 3
RV_PROBE_OFFSETS = (1 / 8, *(0.25 * np.arange(1, 4 * RV_PROBE_CELLS + 1)))
RV_PROBE_GAIN = 1.0
#: ... repeated for the stars that moved, at most this many rounds in all (the
#: chi2 of a weak-lined broad star can be a washboard of minima a pixel apart).
RV_POLISH_ROUNDS = 3
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
FLAG_POOR_FIT = 128
FLAG_BITS = {
    0: "not converged",
    1: "at a bound (training box or rv window)",
    2: "failed: too few usable pixels",
    3: "ill-conditioned covariance",
    4: "outside the training box: a label at a box edge with chi2 still falling outwards",
    5: "low S/N: median |flux| / error of the used pixels below LOW_SNR",
    6: "MDN disagrees: a label or rv more than MDN_FLAG_NSIGMA MDN sigmas from the "
    "MDN mean (fits with an MDN only)",
    7: "poor fit: chi2_red > 1 + POOR_FIT_NSIGMA sqrt(2 / ndof) and the misfit beyond "
    "noise, sqrt(chi2_red - 1) / snr, above POOR_FIT_MISFIT of the flux",
}
#: QA bit 7 (poor fit): chi2_red beyond 1 + POOR_FIT_NSIGMA sqrt(2 / ndof) ...
POOR_FIT_NSIGMA = 5.0
#: ... and an RMS misfit beyond the noise, sqrt(chi2_red - 1) / snr, above this
#: fraction of the flux.
POOR_FIT_MISFIT = 0.012
#: With an MDN: QA bit 6 when the fit is more than this many MDN sigmas from its mean.
MDN_FLAG_NSIGMA = 4.0
#: Median S/N per pixel below which a fit is flagged low_snr (bit 5).
LOW_SNR = 10.0

METHODS = ("lm", "curve_fit")
#: ``fit(continuum=...)``: Chebyshev coefficients as LM parameters, or profiled out.
CONTINUUM_MODES = ("fit", "profile")
#: Posterior samplers ``fit`` hands to :func:`payne_lite.posterior.sample`.
SAMPLERS = ("emcee", "mdn-is", "nuts")


# --------------------------------------------------------------------------------------
# Pure, jitted core
# --------------------------------------------------------------------------------------
@functools.partial(
    jax.jit, static_argnames=("common",), compiler_options=KERNEL_COMPILER_OPTIONS
)
def _scan_batch(obs: ObsModel, s0, b0, rv_grid, flux, w, *, common=False):
    """Best RV (n,) and continuum (n, n_c) from a chi2 scan over ``rv_grid`` (R,).

    The template is the model at scaled labels ``s0`` (L,) (broadened by ``b0``
    (n_broad,) [km/s] and at the instrumental resolution), shifted to every RV once
    for the whole batch; chi2 for all stars and RVs comes from (n, P) @ (P, R)
    products. With a continuum (``cont_deg > 0``) its coefficients are solved
    linearly at each RV; without, the single coefficient is 1.

    ``common=True``: ``w`` is zero outside the pixels valid at every RV of the grid
    (:func:`_scan_weights`), so chi2 is compared over one pixel set and its
    constant term needs no product (2 products instead of 4 without a continuum).
    Otherwise chi2 per valid pixel is compared (the pixel set changes with RV).
    """
    f_rest = jax.lax.optimization_barrier(rest_model(obs, s0, b0))

    def shifted(rv):
        ma, mb, t, _, valid = shift_pair(obs, f_rest[None], rv)
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


@functools.partial(jax.jit, compiler_options=KERNEL_COMPILER_OPTIONS)
def _rv_probe_batch(obs, p, dv, flux, w, run):
    """chi2 (n, R) and rv (n, R) [km/s] of the model at ``p`` (n, k) near rv + ``dv``
    (n, R) [km/s], the labels, broadening and continuum held; the rest-frame model
    is computed once per star, and only where ``run`` (n,) (chi2 inf elsewhere).

    On a :class:`~payne_lite.observe.LogGrid` ``dv`` must be whole pixels apart
    (consecutive pixel intervals): every pixel sits at the same fraction ``t`` of its
    rest interval, so within interval j the model is ``m_j + t (m_j+1 - m_j)`` for
    every pixel (``m_j`` the rest model slid by j pixels) and chi2 a parabola in
    ``t`` whose coefficients come from the Gram matrix (two diagonals) of the R + 1
    slid models' residuals: the rv returned is chi2's minimum over each interval
    (ends included), exactly.
    Elsewhere chi2 and rv are those at rv + dv.
    """
    n_lab = obs.n_labels
    lg = obs.log_grid

    def one(args):
        q, d, f, wi, go = args
        return jax.lax.cond(
            go, probe, lambda *_: (jnp.full_like(d, jnp.inf), q[n_lab] + d), q, d, f, wi
        )

    def probe(q, d, f, wi):
        f_rest = jax.lax.optimization_barrier(
            rest_model(obs, q[:n_lab], q[obs.n_params - obs.n_broad :])
        )
        cont = obs.basis @ obs.cont_params(q) if obs.cont_deg > 0 else 1.0
        v = q[n_lab] + d
        if lg is None:

            def at(vi):
                ma, mb, t, _, _ = shift_pair(obs, f_rest[None], vi)
                r = (ma[0] + t * (mb[0] - ma[0])) * cont - f
                return wi @ (r * r)

            return jax.lax.map(at, v), v
        # the slid models m_0 .. m_R (the ends of the R intervals below u(v_max)),
        # from one dynamic slice per observed run of the embedded rest model
        u_top = jnp.floor(-jnp.arctanh(jnp.max(v) / C_KMS) * lg.inv_step)
        k = u_top.astype(jnp.int32)
        emb = embed(lg, f_rest[None])[0]
        n_r = d.shape[0]

        def residual(j):  # (P,) model slid by k + j pixels, minus the data
            m = [
                jax.lax.dynamic_slice_in_dim(emb, e0 + k + j, n) for _, e0, n in lg.obs
            ]
            return jnp.concatenate(m) * cont - f

        def step(r_prev, j):
            r = residual(j)
            rw = r * wi
            return r, (jnp.sum(rw * r), jnp.sum(rw * r_prev))

        _, (gd, g10) = jax.lax.scan(step, residual(0), jnp.arange(n_r + 1))
        g01 = g10[1:]  # sum w r_j r_j+1 (R,)
        g0 = gd[:-1]
        s0 = g0  # |a|^2, a = m_j - f
        s1 = g01 - g0  # a . b, b = m_j+1 - m_j
        s2 = gd[1:] - 2.0 * g01 + g0  # |b|^2
        t_min = jnp.clip(-s1 / jnp.where(s2 > 0, s2, 1.0), 0.0, 1.0)
        u = u_top + jnp.arange(n_r, dtype=t_min.dtype) + t_min
        return s0 + t_min * (2.0 * s1 + t_min * s2), -C_KMS * jnp.tanh(u / lg.inv_step)

    return _over(one, (p, dv, flux, w, run))


@jax.jit
def _window_batch(obs, rv_lo, rv_hi):
    return _over(lambda v: window_valid(obs, *v), (rv_lo, rv_hi))


def _normal(obs, p, flux, sw):
    """chi2, J^T J, J^T r and the weighted residual ``r`` (P,) at ``p`` (one star).

    The Jacobian is analytic (:func:`payne_lite.observe.observe_jac`): the rest-frame
    derivatives come from forward-mode through the network and are shifted with the
    flux. ``jax.jacfwd`` through the Doppler-shift gather cost 0.8 ms per star and
    step on the APOGEE network; this, with the lanes of :func:`_lm_lanes` and the
    log-grid shift, about 0.16 ms; one-hidden-layer nets on a log grid (``obs.jet``)
    take :func:`payne_lite.observe.normal_equations`, about 0.1 ms, with ``flux`` and
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


def _lm_one(obs, p0, alive, flux, sw, lo, hi, free, max_iter, normal=None):
    """Levenberg-Marquardt for one lane; returns (p, chi2, n_iter, converged, A, g).

    ``p0``, ``lo``, ``hi`` (k,): start and box; ``flux``, ``sw`` (P,): the star's
    flux and sqrt(weights); ``alive`` False: do nothing (batch padding, or a start
    that needs no run); ``free`` (k,) False for fixed parameters.

    ``normal(p) -> (p', chi2, A, g, r)``: the lane's normal equations (default
    :func:`_normal` of one spectrum, ``p' = p``). The variable-projection and
    multi-visit forms (:func:`_lane_normal`) return ``p'`` with the profiled
    continuum coefficients solved, and unit rows in ``A`` (zero in ``g``) for
    parameters that the step must not move.

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
    if normal is None:

        def normal(p):
            return (p, *_normal(obs, p, flux, sw))

    def start(_):
        p, chi2, a, g, r = normal(p0)
        return _LMState(
            p, chi2, r, a, g, jnp.asarray(LAM_INIT, p0.dtype),
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
            p, chi2, a, g, r = normal(p_new)
            return p, chi2, (r - st.r) @ (r + st.r), a, g, r

        def skip(_):
            zero = jnp.zeros((), p0.dtype)
            return st.p, zero, zero, st.a, st.g, st.r

        p_new, chi2_new, dchi2, a_new, g_new, r_new = jax.lax.cond(
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


def _solve_ridge(a, b):
    """``a^-1 b`` for a symmetric positive semi-definite ``a`` (m, m), with a ridge
    of 1e-7 of its mean diagonal (as the RV scan's continuum solve); an all-zero
    ``a`` (a padded visit) gives 0."""
    m = a.shape[0]
    scale = jnp.maximum(jnp.trace(a) / m, 1e-30)
    return jnp.linalg.solve(a + 1e-7 * scale * jnp.eye(m, dtype=a.dtype), b)


def _profiled_normal(obs, p, flux, sw):
    """:func:`_normal` with the continuum profiled out (variable projection).

    The model is linear in the continuum coefficients ``c``: for the labels and rv
    ``theta`` of ``p`` it solves ``c*(theta)`` by weighted linear least squares
    (from the model flux with a flat continuum, no Jacobian), evaluates the normal
    equations at ``(theta, c*)`` and returns, for ``theta``, the Schur complement
    ``A_tt - A_tc A_cc^-1 A_ct``, which is ``J_perp^T J_perp`` with the projected
    Jacobian ``J_perp = (I - P_c) J_theta`` (``P_c`` the weighted projector onto
    the continuum's columns), and the gradient ``J_theta^T r`` (``J_c^T r = 0`` at
    ``c*``). The continuum block of ``A`` is the identity and its gradient zero,
    so the LM step never moves ``c``; the next evaluation solves it again.
    Returns ``(p with c*, chi2, A, g, r)``. Cost: one model evaluation more than
    :func:`_normal` (about 1/5 of an LM step).
    """
    n_nl = obs.n_labels + 1
    n_c = obs.n_cont
    flat = jnp.zeros(n_c, p.dtype).at[0].set(1.0)  # c = (1, 0, ...): T_0 = 1
    m, _ = observe(obs, jnp.concatenate([p[:n_nl], flat]))
    if obs.jet is not None:
        m, basis = embed_obs(obs, m), obs.jet.basis
    else:
        basis = obs.basis.T
    x = basis * (sw * m)  # (n_c, P): the weighted continuum columns of J
    c_star = _solve_ridge(x @ x.T, x @ (sw * flux))
    c_star = jnp.where(jnp.sum(sw * sw) > 0, c_star, p[n_nl:])  # no pixels: keep c
    p = jnp.concatenate([p[:n_nl], c_star])
    chi2, a, g, r = _normal(obs, p, flux, sw)
    a_tc, a_cc = a[:n_nl, n_nl:], a[n_nl:, n_nl:]
    sol = _solve_ridge(a_cc, jnp.concatenate([a_tc.T, g[n_nl:, None]], axis=1))
    schur = a[:n_nl, :n_nl] - a_tc @ sol[:, :n_nl]
    g_t = g[:n_nl] - a_tc @ sol[:, n_nl]
    k = p.shape[0]
    a_out = jnp.eye(k, dtype=a.dtype).at[:n_nl, :n_nl].set(schur)
    g_out = jnp.zeros(k, g.dtype).at[:n_nl].set(g_t)
    return p, chi2, a_out, g_out, r


def visit_index(n_labels: int, n_visits: int, n_cont: int) -> np.ndarray:
    """(V, L + 1 + n_cont) int: positions in a multi-visit parameter vector
    ``[s (L), rv_1 .. rv_V, c_1 (n_cont), .., c_V (n_cont)]`` of each visit's own
    single-spectrum vector ``[s, rv_v, c_v]``."""
    rows = []
    for v in range(n_visits):
        c0 = n_labels + n_visits + v * n_cont
        rows.append(
            np.r_[np.arange(n_labels), n_labels + v, np.arange(c0, c0 + n_cont)]
        )
    return np.asarray(rows, np.int32).reshape(n_visits, n_labels + 1 + n_cont)


def _lane_normal(obs, flux, sw, mode):
    """The ``normal(p)`` of :func:`_lm_one` for one lane of ``mode``.

    ``mode = (n_visits, profile)``: ``n_visits = 0`` one spectrum (``flux``, ``sw``
    (P,)), else a joint fit of ``n_visits`` spectra of one star (``flux``, ``sw``
    (V, P)) with shared labels, one rv and continuum per visit (the vector of
    :func:`visit_index`). Its normal equations are sums of the visits'
    single-spectrum ones, scattered into the joint vector. A visit with no
    weighted pixels (padding, for stars with fewer visits) contributes nothing and
    gets unit rows for its rv and continuum (they stay put). ``profile``: the
    continuum is profiled out (:func:`_profiled_normal`), per visit.
    """
    n_visits, profile = mode
    one = _profiled_normal if profile and obs.n_cont else _normal_p
    if not n_visits:
        return lambda p: one(obs, p, flux, sw)
    idx = jnp.asarray(visit_index(obs.n_labels, n_visits, obs.n_cont))
    own = idx[:, obs.n_labels :]  # (V, 1 + n_c): each visit's own parameters
    dead = ~(jnp.sum(sw * sw, axis=1) > 0)  # (V,)

    def normal(p):
        pv, chi2, a, g, r = _over(lambda x: one(obs, *x), (p[idx], flux, sw))
        k = p.shape[0]
        a_j = jnp.zeros((k, k), a.dtype).at[idx[:, :, None], idx[:, None, :]].add(a)
        a_j = a_j.at[own, own].add(dead[:, None].astype(a.dtype))
        g_j = jnp.zeros(k, g.dtype).at[idx].add(g)
        p = p.at[own].set(pv[:, obs.n_labels :])
        return p, jnp.sum(chi2), a_j, g_j, r.reshape(-1)

    return normal


def _normal_p(obs, p, flux, sw):
    """:func:`_normal` in the ``(p, chi2, A, g, r)`` form of :func:`_lm_one`."""
    return (p, *_normal(obs, p, flux, sw))


def _lm_lanes(obs, p0, star, alive, flux, w, lo, hi, free, max_iter, mode=(0, False)):
    """:func:`_lm_one` for N lanes; returns (p, chi2, n_iter, converged, A, g).

    ``p0``, ``lo``, ``hi`` (N, k): start and box of each lane; ``star`` (N,): the row
    of ``flux``, ``w`` (n, P) it fits; ``alive`` (N,) False for lanes not to run.
    ``mode`` (static): ``(n_visits, profile)`` of :func:`_lane_normal`; with
    ``n_visits`` > 0, ``flux`` and ``w`` are (n, V, P), one row per star.

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
        normal = None if mode == (0, False) else _lane_normal(obs, flux[i], sw[i], mode)
        return _lm_one(obs, q, go, flux[i], sw[i], l, h, free, max_iter, normal)

    return _over(one, (p0, star, alive, lo, hi))


@functools.partial(
    jax.jit,
    static_argnames=("max_iter", "mode"),
    compiler_options=KERNEL_COMPILER_OPTIONS,
)
def _lm_batch(obs, p0, alive, flux, w, lo, hi, free, *, max_iter, mode=(0, False)):
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
        *(() if mode == (0, False) else (mode,)),
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
def _sandwich_batch(obs, p, w, var, basis):
    """The 'meat' of the sandwich covariance at the best fits ``p`` (n, k):
    ``J^T W D W J`` (n, k, k) and ``J^T W B^T`` (n, k, K), with ``w`` (n, P) the
    fit's weights, ``var`` (n, P) the data variances and ``basis`` (K, P_rest) the
    emulator's error basis, shifted to each star's rv (and times its continuum)
    like the model."""
    n_lab = obs.n_labels

    def one(args):
        q, w1, v1 = args
        _, _, jac = observe_jac_t(obs, q)
        ma, mb, t, _, _ = shift_pair(obs, basis, q[n_lab])
        b = ma + t * (mb - ma)
        if obs.cont_deg > 0:
            b = b * (q[n_lab + 1 :] @ obs.basis.T)
        jw = jac * w1
        return (jw * v1) @ jw.T, jw @ b.T

    return _over(one, (p, w, var))


def _sandwich_meat(ctx, p, w_fit, w_data):
    """``J^T W D W J`` (n, k, k) and ``J^T W B^T`` (n, k, K) at the best fits
    (float64); ``M`` = the first + the second times its transpose, and the label
    covariance ``A^-1 M A^-1`` with ``A = J^T W J``."""
    dt = ctx.obs.x_obs.dtype
    with np.errstate(divide="ignore"):
        var = np.where((w_fit > 0) & (w_data > 0), 1.0 / w_data, 0.0)
    m1, m2 = _sandwich_batch(
        ctx.obs,
        jnp.asarray(p, dt),
        jnp.asarray(w_fit, dt),
        jnp.asarray(var, dt),
        ctx.error_basis,
    )
    return np.asarray(m1, np.float64), np.asarray(m2, np.float64)


_sandwich_batch = serial_jit(_sandwich_batch, key=_sequential_lanes)


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
_rv_probe_batch = serial_jit(_rv_probe_batch, key=_sequential_lanes)
_window_batch = serial_jit(_window_batch, key=_sequential_lanes)
_lm_batch = serial_jit(_lm_batch, ("max_iter", "mode"), key=_sequential_lanes)
_final_batch = serial_jit(_final_batch, key=_sequential_lanes)
_model_batch = serial_jit(_model_batch, key=_sequential_lanes)


# --------------------------------------------------------------------------------------
# NumPy boundary
# --------------------------------------------------------------------------------------


def _curve_fit_one(obs, p_starts, flux, w, lo, hi, free, max_iter):
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
            m = np.asarray(_model_one(obs, full(q, base)), dtype=np.float64)[good]
            return (m - flux[good]) * sw

        def jac(q, base=base):
            j = np.asarray(_jac_one(obs, full(q, base)), dtype=np.float64)
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
    b_scan: Array  # (n_broad,) start values of the broadening parameters [km/s]
    max_iter: int
    return_model: bool
    emulator_error: tuple | None  # (wave_rest, wave_obs, pixel_error) or None
    profile: bool = False  # continuum="profile": variable projection
    error_basis: Array | None = None  # (K, P_rest) Emulator.error_basis, or None


def _scan_pixels(obs: ObsModel, rv_range) -> np.ndarray | None:
    """Pixels valid at every RV of the scan, when they are at least SCAN_COMMON_MIN
    of the pixels (for APOGEE and +-500 km/s: 90 %); else None (chi2 per pixel over
    each RV's own pixel set)."""
    dt = obs.x_obs.dtype
    ok = np.asarray(
        window_valid(obs, jnp.asarray(rv_range[0], dt), jnp.asarray(rv_range[1], dt))
    )
    return ok if ok.mean() >= SCAN_COMMON_MIN else None


def _lm_with_starts(
    ctx, p_start, alive, f_j, w_j, lo, hi, n_good, n_visits=0, free=None
):
    """LM from the best-screened start; the other starts only for doubtful fits.

    ``n_visits`` > 0: joint fits of several spectra per star (``f_j``, ``w_j``
    (n, V, P); parameters of :func:`visit_index`); ``free`` then replaces
    ``ctx.free`` (the joint vector's).

    1. Screening: chi2 at every start (the model only, no Jacobian: ~1/5 of an LM
       step), ranked per star.
    2. LM from each star's best start, to convergence.
    3. Rescue: a star whose fit did not converge, stopped at an edge of the training
       box, or has ``chi2 > ndof + RESCUE_SIGMA sqrt(2 ndof)`` (more than noise can
       explain) is fitted again from each of its other starts, and the lowest chi2
       is kept.
    4. RV polish (a free rv): chi2 probed at rv offsets with the rest held (each
       visit's alone in joint fits); a star with a lower probe is fitted again from
       it (:func:`_rv_polish`).

    Measured on 512 noisy spectra of the real APOGEE network (S/N 100 and 30), the
    best of three starts after 8 steps was never more than chi2 + 1 below the centre
    start's: running all starts for every star spent 2/3 of the LM on insurance
    that did not pay. On data the emulator does not fit to the noise (real spectra,
    chi2_red of a few), every star is rescued, i.e. fitted from every start, as
    before.
    """
    obs = ctx.obs
    free = ctx.free if free is None else free
    mode = (int(n_visits), ctx.profile)
    dt = obs.x_obs.dtype
    size, n_s, _ = p_start.shape
    rows = np.arange(size)
    bounds = (jnp.asarray(lo, dt), jnp.asarray(hi, dt), jnp.asarray(free))
    if n_s > 1 and n_visits:
        # screened visit by visit (one spectrum each), chi2 summed over visits
        idx = visit_index(ctx.layout.n_labels, n_visits, obs.n_cont)
        pv = np.swapaxes(p_start[:, :, idx], 1, 2).reshape(size * n_visits, n_s, -1)
        c0 = _chi2_batch(
            obs,
            jnp.asarray(pv, dt),
            f_j.reshape(size * n_visits, -1),
            w_j.reshape(size * n_visits, -1),
        )
        c0 = np.asarray(c0, np.float64).reshape(size, n_visits, n_s).sum(axis=1)
    elif n_s > 1:
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
        mode=mode,
    )
    p_best = np.array(p, np.float64)[:, 0]
    chi2_best = np.where(np.isfinite(chi2[:, 0]), np.asarray(chi2[:, 0]), np.inf)
    it_best = np.array(it)[:, 0].astype(np.int64)
    conv_best = np.array(conv)[:, 0]
    a_best = np.array(a, np.float64)[:, 0]
    g_best = np.array(g, np.float64)[:, 0]
    if n_s > 1:
        p_best, it_best, conv_best, chi2_best, a_best, g_best = _rescue(
            ctx, p_start, alive, f_j, w_j, bounds, lo, n_good, free, mode,
            (p_best, it_best, conv_best, chi2_best, a_best, g_best),
        )  # fmt: skip
    if free[ctx.layout.rv_index]:
        p_best, it_best, conv_best, chi2_best, a_best, g_best = _rv_polish(
            ctx, alive, f_j, w_j, bounds, lo, hi, mode,
            (p_best, it_best, conv_best, chi2_best, a_best, g_best), n_visits,
        )  # fmt: skip
    return p_best, it_best, conv_best, chi2_best, a_best, g_best


def _rescue(ctx, p_start, alive, f_j, w_j, bounds, lo, n_good, free, mode, best):
    """Step 3 of :func:`_lm_with_starts`: doubtful fits again from the other starts;
    returns ``best`` with the better ones replaced."""
    obs = ctx.obs
    dt = obs.x_obs.dtype
    size, n_s, _ = p_start.shape
    rows = np.arange(size)
    p_best, it_best, conv_best, chi2_best, a_best, g_best = best
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
            mode=mode,
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


def _rv_pixel_kms(obs: ObsModel) -> float:
    """Velocity width of a pixel of the observed grid [km/s] (the median step)."""
    if obs.log_grid is not None:
        return C_KMS / obs.log_grid.inv_step
    wave = np.asarray(obs.wave_obs, np.float64)
    return float(C_KMS * np.median(np.diff(np.log(wave))))


def _rv_probe(obs, p, f_j, w_j, run, rv_lo, rv_hi, rv_i, chi2_now):
    """The probe of :func:`_rv_polish` for single-spectrum vectors ``p`` (N, k)
    whose rv is entry ``rv_i``, bounded by ``rv_lo``, ``rv_hi`` (N,): returns the
    best probed rv (N,) and whether its chi2 is more than ``RV_PROBE_GAIN`` below
    ``chi2_now`` (N,) (only where ``run``)."""
    dt = obs.x_obs.dtype
    px = _rv_pixel_kms(obs)
    if obs.log_grid is not None:
        steps = np.arange(-RV_PROBE_CELLS, RV_PROBE_CELLS + 1, dtype=np.float64)
    else:
        steps = np.asarray(RV_PROBE_OFFSETS, np.float64)
        steps = np.concatenate([-steps[::-1], steps])
    rv = p[:, rv_i]
    dv = np.clip(rv[:, None] + steps[None, :] * px, rv_lo[:, None], rv_hi[:, None])
    dv = dv - rv[:, None]
    c_probe, rv_probe = _rv_probe_batch(
        obs, jnp.asarray(p, dt), jnp.asarray(dv, dt), f_j, w_j, jnp.asarray(run)
    )
    c_probe = np.asarray(c_probe, np.float64)
    c_probe = np.where(np.isfinite(c_probe), c_probe, np.inf)
    j = np.argmin(c_probe, axis=1)
    rows = np.arange(p.shape[0])
    gain = run & (c_probe[rows, j] < chi2_now - RV_PROBE_GAIN)
    rv_new = np.clip(np.asarray(rv_probe, np.float64)[rows, j], rv_lo, rv_hi)
    return rv_new, gain


def _rv_polish(ctx, alive, f_j, w_j, bounds, lo, hi, mode, best, n_visits=0):
    """Step 4 of :func:`_lm_with_starts`: leave a local minimum in rv.

    The model's chi2 is not smooth in rv: the Doppler shift interpolates linearly
    between rest pixels, so chi2(rv) has a kink wherever the pixels cross the rest
    nodes (every pixel at once on a log grid) and a fit can stop in a kink's notch
    or in the basin next to the true one, with labels bent to fit it. Measured on
    1,000 mock stars of the APOGEE network at S/N 50 (seeds 0-4 of
    ``benchmarks/bench_fit.py``'s test set), 3.3 % of the LM rvs were more than 3
    sigma from the truth (0.3 % expected), with chi2 up to 1,700 above the truth's,
    e.g. 7 km/s off for a broad-lined metal-poor star whose scan started it in
    the wrong basin, and 0.7 km/s off in a notch (chi2 + 20).

    The probe (:func:`_rv_probe_batch`): chi2 with the labels, continuum and
    broadening held, minimised over rv exactly within the current pixel interval and
    the ``RV_PROBE_CELLS`` intervals either side on a log grid (7 shifts of one
    rest-frame model per star), else sampled at ``RV_PROBE_OFFSETS`` pixels either
    side; inside the star's rv bounds. A star with a probe more than
    ``RV_PROBE_GAIN`` below its chi2 is fitted again from there; the lower chi2 is
    kept. Joint fits of visits (``n_visits`` > 0) probe each visit's rv alone, the
    labels and the other visits held, against that visit's chi2, and refit the
    star jointly from the moved rvs. Stars that moved are probed again, up to
    ``RV_POLISH_ROUNDS`` rounds: a weak-lined star with broad lines can have a
    minimum at every pixel crossing, each a little lower towards the truth.
    """
    p_best, it_best, conv_best, chi2_best, a_best, g_best = best
    run = alive & np.isfinite(chi2_best)
    for _ in range(RV_POLISH_ROUNDS):
        if not run.any():
            break
        p0, again = _rv_moves(ctx, run, f_j, w_j, lo, hi, p_best, chi2_best, n_visits)
        if not again.any():
            break
        dt = ctx.obs.x_obs.dtype
        p2, chi2_2, it2, conv2, a2, g2 = _lm_batch(
            ctx.obs,
            jnp.asarray(p0[:, None], dt),
            jnp.asarray(again[:, None]),
            f_j,
            w_j,
            *bounds,
            max_iter=ctx.max_iter,
            mode=mode,
        )
        chi2_2 = np.where(np.isfinite(chi2_2[:, 0]), np.asarray(chi2_2[:, 0]), np.inf)
        better = again & (chi2_2 < chi2_best)
        p_best[better] = np.asarray(p2, np.float64)[:, 0][better]
        it_best[better] += np.asarray(it2)[:, 0][better]
        conv_best[better] = np.asarray(conv2)[:, 0][better]
        chi2_best[better] = chi2_2[better]
        a_best[better] = np.asarray(a2, np.float64)[:, 0][better]
        g_best[better] = np.asarray(g2, np.float64)[:, 0][better]
        run = better  # the next round probes only the stars that moved
    return p_best, it_best, conv_best, chi2_best, a_best, g_best


def _rv_moves(ctx, run, f_j, w_j, lo, hi, p_best, chi2_best, n_visits):
    """One probe of :func:`_rv_polish`: the starting vectors (n, k) with the probed
    rvs, and which stars (n,) have a probe more than ``RV_PROBE_GAIN`` lower."""
    obs = ctx.obs
    dt = obs.x_obs.dtype
    n_lab = ctx.layout.n_labels
    p0 = p_best.copy()
    if not n_visits:
        rv_new, gain = _rv_probe(
            obs, p_best, f_j, w_j, run, lo[:, n_lab], hi[:, n_lab], n_lab, chi2_best
        )
        p0[:, n_lab] = np.where(gain, rv_new, p0[:, n_lab])
        return p0, gain
    # each visit alone, the labels and the other visits held
    size = p_best.shape[0]
    vidx = visit_index(n_lab, n_visits, obs.n_cont)
    pv = p_best[:, vidx].reshape(size * n_visits, -1)
    fv = f_j.reshape(size * n_visits, -1)
    wv = w_j.reshape(size * n_visits, -1)
    runv = np.repeat(run, n_visits) & np.any(np.asarray(wv) > 0, axis=1)
    chi2_v = np.asarray(_chi2_batch(obs, jnp.asarray(pv[:, None], dt), fv, wv))
    rv_sl = slice(n_lab, n_lab + n_visits)
    rv_new, gain = _rv_probe(
        obs, pv, fv, wv, runv, lo[:, rv_sl].reshape(-1), hi[:, rv_sl].reshape(-1),
        n_lab, np.asarray(chi2_v[:, 0], np.float64),
    )  # fmt: skip
    gain = gain.reshape(size, n_visits)
    p0[:, rv_sl] = np.where(gain, rv_new.reshape(size, n_visits), p0[:, rv_sl])
    return p0, gain.any(axis=1)


def _prepare_batch(ctx: _BatchContext, fb, wb, prior=None):
    """Steps 1-2 of a fit for a padded batch of spectra ``fb``, ``wb`` (size, P):
    the RV scan (or the MDN's / a fixed rv), the pixels valid over each RV window
    and the emulator's error in the weights.

    Returns ``(rv0, rv_lo, rv_hi, c0, wb, w_data)``: scan rv and window (size,)
    [km/s], continuum at the scan (size, max(n_cont, 1)), the fit's inverse
    variances (size, P) and those of the data alone (for the S/N)."""
    obs, layout, fix = ctx.obs, ctx.layout, ctx.fix
    dt = obs.x_obs.dtype
    size = fb.shape[0]
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
        _, c0 = _scan_batch(
            obs, ctx.s_scan, ctx.b_scan, jnp.asarray(rv0[:1], dt), f_j, w_j
        )
        rv_lo, rv_hi = rv0, rv0
    else:
        if ctx.scan_pixels is None:
            rv0, c0 = _scan_batch(obs, ctx.s_scan, ctx.b_scan, ctx.rv_grid, f_j, w_j)
        else:
            w_scan = jnp.asarray(np.where(ctx.scan_pixels, wb, 0.0), dt)
            rv0, c0 = _scan_batch(
                obs, ctx.s_scan, ctx.b_scan, ctx.rv_grid, f_j, w_scan, common=True
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
    return rv0, rv_lo, rv_hi, c0, wb, w_data


def _median_snr(fb, wb, w_data):
    """(size,) median |flux| / error (data errors) over the pixels with ``wb > 0``
    (sorted rows, the unused pixels as +inf at the end: 10x faster than nanmedian
    row by row); 0 for rows without any."""
    size, n_pix = fb.shape
    snr = np.where(wb > 0, np.sqrt(w_data) * np.abs(fb), np.inf).astype(np.float32)
    snr.sort(axis=1)
    cnt = np.count_nonzero(wb > 0, axis=1)
    rows = np.arange(size)
    lo_i, hi_i = np.maximum(cnt - 1, 0) // 2, np.minimum(cnt // 2, n_pix - 1)
    snr = np.where(cnt > 0, 0.5 * (snr[rows, lo_i] + snr[rows, hi_i]), 0.0)
    return snr.astype(np.float64)


def _fit_batch(ctx: _BatchContext, fb, wb, sb, m, prior=None) -> dict:
    """Fit one padded batch: ``fb``, ``wb`` (size, P) flux and inverse variance,
    ``sb`` (size, S, L) scaled starting labels; rows from ``m`` on are padding.

    ``prior`` (the MDN path): dict of per-row ``lo``, ``hi`` (size, L) scaled label
    bounds and ``rv0``, ``rv_lo``, ``rv_hi`` (size,) [km/s]; then there is no RV
    scan (the continuum, if any, starts flat) and the labels are bounded by
    ``lo``/``hi`` instead of the box."""
    obs, layout, free = ctx.obs, ctx.layout, ctx.free
    dt = obs.x_obs.dtype
    size, n_pix = fb.shape
    n_lab = layout.n_labels
    k = len(layout.names)
    n_free = int(free.sum())
    f_j = jnp.asarray(fb, dt)
    rv0, rv_lo, rv_hi, c0, wb, w_data = _prepare_batch(ctx, fb, wb, prior)
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
    if layout.broadening:
        p_start[:, :, layout.broad_slice] = np.asarray(ctx.b_scan, np.float64)
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
        if ctx.profile:  # the full J^T W J at (theta, c*): the table's covariance
            chi2_f, a_f, g_f, _ = _final_batch(obs, jnp.asarray(p_best, dt), f_j, w_j)
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
    snr = _median_snr(fb, wb, w_data)
    meat = None
    if ctx.error_basis is not None:
        m1, m2 = _sandwich_meat(ctx, p_best, wb, w_data)
        meat = m1 + m2 @ np.swapaxes(m2, 1, 2)
    return dict(
        meat=meat,
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


def fit_spectra(
    flux,
    flux_err,
    emulator: Emulator,
    *,
    mask=None,
    wavelength=None,
    method: str = "lm",
    instrument: Instrument | None = None,
    cont_deg: int = 0,
    rv_range=(-500.0, 500.0),
    p0=None,
    fixed=None,
    mdn=None,
    group=None,
    seed: int = 0,
    emulator_error: bool = True,
    return_model: bool = False,
    progress: bool = False,
    options: LMOptions | CurveFitOptions | None = None,
):
    """The point-fit path of :func:`payne_lite.fit` (``method="lm"`` or
    ``"curve_fit"``): arguments, returns and errors as documented there."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    opts = options_for(method, options)
    inst = Instrument() if instrument is None else instrument
    if not isinstance(inst, Instrument):
        raise ValueError(
            f"instrument must be a payne_lite.Instrument, got {type(inst).__name__}"
        )
    continuum = getattr(opts, "continuum", "fit")
    if continuum == "profile" and not (
        isinstance(cont_deg, int | np.integer) and cont_deg >= 1
    ):
        raise ValueError(
            f"continuum='profile' needs a continuum to profile: cont_deg >= 1, "
            f"got {cont_deg!r}"
        )
    broadening = inst.broadening(fixed, emulator)
    # the instrument as fitted: a kernel that ``fixed`` switched on is recorded on
    inst = dataclasses.replace(
        inst, vsini="vsini" in broadening, vmacro="vmacro" in broadening
    )
    if group is not None and (
        broadening
        or inst.has_profile
        or (wavelength is not None and np.ndim(wavelength) == 2)
    ):
        raise ValueError(
            "group= (joint multi-visit fits) does not take broadening, resolution, "
            "lsf_sigma or per-spectrum wavelength grids yet"
        )
    if inst.per_star and not (wavelength is not None and np.ndim(wavelength) == 2):
        raise ValueError(
            "a per-star (n, P) resolution or lsf_sigma needs per-star wavelength "
            "grids (n, P)"
        )
    wavelength = inst.vacuum_wavelength(wavelength)
    if wavelength is not None and np.ndim(wavelength) == 1:
        wave1 = as_float_array(wavelength, "wavelength", ndim=1)
        if mdn is None and np.all(np.isfinite(wave1)):  # an MDN refuses others
            warn_if_near_grid(wave1, emulator.wavelength)
        if not np.all(np.isfinite(wave1)):  # NaN entries: masked pixels
            wavelength, missing = fill_grid(wave1, 0)
            mask = missing if mask is None else np.asarray(mask) | missing
    if wavelength is not None and np.ndim(wavelength) == 2:
        # the wavelengths are vacuum now: the per-grid fits must not convert again
        t = _fit_per_star_grids(
            flux, flux_err, emulator, wavelength, mask=mask, p0=p0,
            instrument=dataclasses.replace(inst, air=False),
            settings=dict(
                method=method, cont_deg=cont_deg, rv_range=rv_range, fixed=fixed,
                mdn=mdn, seed=seed, emulator_error=emulator_error,
                return_model=return_model, progress=progress, options=opts,
            ),
        )  # fmt: skip
        t.meta["instrument"] = inst.to_meta(wavelength)
        t.meta["wavelength_air"] = inst.air
        return t
    if group is not None:
        if method != "lm" or mdn is not None:
            raise ValueError(
                "group= (joint multi-visit fits) needs method='lm' and no mdn"
            )
        if fixed and "rv" in dict(fixed):
            raise ValueError("group=: each visit has its own rv; rv cannot be fixed")
    rv_range = check_rv_range(rv_range)
    max_iter, batch_size = opts.max_iter, opts.batch_size
    n_threads, mdn_starts = opts.n_threads, opts.mdn_starts
    scale_errors = opts.scale_errors
    if mdn_starts and mdn is None:
        raise ValueError(f"{type(opts).__name__}(mdn_starts={mdn_starts}) needs an mdn")
    if mdn is not None:
        if p0 is not None:
            raise ValueError("pass p0 or mdn, not both (the MDN sets the starts)")
        mdn.check_emulator(emulator)
        if wavelength is not None:
            mdn.check_wavelength(wavelength)
    layout = param_layout(
        emulator, cont_deg=cont_deg, rv_range=rv_range, broadening=broadening
    )
    obs = build_obs_model(
        emulator,
        wavelength=wavelength,
        cont_deg=cont_deg,
        rv_max=max(abs(v) for v in rv_range),
        **inst.model_options(fixed, emulator),
    )
    n_pix = obs.x_obs.shape[0]
    flux2, ivar = check_inputs(flux, flux_err, mask, n_pix)
    n = flux2.shape[0]
    n_lab = emulator.n_labels
    k = len(layout.names)
    fix = check_fixed(fixed, emulator, rv_range, layout)
    free = np.ones(k, bool)
    for j in fix:
        free[j] = False

    # Starting labels (scaled), one row per start: (S, L) shared or (n, 1, L).
    if p0 is not None:
        p0_arr = emulator.check_labels(p0, name="p0")
        if p0_arr.shape[0] not in (1, n):
            raise ValueError(f"p0 {np.shape(p0)} must be ({n_lab},) or ({n}, {n_lab})")
        starts = np.broadcast_to(emulator.scale(p0_arr), (n, n_lab))[:, None, :]
        s_scan = emulator.scale(p0_arr[0]) if p0_arr.shape[0] == 1 else np.zeros(n_lab)
    else:
        starts = np.zeros((len(TEFF_STARTS), n_lab))
        starts[:, teff_index(emulator.label_names)] = TEFF_STARTS
        starts = np.broadcast_to(starts, (n, *starts.shape))
        s_scan = np.zeros(n_lab)
    starts = np.array(starts, dtype=np.float64)
    for j, v in fix.items():
        if j < n_lab:
            starts[:, :, j] = v
            s_scan[j] = v

    wave_vac = np.asarray(
        emulator.wavelength if wavelength is None else wavelength, np.float64
    )
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
        b_scan=jnp.asarray(
            [fix.get(layout.names.index(b), BROADENING_START[b]) for b in broadening],
            dt,
        ),
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
        profile=continuum == "profile",
        error_basis=(
            jnp.asarray(emulator.error_basis, dt)
            if emulator_error and emulator.error_basis is not None
            else None
        ),
    )
    if group is not None:
        if p0 is not None and np.ndim(p0) != 1:
            raise ValueError(
                f"group=: p0 must be one label vector ({n_lab},), got {np.shape(p0)}"
            )
        t = _fit_groups(
            ctx,
            emulator,
            flux2,
            ivar,
            starts[0],
            group,
            batch_size=batch_size,
            scale_errors=scale_errors,
        )
        t.meta["instrument"] = inst.to_meta(wave_vac)
        t.meta["wavelength_air"] = inst.air
        t.meta["continuum"] = continuum
        return t
    if n_threads is None:
        n_threads = default_threads() if method == "lm" else 1
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
        meat=res["meat"],
    )
    if obs.broad is not None:
        wave_obs = np.asarray(obs.wave_obs, np.float64)
        sig_pix, r_emu = lsf_sigma_pixels(
            emulator, wave_obs, resolution=inst.resolution,
            lsf_sigma=inst.lsf_sigma, emulator_resolution=inst.emulator_resolution,
        )  # fmt: skip
        t.meta.update(
            emulator_resolution=r_emu,
            lsf_sigma_pixels_max=None if sig_pix is None else float(np.max(sig_pix)),
            limb_darkening=inst.limb_darkening,
            broadening=list(broadening),
        )
    t.meta["instrument"] = inst.to_meta(wave_vac)
    t.meta["wavelength_air"] = inst.air
    if mdn is not None:
        _add_mdn_columns(t, layout, mdn_mean, mdn_sigma, refit, mdn_ok)
        t.meta.update(mdn_seconds=round(t_mdn, 4), mdn_n_components=mdn.n_components)
    t.meta["continuum"] = continuum
    return t


def _fit_per_star_grids(
    flux, flux_err, emulator, wavelength, *, mask, p0, instrument, settings
):
    """:func:`fit_spectra` with one wavelength grid per spectrum, (n, P).

    Spectra on identical grids (and identical per-pixel ``resolution`` /
    ``lsf_sigma`` rows of ``instrument``) are fitted in one call, with every other
    setting (``settings``: the keyword arguments of :func:`fit_spectra`) passed on
    whole; the tables are stacked back in the input order, with a ``grid_group``
    column (index of the distinct grid). Every grid is checked against the
    emulator's range before anything is fitted.
    """
    from astropy.table import vstack

    wave = as_float_array(wavelength, "wavelength", ndim=2)
    f2 = np.atleast_2d(as_float_array(flux, "flux", ndim=(1, 2)))
    e2 = np.atleast_2d(as_float_array(flux_err, "flux_err", ndim=(1, 2)))
    if f2.shape != wave.shape or e2.shape != wave.shape:
        raise ValueError(
            f"with one grid per spectrum, wavelength {wave.shape}, flux "
            f"{np.shape(flux)} and flux_err {np.shape(flux_err)} must all be (n, P)"
        )
    n, n_pix = wave.shape
    m2 = np.zeros((n, n_pix), bool)
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype != bool or m.shape not in ((n_pix,), (n, n_pix)):
            raise ValueError(
                f"mask must be boolean ({n_pix},) or ({n}, {n_pix}), got "
                f"{m.dtype} {m.shape}"
            )
        m2 |= m
    per_star = {}
    for name in ("resolution", "lsf_sigma"):
        val = getattr(instrument, name)
        if isinstance(val, np.ndarray) and val.ndim == 2:
            arr = val
            if arr.shape != wave.shape:
                raise ValueError(
                    f"{name} {arr.shape} must match wavelength {wave.shape} when 2-D"
                )
            per_star[name] = arr
    filled = np.empty_like(wave)
    wave_rest = np.asarray(emulator.wavelength, np.float64)
    for i in range(n):
        filled[i], missing = fill_grid(wave[i], i)
        m2[i] |= missing
        w = wave[i][~missing]
        if w[-1] <= wave_rest[0] or w[0] >= wave_rest[-1]:
            raise ValueError(
                f"wavelength row {i}: grid [{w[0]:g}, {w[-1]:g}] A does not overlap "
                f"the emulator's [{wave_rest[0]:g}, {wave_rest[-1]:g}] A"
            )
    key = np.concatenate([filled, *per_star.values()], axis=1)
    _, first, group = np.unique(key, axis=0, return_index=True, return_inverse=True)
    group = np.asarray(group).reshape(-1)
    p0_arr = None if p0 is None else np.asarray(p0, np.float64)
    tables, rows = [], []
    for g in range(first.size):
        sel = np.flatnonzero(group == g)
        i0 = sel[0]
        t = fit_spectra(
            f2[sel],
            e2[sel],
            emulator,
            mask=m2[sel],
            wavelength=filled[i0],
            p0=p0_arr if p0_arr is None or p0_arr.ndim == 1 else p0_arr[sel],
            instrument=instrument.for_star(i0),
            **settings,
        )
        t["grid_group"] = np.full(len(t), g, np.int32)
        tables.append(t)
        rows.append(sel)
    out = vstack(tables, metadata_conflicts="silent")
    order = np.empty(n, np.int64)
    order[np.concatenate(rows)] = np.arange(n)
    out = out[order]
    out["grid_group"].description = "index of the spectrum's distinct wavelength grid"
    out.meta["n_wavelength_grids"] = int(first.size)
    return out


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


def _fit_groups(ctx, emulator, flux2, ivar, starts, group, *, batch_size, scale_errors):
    """``fit(..., group=...)``: joint fits of the visits of each star.

    Each spectrum is prepared alone (RV scan, RV window, emulator error:
    :func:`_prepare_batch`); then the stars are fitted in padded batches of
    (stars, V visits) with the parameter vector of :func:`visit_index` (one
    compilation per (V, batch shape)). Stars with fewer visits than V carry
    visits with no weight (their rv and continuum stay at their start and are
    reported as NaN). ``starts`` (S, L): the scaled starting labels of every star.
    """
    obs, layout, fix = ctx.obs, ctx.layout, ctx.fix
    dt = obs.x_obs.dtype
    n, n_pix = flux2.shape
    n_lab, n_c = layout.n_labels, obs.n_cont
    ids, rows = _group_rows(group, n)
    n_star, n_vis = rows.shape
    real = rows >= 0
    n_visits = real.sum(axis=1)

    # 1-2. Every spectrum alone: RV scan, window, emulator error.
    size = min(batch_size, max(8, 1 << int(np.ceil(np.log2(n)))))
    prep = {}
    for start in range(0, n, size):
        sel = np.arange(start, min(start + size, n))
        idx = np.concatenate([sel, np.repeat(sel[:1], size - sel.size)])
        wb = ivar[idx].copy()
        wb[sel.size :] = 0.0
        out = _prepare_batch(ctx, flux2[idx], wb)
        out = (*out, _median_snr(flux2[idx], out[4], out[5]))
        for j, val in enumerate(out):
            prep.setdefault(j, []).append(np.asarray(val)[: sel.size])
    rv0, rv_lo, rv_hi, c0, w_fit, w_data, snr1 = (
        np.concatenate(prep[j]) for j in range(7)
    )

    # The joint vector: [s (L), rv_1 .. rv_V, c_1 (n_c) .. c_V (n_c)].
    vidx = visit_index(n_lab, n_vis, n_c)
    k = n_lab + n_vis * (1 + n_c)
    names = (
        tuple(layout.names[:n_lab])
        + tuple(f"rv_{v + 1}" for v in range(n_vis))
        + tuple(f"cont_{j}_{v + 1}" for v in range(n_vis) for j in range(n_c))
    )
    lower = np.zeros(k)
    upper = np.zeros(k)
    for v in range(n_vis):
        lower[vidx[v]], upper[vidx[v]] = layout.lower, layout.upper
    joint = layout._replace(names=names, lower=lower, upper=upper)
    free = np.ones(k, bool)
    for j in fix:
        free[j] = False  # labels only: a fixed rv is refused with group=
    n_lab_free = int(free[:n_lab].sum())
    n_par = n_lab_free + n_visits * (1 + n_c)

    # 3. Stars in padded batches; a padding visit is row 0 with no weight.
    g_size = min(
        max(8, 1 << int(np.ceil(np.log2(max(1, batch_size // n_vis))))),
        max(8, 1 << int(np.ceil(np.log2(n_star)))),
    )
    n_s = starts.shape[0]
    res: dict = {}
    for start in range(0, n_star, g_size):
        sel = np.arange(start, min(start + g_size, n_star))
        m = sel.size
        gi = np.concatenate([sel, np.repeat(sel[:1], g_size - m)])
        r = rows[gi]
        ok = real[gi] & (np.arange(g_size) < m)[:, None]
        rr = np.where(ok, r, 0)
        fb = np.where(ok[..., None], flux2[rr], 0.0)
        wb = np.where(ok[..., None], w_fit[rr], 0.0)
        wd = np.where(ok[..., None], w_data[rr], 0.0)
        n_good = np.count_nonzero(wb > 0, axis=(1, 2))
        alive = (np.arange(g_size) < m) & (n_good > n_par[gi])
        p_start = np.zeros((g_size, n_s, k))
        p_start[:, :, :n_lab] = starts[None]
        lo = np.broadcast_to(lower, (g_size, k)).copy()
        hi = np.broadcast_to(upper, (g_size, k)).copy()
        for v in range(n_vis):
            j_rv = n_lab + v
            rv_v = np.where(ok[:, v], rv0[rr[:, v]], 0.0)
            p_start[:, :, j_rv] = rv_v[:, None]
            lo[:, j_rv] = np.where(ok[:, v], rv_lo[rr[:, v]], 0.0)
            hi[:, j_rv] = np.where(ok[:, v], rv_hi[rr[:, v]], 0.0)
            if n_c:
                cs = vidx[v, n_lab + 1 :]
                p_start[:, :, cs] = np.where(ok[:, v, None], c0[rr[:, v]], 0.0)[:, None]
                lo[:, cs] = np.where(ok[:, v, None], lo[:, cs], 0.0)
                hi[:, cs] = np.where(ok[:, v, None], hi[:, cs], 0.0)
        p_start = np.clip(p_start, lo[:, None], hi[:, None])
        f_j, w_j = jnp.asarray(fb, dt), jnp.asarray(wb, dt)
        p_best, it_best, conv_best, _, _, _ = _lm_with_starts(
            ctx, p_start, alive, f_j, w_j, lo, hi, n_good, n_vis, free
        )
        # the full normal equations at the best fits, visit by visit
        pv = p_best[:, vidx].reshape(g_size * n_vis, -1)
        chi2_v, a_v, g_v, model_v = _final_batch(
            obs,
            jnp.asarray(pv, dt),
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
            own = vidx[v, n_lab:]
            a[:, own, own] += np.where(ok[:, v], 0.0, 1.0)[:, None]  # padding
        meat = None
        if ctx.error_basis is not None:
            # the emulator's error is that of the star's labels, shared by its
            # visits: their J^T W B^T add up before the outer product
            m1, m2 = _sandwich_meat(
                ctx, pv, wb.reshape(g_size * n_vis, -1), wd.reshape(g_size * n_vis, -1)
            )
            m1 = m1.reshape(g_size, n_vis, kv, kv)
            m2 = m2.reshape(g_size, n_vis, kv, -1)
            meat = np.zeros((g_size, k, k))
            m2_j = np.zeros((g_size, k, m2.shape[-1]))
            for v in range(n_vis):
                meat[:, vidx[v][:, None], vidx[v][None, :]] += m1[:, v]
                m2_j[:, vidx[v]] += m2[:, v]
                own = vidx[v, n_lab:]
                meat[:, own, own] += np.where(ok[:, v], 0.0, 1.0)[:, None]
            meat += m2_j @ np.swapaxes(m2_j, 1, 2)
        out = dict(
            meat=meat,
            p=p_best,
            chi2=np.where(ok, chi2_v, 0.0).sum(axis=1),
            chi2_visit=np.where(ok, chi2_v, np.nan),
            a=a,
            g=g,
            it=it_best,
            conv=conv_best,
            n_good=n_good,
            n_good_visit=np.where(ok, np.count_nonzero(wb > 0, axis=2), 0),
            model=np.asarray(model_v, np.float64).reshape(g_size, n_vis, n_pix)
            if ctx.return_model
            else None,
        )
        for key, val in out.items():
            if val is None:
                continue
            res.setdefault(key, np.zeros((n_star, *val.shape[1:]), val.dtype))
            res[key][sel] = val[:m]

    snr_visit = np.where(real, snr1[np.where(real, rows, 0)], np.nan)
    snr = np.sqrt(np.nansum(snr_visit**2, axis=1))
    rv_lo_v = np.where(real, rv_lo[np.where(real, rows, 0)], np.nan)
    rv_hi_v = np.where(real, rv_hi[np.where(real, rows, 0)], np.nan)
    t = _results_table(
        emulator,
        joint,
        obs,
        free,
        res["p"],
        res["chi2"],
        res["a"],
        res["g"],
        snr,
        res["it"],
        res["conv"],
        res["n_good"],
        rv_lo_v[:, 0],
        rv_hi_v[:, 0],
        res.get("model"),
        method=ctx.method,
        rv_range=ctx.rv_range,
        scale_errors=scale_errors,
        emulator_error_used=ctx.emulator_error is not None,
        n_par=n_par,
        meat=res.get("meat"),
    )
    return _group_table(
        t, joint, ids, rows, res, snr_visit, rv_lo_v, rv_hi_v, n_par, ctx
    )


def _group_table(t, joint, ids, rows, res, snr_visit, rv_lo_v, rv_hi_v, n_par, ctx):
    """Collapse the per-visit columns of a joint fit's table into (n_star, V)
    columns, NaN for padding; rv at a bound of any visit's window sets bit 1."""
    from astropy.table import Table

    n_lab = joint.n_labels
    n_vis = rows.shape[1]
    real = rows >= 0
    failed = (np.asarray(t["flags"]) & FLAG_FAILED) > 0
    rv = np.column_stack([np.asarray(t[f"rv_{v + 1}"]) for v in range(n_vis)])
    tol = AT_BOUND_TOL[1]
    with np.errstate(invalid="ignore"):
        at_bound = (np.abs(rv - rv_lo_v) < tol) & (rv_lo_v > ctx.rv_range[0])
        at_bound |= (np.abs(rv - rv_hi_v) < tol) & (rv_hi_v < ctx.rv_range[1])
        at_bound |= (np.abs(rv - ctx.rv_range[0]) < tol) | (
            np.abs(rv - ctx.rv_range[1]) < tol
        )
    at_bound = np.any(at_bound & real, axis=1) & ~failed
    flags = np.asarray(t["flags"]) | np.where(at_bound, FLAG_AT_BOUND, 0)
    # poor fit: the misfit is per pixel of a visit, at the visits' own S/N (the
    # RMS of snr_visit over the used pixels), not at the combined S/N
    n_pix_v = res["n_good_visit"]
    snr_pix = np.sqrt(
        np.nansum(n_pix_v * snr_visit**2, axis=1) / np.maximum(n_pix_v.sum(axis=1), 1)
    )
    ndof = np.asarray(t["n_good_pixels"]) - n_par
    bad = poor_fit(t["chi2_red"], ndof, snr_pix) & ~failed
    flags = (flags & ~FLAG_POOR_FIT) | np.where(bad, FLAG_POOR_FIT, 0)

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
    for j in range(ctx.obs.n_cont):
        out[f"cont_{j}"] = stack(f"cont_{j}_{{}}")
        out[f"cont_{j}_err"] = stack(f"cont_{j}_{{}}_err")
    cov = np.array(t["covariance"])
    vidx = visit_index(n_lab, n_vis, ctx.obs.n_cont)
    for v in range(n_vis):
        pad = ~real[:, v]
        own = vidx[v, n_lab:]
        cov[np.ix_(pad, own, np.arange(cov.shape[2]))] = np.nan
        cov[np.ix_(pad, np.arange(cov.shape[1]), own)] = np.nan
    for name in ("chi2", "chi2_red", "n_good_pixels", "snr", "n_iter", "converged"):
        out[name] = t[name]
    out["flags"] = flags.astype(np.int32)
    out["covariance"] = cov
    out["visit_rows"] = rows
    out["chi2_visit"] = res["chi2_visit"]
    out["n_good_pixels_visit"] = res["n_good_visit"]
    out["snr_visit"] = snr_visit
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
    out["rv"].description = "rv of each visit; NaN after a star's last visit"
    out.meta.update(t.meta)
    out.meta.update(
        group=True,
        n_visits_max=int(n_vis),
        continuum="profile" if ctx.profile else "fit",
    )
    return out


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
    "meat",
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
        elif j == n_lab:
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


def poor_fit(chi2_red, ndof, snr) -> np.ndarray:
    """QA bit 7 (see the module docstring): True where the fit is beyond noise
    (``chi2_red > 1 + POOR_FIT_NSIGMA sqrt(2 / ndof)``) and the RMS misfit beyond
    noise, ``sqrt(chi2_red - 1) / snr``, exceeds ``POOR_FIT_MISFIT`` of the flux.

    Args:
        chi2_red: (n,) reduced chi2; ndof: (n,) degrees of freedom; snr: (n,)
            median |flux| / error of the pixels used.

    Returns:
        (n,) bool (False where any input is NaN or ``ndof`` < 1).
    """
    chi2_red = np.asarray(chi2_red, np.float64)
    ndof = np.asarray(ndof, np.float64)
    snr = np.asarray(snr, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        beyond = chi2_red > 1.0 + POOR_FIT_NSIGMA * np.sqrt(2.0 / ndof)
        misfit = np.sqrt(np.clip(chi2_red - 1.0, 0.0, None)) / snr
        out = beyond & (ndof >= 1) & (misfit > POOR_FIT_MISFIT)
    return np.asarray(out & np.isfinite(chi2_red), bool)


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
    n_par=None,
    meat=None,
):
    """The results table; ``n_par`` (n,) overrides the number of free parameters of
    each row (joint fits of stars with fewer visits than the longest); ``meat``
    (n, k, k): the covariance is the sandwich ``A^-1 meat A^-1`` instead of
    ``A^-1`` (the emulator's correlated error, :func:`_sandwich_meat`)."""
    from astropy.table import Table

    n, k = p.shape
    n_lab = layout.n_labels
    n_free = int(free.sum()) if n_par is None else np.asarray(n_par)
    # A broadening parameter whose derivative vanishes (vsini = 0: rotation changes
    # the spectrum at second order) has no error: held for the covariance, NaN.
    a = a.copy()
    held = np.zeros((n, k), bool)
    for j in range(layout.broad_slice.start, k):
        if free[j]:
            aj = a[:, j, j]
            scale = np.max(np.abs(np.diagonal(a, axis1=1, axis2=2)), axis=1)
            held[:, j] = ~(aj > 1e-9 * scale)
            a[held[:, j], j, :] = 0.0
            a[held[:, j], :, j] = 0.0
            a[held[:, j], j, j] = 1.0
    cov, ill = _covariance(a, free, obs.x_obs.dtype)
    if meat is not None:
        m = np.where(held[:, :, None] | held[:, None, :], 0.0, np.nan_to_num(meat))
        cov = cov @ m @ cov
    for j in np.flatnonzero(held.any(axis=0)):
        cov[held[:, j], j, :] = np.nan
        cov[held[:, j], :, j] = np.nan
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
    for j in range(layout.broad_slice.start, k):
        if free[j]:  # the upper bound only: 0 is a physical value
            at_bound |= np.abs(p[:, j] - layout.upper[j]) < tol_rv
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
        | np.where(poor_fit(chi2_red, n_good - n_free, snr) & ~failed, FLAG_POOR_FIT, 0)
    ).astype(np.int32)
    phys[failed] = np.nan
    err[failed] = np.nan
    cov[failed] = np.nan
    chi2 = np.where(failed, np.nan, chi2)
    n_iter = np.where(failed, 0, n_iter)

    t = Table()
    n_broad = len(layout.broadening)
    units = (
        list(emulator.label_units)
        + ["km/s"]
        + [""] * (k - n_lab - 1 - n_broad)
        + ["km/s"] * n_broad
    )
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
        emulator_error_correlated=meat is not None,
        flag_bits={str(b): s for b, s in FLAG_BITS.items()},
        fit_dtype=str(np.dtype(obs.x_obs.dtype)),
        reference="Ting et al. 2019, ApJ 879, 69 (The Payne)",
    )
    return t
