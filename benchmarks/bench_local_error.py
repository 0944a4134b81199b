"""Which error covariance makes GLS calibrated on the shipped default emulator? (issue 18)

The generalised least-squares (GLS) estimate under ``C`` is, to first order, the
truth plus ``delta = (J^T C^-1 J)^-1 J^T C^-1 (e + n)`` with ``e`` the emulator's
error at the truth and ``n`` the flux noise; its errors are right when ``z = delta
/ sqrt(diag (J^T C^-1 J)^-1)`` has unit variance. This computes that directly, by
dense NumPy with the Woodbury identity, for fresh synthesizer spectra
(``payne_lite.grid.synth``, ``--test-seed``, labels in the middle 90 % of the box, rest
frame, labels only; ``J`` by central differences of ``Emulator.predict``) fitted
by ``data/default_emulator.h5``, with the emulator part of ``C`` from held-out
spectra (seed 1000):

* ``global K of N``: one covariance for the box, K principal components of N
  held-out errors (``Emulator.with_error_basis``) plus the per-pixel rest;
* ``local m of N``: the mean outer product of the m held-out errors nearest the
  star's labels (``Emulator.with_local_error``), full rank;
* ``local m, shrunk a``: ``(1 - a)`` times that plus ``a`` times the emulator's own
  global model (its ``error_basis`` and the rest of its ``pixel_error``), as
  ``LocalError.shrink`` does;
* ``subspace``: that local covariance projected on K global components (what a
  cheaper store of the errors would hold);
* ``oracle``: the star's own error ``e e^T``.

Printed: sd of z per label (1 when right) and the fraction within 1 sigma.

    python benchmarks/bench_local_error.py                 # ~4 min on 2 cores
    python benchmarks/bench_local_error.py --snr 300 --n 400 --neighbours 100 200 400
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import payne_lite as pl
from payne_lite.grid import synth

DEFAULT = Path(__file__).resolve().parents[1] / "data" / "default_emulator.h5"


def zscores(jac, err_emu, var_d, factor, seed=0) -> np.ndarray:
    """(n, L) z-scores of the linearised GLS estimate: ``factor(j)`` gives star
    j's ``(d (P,), U (K, P))``, ``C = diag(var_d + d) + U^T U``; the data are its
    emulator error ``err_emu[j]`` plus Gaussian noise of variance ``var_d``."""
    n, n_lab, n_pix = jac.shape
    z = np.zeros((n, n_lab))
    for j in range(n):
        d, u = factor(j)
        di = 1.0 / (var_d + d)
        chol = np.linalg.cholesky(np.eye(len(u)) + (u * di) @ u.T)

        def c_inv(x, di=di, u=u, chol=chol):  # (m, P) -> (C^-1 x^T)^T
            xd = x * di
            g = np.linalg.solve(chol.T, np.linalg.solve(chol, u @ xd.T))
            return xd - (g.T @ u) * di

        jc = c_inv(jac[j])
        a = jc @ jac[j].T
        rng = np.random.default_rng(seed + j)
        e = err_emu[j] + rng.standard_normal(n_pix) * np.sqrt(var_d)
        z[j] = np.linalg.solve(a, jc @ e) / np.sqrt(np.diag(np.linalg.inv(a)))
    return z


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--snr", type=float, default=300.0)
    ap.add_argument("--n", type=int, default=400, help="test spectra (before the cut)")
    ap.add_argument("--held-out", type=int, default=2000)
    ap.add_argument("--test-seed", type=int, default=1002)
    ap.add_argument("--ranks", type=int, nargs="*", default=[256, 1024])
    ap.add_argument("--neighbours", type=int, nargs="*", default=[100, 200])
    ap.add_argument("--shrink", type=float, nargs="*", default=[0.05, 0.15, 0.3])
    ap.add_argument("--subspace", type=int, nargs="*", default=[256])
    args = ap.parse_args(argv)
    emu = pl.Emulator.load(DEFAULT)

    def pred(lab):
        return np.asarray(emu.predict(lab, allow_outside=True), np.float64)

    held = synth.make_grid(args.held_out, seed=1000, progress=False)
    r_held = pred(held.labels) - held.flux
    s_held = emu.scale(held.labels)
    test = synth.make_grid(args.n, seed=args.test_seed, progress=False)
    s = emu.scale(test.labels)
    keep = np.all(np.abs(s) < 0.45, axis=1)
    s, e_test = s[keep], (pred(test.labels) - test.flux)[keep]
    n, n_lab = s.shape
    h = 0.01
    jac = np.zeros((n, n_lab, emu.n_pix))
    for i in range(n_lab):
        d = np.zeros(n_lab)
        d[i] = h
        jac[:, i] = (pred(emu.unscale(s + d)) - pred(emu.unscale(s - d))) / (2 * h)
    var_d = 1.0 / args.snr**2
    names = ", ".join(emu.label_names)
    print(f"{n} test stars, S/N {args.snr:g}, {args.held_out} held out; {names}\n")
    print("| C_emu | sd(z) | 1-sigma coverage |")
    print("|---|---|---|")

    def report(name, factor):
        z = zscores(jac, e_test, var_d, factor)
        sd = " ".join(f"{x:.2f}" for x in z.std(0))
        cov = " ".join(f"{x:.2f}" for x in np.mean(np.abs(z) < 1, 0))
        print(f"| {name} | {sd} | {cov} |", flush=True)

    pe2 = np.mean(r_held**2, 0)
    _, sv, vt = np.linalg.svd(r_held, full_matrices=False)
    for k in args.ranks:
        u = sv[:k, None] * vt[:k] / np.sqrt(args.held_out)
        rest = np.maximum(pe2 - np.sum(u * u, 0), 0.0)
        report(f"global {k} of {args.held_out}", lambda j, u=u, r=rest: (r, u))

    def near(j, m):
        return np.argsort(np.sum((s_held - s[j]) ** 2, axis=1))[:m]

    zero = np.zeros(emu.n_pix)
    for m in args.neighbours:
        report(
            f"local {m} of {args.held_out}",
            lambda j, m=m: (zero, r_held[near(j, m)] / np.sqrt(m)),
        )
    m = args.neighbours[0] if args.neighbours else 100
    b_own = np.asarray(emu.error_basis, np.float64)
    rest_own = np.maximum(
        np.asarray(emu.pixel_error, np.float64) ** 2 - np.sum(b_own**2, 0), 0.0
    )
    for a in args.shrink:
        report(
            f"local {m} of {args.held_out}, shrunk {a:g}",
            lambda j, a=a: (
                a * rest_own,
                np.vstack(
                    [np.sqrt((1 - a) / m) * r_held[near(j, m)], np.sqrt(a) * b_own]
                ),
            ),
        )
    for k in args.subspace:
        v = vt[:k]
        coef = r_held @ v.T
        rest = np.mean((r_held - coef @ v) ** 2, 0)

        def sub(j, v=v, coef=coef, rest=rest):
            c = coef[near(j, m)]
            w, q = np.linalg.eigh(c.T @ c / m)
            return rest, (q * np.sqrt(np.maximum(w, 0))).T @ v

        report(f"local {m}, on {k} global components", sub)
    report("oracle: the star's own error", lambda j: (zero, e_test[j][None]))


if __name__ == "__main__":
    main()
