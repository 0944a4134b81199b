"""The ``payne-lite`` command line: make grids, train emulators, predict, fit catalogs.

Usage::

    payne-lite grid -o grid.h5 --n-spec 3000
    payne-lite train grid.h5 -o emulator.h5 --hidden 10
    payne-lite predict emulator.h5 --labels 5000,4.5,0,0.1,5 -o flux.npy
    payne-lite info emulator.h5
    payne-lite fit catalog.h5 --emulator emulator.h5 -o results.fits
    payne-lite bench --quick

Every subcommand is a pair of functions: ``_add_<name>(subparsers)`` declares the
options and ``_run_<name>(args) -> int`` does the work; :data:`_COMMANDS` lists them.
Bad input (missing or corrupt files, invalid values) ends with one line
``payne-lite: error: <message>`` on stderr and exit code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import inspect
import json
import logging
import math
import os
import re
import shlex
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import h5py
import numpy as np

from .. import _h5
from .._api import METHODS as FIT_METHODS
from .._api import fit
from .._validate import existing_file
from .._version import __version__
from ..catalog import CATALOG_FORMAT, DEFAULT_CHUNK_SIZE
from ..catalog import FORMATS as RESULTS_FORMATS
from ..constants import APOGEE_DLOGLAM, APOGEE_R, C_KMS
from ..emulator import (
    ACTIVATIONS,
    EMULATOR_FORMAT,
    Emulator,
    TrainConfig,
    train_emulator,
)
from ..errors import FileFormatError, TrainingDivergedError, WavelengthGridWarning
from ..fitting import FLAG_BITS
from ..fitting import METHODS as POINT_METHODS
from ..grid import GRID_FORMAT, SpectralGrid, synth
from ..mdn import MDN_FORMAT
from ..observe import Instrument
from ..options import OPTIONS_BY_METHOD

PROG = "payne-lite"
EXIT_OK = 0
EXIT_FAILED = 1  # a run that failed on valid input (training diverged)
EXIT_USAGE = 2  # bad input: same code as argparse's own usage errors
EXIT_INTERRUPTED = 130

#: HDF5 layout written by ``payne-lite predict -o FILE.h5``.
SPECTRA_FORMAT = "payne_lite.PredictedSpectra"
SPECTRA_VERSION = 1

_PREDICT_SUFFIXES = (".npy", ".h5", ".hdf5", ".csv")
_log = logging.getLogger("payne_lite.cli")  # also when run as __main__


class _Formatter(
    argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter
):
    """Show defaults and keep the hand-made line breaks of descriptions and epilogs.

    On/off flags and options without a default get no "(default: ...)" suffix.
    """

    def _get_help_string(self, action):
        if any(action.default is d for d in (None, False, argparse.SUPPRESS)) or (
            isinstance(action, argparse._CountAction)
        ):
            return action.help
        return super()._get_help_string(action)


class _ArgumentParser(argparse.ArgumentParser):
    """Usage errors as one line that points to the command's --help."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _parser(
    sub, name: str, *, help: str, description: str, epilog: str = ""
) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=_Formatter,
        parents=[_common_options(sub=True)],
    )


def _common_options(*, sub: bool) -> argparse.ArgumentParser:
    """-v and --debug, accepted before and after the subcommand name."""
    p = _ArgumentParser(add_help=False)
    # In a subcommand, SUPPRESS keeps an absent flag from resetting the top-level value.
    sup = argparse.SUPPRESS
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=sup if sub else 0,
        help="log progress messages (INFO) to stderr; -vv for DEBUG",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        default=sup if sub else False,
        help="on error, show the full Python traceback instead of one line",
    )
    return p


# ======================================================================================
# Small helpers
# ======================================================================================
_require_file = existing_file


def _check_output(path: str | os.PathLike, *, inputs: Sequence[Path] = ()) -> Path:
    """Refuse, before any long work, an output that cannot be written or would
    overwrite an input file."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{p}: is a directory; give an output file name")
    for src in inputs:
        if p.exists() and p.resolve() == src.resolve():
            raise ValueError(
                f"{p}: output would overwrite the input file; "
                "choose another output name"
            )
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the missing folders will be created
    try:  # a real probe: os.access is wrong for root and on some file systems
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise OSError(
            err.errno, f"cannot write into {parent}: {err.strerror}", str(p)
        ) from err
    return p


def _read(loader: Callable, path: Path, **kw):
    """``loader(path, **kw)``, with h5py's reports of corrupt metadata (a KeyError or
    RuntimeError rather than an OSError) turned into a FileFormatError."""
    try:
        return loader(path, **kw)
    except (KeyError, RuntimeError) as err:
        detail = err.args[0] if err.args else type(err).__name__
        raise FileFormatError(f"{path}: corrupt file ({detail})") from err


def _human_size(n_bytes: int) -> str:
    size = float(n_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000.0 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000.0
    raise AssertionError("unreachable")


def _fmt_box(names, units, lo, hi) -> str:
    """``Teff [4000, 7000] K, logg [1, 5] dex, ...``"""
    parts = []
    for n, u, a, b in zip(names, units, lo, hi, strict=True):
        parts.append(f"{n} [{a:.4g}, {b:.4g}]" + (f" {u}" if u else ""))
    return ", ".join(parts)


def _fmt_wavelength(wave: np.ndarray) -> str:
    """Range, pixel count and sampling of a wavelength grid [Angstrom]."""
    text = f"{wave[0]:.2f}-{wave[-1]:.2f} A, {wave.size} pixels"
    dlog = np.diff(np.log10(wave))
    if np.allclose(dlog, dlog[0], rtol=1e-4, atol=0.0):
        kms = (10.0 ** dlog[0] - 1.0) * C_KMS
        text += f" (log-uniform, dlog10(lambda) = {dlog[0]:.3g}, {kms:.3g} km/s/pixel)"
    else:
        step = np.diff(wave)
        text += f" (step {step.min():.3g}-{step.max():.3g} A)"
    return text


def _fmt_value(value, width: int = 70) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


# ======================================================================================
# grid
# ======================================================================================
def _add_grid(sub) -> None:
    lo, hi = synth.DEFAULT_BOX
    box = "\n".join(
        f"  {n:<11} {a:>7g} .. {b:<7g} {u}"
        for n, u, a, b in zip(
            synth.DEFAULT_LABEL_NAMES, synth.DEFAULT_LABEL_UNITS, lo, hi, strict=True
        )
    )
    p = _parser(
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
        type=_positive_int,
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
        type=_positive_int,
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
        type=_positive_int,
        default=256,
        metavar="N",
        help="spectra per compiled batch (peak memory about 3 MB per "
        "spectrum with the default wavelengths and line list)",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="do not show a progress bar"
    )


def _run_grid(args) -> int:
    t0 = time.perf_counter()
    out = _check_output(args.output)
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
        f"{_human_size(out.stat().st_size)}; {time.perf_counter() - t0:.1f} s"
    )
    return EXIT_OK


# ======================================================================================
# train
# ======================================================================================
_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _cfg_default(name: str):
    default = _CONFIG_FIELDS[name].default
    return ",".join(map(str, default)) if isinstance(default, tuple) else default


def _parse_hidden(text: str) -> int | tuple[int, ...]:
    try:
        widths = tuple(int(t) for t in text.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a width like 10 or widths like 10,10, got {text!r}"
        ) from None
    return widths[0] if len(widths) == 1 else widths


def _add_train(sub) -> None:
    p = _parser(
        sub,
        "train",
        help="train a per-pixel emulator on a grid",
        description=(
            "Train a per-pixel neural-network emulator (The Payne, Ting et al. 2019)\n"
            "on a grid of spectra and save it as one HDF5 file. Settings come from\n"
            "the TrainConfig defaults, then --config, then the flags given here.\n"
            "A part of the grid (--valid-fraction) is held out: it decides early\n"
            "stopping and measures the error printed at the end."
        ),
        epilog=(
            "config file: a JSON object whose keys are TrainConfig fields:\n"
            + textwrap.fill(
                ", ".join(_CONFIG_FIELDS),
                76,
                initial_indent="  ",
                subsequent_indent="  ",
            )
            + "\n"
            'e.g. {"hidden": [10, 10], "max_iter": 300, "min_improvement": 1e-4}\n\n'
            "examples:\n  payne-lite train grid.h5 -o emulator.h5\n"
            "  payne-lite train grid.h5 -o emu.h5 --hidden 10,10 --max-iter 300\n"
            "  payne-lite train payne_training.npz -o emu.h5 "
            "--label-names Teff,logg,[Fe/H]"
        ),
    )
    p.add_argument(
        "grid",
        metavar="GRID",
        help="training grid: a payne_lite .h5 grid, or a training .npz in "
        "The Payne's layout (labels, spectra, wavelength)",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="EMULATOR.h5",
        help="output HDF5 file (payne_lite.Emulator format)",
    )
    p.add_argument(
        "--config",
        metavar="CONFIG.json",
        help="JSON file of TrainConfig settings (see below); flags given "
        "on the command line override it",
    )
    p.add_argument(
        "--label-names",
        metavar="NAMES",
        help="comma-separated label names for a .npz grid, in its column "
        "order (default label_0, label_1, ...); .h5 grids carry theirs",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="do not show a progress bar"
    )
    ck = p.add_argument_group("checkpoints (resume a killed or requeued run)")
    ck.add_argument(
        "--checkpoint",
        metavar="CKPT.h5",
        help="write the training state to this file every "
        "--checkpoint-every iterations and at the end (atomically)",
    )
    ck.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=10,
        metavar="N",
        help="iterations (LM) or epochs (Adam) between checkpoints",
    )
    ck.add_argument(
        "--resume",
        action="store_true",
        help="continue from --checkpoint if it exists (same grid and "
        "settings; --max-iter may grow); without --resume an "
        "existing checkpoint is refused",
    )
    cfg = p.add_argument_group(
        "training settings (TrainConfig fields; defaults shown are TrainConfig's)"
    )
    sup = argparse.SUPPRESS  # absent flags do not override --config

    def add(flag, name, help, **kw):
        cfg.add_argument(
            flag,
            dest=name,
            default=sup,
            help=f"{help} (default: {_cfg_default(name)})",
            **kw,
        )

    add(
        "--hidden",
        "hidden",
        "hidden-layer width(s) of each pixel's network: 10 "
        "for one layer, 10,10 for two",
        type=_parse_hidden,
        metavar="H[,H...]",
    )
    add(
        "--activation",
        "activation",
        "activation of the hidden units",
        choices=sorted(ACTIVATIONS),
    )
    add(
        "--optimizer",
        "optimizer",
        "lm = Levenberg-Marquardt on all spectra "
        "(second order, few iterations), adam = optax Adam on mini-batches",
        choices=("lm", "adam"),
    )
    add(
        "--max-iter",
        "max_iter",
        "maximum LM iterations, or Adam epochs",
        type=_positive_int,
        metavar="N",
    )
    add(
        "--valid-fraction",
        "valid_fraction",
        "fraction of the grid held out for validation and early stopping, in (0, 1)",
        type=float,
        metavar="F",
    )
    add(
        "--patience",
        "patience",
        "iterations without improvement of a pixel's "
        "validation loss before it stops (or restarts)",
        type=_positive_int,
        metavar="N",
    )
    add(
        "--seed",
        "seed",
        "seed of the split, the initialisation and the restarts",
        type=int,
    )
    add(
        "--pixel-batch",
        "pixel_batch",
        "pixels per LM step; memory grows as n_spec x pixel_batch x n_params x 4 bytes",
        type=_positive_int,
        metavar="N",
    )
    add(
        "--learning-rate",
        "learning_rate",
        "Adam step size (adam only)",
        type=float,
        metavar="LR",
    )
    add(
        "--batch-size",
        "batch_size",
        "Adam mini-batch size in spectra (adam only)",
        type=_positive_int,
        metavar="N",
    )


def _config_from_json(path: Path) -> dict:
    """Settings of a JSON config file, type-checked against TrainConfig's fields."""
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a text (JSON) file") from err
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from err
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a JSON object of TrainConfig settings, got "
            f"a {type(data).__name__}"
        )
    unknown = sorted(set(data) - set(_CONFIG_FIELDS))
    if unknown:
        raise ValueError(
            f"{path}: unknown TrainConfig key(s) {unknown}; valid keys: "
            f"{', '.join(_CONFIG_FIELDS)}"
        )
    for key, value in data.items():
        default = _CONFIG_FIELDS[key].default
        if key == "hidden":
            ok = (isinstance(value, int) and not isinstance(value, bool)) or (
                isinstance(value, list)
                and value
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            )
            want = "an integer or a list of integers"
        elif isinstance(default, bool) or default is None:
            ok, want = True, ""
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
            want = "an integer"
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            want = "a number"
        elif isinstance(default, str):
            ok, want = isinstance(value, str), "a string"
        else:
            ok, want = True, ""
        if not ok:
            raise ValueError(f"{path}: {key} must be {want}, got {json.dumps(value)}")
    return data


def _load_grid(path: Path, label_names: str | None) -> SpectralGrid:
    if path.suffix.lower() == ".npz":
        names = None
        if label_names is not None:
            names = [s.strip() for s in label_names.split(",")]
        return _read(SpectralGrid.from_payne_npz, path, label_names=names)
    if label_names is not None:
        raise ValueError(
            "--label-names applies to .npz grids only; an .h5 grid "
            "carries its own label names"
        )
    return _read(SpectralGrid.load, path)


def _run_train(args) -> int:
    grid_path = _require_file(args.grid)
    out = _check_output(args.output, inputs=[grid_path])
    settings = {}
    if args.config is not None:
        settings.update(_config_from_json(_require_file(args.config)))
    settings.update({k: getattr(args, k) for k in _CONFIG_FIELDS if hasattr(args, k)})
    config = TrainConfig(**settings)  # validates: ValueError names the bad setting
    ckpt = None
    if args.checkpoint is not None:
        ckpt = _check_output(args.checkpoint, inputs=[grid_path])
        if ckpt.resolve() == out.resolve():
            raise ValueError(
                f"--checkpoint {ckpt} is the output file; give another name"
            )
        if ckpt.exists() and not args.resume:
            raise FileExistsError(
                f"checkpoint {ckpt} exists; add --resume to "
                "continue from it, or remove it"
            )
    elif args.resume:
        raise ValueError("--resume needs --checkpoint CKPT.h5")
    grid = _load_grid(grid_path, args.label_names)
    _log.info("training on %r with %s", grid, config)
    emu = train_emulator(
        grid,
        config=config,
        progress=not args.no_progress,
        checkpoint=ckpt,
        resume=args.resume,
        checkpoint_every=args.checkpoint_every,
    )
    emu = dataclasses.replace(
        emu,
        meta={**emu.meta, "command": args.command_line, "grid_file": str(grid_path)},
    )
    emu.save(out)
    m = emu.meta
    n_iter = len(emu.history.get("valid_rms", ()))
    print(
        f"trained {emu.n_pix} pixels ({config.optimizer}, hidden "
        f"{','.join(map(str, emu.hidden))}, {config.activation}, {n_iter} "
        f"iterations) on {m['n_train']} spectra, {m['n_valid']} held out: "
        f"held-out median |error| {m['valid_median_abs_error']:.2e}, 99th "
        f"percentile pixel {m['valid_p99_pixel_abs_error']:.2e}; "
        f"{m['train_seconds']:.1f} s; wrote {out}"
    )
    return EXIT_OK


# ======================================================================================
# predict
# ======================================================================================
def _add_predict(sub) -> None:
    p = _parser(
        sub,
        "predict",
        help="predict spectra for given labels with an emulator",
        description=(
            "Evaluate an emulator at physical labels and write wavelength and flux.\n"
            "Labels must lie inside the emulator's training box unless\n"
            "--allow-outside is given (extrapolation is unreliable).\n\n"
            "output formats, chosen by the file name:\n"
            "  .npy      one array (1 + n, n_pix): row 0 = wavelength [Angstrom],\n"
            "            rows 1..n = flux of each label row\n"
            "  .h5/.hdf5 datasets wavelength (n_pix,), flux (n, n_pix), labels (n, L)\n"
            "            with label names and units as attributes\n"
            "  .csv      one row per pixel, columns wavelength,flux_0,flux_1,...\n"
            "            where flux_i belongs to label row i"
        ),
        epilog=(
            "labels files:\n"
            "  .npy: an (n, L) or (L,) array, or a structured array with named fields\n"
            "  .csv or text (comma- or whitespace-separated, '#' starts a comment):\n"
            "        one star per row; an optional first row of label names (in any\n"
            "        order) is matched to the emulator's names\n\n"
            "examples:\n"
            "  payne-lite predict emu.h5 --labels 5000,4.5,0,0.1,5 -o flux.npy\n"
            "  payne-lite predict emu.h5 --labels 5000,4.5,0,0.1,5 "
            "--labels 6000,4,-1,0.2,8 \\\n      -o flux.csv\n"
            "  payne-lite predict emu.h5 --labels-file stars.csv -o flux.h5"
        ),
    )
    p.add_argument("emulator", metavar="EMULATOR.h5", help="a payne_lite emulator file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--labels",
        action="append",
        metavar="VALUES",
        help="one star's labels, comma-separated, in physical units and "
        "in the emulator's order (the `info` command lists it); "
        "repeat the option for more stars",
    )
    src.add_argument(
        "--labels-file",
        metavar="LABELS.{csv,txt,npy}",
        help="labels of many stars, one per row (see below)",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="FLUX.{npy,h5,csv}",
        help="output file; its suffix picks the format (see above)",
    )
    p.add_argument(
        "--allow-outside",
        action="store_true",
        help="evaluate labels outside the training box (extrapolate) "
        "instead of refusing them",
    )


_NUMBER_LIST = re.compile(r"^-\.?\d")


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--labels -1,2`` -> ``--labels=-1,2`` (argparse takes ``-1,2`` for a flag)."""
    out, i = [], 0
    while i < len(argv):
        if (
            argv[i] == "--labels"
            and i + 1 < len(argv)
            and _NUMBER_LIST.match(argv[i + 1])
        ):
            out.append(f"--labels={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _parse_number(token: str, where: str) -> float:
    try:
        return float(token)
    except ValueError:
        raise ValueError(f"{where}: {token!r} is not a number") from None


def _labels_from_flags(values: list[str], names: tuple[str, ...]) -> np.ndarray:
    rows = []
    for k, text in enumerate(values):
        tokens = [t for t in re.split(r"[,\s]+", text.strip()) if t]
        where = (
            f"--labels {text!r}"
            if len(values) == 1
            else (f"--labels #{k + 1} {text!r}")
        )
        if len(tokens) != len(names):
            raise ValueError(
                f"{where} has {len(tokens)} value(s); the emulator takes "
                f"{len(names)}: {', '.join(names)}"
            )
        rows.append([_parse_number(t, where) for t in tokens])
    return np.array(rows, dtype=np.float64)


def _order_columns(
    header: Sequence[str], names: tuple[str, ...], where: str
) -> np.ndarray:
    """Column index of each emulator label in a file whose columns are ``header``."""
    header = [h.strip() for h in header]
    unknown = [h for h in header if h not in names]
    if unknown:
        raise ValueError(
            f"{where}: unknown label name(s) {unknown}; the emulator's "
            f"labels are {', '.join(names)}"
        )
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise ValueError(f"{where}: label name(s) {dup} appear more than once")
    missing = [n for n in names if n not in header]
    if missing:
        raise ValueError(
            f"{where}: missing label(s) {missing}; the emulator needs "
            f"{', '.join(names)}"
        )
    return np.array([header.index(n) for n in names])


def _labels_from_npy(path: Path, names: tuple[str, ...]) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise FileFormatError(f"{path}: not a readable .npy file: {err}") from err
    if not isinstance(arr, np.ndarray):
        raise FileFormatError(
            f"{path}: holds several arrays (.npz?); expected one array of labels"
        )
    if arr.dtype.names:  # structured array: columns by name
        order = _order_columns(arr.dtype.names, names, str(path))
        cols = [np.asarray(arr[arr.dtype.names[i]], dtype=np.float64) for i in order]
        return np.stack(cols, axis=-1).reshape(-1, len(names))
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != len(names):
        raise ValueError(
            f"{path}: labels array {arr.shape} must be ({len(names)},) or "
            f"(n, {len(names)}) for labels {', '.join(names)}"
        )
    try:
        return np.asarray(arr, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{path}: labels array of dtype {arr.dtype} is not numeric"
        ) from err


def _labels_from_text(path: Path, names: tuple[str, ...]) -> np.ndarray:
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise FileFormatError(
            f"{path}: not a text file (use .npy for binary labels)"
        ) from err
    lines = [
        (i + 1, line)
        for i, line in enumerate(text.splitlines())
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        raise ValueError(f"{path}: no label rows found")
    comma = "," in lines[0][1]

    def split(line: str) -> list[str]:
        if comma:
            return [t.strip() for t in next(csv.reader([line]))]
        return line.split()

    rows = [(n, split(line)) for n, line in lines]
    order = np.arange(len(names))
    first = rows[0][1]
    try:
        [float(t) for t in first]
    except ValueError:  # a header row of label names
        order = _order_columns(first, names, f"{path} header (line {rows[0][0]})")
        rows = rows[1:]
        if not rows:
            raise ValueError(f"{path}: a header row but no label rows") from None
    n_col = len(first)
    if n_col != len(names):
        raise ValueError(
            f"{path} line {rows[0][0]}: {n_col} column(s); the emulator "
            f"takes {len(names)} labels: {', '.join(names)}"
        )
    out = np.empty((len(rows), n_col))
    for k, (n, tokens) in enumerate(rows):
        if len(tokens) != n_col:
            raise ValueError(
                f"{path} line {n}: {len(tokens)} column(s), expected {n_col}"
            )
        out[k] = [_parse_number(t, f"{path} line {n}") for t in tokens]
    return out[:, order]


def _labels_from_file(path: Path, names: tuple[str, ...]) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        return _labels_from_npy(path, names)
    return _labels_from_text(path, names)


def _check_values(emu: Emulator, labels: np.ndarray, *, allow_outside: bool) -> None:
    """Labels (n, L) must be finite and, unless ``allow_outside``, inside the box."""
    bad = ~np.isfinite(labels)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(
            f"label row {i}: {emu.label_names[j]} = {labels[i, j]} is not "
            f"a finite number ({int(bad.sum())} such value(s))"
        )
    out = (labels < emu.label_lo) | (labels > emu.label_hi)
    if out.any() and allow_outside:
        _log.warning(
            "%d of %d label row(s) lie outside the training box: their "
            "spectra are extrapolated",
            int(out.any(axis=1).sum()),
            labels.shape[0],
        )
    elif out.any():
        i, j = (int(v) for v in np.argwhere(out)[0])
        unit = f" {emu.label_units[j]}" if emu.label_units[j] else ""
        raise ValueError(
            f"label row {i}: {emu.label_names[j]} = {labels[i, j]:g} is outside the "
            f"emulator's training box [{emu.label_lo[j]:g}, {emu.label_hi[j]:g}]{unit} "
            f"({int(out.any(axis=1).sum())} of {labels.shape[0]} row(s) outside); "
            "pass --allow-outside to extrapolate"
        )


def _write_spectra(
    path: Path, emu: Emulator, emu_path: Path, labels: np.ndarray, flux: np.ndarray
) -> None:
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npy":
        np.save(path, np.vstack([emu.wavelength[None, :], flux]))
    elif suffix in (".h5", ".hdf5"):
        with _h5.atomic_h5_writer(path, SPECTRA_FORMAT, SPECTRA_VERSION) as f:
            _h5.write_dataset(f, "wavelength", emu.wavelength, compress=False)
            _h5.write_dataset(f, "labels", labels, compress=False)
            _h5.write_dataset(f, "flux", flux)
            _h5.set_json_attr(f, "label_names", list(emu.label_names))
            _h5.set_json_attr(f, "label_units", list(emu.label_units))
            _h5.set_json_attr(
                f,
                "meta",
                {"emulator": str(emu_path), "generator": "payne-lite predict"},
            )
    elif suffix == ".csv":
        # Plain CSV (no comment lines) so that every reader takes it as it is.
        header = ",".join(["wavelength"] + [f"flux_{i}" for i in range(len(flux))])
        np.savetxt(
            path,
            np.column_stack([emu.wavelength, flux.T]),
            delimiter=",",
            fmt=["%.10g"] + ["%.8g"] * flux.shape[0],
            header=header,
            comments="",
        )
    else:  # checked before the work; kept as a guard
        raise ValueError(f"{path}: unknown output format")


def _run_predict(args) -> int:
    emu_path = _require_file(args.emulator)
    inputs = [emu_path]
    if args.labels_file is not None:
        inputs.append(_require_file(args.labels_file))
    out = _check_output(args.output, inputs=inputs)
    if out.suffix.lower() not in _PREDICT_SUFFIXES:
        raise ValueError(
            f"{out}: unknown output format {out.suffix!r}; use one of "
            f"{', '.join(_PREDICT_SUFFIXES)}"
        )
    emu = _read(Emulator.load, emu_path)
    if args.labels is not None:
        labels = _labels_from_flags(args.labels, emu.label_names)
    else:
        labels = _labels_from_file(inputs[1], emu.label_names)
    _check_values(emu, labels, allow_outside=args.allow_outside)
    flux = emu.predict(labels, allow_outside=True)
    _write_spectra(out, emu, emu_path, labels, flux)
    n = labels.shape[0]
    print(
        f"wrote {out}: {n} spectr{'um' if n == 1 else 'a'} x {emu.n_pix} pixels, "
        f"{emu.wavelength[0]:.1f}-{emu.wavelength[-1]:.1f} A, flux "
        f"{flux.min():.3g}..{flux.max():.3g}"
    )
    return EXIT_OK


# ======================================================================================
# info
# ======================================================================================
def _add_info(sub) -> None:
    p = _parser(
        sub,
        "info",
        help="describe a grid, emulator, MDN, catalog, spectra or results file",
        description=(
            "Print what a payne_lite file holds: its kind and format\n"
            "version, labels and their box, the wavelength grid, and for\n"
            "emulators the network and a summary of its training."
        ),
        epilog="example:\n  payne-lite info emulator.h5",
    )
    p.add_argument(
        "file",
        metavar="FILE",
        help="a payne_lite .h5 file (grid, emulator, MDN, catalog or "
        "predicted spectra), a results table (.fits, .ecsv, .h5 from "
        "payne-lite fit), or a training .npz in The Payne's layout",
    )


def _file_format(path: Path) -> tuple[str, int]:
    try:
        with h5py.File(path, "r") as f:
            fmt = f.attrs.get("format")
            ver = f.attrs.get("format_version")
    except OSError as err:
        raise FileFormatError(
            f"{path}: not a readable HDF5 file (corrupt or truncated?): {err}"
        ) from err
    if isinstance(fmt, bytes):
        fmt = fmt.decode()
    known = (GRID_FORMAT, EMULATOR_FORMAT, SPECTRA_FORMAT, CATALOG_FORMAT, MDN_FORMAT)
    if fmt not in known:
        raise FileFormatError(
            f"{path}: not a payne_lite file (format={fmt!r}); info "
            f"reads {', '.join(known)}"
        )
    return str(fmt), int(ver) if ver is not None else -1


def _is_results_hdf5(path: Path) -> bool:
    """An HDF5 file without a payne_lite format attribute holding an astropy table
    (how write_results stores results)."""
    try:
        with h5py.File(path, "r") as f:
            return "format" not in f.attrs and any(
                isinstance(f[k], h5py.Dataset) and f[k].dtype.names for k in f
            )
    except OSError:
        return False


def _row(key: str, text: str) -> str:
    return f"  {key:<11} {text}"


def _label_rows(names, units, lo, hi, note: str) -> list[str]:
    """One line per label: name, range and unit, as a small table."""
    w = max(len(n) for n in names)
    lows = [f"{a:.6g}" for a in lo]
    highs = [f"{b:.6g}" for b in hi]
    wl, wh = max(map(len, lows)), max(map(len, highs))
    rows = [
        f"{n:<{w}}  {a:>{wl}} .. {b:<{wh}}  {u}".rstrip()
        for n, a, b, u in zip(names, lows, highs, units, strict=True)
    ]
    return [_row("labels" if i == 0 else "", r) for i, r in enumerate(rows)] + [
        _row("", f"({note})")
    ]


def _meta_rows(meta: dict, prefix: str = "meta.") -> list[str]:
    """One line per provenance entry."""
    if not meta:
        return []
    w = max(len(prefix + k) for k in meta)
    return [f"  {prefix + k:<{w}}  {_fmt_value(v, 100)}" for k, v in meta.items()]


def _wrapped_pairs(key: str, mapping: dict) -> list[str]:
    """``key  a=1; b=2; ...`` wrapped to 88 columns."""
    text = "; ".join(f"{k}={_fmt_value(v, 60)}" for k, v in mapping.items())
    return textwrap.wrap(
        text,
        88,
        initial_indent=_row(key, ""),
        subsequent_indent=" " * 14,
        break_long_words=False,
        break_on_hyphens=False,
    )


def _lines_grid(grid: SpectralGrid) -> list[str]:
    lo, hi = grid.label_box
    err = "none" if grid.flux_err is None else "yes"
    return [
        _row("spectra", str(grid.n_spec)),
        _row("wavelength", _fmt_wavelength(grid.wavelength)),
        *_label_rows(
            grid.label_names, grid.label_units, lo, hi, "range of the grid's labels"
        ),
        _row("flux", f"{grid.flux.min():.3g}..{grid.flux.max():.3g}; flux_err: {err}"),
        *_meta_rows(grid.meta),
    ]


def _lines_emulator(emu: Emulator) -> list[str]:
    n_par = sum(int(np.size(a)) for a in emu.net.weights + emu.net.biases)
    lines = [
        _row(
            "network",
            f"{emu.kind}, hidden {','.join(map(str, emu.hidden))}, "
            f"{emu.activation}, {emu.n_pix} pixels x {emu.n_labels} "
            f"labels, {n_par} parameters",
        ),
        _row("wavelength", _fmt_wavelength(emu.wavelength)),
        *_label_rows(
            emu.label_names,
            emu.label_units,
            emu.label_lo,
            emu.label_hi,
            "training box: predictions outside it extrapolate",
        ),
    ]
    m = emu.meta
    if "config" in m:
        cfg = m["config"]
        n_iter = len(emu.history.get("valid_rms", ()))
        lines.append(
            _row(
                "training",
                (
                    f"{cfg.get('optimizer')}, {n_iter} of {cfg.get('max_iter')} iterations "
                    f"in {m.get('train_seconds', math.nan):.1f} s ({m.get('dtype')}), "
                    f"{m.get('n_train')} training + {m.get('n_valid')} held-out spectra, "
                    f"{m.get('n_restarted_pixels', 0)} pixels restarted"
                ),
            )
        )
        med = m.get("valid_median_abs_error", math.nan)
        p99 = m.get("valid_p99_pixel_abs_error", math.nan)
        lines.append(
            _row(
                "held-out",
                f"median |error| {med:.2e}; 99th percentile over pixels {p99:.2e}",
            )
        )
    if emu.pixel_error is not None:
        k = int(np.argmax(emu.pixel_error))
        lines.append(
            _row(
                "pixel_error",
                (
                    f"held-out RMS per pixel: median {np.median(emu.pixel_error):.2e}, "
                    f"max {emu.pixel_error[k]:.2e} at {emu.wavelength[k]:.2f} A"
                ),
            )
        )
    if "config" in m:
        lines += _wrapped_pairs("config", m["config"])
    if m.get("grid_meta"):
        lines += _wrapped_pairs("grid", m["grid_meta"])
    shown = {
        "config",
        "grid_meta",
        "n_train",
        "n_valid",
        "train_seconds",
        "dtype",
        "valid_median_abs_error",
        "valid_p99_pixel_abs_error",
        "n_restarted_pixels",
    }
    lines += _meta_rows({k: v for k, v in m.items() if k not in shown})
    return lines


def _lines_spectra(path: Path) -> list[str]:
    with _h5.open_checked(path, SPECTRA_FORMAT, (SPECTRA_VERSION,)) as f:
        wave = _h5.read_dataset(f, "wavelength", path)
        labels = _h5.read_dataset(f, "labels", path)
        flux = _h5.read_dataset(f, "flux", path)
        names = _h5.get_json_attr(f, "label_names", path)
        units = _h5.get_json_attr(f, "label_units", path)
        meta = _h5.get_json_attr(f, "meta", path)
    return [
        _row("spectra", str(flux.shape[0])),
        _row("wavelength", _fmt_wavelength(wave)),
        *_label_rows(
            names, units, labels.min(0), labels.max(0), "range of the spectra's labels"
        ),
        _row("flux", f"{flux.min():.3g}..{flux.max():.3g}"),
        *_meta_rows(meta),
    ]


def _lines_catalog(path: Path) -> list[str]:
    """Summary of a catalog file; reads the wavelength, not the spectra."""
    from ..catalog import HDF5Catalog

    with HDF5Catalog(path) as cat:
        n = len(cat)
        dtype = cat.read(0, 1).flux.dtype
        ids = "none"
        if cat.has_ids:
            first, last = cat.read(0, 1).ids[0], cat.read(n - 1, n).ids[0]
            ids = f"{str(first)!r} .. {str(last)!r}"
        return [
            _row(
                "spectra",
                f"{n} (flux and flux_err {dtype}; mask: "
                f"{'yes' if cat.has_mask else 'none'})",
            ),
            _row("wavelength", _fmt_wavelength(cat.wavelength)),
            _row("ids", ids),
            *_meta_rows(cat.meta),
        ]


def _lines_results(table) -> list[str]:
    """Summary of a fit results table (payne_lite.fit / fit_catalog)."""
    meta = table.meta
    n = len(table)
    labels = [c for c in table.colnames if f"{c}_err" in table.colnames]
    rows = [
        _row("fits", f"{n} (method {meta.get('method', '?')})"),
        _row(
            "parameters",
            ", ".join(
                f"{c} [{table[c].unit}]" if table[c].unit is not None else c
                for c in labels
            ),
        ),
    ]
    if n and "chi2_red" in table.colnames:
        chi2 = np.asarray(table["chi2_red"], float)
        conv = (
            np.asarray(table["converged"], bool)
            if "converged" in table.colnames
            else np.ones(n, bool)
        )
        rows.append(
            _row(
                "fit quality",
                f"{int(conv.sum())} converged, median "
                f"chi2_red {np.nanmedian(chi2):.3g}",
            )
        )
    if n and "flags" in table.colnames:
        flags = np.asarray(table["flags"])
        per_bit = [
            f"{int(np.count_nonzero(flags & (1 << b)))} {_flag_name(text)}"
            for b, text in FLAG_BITS.items()
            if np.any(flags & (1 << b))
        ]
        rows.append(
            _row(
                "flags",
                f"{int(np.count_nonzero(flags))} flagged"
                + (f" ({', '.join(per_bit)})" if per_bit else ""),
            )
        )
    if "mdn_refit" in table.colnames:
        rows.append(
            _row(
                "MDN",
                f"columns <name>_mdn, <name>_mdn_sigma; "
                f"{int(np.count_nonzero(table['mdn_refit']))} "
                "refitted without its bounds",
            )
        )
    skip = {"flag_bits", "cov_params", "column_names"}
    return rows + _meta_rows({k: v for k, v in meta.items() if k not in skip})


def _lines_mdn(path: Path) -> list[str]:
    from ..mdn import MDN

    mdn = MDN.load(path)
    return [
        _row("network", repr(mdn)),
        _row("wavelength", _fmt_wavelength(np.asarray(mdn.wavelength))),
        *_meta_rows(mdn.meta),
    ]


def _run_info(args) -> int:
    path = _require_file(args.file)
    size = _human_size(path.stat().st_size)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        grid = _read(SpectralGrid.from_payne_npz, path)
        print(f"{path}: The Payne training grid (.npz), {size}")
        print("\n".join(_lines_grid(grid)))
        return EXIT_OK
    if suffix in RESULTS_FORMATS and RESULTS_FORMATS[suffix] != "hdf5":
        from ..catalog import read_results

        table = _read(read_results, path)
        print(f"{path}: fit results ({RESULTS_FORMATS[suffix]}), {size}")
        print("\n".join(_lines_results(table)))
        return EXIT_OK
    if _is_results_hdf5(path):
        from ..catalog import read_results

        print(f"{path}: fit results (hdf5), {size}")
        print("\n".join(_lines_results(_read(read_results, path))))
        return EXIT_OK
    fmt, ver = _read(_file_format, path)
    if fmt == GRID_FORMAT:
        lines = _lines_grid(_read(SpectralGrid.load, path))
    elif fmt == EMULATOR_FORMAT:
        lines = _lines_emulator(_read(Emulator.load, path))
    elif fmt == CATALOG_FORMAT:
        lines = _read(_lines_catalog, path)
    elif fmt == MDN_FORMAT:
        lines = _read(_lines_mdn, path)
    else:
        lines = _read(_lines_spectra, path)
    print(f"{path}: {fmt} v{ver}, {size}")
    print("\n".join(lines))
    return EXIT_OK


def _add_demo(sub) -> None:
    p = _parser(
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
        type=_positive_int,
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


def _run_demo(args) -> int:
    from ..demo import run_demo

    if args.emulator is not None:
        _require_file(args.emulator)
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
        "  (scatter: half the 16-84 % range of fit - truth; 'no MDN': the same for\n"
        "   the MDN-free fit; last columns: the MDN's own Gaussians against the truth)"
    )
    print(
        "  (errors: flux noise and the emulator's per-pixel error in quadrature; the\n"
        "   emulator's errors are correlated across pixels, which that does not\n"
        "   capture, so fewer than 68 % of truths fall within 1 sigma here)"
    )
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


# ======================================================================================
# fit
# ======================================================================================
def _fit_default(name: str):
    return inspect.signature(fit).parameters[name].default


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _add_fit(sub) -> None:
    p = _parser(
        sub,
        "fit",
        help="fit a catalog of observed spectra with an emulator",
        description=(
            "Fit labels, radial velocity and (optionally) a continuum to every\n"
            "spectrum of a catalog with an emulator, one chunk of spectra at a time\n"
            "(bounded memory), and write one results table: one row per spectrum with\n"
            "each label, its error, rv, chi2, chi2_red, n_iter, converged and flags\n"
            "(see payne_lite.fit).\n\n"
            "catalogs:\n"
            "  .h5       a payne_lite catalog (payne_lite.write_catalog): flux,\n"
            "            flux_err, optional mask and ids\n"
            "  .fits     one or more APOGEE aspcapStar/apStar-like files, one spectrum\n"
            "            each: flux in HDU 1, errors in HDU 2, optional pixel bitmask\n"
            "            in HDU 3, log10 wavelength from CRVAL1/CDELT1; ids are the\n"
            "            file names\n\n"
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
            + "\n\nexamples:\n"
            "  payne-lite fit catalog.h5 --emulator emu.h5 -o results.fits\n"
            "  payne-lite fit aspcapStar-*.fits --emulator emu.h5 -o results.ecsv \\\n"
            "      --cont-deg 2 --fixed vmacro=5 rv=0"
        ),
    )
    p.add_argument(
        "catalog",
        nargs="+",
        metavar="CATALOG",
        help="a payne_lite catalog (.h5), or one or more APOGEE-like FITS "
        "files (see above)",
    )
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
    p.add_argument(
        "--method",
        choices=FIT_METHODS,
        default=_fit_default("method"),
        help="lm = batched Levenberg-Marquardt in JAX (fast); curve_fit = "
        "scipy.optimize.curve_fit per spectrum (the reference); emcee, nuts, "
        "mdn-is (needs --mdn) = posterior summaries (percentile columns) with "
        "their default settings (pl.sample for more)",
    )
    p.add_argument(
        "--cont-deg",
        type=_nonnegative_int,
        default=_fit_default("cont_deg"),
        metavar="N",
        help="degree of a multiplicative Chebyshev continuum fitted with "
        "the labels (0 = spectra are already continuum-normalised)",
    )
    p.add_argument(
        "--chunk-size",
        type=_positive_int,
        default=DEFAULT_CHUNK_SIZE,
        metavar="N",
        help="spectra read and fitted at a time (memory grows with it)",
    )
    p.add_argument(
        "--max-iter",
        type=_positive_int,
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
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite RESULTS if it exists (otherwise refused)",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="do not show a progress bar"
    )
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
        type=_positive_float,
        metavar="R",
        help="instrumental resolving power lambda / FWHM to degrade the model to",
    )
    prof.add_argument(
        "--lsf-sigma",
        type=_positive_float,
        metavar="A",
        help="instead of --resolution, the Gaussian LSF sigma [A]",
    )
    inst.add_argument(
        "--emulator-resolution",
        type=_positive_float,
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
        type=_positive_int,
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
    """The method's options object: ``--options JSON`` (its fields), with --max-iter
    and --mdn-starts as shortcuts of the point fits' fields."""
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
        fixed[name] = _parse_number(text.strip(), f"--fixed {item!r}")
    return fixed


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 1.0 else f"{seconds:.2f} s"


def _run_fit(args) -> int:
    from ..catalog import fit_catalog, open_catalog

    t0 = time.perf_counter()
    emu_path = _require_file(args.emulator)
    cat_paths = [_require_file(c) for c in args.catalog]
    out = Path(args.output)
    if out.suffix.lower() not in RESULTS_FORMATS:
        raise ValueError(
            f"{out}: unknown results file suffix {out.suffix!r}; expected "
            f"one of {', '.join(sorted(RESULTS_FORMATS))}"
        )
    out = _check_output(out, inputs=[emu_path, *cat_paths])
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; use --force to overwrite it")
    fixed = _parse_fixed(args.fixed)
    emu = _read(Emulator.load, emu_path)
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
    )
    options = _method_options(args)
    if args.mdn is not None:
        from ..mdn import MDN

        mdn_path = _require_file(args.mdn)
        mdn = _read(MDN.load, mdn_path, emulator=emu)
    source = cat_paths[0] if len(cat_paths) == 1 else cat_paths
    with _read(open_catalog, source) as cat:
        n, n_pix = len(cat), cat.wavelength.size
        what = f"{n} spectr{'um' if n == 1 else 'a'} x {n_pix} pixels from " + (
            str(cat_paths[0]) if len(cat_paths) == 1 else f"{len(cat_paths)} FITS files"
        )
        _log.info("fitting %s with %r", what, emu)
        out.parent.mkdir(parents=True, exist_ok=True)
        from ..catalog import connect, require

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
                overwrite=args.force,
                progress=not args.no_progress,
                client=client,
                restart=args.restart,
                keep_parts=args.keep_parts,
                cont_deg=args.cont_deg,
                fixed=fixed or None,
                instrument=instrument,
                options=options,
                meta={
                    "command": args.command_line,
                    "emulator_file": str(emu_path),
                    **({"mdn_file": str(args.mdn)} if mdn is not None else {}),
                },
            )
    seconds = time.perf_counter() - t0
    flags = np.asarray(table["flags"])
    n_flagged = int(np.count_nonzero(flags))
    per_bit = [
        f"{int(np.count_nonzero(flags & (1 << b)))} {_flag_name(text)}"
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
        f"fitted {what} ({args.method}, cont_deg {args.cont_deg}"
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
    return EXIT_OK


# ======================================================================================
# train-mdn
# ======================================================================================
def _add_train_mdn(sub) -> None:
    from ..mdn import MDNConfig

    d = {f.name: f.default for f in dataclasses.fields(MDNConfig)}
    p = _parser(
        sub,
        "train-mdn",
        help="train a mixture density network for an emulator",
        description=(
            "Train a mixture density network (MDN) that maps an observed spectrum to\n"
            "a Gaussian per label and rv, on noisy spectra simulated from EMULATOR\n"
            "(random labels in its box, rv, S/N, masked chunks, continuum tilts), and\n"
            "save it as one HDF5 file. `payne-lite fit --mdn` uses it to start and\n"
            "bound the fits."
        ),
        epilog=(
            "examples:\n  payne-lite train-mdn emulator.h5 -o mdn.h5\n"
            "  payne-lite train-mdn emulator.h5 -o mdn.h5 --n-train 200000 "
            "--snr-range 20,300 --rv-range -300,300"
        ),
    )
    p.add_argument("emulator", metavar="EMULATOR", help="a payne_lite emulator file")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="MDN.h5",
        help="output HDF5 file (payne_lite.MDN format)",
    )
    p.add_argument("--seed", type=int, default=d["seed"], help="random seed")
    p.add_argument(
        "--n-train",
        type=_positive_int,
        default=d["n_train"],
        metavar="N",
        help="simulated training spectra",
    )
    p.add_argument(
        "--n-valid",
        type=_positive_int,
        default=d["n_valid"],
        metavar="N",
        help="simulated validation spectra (early stopping)",
    )
    p.add_argument(
        "--epochs",
        type=_positive_int,
        default=d["epochs"],
        metavar="N",
        help="maximum passes over the training spectra",
    )
    p.add_argument(
        "--patience",
        type=_positive_int,
        default=d["patience"],
        metavar="N",
        help="epochs without validation improvement before stopping",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=d["batch_size"],
        metavar="N",
        help="spectra per Adam step",
    )
    p.add_argument(
        "--learning-rate",
        type=float,
        default=d["learning_rate"],
        metavar="LR",
        help="Adam step size (cosine decay)",
    )
    p.add_argument(
        "--n-components",
        type=_positive_int,
        default=d["n_components"],
        metavar="M",
        help="Gaussians per label (a mixture when > 1)",
    )
    p.add_argument(
        "--snr-range",
        default=",".join(map(str, d["snr_range"])),
        metavar="LO,HI",
        help="S/N per pixel of the training spectra (log-uniform)",
    )
    p.add_argument(
        "--rv-range",
        default=",".join(map(str, d["rv_range"])),
        metavar="LO,HI",
        help="rv [km/s] of the training spectra (uniform)",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="do not show progress bars"
    )


def _pair(text: str, flag: str) -> tuple[float, float]:
    parts = text.split(",")
    if len(parts) != 2:
        raise ValueError(f"{flag} {text!r}: expected LO,HI, e.g. 10,300")
    return (_parse_number(parts[0], flag), _parse_number(parts[1], flag))


def _run_train_mdn(args) -> int:
    from ..mdn import MDNConfig, train_mdn

    emu_path = _require_file(args.emulator)
    out = _check_output(args.output, inputs=[emu_path])
    config = MDNConfig(
        n_train=args.n_train,
        n_valid=args.n_valid,
        epochs=args.epochs,
        patience=args.patience,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        n_components=args.n_components,
        snr_range=_pair(args.snr_range, "--snr-range"),
        rv_range=_pair(args.rv_range, "--rv-range"),
        seed=args.seed,
    )
    emu = _read(Emulator.load, emu_path)
    _log.info("training an MDN for %r with %s", emu, config)
    mdn = train_mdn(emu, config=config, progress=not args.no_progress)
    mdn = dataclasses.replace(
        mdn,
        meta={**mdn.meta, "command": args.command_line, "emulator_file": str(emu_path)},
    )
    mdn.save(out)
    m = mdn.meta
    print(
        f"trained an MDN ({mdn.n_components} component(s)) for "
        f"{', '.join(mdn.output_names)} on {config.n_train} simulated spectra "
        f"(S/N {config.snr_range[0]:g}-{config.snr_range[1]:g}, rv "
        f"{config.rv_range[0]:g} to {config.rv_range[1]:g} km/s), "
        f"{m['epochs_run']} epochs: validation NLL {m['best_valid_nll']:.3f}; "
        f"{m['train_seconds']:.1f} s; wrote {out}"
    )
    return EXIT_OK


def _flag_name(text: str) -> str:
    """'at a bound (training box or rv window)' -> 'at a bound'."""
    return text.split(" (")[0].split(":")[0]


# ======================================================================================
# plot
# ======================================================================================
def _add_plot(sub) -> None:
    p = _parser(
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
        out.append((_parse_number(lo, "--windows"), _parse_number(hi, "--windows")))
    return out


def _run_plot(args) -> int:
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


# ======================================================================================
# bench
# ======================================================================================
#: The regression suite lives in the repository, beside the package (an editable
#: install or a checkout); wheels do not carry it. Only ``payne-lite bench`` loads it,
#: when it runs, as the package :data:`_BENCH_PACKAGE` (the checkout's benchmarks/).
BENCH_SUITE = Path(__file__).resolve().parents[2] / "benchmarks" / "suite.py"
_BENCH_PACKAGE = "payne_lite_benchmarks"

_BENCH_DESCRIPTION = (
    "Run the regression benchmark suite of the repository's benchmarks/\n"
    "folder: emulator accuracy and training time, evaluation throughput and\n"
    "fraction of the activation bound, fit accuracy and speed next to a\n"
    "The-Payne-style baseline timed in the same run, MDN calibration and\n"
    "speed-up. Writes results.json and results.md and compares them with the\n"
    "committed reference (benchmarks/reference_<mode>.json): accuracy and\n"
    "coverage gate with stated tolerances, speed only as ratios to the\n"
    "same-run baseline. Exit status 1 on a regression or a failed section.\n"
    "Details: benchmarks/suite.py and benchmarks/README.md."
)
_BENCH_EPILOG = (
    "examples:\n  payne-lite bench --quick\n"
    "  payne-lite bench --mdn mdn.h5 -o bench_out\n"
    "  payne-lite bench --quick --compare bench_out/results.json"
)


@functools.cache
def _bench_suite_or_error():
    """(``benchmarks/suite.py`` as a module or None, why it is None).

    Imports the checkout's ``benchmarks/`` folder as the package
    :data:`_BENCH_PACKAGE` (a private name: no clash with any other ``benchmarks``),
    so that the suite's relative imports of the single benchmarks work.
    """
    if not BENCH_SUITE.is_file():
        return None, (
            f"payne-lite bench runs the repository's benchmarks/suite.py, which this "
            f"installation does not have (looked for {BENCH_SUITE}): clone the "
            "repository and install it editable (pip install -e .), or run "
            "python benchmarks/suite.py in the checkout"
        )
    import importlib
    import importlib.util
    import types

    def forget():
        for name in [n for n in sys.modules if n.split(".")[0] == _BENCH_PACKAGE]:
            del sys.modules[name]

    forget()  # a suite loaded from another BENCH_SUITE before
    folder = BENCH_SUITE.parent
    try:  # a broken suite must not break the other commands
        init = folder / "__init__.py"
        if init.is_file():
            spec = importlib.util.spec_from_file_location(
                _BENCH_PACKAGE, init, submodule_search_locations=[str(folder)]
            )
            package = importlib.util.module_from_spec(spec)
            sys.modules[_BENCH_PACKAGE] = package
            spec.loader.exec_module(package)
        else:
            package = types.ModuleType(_BENCH_PACKAGE)
            package.__path__ = [str(folder)]
            sys.modules[_BENCH_PACKAGE] = package
        module = importlib.import_module(f"{_BENCH_PACKAGE}.{BENCH_SUITE.stem}")
    except Exception as err:
        forget()
        return None, f"{BENCH_SUITE} does not load: {type(err).__name__}: {err}"
    return module, ""


def _bench_suite():
    """``benchmarks/suite.py`` as a module, or None where it is absent or broken."""
    return _bench_suite_or_error()[0]


class _BenchArguments(argparse.Action):
    """Keep the arguments of ``payne-lite bench`` for the suite's own parser, built
    when the command runs (:func:`_run_bench`); only -v and --debug are taken out
    here, as :func:`main` needs them before the command runs."""

    def __call__(self, parser, namespace, values, option_string=None):
        common, rest = _common_options(sub=True).parse_known_args(list(values))
        for key, value in vars(common).items():
            setattr(namespace, key, value)
        setattr(namespace, self.dest, rest)


def _add_bench(sub) -> None:
    # Nothing of the suite is loaded here: building the parser (for any command)
    # must not run the repository's benchmark code. "+" as the only prefix makes
    # every argument, options included, a value of bench_args.
    p = sub.add_parser(
        "bench",
        help="run the regression benchmark suite (needs a repository checkout)",
        description=_BENCH_DESCRIPTION,
        epilog=_BENCH_EPILOG,
        formatter_class=_Formatter,
        prefix_chars="+",
        add_help=False,
    )
    p.add_argument(
        "bench_args",
        nargs="*",
        action=_BenchArguments,
        metavar="options",  # the "options:" that `payne-lite bench --help` lists
        help="the suite's options (benchmarks/suite.py), read when the command runs",
    )


def _bench_parser(suite) -> argparse.ArgumentParser:
    """The parser of ``payne-lite bench``: the common options and the suite's."""
    p = _ArgumentParser(
        prog=f"{PROG} bench",
        description=_BENCH_DESCRIPTION,
        epilog=_BENCH_EPILOG,
        formatter_class=_Formatter,
        parents=[_common_options(sub=True)],
    )
    suite.add_arguments(p)
    return p


def _run_bench(args) -> int:
    suite, why = _bench_suite_or_error()
    if suite is None:
        raise FileNotFoundError(why)
    try:
        bench_args = _bench_parser(suite).parse_args(args.bench_args)
    except SystemExit as exc:  # --help and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    for key in ("verbose", "debug", "command", "command_line"):
        if hasattr(args, key):
            setattr(bench_args, key, getattr(args, key))
    return suite.run(bench_args)


# ======================================================================================
# Subcommand registry.
#
# Each subcommand is an _add_<name>(subparsers) / _run_<name>(args) -> int pair.
# ======================================================================================
_COMMANDS: dict[str, tuple[Callable, Callable[[argparse.Namespace], int]]] = {
    "grid": (_add_grid, _run_grid),
    "train": (_add_train, _run_train),
    "predict": (_add_predict, _run_predict),
    "info": (_add_info, _run_info),
    "demo": (_add_demo, _run_demo),
    "fit": (_add_fit, _run_fit),
    "train-mdn": (_add_train_mdn, _run_train_mdn),
    "plot": (_add_plot, _run_plot),
    "bench": (_add_bench, _run_bench),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``payne-lite`` argument parser with all subcommands."""
    parser = _ArgumentParser(
        prog=PROG,
        formatter_class=_Formatter,
        parents=[_common_options(sub=False)],
        description=(
            "payne_lite: emulate and fit stellar spectra with per-pixel\n"
            "neural networks (The Payne; Ting et al. 2019, ApJ 879, 69)."
        ),
        epilog=(
            "typical session:\n"
            "  payne-lite grid -o grid.h5\n"
            "  payne-lite train grid.h5 -o emulator.h5\n"
            "  payne-lite info emulator.h5\n"
            "  payne-lite predict emulator.h5 --labels 5000,4.5,0,0.1,5 "
            "-o flux.csv\n"
            "  payne-lite fit catalog.h5 --emulator emulator.h5 -o results.fits\n"
            f"\n`{PROG} COMMAND --help` describes each command's options."
        ),
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, title="commands"
    )
    for add, _ in _COMMANDS.values():
        add(sub)
    return parser


@contextlib.contextmanager
def _logging_to_stderr(verbosity: int):
    """Route the package's log records to stderr for the duration of one command."""
    logger = logging.getLogger("payne_lite")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    old_level = logger.level
    logger.setLevel(
        logging.WARNING
        if verbosity <= 0
        else logging.INFO
        if verbosity == 1
        else logging.DEBUG
    )
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror and err.filename:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``payne-lite`` on ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Exit codes: 0 success, 1 training diverged, 2 bad input or usage (one line on
    stderr), 130 interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(_join_negative_values(argv))
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    args.command_line = shlex.join([PROG, *argv])
    _, run = _COMMANDS[args.command]
    with _logging_to_stderr(args.verbose), warnings.catch_warnings():
        if not args.debug:  # one line per warning, like the errors (no source line)
            warnings.showwarning = _show_warning
        warnings.simplefilter("default", WavelengthGridWarning)  # shown, never raised
        try:
            return run(args)
        except (OSError, ValueError) as err:  # FileFormatError is a ValueError
            if args.debug:
                raise
            print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
            return EXIT_USAGE
        except TrainingDivergedError as err:
            if args.debug:
                raise
            print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
            return EXIT_FAILED
        except KeyboardInterrupt:
            if args.debug:
                raise
            print(f"{PROG}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
