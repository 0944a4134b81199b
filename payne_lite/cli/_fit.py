"""``payne-lite fit``: fit a catalog with an emulator (payne_lite.catalog.fit_catalog),
with the instrument, the method's options and distributed, resumable runs."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .._api import METHODS as FIT_METHODS
from .._api import fit
from ..catalog import DEFAULT_CHUNK_SIZE
from ..catalog import FORMATS as RESULTS_FORMATS
from ..emulator import Emulator
from ..fitting import FLAG_BITS
from ..fitting import METHODS as POINT_METHODS
from ..observe import DOPPLER_INTERP, TAP_OFFSETS, ChipPolynomial, Instrument
from ..options import OPTIONS_BY_METHOD
from ._common import (
    EXIT_OK,
    add_subcommand,
    check_output,
    checked_read,
    flag_name,
    load_pixel_mask,
    parse_number,
    positive_float,
    positive_int,
    require_file,
)

_log = logging.getLogger("payne_lite.cli")

#: Arguments of pl.fit, pl.sample and pl.fit_catalog that ``payne-lite fit`` has no
#: flag for, and why (tests/test_cli.py maps every other one to its flag).
PYTHON_ONLY = {
    "lm_table": "an LM results table in memory: the command runs the LM start itself",
    "return_samples": "posterior samples files: pl.sample(..., return_samples=True) "
    "and pl.save_samples",
    "prior": "pl.sample's: the command's samplers (--method emcee, nuts, mdn-is, "
    "flow-is) use "
    "the box prior",
    "rv_window": "pl.sample's: the command's samplers use the default rv window",
    "return_model": "a catalog's model spectra would not fit in memory: "
    "pl.model_from_results(pl.read_results(RESULTS), emulator) rebuilds any rows'",
    "client": "a Dask client object: --scheduler ADDRESS or --workers N make one",
}


def _fit_default(name: str):
    """The default of argument ``name`` of payne_lite.fit."""
    return inspect.signature(fit).parameters[name].default


def _nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def add_fit(sub) -> None:
    """Declare ``payne-lite fit`` in the subparsers ``sub``."""
    p = add_subcommand(
        sub,
        "fit",
        help="fit a catalog of observed spectra with an emulator",
        description=(
            "Fit labels, radial velocity and (optionally) a continuum to every\n"
            "spectrum of a catalog with an emulator, one chunk of spectra at a time\n"
            "(bounded memory), and write one results table: one row per spectrum with\n"
            "each label, its error, rv, chi2, chi2_red, n_iter, converged and flags\n"
            "(see payne_lite.fit); with --group one row per star, its visits fitted\n"
            "jointly (rv per visit).\n\n"
            "catalogs:\n"
            "  .h5       a payne_lite catalog (payne_lite.write_catalog): flux,\n"
            "            flux_err, optional mask, ids and group (the star of each\n"
            "            spectrum: --group fits each star's visits jointly)\n"
            "  .h5       any other HDF5 file with flux, error (or ivar) and\n"
            "            wavelength datasets, names guessed (or --reader-option\n"
            "            datasets=flux:F,flux_err:E,wavelength:W)\n"
            "  .fits     a FITS binary table of spectra (one row each, array columns\n"
            "            named as above), or one or more APOGEE aspcapStar/apStar-like\n"
            "            files, one spectrum each: flux in HDU 1, errors in HDU 2,\n"
            "            optional pixel bitmask in HDU 3, log10 wavelength from\n"
            "            CRVAL1/CDELT1; ids are the file names; apStar files are\n"
            "            continuum-normalised (--continuum), and with --group their\n"
            "            visits (HDU rows 2+) are fitted jointly, star by file;\n"
            "            apVisit files (one visit each, observed frame) are resampled\n"
            "            onto the apStar grid (barycentric frame), normalised, and with\n"
            "            --group fitted jointly, star by header OBJID\n"
            "  FOLDER    its .h5/.fits files, by name\n"
            "  --reader specutils [--reader-option format=FORMAT]: any files\n"
            "            specutils' loaders read, one spectrum each\n\n"
            "results formats, chosen by the file name:\n"
            "  .fits     FITS-safe column names (TEFF, FE_H, ALPHA_FE, FE_H_ERR, ...)\n"
            "  .ecsv     text, column names as in memory ([Fe/H], [Fe/H]_err, ...)\n"
            "  .h5       HDF5, column names as in memory"
        ),
        epilog=(
            textwrap.fill(
                "flags column (a bitmask): "
                + "; ".join(f"{1 << b} = {text}" for b, text in FLAG_BITS.items()),
                76,
                subsequent_indent="  ",
            )
            + "\n\nfrom Python only (pl.fit, pl.sample, pl.fit_catalog):\n"
            + "\n".join(
                textwrap.fill(
                    f"{k}: {v}", 76, initial_indent="  ", subsequent_indent="    "
                )
                for k, v in PYTHON_ONLY.items()
            )
            + "\n\nexamples:\n"
            "  payne-lite fit catalog.h5 --emulator emu.h5 -o results.fits\n"
            "  payne-lite fit aspcapStar-*.fits --emulator emu.h5 -o results.ecsv \\\n"
            "      --cont-deg 2 --fixed vmacro=5 rv=0\n"
            "  payne-lite fit visits.h5 --emulator emu.h5 -o stars.fits --group\n"
            "  payne-lite fit apStar-*.fits --emulator emu.h5 -o stars.fits --group"
        ),
    )
    p.add_argument(
        "catalog",
        nargs="+",
        metavar="CATALOG",
        help="a catalog file, a folder, or several FITS files (see above)",
    )
    _add_reader_options(p)
    p.add_argument(
        "--emulator",
        required=True,
        metavar="EMULATOR.h5",
        help="a payne_lite emulator file",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="RESULTS.{fits,ecsv,h5}",
        help="results table; its suffix picks the format (see above)",
    )
    _add_method_options(p)
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite RESULTS if it exists (otherwise refused)",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="do not show a progress bar"
    )
    _add_run_options(p)
    _add_instrument_options(p)
    _add_distributed_options(p)


def _add_reader_options(p: argparse.ArgumentParser) -> None:
    """How CATALOG is read: --reader, --reader-option and --continuum."""
    p.add_argument(
        "--reader",
        default=None,
        metavar="NAME",
        help="the catalog reader (default: chosen from the files): "
        "payne-lite, hdf5, fits-table, apogee-visit, apogee-fits, specutils",
    )
    p.add_argument(
        "--reader-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a reader option, repeatable: format=NAME (specutils), hdu=N "
        "(fits-table), bad_bits=N, visits=1 (apogee-fits), visits=0 (apogee-visit: "
        "one combined spectrum per star), frame=observed (apogee-visit), "
        "datasets=ROLE:NAME,... "
        "(hdf5), columns=ROLE:NAME,... (fits-table)",
    )
    p.add_argument(
        "--continuum",
        default=None,
        choices=("auto", "none", "continuum-pixels", "sigma-clipped", "fit"),
        help="continuum of APOGEE FITS files (apogee-fits and apogee-visit "
        "readers): auto (the default) = apStar files unnormalised with a "
        "quadratic continuum per chip fitted with the labels (as 'fit'), apVisit "
        "files through The Cannon's continuum pixels, aspcapStar files as they "
        "are; none; continuum-pixels; sigma-clipped (ASPCAP-style, no pixel "
        "list); fit. The results' meta records it",
    )


def _add_method_options(p: argparse.ArgumentParser) -> None:
    """--method and how it fits: --cont-deg, --rv-range, --chunk-size, --max-iter, --options,
    --fixed, --mdn, --mdn-starts and --refine-continuum."""
    p.add_argument(
        "--refine-continuum",
        type=_nonnegative_int,
        default=0,
        metavar="N",
        help="passes of continuum refinement after the fit (LMOptions."
        "refine_continuum): the flux divided by a polynomial per chip (degree 2; "
        "--options refine_deg=N) fitted to flux / best-fit model over all pixels, "
        "and fitted again; 4 recovers the label precision of perfectly normalised "
        "spectra from apStar files normalised through the continuum pixels "
        "(--continuum continuum-pixels) (default 0)",
    )
    p.add_argument(
        "--method",
        choices=FIT_METHODS,
        default=_fit_default("method"),
        help="lm = batched Levenberg-Marquardt in JAX (fast); curve_fit = "
        "scipy.optimize.curve_fit per spectrum (the reference); emcee, nuts, "
        "mdn-is (needs --mdn), flow-is (needs --mdn with a flow: payne-lite "
        "train-flow) = posterior summaries (percentile columns) with "
        "their default settings (pl.sample for more)",
    )
    p.add_argument(
        "--cont-deg",
        type=_nonnegative_int,
        default=None,
        metavar="N",
        help="degree of a multiplicative Chebyshev continuum fitted with "
        "the labels (0 = spectra are already continuum-normalised; default: what "
        "the reader asks for, a quadratic per chip for apStar files, else 0)",
    )
    p.add_argument(
        "--cont-chips",
        nargs="+",
        default=None,
        metavar="LO:HI",
        help="one continuum polynomial of degree --cont-deg per chip instead of one "
        "over the whole spectrum: wavelength ranges LO:HI [A], or 'apogee' for "
        "APOGEE's three detectors (pl.ChipPolynomial); with --options "
        "continuum=profile the way to fit unnormalised flux",
    )
    p.add_argument(
        "--rv-range",
        nargs=2,
        type=float,
        default=tuple(_fit_default("rv_range")),
        metavar=("LO", "HI"),
        help="rv [km/s] searched and allowed; a narrower range is faster and "
        "avoids aliases",
    )
    p.add_argument(
        "--chunk-size",
        type=positive_int,
        default=DEFAULT_CHUNK_SIZE,
        metavar="N",
        help="spectra read and fitted at a time (memory grows with it)",
    )
    p.add_argument(
        "--max-iter",
        type=positive_int,
        default=None,
        metavar="N",
        help="iteration cap per starting point (curve_fit: function evaluations; "
        f"default {OPTIONS_BY_METHOD['lm']().max_iter}); lm and curve_fit only",
    )
    p.add_argument(
        "--options",
        metavar="JSON",
        help="the method's settings as a JSON object of its options fields, e.g. "
        '\'{"max_iter": 60, "batch_size": 128}\' for lm (payne_lite.LMOptions), '
        "'{\"n_steps\": 4000}' for emcee (EmceeOptions), NUTSOptions, ISOptions",
    )
    p.add_argument(
        "--fixed",
        action="extend",
        nargs="+",
        metavar="NAME=VALUE",
        help="hold a label [physical units] or rv [km/s] fixed, e.g. "
        "--fixed vmacro=5 rv=0 (label names as `payne-lite info "
        "EMULATOR` lists them)",
    )
    p.add_argument(
        "--group",
        action="store_true",
        help="fit the visits of each star jointly, by the catalog's group ids "
        "(write_catalog(..., group=ids); apStar files: each file's visits): one "
        "label vector per star, one rv and "
        "continuum per visit, one results row per star (lm, curve_fit)",
    )
    p.add_argument(
        "--mdn",
        metavar="MDN.h5",
        help="an MDN file (payne-lite train-mdn) trained for EMULATOR: its "
        "means start and its +-3 sigma intervals bound each fit, and "
        "the results get <label>_mdn and <label>_mdn_sigma columns",
    )
    p.add_argument(
        "--mdn-starts",
        type=int,
        default=0,
        metavar="N",
        help="with --mdn: N extra starting points per star drawn from the "
        "MDN's Gaussians (screened by chi2 like the default starts; "
        "default 0)",
    )


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Starts, pixel masks, the error model, random seed and what goes in the
    results: the rest of payne_lite.fit's and fit_catalog's arguments."""
    g = p.add_argument_group("starts, masks and results")
    g.add_argument(
        "--p0",
        default=None,
        metavar="LABELS|FILE.npy",
        help="starting labels [physical units]: one vector for every spectrum "
        "(comma-separated, in the emulator's label order), or a .npy file of "
        "(L,) or (n, L), one row per spectrum",
    )
    g.add_argument(
        "--mask",
        default=None,
        metavar="FILE.npy",
        help="a (P,) bool .npy file, True = ignore that pixel in every spectrum "
        "(joined with the catalog's own mask)",
    )
    g.add_argument(
        "--no-emulator-error",
        action="store_true",
        help="leave the emulator's own error out of the flux errors (see "
        "payne_lite.fit's emulator_error)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="seed of random starts (--mdn-starts) and of the samplers "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--meta",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a key and value recorded in the results' meta, repeatable",
    )


def _run_kwargs(args, n_labels: int) -> dict:
    """fit_catalog's ``p0``, ``mask``, ``seed`` and ``emulator_error`` from the
    arguments (only the ones given)."""
    kw: dict = {}
    if args.p0 is not None:
        if args.p0.lower().endswith(".npy"):
            kw["p0"] = np.load(require_file(args.p0), allow_pickle=False)
        else:
            kw["p0"] = np.array(
                [parse_number(t, "--p0") for t in args.p0.split(",")], float
            )
        if kw["p0"].shape[-1] != n_labels:
            raise ValueError(
                f"--p0: {kw['p0'].shape[-1]} labels given, the emulator has {n_labels}"
            )
    if args.mask is not None:
        kw["mask"] = load_pixel_mask(args.mask)
    if args.seed != 0:
        kw["seed"] = args.seed
    if args.no_emulator_error:
        kw["emulator_error"] = False
    return kw


def _meta_items(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--meta {item!r}: expected KEY=VALUE")
        out[key.strip()] = value
    return out


def _add_instrument_options(p: argparse.ArgumentParser) -> None:
    """The group of payne_lite.Instrument's settings: --air, --resolution or
    --lsf-sigma, --emulator-resolution, --vsini, --vmacro, --doppler."""
    inst = p.add_argument_group(
        "instrument (payne_lite.Instrument; recorded in the results' meta)",
        "How the emulator's spectra are observed. --fixed vsini=V or vmacro=V holds a\n"
        "broadening parameter and turns its kernel on.",
    )
    inst.add_argument(
        "--air",
        action="store_true",
        help="the catalog's wavelengths are in air (converted to vacuum)",
    )
    prof = inst.add_mutually_exclusive_group()
    prof.add_argument(
        "--resolution",
        type=positive_float,
        metavar="R",
        help="instrumental resolving power lambda / FWHM to degrade the model to",
    )
    prof.add_argument(
        "--lsf-sigma",
        type=positive_float,
        metavar="A",
        help="instead of --resolution, the Gaussian LSF sigma [A]",
    )
    inst.add_argument(
        "--emulator-resolution",
        type=positive_float,
        metavar="R",
        help="R of the emulator's spectra (default: its own, else 22,500)",
    )
    inst.add_argument(
        "--vsini",
        action="store_true",
        help="fit the projected rotation velocity vsini [km/s]",
    )
    inst.add_argument(
        "--vmacro",
        action="store_true",
        help="fit a Gaussian macroturbulence vmacro [km/s] (emulators without a "
        "vmacro label)",
    )
    inst.add_argument(
        "--doppler",
        choices=tuple(TAP_OFFSETS),
        default=DOPPLER_INTERP,
        help="the Doppler shift's interpolant (default %(default)s, a windowed "
        "sinc: rv errors stay calibrated at S/N ~300 on sinc-resampled spectra; "
        "cubic6, Keys' six-tap cubic, 2-5%% less fit time)",
    )


def _add_distributed_options(p: argparse.ArgumentParser) -> None:
    """The group of Dask and resumable runs: --scheduler, --workers, --restart,
    --keep-parts."""
    g = p.add_argument_group(
        "distributed and resumable runs",
        "Each chunk's results are kept in RESULTS.parts/ as soon as they exist; the\n"
        "same command run again after a crash or kill fits only the missing chunks\n"
        "(other inputs or options are refused). The folder is deleted once RESULTS\n"
        "is written. --scheduler/--workers need `pip install payne-lite[dask]`.",
    )
    g.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="fit chunks on the workers of a running Dask scheduler, e.g. "
        "tcp://host:8786 (the catalog is read here and sent to them)",
    )
    g.add_argument(
        "--workers",
        type=positive_int,
        metavar="N",
        help="fit chunks on a local Dask cluster of N worker processes",
    )
    g.add_argument(
        "--restart",
        action="store_true",
        help="discard the results of an earlier run in RESULTS.parts/ and "
        "fit every chunk again",
    )
    g.add_argument(
        "--keep-parts",
        action="store_true",
        help="keep RESULTS.parts/ after RESULTS is written",
    )


def _method_options(args):
    """The method's options object: ``--options JSON`` (its fields), with --max-iter,
    --mdn-starts and --refine-continuum as shortcuts of the point fits' fields."""
    cls = OPTIONS_BY_METHOD[args.method]
    fields = {}
    if args.options is not None:
        try:
            fields = json.loads(args.options)
        except json.JSONDecodeError as err:
            raise ValueError(f"--options: not JSON ({err}): {args.options!r}") from None
        if not isinstance(fields, dict):
            raise ValueError(f"--options must be a JSON object, got {args.options!r}")
    names = {f.name for f in dataclasses.fields(cls)} - {"moves", "fallback"}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(
            f"--options: {unknown} are not {cls.__name__} fields (--method "
            f"{args.method} takes {sorted(names)})"
        )
    for flag, name, value in (
        ("--max-iter", "max_iter", args.max_iter),
        ("--mdn-starts", "mdn_starts", args.mdn_starts or None),
        ("--refine-continuum", "refine_continuum", args.refine_continuum or None),
    ):
        if value is None:
            continue
        if name not in names:
            raise ValueError(
                f"{flag} is an lm / curve_fit option, not for {args.method}"
            )
        fields[name] = value
    try:
        return cls(**fields)
    except TypeError as err:  # e.g. a list where a number goes
        raise ValueError(f"--options: {err}") from None


def _parse_fixed(items: Sequence[str] | None) -> dict[str, float]:
    fixed: dict[str, float] = {}
    for item in items or ():
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(
                f"--fixed {item!r}: expected NAME=VALUE, e.g. vmacro=5 "
                "(give CATALOG before --fixed)"
            )
        if name in fixed:
            raise ValueError(f"--fixed: {name} is given more than once")
        fixed[name] = parse_number(text.strip(), f"--fixed {item!r}")
    return fixed


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 1.0 else f"{seconds:.2f} s"


def _models(args, emu_path):
    """``(emulator, mdn or None, instrument, options)`` from the arguments."""
    emu = checked_read(Emulator.load, emu_path)
    mdn = None
    if args.mdn_starts and args.mdn is None:
        raise ValueError("--mdn-starts needs --mdn")
    if args.mdn_starts < 0:
        raise ValueError(f"--mdn-starts must be >= 0, got {args.mdn_starts}")
    instrument = Instrument(
        air=args.air,
        resolution=args.resolution,
        lsf_sigma=args.lsf_sigma,
        emulator_resolution=args.emulator_resolution,
        vsini=args.vsini,
        vmacro=args.vmacro,
        doppler=args.doppler,
    )
    options = _method_options(args)
    if args.mdn is not None:
        from ..mdn import MDN

        mdn_path = require_file(args.mdn)
        mdn = checked_read(MDN.load, mdn_path, emulator=emu)
    return emu, mdn, instrument, options


def _reader_options(reader: str | None, options: list[str]) -> dict:
    """``--reader`` and ``--reader-option KEY=VALUE`` as open_catalog's keywords:
    integers where they parse, ``ROLE:NAME,...`` as a dict."""
    kw: dict = {} if reader is None else {"reader": reader}
    for item in options:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--reader-option {item!r}: expected KEY=VALUE")
        if key in ("datasets", "columns"):
            pairs = [v.partition(":") for v in value.split(",") if v.strip()]
            if not pairs or any(not sep2 for _, sep2, _ in pairs):
                raise ValueError(
                    f"--reader-option {item!r}: expected {key}=ROLE:NAME,ROLE:NAME"
                )
            kw[key] = {r.strip(): n.strip() for r, _, n in pairs}
        else:
            try:
                kw[key] = int(value, 0)
            except ValueError:
                kw[key] = value
    return kw


#: What ``_describe`` calls the files of a reader, and the readers it does not name.
_FILE_KINDS = {"apogee-fits": "FITS ", "apogee-visit": "apVisit "}
_SAID_BY_KIND = ("payne-lite", "apogee-fits", "apogee-visit")


def _describe(cat, cat_paths, n_stars: int | None = None) -> str:
    """ "6 spectra (3 stars, joint visits) x 478 pixels from catalog.h5"."""
    n = len(cat)
    return (
        f"{n} spectr{'um' if n == 1 else 'a'} "
        + (
            f"({n_stars} star{'' if n_stars == 1 else 's'}, joint visits) "
            if n_stars is not None
            else ""
        )
        + f"x {cat.n_pix} pixels "
        + ("(one wavelength grid each) " if cat.per_row_wavelength else "")
        + "from "
        + (
            str(cat_paths[0])
            if len(cat_paths) == 1
            else f"{len(cat_paths)} {_FILE_KINDS.get(cat.name, '')}files"
        )
        # the readers chosen by a file's kind go without saying
        + ("" if cat.name in _SAID_BY_KIND else f" ({cat.name} reader)")
    )


def run_fit(args) -> int:
    from ..catalog import connect, fit_catalog, open_catalog, require

    t0 = time.perf_counter()
    emu_path = require_file(args.emulator)
    cat_paths = [Path(c) if Path(c).is_dir() else require_file(c) for c in args.catalog]
    reader_kw = _reader_options(args.reader, args.reader_option)
    out = Path(args.output)
    if out.suffix.lower() not in RESULTS_FORMATS:
        raise ValueError(
            f"{out}: unknown results file suffix {out.suffix!r}; expected "
            f"one of {', '.join(sorted(RESULTS_FORMATS))}"
        )
    out = check_output(out, inputs=[emu_path, *cat_paths])
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; use --force to overwrite it")
    fixed = _parse_fixed(args.fixed)
    emu, mdn, instrument, options = _models(args, emu_path)
    if args.continuum is not None:
        reader_kw["continuum"] = args.continuum
    source = cat_paths[0] if len(cat_paths) == 1 else cat_paths
    cat = checked_read(open_catalog, source, **reader_kw)
    if args.group:  # apStar files: their visits, each file the star of its own
        grouped = cat.grouped()
        if grouped is not cat:
            cat.close()
            cat = grouped
    with cat:
        if args.group and not cat.has_group:
            raise ValueError(
                f"--group: {source if len(cat_paths) == 1 else cat.source} holds no "
                "group ids (the star of each spectrum: write the catalog with "
                "payne_lite.write_catalog(..., group=ids))"
            )
        _log.info("fitting %s with %r", _describe(cat, cat_paths), emu)
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.scheduler is not None or args.workers is not None:
            try:
                require()
            except ImportError as err:
                raise ValueError(f"--scheduler/--workers: {err}") from err
        with connect(args.scheduler, args.workers) as client:
            table = fit_catalog(
                cat,
                out,
                emu,
                mdn=mdn,
                method=args.method,
                chunk_size=args.chunk_size,
                group=True if args.group else None,
                overwrite=args.force,
                progress=not args.no_progress,
                client=client,
                restart=args.restart,
                keep_parts=args.keep_parts,
                **_continuum(args),
                rv_range=tuple(args.rv_range),
                fixed=fixed or None,
                instrument=instrument,
                options=options,
                **_run_kwargs(args, len(emu.label_names)),
                meta={
                    **_meta_items(args.meta),
                    "command": args.command_line,
                    "emulator_file": str(emu_path),
                    **({"mdn_file": str(args.mdn)} if mdn is not None else {}),
                },
            )
        what = _describe(cat, cat_paths, len(table) if args.group else None)
    _print_summary(args, table, what, mdn, time.perf_counter() - t0, out)
    return EXIT_OK


def _continuum(args) -> dict:
    """``{"cont_deg": ...}`` of ``pl.fit`` from --cont-deg and --cont-chips; {}
    without either (the reader's choice, ``Reader.fit_defaults``, else none)."""
    if args.cont_deg is None and not args.cont_chips:
        return {}
    deg = 0 if args.cont_deg is None else args.cont_deg
    return {"cont_deg": _chips(args.cont_chips, deg) if args.cont_chips else deg}


def _chips(texts, deg: int) -> ChipPolynomial:
    """The ChipPolynomial of --cont-chips."""
    if [c.lower() for c in texts] == ["apogee"]:
        return ChipPolynomial.apogee(deg)
    chips = []
    for text in texts:
        try:
            lo, hi = (float(v) for v in text.split(":"))
        except ValueError as err:
            raise ValueError(
                f"--cont-chips: {text!r} is not LO:HI (a wavelength range [A]) or "
                "'apogee'"
            ) from err
        chips.append((lo, hi))
    return ChipPolynomial(deg, tuple(chips))


def _continuum_words(meta) -> str:
    """How the continuum was treated, from a results table's meta: the continuum
    fitted (``cont_deg N``, ``per chip``) and what the reader did
    (``meta["continuum"]``: normalised, or left unnormalised for the fit)."""
    cont = ChipPolynomial.from_meta(meta)
    words = f"cont_deg {0 if cont is None else cont.deg}" + (
        " per chip" if cont is not None and cont.chips is not None else ""
    )
    norm = meta.get("continuum")
    if not isinstance(norm, dict):
        return words
    kinds = [k for k in norm if isinstance(norm[k], dict)]
    methods = (
        {k: norm[k]["method"] for k in kinds}
        if kinds
        else {"/".join(norm.get("file_kinds", [])): norm["method"]}
    )
    said = [
        f"{k} unnormalised".strip() if m == "fit" else f"{k} normalised: {m}".strip()
        for k, m in methods.items()
        if m != "none"
    ]
    return ", ".join([words, *said])


def _print_summary(args, table, what: str, mdn, seconds: float, out: Path) -> None:
    """The lines ``payne-lite fit`` prints once the results are written."""
    n = int(table.meta.get("n_spec", len(table)))
    flags = np.asarray(table["flags"])
    n_flagged = int(np.count_nonzero(flags))
    per_bit = [
        f"{int(np.count_nonzero(flags & (1 << b)))} {flag_name(text)}"
        for b, text in FLAG_BITS.items()
        if np.any(flags & (1 << b))
    ]
    chi2_red = np.asarray(
        table["chi2_red"] if "chi2_red" in table.colnames else [np.nan], dtype=float
    )
    median = (
        f"; median chi2_red {np.nanmedian(chi2_red):.3g}"
        if np.isfinite(chi2_red).any()
        else ""
    )
    sampler = args.method not in POINT_METHODS
    print(
        f"fitted {what} ({args.method}, {_continuum_words(table.meta)}"
        + (
            f", continuum refined {args.refine_continuum}x"
            if getattr(args, "refine_continuum", 0)
            else ""
        )
        + (", MDN starts and bounds" if mdn is not None and not sampler else "")
        + (", MDN proposal" if mdn is not None and sampler else "")
        + ")"
    )
    if mdn is not None and "mdn_refit" in table.colnames:
        print(
            f"  {int(np.count_nonzero(table['mdn_refit']))} refitted without the "
            "MDN bounds"
        )
    print(
        f"  {int(np.count_nonzero(table['converged']))} converged, {n_flagged} "
        f"flagged" + (f" ({', '.join(per_bit)})" if per_bit else "") + median
    )
    print(
        f"  {_fmt_seconds(seconds / n)} per spectrum ({seconds:.1f} s in all, "
        "compilation included)"
    )
    print(f"wrote {out}")
