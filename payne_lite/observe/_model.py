"""The observation model: emulator spectrum -> Doppler shift -> continuum -> observed grid.

Written for ONE star as pure JAX functions; callers batch with ``jax.vmap``.

The parameter vector of one star is::

    params = [s_1 .. s_L,  rv,  c_0 .. c_d,  b_1 .. b_B]

* ``s`` (L,): labels scaled to the emulator's training box, box -> [-0.5, 0.5];
* ``rv`` [km/s]: radial velocity, positive = receding (redshift);
* ``c`` (d + 1,): Chebyshev coefficients of a multiplicative continuum correction
  ``sum_k c_k T_k(x)`` in the observed wavelength scaled to ``x`` in [-1, 1]. Only
  present when ``cont_deg = d >= 1``; ``cont_deg = 0`` means no continuum correction
  (and no continuum parameters). A :class:`ChipPolynomial` has ``deg + 1`` coefficients
  per chip, chip after chip, each in its chip's own ``x``.
* ``b`` (B,): broadening parameters [km/s] when requested (``vsini``, ``vmacro``, in
  that order; :class:`BroadSpec`).

Rest-frame broadening and instrumental resolution (:mod:`payne_lite.observe.broadening`),
applied on the emulator's log-uniform grid before the Doppler shift, each chip on
its own: the rest-frame model is convolved with the rotation profile (``vsini``,
linear limb darkening) and a Gaussian macroturbulence (``vmacro``, FWHM), then with
a Gaussian instrumental profile whose variance is the quadrature difference between
the requested resolution and the emulator's own (:func:`lsf_sigma_pixels`); then it
is shifted and resampled. Applying the instrumental profile before the shift
instead of after changes its width by |v|/c (< 0.2 % at 500 km/s). When any
broadening is on, the fast normal equations (``jet``) are off and the Jacobian is
``jax.jacfwd`` of :func:`observe`.

Resampling onto an observed grid is by linear interpolation of the (broadened)
model at each observed pixel's wavelength: point sampling of the model convolved
with the instrument's line-spread function, which is what an LSF measured per
pixel (and so including the pixel's own width, as APOGEE's) describes. A
flux-conserving rebinning would add the pixel width a second time; it is not
implemented.

Doppler shift and its precision: :mod:`payne_lite.observe._doppler`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._fusion import computed, materialize
from .._validate import as_float_array, check_wavelength
from ..constants import C_KMS
from ..emulator import (
    ACTIVATIONS,
    DenseNet,
    Emulator,
    KernelNet,
    PixelNet,
    forward,
    kernel_forward_jac,
    kernel_layout,
)
from . import broadening as _broad
from ._chippoly import ChipPolynomial, as_continuum
from ._doppler import (
    DOPPLER_INTERP,
    TAP_OFFSETS,
    LogGrid,
    combine,
    complete_rest,
    embed,
    gap_cum,
    interval,
    interval_lookup,
    inv_factor_m1,
    log_position,
    make_log_grid,
    make_lookup,
    shift,
    shift_pair,
    tap_span,
    tap_weights,
    taps_inside,
)
from ._lsf import DEFAULT_EMULATOR_RESOLUTION as DEFAULT_EMULATOR_RESOLUTION
from ._lsf import lsf_sigma_pixels, rest_segments

Array = jax.Array

#: The interpolation on the rest grid, under the name tests read it by
#: (``payne_lite.observe._model._shift``); it lives in :mod:`._doppler`.
_shift = shift

#: Lower/upper bound of the scaled labels (the training box).
LABEL_BOUND = 0.5
#: Default radial velocity range [km/s].
RV_RANGE = (-500.0, 500.0)
#: Bound on each continuum coefficient ("unbounded-ish": normalised spectra need ~1).
CONT_BOUND = 100.0
#: Resolving power assumed for an emulator that does not record its own
#: (:attr:`payne_lite.Emulator.resolution`): APOGEE's, as for The Payne's networks.
#: Broadening parameters, in parameter order, and their bounds [km/s].
BROADENING_PARAMS = ("vsini", "vmacro")
BROADENING_RANGE = {"vsini": (0.0, 100.0), "vmacro": (0.0, 50.0)}


class BroadSpec(NamedTuple):
    """Static description of the rest-frame broadening (hashable; part of the jit key).

    ``segments``: contiguous runs of the rest grid ``(first pixel, length)``;
    ``names``: the broadening parameters present (a subset of
    :data:`BROADENING_PARAMS`, in that order); ``dv``: velocity width of a rest
    pixel [km/s]; ``vel_half``: half-width of the velocity kernel [pixels] (0 when no
    velocity broadening); ``epsilon``: linear limb-darkening coefficient.
    """

    segments: tuple[tuple[int, int], ...]
    names: tuple[str, ...]
    dv: float
    vel_half: int
    epsilon: float


#: :class:`JetNet` rows are padded with zeros to a multiple of this.
JET_ROWS = 8


class JetNet(NamedTuple):
    """A one-hidden-layer pixel net laid out for :func:`normal_equations`.

    All arrays are embedded in the :class:`LogGrid` (``S = log_grid.size`` points,
    zero weights in gaps and margins, so the flux there is 0): ``w0 (L, H, S)``,
    ``b0 (H, S)`` as in :class:`~payne_lite.emulator.KernelNet`, and the output
    layer with the chain rule folded in: rows 0 and L + 1 of ``v (R, H, S)``
    are ``w1``, row ``1 + j`` is ``w1 * w0[j]``; ``c (R, S)`` is
    ``[b1, 0, ..., 0, b1]``. Then ``flux = c[0] + sum_h v[0, h] act(z_h)`` (and row
    L + 1 again) and ``d flux / d s_j = sum_h v[1 + j, h] act'(z_h)``: one
    (R, S) loop. Rows from L + 2 on are zero, so that ``R`` is a multiple of
    :data:`JET_ROWS`: the (R, n_emb) @ (n_emb, R) product of
    :func:`normal_equations` is 1.5x faster with 8 rows than with 7 (XLA:CPU's
    matrix kernels; measured 59 -> 39 us per star on the APOGEE grid), and the
    zero row costs a few us in the fused loop that makes it.
    ``basis (n_c, n_emb)``: the continuum basis on the observed pixels' embedded
    span (zeros in gaps).
    """

    w0: Array
    b0: Array
    v: Array
    c: Array
    basis: Array


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "net",
        "x_rest",
        "gap_cum",
        "x_obs",
        "wave_obs",
        "basis",
        "lookup",
        "jet",
        "lsf",
    ],
    meta_fields=["activation", "n_labels", "cont", "log_grid", "broad", "interp"],
)
@dataclasses.dataclass(frozen=True)
class ObsModel:
    """Everything the jitted model needs, as a pytree (strings and ints are static).

    Attributes:
        net: the emulator weights as JAX arrays: a :class:`KernelNet` for one-hidden-
            layer pixel nets (the fused single-star form), else the emulator's net.
        x_rest: (P_rest,) emulator wavelength minus the reference wavelength [A].
        gap_cum: (P_rest,) int32; ``gap_cum[j] - gap_cum[i]`` counts the gaps between
            rest pixels i and j.
        x_obs: (P_obs,) observed wavelength minus the reference wavelength [A].
        wave_obs: (P_obs,) observed wavelength [A].
        basis: (P_obs, n_cont) the continuum's design matrix (Chebyshev polynomials
            T_k(x), per chip when ``cont`` has chips: :meth:`ChipPolynomial.basis`;
            a column of ones when there is no continuum).
        lookup: ``(x0, 1/h, table)``: a bucket table of the rest grid (bucket width
            h below its smallest step) that finds a wavelength's rest interval in
            O(1) instead of a binary search (:func:`make_lookup`).
        activation, n_labels: static.
        cont: static :class:`ChipPolynomial`, the multiplicative continuum, or None
            (none: ``n_cont == 0``).
        log_grid: static :class:`LogGrid` when the rest and observed grids are
            pixels of one log-uniform grid (APOGEE's, the built-in synthesizer's;
            chip gaps allowed), else None. Then a Doppler shift moves every pixel by
            the same fraction of a step and the interpolation is two contiguous
            slices per segment instead of per-pixel gathers.
        jet: :class:`JetNet` (one-hidden-layer pixel nets on a log grid: the
            fitter's normal equations, :func:`normal_equations`), else None; always
            None when broadening is on.
        lsf: (2 K + 1, P_rest) weights of the instrumental Gaussian per rest pixel
            (:func:`payne_lite.observe.broadening.gaussian_kernels`), or None (the
            emulator's own resolution).
        broad: static :class:`BroadSpec` when ``lsf`` or broadening parameters are
            in use, else None.
        interp: static name of the Doppler interpolant (:data:`TAP_OFFSETS`):
            ``"lanczos6"`` (the default, :data:`DOPPLER_INTERP`), ``"cubic6"``,
            ``"cubic"`` or ``"linear"``.
    """

    net: PixelNet | DenseNet | KernelNet
    x_rest: Array
    gap_cum: Array
    x_obs: Array
    wave_obs: Array
    basis: Array
    lookup: tuple | None
    activation: str
    n_labels: int
    cont: ChipPolynomial | None = None
    log_grid: LogGrid | None = None
    jet: JetNet | None = None
    lsf: Array | None = None
    broad: BroadSpec | None = None
    interp: str = DOPPLER_INTERP

    @property
    def n_cont(self) -> int:
        """Number of continuum parameters (0 without a continuum)."""
        return 0 if self.cont is None else self.cont.n_cont

    @property
    def cont_deg(self) -> int:
        """Degree of the continuum's polynomial(s) (0 without a continuum)."""
        return 0 if self.cont is None else self.cont.deg

    @property
    def n_broad(self) -> int:
        """Number of broadening parameters (after the continuum's)."""
        return 0 if self.broad is None else len(self.broad.names)

    @property
    def n_params(self) -> int:
        return self.n_labels + 1 + self.n_cont + self.n_broad

    def cont_params(self, params):
        """The continuum coefficients of ``params``."""
        a = self.n_labels + 1
        return params[a : a + self.n_cont]


class ParamLayout(NamedTuple):
    """Names and box bounds of the parameter vector ``[s (L,), rv, c (n_cont,)]``.

    ``cont_deg``: the continuum's degree, ``cont`` its :class:`ChipPolynomial` (0, None).

    ``lower``/``upper`` are (k,) float64 in fit space: scaled labels in [-0.5, 0.5],
    rv [km/s], continuum coefficients in [-CONT_BOUND, CONT_BOUND].
    """

    names: tuple[str, ...]
    lower: np.ndarray
    upper: np.ndarray
    n_labels: int
    cont_deg: int
    broadening: tuple[str, ...] = ()
    cont: ChipPolynomial | None = None

    @property
    def rv_index(self) -> int:
        return self.n_labels

    @property
    def cont_slice(self) -> slice:
        return slice(self.n_labels + 1, len(self.names) - len(self.broadening))

    @property
    def broad_slice(self) -> slice:
        return slice(len(self.names) - len(self.broadening), len(self.names))


# --------------------------------------------------------------------------------------
# Pure numerical core
# --------------------------------------------------------------------------------------
def observe(obs: ObsModel, params: Array) -> tuple[Array, Array]:
    """Model flux (P_obs,) and validity (P_obs,) bool for one star's ``params`` (k,).

    Pure and unbatched: ``jax.vmap(observe, in_axes=(None, 0))`` for many stars.
    """
    n_lab = obs.n_labels
    # Materialised before the shift (see _rest_with_jac): measured 1.8x faster.
    flux_rest = materialize(
        rest_model(obs, params[:n_lab], params[obs.n_params - obs.n_broad :]),
        jnp.all(jnp.isfinite(params)),
    )
    sh = shift_pair(obs, flux_rest[None], params[n_lab])
    flux, valid = sh.value()[0], sh.valid
    if obs.n_cont:
        flux = flux * (obs.basis @ obs.cont_params(params))
    return flux, valid


def rest_model(obs: ObsModel, s: Array, b: Array) -> Array:
    """(P_rest,) rest-frame model at scaled labels ``s`` (L,), broadened by the
    broadening parameters ``b`` (n_broad,) [km/s] and degraded to the instrumental
    resolution (``obs.lsf``), each chip on its own (:class:`BroadSpec`)."""
    flux = forward(obs.net, s, obs.activation)
    spec = obs.broad
    if spec is None:
        return flux
    if spec.vel_half > 0:
        kern = None
        for name, val in zip(spec.names, b, strict=True):
            if name == "vsini":
                k = _broad.rotation_kernel(val, spec.dv, spec.vel_half, spec.epsilon)
            else:  # vmacro: Gaussian FWHM
                sigma = val / (_broad.FWHM_PER_SIGMA * spec.dv)
                k = _broad.gaussian_kernel(sigma, spec.vel_half)
            kern = k if kern is None else jnp.convolve(kern, k, mode="same")
        flux = _broad.convolve_segments(flux, kern.astype(flux.dtype), spec.segments)
    if obs.lsf is not None:
        flux = _broad.convolve_segments(flux, obs.lsf, spec.segments)
    return flux


def _rest_with_jac(obs: ObsModel, s: Array) -> Array:
    """(1 + L, P_rest): the rest-frame flux and its derivatives by the scaled labels.

    Forward-mode through the network only (the L tangents are elementwise multiply-
    adds that XLA fuses with the forward pass). The result is materialised
    (``optimization_barrier``) before the Doppler shift: otherwise XLA fuses the
    network into the gather and re-evaluates it for every gathered element
    (measured 1.5x slower for the whole LM step).
    """

    ok = jnp.all(jnp.isfinite(s))
    if isinstance(obs.net, KernelNet):
        return materialize(kernel_forward_jac(obs.net, s, obs.activation), ok)

    def f(s):
        y = forward(obs.net, s, obs.activation)
        return y, y

    jac, flux = jax.jacfwd(f, has_aux=True)(s)
    return materialize(jnp.concatenate([flux[None], jac.T]), ok)


def observe_jac(obs: ObsModel, params: Array) -> tuple[Array, Array, Array]:
    """Model flux (P_obs,), validity (P_obs,) and Jacobian (P_obs, k) for one star.

    The same model as :func:`observe`, with the derivatives written out instead of
    ``jax.jacfwd`` through the shift (which pushes k tangents through the gather):

    * labels: the rest-frame derivatives (:func:`_rest_with_jac`), shifted with the
      flux by the same interpolation weights, times the continuum;
    * rv: the interpolant's derivative by the position times ``dt/drv``
      (:meth:`Shifted.slope`); zero where the interpolation is clamped at the
      grid's ends. The smooth interpolants' derivative is continuous; with the
      linear one, on a grid node (for example rv = 0 on the emulator's own grid)
      the right-hand segment's slope is used, where ``jax.jacfwd`` of the clipped
      interpolation would give half of it;
    * continuum coefficients: the Chebyshev basis times the shifted flux.

    Pure and unbatched, like :func:`observe`.
    """
    flux, valid, jac_t = observe_jac_t(obs, params)
    return flux, valid, jac_t.T


def observe_jac_t(obs: ObsModel, params: Array) -> tuple[Array, Array, Array]:
    """:func:`observe_jac` with the Jacobian transposed, (k, P_obs): the layout the
    fitter uses (each parameter's derivatives contiguous, so the products
    vectorise; measured 2x faster than (P_obs, k) with k = 6-9)."""
    n_lab = obs.n_labels
    if obs.broad is not None:
        # the general path: forward-mode through the broadening and the shift
        def f(p):
            flux, valid = observe(obs, p)
            return flux, (flux, valid)

        jac, (flux, valid) = jax.jacfwd(f, has_aux=True)(params)
        return flux, valid, jac.T
    m = _rest_with_jac(obs, params[:n_lab])
    sh = shift_pair(obs, m, params[n_lab])
    mi, valid = sh.value(), sh.valid
    flux = mi[0]
    jac = jnp.concatenate([mi[1:], combine([t[:1] for t in sh.taps], sh.dw_drv)])
    if obs.n_cont:
        basis_t = obs.basis.T
        cont = obs.cont_params(params) @ basis_t
        jac = jnp.concatenate([jac * cont, basis_t * flux])
        flux = flux * cont
    return flux, valid, jac


def _obs_span(lg: LogGrid) -> tuple[int, int]:
    """First embedded index and length of the observed pixels' span on ``lg``."""
    e_first = lg.obs[0][1]
    return e_first, lg.obs[-1][1] + lg.obs[-1][2] - e_first


def shift_span(obs: ObsModel, emb, rv):
    """Rows ``emb`` (..., lg.size) embedded on the log grid (:func:`embed`) shifted
    by ``rv`` onto the span of the observed pixels, in the layout of
    :func:`embed_obs`: value (..., n_emb) and validity (n_emb,) bool, on the
    observed pixels those of
    :func:`shift_pair` (tests compare them); between the observed runs they mean
    nothing (those are zero-weight pixels in that layout).

    One dynamic slice per tap: a shifted row costs ~1.3 us on the APOGEE grid,
    where :func:`shift_pair`'s observed layout (a slice per tap and chip,
    concatenated) costs ~11 us, scalar code on XLA:CPU. Needs ``obs.log_grid``.
    """
    lg = obs.log_grid
    e_first, n_emb = _obs_span(lg)
    ok = jnp.asarray(embed(lg, complete_rest(obs)))
    k, t, _ = log_position(lg, rv)
    w, _ = tap_weights(obs.interp, t)
    taps, valid = [], taps_inside(lg, obs.interp, k)
    for o in TAP_OFFSETS[obs.interp]:
        taps.append(jax.lax.dynamic_slice_in_dim(emb, e_first + k + o, n_emb, -1))
        ok_o = jax.lax.dynamic_slice_in_dim(ok, e_first + k + o, n_emb)
        valid = valid & (ok_o | ((t == 0) & (o != 0)))  # at a node only tap 0 counts
    return combine(taps, w), valid


def embed_obs(obs: ObsModel, x):
    """(..., P_obs) observed-pixel arrays -> (..., n_emb) on the log grid's span of
    the observed pixels (zeros between chips): the layout of
    :func:`normal_equations`. Pixel runs are copied by static slices (no gather)."""
    lg = obs.log_grid
    e_first, n_emb = _obs_span(lg)
    out = jnp.zeros((*x.shape[:-1], n_emb), x.dtype)
    for r0, e0, n in lg.obs:
        out = out.at[..., e0 - e_first : e0 - e_first + n].set(x[..., r0 : r0 + n])
    return out


def span_pixels(obs: ObsModel, x):
    """(..., n_emb) arrays in the layout of :func:`embed_obs` -> (..., P_obs): its
    inverse, static slices concatenated (fast on XLA:CPU for a materialised
    ``x``; slices of a dynamic slice are scalar code)."""
    e_first, _ = _obs_span(obs.log_grid)
    parts = [x[..., e0 - e_first : e0 - e_first + n] for _, e0, n in obs.log_grid.obs]
    return jnp.concatenate(parts, axis=-1)


def _jet_flux_rows(obs: ObsModel, s: Array) -> Array:
    """(R, S) rows of :func:`jet_rows` on the rest grid for scaled labels ``s``:
    row 0 the flux, rows 1 .. L its label derivatives, row L + 1 the flux again
    (for the residual row, so that one loop makes every row of the products), then
    zero rows (``JET_ROWS``)."""
    jet = obs.jet
    n_lab = obs.n_labels
    act = ACTIVATIONS[obs.activation]
    acts = []
    for h in range(jet.b0.shape[0]):
        z = jet.b0[h]
        for j in range(n_lab):
            z = z + jet.w0[j, h] * s[j]
        acts.append(jax.jvp(act, (z,), (jnp.ones_like(z),)))
    # The flux row and the derivative rows are two loops, stacked along the rows:
    # one (R, S) loop choosing a or a' by row was 10 us a star slower (53 -> 43 us
    # with the activations, APOGEE network).
    res = n_lab + 1  # the residual row
    flux = jet.c[0]
    for h, (a, _) in enumerate(acts):
        flux = flux + jet.v[0, h] * a
    der = jet.c[1:res]
    for h, (_, da) in enumerate(acts):
        der = der + jet.v[1:res, h] * da[None]
    pad = jnp.zeros((jet.c.shape[0] - res - 1, flux.shape[0]), flux.dtype)
    return jnp.concatenate([flux[None], der, flux[None], pad])


def jet_rows(obs: ObsModel, params: Array, flux_e: Array, sw_e: Array):
    """The fast path's rows for one star (``obs.jet`` set), in the layout of
    :func:`embed_obs`, times the sqrt weights ``sw_e``: ``x`` (R, n_emb), row 0 the
    rv derivative, rows 1 .. L the label derivatives, row L + 1 the residual
    ``model - flux_e``, zero rows after (``JET_ROWS``); the continuum (if any)
    applied; and ``jc`` (n_c, n_emb), the continuum coefficients' rows (None
    without a continuum). :func:`normal_equations` makes its products of them, the
    sandwich (:func:`payne_lite.fitting._lm.sandwich_meat`) others; how they are
    made is written there."""
    jet, lg = obs.jet, obs.log_grid
    n_lab = obs.n_labels
    s, rv = params[:n_lab], params[n_lab]
    # the shift below takes one dynamic slice per tap of the interpolant
    # (:func:`shift_pair`) of these rows, made first into a buffer of their own
    # (else XLA fuses their loop into every tap's slice and evaluates the network's
    # output layer once per tap): inside a conditional, whose branch writes them
    # straight into its result (materialising them after the fact copied them,
    # 263 kB an evaluation on the APOGEE network)
    m = computed(lambda s: _jet_flux_rows(obs, s), jnp.isfinite(rv), s)
    res = n_lab + 1  # the residual row
    k, t, dt_drv = log_position(lg, rv)
    w, dw = tap_weights(obs.interp, t)
    e_first, n_emb = _obs_span(lg)
    shape = (m.shape[0], n_emb)
    zero = jnp.zeros((), jnp.int32)
    offs = TAP_OFFSETS[obs.interp]
    taps = [jax.lax.dynamic_slice(m, (zero, e_first + k + o), shape) for o in offs]
    row = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    # rows: d/drv, d/ds_j (reordered to the parameter order below), the residual.
    # One combination per row, with the weights of its row: the derivative's
    # (dw/drv) in row 0, the interpolant's in the others. Two combinations of every
    # row chosen by a select cost 5-7 us a star more (the select evaluates both).
    tap_w = jnp.where(
        (jnp.arange(shape[0]) == 0)[:, None],
        jnp.stack(dw)[None] * dt_drv,
        jnp.stack(w)[None],
    )  # (R, taps)
    comb = combine(taps, [tap_w[:, j : j + 1] for j in range(len(offs))])
    if obs.n_cont:
        cont = params[n_lab + 1 :] @ jet.basis
        x = sw_e * jnp.where(row == res, comb * cont - flux_e, comb * cont)
        return x, jet.basis * (sw_e * comb[res])  # row res: the flux, interpolated
    x = sw_e * jnp.where(row == res, comb - flux_e, comb)
    return x, None


def param_blocks(obs: ObsModel, xx, cx=None, cc=None):
    """(k, k) in the layout's parameter order (labels, rv, continuum) from products
    of :func:`jet_rows`' rows: ``xx`` (R, R) of ``x`` with ``x``, ``cx`` (n_c, R) of
    ``jc`` with ``x``, ``cc`` (n_c, n_c) of ``jc`` with ``jc`` (None without a
    continuum)."""
    res = obs.n_labels + 1
    if cx is None:
        a = xx[:res, :res]
    else:
        a = jnp.concatenate(
            [
                jnp.concatenate([xx[:res, :res], cx[:, :res].T], 1),
                jnp.concatenate([cx[:, :res], cc], 1),
            ]
        )
    perm = param_order(obs, a.shape[0])
    return a[perm][:, perm]


def param_order(obs: ObsModel, k: int) -> np.ndarray:
    """Indices that put rows in the jet order (rv, labels, continuum) in the
    layout's order (labels, rv, continuum)."""
    res = obs.n_labels + 1
    return np.r_[1:res, 0, res:k]


def normal_equations(obs: ObsModel, params: Array, flux_e: Array, sw_e: Array):
    """chi2, ``J^T W J`` (k, k), ``J^T W r`` (k,) and the weighted residuals (n_emb,)
    for one star, on the fast path (``obs.jet`` set: one-hidden-layer pixel nets on
    a log grid). ``flux_e`` and ``sw_e`` (sqrt of the weights) are in the layout of
    :func:`embed_obs`; the model is :func:`observe`'s and the Jacobian
    :func:`observe_jac`'s (tests compare them).

    Written for XLA:CPU, where it is 1.6x faster than :func:`observe_jac_t` and the
    products (measured per LM step on the APOGEE network, 160 -> 100 us): the
    activations are 1-D loops (H of them); flux and its label derivatives are one
    (1 + L, S) loop over :class:`JetNet` without any concatenation (XLA:CPU emits
    concatenations, and slices of a dynamic slice, as scalar code, ~3 ns per
    element); the Doppler shift is two dynamic slices of that (offsets k and k + 1)
    and the interpolation, with the rv derivative in row 0 (the flux row), one
    more loop; the products are matrix products.
    """
    x, jc = jet_rows(obs, params, flux_e, sw_e)
    res = obs.n_labels + 1
    prod = x @ x.T  # (R, R): J^T W J, J^T W r and chi2 in one product
    if jc is None:
        a, g = param_blocks(obs, prod), prod[:res, res]
    else:
        cross = jc @ x.T  # (n_c, R)
        a = param_blocks(obs, prod, cross, jc @ jc.T)
        g = jnp.concatenate([prod[:res, res], cross[:, res]])
    return prod[res, res], a, g[param_order(obs, g.shape[0])], x[res]


def weighted_residuals(obs: ObsModel, params: Array, flux_e: Array, sw_e: Array):
    """``sw_e (model - flux_e)`` (n_emb,) at ``params`` for one star, on the fast
    path of :func:`normal_equations` (``obs.jet`` set; ``flux_e``, ``sw_e`` in the
    layout of :func:`embed_obs`, and so is the result): the flux row of its
    (R, S) loop only, without the derivatives and without :func:`observe`'s
    concatenation of per-chip slices (XLA:CPU writes that as scalar code)."""
    jet, lg = obs.jet, obs.log_grid
    n_lab = obs.n_labels
    s, rv = params[:n_lab], params[n_lab]
    act = ACTIVATIONS[obs.activation]
    f = jet.c[0]
    for h in range(jet.b0.shape[0]):
        z = jet.b0[h]
        for j in range(n_lab):
            z = z + jet.w0[j, h] * s[j]
        f = f + jet.v[0, h] * act(z)
    f = materialize(f, jnp.isfinite(rv))  # evaluated once, not once per tap
    k, t, _ = log_position(lg, rv)
    e_first, n_emb = _obs_span(lg)
    val = combine(
        [
            jax.lax.dynamic_slice_in_dim(f, e_first + k + o, n_emb)
            for o in TAP_OFFSETS[obs.interp]
        ],
        tap_weights(obs.interp, t)[0],
    )
    if obs.n_cont:
        val = val * (params[n_lab + 1 :] @ jet.basis)
    return sw_e * (val - flux_e)


def _make_jet(emulator: Emulator, lg: LogGrid, basis: np.ndarray, dtype) -> JetNet:
    """:class:`JetNet` of a one-hidden-layer pixel net (folded in float64)."""
    net = PixelNet(
        tuple(np.asarray(w, np.float64) for w in emulator.net.weights),
        tuple(np.asarray(b, np.float64) for b in emulator.net.biases),
    )
    w0, b0, w1, b1 = kernel_layout(net, emulator.activation, xp=np)[0]
    n_lab = w0.shape[0]
    # rows 0 .. L + 1, then zero rows up to a multiple of JET_ROWS (see JetNet)
    n_pad = -(n_lab + 2) % JET_ROWS
    v = np.concatenate(
        [w1[None], w1[None] * w0, w1[None], np.zeros((n_pad, *w1.shape))]
    )
    c = np.concatenate([b1[None], np.zeros((n_lab, b1.shape[0])), b1[None]])
    c = np.concatenate([c, np.zeros((n_pad, b1.shape[0]))])
    e_first, n_emb = _obs_span(lg)
    basis_e = np.zeros((basis.shape[1], n_emb))
    for r0, e0, n in lg.obs:
        basis_e[:, e0 - e_first : e0 - e_first + n] = basis[r0 : r0 + n].T
    return JetNet(
        *(jnp.asarray(embed(lg, x), dtype) for x in (w0, b0, v, c)),
        basis=jnp.asarray(basis_e, dtype),
    )


def window_valid(obs: ObsModel, rv_lo, rv_hi) -> Array:
    """(P_obs,) bool: pixels valid for every rv in [rv_lo, rv_hi] (one star).

    That is, valid in the sense of :func:`shift_pair` at every rv of the window,
    and reading no rest pixel whose broadening kernel leaves its chip
    (:func:`complete_rest`). On a :class:`LogGrid`: the rest points from
    ``floor(u(rv_hi))`` plus the first tap offset to ``floor(u(rv_lo))`` plus the
    last all exist (a difference of a cumulative count, two slices); else by
    interval search in lambda.
    """
    lg = obs.log_grid
    complete = complete_rest(obs)
    o0, o1 = tap_span(obs.interp)
    if lg is None:
        xq_hi = obs.x_obs + obs.wave_obs * inv_factor_m1(rv_lo)  # smaller rv: redder
        xq_lo = obs.x_obs + obs.wave_obs * inv_factor_m1(rv_hi)
        n = obs.x_rest.shape[0]
        if obs.lookup is None:
            ia, ib = interval(obs.x_rest, xq_lo), interval(obs.x_rest, xq_hi)
        else:
            ia = interval_lookup(obs.x_rest, obs.lookup, xq_lo)
            ib = interval_lookup(obs.x_rest, obs.lookup, xq_hi)
        # the taps of every rv in the window: rest pixels ia + o0 .. ib + o1 (only
        # tap 0 for a window that is one rv on a rest pixel)
        on_a, on_b = xq_lo == obs.x_rest[ia], xq_lo == obs.x_rest[ia + 1]
        node = (xq_lo == xq_hi) & (on_a | on_b)
        at = jnp.where(on_a, ia, ia + 1)
        a, b = jnp.where(node, at, ia + o0), jnp.where(node, at, ib + o1)
        ok = (xq_lo >= obs.x_rest[0]) & (xq_hi <= obs.x_rest[-1]) & (a >= 0) & (b < n)
        a, b = jnp.clip(a, 0, n - 1), jnp.clip(b, 0, n - 1)
        ok = ok & (obs.gap_cum[b] - obs.gap_cum[a] == 0)
        if complete.all():
            return ok
        bad = jnp.asarray(np.concatenate([[0], np.cumsum(~complete)]).astype(np.int32))
        return ok & (bad[b + 1] - bad[a] == 0)
    u_lo = -jnp.arctanh(rv_hi / C_KMS) * lg.inv_step
    u_hi = -jnp.arctanh(rv_lo / C_KMS) * lg.inv_step
    k_lo = jnp.floor(u_lo).astype(jnp.int32)
    k_hi = jnp.floor(u_hi).astype(jnp.int32)
    # one rv on a rest pixel (a fixed rv of 0 on the emulator's grid): tap 0 only
    node = (u_lo == u_hi) & (u_lo == jnp.floor(u_lo))
    o0, o1 = jnp.where(node, 0, o0), jnp.where(node, 0, o1)
    ok = embed(lg, complete.astype(np.int32))
    cum = jnp.asarray(np.concatenate([[0], np.cumsum(ok)]).astype(np.int32))
    # over the embedded span of the observed runs, then its observed pixels by a
    # gather of fixed indices (a concatenation of one slice per run is scalar code
    # on XLA:CPU: 30 us a star on the APOGEE grid, this 4.5)
    e_first, n_emb = _obs_span(lg)
    top = jax.lax.dynamic_slice_in_dim(cum, e_first + k_hi + o1 + 1, n_emb)
    bottom = jax.lax.dynamic_slice_in_dim(cum, e_first + k_lo + o0, n_emb)
    span = top - bottom == k_hi - k_lo + o1 - o0 + 1
    idx = np.concatenate([np.arange(e0, e0 + n) - e_first for _, e0, n in lg.obs])
    inside = taps_inside(lg, obs.interp, k_lo) & taps_inside(lg, obs.interp, k_hi)
    return jnp.take(span, jnp.asarray(idx, np.int32)) & inside


# --------------------------------------------------------------------------------------
# Host-side construction
# --------------------------------------------------------------------------------------
def build_obs_model(
    emulator: Emulator,
    *,
    wavelength=None,
    cont_deg: int | ChipPolynomial = 0,
    dtype=None,
    rv_max: float = max(abs(v) for v in RV_RANGE),
    log_grid: bool = True,
    resolution=None,
    lsf_sigma=None,
    emulator_resolution=None,
    broadening: tuple[str, ...] = (),
    limb_darkening: float = _broad.LIMB_DARKENING,
    interp: str = DOPPLER_INTERP,
) -> ObsModel:
    """The :class:`ObsModel` pytree for ``emulator`` observed on ``wavelength``.

    ``cont_deg``: the continuum, an int (degree of one Chebyshev polynomial over the
    grid; 0 = none) or a :class:`ChipPolynomial` (one per chip).

    ``rv_max`` [km/s] is the largest ``|rv|`` the model will be asked for (it sizes the
    margin of the log-uniform fast path; beyond it pixels are flagged invalid);
    ``log_grid=False`` turns that path off (per-pixel interpolation in lambda).
    ``resolution``, ``lsf_sigma``, ``emulator_resolution``: the instrumental
    profile (:func:`lsf_sigma_pixels`); ``broadening``: names from
    :data:`BROADENING_PARAMS` to add as parameters (after the continuum's), with
    the rotation profile's ``limb_darkening`` coefficient. Any of these needs a
    log-uniform emulator grid and turns the fast normal equations off.
    ``interp``: the Doppler interpolant, a key of :data:`TAP_OFFSETS`
    (:class:`payne_lite.Instrument`'s ``doppler``).

    Raises:
        ValueError: a bad ``cont_deg`` or wavelength grid, or an observed grid that
            does not overlap the emulator's; bad broadening or resolution inputs;
            an unknown ``interp``.
    """
    if interp not in TAP_OFFSETS:
        raise ValueError(
            f"unknown Doppler interpolant {interp!r}; one of {tuple(TAP_OFFSETS)}"
        )
    cont = as_continuum(cont_deg)
    dtype = jax.dtypes.canonicalize_dtype(dtype or jnp.result_type(float))
    wave_rest = np.asarray(emulator.wavelength, dtype=np.float64)
    if wavelength is None:
        wave_obs = wave_rest.copy()
    else:
        wave_obs = as_float_array(wavelength, "wavelength", ndim=1)
        check_wavelength(wave_obs)
        if wave_obs[-1] <= wave_rest[0] or wave_obs[0] >= wave_rest[-1]:
            raise ValueError(
                f"wavelength grid [{wave_obs[0]:g}, {wave_obs[-1]:g}] A "
                f"({wave_obs.size} pixels) does not overlap the emulator's "
                f"[{wave_rest[0]:g}, {wave_rest[-1]:g}] A ({wave_rest.size} pixels)"
            )
    ref = 0.5 * (wave_rest[0] + wave_rest[-1])
    basis = np.ones((wave_obs.size, 1)) if cont is None else cont.basis(wave_obs)
    kernel = emulator.kernel_params(
        dtype
    )  # fast single-star form of 1-layer pixel nets
    net, activation = (
        kernel if kernel is not None else (emulator.params(dtype), emulator.activation)
    )
    lg = make_log_grid(wave_rest, wave_obs, rv_max) if log_grid else None
    broadening = tuple(broadening)
    bad = [b for b in broadening if b not in BROADENING_PARAMS]
    if bad or len(set(broadening)) != len(broadening):
        raise ValueError(
            f"broadening must name distinct parameters of {BROADENING_PARAMS}, "
            f"got {broadening}"
        )
    broadening = tuple(b for b in BROADENING_PARAMS if b in broadening)
    sigma_pix, _ = lsf_sigma_pixels(
        emulator,
        wave_obs,
        resolution=resolution,
        lsf_sigma=lsf_sigma,
        emulator_resolution=emulator_resolution,
    )
    lsf, spec = None, None
    if sigma_pix is not None and np.max(sigma_pix) == 0:
        sigma_pix = None
    if sigma_pix is not None or broadening:
        if not 0.0 <= limb_darkening <= 1.0:
            raise ValueError(f"limb_darkening must be in [0, 1], got {limb_darkening}")
        step, segments = rest_segments(wave_rest)
        dv = C_KMS * step
        vel_half = 0
        if broadening:
            width = 0.0
            if "vsini" in broadening:
                width += BROADENING_RANGE["vsini"][1] / dv
            if "vmacro" in broadening:
                width += (
                    _broad.GAUSS_TRUNCATE
                    * BROADENING_RANGE["vmacro"][1]
                    / (_broad.FWHM_PER_SIGMA * dv)
                )
            vel_half = int(np.ceil(width)) + _broad.SINC_MARGIN
        if sigma_pix is not None:
            half = max(1, int(np.ceil(_broad.GAUSS_TRUNCATE * np.max(sigma_pix))))
            lsf = jnp.asarray(_broad.gaussian_kernels(sigma_pix, half), dtype)
        spec = BroadSpec(
            segments=segments,
            names=broadening,
            dv=float(dv),
            vel_half=vel_half,
            epsilon=float(limb_darkening),
        )
    return ObsModel(
        net=net,
        x_rest=jnp.asarray(wave_rest - ref, dtype=dtype),
        gap_cum=jnp.asarray(gap_cum(wave_rest)),
        x_obs=jnp.asarray(wave_obs - ref, dtype=dtype),
        wave_obs=jnp.asarray(wave_obs, dtype=dtype),
        basis=jnp.asarray(basis, dtype=dtype),
        lookup=make_lookup(wave_rest - ref, dtype),
        activation=activation,
        n_labels=emulator.n_labels,
        cont=cont,
        log_grid=lg,
        jet=(
            None
            if kernel is None or lg is None or spec is not None
            else _make_jet(emulator, lg, basis, dtype)
        ),
        lsf=lsf,
        broad=spec,
        interp=interp,
    )


def param_layout(
    emulator: Emulator,
    *,
    cont_deg: int | ChipPolynomial = 0,
    rv_range=RV_RANGE,
    broadening=(),
) -> ParamLayout:
    """Names and bounds of the fit parameters (see :class:`ParamLayout`);
    ``cont_deg`` an int or a :class:`ChipPolynomial` as for
    :func:`build_obs_model`; ``broadening`` parameters [km/s] come last, bounded
    by :data:`BROADENING_RANGE`."""
    n_lab = emulator.n_labels
    cont = as_continuum(cont_deg)
    cont_names = () if cont is None else cont.names
    n_cont = len(cont_names)
    broadening = tuple(b for b in BROADENING_PARAMS if b in tuple(broadening))
    clash = [b for b in broadening if b in emulator.label_names]
    if clash:
        raise ValueError(
            f"the emulator already has a label named {clash[0]!r}; it cannot also be "
            "a broadening parameter (fit the label, or hold it with fixed=)"
        )
    names = tuple(emulator.label_names) + ("rv",) + cont_names + broadening
    lo = np.concatenate(
        [
            np.full(n_lab, -LABEL_BOUND),
            [rv_range[0]],
            np.full(n_cont, -CONT_BOUND),
            [BROADENING_RANGE[b][0] for b in broadening],
        ]
    )
    hi = np.concatenate(
        [
            np.full(n_lab, LABEL_BOUND),
            [rv_range[1]],
            np.full(n_cont, CONT_BOUND),
            [BROADENING_RANGE[b][1] for b in broadening],
        ]
    )
    deg = 0 if cont is None else cont.deg
    return ParamLayout(names, lo, hi, n_lab, deg, broadening, cont)


def make_model(
    emulator: Emulator,
    *,
    wavelength=None,
    cont_deg: int | ChipPolynomial = 0,
    **options,
):
    """The observation model of ``emulator`` as a pure function of one star's params.

    Args:
        emulator: the rest-frame spectrum emulator.
        wavelength: (P_obs,) observed wavelength grid [A]; None = the emulator's.
        cont_deg: degree of the multiplicative Chebyshev continuum (0 = none), or
            a :class:`ChipPolynomial` (one polynomial per chip).
        **options: ``resolution``, ``lsf_sigma``, ``emulator_resolution``,
            ``broadening`` (e.g. ``("vsini",)``: parameters appended after the
            continuum's) and ``limb_darkening``, as for :func:`build_obs_model`.

    Returns:
        ``(model, layout)``: ``model(params) -> (flux (P_obs,), valid (P_obs,) bool)``
        for ``params`` (k,) = [scaled labels, rv [km/s], continuum coefficients],
        pure and jittable, vmap it for many stars; ``layout`` a :class:`ParamLayout`
        (names, lower and upper bounds).

    Examples:
        >>> model, layout = make_model(emu, cont_deg=1)        # doctest: +SKIP
        >>> flux, valid = jax.jit(model)(jnp.array([0, 0, 0, 12.0, 1.0, 0.0]))
    """
    obs = build_obs_model(emulator, wavelength=wavelength, cont_deg=cont_deg, **options)
    layout = param_layout(
        emulator, cont_deg=cont_deg, broadening=options.get("broadening", ())
    )
    return functools.partial(observe, obs), layout
