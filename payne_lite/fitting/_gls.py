"""Generalised least squares under the one error model: ``estimator="gls"``.

The LM's estimator weights each pixel by ``1 / diag(C)`` (:mod:`payne_lite.observe.
_noise`, ``C = diag(D) + U^T U``) and reports that estimator's scatter under ``C``,
the sandwich. Where the emulator's correlated error ``U^T U`` dominates (high S/N)
that throws away what ``C`` knows about the error's pattern: the generalised
least-squares (GLS) estimate, the minimum of ``r^T C^-1 r``, is 2-5x more precise
there, and its covariance ``(J^T C^-1 J)^-1`` is the width of the samplers'
posterior under the same ``C`` (benchmarks/README.md, "What the error covariance
needs for a calibrated posterior").

From each point fit, :func:`gls_refine` takes Gauss-Newton steps on ``r^T C^-1 r``
with ``C`` held at the point fit (the basis placed at its rv and continuum, as the
samplers place it at their window's centre), by the Woodbury identity: per star the
device computes ``J D^-1 J^T`` (k, k), ``U D^-1 J^T`` (K, k), ``J D^-1 r``,
``U D^-1 r`` and, once, ``M0 = U D^-1 U^T`` (K, K); the host (float64) factors
``I + M0 = L L^T`` and forms ::

    J^T C^-1 J = J D^-1 J^T - G^T G,   J^T C^-1 r = J D^-1 r - G^T L^-1 U D^-1 r,

with ``G = L^-1 U D^-1 J^T``. ``M0`` costs ``K^2 P`` per star (K = 256 on APOGEE's
7,214 pixels: 0.47 GFLOP, against ~0.5 MFLOP for an LM step's ``J^T W J``), so GLS
is a setting, not the default.

The estimate is calibrated only if ``C`` is: with the 32 components a default
training keeps, the GLS posterior covers 0.30-0.55 of the truths at S/N 300; with
~256 components from >= 500 held-out spectra, 0.53-0.75 (same benchmark): give
the emulator such a basis with :meth:`payne_lite.Emulator.with_error_basis` on a
grid of spectra it was not trained on. That was a student of The Payne's APOGEE
network; the shipped default emulator against its synthesizer stays too narrow
under GLS with 256-1,024 components (coverage 0.50-0.62, sd of z 1.1-1.8 at S/N
300, ``benchmarks/bench_gls_default.py``): its error depends on the labels more
than one covariance holds. With the emulator's
:class:`~payne_lite.emulator.LocalError` (:meth:`payne_lite.Emulator.with_local_error`)
each star's ``U`` is instead the errors of the held-out spectra nearest its point
fit's labels, shrunk toward the global basis (rows of
:meth:`~payne_lite.emulator.LocalError.stacked` gathered on the device), and the
same pieces serve.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from .._serial import serial_jit
from ..errors import ErrorModelWarning
from ..observe import (
    basis_placer,
    diagonal_variance,
    jet_rows,
    observe_jac_t,
    param_blocks,
    param_order,
)
from ._lm import over, sequential_lanes

#: ``estimator="gls"`` warns (:class:`payne_lite.errors.ErrorModelWarning`) below
#: this many basis components: with 32 the GLS errors covered 0.30-0.55 of the
#: truths at S/N 300, with 128 0.57-0.68, with 256 0.53-0.75 (benchmarks/README.md).
GLS_MIN_RANK = 128
#: Gauss-Newton steps from the point fit at most.
GLS_MAX_STEPS = 6
#: The steps stop once every free parameter's step is below this many of its
#: conditional 1-sigma (the LM's own ``XTOL`` is 0.05 with one step taken after it).
GLS_XTOL = 0.01


@functools.partial(jax.jit, static_argnames=("with_m", "skip"))
def _gls_pieces(obs, p, pc, flux, var, pe2, basis, rows, *, with_m, skip=0):
    """Per star (axis 0): ``(J D^-1 J^T (k, k), U D^-1 J^T (K, k), J D^-1 r (k,),
    U D^-1 r (K,), r^T D^-1 r, [U D^-1 U^T (K, K)])`` at parameters ``p`` (n, k),
    ``r = flux - model``, ``U`` the basis placed at ``pc`` (n, k), ``D`` the data
    variances ``var`` (n, P; 0 = unused) plus the per-pixel emulator variance
    ``pe2`` less what ``U`` holds (:func:`diagonal_variance`).

    ``U`` is ``basis`` (K, P_rest) for every star, or with ``rows`` (n, K) int
    each star's own rows of it (:meth:`payne_lite.emulator.LocalError.rows`); the
    first ``skip`` rows of ``U`` are not subtracted from ``pe2`` (a local
    covariance's neighbours: ``pe2`` is the global model's rest).

    On a log grid the sums run over the span of the observed pixels, where the
    basis is placed fast (:func:`payne_lite.observe.basis_placer`)."""
    if rows is None:  # the basis embedded once per call
        shared, lay = basis_placer(obs, basis)
    else:
        lay = basis_placer(obs, basis[:1])[1]

    def placed(qc, r1):
        return shared(qc) if r1 is None else basis_placer(obs, basis[r1])[0](qc)

    def d_inverse(u, v1, e1):
        d = diagonal_variance(lay(v1), lay(e1), u[skip:])
        return jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1.0), 0.0)

    def one(args):
        q, qc, f1, v1, e1, r1 = args
        model, _, jac = observe_jac_t(obs, q)
        u = placed(qc, r1)
        d_inv = d_inverse(u, v1, e1)
        r = jnp.where(d_inv > 0, lay(f1 - model), 0.0)
        jac = lay(jac)
        jd, ud = jac * d_inv, u * d_inv
        out = (jd @ jac.T, ud @ jac.T, jd @ r, ud @ r, jnp.sum(d_inv * r * r))
        return (*out, ud @ u.T) if with_m else out

    def one_jet(args):
        # the LM's own rows (jet_rows, unweighted): x's row L + 1 is model - flux
        q, qc, f1, v1, e1, r1 = args
        u = placed(qc, r1)
        d_inv = d_inverse(u, v1, e1)
        x, jc = jet_rows(obs, q, lay(f1), jnp.where(d_inv > 0, 1.0, 0.0))
        res = obs.n_labels + 1
        xd, ud = x * d_inv, u * d_inv
        xx, ux = xd @ x.T, ud @ x.T  # (R, R), (K, R)
        if jc is None:
            a_d, h, g_d = param_blocks(obs, xx), ux[:, :res], xx[:res, res]
        else:
            cd = jc * d_inv
            cx = cd @ x.T
            a_d = param_blocks(obs, xx, cx, cd @ jc.T)
            h = jnp.concatenate([ux[:, :res], ud @ jc.T], axis=1)
            g_d = jnp.concatenate([xx[:res, res], cx[:, res]])
        perm = param_order(obs, h.shape[1])
        out = (a_d, h[:, perm], -g_d[perm], -ux[:, res], xx[res, res])
        return (*out, ud @ u.T) if with_m else out

    return over(one if obs.jet is None else one_jet, (p, pc, flux, var, pe2, rows))


_gls_pieces = serial_jit(_gls_pieces, ("with_m", "skip"), key=sequential_lanes)


def _woodbury(chol, pieces):
    """``(J^T C^-1 J (n, k, k), J^T C^-1 r (n, k), r^T C^-1 r (n,))`` (float64) from
    the Cholesky factors ``chol`` (n, K, K) of ``I + M0`` and :func:`_gls_pieces`."""
    a_d, h, g_d, hr, chi2_d = (np.asarray(x, np.float64) for x in pieces[:5])
    from scipy.linalg import solve_triangular

    a, g, chi2 = a_d.copy(), g_d.copy(), chi2_d.copy()
    for i in range(a.shape[0]):
        if not np.all(np.isfinite(chol[i])):
            a[i], g[i], chi2[i] = np.nan, np.nan, np.nan
            continue
        gi = solve_triangular(chol[i], np.column_stack([h[i], hr[i]]), lower=True)
        gj, gr = gi[:, :-1], gi[:, -1]
        a[i] -= gj.T @ gj
        g[i] -= gj.T @ gr
        chi2[i] -= gr @ gr
    return a, g, chi2


def warn_small_basis(emulator) -> None:
    """:class:`ErrorModelWarning` when ``emulator``'s basis has fewer than
    :data:`GLS_MIN_RANK` components (GLS uses it: no ``local_error``)."""
    if emulator.local_error is not None:
        return
    k = int(np.shape(emulator.error_basis)[0])
    if k < GLS_MIN_RANK:
        warnings.warn(
            f"estimator='gls' with an error_basis of {k} components: at high S/N its "
            f"errors come out too small (with 32: 0.30-0.55 of the truths within 1 "
            f"sigma at S/N 300); give the emulator >= {GLS_MIN_RANK} (256 measured) "
            "components of >= 500 held-out spectra first "
            "(emulator.with_error_basis(held_out_grid, rank=256)), and check the "
            "coverage on held-out mocks: where the emulator's error depends on the "
            "labels no number of components is enough (the shipped default's): "
            "emulator.with_local_error(held_out_grid) holds that",
            ErrorModelWarning,
            stacklevel=5,  # the caller of pl.fit
        )


def gls_refine(
    obs, basis, p, f_j, w_fit, w_data, lo, hi, free, alive, local=None, visits=None
):
    """The GLS estimate from the point fits ``p`` (n, k), ``C`` held at them.

    Args:
        obs: the fit's :class:`payne_lite.observe.ObsModel`.
        basis: (K, P_rest) the emulator's ``error_basis`` (device array), or with
            ``local`` its :meth:`~payne_lite.emulator.LocalError.stacked` rows.
        p: (n, k) point fits (fit space), the starting point and the centre of ``C``.
        f_j: (n, P) observed flux (device array); joint fits (``visits``) (n * V,
            P), each star's visits in turn.
        w_fit: (n, P) the fit's weights ``1 / (err^2 + pixel_error^2)`` (0 = unused);
            joint fits (n * V, P).
        w_data: (n, P) ``1 / err^2`` (0 = unused); joint fits (n * V, P).
        lo, hi: (n, k) bounds of the parameters; the steps are clipped to them.
        free: (k,) bool free parameters.
        alive: (n,) bool rows to refine (the others come back as they are).
        local: the emulator's :class:`payne_lite.emulator.LocalError`, or None:
            then each star's ``U`` is its rows of ``basis`` (its neighbours at the
            point fit's labels, then the global basis), ``D`` keeps ``shrink``
            times the per-pixel rest, and the rv variance gains the neighbours'
            Doppler shift variance (``LocalError.shift_variance``).
        visits: joint fits of visits: ``(vidx, ok)``, :func:`._lm.visit_index`
            (V, kv) and (n, V) bool real visits. The emulator's error is the
            star's, the same rest-frame ``U`` placed at each visit's rv, so ``C``
            couples the visits: the per-visit pieces add up in the star's
            parameters before the Woodbury identity, and the Doppler term moves
            every visit's rv together.

    Returns:
        ``(p, chi2, a, g, converged)``: the GLS estimate (n, k); ``r^T C^-1 r`` (n,),
        ``J^T C^-1 J`` (n, k, k) and ``J^T C^-1 r`` (n, k) there (float64; the
        covariance is ``a^-1`` over the free parameters); converged (n,) bool: the
        last step below :data:`GLS_XTOL` sigma.
    """
    dt = obs.x_obs.dtype
    n_lab = obs.n_labels
    vidx, ok = visits if visits is not None else (None, None)
    used = (w_fit > 0) & (w_data > 0)
    with np.errstate(divide="ignore"):
        var = np.where(used, 1.0 / np.where(used, w_data, 1.0), 0.0)
        pe2 = np.where(used, np.maximum(1.0 / np.where(used, w_fit, 1.0) - var, 0), 0)
    p = np.array(p, np.float64)
    n_vis = 1 if vidx is None else vidx.shape[0]
    near, skip, s2 = None, 0, None
    if local is not None:
        pe2 *= local.shrink
        n_global = basis.shape[0] - local.n_held_out
        near = np.repeat(local.rows(p[:, :n_lab], n_global), n_vis, axis=0)
        near, skip = jnp.asarray(near, jnp.int32), local.neighbours
        s2 = local.shift_variance(p[:, :n_lab])
    var_j, pe2_j = jnp.asarray(var, dt), jnp.asarray(pe2, dt)

    def rows_of(q):  # (n, k) -> one row per spectrum (n * V, kv)
        return q if vidx is None else q[:, vidx].reshape(-1, vidx.shape[1])

    pc = jnp.asarray(rows_of(p), dt)

    def pieces(q, with_m):
        out = _gls_pieces(
            obs, jnp.asarray(rows_of(q), dt), pc, f_j, var_j, pe2_j, basis, near,
            with_m=with_m, skip=skip,
        )  # fmt: skip
        out = [np.asarray(x, np.float64) for x in out]
        return out if vidx is None else _joint_pieces(out, vidx, ok, p.shape[1])

    first = pieces(p, True)
    m0 = 0.5 * (first[-1] + np.swapaxes(first[-1], 1, 2)) + np.eye(first[-1].shape[-1])
    chol = np.full_like(m0, np.nan)
    for i in np.flatnonzero(alive):
        try:
            chol[i] = np.linalg.cholesky(m0[i])
        except np.linalg.LinAlgError:  # non-finite pieces: NaN covariance, flagged
            pass
    cur = first[:5]
    fi = np.flatnonzero(free)
    converged = np.zeros(p.shape[0], bool)
    for step in range(GLS_MAX_STEPS + 1):
        a, g, chi2 = _woodbury(chol, cur)
        if step == GLS_MAX_STEPS:
            break
        todo = alive & ~converged & np.all(np.isfinite(a), axis=(1, 2))
        if not todo.any():
            break
        af = a[np.ix_(todo, fi, fi)]
        try:
            d = np.linalg.solve(af, g[todo][:, fi, None])[..., 0]
        except np.linalg.LinAlgError:
            d = np.stack([np.linalg.lstsq(x, y, rcond=None)[0]
                          for x, y in zip(af, g[todo][:, fi], strict=True)])  # fmt: skip
        size = np.abs(d) * np.sqrt(np.abs(np.diagonal(af, axis1=1, axis2=2)))
        rows = np.flatnonzero(todo)
        q = p[rows]
        q[:, fi] = np.clip(q[:, fi] + d, lo[rows][:, fi], hi[rows][:, fi])
        p[rows] = q
        converged[rows] = np.max(size, axis=1) < GLS_XTOL
        cur = pieces(p, False)
    if s2 is not None:
        # the neighbours' Doppler zero point moves every rv of the star together
        rv = np.zeros((p.shape[0], p.shape[1]))
        if vidx is None:
            rv[:, n_lab] = 1.0
        else:
            rv[:, n_lab : n_lab + n_vis] = ok
        rv[:, ~np.asarray(free, bool)] = 0.0
        a = _add_rv_variance(a, s2, fi, rv)
    return p, chi2, a, g, converged & alive


def _joint_pieces(out, vidx, ok, k):
    """:func:`_gls_pieces` of each visit (n * V rows, its own vector ``vidx``) as
    the star's (n rows, ``k`` parameters): the visits' sums. A padding visit
    (``ok`` False: no weight, all pieces zero) gets a unit information on its own
    rv and continuum so that the joint system stays solvable."""
    n, n_vis = ok.shape
    a_v, h_v, g_v, hr_v, chi2_v = (x.reshape(n, n_vis, *x.shape[1:]) for x in out[:5])
    a = np.zeros((n, k, k))
    h = np.zeros((n, h_v.shape[2], k))
    g = np.zeros((n, k))
    for v in range(n_vis):
        a[:, vidx[v][:, None], vidx[v][None, :]] += a_v[:, v]
        h[:, :, vidx[v]] += h_v[:, v]
        g[:, vidx[v]] += g_v[:, v]
    shared = functools.reduce(np.intersect1d, list(vidx))  # labels, broadening
    for v in range(n_vis):
        own = np.setdiff1d(vidx[v], shared)  # its rv and continuum
        a[:, own, own] += np.where(ok[:, v], 0.0, 1.0)[:, None]
    joint = [a, h, g, hr_v.sum(axis=1), chi2_v.sum(axis=1)]
    if len(out) > 5:
        joint.append(out[5].reshape(n, n_vis, *out[5].shape[1:]).sum(axis=1))
    return joint


def _add_rv_variance(a, s2, fi, rv):
    """The information ``a`` (n, k, k) with ``s2`` (n,) [km^2/s^2] added to the
    variance along ``rv`` (n, k) (a star's rv, or every rv of its visits) in its
    free block (indices ``fi``): ``(a_f^-1 + s2 v v^T)^-1 = a_f - s2 (a_f v)(a_f
    v)^T / (1 + s2 v^T a_f v)`` by Sherman-Morrison. It is ``J^T C'^-1 J`` for ``C'
    = C + s2 d d^T``, ``d = J v`` the model's derivative along ``v`` (the estimate
    and ``chi2`` are unchanged)."""
    a = np.array(a, np.float64)
    af = a[:, fi[:, None], fi[None, :]]
    v = np.asarray(rv, np.float64)[:, fi]
    col = np.einsum("nij,nj->ni", af, v)  # a_f v (n, kf)
    den = 1.0 + s2 * np.einsum("ni,ni->n", v, col)
    af = af - (s2 / den)[:, None, None] * col[:, :, None] * col[:, None, :]
    a[:, fi[:, None], fi[None, :]] = af
    return a
