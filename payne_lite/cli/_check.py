"""``payne-lite check``: predictive checks of a fitted catalog (double-lined
binaries, a data-driven pixel mask), :func:`payne_lite.check_catalog`."""

from __future__ import annotations

import numpy as np

from ._common import (
    EXIT_OK,
    add_subcommand,
    check_output,
    load_pixel_mask,
    positive_int,
    require_file,
)


def add_check(sub) -> None:
    p = add_subcommand(
        sub,
        "check",
        help="check a fitted catalog: double-lined binaries, a data-driven pixel mask",
        description=(
            "Rebuild the best-fit model of every spectrum of CATALOG from RESULTS\n"
            "(the instrument and continuum the fit recorded), a chunk at a time, and\n"
            "check what the models do not describe (pl.check_catalog):\n"
            "  a second set of lines in each spectrum's residuals, a copy of the\n"
            "    fitted star's lines at another velocity (20-250 km/s): columns\n"
            "    companion_depth (relative to the star's own lines; about the light\n"
            "    ratio of a twin), companion_dv [km/s], companion_nsigma; QA bit\n"
            "    1024 at a depth of 0.05 or more at 5 sigma or more: a double-lined\n"
            "    binary;\n"
            "  each pixel's residuals over the catalog (in the errors the fit used):\n"
            "    the pixels no fit describes (biased, or scattered beyond the\n"
            "    errors) as a mask that `payne-lite fit --mask` takes.\n"
            "Joint fits of visits (`payne-lite fit --group`): each visit against the\n"
            "joint model at its own rv and continuum; the companion columns are\n"
            "(n_star, V), and bit 1024 marks a star with one in any visit."
        ),
        epilog=(
            "example:\n"
            "  payne-lite fit catalog.h5 --emulator emu.h5 -o results.fits\n"
            "  payne-lite check results.fits catalog.h5 --emulator emu.h5 \\\n"
            "      -o checked.fits --mask-out proposed.npy\n"
            "  payne-lite fit catalog.h5 --emulator emu.h5 --mask proposed.npy "
            "-o refit.fits"
        ),
    )
    p.add_argument("results", metavar="RESULTS", help="results of `payne-lite fit`")
    p.add_argument("catalog", metavar="CATALOG", help="the catalog RESULTS fitted")
    p.add_argument(
        "--emulator", required=True, metavar="EMULATOR.h5", help="the fit's emulator"
    )
    p.add_argument(
        "-o", "--output", required=True, metavar="OUT",
        help="the results with the companion columns and bit 1024 (.fits, .ecsv, .h5)",
    )  # fmt: skip
    p.add_argument(
        "--mask", metavar="MASK.npy",
        help="the (P,) bool mask the fit used (--mask of `payne-lite fit`)",
    )  # fmt: skip
    p.add_argument(
        "--mask-out", metavar="MASK.npy",
        help="write the proposed mask (the old one joined) here",
    )  # fmt: skip
    p.add_argument(
        "--chunk-size", type=positive_int, default=1000,
        help="spectra rebuilt at a time",
    )  # fmt: skip


def run_check(args) -> int:
    from ..catalog import check_catalog, write_results

    res = require_file(args.results)
    cat = require_file(args.catalog)
    emu = require_file(args.emulator)
    out = check_output(args.output, inputs=[res, cat, emu])
    mask_out = None
    if args.mask_out is not None:
        mask_out = check_output(args.mask_out, inputs=[res, cat, emu])
        if mask_out.suffix != ".npy":
            raise ValueError(f"--mask-out {mask_out}: give a .npy file name")
    mask = None if args.mask is None else load_pixel_mask(args.mask)
    found = check_catalog(res, cat, emu, mask=mask, chunk_size=args.chunk_size)
    t, comp = found.table, found.companion
    group = comp.depth.ndim == 2
    n_spec = int(np.sum(np.asarray(t["visit_rows"]) >= 0)) if group else len(t)
    print(
        f"payne-lite check: {n_spec} spectra of {cat} against {res}"
        + (f" (joint fits of {len(t)} stars)" if group else "")
    )
    hit = np.argwhere(comp.flagged())  # (k, 1) point fits, (k, 2) joint ones
    searched = int(np.sum(np.isfinite(comp.depth)))
    print(
        f"  second set of lines (bit 1024): {len(hit)} of {searched} searched"
        + (":" if len(hit) else "")
    )
    ids = np.asarray(t["id"], str) if "id" in t.colnames else None
    stars = np.asarray(t["group"], str) if group and "group" in t.colnames else None
    for at in map(tuple, hit[np.argsort(-comp.depth[tuple(hit.T)])][:10]):
        if group:
            s_i, v = at
            who = f"star {s_i}" + (f" ({stars[s_i]})" if stars is not None else "")
            who += f" visit {v + 1} (row {t['visit_rows'][s_i, v]})"
        else:
            who = f"row {at[0]}" + (f" ({ids[at[0]]})" if ids is not None else "")
        print(
            f"    {who}: depth {comp.depth[at]:.3f} at {comp.dv[at]:+.0f} km/s "
            f"({comp.nsigma[at]:.0f} sigma)"
        )
    if len(hit) > 10:
        print(f"    ... and {len(hit) - 10} more (column companion_depth)")
    proposed = found.residuals.propose_mask()
    new = proposed if mask is None else proposed & ~mask
    print(
        f"  pixels whose residuals no fit describes: {int(new.sum())} new "
        f"(of {proposed.size}; pixels seen in fewer than 10 spectra are left alone)"
    )
    write_results(t, out, overwrite=True)
    print(f"  wrote {out}")
    if mask_out is not None:
        full = proposed if mask is None else proposed | mask
        np.save(mask_out, full)
        print(f"  wrote {mask_out}: {int(full.sum())} pixels masked")
    return EXIT_OK
