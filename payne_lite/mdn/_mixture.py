"""The MDN's fixed feature extraction and its mixture head (pure, jitted kernels).

Architecture (chosen by measurement, ``benchmarks/bench_mdn.py --arch``): fixed,
cheap feature extraction, then a small MLP that outputs a mixture of ``n_components``
Gaussians per output dimension (independent dimensions). One Adam step on 512
APOGEE spectra took 3 ms for the MLP on 79 features and 2.5 s for a small 1-D CNN
(4 conv layers, 16-32 channels) on the 7214 pixels: ~20,000 steps fit the 15-minute
training budget only for the former. A fixed compression of observed-frame flux
cannot follow lines shifted by up to 120 pixels (500 km/s), so the features are
taken in the rest frame found by cross-correlation:

1. RV: ``d = 1 - flux`` (unusable pixels 0) cross-correlated with the mean training
   spectrum ``1 - mean`` shifted over a coarse grid (``RV_COARSE_STEP`` = 10 km/s
   over the training rv range), normalised by the template's norm over the usable
   pixels (the least-squares peak; unnormalised, masks beside lines biased rv),
   parabolic peak ``rv_c``; the spectrum is moved to that frame (the fitter's
   relativistic shift and linear interpolation, :func:`payne_lite.observe.shift_pair`)
   and correlated again on a fine grid (``RV_FINE_STEP`` = 0.5 km/s within +-
   ``RV_FINE_HALF``), parabolic peak ``rv_ccf``.
2. Compression: the residual of the spectrum in the ``rv_c`` frame from the mean
   spectrum, unusable and off-grid pixels set to the mean (residual 0), projected on
   ``n_pca`` principal components of noise-free emulator spectra, a linear and a
   quadratic trend (continuum tilts) and the mean spectrum's derivative (the
   remaining sub-pixel shift ``rv_ccf - rv_c``; a second shift to ``rv_ccf`` cost a
   third of the feature time).
3. MLP input: those coefficients, the fine CCF normalised to its peak,
   ``rv_ccf - rv_c``, ``rv_ccf``, log of the mean error and the fraction of usable
   pixels, each standardised with the training set's mean and spread (features with
   no spread are switched off).
4. Output per dimension: mixture logits, means and ``sigma = softplus(raw) +
   SIGMA_FLOOR``, in scaled units: labels scaled to the training box ([-0.5, 0.5]),
   rv as ``(rv - rv_ccf) / RV_OUT_SCALE``. :meth:`MDN.predict` returns the mixture's
   mean and standard deviation (moment matched) in physical units.

Precision: float32 throughout (features and MLP); the templates and PCA basis are
computed in float64 on the host.

References:
    Bishop 1994, "Mixture density networks", Aston University NCRG/94/004.
    Rhea et al. 2021, RNAAS 5, 276; Rhea et al. 2022 (LUCI).
    Ting, Conroy, Rix & Cargile 2019, ApJ 879, 69 ("The Payne").
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..constants import C_KMS
from ..observe import (
    ObsModel,
    gap_cum,
    make_log_grid,
    make_lookup,
    shift_pair,
)

Array = jax.Array

#: Coarse cross-correlation RV grid step [km/s].
RV_COARSE_STEP = 10.0
#: Fine cross-correlation: step [km/s] and half-width [km/s] around the coarse peak.
RV_FINE_STEP = 0.5
RV_FINE_HALF = 10.0
#: The coarse CCF correlates sums of this many neighbouring pixels with the
#: templates' means over them, and its norm uses sums of ``NORM_BIN`` pixels: a
#: peak found to a few km/s is enough for the fine search (+-RV_FINE_HALF), at
#: 3/8 of the full-resolution cost.
COARSE_BIN = 2
NORM_BIN = 4
#: Fine templates (and their squares) enter as rank-r factors: singular values
#: below this fraction of the largest are dropped (41 templates -> ~10).
FINE_RTOL = 1e-6
#: The rv output is ``rv_ccf + RV_OUT_SCALE * (network output)`` [km/s].
RV_OUT_SCALE = 1.0
#: Smallest sigma, in scaled units (labels: fraction of the box; rv: RV_OUT_SCALE).
SIGMA_FLOOR = 1e-3


# --------------------------------------------------------------------------------------
# Pytrees
# --------------------------------------------------------------------------------------
class MLP(NamedTuple):
    """Weights ``(D_in, H)``, ..., ``(H, D_out)`` and biases of a tanh MLP."""

    weights: tuple
    biases: tuple


class Features(NamedTuple):
    """Fixed (not trained) arrays of the feature extraction, as a pytree.

    ``P`` is the number of pixels, ``Q`` the length of the rest-frame span: on a
    log-uniform grid the pixels' embedded span (chip gaps included, as zero
    columns), else ``Q = P``.
    """

    mean: Array  # (Q,) mean noise-free training spectrum, rest frame
    coarse: Array  # (R, P / COARSE_BIN) 1 - mean at every coarse rv, binned (mean)
    coarse_sq: Array  # (R, P / NORM_BIN) its square, binned (mean)
    fine_v: Array  # (Q, r) rank-r factor of the fine templates: fine = fine_a fine_v^T
    fine_a: Array  # (F, r)
    fine_v2: Array  # (Q, r2) the same for the squared fine templates
    fine_a2: Array  # (F, r2)
    basis: Array  # (Q, K) orthonormal: PCA components and trends
    mu: Array  # (D,) feature mean (training set)
    sd: Array  # (D,) feature spread


# --------------------------------------------------------------------------------------
# Pure, jitted core
# --------------------------------------------------------------------------------------
def _parabola(y, i, n):
    """Sub-grid offset in [-0.5, 0.5] of the peak of ``y`` (R,) at index ``i``."""
    a = y[jnp.clip(i - 1, 0, n - 1)]
    b = y[i]
    c = y[jnp.clip(i + 1, 0, n - 1)]
    den = a - 2.0 * b + c
    off = jnp.where(den < 0, 0.5 * (a - c) / jnp.where(den < 0, den, -1.0), 0.0)
    return jnp.clip(off, -0.5, 0.5)


def _to_rest(grid: ObsModel, d, g, rv):
    """``d`` (P,) observed at rv -> rest frame; usable mask (P,) (one star).

    Unusable pixels enter as NaN, so one interpolated row carries both: a rest
    pixel is usable when both its neighbours were (half the work of shifting the
    mask as a second row)."""
    sh = shift_pair(grid, jnp.where(g > 0, d, jnp.nan)[None], -rv)
    out = sh.value()[0]
    ok = sh.valid & jnp.isfinite(out)
    return jnp.where(ok, out, 0.0), ok


def _parabola_rows(y, step):
    """Peak index (n,) and sub-grid offset (n,) [grid steps] of each row of ``y``."""
    i = jnp.argmax(y, axis=1)
    off = jax.vmap(_parabola, in_axes=(0, 0, None))(y, i, y.shape[1])
    return i, off * step


def _bin(x, k: int):
    """Sums of ``k`` neighbouring columns of ``x`` (n, P); the last ``P mod k`` are
    dropped. Strided slices: XLA:CPU vectorises them (a reshape-and-sum over the
    minor axis ran 15x slower)."""
    m = x.shape[1] // k
    return sum(x[:, j : j + k * m : k] for j in range(k))


def bin_rows(t: np.ndarray, k: int) -> np.ndarray:
    """Means of ``k`` neighbouring columns of ``t`` (R, P) (host), as :func:`_bin`."""
    m = t.shape[1] // k
    return t[:, : k * m].reshape(t.shape[0], m, k).mean(axis=2)


def low_rank(t: np.ndarray, rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """``(v (Q, r), a (F, r))`` with ``t (F, Q) ~ a v^T``: the singular values above
    ``rtol`` of the largest (host, float64)."""
    u, sv, vt = np.linalg.svd(np.asarray(t, np.float64), full_matrices=False)
    r = max(1, int(np.sum(sv > rtol * sv[0])))
    return vt[:r].T, u[:, :r] * sv[:r]


def _span(lg) -> tuple[int, int]:
    """First embedded index and length of the observed pixels' span on a LogGrid."""
    first = lg.obs[0][1]
    return first, lg.obs[-1][1] + lg.obs[-1][2] - first


def to_span(lg, x: np.ndarray) -> np.ndarray:
    """(..., P) pixel values -> (..., Q) on the embedded span, zeros in gaps (host)."""
    first, q = _span(lg)
    out = np.zeros((*x.shape[:-1], q), x.dtype)
    for r0, e0, n in lg.obs:
        out[..., e0 - first : e0 - first + n] = x[..., r0 : r0 + n]
    return out


def _rest_span_rows(grid: ObsModel, d, rv):
    """Rows ``d`` (n, P) observed at rv (n,) (NaN = unusable) -> rest frame on the
    embedded span (n, Q), NaN where unusable, off the grid or in a gap.

    The batch is embedded once (NaN-filled, in-place updates); each row is then two
    contiguous slices and one interpolation (``lax.map``: under ``vmap`` the slices
    become general gathers, 2x slower on CPU).
    """
    lg = grid.log_grid
    n = d.shape[0]
    emb = jnp.full((n, lg.size), jnp.nan, d.dtype)
    for r0, e0, m in lg.rest:
        emb = jax.lax.dynamic_update_slice_in_dim(emb, d[:, r0 : r0 + m], e0, axis=1)
    first, q = _span(lg)
    u = jnp.arctanh(rv / C_KMS) * lg.inv_step  # rest position - observed [pixels]
    kf = jnp.floor(u)
    t = jnp.where(jnp.abs(kf) <= lg.pad - 2, u - kf, jnp.nan)
    k = kf.astype(jnp.int32)

    def one(args):
        row, k, t = args
        a = jax.lax.dynamic_slice_in_dim(row, first + k, q)
        b = jax.lax.dynamic_slice_in_dim(row, first + k + 1, q)
        return a + t * (b - a)

    return jax.lax.map(one, (emb, k, t))


def features(grid: ObsModel, fx: Features, rv_coarse, rv_fine, flux, err, mask):
    """Raw features (n, D), ``rv_ccf`` (n,) [km/s] and the usable fraction (n,)
    (unstandardised). Pure.

    ``flux``, ``err`` (n, P); pixels with ``mask`` True, non-finite flux or error, or
    error <= 0 are not used (their values never reach the arithmetic).
    """
    good = ~mask & jnp.isfinite(flux) & jnp.isfinite(err) & (err > 0)
    gf = good.astype(fx.mean.dtype)
    d = jnp.where(good, 1.0 - flux, 0.0)
    # coarse CCF on binned pixels: the numerator on pairs, the norm on quadruples
    num = _bin(d, COARSE_BIN) @ fx.coarse.T
    den = _bin(gf, NORM_BIN) @ fx.coarse_sq.T
    cc = num / jnp.sqrt(jnp.maximum(den, 1e-30))
    i, off = _parabola_rows(cc, RV_COARSE_STEP)
    rv_c = rv_coarse[i] + off
    if grid.log_grid is not None:
        rest = _rest_span_rows(grid, jnp.where(good, d, jnp.nan), rv_c)
        g1 = jnp.isfinite(rest)
        d1 = jnp.where(g1, rest, 0.0)
    else:
        d1, g1 = jax.lax.map(lambda a: _to_rest(grid, *a), (d, gf, rv_c))
    g1f = g1.astype(gf.dtype)
    cf = ((d1 @ fx.fine_v) @ fx.fine_a.T) / jnp.sqrt(
        jnp.maximum((g1f @ fx.fine_v2) @ fx.fine_a2.T, 1e-30)
    )
    j, off = _parabola_rows(cf, RV_FINE_STEP)
    rv = rv_c + rv_fine[j] + off
    # Compressed in the frame of rv_c, |rv - rv_c| < ~1 pixel: the basis holds the
    # mean spectrum's derivative and the MLP gets rv - rv_c, so a second shift is
    # not needed.
    z = jnp.where(g1, d1 - (1.0 - fx.mean), 0.0) @ fx.basis
    n_good = jnp.maximum(jnp.sum(gf, axis=1), 1.0)
    mean_err = jnp.sum(jnp.where(good, err, 0.0), axis=1) / n_good
    peak = jnp.maximum(jnp.max(cf, axis=1, keepdims=True), 1e-12)
    extra = jnp.stack(
        [
            (rv - rv_c) / RV_FINE_HALF,
            rv / 100.0,
            jnp.log(jnp.maximum(mean_err, 1e-30)),
            jnp.sum(g1f, axis=1) / flux.shape[1],
        ],
        axis=1,
    )
    return jnp.concatenate([z, cf / peak, extra], axis=1), rv, jnp.mean(gf, axis=1)


def mlp_forward(net: MLP, x):
    """Raw MLP output for standardised features ``x`` (D,)."""
    h = x
    for w, b in zip(net.weights[:-1], net.biases[:-1], strict=True):
        h = jnp.tanh(h @ w + b)
    return h @ net.weights[-1] + net.biases[-1]


def mixture_params(out, n_dim: int, n_comp: int):
    """Raw output (..., 3 m n_dim) -> log weights, means, sigmas (..., n_dim, m)."""
    out = out.reshape(*out.shape[:-1], n_dim, 3, n_comp)
    logw = jax.nn.log_softmax(out[..., 0, :], axis=-1)
    mu = out[..., 1, :]
    sigma = jax.nn.softplus(out[..., 2, :]) + SIGMA_FLOOR
    return logw, mu, sigma


def mixture_nll(logw, mu, sigma, y):
    """Negative log-likelihood of ``y`` (..., n_dim) under independent mixtures
    (..., n_dim, m) per dimension, summed over dimensions."""
    z = (y[..., None] - mu) / sigma
    logp = logw - 0.5 * z * z - jnp.log(sigma) - 0.5 * jnp.log(2.0 * jnp.pi)
    return -jnp.sum(jax.scipy.special.logsumexp(logp, axis=-1), axis=-1)


def mixture_moments(logw, mu, sigma):
    """Mean and standard deviation (..., n_dim) of the mixtures."""
    w = jnp.exp(logw)
    m = jnp.sum(w * mu, axis=-1)
    var = jnp.sum(w * (sigma**2 + (mu - m[..., None]) ** 2), axis=-1)
    return m, jnp.sqrt(var)


@functools.partial(jax.jit, static_argnames=("n_dim", "n_comp"))
def predict_scaled(
    net, grid, fx, rv_coarse, rv_fine, flux, err, mask, *, n_dim, n_comp
):
    """Mean, sigma (n, n_dim) in scaled units, rv_ccf (n,), good fraction (n,)."""
    feat, rv, frac = features(grid, fx, rv_coarse, rv_fine, flux, err, mask)
    x = (feat - fx.mu) / fx.sd
    out = jax.vmap(mlp_forward, in_axes=(None, 0))(net, x)
    m, s = mixture_moments(*mixture_params(out, n_dim, n_comp))
    return m, s, rv, frac


@jax.jit
def context_scaled(grid, fx, rv_coarse, rv_fine, flux, err, mask):
    """Standardised features (n, D) (the MLP's and the flow's input), rv_ccf (n,),
    good fraction (n,)."""
    feat, rv, frac = features(grid, fx, rv_coarse, rv_fine, flux, err, mask)
    return (feat - fx.mu) / fx.sd, rv, frac


@jax.jit
def features_batch(grid, fx, rv_coarse, rv_fine, flux, err, mask):
    return features(grid, fx, rv_coarse, rv_fine, flux, err, mask)[:2]


@jax.jit
def shift_batch(grid, rest, rv):
    """Rest-frame spectra (n, P) observed at rv (n,): flux and validity (n, P)."""

    def one(f, v):
        sh = shift_pair(grid, f[None], v)
        return sh.value()[0], sh.valid

    return jax.vmap(one)(rest, rv)


@jax.jit
def template_rows(grid, t0, rvs):
    """``t0`` (P,) shifted to every rv of ``rvs`` (R,); 0 where not valid."""

    def one(v):
        sh = shift_pair(grid, t0[None], v)
        return jnp.where(sh.valid, sh.value()[0], 0.0)

    return jax.lax.map(one, rvs)


# --------------------------------------------------------------------------------------
# Host side (shared by the MDN class and training)
# --------------------------------------------------------------------------------------
def grid_model(wavelength: np.ndarray, rv_max: float, dtype) -> ObsModel:
    """An :class:`ObsModel` with rest = observed = ``wavelength`` (shifts only)."""
    wave = np.asarray(wavelength, np.float64)
    ref = 0.5 * (wave[0] + wave[-1])
    return ObsModel(
        net=None,
        x_rest=jnp.asarray(wave - ref, dtype),
        gap_cum=jnp.asarray(gap_cum(wave)),
        x_obs=jnp.asarray(wave - ref, dtype),
        wave_obs=jnp.asarray(wave, dtype),
        basis=jnp.ones((wave.size, 1), dtype),
        lookup=make_lookup(wave - ref, dtype),
        activation="",
        n_labels=0,
        log_grid=make_log_grid(wave, wave, rv_max),
        interp="linear",
    )


def rv_grids(rv_range) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = rv_range
    n = int(np.ceil((hi - lo) / RV_COARSE_STEP)) + 3  # one step beyond each end
    coarse = lo - RV_COARSE_STEP + RV_COARSE_STEP * np.arange(n)
    nf = int(round(RV_FINE_HALF / RV_FINE_STEP))
    fine = RV_FINE_STEP * np.arange(-nf, nf + 1)
    return coarse, fine
