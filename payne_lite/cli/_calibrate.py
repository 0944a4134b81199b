"""``payne-lite calibrate-errors``: fit an emulator's label-space error scale on
held-out spectra (:func:`payne_lite.calibrate_emulator_errors`); ``payne-lite
error-basis``: its correlated-error basis from held-out spectra
(:meth:`payne_lite.Emulator.with_error_basis`); ``payne-lite local-error``: its error
covariance near any labels from held-out spectra
(:meth:`payne_lite.Emulator.with_local_error`)."""

from __future__ import annotations

import logging

import numpy as np

from ..emulator import LOCAL_NEIGHBOURS, LOCAL_SHRINK, Emulator
from ..grid import SpectralGrid
from ..observe import calibrate_emulator_errors
from ._common import (
    EXIT_OK,
    add_subcommand,
    check_output,
    checked_read,
    fraction,
    positive_float,
    positive_int,
    require_file,
)

_log = logging.getLogger("payne_lite.cli")


def _emulator_grid_output(p, what: str) -> None:
    """The arguments both commands take: EMULATOR GRID -o OUT.h5 (``what`` it holds)."""
    p.add_argument("emulator", metavar="EMULATOR", help="a payne_lite emulator file")
    p.add_argument(
        "grid", metavar="GRID", help="a payne_lite grid file of held-out spectra"
    )
    p.add_argument(
        "-o", "--output", required=True, metavar="OUT.h5",
        help=f"output emulator file ({what})",
    )  # fmt: skip


def _read_emulator_grid(args):
    """``(emulator, grid, output path)`` of :func:`_emulator_grid_output`'s
    arguments, the files checked before any work."""
    emu_path = require_file(args.emulator)
    grid_path = require_file(args.grid)
    out = check_output(args.output, inputs=[emu_path, grid_path])
    emu = checked_read(Emulator.load, emu_path)
    return emu, checked_read(SpectralGrid.load, grid_path), out


def add_calibrate_errors(sub) -> None:
    p = add_subcommand(
        sub,
        "calibrate-errors",
        help="fit an emulator's error scale over its box on held-out spectra",
        description=(
            "Fit how the emulator's error, seen in the labels a fit returns, varies\n"
            "over its box (Emulator.error_scale): from spectra of GRID that the\n"
            "emulator was not trained on (a few hundred at least, a thousand or more\n"
            "for a stable fit), on the emulator's wavelengths and inside its box.\n"
            "The fit then scales the emulator term of each label's error at the\n"
            "fitted labels. Needs an emulator with an error_basis (trained here)."
        ),
        epilog=(
            "example:\n  payne-lite grid -o held_out.h5 --n-spec 1500 --seed 1000\n"
            "  payne-lite calibrate-errors emulator.h5 held_out.h5 -o calibrated.h5"
        ),
    )
    _emulator_grid_output(p, "the input emulator with its error_scale")
    p.add_argument(
        "--snr", type=positive_float, default=100.0,
        help="S/N of the fit's weights in the calibration",
    )  # fmt: skip


def run_calibrate_errors(args) -> int:
    emu, grid, out = _read_emulator_grid(args)
    _log.info("calibrating %r on %d spectra", emu, grid.labels.shape[0])
    cal = calibrate_emulator_errors(emu, grid, snr=args.snr)
    cal.save(out)
    m = cal.meta["error_scale"]
    shifts = ", ".join(
        f"{k} {v:.2f} -> {m['rms_z_scaled'][k]:.2f}" for k, v in m["rms_z"].items()
    )
    print(
        f"error_scale fitted on {m['n_spectra']} spectra; RMS of the emulator-induced "
        f"shifts over the fit's emulator term: {shifts}; wrote {out}"
    )
    return EXIT_OK


def add_error_basis(sub) -> None:
    p = add_subcommand(
        sub,
        "error-basis",
        help="give an emulator a correlated-error basis from held-out spectra",
        description=(
            "Replace the emulator's error_basis (the principal components of its\n"
            "errors, the low-rank part of the error model C) and pixel_error by\n"
            "those of spectra of GRID that it was not trained on\n"
            "(Emulator.with_error_basis); its error_scale, calibrated on the old\n"
            "basis, is dropped. Generalised least squares (fit --options\n"
            '\'{"estimator": "gls"}\') and the samplers need a basis with ~256\n'
            "components of 500 or more held-out spectra to give calibrated errors\n"
            "at high S/N; the 32 a training keeps are too few there. Where the\n"
            "emulator's error depends on the labels (the shipped default's), no\n"
            "number of components is enough: see payne-lite local-error."
        ),
        epilog=(
            "example:\n  payne-lite grid -o held_out.h5 --n-spec 1000 --seed 1000\n"
            "  payne-lite error-basis emulator.h5 held_out.h5 --rank 256 -o gls.h5\n"
            "  payne-lite fit spectra.h5 --emulator gls.h5 --options "
            '\'{"estimator": "gls"}\' -o fits.h5'
        ),
    )
    _emulator_grid_output(p, "the input emulator with the new basis")
    p.add_argument(
        "--rank", type=positive_int, default=256,
        help="components kept (below the number of held-out spectra)",
    )  # fmt: skip


def run_error_basis(args) -> int:
    emu, grid, out = _read_emulator_grid(args)
    new = emu.with_error_basis(grid, rank=args.rank)
    new.save(out)
    b = np.asarray(new.error_basis, np.float64)
    held = float(np.sum(b * b))
    total = float(np.sum(np.asarray(new.pixel_error, np.float64) ** 2))
    print(
        f"error_basis: {b.shape[0]} components of {grid.n_spec} held-out spectra, "
        f"{held / total:.1%} of their variance; pixel_error median "
        f"{np.median(new.pixel_error):.2e}"
        + ("" if emu.error_scale is None else "; the old error_scale dropped")
        + f"; wrote {out}"
    )
    return EXIT_OK


def add_local_error(sub) -> None:
    p = add_subcommand(
        sub,
        "local-error",
        help="give an emulator a label-dependent error covariance from held-out spectra",
        description=(
            "Store the errors of the emulator on the spectra of GRID (which it was\n"
            "not trained on, spread over its box: 4,000 measured) with their labels\n"
            "(Emulator.with_local_error). Generalised least squares (fit --options\n"
            '\'{"estimator": "gls"}\') and the samplers then take the emulator\'s\n'
            "error covariance at a star's labels from the --neighbours held-out\n"
            "errors nearest them, instead of one error_basis for the whole box.\n"
            "The default fit is unchanged. The file grows by the errors (N x P\n"
            "float32)."
        ),
        epilog=(
            "example:\n  payne-lite grid -o held_out.h5 --n-spec 4000 --seed 1000\n"
            "  payne-lite local-error emulator.h5 held_out.h5 -o local.h5\n"
            "  payne-lite fit spectra.h5 --emulator local.h5 --options "
            '\'{"estimator": "gls"}\' -o fits.h5'
        ),
    )
    _emulator_grid_output(p, "the input emulator with its local error model")
    p.add_argument(
        "--neighbours", type=positive_int, default=LOCAL_NEIGHBOURS,
        help="held-out errors averaged at any labels (at most the grid's spectra)",
    )  # fmt: skip
    p.add_argument(
        "--shrink", type=fraction, default=LOCAL_SHRINK,
        help="weight of the global error model (error_basis, pixel_error) in the "
        "covariance, in [0, 1)",
    )  # fmt: skip


def run_local_error(args) -> int:
    emu, grid, out = _read_emulator_grid(args)
    new = emu.with_local_error(grid, neighbours=args.neighbours, shrink=args.shrink)
    new.save(out)
    loc = new.local_error
    print(
        f"local_error: {loc.n_held_out} held-out errors, {loc.neighbours} nearest at "
        f"any labels, shrunk {loc.shrink:g} toward the global error model; RMS "
        f"{np.sqrt(np.mean(loc.errors.astype(np.float64) ** 2)):.2e}"
        f"; wrote {out}"
    )
    return EXIT_OK
