"""emcee for one star: the vectorised ensemble run in blocks until the convergence
rule holds, with an optional HDF5 backend to resume (see
:mod:`payne_lite.posterior._sample`)."""

from __future__ import annotations

import hashlib

import jax.numpy as jnp
import numpy as np

from ._diagnostics import chain_diagnostics, ess_mcse, summarise
from ._likelihood import log_prob_batch
from ._rows import StarDraws


def _data_hash(flux, w, lo, hi, mu, ivp, base, *more) -> str:
    h = hashlib.sha256()
    for a in (flux, w, lo, hi, mu, ivp, base, *more):
        h.update(np.ascontiguousarray(a, np.float64).tobytes())
    return h.hexdigest()[:32]


def run_emcee(obs, tgt, tg, p0, *, n_steps, check_every, seed, backend_path, star,
               moves, dt, thin):  # fmt: skip
    """One star's ensemble: its :class:`StarDraws` (with the kept samples ``x``;
    ``n_good`` and ``seconds`` are the caller's)."""
    import emcee

    n_walkers, kf = p0.shape

    def log_prob(x):
        return np.asarray(log_prob_batch(obs, jnp.asarray(x, dt), tgt), np.float64)

    backend = None
    resume = False
    if backend_path is not None:
        backend = emcee.backends.HDFBackend(str(backend_path), name=f"star_{star}")
        digest = _data_hash(tg["flux"], tg["w"], tg["lo"], tg["hi"], tg["mu"],
                            tg["ivp"], tg["base"], *([tg["v"]] if "v" in tg else []))  # fmt: skip
        if backend.initialized:
            import h5py

            with h5py.File(backend_path, "r") as f:
                old = f[f"star_{star}"].attrs.get("payne_lite_target", "")
            if old != digest:
                raise ValueError(
                    f"{backend_path}: group star_{star} holds a chain of other data or "
                    "settings (target hash differs); use another backend_path"
                )
            if backend.shape != (n_walkers, kf):
                raise ValueError(
                    f"{backend_path}: group star_{star} has (n_walkers, k) = "
                    f"{backend.shape}, this run ({n_walkers}, {kf})"
                )
            resume = backend.iteration > 0
    sampler = emcee.EnsembleSampler(
        n_walkers, kf, log_prob, vectorize=True, backend=backend, moves=moves
    )
    if backend is not None and not resume:
        import h5py

        with h5py.File(backend_path, "a") as f:
            g = f[f"star_{star}"]
            g.attrs["payne_lite_target"] = digest
            g.attrs["payne_lite_format"] = "payne_lite.emcee_chain"
    if not resume:
        sampler.random_state = np.random.RandomState(seed % 2**32).get_state()
        state = p0
    else:
        state = None

    def judge():  # diagnostics need a few steps; R-hat only when it can decide
        if sampler.iteration < 4:
            return None
        last = sampler.iteration >= n_steps
        return chain_diagnostics(sampler.get_chain(), lazy_rhat=not last)

    # a resumed chain is judged before it is extended
    diag = judge() if resume else None
    while diag is None or not (diag["converged"] or sampler.iteration >= n_steps):
        todo = min(check_every, n_steps - sampler.iteration)
        sampler.run_mcmc(state, todo, progress=False)
        state = None
        diag = judge()
    chain = sampler.get_chain()
    log_p = sampler.get_log_prob()
    kept = chain[diag["n_burn"] :]
    more = ess_mcse(kept)  # once per star: ArviZ's ESS and MCSE are slow
    best = np.nanmax(log_p[diag["n_burn"] :])
    xk = kept[::thin].reshape(-1, kf)
    return StarDraws(
        method="emcee",
        x=xk,
        lp=log_p[diag["n_burn"] :][::thin].reshape(-1),
        summary=summarise(kept.reshape(-1, kf), None),
        n_steps=int(sampler.iteration),
        n_burn=diag["n_burn"],
        acceptance=float(np.mean(sampler.acceptance_fraction)),
        tau=diag["tau"],
        rhat=diag["rhat"],
        tau_max=diag["tau_max"],
        rhat_max=diag["rhat_max"],
        ess=diag["ess_min"],
        ess_bulk=more["ess_bulk"],
        ess_tail=more["ess_tail"],
        mcse_mean=more["mcse_mean"],
        mcse_sd=more["mcse_sd"],
        converged=diag["converged"],
        n_draws=int(kept.shape[0] * n_walkers),
        n_evals=int(sampler.iteration * n_walkers),
        lp_best=float(best),
    )
