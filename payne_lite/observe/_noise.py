"""One error model for every method: flux errors, the emulator's per-pixel error and
its correlated part, as one Gaussian covariance per spectrum.

The residual ``r = model - flux`` (P,) of one spectrum is Gaussian with covariance ::

    C = diag(D) + U^T U

* ``D`` (P,): the flux variances plus the part of the emulator's per-pixel variance
  (``Emulator.pixel_error ** 2``) that its low-rank part does not already hold,
  ``max(pixel_error^2 - diag(U^T U), 0)`` (:func:`diagonal_variance`); pixels
  without weight (masked, bad, outside the RV window) have ``1 / D = 0``, which
  drops them out exactly (the formulas below then are those of the good pixels'
  own covariance, whatever ``U`` holds there);
* ``U`` (K, P): the emulator's ``error_basis`` (its held-out errors' K leading
  principal components, on the rest grid) mapped like the model: shifted to the
  star's rv and times its continuum (:func:`basis_on`).

Without an ``error_basis``, ``U`` is absent and ``C = diag(D)``: per-pixel
quadrature, the weights ``1 / (err^2 + pixel_error^2)`` (unchanged, at no extra
cost). With one, ``C^-1`` comes from the Woodbury identity, ::

    C^-1 = D^-1 - D^-1 U^T M^-1 U D^-1,     M = I_K + U D^-1 U^T  (K, K)

so nothing of size P x P is ever formed: with ``M = L L^T`` (Cholesky, on the host,
once per spectrum) and ``V = L^-1 U D^-1`` (K, P), ``C^-1 = D^-1 - V^T V``, and

* ``chi2 = r^T C^-1 r = sum(r^2 / D) - |V r|^2`` (:meth:`ErrorModel.chi2`),
* Gauss-Newton: ``J^T C^-1 J`` and ``J^T C^-1 r`` (:meth:`ErrorModel.normal`),
* ``log det C = sum log D + log det M`` (:func:`log_det`).

``C`` is held fixed per spectrum (``U`` and the emulator's per-pixel error taken at
one rv and continuum: the LM fit's, or the sampler's window centre), so
``log det C`` is constant in the parameters and the log posterior omits it.

Who uses it: the samplers' log likelihood (:mod:`payne_lite.posterior`: emcee,
NUTS, mdn-is, through their ``Target``: ``w = 1 / D``, ``v = V``), and the point
fits with ``estimator="gls"`` (:mod:`payne_lite.fitting._gls`: the minimum of
``r^T C^-1 r`` and ``(J^T C^-1 J)^-1``, the posterior's centre and width at high
S/N; the samplers start from it). By default the point fits (LM and curve_fit)
estimate by least squares with the per-pixel weights ``1 / diag(C)``, and the
covariance they report is that estimator's scatter under ``C``'s low-rank part
plus the flux variances, the sandwich (:func:`payne_lite.fitting._lm.sandwich_meat`,
the basis placed as :func:`basis_on` does). ``(J^T C^-1 J)^-1``
(:func:`low_rank_pieces`, :func:`woodbury_information`) is at most the sandwich,
much below it where ``U^T U`` dominates ``D`` (high S/N).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._doppler import embed, shift_pair
from ._model import embed_obs, shift_span

__all__ = [
    "ErrorModel",
    "basis_on",
    "basis_placer",
    "build_error_model",
    "diagonal_variance",
    "log_det",
    "low_rank_pieces",
    "woodbury_information",
]

Array = jax.Array


class ErrorModel(NamedTuple):
    """One spectrum's inverse covariance ``C^-1 = diag(d_inv) - v^T v`` (a pytree).

    ``v`` None: diagonal, ``C^-1 = diag(d_inv)`` (no low-rank part, no extra cost).
    Build it with :func:`build_error_model`.
    """

    d_inv: Array  # (P,) 1 / D; 0 = pixel unused
    v: Array | None = None  # (K, P) L^-1 U D^-1, or None

    def chi2(self, r):
        """``r^T C^-1 r`` of residuals ``r`` (P,)."""
        out = jnp.sum(self.d_inv * r * r)
        if self.v is not None:
            vr = self.v @ r
            out = out - vr @ vr
        return out

    def normal(self, jac, r):
        """``(chi2, J^T C^-1 J (k, k), J^T C^-1 r (k,))`` of the model's Jacobian
        ``jac`` (k, P) (rows: parameters) and residuals ``r`` (P,)."""
        jd = jac * self.d_inv
        a, g = jd @ jac.T, jd @ r
        if self.v is not None:
            vj, vr = self.v @ jac.T, self.v @ r  # (K, k), (K,)
            a, g = a - vj.T @ vj, g - vj.T @ vr
        return self.chi2(r), a, g


def diagonal_variance(var_data, var_emu, u=None):
    """``D`` (P,) [flux^2]: the data variances ``var_data`` (P,) (0 = pixel unused)
    plus the emulator's per-pixel variance ``var_emu`` (P,) less what the low-rank
    part ``u`` (K, P) holds on the diagonal (never below 0); 0 where unused.
    NumPy or JAX arrays alike."""
    xp = jnp if isinstance(var_data, jax.Array) else np
    extra = var_emu
    if u is not None:
        extra = xp.maximum(var_emu - xp.sum(u * u, axis=0), 0.0)
    return xp.where(var_data > 0, var_data + extra, 0.0)


def _chol_m(ud, u):
    """Cholesky factor (K, K) of ``M = I + U D^-1 U^T`` (float64, host)."""
    m = ud @ u.T
    return np.linalg.cholesky(m + np.eye(m.shape[0]))


def build_error_model(d, u=None) -> ErrorModel:
    """The :class:`ErrorModel` (NumPy float64 arrays) of ``C = diag(d) + u^T u``.

    Args:
        d: (P,) diagonal variances [flux^2], 0 (or non-finite) = pixel unused
            (:func:`diagonal_variance`).
        u: (K, P) low-rank factor [flux], or None (diagonal only). Its columns at
            unused pixels are ignored.
    """
    d = np.asarray(d, np.float64)
    good = np.isfinite(d) & (d > 0)
    d_inv = np.where(good, 1.0 / np.where(good, d, 1.0), 0.0)
    if u is None:
        return ErrorModel(d_inv)
    u = np.where(good, np.asarray(u, np.float64), 0.0)
    ud = u * d_inv
    chol = _chol_m(ud, u)
    from scipy.linalg import solve_triangular

    return ErrorModel(d_inv, solve_triangular(chol, ud, lower=True))


def log_det(d, u=None) -> float:
    """``log det C`` over the used pixels (``d > 0``), float64, host: ``sum log d +
    log det(I + u D^-1 u^T)``. Constant in the labels for a fixed ``C`` (the log
    posterior omits it)."""
    d = np.asarray(d, np.float64)
    good = np.isfinite(d) & (d > 0)
    out = float(np.sum(np.log(d[good])))
    if u is not None:
        ug = np.asarray(u, np.float64)[:, good]
        chol = _chol_m(ug / d[good], ug)
        out += 2.0 * float(np.sum(np.log(np.diag(chol))))
    return out


def basis_on(obs, basis, p):
    """The emulator's error basis ``basis`` (K, P_rest) as the model sees it at
    parameters ``p`` (k,): shifted to ``p``'s rv and times its continuum (K, P_obs),
    as :func:`payne_lite.observe.observe` maps the emulator's flux (no instrumental
    broadening: the basis is the error of the rest-frame emulator). Pure, jittable."""
    b = shift_pair(obs, basis, p[obs.n_labels]).value()
    if obs.n_cont:
        b = b * (obs.cont_params(p) @ obs.basis.T)
    return b


def basis_placer(obs, basis):
    """``(place, lay)`` for sums over pixels with the basis placed like the model:
    ``place(p)`` is the basis ``basis`` (K, P_rest) at parameters ``p`` (K, n) and
    ``lay(x)`` puts observed-pixel arrays (..., P_obs) in the same layout (..., n).

    On a log grid the layout is the span of the observed pixels
    (:func:`payne_lite.observe.embed_obs`, zeros between chips, which carry no
    weight), where each basis row is shifted by one dynamic slice per tap
    (:func:`shift_span`, ~1.3 us a row on APOGEE's grid); :func:`basis_on`'s
    observed layout (a slice per tap and chip, concatenated) is scalar code on
    XLA:CPU, ~11 ms a star for 256 rows. Elsewhere it is the observed pixels
    themselves and :func:`basis_on`. Pure, jittable (call it inside the jitted
    function: the embedding of ``basis`` is done once per call there)."""
    lg = obs.log_grid
    if lg is None:
        return (lambda p: basis_on(obs, basis, p)), (lambda x: x)
    emb = embed(lg, basis)  # (K, lg.size)

    def lay(x):
        return embed_obs(obs, x)

    def place(p):
        u, _ = shift_span(obs, emb, p[obs.n_labels])
        if obs.n_cont:
            u = u * lay(obs.cont_params(p) @ obs.basis.T)
        return u

    return place, lay


def low_rank_pieces(jac, var_data, var_emu, u):
    """One spectrum's pieces of ``J^T C^-1 J`` (pure, jittable): ``J^T D^-1 J``
    (k, k), ``U D^-1 J^T`` (K, k) and ``U D^-1 U^T`` (K, K), with ``D`` of
    :func:`diagonal_variance` (``var_data`` (P,), 0 = unused) and ``u`` (K, P).

    Sums of these over the visits of one star (whose emulator error, that of its
    labels, is the same in each) give the joint fit's; :func:`woodbury_information`
    turns the sums into ``J^T C^-1 J``."""
    d = diagonal_variance(var_data, var_emu, u)
    d_inv = jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1.0), 0.0)
    jd = jac * d_inv
    ud = u * d_inv
    return jd @ jac.T, ud @ jac.T, ud @ u.T


def woodbury_information(a_d, h, m0):
    """``J^T C^-1 J = A_D - H^T (I + M0)^-1 H`` (n, k, k) float64 from the summed
    :func:`low_rank_pieces` ``a_d`` (n, k, k), ``h`` (n, K, k), ``m0`` (n, K, K)
    (host, NumPy: one K x K Cholesky per spectrum)."""
    a_d, h, m0 = (np.asarray(x, np.float64) for x in (a_d, h, m0))
    eye = np.eye(m0.shape[-1])
    out = np.array(a_d)
    for i in range(a_d.shape[0]):
        try:
            chol = np.linalg.cholesky(m0[i] + eye)
        except np.linalg.LinAlgError:  # non-finite pieces: the covariance is NaN
            out[i] = np.nan
            continue
        g = np.linalg.solve(chol, h[i])  # L^-1 H (K, k)
        out[i] = a_d[i] - g.T @ g
    return out
