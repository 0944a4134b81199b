"""``payne-lite predict``: spectra of given labels from an emulator, and the readers
of the labels (flags, .npy, .csv or text files) and writers of the spectra."""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import _h5
from ..emulator import Emulator
from ..errors import FileFormatError
from ._common import (
    EXIT_OK,
    add_subcommand,
    check_output,
    checked_read,
    parse_number,
    require_file,
)

#: HDF5 layout written by ``payne-lite predict -o FILE.h5``.
SPECTRA_FORMAT = "payne_lite.PredictedSpectra"
SPECTRA_VERSION = 1

_PREDICT_SUFFIXES = (".npy", ".h5", ".hdf5", ".csv")
_log = logging.getLogger("payne_lite.cli")


def add_predict(sub) -> None:
    p = add_subcommand(
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


def join_negative_values(argv: list[str]) -> list[str]:
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
        rows.append([parse_number(t, where) for t in tokens])
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
        out[k] = [parse_number(t, f"{path} line {n}") for t in tokens]
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


def run_predict(args) -> int:
    emu_path = require_file(args.emulator)
    inputs = [emu_path]
    if args.labels_file is not None:
        inputs.append(require_file(args.labels_file))
    out = check_output(args.output, inputs=inputs)
    if out.suffix.lower() not in _PREDICT_SUFFIXES:
        raise ValueError(
            f"{out}: unknown output format {out.suffix!r}; use one of "
            f"{', '.join(_PREDICT_SUFFIXES)}"
        )
    emu = checked_read(Emulator.load, emu_path)
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
