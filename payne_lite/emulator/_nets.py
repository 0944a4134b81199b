"""The emulator's networks as pure functions: per-pixel and dense MLPs, the batched
per-pixel kernel, and the jitted batch evaluations (:func:`predict_chunk` is what
:meth:`payne_lite.emulator.Emulator.predict` runs).

Labels enter the networks scaled to the training box, ``s = (x - lo) / (hi - lo) - 0.5``,
so the box maps to ``[-0.5, 0.5]`` as in The Payne (Ting et al. 2019, ApJ 879, 69).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


def _leaky_relu(x):
    # The Payne's definition: slope 0.01 for negative inputs.
    return jnp.where(x > 0, x, 0.01 * x)


#: Activation functions by name.  "sigmoid" is the classic Payne per-pixel network,
#: "leaky_relu" (slope 0.01) the later 2-hidden-layer Payne MLP.
ACTIVATIONS = {
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "leaky_relu": _leaky_relu,
    "softplus": jax.nn.softplus,
    "silu": jax.nn.silu,
}


class PixelNet(NamedTuple):
    """One small MLP per pixel, all pixels stacked on axis 0.

    For ``k`` hidden layers of widths ``H1..Hk`` and ``L`` labels:
    ``weights = (W0 (P,H1,L), W1 (P,H2,H1), ..., Wk (P,Hk))`` and
    ``biases = (b0 (P,H1), b1 (P,H2), ..., bk (P,))``. The classic Payne network is
    ``k = 1``: ``W0 (P,H,L), b0 (P,H), W1 (P,H), b1 (P,)``.
    """

    weights: tuple[Array, ...]
    biases: tuple[Array, ...]


class DenseNet(NamedTuple):
    """One MLP for all pixels (The Payne's later 2-hidden-layer network).

    ``weights = (W0 (H1,L), W1 (H2,H1), ..., Wk (P,Hk))``,
    ``biases = (b0 (H1,), ..., bk (P,))``.
    """

    weights: tuple[Array, ...]
    biases: tuple[Array, ...]


# --------------------------------------------------------------------------------------
# Pure numerical core
# --------------------------------------------------------------------------------------
def scale_labels(labels, lo, hi):
    """Physical labels (..., L) -> scaled labels in [-0.5, 0.5] over the box [lo, hi]."""
    return (labels - lo) / (hi - lo) - 0.5


def unscale_labels(scaled, lo, hi):
    """Scaled labels (..., L) -> physical labels."""
    return (scaled + 0.5) * (hi - lo) + lo


def pixel_forward(net: PixelNet, s: Array, activation: str = "sigmoid") -> Array:
    """Flux (P,) of a per-pixel network for one star's scaled labels ``s`` (L,).

    Written for one star; batch it with ``jax.vmap`` (or use :func:`predict_batch`).
    """
    act = ACTIVATIONS[activation]
    h = act(jnp.einsum("phl,l->ph", net.weights[0], s) + net.biases[0])
    for w, b in zip(net.weights[1:-1], net.biases[1:-1], strict=True):
        h = act(jnp.einsum("pij,pj->pi", w, h) + b)
    return jnp.einsum("ph,ph->p", net.weights[-1], h) + net.biases[-1]


def dense_forward(net: DenseNet, s: Array, activation: str = "leaky_relu") -> Array:
    """Flux (P,) of a dense (all-pixel) MLP for one star's scaled labels ``s`` (L,)."""
    act = ACTIVATIONS[activation]
    h = s
    for w, b in zip(net.weights[:-1], net.biases[:-1], strict=True):
        h = act(w @ h + b)
    return net.weights[-1] @ h + net.biases[-1]


def forward(net, s: Array, activation: str) -> Array:
    """Flux (P,) for one star's scaled labels (L,), whichever the network family."""
    if isinstance(net, KernelNet):
        return kernel_forward(net, s, activation)
    if isinstance(net, DenseNet):
        return dense_forward(net, s, activation)
    return pixel_forward(net, s, activation)


class KernelNet(NamedTuple):
    """A one-hidden-layer :class:`PixelNet` rearranged for the batched kernel.

    ``w0 (L, H, P)``, ``b0 (H, P)``, ``w1 (H, P)``, ``b1 (P,)``: every (label, hidden)
    slice is a contiguous run of pixels, so the kernel's loads are unit-stride vectors.
    Made once per emulator and dtype by :func:`kernel_layout`.
    """

    w0: Array
    b0: Array
    w1: Array
    b1: Array


def kernel_layout(net: PixelNet, activation: str, xp=jnp) -> tuple[KernelNet, str]:
    """Rearrange a one-hidden-layer pixel net for :func:`predict_kernel`.

    A sigmoid network becomes the identical tanh network, using
    ``sigmoid(z) = 0.5 * tanh(z / 2) + 0.5`` with the factors folded into the weights
    (exact algebra; tanh is the cheaper transcendental on CPU).

    Returns:
        (the rearranged weights, the activation the kernel must use).
    """
    w0, w1 = net.weights
    b0, b1 = net.biases
    if activation == "sigmoid":
        w0, b0 = 0.5 * w0, 0.5 * b0
        b1 = b1 + 0.5 * xp.sum(w1, axis=1)
        w1 = 0.5 * w1
        activation = "tanh"
    return KernelNet(xp.transpose(w0, (2, 1, 0)), b0.T, w1.T, b1), activation


#: Pixels per block in the batched kernel: a block's weights (36 vectors of 64 floats,
#: 9 KB for 5 labels and 5 hidden units) stay in the L1 cache while the kernel sweeps
#: every spectrum of the batch over them (see :func:`_pixel_batch_1layer`).
PIXEL_BLOCK = 64

#: float32 tanh as ``x P(x^2) / Q(x^2)`` on ``|x| <= 8.3``, clamped outside (see
#: :func:`tanh_rational`). A [7/8] rational minimax fit to tanh on [0, 8.3] (linear
#: programming on 3,000 points; float64 error 1.8e-7 inside, 3.0e-7 for |x| > 8.3).
_TANH_CLAMP = 8.3
_TANH_P = (
    9.9999922674909647e-01,
    1.2888113867598802e-01,
    2.9115561221848352e-03,
    1.1018699010241818e-05,
)
_TANH_Q = (
    1.0,
    4.6221156152785614e-01,
    2.3651873326769782e-02,
    2.3319226675353659e-04,
    2.3313395438448942e-07,
)


def _horner(coeffs, t):
    out = coeffs[-1]
    for c in coeffs[-2::-1]:
        out = out * t + c
    return out


def tanh_rational(x: Array) -> Array:
    """tanh for float32 in 12 vector operations: two clamps, 9 multiply(-add)s, 1 divide.

    Max ``|error|`` over every float32 in [-10, 10] is 4.5e-7 (``jnp.tanh``: 2.9e-7), about
    4 units in the last place near +-1, mostly float32 rounding; tanh is odd and the
    result is within 3e-7 of +-1 beyond the clamp, so the bound holds for all finite x.
    A spectrum's error is at most ``sum_h |w1[p, h]|`` times that: 1e-6 for the real
    Payne network (``sum |w1| <= 2.3`` after the sigmoid fold), against 3e-7 of float32
    rounding elsewhere in the network. ``jnp.tanh`` (XLA's [13/6] rational with
    extra branches for small ``|x|``) costs about 35 % more in the batched kernel, where
    the activations are most of the work. :meth:`Emulator.predict` uses it by default
    (``fast_tanh=True``); the fitter's model (:func:`kernel_forward`) keeps
    ``jnp.tanh``, from which the spectra differ by up to 6e-7 (median 6e-8).
    ``tests/test_fit.py::test_real_network_recovery_and_errors`` makes its data with
    ``fast_tanh=False``: with ``tanh_rational`` data one of its 20 noisy float32 fits
    stalled (as it does for 1 in 5 random 2e-7 perturbations of its data with
    ``jnp.tanh``).
    """
    x = jnp.clip(x, -_TANH_CLAMP, _TANH_CLAMP)
    t = x * x
    return x * _horner(_TANH_P, t) / _horner(_TANH_Q, t)


def _kernel_activation(activation: str, dtype, fast_tanh: bool = False):
    """The activation function the batched kernel evaluates for ``dtype``.

    With ``fast_tanh``, float32 tanh (also every sigmoid network, folded into tanh by
    :func:`kernel_layout`) is :func:`tanh_rational`; every other case, float64
    included, is the exact function of :data:`ACTIVATIONS`.
    """
    if fast_tanh and activation == "tanh" and jnp.dtype(dtype) == jnp.float32:
        return tanh_rational
    return ACTIVATIONS[activation]


def _tree_sum(terms: list) -> Array:
    """``terms[0] + terms[1] + ...`` added pairwise: ((t0 + t1) + (t2 + t3)) + t4."""
    while len(terms) > 1:
        pairs = [a + b for a, b in zip(terms[::2], terms[1::2], strict=False)]
        terms = pairs + terms[len(pairs) * 2 :]
    return terms[0]


def _pixel_batch_1layer(
    k: KernelNet,
    s: Array,
    activation: str,
    *,
    fast_tanh: bool = False,
    block: int = PIXEL_BLOCK,
) -> Array:
    """Batched flux (B, P) from a :class:`KernelNet`; ``s`` is (B, L) scaled labels.

    The hot path. The label contraction (L terms) and the hidden units (H terms) are
    unrolled into elementwise multiply-adds that XLA fuses into one loop, without
    materialising the (B, P, H) activations. The pixels are zero-padded to a multiple
    of ``block`` and split into blocks, and the loop runs block by block over the whole
    batch, so that a block's weights are read from the L1 cache; in (B, P) order every
    spectrum streams all 1 MB of the real network's weights from L3 again, which costs
    more than the multiply-adds. A second pass (kept separate by an optimization
    barrier, which stops XLA from fusing it back into the (B, P) order) transposes the
    (n_block, B, block) result to (B, P). Per element, the arithmetic is that of
    :func:`kernel_forward`; with ``fast_tanh``, float32 tanh is :func:`tanh_rational`
    and the label and hidden-unit sums are added as pairwise trees, which moves the
    flux by at most 4.2e-7 against left-to-right sums and not further from
    ``jnp.tanh``'s (10,240 labels over the real network's box: max 5.4e-7 with trees,
    6.0e-7 without).
    Peak memory is twice the (B, P) output (the blocked result and its transpose).
    """
    act = _kernel_activation(activation, s.dtype, fast_tanh)
    n_lab, n_hid, n_pix = k.w0.shape
    n_blk = -(-n_pix // block)

    def blocked(a):  # (..., P) -> (..., n_blk, block), padded with zero weights
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, n_blk * block - n_pix)])
        return a.reshape(a.shape[:-1] + (n_blk, block))

    # materialise the blocked weights once (a 1 MB copy), instead of padding inside
    # the hot loop
    w0, b0, w1, b1 = jax.lax.optimization_barrier(tuple(blocked(a) for a in k))
    lab = [s[:, j][None, :, None] for j in range(n_lab)]  # (1, B, 1) each
    if act is tanh_rational:
        # fast_tanh: the sums as pairwise trees (shorter dependency chains for the
        # CPU's out-of-order window: 10 % less CPU time) instead of kernel_forward's
        # left-to-right order; rounding-level change (see the docstring)
        hid = [
            w1[h][:, None, :]
            * act(
                _tree_sum(
                    [b0[h][:, None, :] + w0[0, h][:, None, :] * lab[0]]
                    + [w0[j, h][:, None, :] * lab[j] for j in range(1, n_lab)]
                )
            )
            for h in range(n_hid)
        ]
        out = b1[:, None, :] + _tree_sum(hid)
    else:
        out = b1[:, None, :]  # (n_blk, 1, block), broadcast over the batch
        for h in range(n_hid):
            z = b0[h][:, None, :]
            for j in range(n_lab):
                z = z + w0[j, h][:, None, :] * lab[j]
            out = out + w1[h][:, None, :] * act(z)
    out = jax.lax.optimization_barrier(out)  # (n_blk, B, block)
    n_spec = s.shape[0]
    return out.transpose(1, 0, 2).reshape(n_spec, n_blk * block)[:, :n_pix]


def kernel_forward(k: KernelNet, s: Array, activation: str) -> Array:
    """Flux (P,) for one star's scaled labels ``s`` (L,) from a :class:`KernelNet`.

    The single-star form of the hot path, for fitters: under ``vmap`` over stars and
    ``jax.jacfwd`` over labels it stays a chain of elementwise multiply-adds that XLA
    fuses, instead of batched einsums that materialise (stars, P, H) activations.
    """
    act = ACTIVATIONS[activation]
    n_lab, n_hid, _ = k.w0.shape
    out = k.b1
    for h in range(n_hid):
        z = k.b0[h]
        for j in range(n_lab):
            z = z + k.w0[j, h] * s[j]
        out = out + k.w1[h] * act(z)
    return out


def kernel_forward_jac(k: KernelNet, s: Array, activation: str) -> Array:
    """(1 + L, P): flux and its derivatives by the scaled labels ``s`` (L,), one star.

    The chain rule written out: ``d flux / d s_j = sum_h w1[h] act'(z_h) w0[j, h]``,
    with ``act'`` from the activation's own JVP rule (``1 - tanh^2``, reusing the
    forward activation). Per pixel that is the forward pass plus ``H (L + 2)``
    multiply-adds, where ``jax.jacfwd`` of :func:`kernel_forward` pushes L tangents
    through every label contraction (``H L^2`` more). On XLA:CPU both run at the
    same speed once stacked into one (1 + L, P) array (~100 us for the real 5-label
    network against ~15 us for the forward pass: the concatenation is emitted as
    scalar code); the fitter's fast path (:func:`payne_lite.observe.normal_equations`)
    avoids the stacking.
    """
    act = ACTIVATIONS[activation]
    n_lab, n_hid, _ = k.w0.shape
    out = k.b1
    jac = [None] * n_lab
    for h in range(n_hid):
        z = k.b0[h]
        for j in range(n_lab):
            z = z + k.w0[j, h] * s[j]
        a, da = jax.jvp(act, (z,), (jnp.ones_like(z),))
        out = out + k.w1[h] * a
        c = k.w1[h] * da
        for j in range(n_lab):
            jac[j] = c * k.w0[j, h] if jac[j] is None else jac[j] + c * k.w0[j, h]
    return jnp.stack([out, *jac])


#: XLA options for the batched evaluations: 512-bit vectors where the CPU has them
#: (AVX-512). XLA:CPU prefers 256-bit by default; on the 2-core AMD EPYC (Zen 4) this
#: was measured on, 512-bit makes the batched kernel about 20 % faster (half the
#: instructions for the same arithmetic). No effect on CPUs without AVX-512 or on GPUs.
KERNEL_COMPILER_OPTIONS = {"xla_cpu_prefer_vector_width": 512}


@functools.partial(
    jax.jit,
    static_argnames=("activation", "fast_tanh"),
    compiler_options=KERNEL_COMPILER_OPTIONS,
)
def predict_kernel(
    k: KernelNet, s: Array, activation: str, *, fast_tanh: bool = False
) -> Array:
    """Flux (B, P) for scaled labels ``s`` (B, L) from a :class:`KernelNet`. Pure.

    ``fast_tanh``: evaluate float32 tanh with :func:`tanh_rational` (about 25 % faster
    here; max error 4.5e-7 per activation); float64 is always exact.
    """
    return _pixel_batch_1layer(k, s, activation, fast_tanh=fast_tanh)


@functools.partial(
    jax.jit,
    static_argnames=("activation",),
    compiler_options=KERNEL_COMPILER_OPTIONS,
)
def predict_batch(net, s: Array, activation: str) -> Array:
    """Flux (B, P) for a batch of scaled labels ``s`` (B, L), any network. Pure, jitted.

    For repeated calls with a one-hidden-layer pixel net, rearrange the weights once
    with :func:`kernel_layout` and call :func:`predict_kernel` (what
    :meth:`Emulator.predict` does): here the rearrangement is redone on every call.
    """
    return _batch_flux(net, s, activation)


def _batch_flux(net, s: Array, activation: str, *, fast_tanh: bool = False) -> Array:
    """The body of :func:`predict_batch` and :func:`predict_chunk` (not jitted)."""
    if isinstance(net, KernelNet):
        return _pixel_batch_1layer(net, s, activation, fast_tanh=fast_tanh)
    if isinstance(net, PixelNet) and len(net.weights) == 2:
        k, kernel_act = kernel_layout(net, activation)
        return _pixel_batch_1layer(k, s, kernel_act)
    return jax.vmap(forward, in_axes=(None, 0, None))(net, s, activation)


#: Row counts below the chunk that :func:`predict_chunk` evaluates on their own.
PREDICT_SMALL_ROWS = (8, 64)


@functools.partial(
    jax.jit,
    static_argnames=("activation", "fast_tanh", "small"),
    compiler_options=KERNEL_COMPILER_OPTIONS,
)
def predict_chunk(
    net,
    s: Array,
    n_valid,
    activation: str,
    *,
    fast_tanh: bool = False,
    small: tuple[int, ...] = PREDICT_SMALL_ROWS,
) -> Array:
    """Flux (C, P) for the first ``n_valid`` rows of a fixed-size chunk ``s`` (C, L).

    The executable of :meth:`Emulator.predict`: one compilation per chunk size serves
    every number of spectra. ``n_valid`` is traced, so it costs no recompilation; a
    switch evaluates only the first ``r`` rows for the smallest ``r`` in ``small``
    with ``n_valid <= r`` (rows ``r..C`` of the result are then zero), all ``C``
    otherwise. Every branch is the same elementwise arithmetic, so a row's flux does
    not depend on the branch (or chunk) it is computed in.

    ``net``: a :class:`KernelNet` (the batched kernel, ``activation`` as returned by
    :func:`kernel_layout`; ``fast_tanh`` as in :func:`predict_kernel`) or any
    :class:`PixelNet` / :class:`DenseNet` (as :func:`predict_batch`).
    """
    n_chunk = s.shape[0]
    sizes = tuple(r for r in sorted(set(small)) if 0 < r < n_chunk)

    def rows(r):
        def f(s):
            out = _batch_flux(net, s[:r], activation, fast_tanh=fast_tanh)
            return out if r == n_chunk else jnp.pad(out, ((0, n_chunk - r), (0, 0)))

        return f

    if not sizes:
        return rows(n_chunk)(s)
    index = sum((n_valid > r).astype(jnp.int32) for r in sizes)
    return jax.lax.switch(index, [rows(r) for r in (*sizes, n_chunk)], s)
