"""Does the emulator's own error in the likelihood keep label errors calibrated?

An honest experiment with a known truth: The Payne's trained APOGEE network (real,
``pl.datasets.payne_apogee()``) plays the role of the true spectra; a smaller
*student* emulator is trained on spectra of it with :func:`payne_lite.train_emulator`
(so its ``pixel_error`` is the RMS on its own held-out validation spectra, measured at
training time, as for any emulator trained here). Mock stars are made from the true
network (labels in the middle of the box, rv within +-100 km/s, Gaussian noise at the
S/N asked for) and fitted with the student, with ``emulator_error`` on and off. The
table gives, per label, the fraction of stars whose truth lies within the 1-sigma
error (coverage; 0.68 when the errors are right) and the median |fit - truth| / error.

At high S/N the student's error is comparable to or above the noise: without the
term, the errors are too small (coverage well below 0.68). Added in quadrature per
pixel (``pixel_error`` alone) they are still too small: the emulator's error at one
label vector is a smooth pattern, correlated across pixels, that moves the labels
coherently. With the ``error_basis`` that ``train_emulator`` also stores (the
held-out errors' principal components), ``fit`` uses the sandwich covariance and the
coverage is close to 0.68. Test stars are drawn like the training set (labels
uniform in the middle 90 % of the box): the population whose errors ``pixel_error``
and ``error_basis`` describe.

    python benchmarks/bench_emulator_error.py                 # the full table
    python benchmarks/bench_emulator_error.py --n-train 400 --n-test 40 --snr 300

Prints a Markdown table, and writes JSON with ``--json PATH``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import payne_lite as pl
from payne_lite.constants import C_KMS
from payne_lite.emulator import TrainConfig

NAMES = pl.datasets.PAYNE_LABELS_5


def truth_emulator(data_dir: Path | None = None) -> tuple[pl.Emulator, np.ndarray]:
    """The real 5-label APOGEE network (no pixel error of its own) and its mask, from
    payne_lite's example data (or a copy of it in ``data_dir``)."""
    d = pl.datasets.payne_apogee(data_dir)
    return d.emulator(), d.mask


def train_student(
    truth: pl.Emulator, *, n_train: int, hidden: int, max_iter: int, seed: int = 0
) -> pl.Emulator:
    """A student emulator trained on ``n_train`` spectra of ``truth`` (labels
    uniform in the middle 90 % of its box; the box itself is the truth's, so the
    scaled labels of both agree); ``train_emulator`` keeps 20 % for validation and
    measures ``pixel_error`` there."""
    rng = np.random.default_rng(seed)
    labels = truth.unscale(rng.uniform(-0.45, 0.45, (n_train, truth.n_labels)))
    grid = pl.SpectralGrid(
        wavelength=np.asarray(truth.wavelength),
        labels=labels,
        flux=truth.predict(labels),
        label_names=truth.label_names,
        label_units=truth.label_units,
        meta={"source": "bench_emulator_error: spectra of The Payne APOGEE network"},
        box=(np.asarray(truth.label_lo), np.asarray(truth.label_hi)),
    )
    cfg = TrainConfig(hidden=hidden, max_iter=max_iter, seed=seed)
    return pl.train_emulator(grid, config=cfg, progress=False)


def held_out_residuals(truth, student, n: int, seed: int) -> np.ndarray:
    """(n, P) student minus truth on n new spectra drawn like the training set's:
    the errors whose per-pixel RMS ``pixel_error`` is."""
    rng = np.random.default_rng(seed)
    labels = truth.unscale(rng.uniform(-0.45, 0.45, (n, truth.n_labels)))
    return np.asarray(student.predict(labels), np.float64) - truth.predict(labels)


def _shift(wave, flux, rv):
    f = np.sqrt((1 + rv / C_KMS) / (1 - rv / C_KMS))
    return np.interp(wave / f, wave, flux)


def mock_stars(truth: pl.Emulator, n: int, snr: float, seed: int):
    """``n`` noisy spectra of ``truth``: labels (n, L) [physical] uniform in the
    middle 90 % of the box (the population the student's ``pixel_error`` and
    ``error_basis`` describe: its training spectra's), rv (n,) uniform in +-100
    km/s, flux and err (n, P) with Gaussian noise 1 / ``snr``."""
    rng = np.random.default_rng(seed)
    labels = truth.unscale(rng.uniform(-0.45, 0.45, (n, truth.n_labels)))
    rv = rng.uniform(-100.0, 100.0, n)
    wave = np.asarray(truth.wavelength, np.float64)
    flux = np.stack(
        [_shift(wave, f, v) for f, v in zip(truth.predict(labels), rv, strict=True)]
    )
    err = np.full_like(flux, 1.0 / snr)
    return labels, rv, flux + err * rng.standard_normal(flux.shape), err


def coverage_run(
    truth: pl.Emulator,
    student: pl.Emulator,
    mask: np.ndarray | None,
    *,
    n_test: int,
    snr: float,
    seed: int = 1,
    residuals: np.ndarray | None = None,
) -> dict:
    """Fit ``n_test`` noisy spectra of ``truth`` with ``student``, emulator error
    off and on: coverage and median |z| per label and rv. With ``residuals``
    (N, P) also those of :func:`correlated_errors` (key ``"correlated"``)."""
    labels, rv, noisy, err = mock_stars(truth, n_test, snr, seed)
    names = (*student.label_names, "rv")
    truth_p = np.column_stack([labels, rv])

    def summary(est, sig):
        z = (est - truth_p) / sig
        return {
            name: {
                "coverage_1sigma": float(np.mean(np.abs(z[:, j]) < 1.0)),
                "median_abs_z": float(np.median(np.abs(z[:, j]))),
            }
            for j, name in enumerate(names)
        }

    out: dict = {}
    per_pixel = dataclasses.replace(student, error_basis=None)
    for key, emu, on in (
        ("off", student, False),
        ("pixel", per_pixel, True),
        ("on", student, True),
    ):
        t0 = time.perf_counter()
        t = pl.fit(noisy, err, emu, mask=mask, emulator_error=on)
        sec = time.perf_counter() - t0
        est = np.column_stack([np.asarray(t[n], np.float64) for n in names])
        sig = np.column_stack([np.asarray(t[f"{n}_err"], np.float64) for n in names])
        row = {
            "seconds": round(sec, 1),
            "median_chi2_red": float(np.median(t["chi2_red"])),
        }
        out[key] = {**row, **summary(est, sig)}
        if key == "pixel" and residuals is not None:
            sig_c = correlated_errors(student, t, err, mask, residuals)
            out["residuals"] = {**row, **summary(est, sig_c)}
    return out


def correlated_errors(student, table, err, mask, residuals) -> np.ndarray:
    """Errors (n, L + 1) [label units, km/s] of the fits in ``table`` (made with
    ``emulator_error=True`` and per-pixel quadrature weights) with the emulator's
    error treated as *correlated* across pixels: the sandwich covariance
    ``G (D + C_emu) G^T`` of the linearised estimator ``G = (J^T W J)^-1 J^T W``
    (W the fit's weights, D the data variances, J at the best fit) with
    ``C_emu = R^T R / N`` from ``residuals`` R (N, P), the student's held-out
    errors, shifted to each star's rv. An independent check of the library's
    ``error_basis`` path, computed here."""
    from payne_lite.observe import build_obs_model, emulator_error_on, observe_jac

    obs = build_obs_model(student)
    dt = obs.x_obs.dtype
    jac = jax.jit(lambda p: observe_jac(obs, p)[2])
    wave = np.asarray(student.wavelength, np.float64)
    span = np.r_[student.label_hi - student.label_lo, 1.0]
    keep = np.ones(wave.size, bool) if mask is None else ~np.asarray(mask)
    out = np.zeros((len(table), student.n_labels + 1))
    for i in range(len(table)):
        s = student.scale(np.array([table[n][i] for n in student.label_names]))
        v = float(table["rv"][i])
        j = np.asarray(jac(jnp.asarray(np.r_[s, v], dt)), np.float64)  # (P, k)
        pe = emulator_error_on(wave, wave, student.pixel_error, [v])[0]
        w = np.where(keep, 1.0 / (err[i] ** 2 + pe**2), 0.0)
        a = j.T @ (w[:, None] * j)
        g = np.linalg.solve(a, (j * w[:, None]).T)  # (k, P)
        r = np.stack([_shift(wave, row, v) for row in residuals])
        gr = g @ r.T
        cov = g @ (err[i][:, None] ** 2 * g.T) + gr @ gr.T / r.shape[0]
        out[i] = np.sqrt(np.diag(cov)) * span
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--hidden", type=int, default=3)
    ap.add_argument("--max-iter", type=int, default=60)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--snr", type=float, nargs="+", default=[300.0, 50.0])
    ap.add_argument("--n-resid", type=int, default=100, help="held-out residuals")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    try:
        truth, mask = truth_emulator()
    except FileNotFoundError as err:
        raise SystemExit(f"needs the real data: {err}") from None
    t0 = time.perf_counter()
    student = train_student(
        truth,
        n_train=args.n_train,
        hidden=args.hidden,
        max_iter=args.max_iter,
        seed=args.seed,
    )
    t_train = time.perf_counter() - t0
    pe = np.asarray(student.pixel_error)
    resid = held_out_residuals(truth, student, args.n_resid, args.seed + 100)
    print(
        f"student: {args.hidden} hidden units, {args.n_train} spectra of the real "
        f"network, trained in {t_train:.0f} s; pixel_error (its validation RMS) "
        f"median {np.median(pe):.2e}, p90 {np.percentile(pe, 90):.2e}; RMS on "
        f"{args.n_resid} new spectra median {np.median(np.sqrt(np.mean(resid**2, 0))):.2e}"
    )
    result = {
        "n_train": args.n_train,
        "hidden": args.hidden,
        "n_test": args.n_test,
        "train_seconds": round(t_train, 1),
        "pixel_error_median": float(np.median(pe)),
        "runs": {},
    }
    names = (*student.label_names, "rv")
    print()
    print("| S/N | emulator_error | " + " | ".join(names) + " | median chi2_red |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for snr in args.snr:
        res = coverage_run(
            truth,
            student,
            mask,
            n_test=args.n_test,
            snr=snr,
            seed=args.seed + 1,
            residuals=resid,
        )
        result["runs"][str(snr)] = res
        for key in ("off", "pixel", "on", "residuals"):
            r = res[key]
            cells = [
                f"{r[n]['coverage_1sigma']:.2f} ({r[n]['median_abs_z']:.2f})"
                for n in names
            ]
            print(
                f"| {snr:g} | {key} | "
                + " | ".join(cells)
                + f" | {r['median_chi2_red']:.2f} |"
            )
    print("\ncells: fraction of truths within 1 sigma (median |fit - truth| / sigma);")
    print("calibrated errors give 0.68 (0.67). off: emulator_error=False; pixel:")
    print("emulator_error=True with pixel_error only (per-pixel quadrature); on:")
    print("emulator_error=True with pixel_error and error_basis (the default for an")
    print(
        "emulator trained by payne_lite: sandwich covariance); residuals: the 'pixel'"
    )
    print("fits with the sandwich covariance from this benchmark's own held-out")
    print("residuals (an independent check of 'on')")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
