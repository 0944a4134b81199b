"""NUTS for one star: the warm-up (the LM covariance as the inverse mass matrix and a
step size by dual averaging, or blackjax's window adaptation) and draws (jitted,
vmapped over chains) and the host loop that runs them in blocks until the
convergence rule holds (see :mod:`payne_lite.posterior._sample`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..observe import ObsModel
from ._diagnostics import chain_diagnostics, ess_mcse, summarise
from ._likelihood import Target, log_density_u
from ._rows import StarDraws

#: nuts converged: the smallest ESS reaches ``ess_target`` (NUTSOptions), ...
#: ... the largest rank-normalised R-hat over the chains is below this (Vehtari et
#: al. 2021) ...
NUTS_RHAT_MAX = 1.01
#: ... and no transition diverged. Chains start at the LM solution plus
#: NUTS_INIT_SCALE x (LM covariance)^(1/2) z: dispersed as the posterior is, so that
#: R-hat can see chains that do not mix.
NUTS_INIT_SCALE = 1.0
#: The step size's dual averaging (``adaptation="lm"``) aims at this mean acceptance
#: statistic (blackjax's and Stan's default for the window adaptation too).
NUTS_TARGET_ACCEPT = 0.8


# --------------------------------------------------------------------------------------
# Pure, jitted kernels
# --------------------------------------------------------------------------------------
def _warmup_info(state, info, adaptation_state):
    """What the window adaptation keeps per step: the gradient evaluations."""
    del state, adaptation_state
    return info.num_integration_steps


@functools.partial(jax.jit, static_argnames=("n_warmup", "dense"))
def _nuts_warmup(obs: ObsModel, t: Target, keys, u0, *, n_warmup, dense):
    """Stan-style window adaptation (blackjax.window_adaptation) of each chain.

    ``keys`` (C,), ``u0`` (C, kf) starting points. Returns the chains' last states,
    step sizes (C,), inverse mass matrices (C, kf[, kf]) and gradient evaluations (C,).
    """
    import blackjax

    def one(key, u):
        def logdensity(v):
            return log_density_u(obs, v, t)

        warmup = blackjax.window_adaptation(
            blackjax.nuts, logdensity, is_mass_matrix_diagonal=not dense,
            adaptation_info_fn=_warmup_info,
        )  # fmt: skip
        (state, params), n_int = warmup.run(key, u, num_steps=n_warmup)
        return (
            state,
            params["step_size"],
            params["inverse_mass_matrix"],
            jnp.sum(n_int),
        )

    return jax.vmap(one)(keys, u0)


@functools.partial(jax.jit, static_argnames=("n_warmup",))
def _nuts_step_size(obs: ObsModel, t: Target, keys, u0, imm, *, n_warmup):
    """Dual averaging of the step size alone (Hoffman & Gelman 2014, sec. 3.2.1),
    the inverse mass matrix held at ``imm`` (kf[, kf]), for each chain.

    ``keys`` (C,), ``u0`` (C, kf) starting points. Returns what
    :func:`_nuts_warmup` returns: the chains' last states, step sizes (C,), inverse
    mass matrices (C, kf[, kf]) (``imm`` for each) and gradient evaluations (C,).
    With ``imm`` the posterior's covariance the target is a unit Gaussian to the
    sampler, for which a step of 1 is stable: dual averaging starts there.
    """
    import blackjax
    from blackjax.adaptation.step_size import dual_averaging_adaptation

    da_init, da_update, da_final = dual_averaging_adaptation(NUTS_TARGET_ACCEPT)
    kernel = blackjax.mcmc.nuts.build_kernel()

    def one(key, u):
        def logdensity(v):
            return log_density_u(obs, v, t)

        def body(carry, k):
            st, da = carry
            st, info = kernel(k, st, logdensity, jnp.exp(da.log_step_size), imm)
            return (st, da_update(da, info.acceptance_rate)), info.num_integration_steps

        state = blackjax.mcmc.nuts.init(u, logdensity)
        carry = (state, da_init(jnp.asarray(1.0, u.dtype)))
        (state, da), n_int = jax.lax.scan(body, carry, jax.random.split(key, n_warmup))
        return state, da_final(da), imm, jnp.sum(n_int)

    return jax.vmap(one)(keys, u0)


def lm_inverse_mass(centre, cov, lo, hi, *, dense):
    """The LM covariance ``cov`` (kf, kf) at ``centre`` (kf,) [fit space] as NUTS's
    inverse mass matrix in the unconstrained ``u``: ``J^-1 cov J^-1`` with ``J =
    diag(dx/du) = diag((hi - lo) z (1 - z))``, ``z = (centre - lo) / (hi - lo)``
    (the linearised map; exact for a Gaussian well inside the support); its
    diagonal when not ``dense``. None when it is unusable (non-finite, or not
    positive definite)."""
    z = np.clip((centre - lo) / (hi - lo), 1e-6, 1.0 - 1e-6)
    jac = (hi - lo) * z * (1.0 - z)
    m = np.asarray(cov, np.float64) / jac[:, None] / jac[None, :]
    if not np.all(np.isfinite(m)):
        return None
    try:
        np.linalg.cholesky(m)
    except np.linalg.LinAlgError:
        return None
    return m if dense else np.diag(m).copy()


@functools.partial(jax.jit, static_argnames=("n_draws",))
def _nuts_draws(obs: ObsModel, t: Target, keys, state, step_size, imm, *, n_draws):
    """``n_draws`` NUTS transitions of each chain (vmapped over the C chains).

    Returns the new states and, per chain and draw, (position (C, n, kf),
    log density (C, n), divergent (C, n), integration steps (C, n), acceptance
    (C, n)).
    """
    import blackjax

    def one(key, st, eps, m):
        def logdensity(v):
            return log_density_u(obs, v, t)

        kernel = blackjax.nuts(logdensity, eps, m)

        def body(s, k):
            s, info = kernel.step(k, s)
            out = (
                s.position,
                s.logdensity,
                info.is_divergent,
                info.num_integration_steps,
                info.acceptance_rate,
            )
            return s, out

        return jax.lax.scan(body, st, jax.random.split(key, n_draws))

    return jax.vmap(one)(keys, state, step_size, imm)


# --------------------------------------------------------------------------------------
# Host side: one star's chains
# --------------------------------------------------------------------------------------
def run_nuts(obs, tgt, tg, x0, *, n_warmup, n_steps, block, ess_target, seed,
              dense, dt, thin, imm=None):  # fmt: skip
    """One star's NUTS chains: its :class:`StarDraws` (with the kept samples ``x``;
    ``n_good`` and ``seconds`` are the caller's).

    ``x0`` (C, kf) starting points in fit space, inside the support. Warm-up: with
    ``imm`` (kf[, kf], from :func:`lm_inverse_mass`) the step size alone by dual
    averaging, the inverse mass matrix held at ``imm``; without, blackjax's window
    adaptation of both. Then blocks of ``block`` draws per chain until the rule
    (ESS >= ``ess_target``, rank R-hat < NUTS_RHAT_MAX, no divergence) holds or
    ``n_steps`` draws per chain are done.
    """
    from scipy.special import expit

    n_chains, kf = x0.shape
    lo, hi = tg["lo"], tg["hi"]
    z = np.clip((x0 - lo) / (hi - lo), 1e-6, 1.0 - 1e-6)
    u0 = np.log(z) - np.log1p(-z)
    key_w, key_d = jax.random.split(jax.random.key(seed))
    keys_w, u0 = jax.random.split(key_w, n_chains), jnp.asarray(u0, dt)
    if imm is None:
        state, eps, imm, n_int_w = _nuts_warmup(
            obs, tgt, keys_w, u0, n_warmup=n_warmup, dense=dense
        )
    else:
        state, eps, imm, n_int_w = _nuts_step_size(
            obs, tgt, keys_w, u0, jnp.asarray(imm, dt), n_warmup=n_warmup
        )
    pos, lpu, div, nint, acc = [], [], [], [], []
    n_done, i = 0, 0
    while True:
        todo = min(block, n_steps - n_done)
        keys = jax.random.split(jax.random.fold_in(key_d, i), n_chains)
        state, out = _nuts_draws(obs, tgt, keys, state, eps, imm, n_draws=todo)
        for lst, a in zip((pos, lpu, div, nint, acc), out, strict=True):
            lst.append(np.asarray(a))
        n_done += todo
        i += 1
        if n_done < 4 and n_done < n_steps:  # diagnostics need a few draws
            continue
        u = np.concatenate(pos, axis=1).astype(np.float64)  # (C, n, kf)
        x = lo + (hi - lo) * expit(u)
        chain = np.swapaxes(x, 0, 1)  # (n, C, kf)
        diag = chain_diagnostics(chain, n_burn=0)
        n_div = int(np.sum(np.concatenate(div, axis=1)))
        ok = bool(
            np.isfinite(diag["ess_min"])
            and diag["ess_min"] >= ess_target
            and np.isfinite(diag["rhat_max"])
            and diag["rhat_max"] < NUTS_RHAT_MAX
            and n_div == 0
        )
        if ok or n_done >= n_steps:
            break
    lp_u = np.concatenate(lpu, axis=1).astype(np.float64)  # (C, n)
    log_jac = np.sum(
        np.log(hi - lo) - np.logaddexp(0.0, -u) - np.logaddexp(0.0, u), axis=-1
    )
    lp = lp_u - log_jac
    n_int = np.concatenate(nint, axis=1)
    diverging = np.concatenate(div, axis=1).T  # (n, C), as chain
    more = ess_mcse(chain)
    return StarDraws(
        method="nuts",
        x=chain[::thin].reshape(-1, kf),
        lp=lp.T[::thin].reshape(-1),
        diverging=diverging[::thin].reshape(-1).astype(bool),
        summary=summarise(chain.reshape(-1, kf), None),
        n_steps=int(n_done),
        n_burn=int(n_warmup),
        acceptance=float(np.mean(np.concatenate(acc, axis=1))),
        tau=diag["tau"],
        rhat=diag["rhat"],
        tau_max=diag["tau_max"],
        rhat_max=diag["rhat_max"],
        ess=diag["ess_min"],
        ess_bulk=more["ess_bulk"],
        ess_tail=more["ess_tail"],
        mcse_mean=more["mcse_mean"],
        mcse_sd=more["mcse_sd"],
        converged=ok,
        n_draws=int(n_done * n_chains),
        n_evals=int(np.sum(n_int) + np.sum(np.asarray(n_int_w))),
        lp_best=float(np.nanmax(lp)) if np.any(np.isfinite(lp)) else np.nan,
        n_divergent=n_div,
        step_size=float(np.median(np.asarray(eps, np.float64))),
        n_leapfrog=float(np.mean(n_int)),
    )
