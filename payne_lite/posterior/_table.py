"""The results table of :func:`payne_lite.posterior.sample`: summaries in physical
units, diagnostics, QA flags and meta (columns in :mod:`payne_lite.posterior._sample`)."""

from __future__ import annotations

import numpy as np

from ..fitting import (
    FLAG_FAILED,
    FLAG_NOT_CONVERGED,
    FLAGS_DESCRIPTION,
    REFERENCE_PAYNE,
    param_units,
    schema_meta,
)
from ._diagnostics import BURN_TAU, N_TAU_MIN, RHAT_MAX
from ._nuts import NUTS_RHAT_MAX
from ._rows import StarDraws


def to_physical(x, idx, emulator, n_lab):
    """Fit-space points ``x`` (m, kf) over parameters ``idx`` (kf,) -> physical
    (labels unscaled from [-0.5, 0.5]; rv, broadening and continuum unchanged)."""
    out = np.array(x, np.float64, copy=True)
    lab = idx < n_lab
    j = idx[lab]
    out[:, lab] = (x[:, lab] + 0.5) * (emulator.label_hi[j] - emulator.label_lo[j])
    out[:, lab] += emulator.label_lo[j]
    return out


def results_table(rows: list[StarDraws], emulator, layout, idx, fix, *, lm, mdn, meta):
    """The astropy Table of :func:`payne_lite.posterior.sample`, one row per star.

    Args:
        rows: (n,) the stars' :class:`StarDraws` (summaries in fit space,
            diagnostics; the draws themselves travel in ``PosteriorSamples``).
        emulator, layout: the emulator and the parameter layout (k parameters).
        idx: (kf,) int the sampled parameters; ``fix``: ``{j: fit-space value}``.
        lm: (LM table or None, {star: :class:`LMSolution`}) with ``init="lm"``,
            else None.
        mdn: (mean, sigma) (n, L + 1) physical, or None.
        meta: the call's settings, stored in ``meta``.
    """
    from astropy.table import Table

    n = len(rows)
    phys, span = _fit_to_physical(emulator, layout)
    stats = _stats(rows, idx, fix, len(layout.names), phys, span)
    t = Table()
    _parameter_columns(t, stats, emulator, layout, lm, mdn, n)
    _diagnostic_columns(t, rows, span[idx])
    if lm is not None:
        flags = np.zeros(n, np.int32)
        table_lm, cache = lm
        for i in range(n):
            if i in cache:
                flags[i] = cache[i].flags
            elif table_lm is not None:
                flags[i] = int(table_lm["flags"][i])
        t["lm_flags"] = flags
    t.meta.update(meta)
    t.meta.update(
        schema_meta(
            emulator, kind="posterior", method=meta["method"],
            rv_range=meta["rv_range"], reference=REFERENCE_PAYNE + (
                "; Foreman-Mackey et al. 2013, PASP 125, 306 (emcee); Hoffman & "
                "Gelman 2014, JMLR 15, 1593 (NUTS); Cabezas et al. 2024, "
                "arXiv:2402.10797 (blackjax)"
            ),
        ),
        sample_params=[layout.names[j] for j in idx],
        fixed={layout.names[j]: float(phys(j, v)) for j, v in fix.items()},
        convergence_rule=(
            f"emcee: kept steps >= {N_TAU_MIN:g} x max tau and max rank R-hat < "
            f"{RHAT_MAX}; burn-in min(ceil({BURN_TAU:g} tau_0), n_steps // 2); "
            f"mdn-is: Kish ESS >= ess_min; nuts: min ESS >= ess_target, max rank "
            f"R-hat < {NUTS_RHAT_MAX} over the chains, no divergent transition"
        ),
    )  # fmt: skip
    return t


def _fit_to_physical(emulator, layout):
    """(``phys(j, v)``: parameter j's fit-space location v -> physical, ``span`` (k,):
    the scale of a fit-space width)."""
    n_lab = layout.n_labels
    k = len(layout.names)
    span = np.concatenate([emulator.label_hi - emulator.label_lo, np.ones(k - n_lab)])
    offset = np.concatenate([emulator.label_lo, np.zeros(k - n_lab)])
    label_shift = np.concatenate([np.full(n_lab, 0.5), np.zeros(k - n_lab)])

    def phys(j, v):  # fit space -> physical, a location
        return (v + label_shift[j]) * span[j] + offset[j]

    return phys, span


def _stats(rows: list[StarDraws], idx, fix, k, phys, span) -> dict:
    """p16, p50, p84, std (n, k) each, physical (fixed parameters: their value, sd 0;
    stars with no summary: NaN)."""
    n = len(rows)
    stats = {s: np.full((n, k), np.nan) for s in ("p16", "p50", "p84", "std")}
    for i, r in enumerate(rows):
        q = r.summary
        if q is None:
            continue
        stats["p16"][i, idx] = phys(idx, q.p16)
        stats["p50"][i, idx] = phys(idx, q.p50)
        stats["p84"][i, idx] = phys(idx, q.p84)
        stats["std"][i, idx] = q.std * span[idx]
    for j, v in fix.items():
        for s in ("p16", "p50", "p84"):
            stats[s][:, j] = phys(j, v)
        stats["std"][:, j] = 0.0
    return stats


def _parameter_columns(t, stats, emulator, layout, lm, mdn, n) -> None:
    """Per parameter: median, err, p16/p50/p84, std, the LM's and the MDN's values."""
    n_lab = layout.n_labels
    units = param_units(emulator, layout.names)
    for j, name in enumerate(layout.names):
        unit = units[j] or None
        cols = {
            name: stats["p50"][:, j],
            f"{name}_err": 0.5 * (stats["p84"][:, j] - stats["p16"][:, j]),
            f"{name}_p16": stats["p16"][:, j],
            f"{name}_p50": stats["p50"][:, j],
            f"{name}_p84": stats["p84"][:, j],
            f"{name}_std": stats["std"][:, j],
        }
        if lm is not None:
            table_lm, cache = lm
            vals, errs = np.full(n, np.nan), np.full(n, np.nan)
            for i in range(n):
                if i in cache:
                    vals[i], errs[i] = cache[i].phys[j], cache[i].err[j]
                elif table_lm is not None:
                    vals[i] = float(table_lm[name][i])
                    errs[i] = float(table_lm[f"{name}_err"][i])
            cols[f"{name}_lm"] = vals
            cols[f"{name}_lm_err"] = errs
        if mdn is not None and j <= n_lab:
            cols[f"{name}_mdn"] = mdn[0][:, j]
            cols[f"{name}_mdn_sigma"] = mdn[1][:, j]
        for c, v in cols.items():
            t[c] = v
            if unit is not None:
                t[c].unit = unit


def _diagnostic_columns(t, rows: list[StarDraws], span) -> None:
    """The sampler, convergence, diagnostics, cost and QA-flag columns (``span``
    (kf,): the physical width of a unit fit-space width, for the MCSEs)."""
    n = len(rows)
    kf = span.size
    no_chain = np.full(kf, np.nan)  # tau, rhat of a failed star

    def col(values, dtype=float):
        return np.array(list(values), dtype=dtype)

    method = [r.method for r in rows]
    conv = col((r.converged for r in rows), bool)
    t["method"] = method
    t["converged"] = conv
    t["fallback"] = col((r.fallback for r in rows), bool)
    t["n_steps"] = col((r.n_steps for r in rows), np.int64)
    t["n_burn"] = col((r.n_burn for r in rows), np.int64)
    t["acceptance"] = col(r.acceptance for r in rows)
    t["tau"] = col(no_chain if r.tau is None else r.tau for r in rows).reshape(n, kf)
    t["rhat"] = col(no_chain if r.rhat is None else r.rhat for r in rows).reshape(n, kf)
    for key in ("ess_bulk", "ess_tail", "mcse_mean", "mcse_sd"):
        v = col(
            no_chain if getattr(r, key) is None else getattr(r, key) for r in rows
        ).reshape(n, kf)
        t[key] = v * span if key.startswith("mcse") else v
    t["tau_max"] = col(r.tau_max for r in rows)
    t["rhat_max"] = col(r.rhat_max for r in rows)
    t["ess"] = col(r.ess for r in rows)
    t["is_ess"] = col(r.is_ess for r in rows)
    t["is_ess_mdn"] = col(r.is_ess_mdn for r in rows)
    t["is_max_weight"] = col(r.is_max_weight for r in rows)
    t["n_divergent"] = col((r.n_divergent for r in rows), np.int64)
    t["step_size"] = col(r.step_size for r in rows)
    t["n_leapfrog"] = col(r.n_leapfrog for r in rows)
    t["n_draws"] = col((r.n_draws for r in rows), np.int64)
    t["n_evals"] = col((r.n_evals for r in rows), np.int64)
    t["n_good_pixels"] = col((r.n_good for r in rows), np.int64)
    t["chi2_min"] = -2.0 * col(r.lp_best for r in rows)
    t["seconds"] = col(r.seconds for r in rows)
    t["failure"] = [r.failure for r in rows]
    # the point fits' QA bits that apply to a posterior: not converged, failed
    failed = np.array([m == "failed" for m in method], bool)
    t["flags"] = (
        np.where(conv | failed, 0, FLAG_NOT_CONVERGED)
        | np.where(failed, FLAG_FAILED, 0)
    ).astype(np.int32)
    t["flags"].description = FLAGS_DESCRIPTION + " (bits 0 and 2 here)"
    t["seconds"].unit = "s"
    t["tau"].unit = "steps"
    t["tau"].description = "integrated autocorrelation time per meta['sample_params']"
    t[
        "rhat"
    ].description = (
        "rank-normalised split R-hat (Vehtari et al. 2021) per meta['sample_params']"
    )
    per = "per meta['sample_params'] (MCMC; NaN without the arviz extra)"
    t["ess_bulk"].description = f"ArviZ's bulk ESS {per}"
    t["ess_tail"].description = f"ArviZ's tail ESS (5 and 95 % quantiles) {per}"
    t["mcse_mean"].description = f"ArviZ's MCSE of the mean, physical units, {per}"
    t["mcse_sd"].description = f"ArviZ's MCSE of the sd, physical units, {per}"
    t["ess"].description = (
        "effective samples: emcee and nuts min over parameters of n_chains n_kept "
        "/ tau; mdn-is Kish's (sum w)^2 / sum w^2"
    )
    t["n_divergent"].description = "nuts: divergent transitions after the warm-up"
    t["step_size"].description = "nuts: adapted step size (median over chains)"
    t["n_leapfrog"].description = "nuts: mean leapfrog steps per draw"
    t[
        "chi2_min"
    ].description = "-2 x the largest log posterior sampled (chi2 for the box prior)"
