"""The pure LM kernel: normal equations, damped step, lanes, batches, sandwich.

Jitted functions of JAX arrays only (the NumPy boundary is in :mod:`._driver`); the
per-star loops are compiled by :func:`payne_lite._serial.serial_jit` without XLA's
intra-op task splitting, the lane mode (:data:`SEQUENTIAL_LANES`) in their key.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._serial import serial_jit
from ..emulator import KERNEL_COMPILER_OPTIONS
from ..observe import (
    basis_placer,
    embed_obs,
    jet_rows,
    normal_equations,
    observe,
    observe_jac_t,
    param_blocks,
    param_order,
)
from ._window import window_dip

Array = jax.Array

#: LM: initial, minimum and maximum damping.
LAM_INIT, LAM_MIN, LAM_MAX = 1e-3, 1e-9, 1e10
#: LM: converged when the Gauss-Newton step is below XTOL (in units of each
#: parameter's conditional 1-sigma error; that step is then taken without another
#: evaluation); settled when a damped step is below XTOL_DAMPED; after LAM_MAX,
#: XTOL_STALL. See :func:`_lm_one`.
XTOL, XTOL_DAMPED, XTOL_STALL = 0.05, 1e-2, 0.1


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


def sequential_lanes() -> bool:
    """Read at trace time."""
    if SEQUENTIAL_LANES is not None:
        return bool(SEQUENTIAL_LANES)
    return jax.default_backend() == "cpu"


def over(f, xs):
    """``f`` over the leading axis of ``xs``: ``lax.map`` on CPU (one item's arrays stay
    in cache), ``vmap`` on accelerators (see :data:`SEQUENTIAL_LANES`)."""
    return jax.lax.map(f, xs) if sequential_lanes() else jax.vmap(f)(xs)


#: LM systems up to this many parameters are solved by an unrolled Cholesky
#: (:func:`_spd_solve`): labels, rv and broadening of the single-spectrum fits;
#: larger ones (a continuum per chip, joint fits of visits) by LAPACK's LU. The
#: unrolled form's compile time grows as k^2: the LM's program for the APOGEE
#: network took 0.32 -> 0.42 s to compile at k = 6, 1.7 -> 2.9 s at k = 15.
UNROLLED_SOLVE_MAX = 8


def _spd_solve(m, b):
    """``m^-1 b`` for a symmetric positive (semi-)definite ``m`` (k, k), ``b`` (k,).

    Up to ``UNROLLED_SOLVE_MAX`` parameters: a Cholesky factorisation and the two
    triangular solves unrolled into whole-vector operations, no loop and no LAPACK
    call. ``jnp.linalg.solve`` (LU) runs, besides the LAPACK calls, a loop that
    turns the pivots into a permutation, k iterations each run by XLA:CPU's thunk
    executor, twice every LM step (the Gauss-Newton and the damped step). A pivot
    that rounding makes zero or negative (a singular Gauss-Newton matrix) is
    floored at the smallest normal float: a huge step, as LU gives one.
    """
    k = m.shape[0]
    if k > UNROLLED_SOLVE_MAX:
        return jnp.linalg.solve(m, b)
    idx = jnp.arange(k)
    tiny = jnp.finfo(m.dtype).tiny
    cols, rest = [], m
    for j in range(k):  # right-looking: column j of L, then the trailing update
        col = jnp.where(
            idx >= j, rest[:, j] / jnp.sqrt(jnp.maximum(rest[j, j], tiny)), 0
        )
        cols.append(col)
        rest = rest - col[:, None] * col[None, :]
    low = jnp.stack(cols, axis=1)
    y = jnp.zeros_like(b)
    for i in range(k):  # L y = b (y's entries from i on are still 0)
        y = y.at[i].set((b[i] - low[i] @ y) / low[i, i])
    x = jnp.zeros_like(b)
    for i in reversed(range(k)):  # L^T x = y (x's entries up to i are still 0)
        x = x.at[i].set((y[i] - low[:, i] @ x) / low[i, i])
    return x


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
    y = _spd_solve(at + lam * eye, -gt)
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
    fresh: Array  # () bool: p is the start, not yet evaluated


def _lm_one(obs, p0, alive, flux, sw, lo, hi, free, max_iter, normal=None):
    """Levenberg-Marquardt for one lane; returns (p, chi2, n_iter, converged, A, g,
    dip), ``dip`` the predictive check's :func:`._window.window_dip` of the weighted
    residuals of the last evaluation (0 for joint fits of visits).

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
      ``XTOL`` (0.05) in every parameter, in units of its conditional 1-sigma error
      (``|d_i| sqrt(A_ii)``). That step is taken, clipped into the box, without
      evaluating the model there: the result's chi2, ``A`` and ``g`` are those of
      the point before it (chi2 lower by about the step's size squared, ~0.003,
      after it). Measured on 1,000 mocks of the APOGEE network each at S/N 15, 50
      and 300, against fits run to 0.001 sigma: 99 % of the answers within 0.03
      sigma (0.01 with ``XTOL`` 0.01), one S/N-15 star 0.2 sigma, with 15 % fewer
      evaluations (mean LM steps 4.1 -> 3.4 at S/N 50); stopping at 0.1 sigma
      without the step left rvs 0.3 sigma off. (1e-4 sigma, tried first, is below
      float32 precision and left most stars to stall out: median 25 steps instead
      of 10, same answers in ``benchmarks/bench_fit.py``);
    * settled: a step is rejected while the Gauss-Newton step is below
      ``XTOL_STALL`` (0.1) sigma: no lower chi2 is reachable at float precision;
      or the damped step is below ``XTOL_DAMPED`` (0.01) sigma (lam has grown because the
      Gauss-Newton model promised a decrease that was not there: chi2 has a kink
      in rv where all pixels cross grid nodes at once, with linear interpolation
      on a log-uniform grid; on 500 S/N-30 spectra 6 lanes ran 35-100 steps there).
      Counted as converged;
    * stalled: ``lam > LAM_MAX`` (no downhill step even along the gradient); counted
      as converged when the Gauss-Newton step is below ``XTOL_STALL`` sigma;
    * not converged: ``max_iter`` steps taken.

    The Jacobian (analytic, :func:`_normal`) is evaluated once per step, at the trial
    point, which also gives the trial chi2; not at all on the step that finds
    convergence. The start is evaluated by the loop's first pass (not counted as a
    step), so ``normal`` appears once in the compiled program: the LM's compile time
    fell by ~30 % (APOGEE network with vsini and the LSF: lower + compile 7.6 ->
    5.2 s), the fits are bitwise the same, and the extra pass costs ~1-2 % of a
    fit's run time.
    """
    k = p0.shape[0]
    if normal is None:

        def normal(p):
            return (p, *_normal(obs, p, flux, sw))

    def start():
        # evaluated by the loop's first pass (``fresh``; see the docstring). r holds
        # one residual per pixel of flux (visits flattened), as every normal()
        # returns; a different shape fails the loop's carry check when traced
        zero = jnp.zeros((), p0.dtype)
        r = jnp.zeros(flux.size, p0.dtype)
        return _LMState(
            p0, zero, r, jnp.eye(k, dtype=p0.dtype), jnp.zeros(k, p0.dtype),
            jnp.asarray(LAM_INIT, p0.dtype),
            jnp.zeros((), jnp.int32), jnp.zeros((), bool), jnp.zeros((), bool),
            jnp.ones((), bool),
        )  # fmt: skip

    def body(st):
        fresh = st.fresh
        blocked = ((st.p <= lo) & (st.g > 0)) | ((st.p >= hi) & (st.g < 0))
        act = free & ~blocked
        step_gn, y_gn = _damped_step(st.a, st.g, 0.0, act)
        gn_size = jnp.max(jnp.abs(y_gn))
        conv = ~fresh & (gn_size < XTOL)
        p_last = jnp.clip(st.p + step_gn, lo, hi)  # converged: the step, unevaluated
        step, y = _damped_step(st.a, st.g, st.lam, act)
        # Damped this far, the step cannot move the answer by 1 % of an error bar:
        # what the Gauss-Newton model still promises is not there (chi2 has a kink
        # in rv where every pixel crosses a grid node at once, or float rounding).
        tiny = ~fresh & ~conv & (jnp.max(jnp.abs(y)) < XTOL_DAMPED)
        p_new = jnp.where(fresh, st.p, jnp.clip(st.p + step, lo, hi))

        def trial(_):
            p, chi2, a, g, r = normal(p_new)
            return p, chi2, jnp.sum((r - st.r) * (r + st.r)), a, g, r

        def skip(_):
            zero = jnp.zeros((), p0.dtype)
            return st.p, zero, zero, st.a, st.g, st.r

        p_new, chi2_new, dchi2, a_new, g_new, r_new = jax.lax.cond(
            ~conv & ~tiny, trial, skip, None
        )
        acc = fresh | ((dchi2 < 0) & ~conv & ~tiny)
        lam = jnp.where(
            fresh,
            st.lam,
            jnp.where(acc, jnp.maximum(st.lam / 10.0, LAM_MIN), st.lam * 10.0),
        )
        stalled = (lam > LAM_MAX) & ~conv
        # A rejected step whose Gauss-Newton step is already below XTOL_STALL sigma:
        # chi2 cannot be lowered beyond float rounding; stop now instead of raising
        # lam 19 more times to LAM_MAX (which took lanes from ~5 to ~25 steps).
        settled = (~acc & ~conv & (gn_size < XTOL_STALL)) | tiny
        pick = lambda new, old: jnp.where(acc, new, old)  # noqa: E731
        return _LMState(
            jnp.where(conv, p_last, pick(p_new, st.p)),
            pick(chi2_new, st.chi2),
            pick(r_new, st.r),
            pick(a_new, st.a),
            pick(g_new, st.g),
            lam,
            st.it + (~conv & ~fresh).astype(jnp.int32),
            conv | stalled | settled,
            conv | settled | (stalled & (gn_size < XTOL_STALL)),
            jnp.zeros((), bool),
        )

    def run(_):
        st = jax.lax.while_loop(
            lambda st: st.fresh | (~st.done & (st.it < max_iter)), body, start()
        )
        # the predictive check's statistic from the residuals in hand (one spectrum;
        # a joint fit's are its visits' end to end: not computed)
        dip = window_dip(st.r, sw > 0) if flux.ndim == 1 else jnp.zeros((), p0.dtype)
        return st.p, st.chi2, st.it, st.conv, st.a, st.g, dip

    def dead(_):
        zero = jnp.zeros((), p0.dtype)
        return (
            p0, zero, jnp.zeros((), jnp.int32), jnp.zeros((), bool),
            jnp.zeros((k, k), p0.dtype), jnp.zeros(k, p0.dtype), zero,
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

    The model is linear in the continuum coefficients ``c``: for the labels, rv
    and broadening ``theta`` of ``p`` it solves ``c*(theta)`` by weighted linear
    least squares (from the model flux with a flat continuum, no Jacobian),
    evaluates the normal equations at ``(theta, c*)`` and returns, for ``theta``,
    the Schur complement ``A_tt - A_tc A_cc^-1 A_ct``, which is ``J_perp^T J_perp``
    with the projected Jacobian ``J_perp = (I - P_c) J_theta`` (``P_c`` the
    weighted projector onto the continuum's columns), and the gradient
    ``J_theta^T r`` (``J_c^T r = 0`` at ``c*``). The continuum block of ``A`` is
    the identity and its gradient zero, so the LM step never moves ``c``; the next
    evaluation solves it again. Returns ``(p with c*, chi2, A, g, r)``. Cost: one
    model evaluation more than :func:`_normal` (about 1/5 of an LM step).
    """
    n_c = obs.n_cont
    k = p.shape[0]
    c_i = np.arange(obs.n_labels + 1, obs.n_labels + 1 + n_c)  # continuum
    t_i = np.setdiff1d(np.arange(k), c_i)  # labels, rv and broadening
    flat = jnp.asarray(obs.cont.flat(), p.dtype)  # c = (1, 0, ...): T_0 = 1 per chip
    m, _ = observe(obs, p.at[c_i].set(flat))
    if obs.jet is not None:
        m, basis = embed_obs(obs, m), obs.jet.basis
    else:
        basis = obs.basis.T
    x = basis * (sw * m)  # (n_c, P): the weighted continuum columns of J
    c_star = _solve_ridge(x @ x.T, x @ (sw * flux))
    c_star = jnp.where(jnp.sum(sw * sw) > 0, c_star, p[c_i])  # no pixels: keep c
    p = p.at[c_i].set(c_star)
    chi2, a, g, r = _normal(obs, p, flux, sw)
    a_tt, a_tc, a_cc = a[t_i][:, t_i], a[t_i][:, c_i], a[c_i][:, c_i]
    n_t = t_i.size
    sol = _solve_ridge(a_cc, jnp.concatenate([a_tc.T, g[c_i, None]], axis=1))
    schur = a_tt - a_tc @ sol[:, :n_t]
    g_t = g[t_i] - a_tc @ sol[:, n_t]
    a_out = jnp.eye(k, dtype=a.dtype).at[t_i[:, None], t_i[None, :]].set(schur)
    g_out = jnp.zeros(k, g.dtype).at[t_i].set(g_t)
    return p, chi2, a_out, g_out, r


def visit_index(
    n_labels: int, n_visits: int, n_cont: int, n_broad: int = 0
) -> np.ndarray:
    """(V, L + 1 + n_cont + n_broad) int: positions in a multi-visit parameter vector
    ``[s (L), rv_1 .. rv_V, c_1 (n_cont), .., c_V (n_cont), b (n_broad)]`` of each
    visit's own single-spectrum vector ``[s, rv_v, c_v, b]`` (the labels and the
    broadening ``b``, properties of the star, are shared by its visits)."""
    b0 = n_labels + n_visits * (1 + n_cont)
    rows = []
    for v in range(n_visits):
        c0 = n_labels + n_visits + v * n_cont
        rows.append(
            np.r_[
                np.arange(n_labels),
                n_labels + v,
                np.arange(c0, c0 + n_cont),
                np.arange(b0, b0 + n_broad),
            ]
        )
    return np.asarray(rows, np.int32).reshape(n_visits, n_labels + 1 + n_cont + n_broad)


def _lane_normal(obs, flux, sw, mode):
    """The ``normal(p)`` of :func:`_lm_one` for one lane of ``mode``.

    ``mode = (n_visits, profile)``: ``n_visits = 0`` one spectrum (``flux``, ``sw``
    (P,)), else a joint fit of ``n_visits`` spectra of one star (``flux``, ``sw``
    (V, P)) with shared labels (and broadening), one rv and continuum per visit
    (the vector of :func:`visit_index`). Its normal equations are sums of the
    visits' single-spectrum ones, scattered into the joint vector. A visit with no
    weighted pixels (padding, for stars with fewer visits) contributes nothing and
    gets unit rows for its rv and continuum (they stay put). ``profile``: the
    continuum is profiled out (:func:`_profiled_normal`), per visit.
    """
    n_visits, profile = mode
    one = _profiled_normal if profile and obs.n_cont else _normal_p
    if not n_visits:
        return lambda p: one(obs, p, flux, sw)
    n_lab, n_own = obs.n_labels, 1 + obs.n_cont
    idx = jnp.asarray(visit_index(n_lab, n_visits, obs.n_cont, obs.n_broad))
    own = idx[:, n_lab : n_lab + n_own]  # (V, 1 + n_c): each visit's own parameters
    dead = ~(jnp.sum(sw * sw, axis=1) > 0)  # (V,)

    def normal(p):
        pv, chi2, a, g, r = over(lambda x: one(obs, *x), (p[idx], flux, sw))
        k = p.shape[0]
        a_j = jnp.zeros((k, k), a.dtype).at[idx[:, :, None], idx[:, None, :]].add(a)
        a_j = a_j.at[own, own].add(dead[:, None].astype(a.dtype))
        g_j = jnp.zeros(k, g.dtype).at[idx].add(g)
        p = p.at[own].set(pv[:, n_lab : n_lab + n_own])
        return p, jnp.sum(chi2), a_j, g_j, r.reshape(-1)

    return normal


def _normal_p(obs, p, flux, sw):
    """:func:`_normal` in the ``(p, chi2, A, g, r)`` form of :func:`_lm_one`."""
    return (p, *_normal(obs, p, flux, sw))


def _lm_lanes(obs, p0, star, alive, flux, w, lo, hi, free, max_iter, mode=(0, False)):
    """:func:`_lm_one` for N lanes; returns (p, chi2, n_iter, converged, A, g, dip).

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

    return over(one, (p0, star, alive, lo, hi))


@functools.partial(
    jax.jit,
    static_argnames=("mode",),
    compiler_options=KERNEL_COMPILER_OPTIONS,
)
def lm_batch(obs, p0, alive, flux, w, lo, hi, free, *, max_iter, mode=(0, False)):
    """LM over stars (axis 0) and starting points (axis 1 of ``p0`` (n, S, k)).

    The n * S (star, start) pairs are the lanes of :func:`_lm_lanes`; ``alive`` (n, S)
    says which to run; results come back as (n, S, ...): p, chi2, n_iter, converged,
    A, g and the predictive check's dip (:func:`lm_rows` takes one start's to the
    host).

    ``max_iter`` is an argument, not a static one: a fit with another
    ``LMOptions.max_iter`` runs the executable already compiled (the LM program is
    most of a first fit's compile time: 2.5-6.7 s for the APOGEE network here).
    """
    n, n_s, k = p0.shape
    star = jnp.repeat(jnp.arange(n), n_s)
    rep = lambda b: jnp.repeat(b, n_s, axis=0)  # noqa: E731
    # Looked up at trace time, so a test can count traces by patching ``_lm_lanes``.
    p, chi2, it, conv, a, g, dip = _lm_lanes_dispatch(
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
        dip.reshape(n, n_s),
    )


class LMRows(NamedTuple):
    """One LM result per row (star) on the host, in float64: what :func:`lm_rows`
    takes from :func:`lm_batch`, and what the starts, the rescue and the rv polish of
    :func:`._driver.lm_with_starts` keep the best of.

    Attributes:
        p: (n, k) parameters.
        n_iter: (n,) int LM steps.
        conv: (n,) bool converged.
        chi2: (n,) chi2 at ``p`` (inf where not finite).
        a: (n, k, k) J^T W J at ``p``.
        g: (n, k) J^T W r at ``p``.
        dip: (n,) the predictive check's :func:`._window.window_dip` of the
            weighted residuals at ``p`` (0 for joint fits of visits).
    """

    p: np.ndarray
    n_iter: np.ndarray
    conv: np.ndarray
    chi2: np.ndarray
    a: np.ndarray
    g: np.ndarray
    dip: np.ndarray

    def where(self, better, other: LMRows, add_iter: bool = False) -> LMRows:
        """These rows, with ``other``'s where ``better`` (n,) bool; ``add_iter``:
        count the steps of both (``other`` refitted from this one's answer)."""
        if add_iter:
            other = other._replace(n_iter=other.n_iter + self.n_iter)
        return LMRows(
            *(
                np.where(better.reshape(-1, *(1,) * (mine.ndim - 1)), theirs, mine)
                for mine, theirs in zip(self, other, strict=True)
            )
        )


def lm_rows(out, start: int = 0) -> LMRows:
    """The :class:`LMRows` of start ``start`` of every star in :func:`lm_batch`'s
    output ``out``."""
    p, chi2, it, conv, a, g, dip = (np.asarray(x)[:, start] for x in out)
    f64 = lambda x: x.astype(np.float64)  # noqa: E731
    return LMRows(
        f64(p), it.astype(np.int64), conv,
        np.where(np.isfinite(chi2), f64(chi2), np.inf), f64(a), f64(g), f64(dip),
    )  # fmt: skip


def _lm_lanes_dispatch(*args):
    return _lm_lanes(*args)


@jax.jit
def final_batch(obs, p, flux, w):
    """chi2 (n,), J^T W J (n, k, k), J^T W r (n, k) and model flux (n, P) at the
    best fits (NaN where the model is undefined: shifted off the emulator's grid)."""

    def one(args):
        p, flux, w = args
        sw = jnp.sqrt(w)
        f, valid, jac = observe_jac_t(obs, p)
        jw = jac * sw
        r = sw * (f - flux)
        return r @ r, jw @ jw.T, jw @ r, jnp.where(valid, f, jnp.nan)

    return over(one, (p, flux, w))


@jax.jit
def _sandwich_batch(obs, p, w, var, basis):
    """The 'meat' of the sandwich covariance at the best fits ``p`` (n, k):
    ``J^T W D W J`` (n, k, k) and ``J^T W B^T`` (n, k, K), with ``w`` (n, P) the
    fit's weights, ``var`` (n, P) the data variances and ``basis`` (K, P_rest) the
    emulator's error basis, shifted to each star's rv (and times its continuum)
    like the model."""
    place, lay = basis_placer(obs, basis)  # over the observed span on a log grid

    def one(args):
        q, w1, v1 = args
        _, _, jac = observe_jac_t(obs, q)
        jw = lay(jac * w1)
        return (jw * lay(v1)) @ jw.T, jw @ place(q).T

    def one_jet(args):
        # the LM's own rows (normal_equations'): observe_jac_t's Jacobian cost
        # ~0.6 ms a star on the shipped default emulator, these ~0.1 ms
        q, w1, v1 = args
        sw, ve = jnp.sqrt(lay(w1)), lay(v1)
        x, jc = jet_rows(obs, q, jnp.zeros_like(sw), sw)
        y, u = x * sw, place(q)  # w J (rows), the placed basis
        res = obs.n_labels + 1
        if jc is None:
            m1 = param_blocks(obs, (y * ve) @ y.T)
            m2 = (y @ u.T)[:res]
        else:
            yc = jc * sw
            m1 = param_blocks(obs, (y * ve) @ y.T, (yc * ve) @ y.T, (yc * ve) @ yc.T)
            m2 = jnp.concatenate([(y @ u.T)[:res], yc @ u.T])
        return m1, m2[param_order(obs, m2.shape[0])]

    return over(one if obs.jet is None else one_jet, (p, w, var))


def sandwich_meat(ctx, p, w_fit, w_data):
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


_sandwich_batch = serial_jit(_sandwich_batch, key=sequential_lanes)


@jax.jit
def model_batch(obs, p):
    """Model flux (n, P) at parameters ``p`` (n, k); NaN where the model is
    undefined (shifted off the emulator's grid), as ``model_from_results`` marks it."""

    def one(q):
        f, valid = observe(obs, q)
        return jnp.where(valid, f, jnp.nan)

    return over(one, p)


@jax.jit
def model_one(obs, p):
    return observe(obs, p)[0]


@jax.jit
def jac_one(obs, p):
    return observe_jac_t(obs, p)[2].T


# CPU executables of the per-star loops compiled without XLA's intra-op task
# splitting (payne_lite._serial: 1.5x faster LM here); the lane mode is in the key.
lm_batch = serial_jit(lm_batch, ("mode",), key=sequential_lanes)
final_batch = serial_jit(final_batch, key=sequential_lanes)
model_batch = serial_jit(model_batch, key=sequential_lanes)
