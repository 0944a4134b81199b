"""``payne-lite plot``: figures from saved results, emulator, MDN and samples files."""

from __future__ import annotations

from ._common import EXIT_OK, add_subcommand, parse_number


def add_plot(sub) -> None:
    p = add_subcommand(
        sub,
        "plot",
        help="make figures from saved results, emulator and MDN files",
        description=(
            "Make the figures (PNG and PDF) that the given saved files allow, write\n"
            "them into FOLDER (replacing figures of the same name) and list them.\n\n"
            "what is drawn from what:\n"
            "  RESULTS --truth TRUTH       fit_vs_truth: fit minus truth per label;\n"
            "                              fit_coverage: fraction of truths within z\n"
            "                              sigma (the fit's errors) against erf(z/sqrt2);\n"
            "                              mdn_coverage: the same for the MDN, when\n"
            "                              RESULTS came from `payne-lite fit --mdn`\n"
            "  RESULTS --spectra CATALOG   spectrum_row<N>: a spectrum, its best-fit\n"
            "                              model and residuals (in sigma), full range\n"
            "                              and zoom windows; needs --emulator unless\n"
            "                              RESULTS has a model_flux column\n"
            "  --emulator EMULATOR         emulator_loss: training/validation curves;\n"
            "                              emulator_pixel_error: held-out error per pixel\n"
            "  --mdn MDN                   mdn_loss: training/validation NLL per epoch\n"
            "  SAMPLES [--rows N,..]       trace_star<N>, prior_posterior_star<N>,\n"
            "                              corner_star<N>: posterior samples saved by\n"
            "                              payne_lite.sample(samples_path=...)\n\n"
            "RESULTS is a table written by `payne-lite fit` (.fits, .ecsv, .h5); an\n"
            "emulator, MDN or samples file in its place is plotted as such.\n"
            "TRUTH is a table (.ecsv, .fits, .h5) with columns named like the fitted\n"
            "labels and rv, on RESULTS' rows in order, or matched by an id column."
        ),
        epilog=(
            "examples:\n"
            "  payne-lite plot payne_lite_demo/results.fits \\\n"
            "      --truth payne_lite_demo/catalog_truth.ecsv\n"
            "  payne-lite plot results.fits --spectra catalog.h5 --emulator emu.h5 "
            "--rows 0,17\n"
            "  payne-lite plot emulator.h5 -o figures/\n"
            "  payne-lite plot --mdn mdn.h5 --emulator emulator.h5"
        ),
    )
    p.add_argument(
        "results",
        nargs="?",
        metavar="RESULTS",
        help="a results table from `payne-lite fit` (or an emulator or MDN file)",
    )
    p.add_argument(
        "--truth",
        metavar="TRUTH",
        help="table of the true labels and rv of RESULTS' spectra",
    )
    p.add_argument(
        "--spectra",
        nargs="+",
        metavar="CATALOG",
        help="the catalog RESULTS was fitted from (.h5, or FITS files; "
        "give RESULTS before --spectra)",
    )
    p.add_argument(
        "--emulator",
        metavar="EMULATOR.h5",
        help="the emulator of the fit (models for --spectra) and its figures",
    )
    p.add_argument("--mdn", metavar="MDN.h5", help="an MDN file: its loss curves")
    p.add_argument(
        "-o",
        "--outdir",
        default="figures",
        metavar="FOLDER",
        help="folder for the figures",
    )
    p.add_argument(
        "--rows",
        metavar="N[,N...]",
        help="RESULTS rows (from 0) to draw spectra for (default: the "
        "rows with the median and the highest chi2_red)",
    )
    p.add_argument(
        "--windows",
        default="auto",
        metavar="auto|LO-HI[,LO-HI...]",
        help="zoom windows [Angstrom] of the spectrum figures; auto = "
        "where the lines are strongest and where the residuals are "
        "largest",
    )
    p.add_argument(
        "--window-width",
        type=float,
        default=30.0,
        metavar="A",
        help="width of the automatic zoom windows [Angstrom]",
    )


def _parse_rows(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        rows = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"--rows {text!r}: expected row numbers like 0,5,17") from None
    if not rows or min(rows) < 0:
        raise ValueError(f"--rows {text!r}: expected row numbers >= 0 like 0,5,17")
    return rows


def _parse_windows(text: str):
    if text.strip().lower() == "auto":
        return "auto"
    out = []
    for item in text.replace(" ", "").split(","):
        lo, sep, hi = item.partition("-")
        if not sep:
            raise ValueError(
                f"--windows {text!r}: expected auto or LO-HI pairs like "
                "15200-15350,16150-16300"
            )
        out.append((parse_number(lo, "--windows"), parse_number(hi, "--windows")))
    return out


def run_plot(args) -> int:
    from ..plots import figures_from_files

    if not args.window_width > 0:
        raise ValueError(f"--window-width must be > 0, got {args.window_width:g}")
    figs = figures_from_files(
        args.outdir,
        results=args.results,
        truth=args.truth,
        spectra=args.spectra,
        emulator=args.emulator,
        mdn=args.mdn,
        rows=_parse_rows(args.rows),
        windows=_parse_windows(args.windows),
        window_width=args.window_width,
    )
    print(f"payne-lite plot: {len(figs.written)} figure(s) in {args.outdir}")
    for what, paths in figs.written:
        print(f"  wrote {paths[0]} and .pdf: {what}")
    for why in figs.skipped:
        print(f"  skipped: {why}")
    return EXIT_OK
