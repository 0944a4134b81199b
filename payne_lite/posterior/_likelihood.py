"""The pure, jitted log posterior of one star (see :mod:`payne_lite.posterior._sample`).

``Target`` holds one star's data and prior as arrays (a pytree argument, so one
compilation serves every star of the same shape); ``log_prob_batch`` evaluates the
log posterior at many points in one model call (emcee, mdn-is, :func:`log_posterior`);
``log_density_u`` is NUTS's target in the unconstrained coordinates.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..observe import ErrorModel, ObsModel, observe, window_valid

Array = jax.Array


class Target(NamedTuple):
    """One star's log posterior, as arrays (a pytree argument of the jitted core).

    ``x`` is the vector of the free parameters (kf,); ``base`` (k,) holds the fixed
    values; ``idx`` (kf,) int the positions of the free ones in ``base``. ``w`` and
    ``v`` are the star's :class:`payne_lite.observe.ErrorModel`: ``C^-1 =
    diag(w) - v^T v``; ``v`` None (no emulator error basis) is the diagonal
    ``C^-1 = diag(w)``.
    """

    base: Array  # (k,)
    idx: Array  # (kf,) int32
    flux: Array  # (P,)
    w: Array  # (P,) weights 1 / sigma^2 (0 = pixel unused)
    lo: Array  # (kf,) prior support
    hi: Array  # (kf,)
    mu: Array  # (kf,) Gaussian prior mean (where ivp > 0)
    ivp: Array  # (kf,) Gaussian prior 1 / sigma^2 (0 = flat)
    v: Array | None = None  # (K, P) low-rank part of C^-1, or None


# --------------------------------------------------------------------------------------
# Pure, jitted core
# --------------------------------------------------------------------------------------
def _log_like_prior(obs: ObsModel, x, t: Target):
    """``-chi2 / 2`` plus the Gaussian prior term at free parameters ``x`` (kf,),
    with no support check (differentiable: the NUTS target builds on it).
    ``chi2 = r^T C^-1 r`` of the star's error model; its ``-1/2 log det C`` is
    constant in ``x`` (``C`` is fixed per star) and left out."""
    p = t.base.at[t.idx].set(x)
    f, _ = observe(obs, p)
    chi2 = ErrorModel(t.w, t.v).chi2(f - t.flux)
    return -0.5 * chi2 - 0.5 * jnp.sum(t.ivp * (x - t.mu) ** 2)


def _log_prob_one(obs: ObsModel, x, t: Target):
    """Log posterior (up to a constant) of one star at free parameters ``x`` (kf,);
    ``-inf`` outside the prior's support (and for a non-finite value)."""
    lp = _log_like_prior(obs, x, t)
    inside = jnp.all((x >= t.lo) & (x <= t.hi))
    return jnp.where(inside & jnp.isfinite(lp), lp, -jnp.inf)


@jax.jit
def log_prob_batch(obs: ObsModel, xs, t: Target):
    """(m,) log posterior of one star at ``xs`` (m, kf): one batched model call."""
    return jax.vmap(_log_prob_one, in_axes=(None, 0, None))(obs, xs, t)


@jax.jit
def window_valid_batch(obs: ObsModel, rv_lo, rv_hi):
    return jax.vmap(window_valid, in_axes=(None, 0, 0))(obs, rv_lo, rv_hi)


# NUTS: the prior's support (a box in fit space) mapped onto R^kf, so that the
# sampler meets no hard walls: x = lo + (hi - lo) sigmoid(u), and the density of u
# carries the Jacobian |dx/du| = (hi - lo) sigmoid(u) sigmoid(-u).
def _from_unconstrained(u, lo, hi):
    return lo + (hi - lo) * jax.nn.sigmoid(u)


def _log_jacobian(u, lo, hi):
    return jnp.sum(jnp.log(hi - lo) + jax.nn.log_sigmoid(u) + jax.nn.log_sigmoid(-u))


def log_density_u(obs: ObsModel, u, t: Target):
    """Log posterior of one star in the unconstrained coordinates ``u`` (kf,)."""
    x = _from_unconstrained(u, t.lo, t.hi)
    lp = _log_like_prior(obs, x, t) + _log_jacobian(u, t.lo, t.hi)
    return jnp.where(jnp.isfinite(lp), lp, -jnp.inf)
