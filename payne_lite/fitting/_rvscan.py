"""Radial velocity: the coarse chi2 scan, its parabola vertex, chi2 of starts, and
the rv probe / polish that moves a fit out of a local minimum in rv.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from .._fusion import materialize
from .._serial import serial_jit, to_device
from ..constants import C_KMS
from ..emulator import KERNEL_COMPILER_OPTIONS
from ..observe import (
    SEARCH_INTERP,
    TAP_OFFSETS,
    ObsModel,
    embed,
    embed_obs,
    observe,
    rest_model,
    shift_pair,
    shift_span,
    span_pixels,
    tap_weights,
    window_valid,
)
from ._lm import LMRows, lm_batch, lm_rows, over, sequential_lanes, visit_index

#: Step of the coarse RV chi2 scan [km/s].
RV_SCAN_STEP = 4.0
#: The RV scan compares chi2 over the pixels valid at every RV of the scan when
#: they are at least this fraction of the grid (see :func:`scan_pixels`).
SCAN_COMMON_MIN = 0.75
#: ... else chi2 per pixel is compared, at the RVs that keep at least this share of
#: the most pixels any RV of the scan keeps for that star.
SCAN_MIN_SHARE = 0.5
#: LM: after the fit, chi2 is probed with the labels held, at rv offsets of up to
#: RV_PROBE_CELLS pixels either side (on a log grid: its minimum within the current
#: pixel interval and each of those, exactly; elsewhere at the offsets
#: RV_PROBE_OFFSETS [pixels]); a star with a probe more than RV_PROBE_GAIN below the
#: probe's chi2 at its rv is refitted from there (see :func:`rv_polish`).
RV_PROBE_CELLS = 3
RV_PROBE_OFFSETS = (1 / 8, *(0.25 * np.arange(1, 4 * RV_PROBE_CELLS + 1)))
RV_PROBE_GAIN = 1.0
#: ... repeated for the stars that moved, at most this many rounds in all (the
#: chi2 of a weak-lined broad star can be a washboard of minima a pixel apart).
RV_POLISH_ROUNDS = 3


# --------------------------------------------------------------------------------------
# Pure, jitted core
# --------------------------------------------------------------------------------------
@functools.partial(
    jax.jit, static_argnames=("common",), compiler_options=KERNEL_COMPILER_OPTIONS
)
def scan_batch(obs: ObsModel, s0, b0, rv_grid, flux, w, *, common=False):
    """Best RV (n,) and continuum (n, n_c) from a chi2 scan over ``rv_grid`` (R,).

    The template is the model at scaled labels ``s0`` (L,) (broadened by ``b0``
    (n_broad,) [km/s] and at the instrumental resolution), shifted to every RV once
    for the whole batch; chi2 for all stars and RVs comes from (n, P) @ (P, R)
    products. With a continuum (``cont_deg > 0``) its coefficients are solved
    linearly at each RV; without, the single coefficient is 1.

    ``common=True``: ``w`` is zero outside the pixels valid at every RV of the grid
    (:func:`scan_pixels`), so chi2 is compared over one pixel set and its
    constant term needs no product (2 products instead of 4 without a continuum).
    Otherwise chi2 per valid pixel is compared (the pixel set changes with RV).

    The template is shifted by linear interpolation whatever ``obs.interp``: the scan
    only compares chi2 at the grid's RVs (4 km/s apart), where the smooth interpolant
    buys nothing, and its six taps made a one-spectrum fit 1.5x slower (0.066 ->
    0.097 s, the APOGEE network), the scan's (R, P) shift being most of it.
    """
    obs = dataclasses.replace(obs, interp="linear")
    f_rest = materialize(rest_model(obs, s0, b0), jnp.all(jnp.isfinite(s0)))
    return _scan_template(obs, f_rest, rv_grid, flux, w, common)


@functools.partial(
    jax.jit, static_argnames=("common",), compiler_options=KERNEL_COMPILER_OPTIONS
)
def rescan_batch(obs: ObsModel, s, b, rv_grid, flux, w, run, *, common=False):
    """:func:`scan_batch` with each star's own template: the model at its scaled
    labels ``s`` (n, L) and broadening ``b`` (n, n_broad), for the rows where
    ``run`` (n,) (rv 0 and continuum 1 elsewhere, not computed). The second scan
    of a fit whose first one (box-centre template) may have put its rv window in
    the wrong place (:func:`._driver.rescan_fits`)."""
    obs = dataclasses.replace(obs, interp="linear")
    n_c = obs.basis.shape[1]

    def one(args):
        si, bi, f, wi, go = args

        def scan(_):
            f_rest = materialize(rest_model(obs, si, bi), jnp.all(jnp.isfinite(si)))
            rv, c = _scan_template(obs, f_rest, rv_grid, f[None], wi[None], common)
            return rv[0], c[0]

        def skip(_):
            return jnp.zeros((), rv_grid.dtype), jnp.ones(n_c, f.dtype)

        return jax.lax.cond(go, scan, skip, None)

    return over(one, (s, b, flux, w, run))


def _scan_template(obs, f_rest, rv_grid, flux, w, common):
    """The chi2 scan of :func:`scan_batch` for the rest-frame template ``f_rest``
    (P_rest,): best rv (n,) and continuum (n, n_c).

    On a log grid the products run over the span of the observed pixels
    (:func:`~payne_lite.observe.shift_span`; the pixels between chips have zero
    weight): shifting the template to the grid's 251 rvs took ~3 ms a batch in
    the observed layout, 0.3 ms so."""
    if obs.log_grid is not None:
        emb = embed(obs.log_grid, f_rest[None])[0]
        t, v = over(lambda rv: shift_span(obs, emb, rv), rv_grid)  # (R, n_emb)
        t, v = span_pixels(obs, t), span_pixels(obs, v)  # (R, P)
    else:

        def shifted(rv):
            sh = shift_pair(obs, f_rest[None], rv)
            return sh.value()[0], sh.valid

        t, v = over(shifted, rv_grid)  # (R, P)
    basis = obs.basis  # (P, n_c)
    vf = v.astype(t.dtype)
    t = t * vf
    n_c = basis.shape[1]
    wf = w * flux
    if common:
        sff = jnp.sum(wf * flux, axis=1, keepdims=True)  # (n, 1)
    else:
        sff = (wf * flux) @ vf.T  # (n, R)
    b = jnp.stack([wf @ (t * basis[:, a]).T for a in range(n_c)], axis=-1)
    t2 = t * t
    m = [[None] * n_c for _ in range(n_c)]
    # per chip (ChipPolynomial), columns of different chips never overlap
    per_chip = 1 if obs.cont is None else obs.cont.deg + 1
    for a in range(n_c):
        for c in range(a, n_c):
            if a // per_chip != c // per_chip:
                m[a][c] = m[c][a] = jnp.zeros_like(b[..., 0])
            else:
                m[a][c] = m[c][a] = w @ (t2 * (basis[:, a] * basis[:, c])).T
    m = jnp.stack([jnp.stack(row, axis=-1) for row in m], axis=-2)  # (n, R, nc, nc)
    if obs.n_cont:
        # chip by chip (the blocks of a ChipPolynomial), by an unrolled Cholesky
        # solve: elementwise over (n, R), no LAPACK call (jnp.linalg.solve here hung
        # two batches run in threads at once: futex waits, no CPU, in XLA:CPU)
        coef = []
        for a0 in range(0, n_c, per_chip):
            blk = slice(a0, a0 + per_chip)
            coef.extend(_spd_solve(m[..., blk, blk], b[..., blk]))
        coef = jnp.stack(coef, axis=-1)
        chi2 = sff - jnp.sum(coef * b, axis=-1)
    else:
        coef = jnp.ones_like(b)
        chi2 = sff - 2.0 * b[..., 0] + m[..., 0, 0]
    if common:
        red = jnp.where(jnp.isfinite(chi2), chi2, jnp.inf)
    else:
        n_ok = (w > 0).astype(t.dtype) @ vf.T
        # an rv that keeps few of the pixels is no candidate: a handful of pixels
        # can match better per pixel by chance (a spectrum shifted nearly off the
        # grid, its last 2 pixels against 44 at the true rv)
        few = n_ok < SCAN_MIN_SHARE * jnp.max(n_ok, axis=1, keepdims=True)
        red = jnp.where((n_ok > 0) & ~few, chi2 / jnp.maximum(n_ok, 1.0), jnp.inf)
        red = jnp.where(jnp.isfinite(red), red, jnp.inf)
    i = jnp.argmin(red, axis=1)
    return _parabola_vertex(red, i, rv_grid), jnp.take_along_axis(
        coef, i[:, None, None], axis=1
    )[:, 0]


def _spd_solve(m, b):
    """``m^-1 b`` as a list of k (...) arrays, for symmetric positive semi-definite
    ``m`` (..., k, k) with a ridge of 1e-7 of its mean diagonal (the continuum's
    normal equations), ``b`` (..., k): Cholesky written out for small k."""
    k = m.shape[-1]
    scale = jnp.maximum(jnp.trace(m, axis1=-2, axis2=-1) / k, 1e-30)
    a = [[m[..., i, j] for j in range(k)] for i in range(k)]
    for i in range(k):
        a[i][i] = a[i][i] + 1e-7 * scale
    low = [[None] * k for _ in range(k)]
    for i in range(k):
        for j in range(i + 1):
            acc = a[i][j]
            for q in range(j):
                acc = acc - low[i][q] * low[j][q]
            if i == j:
                low[i][i] = jnp.sqrt(jnp.maximum(acc, 1e-30 * scale))
            else:
                low[i][j] = acc / low[j][j]
    y = []
    for i in range(k):
        acc = b[..., i]
        for q in range(i):
            acc = acc - low[i][q] * y[q]
        y.append(acc / low[i][i])
    x = [None] * k
    for i in reversed(range(k)):
        acc = y[i]
        for q in range(i + 1, k):
            acc = acc - low[q][i] * x[q]
        x[i] = acc / low[i][i]
    return x


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
def chi2_batch(obs, p, flux, w):
    """chi2 (n, S) of the model at ``p`` (n, S, k) against each star's ``flux``
    (0 for rows without any weight, such as batch padding, not computed)."""
    n, n_s, k = p.shape
    star = jnp.repeat(jnp.arange(n), n_s)
    live = jnp.any(w > 0, axis=1)  # padding rows: no model (on CPU, lane by lane)

    def one(args):
        q, i = args

        def chi2(_):
            f, _ = observe(obs, q)
            return w[i] @ (f - flux[i]) ** 2

        return jax.lax.cond(live[i], chi2, lambda _: jnp.zeros((), w.dtype), None)

    return over(one, (p.reshape(n * n_s, k), star)).reshape(n, n_s)


@functools.partial(jax.jit, compiler_options=KERNEL_COMPILER_OPTIONS)
def chi2_shared_batch(obs, s, b, p, flux, w):
    """:func:`chi2_batch` (n, S) when the starts are the same for every star: the
    labels ``s`` (S, L) and broadening ``b`` (n_broad,) of start j are those of
    every row, and a star's starts differ only in their labels (one rv and
    continuum per star, from ``p`` (n, k)).

    The S rest-frame models are computed once for the batch, not once per star and
    start; each star shifts them to its rv with one :func:`shift_pair` of the (S,
    P_rest) rows (on a log grid :func:`~payne_lite.observe.shift_span`, the data
    in its layout). This is the default fit's screening (the three Teff starts at
    the scan's rv): on the APOGEE network about 200 -> 30 us per star. The values
    are :func:`chi2_batch`'s up to float rounding (the same model, summed in
    another order)."""
    n_lab = obs.n_labels
    n_s = s.shape[0]
    rest = materialize(  # vmapped, not one model per start in the program
        jax.vmap(lambda sj: rest_model(obs, sj, b))(s), jnp.all(jnp.isfinite(s))
    )
    live = jnp.any(w > 0, axis=1)
    basis = obs.basis.T  # (n_c, P)
    if obs.log_grid is not None:
        rest = embed(obs.log_grid, rest)
        flux, w, basis = embed_obs(obs, flux), embed_obs(obs, w), embed_obs(obs, basis)

    def one(args):
        q, f, wi, go = args

        def chi2(_):
            if obs.log_grid is not None:
                m = shift_span(obs, rest, q[n_lab])[0]
            else:
                m = shift_pair(obs, rest, q[n_lab]).value()
            if obs.n_cont:
                m = m * (obs.cont_params(q) @ basis)
            r = m - f
            return (r * r) @ wi

        return jax.lax.cond(go, chi2, lambda _: jnp.zeros(n_s, w.dtype), None)

    return over(one, (p, flux, w, live))


def search_model(obs: ObsModel) -> ObsModel:
    """``obs`` with the Doppler interpolant of the fit's searches
    (:data:`~payne_lite.observe.SEARCH_INTERP`: the screening of starts, the rv
    polish's probe), which compare chi2 values only among themselves."""
    kind = SEARCH_INTERP.get(obs.interp)
    return obs if kind is None else dataclasses.replace(obs, interp=kind)


def screen_starts(obs, p_start, f_j, w_j):
    """chi2 (n, S) of every star's starts ``p_start`` (n, S, k), a NumPy array:
    :func:`chi2_shared_batch` when the starts allow it (no ``p0`` per star, no MDN
    bounds), else :func:`chi2_batch`; both with the searches' interpolant
    (:func:`search_model`)."""
    obs = search_model(obs)
    dt = obs.x_obs.dtype
    n_lab = obs.n_labels
    k = p_start.shape[2]
    labels, rest = p_start[:, :, :n_lab], p_start[:, :, n_lab:]
    b = p_start[0, 0, k - obs.n_broad :]
    shared = (
        np.all(labels == labels[:1])
        and np.all(rest == rest[:, :1])
        and np.all(p_start[:, :, k - obs.n_broad :] == b)
    )
    if not shared:
        return np.asarray(chi2_batch(obs, to_device(p_start, dt), f_j, w_j))
    c2 = chi2_shared_batch(
        obs,
        to_device(labels[0], dt),
        to_device(b, dt),
        to_device(p_start[:, 0], dt),
        f_j,
        w_j,
    )
    return np.asarray(c2)


@functools.partial(jax.jit, compiler_options=KERNEL_COMPILER_OPTIONS)
def _rv_probe_batch(obs, p, dv, flux, w, run):
    """chi2 (n, R) and rv (n, R) [km/s] of the model at ``p`` (n, k) near rv + ``dv``
    (n, R) [km/s], the labels, broadening and continuum held, and (n,) the
    reference a probe's gain is measured from: on a log grid the minimum over the
    pixel interval that holds the rv of ``p`` (the polynomial's minimum, where the
    fit's own interpolant has its minimum if it is not the probe's), elsewhere chi2
    at that rv; the rest-frame model is computed once per star, and only where
    ``run`` (n,) (chi2 inf elsewhere).

    On a :class:`~payne_lite.observe.LogGrid` ``dv`` must be whole pixels apart
    (consecutive pixel intervals): every pixel sits at the same fraction ``t`` of its
    rest interval, so within interval j the model is a fixed combination of the
    rest model slid by j + (tap offset) pixels for every pixel, and chi2 a
    polynomial in ``t`` whose coefficients come from the Gram matrix (as many
    diagonals as taps) of the slid models' residuals: the rv returned is chi2's
    minimum over each interval (ends included; :func:`_probe_minima`).
    Elsewhere chi2 and rv are those at rv + dv.
    """
    n_lab = obs.n_labels
    lg = obs.log_grid

    def one(args):
        q, d, f, wi, go = args

        def skip(*_):
            return jnp.full_like(d, jnp.inf), q[n_lab] + d, jnp.full_like(d[0], jnp.inf)

        return jax.lax.cond(go, probe, skip, q, d, f, wi)

    def probe(q, d, f, wi):
        f_rest = materialize(
            rest_model(obs, q[:n_lab], q[obs.n_params - obs.n_broad :]),
            jnp.all(jnp.isfinite(q)),
        )
        cont = obs.basis @ obs.cont_params(q) if obs.n_cont else 1.0
        v = q[n_lab] + d
        if lg is None:

            def at(vi):
                r = shift_pair(obs, f_rest[None], vi).value()[0] * cont - f
                return wi @ (r * r)

            return jax.lax.map(at, v), v, at(q[n_lab])
        # the slid models m_j (the rest model slid by k + j pixels) that the taps
        # of the R intervals below u(v_max) read, from one dynamic slice per
        # observed run of the embedded rest model
        u_top = jnp.floor(-jnp.arctanh(jnp.max(v) / C_KMS) * lg.inv_step)
        k = u_top.astype(jnp.int32)
        emb = embed(lg, f_rest[None])[0]
        offs = TAP_OFFSETS[obs.interp]
        n_r, nd = d.shape[0], len(offs)

        # chip by chip: one dynamic slice per observed run holds every slid model
        # (static slices of it), and one product per run gives the Gram matrix of
        # the slid residuals, G[a, b] = sum w r_a r_b (a handful of operations to
        # compile, where a sum per pair compiled for ~10 s)
        n_res = n_r + nd - 1
        g_full = jnp.zeros((n_res, n_res), f.dtype)
        for r0, e0, n in lg.obs:
            cc = cont if not obs.n_cont else cont[r0 : r0 + n]
            win = jax.lax.dynamic_slice_in_dim(emb, e0 + k + offs[0], n + n_res - 1)
            slid = jnp.stack([win[j : j + n] for j in range(n_res)])  # (n_res, n)
            r = slid * cc - f[r0 : r0 + n]
            g_full = g_full + (r * wi[r0 : r0 + n]) @ r.T
        # its diagonals: gram[a, e] = G[a, a + e] (0 past the end)
        a_i = np.arange(n_res)[:, None]
        b_i = a_i + np.arange(nd)[None, :]
        gram = jnp.where(b_i < n_res, g_full[a_i, np.minimum(b_i, n_res - 1)], 0.0)
        u_here = -jnp.arctanh(q[n_lab] / C_KMS) * lg.inv_step
        return _probe_minima(obs.interp, gram, u_top, lg.inv_step, u_here)

    return over(one, (p, dv, flux, w, run))


#: The probe's samples per pixel interval, and the Newton steps that refine the best.
PROBE_SAMPLES = 9
PROBE_NEWTON = 6
#: The probe's reference is the minimum over the pixel interval of the fit's rv, and
#: over the neighbouring one too when the rv is closer than this [pixels] to their
#: node: the searches' interpolant has its minimum up to 0.02 pixels off the model's.
PROBE_NODE_TOL = 0.05


def _probe_minima(kind, gram, u_top, inv_step, u_here):
    """chi2 (R,) and rv (R,) at the minimum over each of the R pixel intervals of
    :func:`_rv_probe_batch`, from the diagonals ``gram`` (R + taps - 1, taps) of the
    Gram matrix of the slid models' weighted residuals; and () the minimum over the
    interval that holds the position ``u_here`` [pixels] (the fit's rv; inf when it
    is not one of the R), and the neighbouring one within ``PROBE_NODE_TOL`` of
    their node.

    Within interval j the model is ``sum_p w_p(t) m_(j + o_p)`` with weights that sum
    to 1 (:func:`~payne_lite.observe.tap_weights`), so its residual is the same
    combination of the slid residuals and chi2(t) = w(t)^T G_j w(t), G_j the taps'
    block of the Gram matrix: a polynomial in t (a parabola for the linear
    interpolant), sampled at ``PROBE_SAMPLES`` fractions, its best sample refined by
    ``PROBE_NEWTON`` Newton steps kept between the neighbouring samples (chi2 of a
    strong-lined star changes by orders of magnitude within a pixel), and the lower
    of the two kept. The chi2 returned is the model's at the rv returned."""
    n_res, nd = gram.shape
    n_r = n_res - nd + 1
    pq = np.arange(nd)
    lo, dist = np.minimum.outer(pq, pq), np.abs(np.subtract.outer(pq, pq))
    blocks = gram[np.arange(n_r)[:, None, None] + lo[None], dist[None]]  # (R, p, q)

    def taps(t):  # (R,) -> weights, first and second derivatives by t, (R, p) each
        def both(x):
            return tuple(jnp.stack(a, axis=-1) for a in tap_weights(kind, x))

        (w, dw), (_, d2w) = jax.jvp(both, (t,), (jnp.ones_like(t),))
        return w, dw, d2w

    def quad(u, v):  # u_r^T G_r v_r per interval r
        return jnp.einsum("rp,rpq,rq->r", u, blocks, v)

    ts = jnp.linspace(0.0, 1.0, PROBE_SAMPLES, dtype=gram.dtype)
    w_s = jnp.stack(tap_weights(kind, ts)[0], axis=-1)  # (S, p)
    c = jnp.einsum("sp,rpq,sq->rs", w_s, blocks, w_s)  # (R, S)
    i = jnp.argmin(c, axis=1)
    rows = jnp.arange(n_r)
    t_lo = ts[jnp.maximum(i - 1, 0)]
    t_hi = ts[jnp.minimum(i + 1, PROBE_SAMPLES - 1)]

    def newton(_, t):  # chi2 = w^T G w: g = 2 w'^T G w, h = 2 (w''^T G w + w'^T G w')
        w, dw, d2w = taps(t)
        g = 2.0 * quad(dw, w)
        h = 2.0 * (quad(d2w, w) + quad(dw, dw))
        step = jnp.where(
            h > 0, t - g / jnp.where(h > 0, h, 1.0), jnp.where(g > 0, t_lo, t_hi)
        )
        return jnp.clip(step, t_lo, t_hi)

    # a loop, not unrolled: the Newton steps were most of the probe's compile time
    t = jax.lax.fori_loop(0, PROBE_NEWTON, newton, ts[i])
    w_t = jnp.stack(tap_weights(kind, t)[0], axis=-1)
    c_ref = quad(w_t, w_t)
    use = c_ref <= c[rows, i]
    t_min = jnp.where(use, t, ts[i])
    c_min = jnp.where(use, c_ref, c[rows, i])
    u = u_top + jnp.arange(n_r, dtype=t_min.dtype) + t_min
    j0 = jnp.floor(u_here) - u_top
    t0 = u_here - jnp.floor(u_here)

    def interval_min(j):
        inside = (j >= 0) & (j < n_r)
        return jnp.where(
            inside, c_min[jnp.clip(j, 0, n_r - 1).astype(jnp.int32)], jnp.inf
        )

    # near a node the probe's own minimum may lie in the neighbouring interval
    c_here = jnp.minimum(
        interval_min(j0),
        jnp.where(t0 < PROBE_NODE_TOL, interval_min(j0 - 1), jnp.inf),
    )
    c_here = jnp.minimum(
        c_here, jnp.where(t0 > 1.0 - PROBE_NODE_TOL, interval_min(j0 + 1), jnp.inf)
    )
    return c_min, -C_KMS * jnp.tanh(u / inv_step), c_here


@jax.jit
def window_batch(obs, rv_lo, rv_hi):
    return over(lambda v: window_valid(obs, *v), (rv_lo, rv_hi))


# CPU executables compiled without XLA's intra-op task splitting (see ._lm).
scan_batch = serial_jit(scan_batch, ("common",), key=sequential_lanes)
rescan_batch = serial_jit(rescan_batch, ("common",), key=sequential_lanes)
chi2_batch = serial_jit(chi2_batch, key=sequential_lanes)
chi2_shared_batch = serial_jit(chi2_shared_batch, key=sequential_lanes)
_rv_probe_batch = serial_jit(_rv_probe_batch, key=sequential_lanes)
window_batch = serial_jit(window_batch, key=sequential_lanes)


# --------------------------------------------------------------------------------------
# NumPy boundary
# --------------------------------------------------------------------------------------


def scan_pixels(obs: ObsModel, rv_range) -> np.ndarray | None:
    """Pixels valid at every RV of the scan, when they are at least SCAN_COMMON_MIN
    of the pixels (for APOGEE and +-500 km/s: 90 %); else None (chi2 per pixel over
    each RV's own pixel set)."""
    dt = obs.x_obs.dtype
    ok = np.asarray(
        window_valid(obs, to_device(rv_range[0], dt), to_device(rv_range[1], dt))
    )
    return ok if ok.mean() >= SCAN_COMMON_MIN else None


def rv_pixel_kms(obs: ObsModel) -> float:
    """Velocity width of a pixel of the observed grid [km/s] (the median step)."""
    if obs.log_grid is not None:
        return C_KMS / obs.log_grid.inv_step
    wave = np.asarray(obs.wave_obs, np.float64)
    return float(C_KMS * np.median(np.diff(np.log(wave))))


def _rv_probe(obs, p, f_j, w_j, run, rv_lo, rv_hi, rv_i):
    """The probe of :func:`rv_polish` for single-spectrum vectors ``p`` (N, k)
    whose rv is entry ``rv_i``, bounded by ``rv_lo``, ``rv_hi`` (N,): returns the
    best probed rv (N,) and whether its chi2 is more than ``RV_PROBE_GAIN`` below
    the probe's own minimum at the current rv (only where ``run``).

    The probe shifts with the searches' interpolant (:func:`search_model`); its
    chi2 is compared with its own at the current rv (on a log grid its minimum
    over the pixel interval of that rv: the probe's interpolant has its minimum a
    little off the fit's), not with the fit's, so that an interpolant other than
    the model's moves no fit by its own difference."""
    obs = search_model(obs)
    dt = obs.x_obs.dtype
    px = rv_pixel_kms(obs)
    if obs.log_grid is not None:
        steps = np.arange(-RV_PROBE_CELLS, RV_PROBE_CELLS + 1, dtype=np.float64)
    else:
        steps = np.asarray(RV_PROBE_OFFSETS, np.float64)
        steps = np.concatenate([-steps[::-1], steps])
    rv = p[:, rv_i]
    dv = np.clip(rv[:, None] + steps[None, :] * px, rv_lo[:, None], rv_hi[:, None])
    dv = dv - rv[:, None]
    c_probe, rv_probe, here = _rv_probe_batch(
        obs, to_device(p, dt), to_device(dv, dt), f_j, w_j, to_device(run)
    )
    c_probe = np.asarray(c_probe, np.float64)
    c_probe = np.where(np.isfinite(c_probe), c_probe, np.inf)
    j = np.argmin(c_probe, axis=1)
    rows = np.arange(p.shape[0])
    gain = run & (c_probe[rows, j] < np.asarray(here, np.float64) - RV_PROBE_GAIN)
    rv_new = np.clip(np.asarray(rv_probe, np.float64)[rows, j], rv_lo, rv_hi)
    return rv_new, gain


def rv_polish(
    ctx, alive, f_j, w_j, bounds, lo, hi, mode, best: LMRows, n_visits=0
) -> LMRows:
    """Step 4 of :func:`._driver.lm_with_starts`: leave a local minimum in rv.

    Written when the Doppler shift interpolated linearly between rest pixels:
    chi2(rv) then had a kink wherever the pixels cross the rest nodes (every pixel
    at once on a log grid) and a fit could stop in a kink's notch or in the basin
    next to the true one, with labels bent to fit it (on 1,000 mock stars of the
    APOGEE network at S/N 50, 3.3 % of the LM rvs were more than 3 sigma from the
    truth, 0.3 % expected). With a smooth interpolant chi2(rv) is smooth and the
    polish changed no fit of those mocks; it still finds the fits that the scan
    started in the basin next to the true one, whose chi2 does not flag them, so
    :func:`._driver.lm_with_starts` runs it for every fit (``alive``).

    The probe (:func:`_rv_probe_batch`): chi2 with the labels, continuum and
    broadening held, minimised over rv exactly within the current pixel interval and
    the ``RV_PROBE_CELLS`` intervals either side on a log grid (7 shifts of one
    rest-frame model per star), else sampled at ``RV_PROBE_OFFSETS`` pixels either
    side; inside the star's rv bounds, with the searches' interpolant
    (:func:`search_model`). A star with a probe more than ``RV_PROBE_GAIN`` below the
    probe's own chi2 at its rv is fitted again from there; the lower chi2 is
    kept. Joint fits of visits (``n_visits`` > 0) probe each visit's rv alone, the
    labels and the other visits held, against the probe's own chi2 at that visit's
    rv, and refit the
    star jointly from the moved rvs. Stars that moved are probed again, up to
    ``RV_POLISH_ROUNDS`` rounds: a weak-lined star with broad lines can have a
    minimum at every pixel crossing, each a little lower towards the truth.
    """
    run = alive & np.isfinite(best.chi2)
    for _ in range(RV_POLISH_ROUNDS):
        if not run.any():
            break
        p0, again = _rv_moves(ctx, run, f_j, w_j, lo, hi, best.p, n_visits)
        if not again.any():
            break
        dt = ctx.obs.x_obs.dtype
        moved = lm_rows(
            lm_batch(
                ctx.obs,
                to_device(p0[:, None], dt),
                to_device(again[:, None]),
                f_j,
                w_j,
                *bounds,
                max_iter=ctx.max_iter,
                mode=mode,
            )
        )
        better = again & (moved.chi2 < best.chi2)
        best = best.where(better, moved, add_iter=True)
        run = better  # the next round probes only the stars that moved
    return best


def _rv_moves(ctx, run, f_j, w_j, lo, hi, p_best, n_visits):
    """One probe of :func:`rv_polish`: the starting vectors (n, k) with the probed
    rvs, and which stars (n,) have a probe more than ``RV_PROBE_GAIN`` lower."""
    obs = ctx.obs
    n_lab = ctx.layout.n_labels
    p0 = p_best.copy()
    if not n_visits:
        rv_new, gain = _rv_probe(
            obs, p_best, f_j, w_j, run, lo[:, n_lab], hi[:, n_lab], n_lab
        )
        p0[:, n_lab] = np.where(gain, rv_new, p0[:, n_lab])
        return p0, gain
    # each visit alone, the labels and the other visits held
    size = p_best.shape[0]
    vidx = visit_index(n_lab, n_visits, obs.n_cont, obs.n_broad)
    pv = p_best[:, vidx].reshape(size * n_visits, -1)
    fv = f_j.reshape(size * n_visits, -1)
    wv = w_j.reshape(size * n_visits, -1)
    runv = np.repeat(run, n_visits) & np.any(np.asarray(wv) > 0, axis=1)
    rv_sl = slice(n_lab, n_lab + n_visits)
    rv_new, gain = _rv_probe(
        obs, pv, fv, wv, runv, lo[:, rv_sl].reshape(-1), hi[:, rv_sl].reshape(-1),
        n_lab,
    )  # fmt: skip
    gain = gain.reshape(size, n_visits)
    p0[:, rv_sl] = np.where(gain, rv_new.reshape(size, n_visits), p0[:, rv_sl])
    return p0, gain.any(axis=1)
