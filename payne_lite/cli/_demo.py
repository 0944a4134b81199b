"""``payne-lite demo``: the main job on the embedded default (payne_lite.demo)."""

from __future__ import annotations

import textwrap

from ._common import EXIT_OK, add_subcommand, positive_int, require_file


def add_demo(sub) -> None:
    p = add_subcommand(
        sub,
        "demo",
        help="run the main job on the built-in default (nothing downloaded)",
        description=(
            "The main job on the embedded default: load the default emulator and\n"
            "MDN shipped with the package (either is built in a few minutes into\n"
            "the user cache, $PAYNE_LITE_CACHE or ~/.cache/payne_lite, if missing),\n"
            "simulate a catalog of spectra with known labels from the built-in\n"
            "synthesizer, check the emulator against them, fit them (MDN starts and\n"
            "bounds + Levenberg-Marquardt, and the MDN-free default for comparison),\n"
            "and write the tables, figures and a summary."
        ),
        epilog="example:\n  payne-lite demo -o demo_out --n-spec 300",
    )
    p.add_argument(
        "-o",
        "--outdir",
        default="payne_lite_demo",
        metavar="DIR",
        help="folder for the table (catalog_truth.ecsv) and figures/",
    )
    p.add_argument(
        "--n-spec",
        type=positive_int,
        default=300,
        metavar="N",
        help="spectra in the simulated catalog",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seed of the catalog's labels (the default emulator was "
        "trained on seed 0)",
    )
    p.add_argument(
        "--emulator",
        default=None,
        metavar="EMULATOR.h5",
        help="use this emulator file instead of the default (it must have "
        "the built-in synthesizer's labels)",
    )
    p.add_argument(
        "--mdn",
        default=None,
        metavar="MDN.h5",
        help="use this MDN file (trained for the emulator) instead of the "
        "default; trained on the spot and saved there if missing",
    )
    p.add_argument(
        "--emcee-stars",
        type=int,
        default=3,
        metavar="N",
        help="stars sampled with emcee after the fits (default 3; 0 = none)",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="do not show progress bars"
    )


def run_demo(args) -> int:
    from ..demo import run_demo

    if args.emulator is not None:
        require_file(args.emulator)
    res = run_demo(
        args.outdir,
        n_spec=args.n_spec,
        seed=args.seed,
        emulator=args.emulator,
        mdn=args.mdn,
        n_emcee=args.emcee_stars,
        progress=not args.no_progress,
    )
    print(f"payne-lite demo: {res['n_spec']} simulated spectra x {res['n_pix']} pixels")
    print(
        f"  emulator vs synthesizer on unseen labels: median |error| "
        f"{res['median_abs_error']:.1e}, 99th-percentile pixel "
        f"{res['p99_pixel_error']:.1e}"
    )
    print(
        f"  emulator {res['emulator_spectra_per_s']:,.0f} spectra/s, synthesizer "
        f"{res['synth_spectra_per_s']:,.0f} spectra/s on this machine"
    )
    print(
        f"  fit (MDN starts and bounds + batched Levenberg-Marquardt): "
        f"{res['fit_spectra_per_s']:,.0f} spectra/s once compiled (first call "
        f"{res['fit_first_call_seconds']:.0f} s; MDN {res['mdn_seconds']:.2f} s of "
        f"it), median {res['fit_median_iter']:.0f} LM steps, "
        f"{res['mdn_refit']} refitted without the MDN, {res['fit_flagged']} flagged"
    )
    print(
        f"  without the MDN (3 Teff starts, rv scan +-500 km/s): "
        f"{res['plain_spectra_per_s']:,.0f} spectra/s, median "
        f"{res['plain_median_iter']:.0f} LM steps"
    )
    print(
        f"  {'fit - truth':<12} {'bias':>9} {'scatter':>9} {'in 1 sigma':>10}"
        f"   {'no MDN':>9}   {'MDN in 1, 3 sigma':>17}"
    )
    for name, b, sc, w, sp, m1, m3 in zip(
        res["fit_labels"],
        res["fit_bias"],
        res["fit_scatter"],
        res["fit_within_1sigma"],
        res["plain_scatter"],
        res["mdn_within_1sigma"],
        res["mdn_within_3sigma"],
        strict=True,
    ):
        print(
            f"  {name:<12} {b:>9.3g} {sc:>9.3g} {w:>10.0%}   {sp:>9.3g}"
            f"   {m1:>8.0%} {m3:>8.0%}"
        )
    print(
        "  (scatter: half the 16-84 % range of fit - truth; in 1 sigma: the fraction\n"
        "   of truths within the fit's 1-sigma errors, 68 % if the errors were exact;\n"
        "   'no MDN': the scatter of the MDN-free fit; last columns: the MDN's own\n"
        "   Gaussians against the truth)"
    )
    print(_error_note(res))
    split = ", ".join(  # no-break spaces inside an entry: wrapped between entries
        f"{name}\xa0{a:.0%}/{b:.0%}"
        for name, a, b in zip(
            res["fit_labels"],
            res["fit_within_1sigma_emu_better"],
            res["fit_within_1sigma_emu_worse"],
            strict=True,
        )
    )
    print("  in 1 sigma, stars whose emulator error is below / above the median:")
    split = textwrap.fill(split, 80, initial_indent=" " * 4, subsequent_indent=" " * 4)
    print(split.replace("\xa0", " "))
    if res["emcee_stars"]:
        n_e = res["emcee_stars"]
        print(
            f"  emcee on {n_e} star{'s' if n_e > 1 else ''}: {res['emcee_converged']} "
            f"converged, {res['emcee_seconds_per_star']:.0f} s per star, truth inside "
            f"the 16-84 % interval for {res['emcee_truth_in_68']:.0%} of their "
            f"parameters (posterior_emcee.ecsv, figures/corner_emcee_row0)"
        )
    print(
        f"  wrote {res['outdir']}/catalog_truth.ecsv, catalog.h5, results.fits and "
        f"figures/ "
        f"({res['total_seconds']:.0f} s)"
    )
    return EXIT_OK


def _error_note(res) -> str:
    """What the fit's errors include, from the results table's meta (see
    :func:`payne_lite.demo.run_demo`): the note printed under the coverage table."""
    if res["fit_emulator_error_scaled"]:
        return (
            "  (errors: flux noise plus the emulator's own error measured on held-out\n"
            "   spectra: per pixel in the fit's weights, and correlated across pixels\n"
            f"   (its {res['emulator_error_rank']} leading principal components, "
            "emu.error_basis) in the\n"
            "   covariance, that term of each label's error scaled by how the\n"
            "   emulator's error moves that label at the fitted labels\n"
            "   (emu.error_scale, fitted on fresh held-out spectra). The model's\n"
            "   Doppler shift is band-limited (a windowed sinc), the nearest to\n"
            "   these mocks' exact one; with Instrument(doppler='cubic6') the rv\n"
            "   errors miss Keys' cubic's own shift error (52-59 % in 1 sigma).\n"
            "   The emcee posteriors use the pixel-space error model without the\n"
            "   scale)"
        )
    if res["fit_emulator_error_correlated"]:
        return (
            "  (errors: flux noise plus the emulator's own error measured on held-out\n"
            "   spectra: per pixel in the fit's weights, and correlated across pixels\n"
            f"   (its {res['emulator_error_rank']} leading principal components, "
            "emu.error_basis) in the\n"
            "   covariance. That error is one average over the label box, not yet a\n"
            "   function of the labels: where the emulator's error is above its\n"
            "   median the label errors are still too small (the split below), and\n"
            "   the rv errors are too small as well. The emcee posteriors use the\n"
            "   same error model, and are narrower where it matters (high S/N):\n"
            "   they weight the pixels by the whole covariance, the LM per pixel)"
        )
    if res["fit_emulator_error"]:
        return (
            "  (errors: flux noise and the emulator's per-pixel error in quadrature;\n"
            "   this emulator has no error_basis, so the correlation of its errors\n"
            "   across pixels is missing and the errors are too small: fewer than\n"
            "   68 % of truths fall within 1 sigma)"
        )
    return (
        "  (errors: flux noise only; this emulator carries no estimate of its own\n"
        "   error, so the errors are too small where that error matters)"
    )
