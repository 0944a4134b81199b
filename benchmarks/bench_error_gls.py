"""Is the posterior under the emulator-error covariance calibrated, and what does
the covariance need? (issue 18 items 1-2; a measurement, nothing in the library yet)

The samplers' likelihood is ``-1/2 r^T C^-1 r`` with ``C = diag(D) + U^T U``: ``U``
the emulator's ``error_basis`` (K x P, the leading principal components of its
held-out errors), ``D`` the flux variances plus the per-pixel emulator variance
that ``U`` does not hold. At S/N 300 emcee's posterior under the student's own
``C`` (K = 32 from 200 held-out spectra) covers 0.35-0.53 of the truths
(benchmarks/README.md, "One error model"). This script asks whether a richer ``C``
fixes it, without emcee: at high S/N the posterior is Gaussian around the
generalised least-squares (GLS) estimate, so its centre and width are the GLS
estimate and ``(J^T C^-1 J)^-1``.

The setup of ``bench_emulator_error.py`` (The Payne's real APOGEE network makes the
spectra, a 3-hidden-unit student trained on 1,000 of them fits them), with
rest-frame mocks (rv 0: no Doppler interpolation error, which at S/N 300 is part of
the rv error budget of its own). For each ``C``:

* GLS: from each star's LM fit (``payne_lite.fit``), ``GN_STEPS`` Gauss-Newton steps
  under ``C`` (Woodbury: ``C^-1 x = D^-1 x - D^-1 U^T M^-1 U D^-1 x``,
  ``M = I + U D^-1 U^T``), then the fraction of truths within 1 sigma of
  ``(J^T C^-1 J)^-1`` and the standard deviation of the z-scores;
* the LM's estimate (per-pixel weights) with its sandwich variance under the same
  ``C``, ``A^-1 J^T W C W J A^-1``;
* the median ratio of the two widths (1 = LM and posterior agree, item 1's test).

``C`` is the student's own, then ``K`` components (and the per-pixel variance) from
``N`` held-out residual spectra of the student, for each ``--held-out`` N and
``--ranks`` K.

    python benchmarks/bench_error_gls.py --snr 300 30        # ~6 min
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

import payne_lite as pl
from payne_lite.observe import build_error_model, diagonal_variance

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_emulator_error import (  # noqa: E402
    held_out_residuals,
    train_student,
    truth_emulator,
)

#: Gauss-Newton steps from the LM fit to the GLS estimate.
GN_STEPS = 4


def rest_mocks(truth, n: int, snr: float, seed: int):
    """``n`` rest-frame spectra of ``truth`` (labels uniform in the middle 90 % of
    the box), Gaussian noise 1 / ``snr``: labels (n, L), flux and err (n, P)."""
    rng = np.random.default_rng(seed)
    labels = truth.unscale(rng.uniform(-0.45, 0.45, (n, truth.n_labels)))
    flux = np.asarray(truth.predict(labels), np.float64)
    err = np.full_like(flux, 1.0 / snr)
    return labels, flux + err * rng.standard_normal(flux.shape), err


class Jacobian:
    """The student's observed model and its Jacobian (float64: :func:`main` runs the
    benchmark's process with x64 enabled), batched."""

    def __init__(self, student):
        import jax
        import jax.numpy as jnp

        from payne_lite.observe import build_obs_model, observe_jac

        obs = build_obs_model(student, dtype=jnp.float64)
        self._f = jax.jit(jax.vmap(lambda p: observe_jac(obs, p)))
        self._jnp = jnp

    def __call__(self, p):
        """Model (n, P), validity (n, P), Jacobian (n, P, k) at ``p`` (n, k)."""
        return (np.asarray(a) for a in self._f(self._jnp.asarray(p)))


def compare(jac, student, table, flux, err, truth_p, good, u, pe2) -> dict:
    """GLS and the LM's sandwich under ``C = diag(err^2 + max(pe2 - diag U^T U, 0))
    + U^T U`` (``u`` (K, P)) on the pixels used by every star; returns coverage,
    sd of z (both per parameter) and the median width ratio GLS / sandwich."""
    names = [*student.label_names]
    p_lm = np.column_stack(
        [student.scale(np.column_stack([table[c] for c in names])), table["rv"]]
    )
    _, valid, _ = jac(p_lm)
    g = good & np.all(valid, axis=0)
    # the samplers' error model (Woodbury), one for all stars: same err and pixels
    d = diagonal_variance(np.where(g, err[0] ** 2, 0.0), pe2, u)
    em = build_error_model(d, u)
    ug, dg = u[:, g], d[g]

    p = p_lm.copy()
    for _ in range(GN_STEPS):
        model, _, jj = jac(p)
        cov = np.empty((p.shape[0], p.shape[1], p.shape[1]))
        for i in range(p.shape[0]):
            ji = np.where(g[:, None], jj[i], 0.0).T  # (k, P)
            r = np.where(g, flux[i] - model[i], 0.0)
            _, a, gv = (np.asarray(x, np.float64) for x in em.normal(ji, r))
            p[i] = p[i] + np.linalg.solve(a, gv)
            cov[i] = np.linalg.inv(a)
    sd_gls = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
    # the LM's estimate, weights 1 / (err^2 + pe^2) as the fitter's, under this C
    _, _, jj = jac(p_lm)
    w = 1.0 / (err[0, g] ** 2 + np.asarray(student.pixel_error, np.float64)[g] ** 2)
    sd_lm = np.empty_like(sd_gls)
    for i in range(p.shape[0]):
        wj = jj[i][g] * w[:, None]
        a_inv = np.linalg.inv(jj[i][g].T @ wj)
        uwj = ug @ wj
        meat = wj.T @ (dg[:, None] * wj) + uwj.T @ uwj
        sd_lm[i] = np.sqrt(np.diag(a_inv @ meat @ a_inv))
    z_gls = (p - truth_p) / sd_gls
    z_lm = (p_lm - truth_p) / sd_lm
    return dict(
        gls=np.mean(np.abs(z_gls) < 1, axis=0),
        gls_sd_z=np.std(z_gls, axis=0),
        lm=np.mean(np.abs(z_lm) < 1, axis=0),
        ratio=np.median(sd_gls / sd_lm, axis=0),
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100, help="stars per S/N")
    ap.add_argument("--snr", type=float, nargs="+", default=[300.0, 30.0])
    ap.add_argument("--held-out", type=int, nargs="+", default=[500, 1000, 4000])
    ap.add_argument("--ranks", type=int, nargs="+", default=[32, 128, 256])
    ap.add_argument("--student", type=Path, help="load (or save) the student here")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    # the GLS algebra at S/N 300 in float64: scoped, so that a caller's process
    # (a suite calling main()) keeps its own precision
    with jax.enable_x64():
        _run(args)


def _run(args) -> None:
    """:func:`main` after its arguments, in float64."""
    try:
        truth, mask = truth_emulator()
    except FileNotFoundError as err:
        raise SystemExit(f"needs the real data: {err}") from None
    if args.student is not None and args.student.exists():
        student = pl.Emulator.load(args.student)
    else:
        student = train_student(truth, n_train=1000, hidden=3, max_iter=60, seed=0)
        if args.student is not None:
            student.save(args.student)
    t0 = time.perf_counter()
    resid = held_out_residuals(truth, student, max(args.held_out), seed=11)
    bases = [
        (
            f"own: K {student.error_basis.shape[0]}",
            np.asarray(student.error_basis, np.float64),
            np.asarray(student.pixel_error, np.float64) ** 2,
        )
    ]
    for n_h in sorted(args.held_out):
        r = resid[:n_h]
        _, sv, vt = np.linalg.svd(r / np.sqrt(n_h), full_matrices=False)
        pe2 = np.mean(r * r, axis=0)
        bases += [
            (f"K {k} of {n_h}", sv[:k, None] * vt[:k], pe2)
            for k in args.ranks
            if k < n_h
        ]
    jac = Jacobian(student)
    good = ~np.asarray(mask, bool)
    cols = [*student.label_names, "rv"]
    print(f"student: {student.error_basis.shape[0]} components of its held-out errors")
    print(f"columns: {', '.join(cols)}\n")
    print("| S/N | C | GLS coverage | GLS sd(z) | LM sandwich coverage | "
          "sd GLS / sd LM |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for snr in args.snr:
        labels, flux, err = rest_mocks(truth, args.n, snr, args.seed)
        table = pl.fit(flux, err, student, mask=mask)
        truth_p = np.column_stack([student.scale(labels), np.zeros(args.n)])
        for name, u, pe2 in bases:
            r = compare(jac, student, table, flux, err, truth_p, good, u, pe2)

            def fmt(v):
                return " ".join(f"{x:.2f}" for x in v)

            print(f"| {snr:g} | {name} | {fmt(r['gls'])} | {fmt(r['gls_sd_z'])} | "
                  f"{fmt(r['lm'])} | {fmt(r['ratio'])} |", flush=True)  # fmt: skip
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
