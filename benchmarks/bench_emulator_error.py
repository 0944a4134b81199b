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
and ``error_basis`` describe. The mocks are shifted by a band-limited shift
(Lanczos-8, bench_fit's mocks: near the fitter's Lanczos-6, not equal to it; until
2026-12 a cubic spline, before that linear interpolation, whose blur is a model error
of its own).

A second table, the control for rv: the student's *own* spectra (no emulator error
at all), shifted by the sinc or by the fitter's own interpolant. Where the sinc
row's rv coverage falls short and the own row's does not, the rest grid's Doppler
interpolation (about 2 pixels per resolution element) carries an rv error that no
error model here holds.

    python benchmarks/bench_emulator_error.py                 # the full table
    python benchmarks/bench_emulator_error.py --n-train 400 --n-test 40 --snr 300
    python benchmarks/bench_emulator_error.py --student /tmp/student.h5  # reuse one

Prints a Markdown table, and writes JSON with ``--json PATH``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import payne_lite as pl
from payne_lite.emulator import TrainConfig

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_fit import sinc_shift  # noqa: E402

NAMES = pl.datasets.PAYNE_LABELS_5


def truth_emulator(data_dir: Path | None = None) -> tuple[pl.Emulator, np.ndarray]:
    """The real 5-label APOGEE network (no pixel error of its own) and its mask, from
    payne_lite's example data (or a copy of it in ``data_dir``)."""
    d = pl.datasets.payne_apogee(data_dir)
    return d.emulator(), d.mask


def truth_grid(truth: pl.Emulator, n: int, seed: int) -> pl.SpectralGrid:
    """``n`` rest-frame spectra of ``truth``, labels uniform in the middle 90 % of
    its box (the box itself is the truth's, so the scaled labels of a student
    trained on them agree)."""
    rng = np.random.default_rng(seed)
    labels = truth.unscale(rng.uniform(-0.45, 0.45, (n, truth.n_labels)))
    return pl.SpectralGrid(
        wavelength=np.asarray(truth.wavelength),
        labels=labels,
        flux=truth.predict(labels),
        label_names=truth.label_names,
        label_units=truth.label_units,
        meta={"source": "bench_emulator_error: spectra of The Payne APOGEE network"},
        box=(np.asarray(truth.label_lo), np.asarray(truth.label_hi)),
    )


def train_student(
    truth: pl.Emulator, *, n_train: int, hidden: int, max_iter: int, seed: int = 0
) -> pl.Emulator:
    """A student emulator trained on ``n_train`` spectra of ``truth``
    (:func:`truth_grid`); ``train_emulator`` keeps 20 % for validation and
    measures ``pixel_error`` there."""
    grid = truth_grid(truth, n_train, seed)
    cfg = TrainConfig(hidden=hidden, max_iter=max_iter, seed=seed)
    return pl.train_emulator(grid, config=cfg, progress=False)


def held_out_residuals(truth, student, n: int, seed: int) -> np.ndarray:
    """(n, P) student minus truth on n new spectra drawn like the training set's:
    the errors whose per-pixel RMS ``pixel_error`` is."""
    rng = np.random.default_rng(seed)
    labels = truth.unscale(rng.uniform(-0.45, 0.45, (n, truth.n_labels)))
    return np.asarray(student.predict(labels), np.float64) - truth.predict(labels)


def _shift(wave, flux, rv, a: int = 8):
    """``flux`` (P,) on ``wave`` shifted to ``rv`` by a band-limited (Lanczos-8)
    shift (bench_fit's :func:`~benchmarks.bench_fit.sinc_shift`, its mocks' shift:
    close to the fitter's Lanczos-6, not equal; until 2026-12 a cubic spline, and
    before that linear interpolation, whose blur is a model error of its own); NaN
    where a tap leaves a chip."""
    return sinc_shift(wave, flux, rv, a=a)


def _observed(flux, snr: float):
    """Noise-free shifted spectra ``flux`` (n, P) (NaN: none there) -> the flux (1
    there) and its errors (1 / ``snr``; inf there, which gives no weight)."""
    ok = np.isfinite(flux)
    return np.where(ok, flux, 1.0), np.where(ok, 1.0 / snr, np.inf)


def mock_stars(truth: pl.Emulator, n: int, snr: float, seed: int, lanczos: int = 8):
    """``n`` noisy spectra of ``truth``: labels (n, L) [physical] uniform in the
    middle 90 % of the box (the population the student's ``pixel_error`` and
    ``error_basis`` describe: its training spectra's), rv (n,) uniform in +-100
    km/s (shifted by Lanczos-``lanczos``), flux and err (n, P) with Gaussian noise
    1 / ``snr``."""
    rng = np.random.default_rng(seed)
    labels = truth.unscale(rng.uniform(-0.45, 0.45, (n, truth.n_labels)))
    rv = rng.uniform(-100.0, 100.0, n)
    wave = np.asarray(truth.wavelength, np.float64)
    flux, err = _observed(
        np.stack(
            [
                _shift(wave, f, v, lanczos)
                for f, v in zip(truth.predict(labels), rv, strict=True)
            ]
        ),
        snr,
    )
    noise = rng.standard_normal(flux.shape) / snr
    return labels, rv, flux + noise, err


def coverage_run(
    truth: pl.Emulator,
    student: pl.Emulator,
    mask: np.ndarray | None,
    *,
    n_test: int,
    snr: float,
    seed: int = 1,
    residuals: np.ndarray | None = None,
    scaled: pl.Emulator | None = None,
) -> dict:
    """Fit ``n_test`` noisy spectra of ``truth`` with ``student``, emulator error
    off and on: coverage and median |z| per label and rv. With ``residuals``
    (N, P) also those of :func:`correlated_errors` (key ``"correlated"``); with
    ``scaled`` (the student with an ``error_scale``) its fits (key ``"scaled"``)."""
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
    runs = [("off", student, False), ("pixel", per_pixel, True), ("on", student, True)]
    if scaled is not None:
        runs.append(("scaled", scaled, True))
    for key, emu, on in runs:
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


class Sandwich:
    """The LM's sandwich covariance recomputed at a best fit with any emulator-error
    rows (K, P_rest) (shifted to the star's rv like the model), on the fit's pixels:
    unmasked and valid at that rv (not at the chips' ends, whose taps leave the
    chip: their rv derivatives are meaningless, and with them the rv errors came
    out 1.5-3x too small). Per-pixel quadrature weights ``1 / (err^2 + pe^2)``
    as the fit's with ``emulator_error=True``."""

    def __init__(self, student, mask=None):
        from payne_lite.observe import build_obs_model, observe_jac

        self.student = student
        self.obs = obs = build_obs_model(student)
        self.jac = jax.jit(lambda p: observe_jac(obs, p)[1:])  # (valid, J)
        self.wave = np.asarray(student.wavelength, np.float64)
        self.span = np.r_[student.label_hi - student.label_lo, 1.0]
        self.keep = np.ones(self.wave.size, bool) if mask is None else ~np.asarray(mask)

    def errors(self, s, rv, err, rows) -> np.ndarray:
        """Errors (L + 1,) [label units, km/s] at scaled labels ``s`` and ``rv``:
        the square roots of ``G (D + R^T R) G^T``'s diagonal, ``G = (J^T W J)^-1
        J^T W``, D the data variances ``err`` ** 2, R the ``rows`` shifted."""
        from payne_lite.observe import emulator_error_on

        st = self.student
        valid, j = self.jac(jnp.asarray(np.r_[s, rv], self.obs.x_obs.dtype))
        j = np.asarray(j, np.float64)  # (P, k)
        pe = emulator_error_on(self.wave, self.wave, st.pixel_error, [rv])[0]
        w = np.where(self.keep & np.asarray(valid), 1.0 / (err**2 + pe**2), 0.0)
        g = np.linalg.solve(j.T @ (w[:, None] * j), (j * w[:, None]).T)  # (k, P)
        shifted = np.stack([_shift(self.wave, r, rv) for r in rows])
        gr = g @ np.where(np.isfinite(shifted) & (w > 0), shifted, 0.0).T
        cov = g @ (np.where(w > 0, err**2, 0.0)[:, None] * g.T) + gr @ gr.T
        return np.sqrt(np.diag(cov)) * self.span


def correlated_errors(student, table, err, mask, residuals) -> np.ndarray:
    """Errors (n, L + 1) [label units, km/s] of the fits in ``table`` (made with
    ``emulator_error=True`` and per-pixel quadrature weights) with the emulator's
    error treated as *correlated* across pixels: the sandwich covariance
    ``G (D + C_emu) G^T`` (:class:`Sandwich`) with ``C_emu = R^T R / N`` from
    ``residuals`` R (N, P), the student's held-out errors, shifted to each star's
    rv. An independent check of the library's ``error_basis`` path, computed
    here."""
    sand = Sandwich(student, mask)
    rows = np.asarray(residuals) / np.sqrt(len(residuals))
    out = np.zeros((len(table), student.n_labels + 1))
    for i in range(len(table)):
        s = student.scale(np.array([table[n][i] for n in student.label_names]))
        out[i] = sand.errors(s, float(table["rv"][i]), err[i], rows)
    return out


def interpolation_control(student, mask, *, n: int, snr: float, seed: int) -> dict:
    """The rv error that is not the emulator's: ``n`` spectra of the *student itself*
    (no emulator error; labels and rvs as :func:`mock_stars`), shifted by the
    sinc of :func:`_shift` or by the fitter's own interpolant
    (:func:`payne_lite.observe.observe`), with noise 1 / ``snr``, fitted with
    ``emulator_error=False``. Returns, per shift, rv's coverage and the sd of
    (fit - truth) / error: where the sinc row falls short and the own row does
    not, the Doppler interpolation (a grid of about 2 pixels per resolution
    element) is a part of the rv error budget that no error model here holds."""
    from payne_lite.observe import build_obs_model, observe

    rng = np.random.default_rng(seed)
    labels = student.unscale(rng.uniform(-0.45, 0.45, (n, student.n_labels)))
    rv = rng.uniform(-100.0, 100.0, n)
    wave = np.asarray(student.wavelength, np.float64)
    rest = np.asarray(student.predict(labels), np.float64)
    obs = build_obs_model(student)
    own = jax.jit(lambda p: observe(obs, p)[0])
    dt = obs.x_obs.dtype
    shifted = {
        "sinc": np.stack([_shift(wave, f, v) for f, v in zip(rest, rv, strict=True)]),
        "own": np.stack(
            [
                np.asarray(own(jnp.asarray(np.r_[student.scale(x), v], dt)), np.float64)
                for x, v in zip(labels, rv, strict=True)
            ]
        ),
    }
    out = {}
    for key, flux in shifted.items():
        flux, err = _observed(flux, snr)
        noisy = flux + rng.standard_normal(flux.shape) / snr
        t = pl.fit(noisy, err, student, mask=mask, emulator_error=False)
        ok = np.asarray(t["flags"]) == 0
        z = ((np.asarray(t["rv"], np.float64) - rv) / np.asarray(t["rv_err"]))[ok]
        out[key] = {
            "rv_coverage_1sigma": float(np.mean(np.abs(z) < 1.0)),
            "rv_sd_z": float(np.std(z)),
            "rv_err_median": float(np.median(np.asarray(t["rv_err"])[ok])),
            "n": int(ok.sum()),
        }
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--hidden", type=int, default=3)
    ap.add_argument("--max-iter", type=int, default=60)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--snr", type=float, nargs="+", default=[300.0, 100.0, 30.0])
    ap.add_argument("--n-resid", type=int, default=100, help="held-out residuals")
    ap.add_argument("--student", type=Path, help="load (or save) the student here")
    ap.add_argument(
        "--n-cal",
        type=int,
        default=1000,
        help="held-out spectra for the student's error_scale (0: no 'scaled' rows)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    try:
        truth, mask = truth_emulator()
    except FileNotFoundError as err:
        raise SystemExit(f"needs the real data: {err}") from None
    t0 = time.perf_counter()
    if args.student is not None and args.student.exists():
        student = pl.Emulator.load(args.student)
    else:
        student = train_student(
            truth,
            n_train=args.n_train,
            hidden=args.hidden,
            max_iter=args.max_iter,
            seed=args.seed,
        )
        if args.student is not None:
            student.save(args.student)
    t_train = time.perf_counter() - t0
    pe = np.asarray(student.pixel_error)
    resid = held_out_residuals(truth, student, args.n_resid, args.seed + 100)
    scaled = None
    if args.n_cal:
        # the label-space scale of the student's error, fitted on n_cal fresh spectra
        # of the truth (rest frame, labels as the mocks'), none of them a test star's
        held = truth_grid(truth, args.n_cal, args.seed + 200)
        scaled = pl.calibrate_emulator_errors(student, held)
        print(
            f"error_scale on {args.n_cal} held-out spectra: {scaled.meta['error_scale']}"
        )
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
            scaled=scaled,
        )
        result["runs"][str(snr)] = res
        for key in ("off", "pixel", "on", "residuals", "scaled"):
            if key not in res:
                continue
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
    print("residuals (an independent check of 'on'); scaled: 'on' with the")
    print("student's error_scale fitted on --n-cal held-out spectra of the truth")
    print()
    print("rv without emulator error: the student's own spectra, shifted by a sinc")
    print("(as the mocks above) or by the fitter's interpolant, emulator_error=False")
    print("| S/N | shift | rv coverage | sd of z | median rv_err [km/s] | stars |")
    print("|---|---|---|---|---|---|")
    result["interpolation_control"] = {}
    for snr in args.snr:
        ctl = interpolation_control(
            student, mask, n=args.n_test, snr=snr, seed=args.seed + 2
        )
        result["interpolation_control"][str(snr)] = ctl
        for key, r in ctl.items():
            print(
                f"| {snr:g} | {key} | {r['rv_coverage_1sigma']:.2f} | "
                f"{r['rv_sd_z']:.2f} | {r['rv_err_median']:.4f} | {r['n']} |"
            )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
