"""``payne-lite grid``: a training grid from the built-in synthesizer."""

from __future__ import annotations

import dataclasses
import time

from ..constants import APOGEE_DLOGLAM, APOGEE_R
from ..grid import synth
from ._common import EXIT_OK, add_subcommand, check_output, human_size, positive_int


def add_grid(sub) -> None:
    lo, hi = synth.DEFAULT_BOX
    box = "\n".join(
        f"  {n:<11} {a:>7g} .. {b:<7g} {u}"
        for n, u, a, b in zip(
            synth.DEFAULT_LABEL_NAMES, synth.DEFAULT_LABEL_UNITS, lo, hi, strict=True
        )
    )
    p = add_subcommand(
        sub,
        "grid",
        help="make a training grid with the built-in synthesizer",
        description=(
            "Make a grid of continuum-normalised synthetic spectra with the built-in\n"
            "toy synthesizer (physically motivated, not physically exact) and save it\n"
            "as one HDF5 file for `payne-lite train`. Labels are drawn inside:\n"
            f"{box}"
        ),
        epilog=(
            "example:\n  payne-lite grid -o grid.h5 --n-spec 3000 --seed 1\n"
            "  payne-lite grid -o small.h5 --n-spec 200 --lam-min 15100 "
            "--lam-max 15300"
        ),
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="GRID.h5",
        help="output HDF5 file (payne_lite.SpectralGrid format)",
    )
    p.add_argument(
        "--n-spec",
        type=positive_int,
        default=3000,
        metavar="N",
        help="number of spectra",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the label sampling (same seed, same labels)",
    )
    p.add_argument(
        "--sampling",
        choices=("lhs", "uniform"),
        default="lhs",
        help="label sampling: lhs = Latin hypercube (even coverage of each "
        "label), uniform = independent uniform draws",
    )
    p.add_argument(
        "--n-lines",
        type=positive_int,
        default=synth.DEFAULT_N_LINES,
        metavar="N",
        help="number of lines in the seeded synthetic line list",
    )
    p.add_argument(
        "--linelist-seed",
        type=int,
        default=0,
        metavar="SEED",
        help="seed of the line list (kept apart from --seed so that grids "
        "with different labels share one line list)",
    )
    p.add_argument(
        "--resolution",
        type=float,
        default=APOGEE_R,
        metavar="R",
        help="instrumental resolving power lambda/FWHM (Gaussian profile)",
    )
    p.add_argument(
        "--lam-min",
        type=float,
        default=synth.DEFAULT_LAM_MIN,
        metavar="A",
        help="first wavelength [Angstrom, vacuum]",
    )
    p.add_argument(
        "--lam-max",
        type=float,
        default=synth.DEFAULT_LAM_MAX,
        metavar="A",
        help="upper wavelength limit; the last pixel is at or "
        "below it [Angstrom, vacuum]",
    )
    p.add_argument(
        "--dloglam",
        type=float,
        default=APOGEE_DLOGLAM,
        metavar="STEP",
        help="pixel step in log10(wavelength) (6e-6 is APOGEE's, about 4.1 km/s)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=256,
        metavar="N",
        help="spectra per compiled batch (peak memory about 3 MB per "
        "spectrum with the default wavelengths and line list)",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="do not show a progress bar"
    )


def run_grid(args) -> int:
    t0 = time.perf_counter()
    out = check_output(args.output)
    wave = None  # make_grid records "default" wavelengths in the grid's meta
    if (args.lam_min, args.lam_max, args.dloglam) != (
        synth.DEFAULT_LAM_MIN,
        synth.DEFAULT_LAM_MAX,
        APOGEE_DLOGLAM,
    ):
        wave = synth.default_wavelength(args.lam_min, args.lam_max, args.dloglam)
    grid = synth.make_grid(
        args.n_spec,
        seed=args.seed,
        sampling=args.sampling,
        n_lines=args.n_lines,
        linelist_seed=args.linelist_seed,
        wavelength=wave,
        resolution=args.resolution,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    grid = dataclasses.replace(grid, meta={**grid.meta, "command": args.command_line})
    grid.save(out)
    lo, hi = grid.label_box
    print(
        f"wrote {out}: {grid.n_spec} spectra x {grid.n_pix} pixels, "
        f"{grid.wavelength[0]:.1f}-{grid.wavelength[-1]:.1f} A; labels "
        f"{_fmt_box(grid.label_names, grid.label_units, lo, hi)}; "
        f"{human_size(out.stat().st_size)}; {time.perf_counter() - t0:.1f} s"
    )
    return EXIT_OK


def _fmt_box(names, units, lo, hi) -> str:
    """``Teff [4000, 7000] K, logg [1, 5] dex, ...``"""
    parts = []
    for n, u, a, b in zip(names, units, lo, hi, strict=True):
        parts.append(f"{n} [{a:.4g}, {b:.4g}]" + (f" {u}" if u else ""))
    return ", ".join(parts)
