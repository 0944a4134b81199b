"""Rebuild the default grid and emulator that ``payne-lite demo`` uses.

    python data/make_default_emulator.py            # writes data/default_emulator.h5
    python data/make_default_emulator.py --grid-out data/default_grid.h5

Everything is made by payne_lite itself from seeds: the built-in synthesizer's line
list (seed 0) and Latin-hypercube labels (seed 0), then LM training (seed 0), which
also stores the emulator's error on its held-out spectra: per pixel (``pixel_error``)
and as their 32 leading principal components (``error_basis``, the fit's correlated
emulator error). A rebuild on this project's machine gave the shipped network bit
for bit. Last, the label-space scale of that error over the box (``error_scale``,
:func:`payne_lite.calibrate_emulator_errors`) is fitted on 1,500 fresh spectra of the
synthesizer (uniform labels, seed 1000); ``--calibrate-only`` does just that step on
an existing file. The first two steps on the command line:

    payne-lite grid -o default_grid.h5 --n-spec 2000 --seed 0
    payne-lite train default_grid.h5 -o default_emulator.h5 --hidden 10 --max-iter 150
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

import payne_lite as pl
from payne_lite.grid import synth

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-o", "--out", type=Path, default=HERE / "default_emulator.h5")
    ap.add_argument(
        "--grid-out", type=Path, default=None, help="also save the training grid here"
    )
    ap.add_argument("--n-spec", type=int, default=2000)
    ap.add_argument("--hidden", type=int, default=10)
    ap.add_argument("--max-iter", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--calibrate-only",
        action="store_true",
        help="only fit the error_scale of the emulator at --out, in place",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.calibrate_only:
        emu = calibrate(pl.Emulator.load(args.out))
        emu.save(args.out)
        print(f"error_scale: {emu.meta['error_scale']} -> {args.out}")
        return

    t0 = time.perf_counter()
    grid = synth.make_grid(args.n_spec, seed=args.seed)
    print(f"grid: {grid} in {time.perf_counter() - t0:.0f} s")
    if args.grid_out:
        grid.save(args.grid_out)
    emu = pl.train_emulator(
        grid, hidden=args.hidden, seed=args.seed, max_iter=args.max_iter
    )
    emu = calibrate(emu)
    emu.save(args.out)
    m = emu.meta
    print(
        f"emulator: {emu}\n  held-out median |err| {m['valid_median_abs_error']:.2e}, "
        f"99th-percentile pixel {m['valid_p99_pixel_abs_error']:.2e}, "
        f"trained in {m['train_seconds']:.0f} s -> {args.out} "
        f"({args.out.stat().st_size / 1e6:.1f} MB)"
    )
    print(f"  median pixel_error (RMS) {np.median(emu.pixel_error):.2e}")
    print(f"  error_scale: {emu.meta['error_scale']}")


def calibrate(emu: pl.Emulator, n: int = 1500, seed: int = 1000) -> pl.Emulator:
    """``emu`` with its ``error_scale`` fitted on ``n`` fresh synthesizer spectra
    (labels uniform in the box, ``seed``; the training grid's line list)."""
    t0 = time.perf_counter()
    labels = synth.sample_labels(n, seed=seed, method="uniform")
    held_out = pl.SpectralGrid(
        wavelength=emu.wavelength,
        labels=labels,
        flux=synth.synthesize(labels, wavelength=emu.wavelength),
        label_names=emu.label_names,
        label_units=emu.label_units,
    )
    out = pl.calibrate_emulator_errors(emu, held_out)
    print(f"error_scale from {n} held-out spectra in {time.perf_counter() - t0:.0f} s")
    return out


if __name__ == "__main__":
    main()
