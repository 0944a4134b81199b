"""Mixture density network (MDN): observed spectrum -> a Gaussian per label and RV.

``mdn = train_mdn(emulator, seed=0)``; ``mean, sigma = mdn.predict(flux, flux_err)``,
both (n, L + 1) in physical units: the emulator's labels, then rv [km/s]. The fitter
uses them as starting point and bounds (``payne_lite.fit(..., mdn=mdn)``), as LUCI
does (Rhea et al. 2021, 2022; Bishop 1994 for MDNs).

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

Training (:func:`train_mdn`): spectra simulated from the emulator when training
starts (nothing read from disk): labels uniform in the box, rv uniform in
``rv_range``, the same shift as the fitter's model, a random continuum tilt, noise at
a log-uniform S/N in ``snr_range``, random masked chunks and pixels; Adam (optax) on
the negative log-likelihood, early stopping on the validation NLL, the best
parameters kept, loss curves in ``history``.

Precision: float32 throughout (features and MLP); the templates and PCA basis are
computed in float64 on the host.

References:
    Bishop 1994, "Mixture density networks", Aston University NCRG/94/004.
    Rhea et al. 2021, RNAAS 5, 276; Rhea et al. 2022 (LUCI).
    Ting, Conroy, Rix & Cargile 2019, ApJ 879, 69 ("The Payne").
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import _h5
from .._validate import as_float_array
from ..constants import C_KMS
from ..errors import FileFormatError
from ..observe import (
    ObsModel,
    check_rv_range,
    gap_cum,
    make_log_grid,
    make_lookup,
    shift_pair,
)

log = logging.getLogger(__name__)
Array = jax.Array

MDN_FORMAT = "payne_lite.MDN"
#: 2: binned coarse CCF, low-rank fine CCF, rest frame on the embedded span (the
#: features of version-1 files differ: they are refused, retrain).
MDN_VERSION = 2

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
#: MLP inputs whose spread over the training set is below this are not used.
FEATURE_SD_MIN = 1e-4
#: Rows with fewer usable pixels than this fraction get NaN from predict.
MIN_GOOD_FRACTION = 0.05


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
    ma, mb, t, _, valid = shift_pair(grid, jnp.where(g > 0, d, jnp.nan)[None], -rv)
    out = (ma + t * (mb - ma))[0]
    ok = valid & jnp.isfinite(out)
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


def _bin_rows(t: np.ndarray, k: int) -> np.ndarray:
    """Means of ``k`` neighbouring columns of ``t`` (R, P) (host), as :func:`_bin`."""
    m = t.shape[1] // k
    return t[:, : k * m].reshape(t.shape[0], m, k).mean(axis=2)


def _low_rank(t: np.ndarray, rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """``(v (Q, r), a (F, r))`` with ``t (F, Q) ~ a v^T``: the singular values above
    ``rtol`` of the largest (host, float64)."""
    u, sv, vt = np.linalg.svd(np.asarray(t, np.float64), full_matrices=False)
    r = max(1, int(np.sum(sv > rtol * sv[0])))
    return vt[:r].T, u[:, :r] * sv[:r]


def _span(lg) -> tuple[int, int]:
    """First embedded index and length of the observed pixels' span on a LogGrid."""
    first = lg.obs[0][1]
    return first, lg.obs[-1][1] + lg.obs[-1][2] - first


def _to_span(lg, x: np.ndarray) -> np.ndarray:
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
def _predict_scaled(
    net, grid, fx, rv_coarse, rv_fine, flux, err, mask, *, n_dim, n_comp
):
    """Mean, sigma (n, n_dim) in scaled units, rv_ccf (n,), good fraction (n,)."""
    feat, rv, frac = features(grid, fx, rv_coarse, rv_fine, flux, err, mask)
    x = (feat - fx.mu) / fx.sd
    out = jax.vmap(mlp_forward, in_axes=(None, 0))(net, x)
    m, s = mixture_moments(*mixture_params(out, n_dim, n_comp))
    return m, s, rv, frac


@jax.jit
def _features_batch(grid, fx, rv_coarse, rv_fine, flux, err, mask):
    return features(grid, fx, rv_coarse, rv_fine, flux, err, mask)[:2]


@jax.jit
def _shift_batch(grid, rest, rv):
    """Rest-frame spectra (n, P) observed at rv (n,): flux and validity (n, P)."""

    def one(f, v):
        ma, mb, t, _, valid = shift_pair(grid, f[None], v)
        return (ma + t * (mb - ma))[0], valid

    return jax.vmap(one)(rest, rv)


@jax.jit
def _template_rows(grid, t0, rvs):
    """``t0`` (P,) shifted to every rv of ``rvs`` (R,); 0 where not valid."""

    def one(v):
        ma, mb, t, _, valid = shift_pair(grid, t0[None], v)
        return jnp.where(valid, (ma + t * (mb - ma))[0], 0.0)

    return jax.lax.map(one, rvs)


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------
def _grid_model(wavelength: np.ndarray, rv_max: float, dtype) -> ObsModel:
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
        cont_deg=0,
        log_grid=make_log_grid(wave, wave, rv_max),
    )


def _rv_grids(rv_range) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = rv_range
    n = int(np.ceil((hi - lo) / RV_COARSE_STEP)) + 3  # one step beyond each end
    coarse = lo - RV_COARSE_STEP + RV_COARSE_STEP * np.arange(n)
    nf = int(round(RV_FINE_HALF / RV_FINE_STEP))
    fine = RV_FINE_STEP * np.arange(-nf, nf + 1)
    return coarse, fine


@dataclasses.dataclass(frozen=True, eq=False)
class MDN:
    """A trained mixture density network for one emulator's labels and pixel grid.

    Attributes:
        net: :class:`MLP` weights (NumPy float32).
        mean_flux: (P,) mean noise-free training spectrum (rest frame).
        basis: (P, K) orthonormal compression basis (PCA components and trends).
        feat_mu, feat_sd: (D,) standardisation of the MLP inputs.
        label_names, label_units: the emulator's (L labels).
        label_lo, label_hi: (L,) the emulator's training box [physical].
        wavelength: (P,) the emulator's (and the spectra's) wavelength grid [A].
        rv_range: (lo, hi) [km/s] of the training RVs.
        n_components: Gaussians per output dimension.
        history: loss curves, name -> (n_epoch,) array.
        meta: provenance (training settings, emulator source).
    """

    net: MLP
    mean_flux: np.ndarray
    basis: np.ndarray
    feat_mu: np.ndarray
    feat_sd: np.ndarray
    label_names: tuple[str, ...]
    label_units: tuple[str, ...]
    label_lo: np.ndarray
    label_hi: np.ndarray
    wavelength: np.ndarray
    rv_range: tuple[float, float]
    n_components: int = 1
    history: dict = dataclasses.field(default_factory=dict)
    meta: dict = dataclasses.field(default_factory=dict)
    _cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        wave = as_float_array(self.wavelength, "wavelength", ndim=1)
        n_pix = wave.size
        n_lab = len(self.label_names)
        mean = as_float_array(self.mean_flux, "mean_flux", ndim=1)
        basis = as_float_array(self.basis, "basis", ndim=2)
        if mean.shape != (n_pix,) or basis.shape[0] != n_pix:
            raise ValueError(
                f"mean_flux {mean.shape} and basis {basis.shape} must have "
                f"{n_pix} pixels (the wavelength grid's)"
            )
        lo = as_float_array(self.label_lo, "label_lo", ndim=1)
        hi = as_float_array(self.label_hi, "label_hi", ndim=1)
        if lo.shape != (n_lab,) or hi.shape != (n_lab,) or not np.all(lo < hi):
            raise ValueError(
                f"label_lo {lo.shape}, label_hi {hi.shape} must be ({n_lab},) with "
                "lo < hi"
            )
        if len(self.label_units) != n_lab:
            raise ValueError(f"{len(self.label_units)} label_units for {n_lab} labels")
        n_out = 3 * int(self.n_components) * (n_lab + 1)
        net = MLP(
            tuple(np.asarray(w, np.float32) for w in self.net.weights),
            tuple(np.asarray(b, np.float32) for b in self.net.biases),
        )
        if net.weights[-1].shape[-1] != n_out:
            raise ValueError(
                f"network output {net.weights[-1].shape[-1]} does not match "
                f"{self.n_components} component(s) x 3 x {n_lab + 1} outputs"
            )
        rv_range = check_rv_range(self.rv_range)
        for name, val in [
            ("net", net),
            ("mean_flux", mean),
            ("basis", basis),
            ("feat_mu", np.asarray(self.feat_mu, np.float32)),
            ("feat_sd", np.asarray(self.feat_sd, np.float32)),
            ("label_names", tuple(str(s) for s in self.label_names)),
            ("label_units", tuple(str(s) for s in self.label_units)),
            ("label_lo", lo),
            ("label_hi", hi),
            ("wavelength", wave),
            ("rv_range", rv_range),
            ("n_components", int(self.n_components)),
            ("history", {k: np.asarray(v) for k, v in self.history.items()}),
            ("meta", dict(self.meta)),
        ]:
            object.__setattr__(self, name, val)

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    @property
    def n_pix(self) -> int:
        return self.wavelength.size

    @property
    def output_names(self) -> tuple[str, ...]:
        return (*self.label_names, "rv")

    def __repr__(self) -> str:
        return (
            f"MDN({self.n_components} component(s), {self.n_pix} pixels, "
            f"outputs {list(self.output_names)}, rv {self.rv_range} km/s)"
        )

    # -- checks ---------------------------------------------------------------------
    def check_emulator(self, emulator) -> None:
        """Refuse an emulator this MDN was not trained for (names, box, grid).

        Raises:
            ValueError: naming what differs.
        """
        if tuple(emulator.label_names) != self.label_names:
            raise ValueError(
                f"MDN trained for labels {list(self.label_names)}, the emulator has "
                f"{list(emulator.label_names)}"
            )
        for what, a, b in [
            ("label_lo", self.label_lo, emulator.label_lo),
            ("label_hi", self.label_hi, emulator.label_hi),
        ]:
            if not np.allclose(a, b, rtol=1e-6, atol=0.0):
                raise ValueError(
                    f"MDN trained for a training box {what}={a.tolist()}, the "
                    f"emulator's is {np.asarray(b).tolist()}"
                )
        self.check_wavelength(emulator.wavelength, what="the emulator's")

    def check_wavelength(self, wavelength, *, what: str = "the spectra's") -> None:
        """Refuse a wavelength grid other than the MDN's.

        Raises:
            ValueError: naming both grids.
        """
        w = np.asarray(wavelength, np.float64)
        if w.shape != self.wavelength.shape or not np.allclose(
            w, self.wavelength, rtol=1e-9, atol=0.0
        ):
            raise ValueError(
                f"MDN trained on a wavelength grid of {self.n_pix} pixels "
                f"[{self.wavelength[0]:g}, {self.wavelength[-1]:g}] A; {what} grid has "
                f"{w.size} pixels [{w.min() if w.size else np.nan:g}, "
                f"{w.max() if w.size else np.nan:g}] A: resample the spectra onto "
                "the MDN's grid or train an MDN for this grid"
                + (
                    f" (max |difference| {np.max(np.abs(w - self.wavelength)):.3g} A)"
                    if w.shape == self.wavelength.shape
                    else ""
                )
            )

    # -- jitted pieces --------------------------------------------------------------
    def _device(self, dtype=None):
        dt = jax.dtypes.canonicalize_dtype(dtype or jnp.result_type(float))
        key = np.dtype(dt).str
        if key not in self._cache:
            coarse, fine = _rv_grids(self.rv_range)
            rv_max = max(abs(coarse[0]), abs(coarse[-1])) + RV_FINE_HALF + 5.0
            grid = _grid_model(self.wavelength, rv_max, dt)
            t0 = jnp.asarray(1.0 - self.mean_flux, dt)
            tc = np.asarray(_template_rows(grid, t0, jnp.asarray(coarse, dt)), float)
            tf = np.asarray(_template_rows(grid, t0, jnp.asarray(fine, dt)), float)
            lg = grid.log_grid
            span = (lambda x: x) if lg is None else functools.partial(_to_span, lg)
            v, a = _low_rank(span(tf), FINE_RTOL)
            v2, a2 = _low_rank(span(tf * tf), FINE_RTOL)
            fx = Features(
                *(
                    jnp.asarray(x, dt)
                    for x in (
                        span(self.mean_flux),
                        _bin_rows(tc, COARSE_BIN),
                        _bin_rows(tc * tc, NORM_BIN),
                        v,
                        a,
                        v2,
                        a2,
                        span(self.basis.T).T,
                        self.feat_mu,
                        self.feat_sd,
                    )
                )
            )
            net = jax.tree.map(lambda a: jnp.asarray(a, dt), self.net)
            self._cache[key] = (
                net,
                grid,
                fx,
                jnp.asarray(coarse, dt),
                jnp.asarray(fine, dt),
            )
        return self._cache[key]

    def predict(
        self,
        flux,
        flux_err,
        mask=None,
        *,
        wavelength=None,
        batch_size: int = 64,
        dtype=None,
        n_threads: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Gaussian per label and rv for observed spectra.

        Args:
            flux: (n, P) or (P,) observed flux on the MDN's wavelength grid.
            flux_err: same shape, 1-sigma errors; non-finite or non-positive errors
                and non-finite flux mark the pixel as unusable.
            mask: optional bool (P,) or (n, P), True = ignore the pixel.
            wavelength: optional (P,) grid of the spectra, checked against the
                MDN's (None = the MDN's).
            batch_size: spectra per jitted call (padded to a power of two). 64
                keeps a batch's (n, P) intermediates in the L2 cache: 2-3x faster
                per spectrum than 512 on APOGEE's 7214 pixels.
            dtype: computation dtype (default JAX's default float).
            n_threads: batches run at once in threads (default: the CPU cores on
                the CPU backend). Results do not depend on it.

        Returns:
            ``(mean, sigma)``, each (n, L + 1) (or (L + 1,) for one spectrum):
            labels [label units] then rv [km/s]. Rows with fewer than
            ``MIN_GOOD_FRACTION`` usable pixels are NaN.

        Raises:
            ValueError: shapes that do not fit the MDN's grid, another wavelength.
        """
        if wavelength is not None:
            self.check_wavelength(wavelength)
        f, e, m_all = _check_shapes(flux, flux_err, mask, self.n_pix)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        net, grid, fx, rc, rf = self._device(dtype)
        dt = fx.mean.dtype
        n, P = f.shape
        size = min(batch_size, max(8, 1 << int(np.ceil(np.log2(max(n, 1))))))
        mean = np.empty((n, self.n_labels + 1))
        sigma = np.empty((n, self.n_labels + 1))

        def one(start):
            sl = slice(start, min(start + size, n))
            m = sl.stop - sl.start
            mk = m_all[sl] if m_all.shape[0] == n else np.broadcast_to(m_all, (m, P))
            mu_s, sd_s, rv, frac = _predict_scaled(
                net,
                grid,
                fx,
                rc,
                rf,
                _rows(f[sl], size, dt, 0.0),
                _rows(e[sl], size, dt, 1.0),
                _rows(mk, size, bool, True),
                n_dim=self.n_labels + 1,
                n_comp=self.n_components,
            )
            mean[sl], sigma[sl] = self._unscale(
                np.asarray(mu_s, np.float64)[:m],
                np.asarray(sd_s, np.float64)[:m],
                np.asarray(rv, np.float64)[:m],
            )
            low = np.asarray(frac)[:m] < MIN_GOOD_FRACTION
            mean[sl][low] = np.nan
            sigma[sl][low] = np.nan

        starts = range(0, n, size)
        if n_threads is None:
            from .._serial import default_threads

            n_threads = default_threads()
        if n_threads > 1 and len(starts) > 1:
            # JAX releases the GIL while a batch runs: the per-row shifts (lax.map)
            # run on one core, so one batch per core (measured 1.7x on 2 cores)
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(int(n_threads), len(starts))) as pool:
                list(pool.map(one, starts))
        else:
            for start in starts:
                one(start)
        if np.ndim(flux) == 1:
            return mean[0], sigma[0]
        return mean, sigma

    def _unscale(self, mu, sd, rv_ccf):
        span = self.label_hi - self.label_lo
        L = self.n_labels
        mean = np.empty_like(mu)
        sigma = np.empty_like(sd)
        mean[:, :L] = (mu[:, :L] + 0.5) * span + self.label_lo
        sigma[:, :L] = sd[:, :L] * span
        mean[:, L] = rv_ccf + RV_OUT_SCALE * mu[:, L]
        sigma[:, L] = RV_OUT_SCALE * sd[:, L]
        return mean, sigma

    # -- files ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the MDN to one versioned HDF5 file (atomically)."""
        with _h5.atomic_h5_writer(path, MDN_FORMAT, MDN_VERSION) as f:
            _h5.set_json_attr(f, "label_names", list(self.label_names))
            _h5.set_json_attr(f, "label_units", list(self.label_units))
            _h5.set_json_attr(f, "rv_range", list(self.rv_range))
            _h5.set_json_attr(f, "meta", self.meta)
            f.attrs["n_components"] = self.n_components
            f.attrs["n_layers"] = len(self.net.weights)
            _h5.write_dataset(f, "wavelength", self.wavelength, compress=False)
            for name in ("label_lo", "label_hi", "mean_flux"):
                _h5.write_dataset(f, name, getattr(self, name))
            # used in float32: stored so (half the file)
            _h5.write_dataset(f, "basis", self.basis.astype(np.float32))
            _h5.write_dataset(f, "feat_mu", self.feat_mu)
            _h5.write_dataset(f, "feat_sd", self.feat_sd)
            g = f.create_group("net")
            for i, (w, b) in enumerate(
                zip(self.net.weights, self.net.biases, strict=True)
            ):
                _h5.write_dataset(g, f"W{i}", w)
                _h5.write_dataset(g, f"b{i}", b)
            h = f.create_group("history")
            for name, arr in self.history.items():
                _h5.write_dataset(h, name, np.asarray(arr))

    @classmethod
    def load(cls, path: str | os.PathLike, *, emulator=None) -> MDN:
        """Read an MDN written by :meth:`save`; with ``emulator``, refuse a mismatch.

        Raises:
            FileNotFoundError: no such file.
            payne_lite.FileFormatError: not an MDN file, another version, corrupt or
                inconsistent contents.
            ValueError: ``emulator`` given and not the one the MDN was trained for.
        """
        with _h5.open_checked(path, MDN_FORMAT, (MDN_VERSION,)) as f:
            if "net" not in f:
                raise FileFormatError(f"{path}: missing group 'net'")
            n_layers = int(f.attrs.get("n_layers", 0))
            g = f["net"]
            net = MLP(
                tuple(_h5.read_dataset(g, f"W{i}", path) for i in range(n_layers)),
                tuple(_h5.read_dataset(g, f"b{i}", path) for i in range(n_layers)),
            )
            kw = dict(
                net=net,
                label_names=_h5.get_json_attr(f, "label_names", path),
                label_units=_h5.get_json_attr(f, "label_units", path),
                rv_range=_h5.get_json_attr(f, "rv_range", path),
                meta=_h5.get_json_attr(f, "meta", path),
                n_components=int(f.attrs.get("n_components", 1)),
                history={
                    k: _h5.read_dataset(f["history"], k, path)
                    for k in f.get("history", {})
                },
                **{
                    k: _h5.read_dataset(f, k, path)
                    for k in (
                        "wavelength",
                        "label_lo",
                        "label_hi",
                        "mean_flux",
                        "basis",
                        "feat_mu",
                        "feat_sd",
                    )
                },
            )
        try:
            mdn = cls(**kw)
        except (ValueError, TypeError, IndexError) as err:
            raise FileFormatError(f"{path}: inconsistent MDN file: {err}") from err
        if emulator is not None:
            mdn.check_emulator(emulator)
        return mdn


def _rows(a, size: int, dtype, fill):
    """``a`` (m, P) as a (size, P) device array of ``dtype``, padded with ``fill``
    (one host conversion, no copy for a full batch already in ``dtype``)."""
    x = np.asarray(a, dtype)
    if x.shape[0] < size:
        pad = np.full((size - x.shape[0], x.shape[1]), fill, dtype)
        x = np.concatenate([x, pad])
    return jnp.asarray(x)


def _check_shapes(flux, flux_err, mask, n_pix):
    """(flux, err) as (n, P) arrays (no copy when possible) and the mask as (1, P) or
    (n, P) bool; the pixel checks happen inside the jitted features."""
    f = np.atleast_2d(np.asarray(flux))
    e = np.atleast_2d(np.asarray(flux_err))
    for name, a in (("flux", f), ("flux_err", e)):
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.number):
            raise ValueError(f"{name} must be a numeric (n_spec, {n_pix}) array")
    if f.shape != e.shape or f.shape[-1] != n_pix:
        raise ValueError(
            f"flux {np.shape(flux)} and flux_err {np.shape(flux_err)} must both be "
            f"(n_spec, {n_pix}) or ({n_pix},) (the MDN's wavelength grid)"
        )
    if mask is None:
        return f, e, np.zeros((1, n_pix), bool)
    m = np.asarray(mask)
    if m.dtype != bool or m.shape not in ((n_pix,), np.shape(flux), f.shape):
        raise ValueError(
            f"mask must be bool ({n_pix},) or the shape of flux {np.shape(flux)}, got "
            f"{m.dtype} {m.shape}"
        )
    return f, e, np.atleast_2d(m)


def _check_spectra(flux, flux_err, mask, n_pix):
    """(flux, err, bad) as (n, P) copies; bad = unusable or masked pixels."""
    f = as_float_array(flux, "flux", ndim=(1, 2))
    e = as_float_array(flux_err, "flux_err", ndim=(1, 2))
    if f.shape != e.shape or f.shape[-1] != n_pix:
        raise ValueError(
            f"flux {f.shape} and flux_err {e.shape} must both be (n_spec, {n_pix}) "
            f"or ({n_pix},) (the MDN's wavelength grid)"
        )
    f2, e2 = np.atleast_2d(f), np.atleast_2d(e)
    bad = ~np.isfinite(f2) | ~np.isfinite(e2) | ~(e2 > 0)
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype != bool or m.shape not in ((n_pix,), f.shape, f2.shape):
            raise ValueError(
                f"mask must be bool ({n_pix},) or the shape of flux {f.shape}, got "
                f"{m.dtype} {m.shape}"
            )
        bad = bad | np.broadcast_to(m, f2.shape)
    return np.where(bad, 0.0, f2), np.where(bad, 1.0, e2), bad


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class MDNConfig:
    """Settings of :func:`train_mdn` (stored in the MDN's ``meta``)."""

    n_train: int = 100_000
    n_valid: int = 10_000
    snr_range: tuple[float, float] = (10.0, 300.0)
    rv_range: tuple[float, float] = (-500.0, 500.0)
    n_components: int = 1
    n_pca: int = 48
    hidden: tuple[int, ...] = (256, 256)
    epochs: int = 200
    batch_size: int = 512
    learning_rate: float = 1e-3
    patience: int = 15
    tilt: float = 0.05
    mask_chunks: int = 8
    seed: int = 0

    def __post_init__(self):
        for name in ("n_train", "n_valid", "n_components", "n_pca", "epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("batch_size", "patience"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        s = tuple(float(v) for v in self.snr_range)
        if len(s) != 2 or not 0 < s[0] <= s[1]:
            raise ValueError(f"snr_range must be (lo, hi) with 0 < lo <= hi, got {s}")
        r = check_rv_range(self.rv_range)
        hidden = (self.hidden,) if isinstance(self.hidden, int) else self.hidden
        if not hidden or any(int(h) <= 0 for h in hidden):
            raise ValueError(f"hidden must be positive width(s), got {self.hidden!r}")
        if not self.learning_rate > 0 or self.tilt < 0 or self.mask_chunks < 0:
            raise ValueError("learning_rate must be > 0, tilt and mask_chunks >= 0")
        object.__setattr__(self, "snr_range", s)
        object.__setattr__(self, "rv_range", r)
        object.__setattr__(self, "hidden", tuple(int(h) for h in hidden))


def simulate(emulator, n: int, *, rng, snr_range, rv_range, tilt=0.05, mask_chunks=8):
    """Noisy observed spectra from ``emulator`` (the MDN's training distribution).

    Labels uniform in the training box; rv uniform in ``rv_range`` (relativistic
    shift and linear interpolation, as the fitter's model; pixels shifted off the
    grid or into a gap are masked); a multiplicative tilt ``1 + a x + b x^2``
    (``x`` in [-1, 1], a, b uniform in +-``tilt``); Gaussian noise of constant
    ``1 / snr`` with S/N log-uniform in ``snr_range``; up to ``mask_chunks`` masked
    chunks of 1-2 % of the pixels, up to ``P / 40`` short runs of 1-6 pixels (as sky
    line and bad-pixel masks, which cut lines in part) and up to 1 % random pixels.

    Returns:
        dict: ``scaled`` (n, L) labels in [-0.5, 0.5], ``labels`` (n, L) physical,
        ``rv`` (n,), ``snr`` (n,), ``flux``, ``err`` (n, P), ``mask`` (n, P) bool.
    """
    L, P = emulator.n_labels, emulator.n_pix
    s = rng.uniform(-0.5, 0.5, (n, L))
    rv = rng.uniform(rv_range[0], rv_range[1], n)
    snr = np.exp(rng.uniform(np.log(snr_range[0]), np.log(snr_range[1]), n))
    rest = emulator.predict(emulator.unscale(s), allow_outside=True)
    dt = rest.dtype
    grid = _grid_model(emulator.wavelength, max(abs(v) for v in rv_range) + 10.0, dt)
    flux, valid = _shift_batch(grid, jnp.asarray(rest), jnp.asarray(rv, dt))
    flux, valid = np.asarray(flux, np.float64), np.asarray(valid)
    x = np.linspace(-1.0, 1.0, P)
    ab = rng.uniform(-tilt, tilt, (n, 2))
    flux = flux * (1.0 + ab[:, :1] * x + ab[:, 1:] * (x * x - 1.0 / 3.0))
    err = np.repeat((1.0 / snr)[:, None], P, axis=1)
    flux = flux + err * rng.standard_normal((n, P))
    mask = ~valid
    if mask_chunks:
        # chunks of 1-2 % of the pixels, and many short runs (1-6 pixels, up to
        # ~10 % of the pixels) like masks of sky lines and bad pixels, which cut
        # lines in part
        n_short = P // 40
        k = np.concatenate(
            [
                rng.integers(P // 100, P // 50 + 2, (n, mask_chunks)),
                rng.integers(1, 7, (n, n_short)),
            ],
            axis=1,
        )
        use = np.concatenate(
            [
                np.arange(mask_chunks)[None] < rng.integers(0, mask_chunks + 1, (n, 1)),
                np.arange(n_short)[None] < rng.integers(0, n_short + 1, (n, 1)),
            ],
            axis=1,
        )
        a = rng.integers(0, P, k.shape)
        edge = np.zeros((n, P + 1), np.int32)
        rows = np.broadcast_to(np.arange(n)[:, None], k.shape)
        np.add.at(edge, (rows[use], a[use]), 1)
        np.add.at(edge, (rows[use], np.minimum(a + k, P)[use]), -1)
        mask |= np.cumsum(edge, axis=1)[:, :P] > 0
        mask |= rng.random((n, P)) < rng.uniform(0.0, 0.01, (n, 1))
    return dict(
        scaled=s,
        labels=emulator.unscale(s),
        rv=rv,
        snr=snr,
        flux=flux,
        err=err,
        mask=mask,
    )


def _pca_basis(emulator, rng, n_pca: int, n_spec: int = 3000):
    """Mean spectrum (P,) and orthonormal basis (P, n_pca + 2) of rest-frame spectra."""
    s = rng.uniform(-0.5, 0.5, (n_spec, emulator.n_labels))
    f = np.asarray(emulator.predict(emulator.unscale(s), allow_outside=True), float)
    mean = f.mean(axis=0)
    x = np.linspace(-1.0, 1.0, f.shape[1])
    trends = np.stack([x, x * x - 1.0 / 3.0, np.gradient(mean)], axis=1)
    # randomized SVD (Halko et al. 2011): the full SVD of (3000, 7214) took 17 s
    a = f - mean
    k = min(n_pca, *a.shape)
    q, _ = np.linalg.qr(a @ rng.standard_normal((a.shape[1], k + 10)))
    for _ in range(2):
        q, _ = np.linalg.qr(a @ (a.T @ q))
    _, _, vt = np.linalg.svd(q.T @ a, full_matrices=False)
    basis, _ = np.linalg.qr(np.concatenate([vt[:k].T, trends], axis=1))
    return mean, basis


def _init_mlp(rng, sizes):
    ws, bs = [], []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        ws.append(rng.normal(0.0, 1.0 / np.sqrt(a), (a, b)).astype(np.float32))
        bs.append(np.zeros(b, np.float32))
    ws[-1] *= 0.1
    return MLP(tuple(ws), tuple(bs))


def _targets(sim, rv_ccf):
    return np.concatenate(
        [sim["scaled"], ((sim["rv"] - rv_ccf) / RV_OUT_SCALE)[:, None]], axis=1
    )


def _sim_features(emulator, mdn_parts, n, rng, cfg, chunk=2048, bar=None):
    """Features (n, D) and targets (n, L + 1), simulated ``chunk`` spectra at a time."""
    grid, fx, rc, rf = mdn_parts
    dt = fx.mean.dtype
    feats, targ = [], []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        sim = simulate(
            emulator,
            chunk,
            rng=rng,
            snr_range=cfg.snr_range,
            rv_range=cfg.rv_range,
            tilt=cfg.tilt,
            mask_chunks=cfg.mask_chunks,
        )
        f, e, bad = _check_spectra(sim["flux"], sim["err"], sim["mask"], emulator.n_pix)
        feat, rv = _features_batch(
            grid,
            fx,
            rc,
            rf,
            jnp.asarray(f, dt),
            jnp.asarray(e, dt),
            jnp.asarray(bad),
        )
        feats.append(np.asarray(feat)[:m])
        targ.append(_targets(sim, np.asarray(rv, np.float64))[:m])
        if bar is not None:
            bar.update(m)
    return np.concatenate(feats), np.concatenate(targ).astype(np.float32)


def train_mdn(emulator, *, config: MDNConfig | None = None, progress=True, **kw) -> MDN:
    """Train an :class:`MDN` on spectra simulated from ``emulator``.

    Args:
        emulator: the :class:`payne_lite.Emulator` whose labels the MDN predicts.
        config: an :class:`MDNConfig`; or its fields as keyword arguments
            (``n_train``, ``n_valid``, ``snr_range``, ``rv_range``, ``seed``,
            ``epochs``, ``batch_size``, ``learning_rate``, ``patience``,
            ``n_components``, ``n_pca``, ``hidden``, ``tilt``, ``mask_chunks``).
        progress: tqdm progress bars (simulation, epochs).

    Returns:
        The MDN with the parameters of the lowest validation NLL; ``history`` holds
        ``train_nll`` and ``valid_nll`` per epoch (mean per spectrum, scaled units).

    Raises:
        ValueError: bad settings (named), or ``config`` and keywords both given.
        TrainingDivergedError: the training or validation NLL became NaN or
            infinite (the run stops instead of returning a half-trained MDN).
    """
    from tqdm.auto import tqdm

    if config is not None and kw:
        raise ValueError(
            f"pass config or keyword settings, not both (got {sorted(kw)})"
        )
    cfg = config or MDNConfig(**kw)
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    mean, basis = _pca_basis(emulator, rng, cfg.n_pca)
    n_lab = emulator.n_labels
    n_dim = n_lab + 1
    n_out = 3 * cfg.n_components * n_dim
    # Feature extraction needs feat_mu/sd only after the features exist: a provisional
    # MDN with unit standardisation builds the fixed arrays.
    n_feat = basis.shape[1] + len(_rv_grids(cfg.rv_range)[1]) + 4
    provisional = MDN(
        net=_init_mlp(rng, (n_feat, *cfg.hidden, n_out)),
        mean_flux=mean,
        basis=basis,
        feat_mu=np.zeros(n_feat),
        feat_sd=np.ones(n_feat),
        label_names=emulator.label_names,
        label_units=emulator.label_units,
        label_lo=emulator.label_lo,
        label_hi=emulator.label_hi,
        wavelength=emulator.wavelength,
        rv_range=cfg.rv_range,
        n_components=cfg.n_components,
    )
    _, grid, fx, rc, rf = provisional._device(np.float32)
    bar = tqdm(
        total=cfg.n_train + cfg.n_valid,
        desc="simulate",
        unit="spectrum",
        disable=not progress,
    )
    with bar:
        x_tr, y_tr = _sim_features(
            emulator, (grid, fx, rc, rf), cfg.n_train, rng, cfg, bar=bar
        )
        x_va, y_va = _sim_features(
            emulator, (grid, fx, rc, rf), cfg.n_valid, rng, cfg, bar=bar
        )
    t_sim = time.perf_counter() - t0
    mu = x_tr.mean(axis=0)
    sd = x_tr.std(axis=0)
    # A feature constant up to rounding (the fine CCF at its peak, normalised to it:
    # spread 2e-8) would amplify float rounding by 1e7 and make a row's answer depend
    # on the batch it is in: such features are switched off (sd = inf -> input 0).
    sd = np.where(sd > FEATURE_SD_MIN, sd, np.inf)
    x_tr = ((x_tr - mu) / sd).astype(np.float32)
    x_va = ((x_va - mu) / sd).astype(np.float32)

    net = jax.tree.map(jnp.asarray, provisional.net)
    n_steps = cfg.epochs * max(1, cfg.n_train // cfg.batch_size)
    sched = optax.cosine_decay_schedule(cfg.learning_rate, n_steps, alpha=0.05)
    opt = optax.adam(sched)
    opt_state = opt.init(net)

    def loss_fn(net, x, y):
        out = jax.vmap(mlp_forward, in_axes=(None, 0))(net, x)
        return jnp.mean(mixture_nll(*mixture_params(out, n_dim, cfg.n_components), y))

    @jax.jit
    def step(net, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(net, x, y)
        updates, opt_state = opt.update(grads, opt_state, net)
        return optax.apply_updates(net, updates), opt_state, loss

    @jax.jit
    def valid_loss(net, x, y):
        return loss_fn(net, x, y)

    x_va_j, y_va_j = jnp.asarray(x_va), jnp.asarray(y_va)
    bs = min(cfg.batch_size, cfg.n_train)
    n_batch = max(1, cfg.n_train // bs)
    hist_tr, hist_va = [], []
    best, best_net, since = np.inf, net, 0
    bar = tqdm(range(cfg.epochs), desc="train-mdn", unit="epoch", disable=not progress)
    for _epoch in bar:
        perm = rng.permutation(cfg.n_train)
        tot = jnp.zeros(())
        for b in range(n_batch):
            idx = perm[b * bs : (b + 1) * bs]
            net, opt_state, loss = step(
                net, opt_state, jnp.asarray(x_tr[idx]), jnp.asarray(y_tr[idx])
            )
            tot = tot + loss
        tr = float(tot) / n_batch
        va = float(valid_loss(net, x_va_j, y_va_j))
        if not (np.isfinite(tr) and np.isfinite(va)):
            from ..errors import TrainingDivergedError

            raise TrainingDivergedError(
                f"train_mdn diverged at epoch {_epoch + 1}: training NLL {tr:.4g}, "
                f"validation NLL {va:.4g} (the best so far was {best:.4g} after "
                f"{len(hist_va)} epoch(s)); a smaller learning_rate, or check the "
                "emulator for non-finite spectra"
            )
        hist_tr.append(tr)
        hist_va.append(va)
        bar.set_postfix(train=f"{tr:.3f}", valid=f"{va:.3f}")
        if va < best - 1e-4:
            best, best_net, since = va, net, 0
        else:
            since += 1
            if since >= cfg.patience:
                break
    t_total = time.perf_counter() - t0
    log.info("MDN trained: valid NLL %.3f after %d epochs", best, len(hist_va))
    meta = dict(
        config={
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(cfg).items()
        },
        emulator_source=str(
            emulator.meta.get("source", emulator.meta.get("trained_by", ""))
        ),
        trained_by="payne_lite.train_mdn",
        simulate_seconds=round(t_sim, 2),
        train_seconds=round(t_total, 2),
        best_valid_nll=float(best),
        epochs_run=len(hist_va),
    )
    return dataclasses.replace(
        provisional,
        net=jax.tree.map(np.asarray, best_net),
        feat_mu=mu,
        feat_sd=sd,
        history={"train_nll": np.array(hist_tr), "valid_nll": np.array(hist_va)},
        meta=meta,
    )
