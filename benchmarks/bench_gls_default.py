"""Is ``estimator="gls"`` calibrated on the shipped default emulator? (issue 18)

``bench_error_model.py`` measures GLS on a student of The Payne's APOGEE network,
where a global covariance of 256 components of 1,000 held-out spectra gives
calibrated errors. This asks the same of the emulator a user gets:
``data/default_emulator.h5`` against its own truth, the built-in synthesizer
(``payne_lite.grid.synth.make_grid``), as ``payne-lite demo`` does.

* held-out spectra: ``--held-out`` synthesizer spectra (seed 1000, the seed of the
  ``payne-lite error-basis`` example), from which ``Emulator.with_error_basis``
  builds each ``--ranks`` K;
* test stars: ``--n`` other synthesizer spectra (seed 2000), labels in the middle
  90 % of the box, rest frame, Gaussian noise 1 / S/N;
* fits: the default estimator with the shipped emulator (its 32-component basis and
  ``error_scale``), GLS with each K, and GLS with a label-dependent covariance
  (``Emulator.with_local_error``: the ``--neighbours`` nearest of ``--local-held``
  synthesizer spectra's errors, seed 1000, shrunk by each ``--shrink`` toward the
  emulator's own 32-component error model).

Printed per S/N and fit: stars with flags 0, ms per star, the fraction of truths
within 1 sigma and the sd of the z-scores (Teff, logg, [Fe/H], [alpha/Fe], vmacro,
rv; 0.68 and 1 when the errors are right).

    python benchmarks/bench_gls_default.py                    # ~6 min on 2 cores
    python benchmarks/bench_gls_default.py --snr 300 --ranks 256 512 1024 --held-out 2000
    python benchmarks/bench_gls_default.py --snr 300 100 30 --ranks --neighbours 100 200
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np

import payne_lite as pl
from payne_lite.emulator import LOCAL_SHRINK
from payne_lite.errors import ErrorModelWarning
from payne_lite.grid import synth

DEFAULT = Path(__file__).resolve().parents[1] / "data" / "default_emulator.h5"


def coverage(t, names, truth) -> tuple[int, np.ndarray, np.ndarray]:
    """(stars with flags 0, fraction within 1 sigma, sd of z) per label and rv."""
    ok = np.asarray(t["flags"]) == 0
    cols = [*names, "rv"]
    z = np.column_stack(
        [(np.asarray(t[c]) - truth[:, j]) / np.asarray(t[f"{c}_err"])
         for j, c in enumerate(cols)]
    )[ok]  # fmt: skip
    return int(ok.sum()), np.mean(np.abs(z) < 1, 0), np.std(z, 0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300, help="test spectra (before the cut)")
    ap.add_argument("--snr", type=float, nargs="+", default=[300.0, 50.0])
    ap.add_argument("--held-out", type=int, default=1000)
    ap.add_argument("--ranks", type=int, nargs="*", default=[256, 512])
    ap.add_argument("--neighbours", type=int, nargs="*", default=[100])
    ap.add_argument("--local-held", type=int, default=2000)
    ap.add_argument("--shrink", type=float, nargs="+", default=[LOCAL_SHRINK])
    ap.add_argument("--seed", type=int, default=3, help="noise")
    args = ap.parse_args(argv)
    emu = pl.Emulator.load(DEFAULT)
    held = synth.make_grid(args.held_out, seed=1000, progress=False)
    test = synth.make_grid(args.n, seed=2000, progress=False)
    s = emu.scale(test.labels)
    keep = np.all(np.abs(s) < 0.45, axis=1)
    names = list(emu.label_names)
    truth = np.column_stack([test.labels[keep], np.zeros(keep.sum())])
    fits = [("default (wls, K 32, error_scale)", emu, "wls")]
    for k in args.ranks:
        fits.append(
            (
                f"gls, K {k} of {args.held_out}",
                emu.with_error_basis(held, rank=k),
                "gls",
            )
        )
    if args.neighbours:
        held2 = synth.make_grid(args.local_held, seed=1000, progress=False)
    for m in args.neighbours:
        for a in args.shrink:
            fits.append(
                (
                    f"gls, local {m} of {args.local_held}, shrink {a:g}",
                    emu.with_local_error(held2, neighbours=m, shrink=a),
                    "gls",
                )
            )
    rng = np.random.default_rng(args.seed)
    print(f"{keep.sum()} test stars; columns: {', '.join([*names, 'rv'])}\n")
    print("| S/N | fit | stars | ms per star | 1-sigma coverage | sd(z) |")
    print("|---|---|---|---|---|---|")
    for snr in args.snr:
        flux = np.asarray(test.flux[keep], np.float64)
        err = np.full_like(flux, 1.0 / snr)
        noisy = flux + err * rng.standard_normal(flux.shape)
        for name, e, est in fits:
            opts = pl.LMOptions(estimator=est)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ErrorModelWarning)
                pl.fit(noisy[:2], err[:2], e, options=opts)  # compile
                t0 = time.perf_counter()
                t = pl.fit(noisy, err, e, options=opts)
                ms = 1e3 * (time.perf_counter() - t0) / len(t)
            n_ok, cov, sdz = coverage(t, names, truth)

            def fmt(v):
                return " ".join(f"{x:.2f}" for x in v)

            print(f"| {snr:g} | {name} | {n_ok} | {ms:.0f} | {fmt(cov)} | {fmt(sdz)} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
