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


@functools.partial(jax.jit, static_argnames=("n_steps",))
def _nuts_block(obs: ObsModel, t: Target, keys, u, da, imm, i0, n_warmup, *, n_steps):
    """``n_steps`` NUTS transitions of each chain (vmapped over the C chains), the
    warm-up's and the draws' in one compiled program.

    ``keys`` (C,), ``u`` (C, kf) the chains' positions, ``da`` the chains' dual
    averaging states, ``imm`` (C, kf[, kf]) inverse mass matrices, ``i0`` the index
    of this block's first transition in the run and ``n_warmup`` the run's warm-up
    transitions (both traced: one compilation serves the warm-up's blocks and the
    draws'). Transition ``i < n_warmup`` uses the step size ``exp(log_step_size)``
    and updates it by dual averaging (Hoffman & Gelman 2014, sec. 3.2.1, towards
    NUTS_TARGET_ACCEPT); later ones use the averaged one, ``exp(log_step_size_avg)``
    (blackjax's ``final``), the state held. Each block starts from the positions
    (the NUTS state is a function of them: one gradient per chain per block).

    Returns the last positions (C, kf), dual averaging states and, per chain and
    transition, (position (C, n, kf), log density (C, n), divergent (C, n),
    integration steps (C, n), acceptance (C, n)).
    """
    import blackjax
    from blackjax.adaptation.step_size import dual_averaging_adaptation

    _, da_update, _ = dual_averaging_adaptation(NUTS_TARGET_ACCEPT)
    kernel = blackjax.mcmc.nuts.build_kernel()

    def one(key, u0, da0, m):
        def logdensity(v):
            return log_density_u(obs, v, t)

        def body(carry, xs):
            s, da = carry
            k, i = xs
            warm = i < n_warmup
            log_eps = jnp.where(warm, da.log_step_size, da.log_step_size_avg)
            s, info = kernel(k, s, logdensity, jnp.exp(log_eps), m)
            new = da_update(da, info.acceptance_rate)
            da = jax.tree.map(lambda a, b: jnp.where(warm, a, b), new, da)
            out = (
                s.position,
                s.logdensity,
                info.is_divergent,
                info.num_integration_steps,
                info.acceptance_rate,
            )
            return (s, da), out

        state = blackjax.mcmc.nuts.init(u0, logdensity)
        xs = (jax.random.split(key, n_steps), i0 + jnp.arange(n_steps))
        (state, da), out = jax.lax.scan(body, (state, da0), xs)
        return state.position, da, out

    return jax.vmap(one)(keys, u, da, imm)


def _da_states(step_size, *, adapting: bool):
    """Per-chain dual averaging states (C,) at ``step_size`` (C,): blackjax's
    initial state (``adapting``: the warm-up tunes from there), else one whose
    averaged step size is ``step_size`` (the draws after the window adaptation)."""
    from blackjax.adaptation.step_size import dual_averaging_adaptation

    da_init, _, _ = dual_averaging_adaptation(NUTS_TARGET_ACCEPT)
    da = jax.vmap(da_init)(step_size)
    if not adapting:
        da = da._replace(log_step_size_avg=jnp.log(step_size))
    # strongly typed, as _nuts_block returns them: one compilation for all blocks
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), da)


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
        # blackjax's window adaptation (its own program), then draws only
        state, eps, imm, n_int_w = _nuts_warmup(
            obs, tgt, keys_w, u0, n_warmup=n_warmup, dense=dense
        )
        u, da = state.position, _da_states(eps, adapting=False)
        n_adapt, n_int_w = 0, int(np.sum(np.asarray(n_int_w)))
    else:
        # the step size by dual averaging, the mass matrix held at the LM's: the
        # warm-up's transitions run in the draws' blocks (one program for both)
        imm = jnp.broadcast_to(jnp.asarray(imm, dt), (n_chains, *np.shape(imm)))
        u, da = u0, _da_states(jnp.ones(n_chains, dt), adapting=True)
        n_adapt, n_int_w = int(n_warmup), 0
    pos, lpu, div, nint, acc = [], [], [], [], []
    n_done, i, i0 = 0, 0, 0
    while True:
        # full blocks always (one compiled shape); the draws beyond n_steps dropped
        keys = jax.random.split(jax.random.fold_in(key_d, i), n_chains)
        u, da, out = _nuts_block(
            obs, tgt, keys, u, da, imm, jnp.int32(i0), jnp.int32(n_adapt),
            n_steps=block,
        )  # fmt: skip
        out = [np.asarray(a) for a in out]
        first = max(n_adapt - i0, 0)  # this block's first draw after the warm-up
        n_int_w += int(np.sum(out[3][:, :first]))
        keep = min(block - first, n_steps - n_done)
        if keep > 0:
            for lst, a in zip((pos, lpu, div, nint, acc), out, strict=True):
                lst.append(a[:, first : first + keep])
            n_done += keep
        i0 += block
        i += 1
        if n_done < 4 and n_done < n_steps:  # diagnostics need a few draws
            continue
        u_all = np.concatenate(pos, axis=1).astype(np.float64)  # (C, n, kf)
        x = lo + (hi - lo) * expit(u_all)
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
    u = u_all
    eps = np.exp(np.asarray(da.log_step_size_avg, np.float64))
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
        n_evals=int(np.sum(n_int) + n_int_w),
        lp_best=float(np.nanmax(lp)) if np.any(np.isfinite(lp)) else np.nan,
        n_divergent=n_div,
        step_size=float(np.median(np.asarray(eps, np.float64))),
        n_leapfrog=float(np.mean(n_int)),
    )
