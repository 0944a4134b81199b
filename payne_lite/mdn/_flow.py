"""A conditional normalizing flow over the MDN's outputs: the joint posterior of the
labels and rv given a spectrum's features (issue 18 item 6; the approach of the nbi
package, K. Zhang et al., github.com/kmzzhang/nbi: a conditional flow as an
importance-sampling proposal for asymptotically exact posteriors).

The MDN gives one independent Gaussian (or mixture) per label and rv, so it cannot
express the correlations between them (Teff with logg and [Fe/H], rv with the labels
when lines blend) that a posterior has; the flow can, and its density is exact, so
it serves as an importance-sampling proposal (``payne_lite.sample(method="flow-is")``)
and as a fast approximate posterior on its own (:meth:`MDN.flow_sample`).

Architecture: a masked autoregressive flow (MAF; Papamakarios, Pavlakou & Murray
2017) of ``n_layers`` affine MADE layers (Germain et al. 2015), the dimension order
reversed between layers, each conditioned on an embedding of the MDN's standardised
spectral features (a tanh MLP shared by the layers; the features are the MDN's
fixed feature extraction, :func:`payne_lite.mdn.features`). The density takes one
pass per layer (training, importance weights); a draw inverts each layer in ``d``
passes (``d`` = labels + 1, six for APOGEE). Hidden units get degrees ``0 .. d - 1``
so that the first dimension's shift and scale see the context (with the usual
``1 .. d - 1`` they would be constants).

Target space: the MDN's (labels scaled to the box, ``rv - rv_ccf`` in km/s),
standardised with the training set's mean and spread (``y_mu``, ``y_sd``). Trained by
maximum likelihood on simulated spectra (the MDN's training distribution), which
makes the flow mass-covering: the property an importance-sampling proposal needs.

References:
    Papamakarios, Pavlakou & Murray 2017, NeurIPS 30 ("Masked Autoregressive Flow").
    Germain, Gregor, Murray & Larochelle 2015, ICML ("MADE").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._mixture import MLP

#: The log-scale of each affine step is soft-clipped to +-LOGS_MAX (tanh), so one
#: layer scales by at most e^4 ~ 55: stable training from the start; several layers
#: compose to the narrow posteriors of high S/N.
LOGS_MAX = 4.0


class FlowNet(NamedTuple):
    """The flow's weights: the context embedding and one MADE per layer.

    ``embed`` maps the D standardised features to C context values (tanh hidden
    layers, a tanh output); each of ``made`` maps ``(y (d,), context (C,))`` to the
    shift and raw log-scale (2 d,), its weights masked autoregressively.
    """

    embed: MLP
    made: tuple[MLP, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Flow:
    """A trained conditional flow for one MDN (stored in the MDN's file).

    Attributes:
        net: :class:`FlowNet` (NumPy float32).
        y_mu, y_sd: (d,) standardisation of the targets (MDN target space).
        history: loss curves, name -> (n_epoch,) array.
        meta: training settings and results.
    """

    net: FlowNet
    y_mu: np.ndarray
    y_sd: np.ndarray
    history: dict = dataclasses.field(default_factory=dict)
    meta: dict = dataclasses.field(default_factory=dict)
    _cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        net = jax.tree.map(lambda a: np.asarray(a, np.float32), self.net)
        d = np.asarray(self.y_mu).size
        if np.asarray(self.y_sd).shape != (d,) or not np.all(np.asarray(self.y_sd) > 0):
            raise ValueError(f"y_sd must be ({d},) and positive")
        if not net.made:
            raise ValueError("a flow needs at least one layer")
        n_ctx = net.embed.weights[-1].shape[1]
        for i, m in enumerate(net.made):
            if m.weights[0].shape[0] != d + n_ctx or m.weights[-1].shape[1] != 2 * d:
                raise ValueError(
                    f"flow layer {i}: input {m.weights[0].shape[0]} and output "
                    f"{m.weights[-1].shape[1]}, expected {d + n_ctx} and {2 * d}"
                )
        object.__setattr__(self, "net", net)
        object.__setattr__(self, "y_mu", np.asarray(self.y_mu, np.float64))
        object.__setattr__(self, "y_sd", np.asarray(self.y_sd, np.float64))
        object.__setattr__(
            self, "history", {k: np.asarray(v) for k, v in self.history.items()}
        )
        object.__setattr__(self, "meta", dict(self.meta))

    @property
    def n_dim(self) -> int:
        return self.y_mu.size

    @property
    def n_layers(self) -> int:
        return len(self.net.made)

    def __repr__(self) -> str:
        h = [w.shape[1] for w in self.net.made[0].weights[:-1]]
        return f"Flow({self.n_layers} MADE layers, hidden {h}, {self.n_dim} dims)"

    def _device(self):
        if "net" not in self._cache:
            self._cache["net"] = jax.tree.map(jnp.asarray, self.net)
        return self._cache["net"]

    def from_base(self, feat, z) -> np.ndarray:
        """Targets (m, d) (MDN target space, float64) of base points ``z`` (m, d)
        for one star's standardised features ``feat`` (D,). ``z`` standard normal
        draws give draws of the flow; ``scale * z`` of its base widened by
        ``scale``."""
        y = flow_draw(
            self._device(), jnp.asarray(feat, jnp.float32), jnp.asarray(z, jnp.float32)
        )
        return np.asarray(y, np.float64) * self.y_sd + self.y_mu

    def log_prob(self, feat, y, base_scale: float = 1.0) -> np.ndarray:
        """log q (m,) of targets ``y`` (m, d) (MDN target space) for one star's
        standardised features ``feat`` (D,), with the base's standard deviation
        ``base_scale`` (float32 arithmetic, returned as float64)."""
        ys = (np.asarray(y, np.float64) - self.y_mu) / self.y_sd
        lp = flow_log_prob(
            self._device(),
            jnp.asarray(feat, jnp.float32),
            jnp.asarray(ys, jnp.float32),
            jnp.float32(base_scale),
        )
        return np.asarray(lp, np.float64) - float(np.sum(np.log(self.y_sd)))


# --------------------------------------------------------------------------------------
# Pure, jitted core
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def made_masks(d: int, n_ctx: int, hidden: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Masks of one MADE layer: inputs ``y`` (degrees 1..d) and context (degree 0),
    hidden units of degrees ``k % d`` (0..d-1), outputs (shift, log-scale) of
    dimension ``j`` (degree j + 1) connected to hidden units of smaller degree: output
    ``j`` depends on ``y[:j]`` and the context only."""
    deg_in = np.concatenate([np.arange(1, d + 1), np.zeros(n_ctx, int)])
    degs = [np.arange(h) % d for h in hidden]
    masks = [(degs[0][None, :] >= deg_in[:, None]).astype(np.float32)]
    for a, b in zip(degs[:-1], degs[1:], strict=True):
        masks.append((b[None, :] >= a[:, None]).astype(np.float32))
    deg_out = np.tile(np.arange(1, d + 1), 2)
    masks.append((deg_out[None, :] > degs[-1][:, None]).astype(np.float32))
    return tuple(masks)


def embed_context(net: FlowNet, feat):
    """Context (..., C) from standardised features (..., D)."""
    h = feat
    for w, b in zip(net.embed.weights, net.embed.biases, strict=True):
        h = jnp.tanh(h @ w + b)
    return h


def _made(layer: MLP, y, c):
    """Shift and log-scale (..., d) of one MADE layer at ``y`` (..., d), context c."""
    d = y.shape[-1]
    hidden = tuple(w.shape[1] for w in layer.weights[:-1])
    masks = made_masks(d, c.shape[-1], hidden)
    h = jnp.concatenate([y, jnp.broadcast_to(c, (*y.shape[:-1], c.shape[-1]))], -1)
    for w, b, m in zip(layer.weights[:-1], layer.biases[:-1], masks[:-1], strict=True):
        h = jnp.tanh(h @ (w * m) + b)
    out = h @ (layer.weights[-1] * masks[-1]) + layer.biases[-1]
    return out[..., :d], LOGS_MAX * jnp.tanh(out[..., d:] / LOGS_MAX)


def to_base(net: FlowNet, c, y):
    """The base-space point (..., d) of standardised targets ``y`` and the log
    determinant (...,) of the map's Jacobian."""
    x, logdet = y, jnp.zeros(y.shape[:-1], y.dtype)
    for layer in net.made:
        shift, logs = _made(layer, x, c)
        x = ((x - shift) * jnp.exp(-logs))[..., ::-1]
        logdet = logdet - jnp.sum(logs, axis=-1)
    return x, logdet


def log_prob(net: FlowNet, c, y, base_scale=1.0):
    """log q (...,) of standardised targets ``y`` (..., d) given the context ``c``,
    with a Gaussian base of standard deviation ``base_scale``."""
    z, logdet = to_base(net, c, y)
    d = y.shape[-1]
    zs = z / base_scale
    return (
        -0.5 * jnp.sum(zs * zs, axis=-1)
        - d * (jnp.log(base_scale) + 0.5 * jnp.log(2.0 * jnp.pi))
        + logdet
    )


def from_base(net: FlowNet, c, z):
    """Standardised targets (..., d) of base-space points ``z``: each layer inverted
    by ``d`` fixed-point passes (exact: pass ``j`` settles dimension ``j``)."""
    x = z
    d = z.shape[-1]
    for layer in reversed(net.made):
        x_out = x[..., ::-1]

        def step(_, x_in, layer=layer, x_out=x_out):
            shift, logs = _made(layer, x_in, c)
            return x_out * jnp.exp(logs) + shift

        x = jax.lax.fori_loop(0, d, step, jnp.zeros_like(x_out))
    return x


@jax.jit
def flow_log_prob(net: FlowNet, feat, y, base_scale):
    """log q (m,) of standardised targets ``y`` (m, d) for one star's features (D,)."""
    return log_prob(net, embed_context(net, feat), y, base_scale)


@jax.jit
def flow_draw(net: FlowNet, feat, z):
    """Standardised targets (m, d) for base points ``z`` (m, d) (already scaled by the
    base's standard deviation) for one star's features (D,)."""
    return from_base(net, embed_context(net, feat), z)


def nll_batch(net: FlowNet, feat, y):
    """Mean negative log-likelihood of standardised targets (n, d) given features
    (n, D): the training loss."""
    return -jnp.mean(log_prob(net, embed_context(net, feat), y))


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------
def init_flow_net(rng, n_feat: int, d: int, n_ctx: int, hidden, n_layers: int):
    """Random initial :class:`FlowNet` (float32): the MADE outputs start near zero, so
    the untrained flow is near the identity (a standard normal in target space)."""

    def mlp(sizes, last_scale):
        ws, bs = [], []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            ws.append(rng.normal(0.0, 1.0 / np.sqrt(a), (a, b)).astype(np.float32))
            bs.append(np.zeros(b, np.float32))
        ws[-1] *= last_scale
        return MLP(tuple(ws), tuple(bs))

    embed = mlp((n_feat, *hidden[:1], n_ctx), 1.0)
    made = tuple(mlp((d + n_ctx, *hidden, 2 * d), 0.01) for _ in range(n_layers))
    return FlowNet(embed, made)
