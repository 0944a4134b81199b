"""Posterior benchmark (issue 7): calibration and cost of emcee, NUTS, mdn-is and
flow-is.

    python benchmarks/bench_posterior.py --n 30                  # ~6 min on 2 cores
    python benchmarks/bench_posterior.py                         # the issue's 200 stars
    python benchmarks/bench_posterior.py --n 50 --mdn mdn.h5 --json out.json
    python benchmarks/bench_posterior.py --n 20 --methods emcee nuts mdn-is  # cost
    python benchmarks/bench_posterior.py --n 100 --methods emcee mdn-is flow-is \
        --lm-share 0 0.8 --mdn mdn_flow.h5                       # the flow proposal

With the real 5-label Payne network (``pl.datasets.payne_apogee()``) as the emulator:

* Mock stars: bench_fit's test set (labels uniform in the middle 80 % of the box,
  rv uniform in +-200 km/s, Gaussian noise 1/SNR, the APOGEE mask and the pixels
  off the shifted grid masked) at S/N 50 (``--snr``), seed ``--seed``.
* LM: ``payne_lite.fit`` once for all stars; its table starts emcee's walkers and
  gives the covariance errors compared below (its time is reported, not counted in
  the samplers' seconds per star).
* emcee: ``payne_lite.sample(method="emcee")``, box prior, walkers drawn from the
  LM solution's Gaussian, differential-evolution move, run in blocks of at most 500
  steps until the convergence rule (kept steps >= 50 tau, tau within 5 % of the
  previous check's, R-hat < 1.1) holds, at most ``--max-steps``.
* mdn-is: ``payne_lite.sample(method="mdn-is")`` with the MDN ``--mdn`` (default
  /tmp/mdn_apogee3.h5 when it exists, else one trained here with
  ``payne_lite.train_mdn(emu, seed=0)``, a few minutes); stars whose ESS is below
  ``IS_ESS_MIN`` fall back to emcee (reported separately).
* flow-is: ``payne_lite.sample(method="flow-is")``, the same with the MDN's
  conditional flow as stage 0's proposal (the MDN file's flow; without one, a flow
  trained here with ``payne_lite.train_flow(emu, mdn)``, 5-15 minutes). With it the
  flow alone is reported too (``MDN.flow_sample``, 2,000 draws per star, no
  likelihood): its 68 % coverage, its 1-sigma width over the LM error, its seconds
  per star, and the mean log density of the truths under the flow and under the
  MDN's independent Gaussians (the MDN's target space).
* nuts: ``payne_lite.sample(method="nuts")``, box prior, 4 chains from the LM
  solution's Laplace approximation, the LM covariance as the inverse mass matrix,
  100 warm-up steps tuning the step size, then blocks of 50 draws per chain until
  its smallest ESS reaches the median ESS emcee reached in this run
  (``--nuts-ess``; NUTS_ESS_MIN = 400 without emcee), R-hat < 1.01 and no
  divergence: the same ESS (emcee's estimator, chains as walkers), so seconds per
  star compare like for like.
* ``emcee-old`` and ``nuts-old`` (in ``--methods``): the same samplers with the
  settings before issue 18 item 4, on the same stars: emcee with the stretch move,
  walkers in a ball of 0.1 x the LM covariance's square root and no tau-stability
  check (``EmceeOptions(moves=StretchMove(), init_scale=0.1, tau_rtol=None)``;
  the block schedule is today's); NUTS with the window adaptation
  (``NUTSOptions(adaptation="window", check_every=100)``, 500 warm-up steps,
  blocks of 100 draws).
* Each runs once on one star first (compilation), then timed.

Reported, per method and per label and rv: the fraction of stars whose truth lies in
the 16-84 % credible interval (target 0.60-0.76; for mdn-is over the stars whose ESS
passed, and over all stars including the fallbacks), the median ratio of emcee's
posterior sd to the LM covariance error over well-constrained stars (LM flags 0,
emcee converged; target within 20 %), seconds per star (median, mean), effective
samples per second (median of ess / seconds, ess being the smallest over
parameters for emcee), the fraction converged / passing, and the cost ratio emcee /
mdn-is per star (target >= 20 where mdn-is passes), emcee / nuts per star, and the
divergent transitions of NUTS. Binomial noise on a coverage
fraction of 0.68 is sqrt(0.68 * 0.32 / n): 0.085 for n = 30, 0.033 for n = 200.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

import payne_lite as pl
from payne_lite.errors import SamplingWarning
from payne_lite.options import IS_ESS_MIN, NUTS_ESS_MIN

if __package__ in (None, ""):  # run as a script: import the siblings as benchmarks.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"
from .bench_fit import PARAMS, load_data, make_test_set  # noqa: E402

COVERAGE_RANGE = (0.60, 0.76)
#: --methods variants: (the sampler, its options' fields) with the settings before
#: issue 18 item 4 (the moves are filled in by legacy_options).
LEGACY = {
    "emcee-old": ("emcee", dict(init_scale=0.1, tau_rtol=None)),
    "nuts-old": ("nuts", dict(adaptation="window", check_every=100)),
}
METHOD_ORDER = ("emcee-old", "emcee", "mdn-is", "flow-is", "nuts-old", "nuts")
IS_NAMES = ("mdn-is", "flow-is")
SD_RATIO_TOL = 0.2
COST_RATIO_MIN = 20.0
DEFAULT_MDN = Path("/tmp/mdn_apogee3.h5")


def coverage(t, truth, rows):
    """Per parameter: fraction of ``rows`` with truth in [p16, p84]."""
    out = {}
    for j, name in enumerate(PARAMS):
        lo = np.asarray(t[f"{name}_p16"], float)[rows]
        hi = np.asarray(t[f"{name}_p84"], float)[rows]
        inside = (truth[rows, j] >= lo) & (truth[rows, j] <= hi)
        out[name] = float(np.mean(inside)) if rows.size else float("nan")
    return out


def cost(t, rows):
    sec = np.asarray(t["seconds"], float)[rows]
    ess = np.asarray(t["ess"], float)[rows]
    if not rows.size:
        return dict(sec_median=np.nan, sec_mean=np.nan, ess_per_sec=np.nan)
    return dict(
        sec_median=float(np.median(sec)),
        sec_mean=float(np.mean(sec)),
        ess_median=float(np.median(ess)),
        ess_per_sec=float(np.median(ess / sec)),
        evals_median=float(np.median(np.asarray(t["n_evals"], float)[rows])),
    )


def lm_coverage(lm, truth, rows):
    """Per parameter: fraction of ``rows`` with truth within the LM's 1 sigma."""
    out = {}
    for j, name in enumerate(PARAMS):
        p = np.asarray(lm[name], float)[rows]
        e = np.asarray(lm[f"{name}_err"], float)[rows]
        out[name] = float(np.mean(np.abs(truth[rows, j] - p) <= e))
    return out


def legacy_options(name) -> dict:
    """The options' fields of a ``LEGACY`` variant (the stretch move for emcee)."""
    base, fields = LEGACY.get(name, (name, {}))
    if base == "emcee" and name in LEGACY:
        import emcee

        fields = {**fields, "moves": emcee.moves.StretchMove()}
    return fields


def flow_alone(mdn, emu, flux, err, mask, truth, seed, lm, n_draws=2000):
    """The flow as a posterior on its own: its draws' 68 % coverage, width (over
    the errors of ``lm``, the run's LM table of the same stars) and seconds per
    star; and the mean log density of the truths under the flow and under the
    MDN's Gaussians (both in the MDN's target space: scaled labels, rv - rv_ccf)."""
    mdn.flow_sample(flux[:1], err[:1], mask[:1], n_draws=n_draws)  # compile
    t0 = time.perf_counter()
    d = mdn.flow_sample(flux, err, mask, n_draws=n_draws, seed=seed)
    sec = (time.perf_counter() - t0) / len(flux)
    lo, hi = np.percentile(d, [16, 84], axis=1)
    feat, rv_ccf, _ = mdn.flow_context(flux, err, mask)
    L = emu.n_labels
    y = np.column_stack([emu.scale(truth[:, :L]), truth[:, L] - rv_ccf])
    lp_flow = [mdn.flow.log_prob(feat[i], y[i : i + 1])[0] for i in range(len(y))]
    mean, sigma = mdn.predict(flux, err, mask=mask)
    span = emu.label_hi - emu.label_lo
    m_s = np.column_stack([emu.scale(mean[:, :L]), mean[:, L] - rv_ccf])
    s_s = np.column_stack([sigma[:, :L] / span, sigma[:, L]])
    lp_mdn = np.sum(-0.5 * ((y - m_s) / s_s) ** 2 - np.log(s_s), axis=1)
    lp_mdn -= 0.5 * (L + 1) * np.log(2 * np.pi)
    return dict(
        n_draws=n_draws,
        sec_per_star=sec,
        coverage={
            p: float(np.mean((truth[:, j] >= lo[:, j]) & (truth[:, j] <= hi[:, j])))
            for j, p in enumerate(PARAMS)
        },
        width_over_lm={
            p: float(
                np.median(0.5 * (hi[:, j] - lo[:, j]) / np.asarray(lm[f"{p}_err"]))
            )
            for j, p in enumerate(PARAMS)
        },
        lp_truth_flow=float(np.mean(lp_flow)),
        lp_truth_mdn=float(np.mean(lp_mdn)),
    )


def ess_per_label(t):
    """Per parameter, the median over stars of its ESS, ``n_draws / tau``
    (emcee's estimator; the table's ``ess`` is the smallest over parameters)."""
    names = list(t.meta["sample_params"])
    tau = np.asarray(t["tau"], float)
    n = np.asarray(t["n_draws"], float)
    with np.errstate(invalid="ignore", divide="ignore"):
        ess = n[:, None] / tau
    return {p: float(np.nanmedian(ess[:, names.index(p)])) for p in PARAMS}


def run_method(
    method, emu, flux, err, mask, lm, mdn, seed, max_steps, ess=None, lm_share=None
):
    extra = legacy_options(method)
    method = LEGACY.get(method, (method,))[0]
    kw = dict(mask=mask, lm_table=lm, seed=seed, method=method)
    if method == "emcee":
        kw.update(options=pl.EmceeOptions(n_steps=max_steps, **extra))
    if method in IS_NAMES:
        share = {} if lm_share is None else dict(lm_share=lm_share)
        kw.update(
            mdn=mdn,
            options=pl.ISOptions(fallback=pl.EmceeOptions(n_steps=max_steps), **share),
        )
    if method == "nuts":
        kw.update(
            options=pl.NUTSOptions(
                n_steps=max_steps, ess_target=ess or NUTS_ESS_MIN, **extra
            )
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SamplingWarning)
        # warm up (compilation) on the first star
        pl.sample(
            flux[:1], err[:1], emu, **{**kw, "mask": mask[:1], "lm_table": lm[:1]}
        )
        t0 = time.perf_counter()
        t = pl.sample(flux, err, emu, **kw)
    return t, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=200, help="mock stars")
    ap.add_argument("--snr", type=float, default=50.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mdn", type=Path, default=None, help="a trained MDN (HDF5)")
    ap.add_argument(
        "--methods", nargs="+", default=["emcee", "mdn-is"], choices=METHOD_ORDER
    )
    ap.add_argument("--max-steps", type=int, default=10_000, help="emcee cap")
    ap.add_argument(
        "--nuts-ess",
        type=float,
        default=None,
        help="NUTS's ESS target (default: emcee's median ESS in this run)",
    )
    ap.add_argument(
        "--lm-share",
        type=float,
        nargs="+",
        default=None,
        help="mdn-is: ISOptions.lm_share, one mdn-is run per value on the same "
        "stars (default: ISOptions' default)",
    )
    ap.add_argument("--json", type=Path, help="write the numbers here")
    args = ap.parse_args(argv)

    import jax

    t_all = time.perf_counter()
    emu, net, amask = load_data()
    labels, rv, flux, err, mask = make_test_set(net, amask, args.n, args.snr, args.seed)
    truth = np.column_stack([labels, rv])
    print(
        f"payne_lite {pl.__version__}, jax {jax.__version__} "
        f"({jax.devices()[0].platform}), float "
        f"{'64' if jax.config.jax_enable_x64 else '32'}; {args.n} mock stars of the "
        f"APOGEE network at S/N {args.snr:g}, seed {args.seed}"
    )

    mdn = None
    mdn_note = None
    if {"mdn-is", "flow-is"} & set(args.methods):
        path = args.mdn or (DEFAULT_MDN if DEFAULT_MDN.exists() else None)
        if path is not None:
            mdn = pl.MDN.load(path, emulator=emu)
            mdn_note = f"loaded {path}"
        else:
            t0 = time.perf_counter()
            mdn = pl.train_mdn(emu, seed=0, progress=False)
            mdn_note = f"trained here in {time.perf_counter() - t0:.0f} s"
        if "flow-is" in args.methods and mdn.flow is None:
            t0 = time.perf_counter()
            mdn = pl.train_flow(emu, mdn, progress=False)
            mdn_note += f"; its flow trained here in {time.perf_counter() - t0:.0f} s"
        print(f"MDN: {mdn_note}")

    pl.fit(flux, err, emu, mask=mask)  # compile (the same batch shape)
    t0 = time.perf_counter()
    lm = pl.fit(flux, err, emu, mask=mask)
    t_lm = time.perf_counter() - t0
    print(f"LM fit: {t_lm / args.n * 1e3:.1f} ms per star (batched)")

    res = dict(
        n=args.n, snr=args.snr, seed=args.seed, jax=jax.__version__, mdn=mdn_note,
        lm_seconds_per_star=t_lm / args.n, methods={},
    )  # fmt: skip
    tables = {}
    order = []
    for name in METHOD_ORDER:
        if name in args.methods and name in IS_NAMES and args.lm_share:
            order += [(name, f"{name} lm_share={v:g}", v) for v in args.lm_share]
        elif name in args.methods:
            order.append((name, name, None))
    for name, key, share in order:
        method = LEGACY.get(name, (name,))[0]
        ess = args.nuts_ess
        if method == "nuts" and ess is None and "emcee" in res["methods"]:
            ess = res["methods"]["emcee"]["cost"]["ess_median"]
        t, wall = run_method(
            name, emu, flux, err, mask, lm, mdn, args.seed, args.max_steps, ess,
            share,
        )  # fmt: skip
        tables[key] = t
        all_rows = np.arange(args.n)
        conv = np.asarray(t["converged"], bool)
        r = dict(wall_seconds=wall, converged=float(conv.mean()))
        r["ess_per_label_median"] = ess_per_label(t)
        if method == "nuts":
            r["ess_target"] = float(ess or NUTS_ESS_MIN)
            r["coverage"] = coverage(t, truth, all_rows)
            r["coverage_converged"] = coverage(t, truth, np.flatnonzero(conv))
            r["cost"] = cost(t, all_rows)
            r["divergent_total"] = int(np.sum(t["n_divergent"]))
            r["stars_with_divergences"] = int(np.sum(np.asarray(t["n_divergent"]) > 0))
            r["n_steps_median"] = float(np.median(t["n_steps"]))
            r["n_leapfrog_median"] = float(np.median(t["n_leapfrog"]))
            r["step_size_median"] = float(np.median(t["step_size"]))
            r["rhat_max_median"] = float(np.median(t["rhat_max"]))
        elif method == "emcee":
            r["coverage"] = coverage(t, truth, all_rows)
            r["coverage_converged"] = coverage(t, truth, np.flatnonzero(conv))
            r["cost"] = cost(t, all_rows)
            r["acceptance_median"] = float(np.median(t["acceptance"]))
            r["tau_max_median"] = float(np.median(t["tau_max"]))
            r["n_steps_median"] = float(np.median(t["n_steps"]))
            good = conv & (np.asarray(t["lm_flags"]) == 0)
            r["sd_over_lm_err"] = {
                name: float(
                    np.median(
                        np.asarray(t[f"{name}_std"])[good]
                        / np.asarray(t[f"{name}_lm_err"])[good]
                    )
                )
                for name in PARAMS
            }
            r["n_well_constrained"] = int(good.sum())
            r["n_walkers"] = int(t.meta["n_walkers"])
        else:
            passed = np.flatnonzero(np.asarray(t["method"]) == method)
            fell = np.flatnonzero(np.asarray(t["fallback"], bool))
            r["passed"] = float(passed.size / args.n)
            r["fallback"] = float(fell.size / args.n)
            r["coverage"] = coverage(t, truth, passed)
            r["coverage_all"] = coverage(t, truth, all_rows)
            r["cost"] = cost(t, passed)
            r["cost_fallback"] = cost(t, fell)
            r["is_ess_mdn_median"] = float(np.median(t["is_ess_mdn"]))
            r["coverage_lm_same_stars"] = lm_coverage(lm, truth, passed)
        res["methods"][key] = r

    # report
    print()
    for name, r in res["methods"].items():
        method = LEGACY.get(name, (name,))[0]
        c = r["cost"]
        e = r["ess_per_label_median"]
        print(
            f"{name}: wall {r['wall_seconds']:.0f} s; per star median "
            f"{c['sec_median']:.2f} s, mean {c['sec_mean']:.2f} s; median ESS "
            f"{c.get('ess_median', np.nan):.0f}, ESS/s {c['ess_per_sec']:.0f}, "
            f"log-posterior evaluations {c.get('evals_median', np.nan):.0f}; "
            f"converged {r['converged']:.2f}\n  ESS per label (median over stars) "
            + ", ".join(f"{p} {e[p]:.0f}" for p in PARAMS)
        )
        if method == "emcee":
            print(
                f"  acceptance {r['acceptance_median']:.2f}, tau_max "
                f"{r['tau_max_median']:.0f} steps, n_steps {r['n_steps_median']:.0f}"
            )
        elif method == "nuts":
            print(
                f"  ESS target {r['ess_target']:.0f}; draws per chain "
                f"{r['n_steps_median']:.0f} (median), leapfrog steps per draw "
                f"{r['n_leapfrog_median']:.1f}, step size "
                f"{r['step_size_median']:.3f}, R-hat max "
                f"{r['rhat_max_median']:.3f}; divergent transitions "
                f"{r['divergent_total']} in {r['stars_with_divergences']} star(s)"
            )
        else:
            print(
                f"  ESS >= {IS_ESS_MIN:g}: {r['passed']:.2f} of the stars, "
                f"fell back to emcee: {r['fallback']:.2f} (their median "
                f"{r['cost_fallback']['sec_median']:.2f} s per star); stage-0 "
                f"ESS median {r['is_ess_mdn_median']:.1f}"
            )
    print()
    head = f"{'68% coverage':<36}" + "".join(f"{p:>11}" for p in PARAMS)
    print(head)
    checks = []
    rows = [("emcee-old", "coverage", "emcee-old, all stars")]
    rows += [("emcee", "coverage", "emcee, all stars")]
    rows += [("emcee", "coverage_converged", "emcee, converged")]
    rows += [("nuts-old", "coverage", "nuts-old, all stars")]
    rows += [("nuts", "coverage", "nuts, all stars")]
    if "flow-is" in args.methods:
        res["flow_alone"] = flow_alone(mdn, emu, flux, err, mask, truth, args.seed, lm)
        fa = res["flow_alone"]
        print(
            f"the flow alone (MDN.flow_sample, {fa['n_draws']} draws, no likelihood): "
            f"{fa['sec_per_star'] * 1e3:.1f} ms per star; mean log density of the "
            f"truths (MDN target space) flow {fa['lp_truth_flow']:.2f}, MDN "
            f"{fa['lp_truth_mdn']:.2f}; median 1-sigma width over the LM error "
            + ", ".join(f"{p} {fa['width_over_lm'][p]:.2f}" for p in PARAMS)
        )
    for key in (k for k in res["methods"] if k.split()[0] in IS_NAMES):
        rows += [(key, "coverage", f"{key}, ESS passed")]
        rows += [(key, "coverage_all", f"{key}, all (+fallback)")]
        rows += [(key, "coverage_lm_same_stars", "  LM errors, same stars")]
    if "flow_alone" in res:
        rows += [("flow alone", "coverage", "flow alone (flow_sample), all")]
        res["methods"]["flow alone"] = res.pop("flow_alone")
    rows += [(None, "lm", "LM errors, all stars")]
    res["coverage_lm"] = lm_coverage(lm, truth, np.arange(args.n))
    for method, key, label in rows:
        if method is not None and method not in res["methods"]:
            continue
        cov = res["coverage_lm"] if method is None else res["methods"][method][key]
        print(f"{label:<36}" + "".join(f"{cov[p]:>11.2f}" for p in PARAMS))
        if key == "coverage":
            ok = all(COVERAGE_RANGE[0] <= cov[p] <= COVERAGE_RANGE[1] for p in PARAMS)
            checks.append((f"{method} 68% coverage in {COVERAGE_RANGE}", ok))
    if "emcee" in res["methods"]:
        r = res["methods"]["emcee"]["sd_over_lm_err"]
        n_wc = res["methods"]["emcee"]["n_well_constrained"]
        print(
            f"{'emcee sd / LM err (median)':<36}"
            + "".join(f"{r[p]:>11.3f}" for p in PARAMS)
            + f"   ({n_wc} stars)"
        )
        checks.append(
            (
                f"emcee sd / LM err within {SD_RATIO_TOL:.0%}",
                all(abs(r[p] - 1) <= SD_RATIO_TOL for p in PARAMS),
            )
        )
    if {"emcee", "mdn-is"} <= set(res["methods"]):
        ratio = (
            res["methods"]["emcee"]["cost"]["sec_median"]
            / res["methods"]["mdn-is"]["cost"]["sec_median"]
        )
        res["cost_ratio_emcee_over_mdn_is"] = ratio
        print(f"\nseconds per star, emcee / mdn-is (ESS passed): {ratio:.1f}x")
        checks.append(
            (f"mdn-is >= {COST_RATIO_MIN:g}x cheaper", ratio >= COST_RATIO_MIN)
        )
    meth = res["methods"]
    if {"mdn-is", "flow-is"} <= set(meth):
        ratio = (
            meth["flow-is"]["cost"]["ess_per_sec"]
            / meth["mdn-is"]["cost"]["ess_per_sec"]
        )
        res["ess_per_sec_flow_is_over_mdn_is"] = ratio
        print(f"effective samples per second, flow-is / mdn-is: {ratio:.2f}x")
    if "emcee" in meth:
        e = meth["emcee"]["cost"]
        for other in ("nuts", "mdn-is", "flow-is"):
            if other in meth:
                o = meth[other]["cost"]
                res[f"ess_per_sec_{other}_over_emcee"] = (
                    o["ess_per_sec"] / e["ess_per_sec"]
                )
                print(
                    f"effective samples per second, {other} / emcee: "
                    f"{res[f'ess_per_sec_{other}_over_emcee']:.1f}x"
                )
        if "nuts" in meth:
            ratio = e["sec_median"] / meth["nuts"]["cost"]["sec_median"]
            res["cost_ratio_emcee_over_nuts"] = ratio
            print(f"seconds per star, emcee / nuts (same ESS target): {ratio:.1f}x")
    for new in ("emcee", "nuts"):
        if f"{new}-old" in meth and new in meth:
            ratio = (
                meth[f"{new}-old"]["cost"]["sec_median"]
                / meth[new]["cost"]["sec_median"]
            )
            res[f"speedup_{new}_old_over_new"] = ratio
            print(f"seconds per star, {new}-old / {new}: {ratio:.1f}x")
    for name in ("nuts-old", "nuts"):
        if name in meth:
            checks.append(
                (f"{name}: no divergent transition", meth[name]["divergent_total"] == 0)
            )
    print()
    for what, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {what}")
    res["checks"] = {what: bool(ok) for what, ok in checks}
    res["wall_seconds"] = time.perf_counter() - t_all
    print(f"\ntotal wall time {res['wall_seconds']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2, default=float))


if __name__ == "__main__":
    main()
