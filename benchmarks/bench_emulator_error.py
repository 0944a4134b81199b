"""Does the emulator's own error in the likelihood keep label errors calibrated?

An honest experiment with a known truth: The Payne's trained APOGEE network (real,
``../shared/data/payne_apogee``) plays the role of the true spectra; a smaller
*student* emulator is trained on spectra of it with :func:`payne_lite.train_emulator`
(so its ``pixel_error`` is the RMS on its own held-out validation spectra, measured at
training time, as for any emulator trained here). Mock stars are made from the true
network (labels in the middle of the box, rv within +-100 km/s, Gaussian noise at the
S/N asked for) and fitted with the student, with ``emulator_error`` on and off. The
table gives, per label, the fraction of stars whose truth lies within the 1-sigma
error (coverage; 0.68 when the errors are right) and the median |fit - truth| / error.

At high S/N the student's error is comparable to or above the noise: without the
term, the errors are too small (coverage well below 0.68); with it, they should be
about right. The emulator's error is correlated across pixels (a label offset), and
the term treats it as independent per pixel, so it need not be exact: the table
says how close it is.

    python benchmarks/bench_emulator_error.py                 # the full table
    python benchmarks/bench_emulator_error.py --n-train 400 --n-test 40 --snr 300

Prints a Markdown table, and writes JSON with ``--json PATH``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import payne_lite as pl
from payne_lite.constants import C_KMS
from payne_lite.train import TrainConfig

PAYNE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "payne_apogee"
NAMES = ("Teff", "logg", "[Fe/H]", "[alpha/Fe]", "vmacro")
UNITS = ("K", "dex", "dex", "dex", "km/s")


def truth_emulator(data_dir: Path = PAYNE_DIR) -> tuple[pl.Emulator, np.ndarray]:
    """The real 5-label APOGEE network (no pixel error of its own) and its mask."""
    with np.load(data_dir / "apogee_wavelength.npz") as d:
        wave = d["wavelength"]
    with np.load(data_dir / "apogee_mask.npz") as d:
        mask = d["apogee_mask"]
    emu = pl.Emulator.from_payne_npz(
        data_dir / "nn_normalized_spectra_5label.npz",
        label_names=NAMES,
        label_units=UNITS,
        wavelength=wave,
    )
    return emu, mask


def train_student(
    truth: pl.Emulator,
    *,
    n_train: int,
    hidden: int,
    max_iter: int,
    seed: int = 0,
    pixels: slice = slice(None),
) -> pl.Emulator:
    """A student emulator trained on ``n_train`` spectra of ``truth`` (labels
    uniform in the middle 90 % of its box; the box itself is the truth's, so the
    scaled labels of both agree), on the pixels ``pixels``."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(-0.45, 0.45, (n_train, truth.n_labels))
    labels = truth.unscale(s)
    flux = truth.predict(labels)[:, pixels]
    grid = pl.SpectralGrid(
        wavelength=np.asarray(truth.wavelength)[pixels],
        labels=labels,
        flux=flux,
        label_names=truth.label_names,
        label_units=truth.label_units,
        meta={"source": "bench_emulator_error: spectra of The Payne APOGEE network"},
        box=(np.asarray(truth.label_lo), np.asarray(truth.label_hi)),
    )
    cfg = TrainConfig(hidden=hidden, max_iter=max_iter, seed=seed)
    return pl.train_emulator(grid, config=cfg, progress=False)


def coverage_run(
    truth: pl.Emulator,
    student: pl.Emulator,
    mask: np.ndarray | None,
    *,
    n_test: int,
    snr: float,
    seed: int = 1,
    pixels: slice = slice(None),
) -> dict:
    """Fit ``n_test`` noisy spectra of ``truth`` with ``student``, emulator error
    on and off; coverage and median |z| per label for each."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(-0.3, 0.3, (n_test, truth.n_labels))
    labels = truth.unscale(s)
    rv = rng.uniform(-100.0, 100.0, n_test)
    wave = np.asarray(truth.wavelength)
    flux = np.stack(
        [
            np.interp(
                wave / np.sqrt((1 + v / C_KMS) / (1 - v / C_KMS)),
                wave,
                f,
            )
            for f, v in zip(truth.predict(labels), rv, strict=True)
        ]
    )[:, pixels]
    err = np.full_like(flux, 1.0 / snr)
    noisy = flux + err * rng.standard_normal(flux.shape)
    m = None if mask is None else mask[pixels]
    out: dict = {}
    for on in (False, True):
        t0 = time.perf_counter()
        t = pl.fit(noisy, err, student, mask=m, emulator_error=on)
        sec = time.perf_counter() - t0
        row = {
            "seconds": round(sec, 1),
            "median_chi2_red": float(np.median(t["chi2_red"])),
        }
        for j, name in enumerate(student.label_names):
            z = (np.asarray(t[name]) - labels[:, j]) / np.asarray(t[f"{name}_err"])
            row[name] = {
                "coverage_1sigma": float(np.mean(np.abs(z) < 1.0)),
                "median_abs_z": float(np.median(np.abs(z))),
            }
        z_rv = (np.asarray(t["rv"]) - rv) / np.asarray(t["rv_err"])
        row["rv"] = {
            "coverage_1sigma": float(np.mean(np.abs(z_rv) < 1.0)),
            "median_abs_z": float(np.median(np.abs(z_rv))),
        }
        out["on" if on else "off"] = row
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--hidden", type=int, default=3)
    ap.add_argument("--max-iter", type=int, default=60)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--snr", type=float, nargs="+", default=[300.0, 50.0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not PAYNE_DIR.is_dir():
        raise SystemExit(f"needs the real data in {PAYNE_DIR}")
    truth, mask = truth_emulator()
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
    print(
        f"student: {args.hidden} hidden units, {args.n_train} spectra of the real "
        f"network, trained in {t_train:.0f} s; held-out pixel error median "
        f"{np.median(pe):.2e}, p90 {np.percentile(pe, 90):.2e}"
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
            truth, student, mask, n_test=args.n_test, snr=snr, seed=args.seed + 1
        )
        result["runs"][str(snr)] = res
        for key in ("off", "on"):
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
    print("calibrated errors give 0.68 (0.67)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
