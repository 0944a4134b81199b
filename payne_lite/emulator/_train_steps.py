"""Pure kernels of emulator training (jitted, no host state): per-pixel parameter
vectors, the forward pass and its Jacobian, the Levenberg-Marquardt step, the
validation statistics, the Adam step factory, and the device mesh of the pixel axis.

Shapes: C pixels of a chunk, N spectra, L labels, ``n_par`` parameters per pixel;
labels are scaled to [-0.5, 0.5] over the training box, flux is in the grid's units.
The drivers that loop over iterations live in :mod:`payne_lite.emulator._train`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from ._nets import ACTIVATIONS, PixelNet, pixel_forward


# --------------------------------------------------------------------------------------
# Per-pixel parameter vectors
# --------------------------------------------------------------------------------------
def pixel_template(n_lab: int, hidden: tuple[int, ...]):
    """Shapes of one pixel's network as a (weights, biases) pytree of zeros."""
    ws, bs, width = [], [], n_lab
    for h in hidden:
        ws.append(jnp.zeros((h, width)))
        bs.append(jnp.zeros((h,)))
        width = h
    ws.append(jnp.zeros((width,)))
    bs.append(jnp.zeros(()))
    return (tuple(ws), tuple(bs))


def _pixel_model(theta, s, unravel, activation):
    """One pixel's flux (scalar) for scaled labels ``s`` (L,) and flat params ``theta``."""
    ws, bs = unravel(theta)
    net = PixelNet(tuple(w[None] for w in ws), tuple(b[None] for b in bs))
    return pixel_forward(net, s, activation)[0]


def init_theta(
    rng: np.random.Generator,
    n: int,
    n_lab: int,
    hidden,
    mean_flux,
    init_scale: float,
    dtype,
) -> np.ndarray:
    """Random flat parameters (n, n_par) for ``n`` pixels with output mean ``mean_flux``."""
    parts_w, parts_b, width = [], [], n_lab
    for i, h in enumerate(hidden):
        scale = init_scale if i == 0 else init_scale / np.sqrt(width)
        parts_w.append(rng.normal(0.0, scale, (n, h, width)))
        parts_b.append(rng.normal(0.0, 0.5 if i == 0 else 0.1, (n, h)))
        width = h
    parts_w.append(rng.normal(0.0, 0.1 / np.sqrt(width), (n, width)))
    parts_b.append(np.asarray(mean_flux, dtype=float).reshape(n))
    # Same ordering as ravel_pytree((weights, biases)) of the template.
    flat = [a.reshape(n, -1) for a in parts_w] + [a.reshape(n, -1) for a in parts_b]
    return np.concatenate(flat, axis=1).astype(dtype)


def net_to_theta(net: PixelNet, box_from: tuple, box_to: tuple, dtype) -> np.ndarray:
    """Flat parameters (P, n_par) of a trained :class:`PixelNet` (the inverse of
    :func:`theta_to_net`), for labels scaled over the box ``box_to`` = (lo, hi) instead
    of the box ``box_from`` the network was trained on: the first layer absorbs the
    affine map between the two scalings, so the networks' outputs are unchanged."""
    lo0, hi0 = (np.asarray(b, np.float64) for b in box_from)
    lo1, hi1 = (np.asarray(b, np.float64) for b in box_to)
    # s_from = a * s_to + c, elementwise over labels
    a = (hi1 - lo1) / (hi0 - lo0)
    c = (lo1 - lo0 + 0.5 * (hi1 - lo1)) / (hi0 - lo0) - 0.5
    ws = [np.asarray(w, np.float64) for w in net.weights]
    bs = [np.asarray(b, np.float64) for b in net.biases]
    bs[0] = bs[0] + ws[0] @ c
    ws[0] = ws[0] * a
    n = ws[0].shape[0]
    flat = [w.reshape(n, -1) for w in ws] + [b.reshape(n, -1) for b in bs]
    return np.concatenate(flat, axis=1).astype(dtype)


def theta_to_net(theta: np.ndarray, unravel) -> PixelNet:
    """Flat per-pixel parameters ``theta`` (P, n_par) as a :class:`PixelNet` of NumPy
    arrays (weights (P, H, L) ... (P, H), biases (P, H) ... (P,))."""
    ws, bs = jax.vmap(unravel)(jnp.asarray(theta))
    return PixelNet(tuple(np.asarray(w) for w in ws), tuple(np.asarray(b) for b in bs))


# --------------------------------------------------------------------------------------
# Jitted kernels (pure)
# --------------------------------------------------------------------------------------
def _act_and_grad(z, activation):
    """Activation a(z) and its derivative a'(z), elementwise."""
    if activation == "sigmoid":
        a = jax.nn.sigmoid(z)
        return a, a * (1.0 - a)
    if activation == "tanh":
        a = jnp.tanh(z)
        return a, 1.0 - a * a
    return jax.jvp(ACTIVATIONS[activation], (z,), (jnp.ones_like(z),))


def fwd(theta, s, *, unravel, activation):
    """Flux (C, N) of C pixels' networks ``theta`` (C, n_par) at scaled labels s (N, L)."""
    one = functools.partial(_pixel_model, unravel=unravel, activation=activation)
    return jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, None))(theta, s)


def fwd_jac(theta, s, *, unravel, activation):
    """Flux (C, N) and Jacobian (C, N, n_par) with respect to each pixel's parameters.

    One hidden layer: the Jacobian is written out from the forward pass's activations
    (``[W1 a'(z) s, a(z), W1 a'(z), 1]`` in ravel order ``W0, W1, b0, b1``), 4-5x
    faster than ``jax.jacfwd``; deeper networks use ``jax.jacfwd``.
    """
    ws, bs = jax.vmap(unravel)(theta)
    if len(ws) == 2:
        (w0, w1), (b0, b1) = ws, bs
        n_pix, n_hid, n_lab = w0.shape
        n = s.shape[0]
        z = jnp.einsum("chl,nl->cnh", w0, s) + b0[:, None, :]
        a, da = _act_and_grad(z, activation)
        g = w1[:, None, :] * da
        f = jnp.einsum("cnh,ch->cn", a, w1) + b1[:, None]
        jac = jnp.concatenate(
            [
                (g[..., None] * s[None, :, None, :]).reshape(n_pix, n, n_hid * n_lab),
                a,
                g,
                jnp.ones((n_pix, n, 1), dtype=a.dtype),
            ],
            axis=-1,
        )
        return f, jac
    one = functools.partial(_pixel_model, unravel=unravel, activation=activation)
    jac = jax.vmap(jax.vmap(jax.jacfwd(one), in_axes=(None, 0)), in_axes=(0, None))(
        theta, s
    )
    return fwd(theta, s, unravel=unravel, activation=activation), jac


def _spd_solve(args):
    """``a^-1 g`` for one symmetric positive definite ``a`` (n, n), by Cholesky.

    One matrix per call, through ``lax.map``: jaxlib's batched LAPACK kernels
    (Cholesky, LU) split a batch over XLA:CPU's intra-op thread pool and wait for
    it (``ParallelBatchMap``), which deadlocks when several devices' programs run
    on that pool at once (training on 4 simulated CPU devices hung at 256 pixels,
    every thread waiting: a gdb backtrace shows the Cholesky kernel's
    BlockingCounter). A batch of one is not split."""
    a, g = args
    chol = jnp.linalg.cholesky(a)
    return jax.scipy.linalg.cho_solve((chol, True), g)


@functools.partial(
    jax.jit, static_argnames=("unravel", "activation"), donate_argnames=("theta", "lam")
)
def lm_step(theta, lam, s, y, sw, *, unravel, activation):
    """One Levenberg-Marquardt iteration for C pixels at once.

    Args:
        theta: (C, n_par) flat parameters; lam: (C,) damping.
        s: (N, L) scaled training labels; y: (C, N) flux; sw: (C, N) sqrt weights.

    Returns:
        (theta, lam, loss) with loss (C,) the weighted sum of squares after the step.
    """
    kw = dict(unravel=unravel, activation=activation)
    f, jac = fwd_jac(theta, s, **kw)
    r = sw * (f - y)
    jac = sw[..., None] * jac
    a = jnp.einsum("cni,cnj->cij", jac, jac)
    g = jnp.einsum("cni,cn->ci", jac, r)
    d = jnp.diagonal(a, axis1=1, axis2=2)
    eps = 1e-6 * jnp.max(d, axis=1, keepdims=True) + jnp.finfo(a.dtype).tiny
    a_damped = a + jax.vmap(jnp.diag)(lam[:, None] * d + eps)
    if jax.default_backend() == "cpu":  # one matrix per LAPACK call (_spd_solve)
        delta = -jax.lax.map(_spd_solve, (a_damped, g))
    else:  # GPU solvers take the batch at once, without the CPU pool's deadlock
        delta = -jax.vmap(_spd_solve)((a_damped, g))
    th_new = theta + delta
    r_new = sw * (fwd(th_new, s, **kw) - y)
    loss, loss_new = jnp.sum(r * r, axis=1), jnp.sum(r_new * r_new, axis=1)
    ok = jnp.isfinite(loss_new) & (loss_new < loss)
    return (
        jnp.where(ok[:, None], th_new, theta),
        jnp.clip(jnp.where(ok, lam / 3.0, lam * 4.0), 1e-10, 1e10),
        jnp.where(ok, loss_new, loss),
    )


@functools.partial(jax.jit, static_argnames=("unravel", "activation"))
def valid_stats(theta, s, y, sw, *, unravel, activation):
    """Per-pixel validation statistics, each (C,): weighted MSE, RMS, median |error|.

    ``y`` and ``sw`` are (C, N); pixels with zero weight do not count.
    """
    err = fwd(theta, s, unravel=unravel, activation=activation) - y
    wsum = jnp.maximum(jnp.sum(sw**2, axis=1), jnp.finfo(y.dtype).tiny)
    mse_w = jnp.sum((sw * err) ** 2, axis=1) / wsum
    good = sw > 0
    n_good = jnp.maximum(jnp.sum(good, axis=1), 1)
    rms = jnp.sqrt(jnp.sum(jnp.where(good, err**2, 0.0), axis=1) / n_good)
    mae = jnp.nanmedian(jnp.where(good, jnp.abs(err), jnp.nan), axis=1)
    return mse_w, rms, mae


def make_adam_step(opt, unravel, activation):
    """A jitted Adam step: (theta, opt_state, s, y, sw) -> (theta, opt_state, loss)
    with ``loss`` (C,) the per-pixel mean squared weighted error of the batch."""
    kw = dict(unravel=unravel, activation=activation)

    @jax.jit
    def step(theta, opt_state, s, y, sw):
        def loss_fn(th):
            pred = fwd(th, s, **kw)
            per_pixel = jnp.mean((sw * (pred - y)) ** 2, axis=1)
            return jnp.sum(per_pixel), per_pixel

        (_, per_pixel), grads = jax.value_and_grad(loss_fn, has_aux=True)(theta)
        updates, opt_state = opt.update(grads, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state, per_pixel

    return step


def device_mesh():
    """The 1-D device mesh (axis ``"pix"``) of all local devices, and its size."""
    devices = np.array(jax.devices())
    return Mesh(devices, ("pix",)), devices.size
