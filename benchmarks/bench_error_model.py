"""Do the LM covariance and the emcee posterior agree, with one error model? (issue 18)

Flux errors, the emulator's per-pixel error and its correlated part (the
``error_basis``) enter every method's likelihood as one covariance
``C = diag(D) + U^T U`` (:mod:`payne_lite.observe._noise`): the samplers' log
likelihood is ``-1/2 r^T C^-1 r``. The LM's estimator is least squares with the
per-pixel weights ``1 / diag(C)``; its table's covariance is that estimator's
scatter under the same error, the sandwich ``A^-1 J^T W C_s W J A^-1``
(:func:`payne_lite.fitting._lm.sandwich_meat`). The posterior's width is about
``(J^T C^-1 J)^-1``, the generalised least-squares estimator's variance, which is
smaller where ``U^T U`` dominates ``D`` (high S/N): there sigma_emcee / sigma_LM is
expected below 1 while both coverages stay near 0.68 (each for its own centre).
This benchmark measures both on the same stars.

The setup is bench_emulator_error's, which has a known truth and an emulator with
a real, measured error: The Payne's APOGEE network (``pl.datasets.payne_apogee()``)
makes the spectra; a small *student* emulator trained on spectra of it (its
``pixel_error`` and ``error_basis`` measured on its own held-out spectra, as for any
emulator trained here) fits them. The shipped network has no ``error_basis``. Mock
stars (:func:`benchmarks.bench_emulator_error.mock_stars`: labels in the middle
90 % of the box, rv within +-100 km/s, Gaussian noise) at S/N 30 and 300 are
fitted with ``payne_lite.fit`` (LM) and sampled with ``payne_lite.sample``
(emcee, box prior, walkers around the LM solution, its convergence rule), both
with ``emulator_error=True`` (the default).

Printed per S/N, per label and rv: the median over stars of sigma_emcee /
sigma_LM (sigma_emcee the posterior sd; 0.9-1.1 = the two agree), and the fraction of
truths within the LM's 1 sigma and within emcee's 16-84 % interval (0.68 when the
errors are right). Stars count when the LM flags are 0 and emcee converged.

    python benchmarks/bench_error_model.py --n 20                 # ~10 min on 2 cores
    python benchmarks/bench_error_model.py --n 100 --json out.json
    python benchmarks/bench_error_model.py --student /tmp/student.h5   # reuse one

With ``--estimator gls`` the LM computes the generalised least-squares estimate
under the same ``C`` and reports ``(J^T C^-1 J)^-1`` (``LMOptions(estimator=
"gls")``), the posterior's width; ``--basis N K`` first gives the student a basis of
K components from N fresh held-out spectra of the truth
(``Emulator.with_error_basis``), which a calibrated ``C`` needs at high S/N:

    python benchmarks/bench_error_model.py --n 100 --estimator gls --basis 1000 256 \
        --student /tmp/student.h5
    python benchmarks/bench_error_model.py --basis 1000 256 --lm-only   # ~2 min

(``--lm-only``: no emcee; the LM's coverage and widths with either estimator on
the same stars.) ``--local N M`` gives the student a label-dependent error
covariance instead (``Emulator.with_local_error``: the M nearest of N fresh
held-out errors at each star's labels), which GLS and emcee then use:

    python benchmarks/bench_error_model.py --n 100 --estimator gls --local 2000 100 \
        --student /tmp/student.h5
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

if __package__ in (None, ""):  # run as a script: import the siblings as benchmarks.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"
from .bench_emulator_error import (  # noqa: E402
    mock_stars,
    train_student,
    truth_emulator,
    truth_grid,
)

RATIO_RANGE = (0.9, 1.1)


def student_emulator(truth, path: Path | None, *, n_train, hidden, max_iter, seed):
    """The student of :func:`train_student`, loaded from ``path`` when it exists
    (else trained, and saved there when a path is given)."""
    if path is not None and path.exists():
        return pl.Emulator.load(path), 0.0
    t0 = time.perf_counter()
    student = train_student(
        truth, n_train=n_train, hidden=hidden, max_iter=max_iter, seed=seed
    )
    if path is not None:
        student.save(path)
    return student, time.perf_counter() - t0


def compare(
    truth, student, mask, *, n, snr, seed, max_steps, estimator, inst=None, lanczos=8
) -> dict:
    """LM (``estimator``) and emcee on ``n`` mock stars at ``snr``: per parameter the
    median sigma_emcee / sigma_LM and the coverages, over the stars that count."""
    labels, rv, flux, err = mock_stars(truth, n, snr, seed, lanczos)
    names = (*student.label_names, "rv")
    truth_p = np.column_stack([labels, rv])
    masks = np.broadcast_to(mask, flux.shape)
    t0 = time.perf_counter()
    lm = pl.fit(flux, err, student, mask=masks, instrument=inst,
                options=pl.LMOptions(estimator=estimator))  # fmt: skip
    t_lm = time.perf_counter() - t0
    opts = pl.EmceeOptions(n_steps=max_steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SamplingWarning)
        # the first star once before timing (compilation)
        pl.sample(flux[:1], err[:1], student, mask=masks[:1], lm_table=lm[:1],
                  options=opts, instrument=inst)  # fmt: skip
        t0 = time.perf_counter()
        post = pl.sample(flux, err, student, mask=masks, lm_table=lm, options=opts,
                         instrument=inst)  # fmt: skip
    t_em = time.perf_counter() - t0
    ok = (np.asarray(lm["flags"]) == 0) & np.asarray(post["converged"], bool)
    out = {
        "snr": snr,
        "n": n,
        "n_used": int(ok.sum()),
        "lm_seconds": round(t_lm, 1),
        "emcee_seconds_per_star": round(t_em / n, 2),
        "params": {},
    }
    for j, name in enumerate(names):
        s_lm = np.asarray(lm[f"{name}_err"], np.float64)
        s_em = np.asarray(post[f"{name}_std"], np.float64)
        est = np.asarray(lm[name], np.float64)
        lo = np.asarray(post[f"{name}_p16"], np.float64)
        hi = np.asarray(post[f"{name}_p84"], np.float64)
        t = truth_p[:, j]
        out["params"][name] = {
            "median_ratio": float(np.median((s_em / s_lm)[ok])),
            "ratio_p16_p84": [
                float(v) for v in np.percentile((s_em / s_lm)[ok], [16, 84])
            ],
            "coverage_lm": float(np.mean((np.abs(est - t) < s_lm)[ok])),
            "coverage_emcee": float(np.mean(((t >= lo) & (t <= hi))[ok])),
        }
    return out


def estimators(truth, student, mask, *, n, snr, seed, inst=None, lanczos=8) -> dict:
    """The LM alone, both estimators on the same ``n`` mock stars at ``snr``: per
    parameter the fraction of truths within 1 sigma (stars with flags 0 in both)
    and the median sigma_gls / sigma_wls; seconds per star of each."""
    labels, rv, flux, err = mock_stars(truth, n, snr, seed, lanczos)
    names = (*student.label_names, "rv")
    truth_p = np.column_stack([labels, rv])
    masks = np.broadcast_to(mask, flux.shape)
    tabs, secs = {}, {}
    for est in ("wls", "gls"):
        opts = pl.LMOptions(estimator=est)
        kw = dict(options=opts, instrument=inst)
        pl.fit(flux[:2], err[:2], student, mask=masks[:2], **kw)  # compile
        t0 = time.perf_counter()
        tabs[est] = pl.fit(flux, err, student, mask=masks, **kw)
        secs[est] = (time.perf_counter() - t0) / n
    ok = (np.asarray(tabs["wls"]["flags"]) == 0) & (
        np.asarray(tabs["gls"]["flags"]) == 0
    )
    out = {"snr": snr, "n": n, "n_used": int(ok.sum()), "seconds_per_star": secs}
    for est, t in tabs.items():
        z = np.column_stack(
            [(np.asarray(t[c]) - truth_p[:, j]) / np.asarray(t[f"{c}_err"])
             for j, c in enumerate(names)]
        )  # fmt: skip
        out[f"coverage_{est}"] = np.mean(np.abs(z[ok]) < 1, axis=0).tolist()
        out[f"sd_z_{est}"] = np.std(z[ok], axis=0).tolist()
        # flags also mark fits the model does not describe (QA bit 9 finds the
        # student's own errors at high S/N): dropping them could flatter coverage
        fin = np.all(np.isfinite(z), axis=1)
        out[f"coverage_all_{est}"] = np.mean(np.abs(z[fin]) < 1, axis=0).tolist()
        out[f"n_all_{est}"] = int(fin.sum())
    ratio = [
        np.median((np.asarray(tabs["gls"][f"{c}_err"]) / tabs["wls"][f"{c}_err"])[ok])
        for c in names
    ]
    out["median_sigma_gls_over_wls"] = [float(v) for v in ratio]
    return out


def _estimator_table(runs, names) -> None:
    def fmt(v):
        return " ".join(f"{x:.2f}" for x in v)

    print(f"\ncolumns: {', '.join(names)}")
    print("| S/N | stars used | estimator | 1-sigma coverage | sd(z) | "
          "median sigma / sigma_wls | ms per star | coverage, flagged too |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        for est in ("wls", "gls"):
            ratio = r["median_sigma_gls_over_wls"] if est == "gls" else [1] * len(names)
            print(f"| {r['snr']:g} | {r['n_used']}/{r['n']} | {est} | "
                  f"{fmt(r[f'coverage_{est}'])} | {fmt(r[f'sd_z_{est}'])} | "
                  f"{fmt(ratio)} | {1e3 * r['seconds_per_star'][est]:.1f} | "
                  f"{fmt(r[f'coverage_all_{est}'])} ({r[f'n_all_{est}']}) |")  # fmt: skip
    print(
        "stars used: flags 0 in both fits; the last column counts every star with "
        "finite errors (in brackets)"
    )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="stars per S/N")
    ap.add_argument("--snr", type=float, nargs="+", default=[30.0, 300.0])
    ap.add_argument("--max-steps", type=int, default=10000)
    ap.add_argument("--student", type=Path, help="load / save the student here")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--hidden", type=int, default=3)
    ap.add_argument("--max-iter", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--estimator", choices=("wls", "gls"), default="wls")
    ap.add_argument(
        "--basis", type=int, nargs=2, metavar=("N", "K"),
        help="replace the student's basis: K components of N held-out spectra",
    )  # fmt: skip
    ap.add_argument(
        "--local", type=int, nargs=2, metavar=("N", "M"),
        help="give the student a local error model: M nearest of N held-out errors",
    )  # fmt: skip
    ap.add_argument(
        "--doppler", default=None,
        help="the fitter's Doppler interpolant (Instrument.doppler; default its own)",
    )  # fmt: skip
    ap.add_argument(
        "--mock-lanczos", type=int, default=8,
        help="the mocks' shift: Lanczos-A, 2 A taps (8: bench_fit's sinc_shift)",
    )  # fmt: skip
    ap.add_argument(
        "--lm-only", action="store_true",
        help="no emcee: the LM's two estimators (wls, gls) on the same stars",
    )  # fmt: skip
    args = ap.parse_args(argv)
    try:
        truth, mask = truth_emulator()
    except FileNotFoundError as err:
        raise SystemExit(f"needs the real data: {err}") from None
    student, t_train = student_emulator(
        truth, args.student, n_train=args.n_train, hidden=args.hidden,
        max_iter=args.max_iter, seed=args.seed,
    )  # fmt: skip
    if args.basis is not None:
        n_h, k = args.basis
        # fresh spectra (the training grid's seed is args.seed), drawn alike
        student = student.with_error_basis(truth_grid(truth, n_h, 11), rank=k)
    if args.local is not None:
        n_h, m = args.local
        student = student.with_local_error(truth_grid(truth, n_h, 12), neighbours=m)
    pe = np.asarray(student.pixel_error)
    print(f"LM estimator: {'wls and gls' if args.lm_only else args.estimator}")
    print(
        f"student: {student.meta.get('hidden', args.hidden)} hidden units, "
        f"error_basis {np.shape(student.error_basis)}, pixel_error median "
        f"{np.median(pe):.2e} (trained in {t_train:.0f} s; 0 = loaded)"
        + (f"; local error, {args.local[1]} of {args.local[0]}" if args.local else "")
    )
    names = (*student.label_names, "rv")
    inst = None if args.doppler is None else pl.Instrument(doppler=args.doppler)
    shift = dict(inst=inst, lanczos=args.mock_lanczos)
    print(f"mocks shifted by Lanczos-{args.mock_lanczos}; fitter's interpolant "
          f"{args.doppler or 'its default'}")  # fmt: skip
    if args.lm_only:
        runs = [
            estimators(
                truth, student, mask, n=args.n, snr=snr, seed=args.seed + 1, **shift
            )
            for snr in args.snr
        ]
        _estimator_table(runs, names)
        result = {"estimators": runs, "basis": args.basis, "local": args.local}
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return result
    runs = []
    for snr in args.snr:
        runs.append(
            compare(
                truth,
                student,
                mask,
                n=args.n,
                snr=snr,
                seed=args.seed + 1,
                max_steps=args.max_steps,
                estimator=args.estimator,
                **shift,
            )
        )
        ratios = {n: round(runs[-1]["params"][n]["median_ratio"], 3) for n in names}
        print(f"S/N {snr:g} done: {ratios}", flush=True)
    print()
    print("| S/N | stars used | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for r in runs:
        cells = [
            f"{r['params'][n]['median_ratio']:.3f} "
            f"({r['params'][n]['coverage_lm']:.2f}/{r['params'][n]['coverage_emcee']:.2f})"
            for n in names
        ]
        print(f"| {r['snr']:g} | {r['n_used']}/{r['n']} | " + " | ".join(cells) + " |")
    print(
        "\ncells: median sigma_emcee / sigma_LM over the stars used (LM flags 0, emcee "
        f"converged; {RATIO_RANGE[0]}-{RATIO_RANGE[1]} = agreement), and (fraction of "
        "truths within the LM's 1 sigma / within emcee's 16-84 %; 0.68 when right)"
    )
    for r in runs:
        print(
            f"S/N {r['snr']:g}: LM {r['lm_seconds']} s for {r['n']} stars, emcee "
            f"{r['emcee_seconds_per_star']} s per star"
        )
    inside = all(
        RATIO_RANGE[0] <= r["params"][n]["median_ratio"] <= RATIO_RANGE[1]
        for r in runs
        for n in names
    )
    print(f"all medians within {RATIO_RANGE}: {inside}")
    result = {
        "runs": runs,
        "within_range": inside,
        "train_seconds": round(t_train, 1),
        "estimator": args.estimator,
        "basis": None if args.basis is None else list(args.basis),
        "local": None if args.local is None else list(args.local),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
