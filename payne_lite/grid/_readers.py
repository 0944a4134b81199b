"""Grids from other synthesizers' files: the arrays for a :class:`SpectralGrid`.

Two readers, each returning the keyword arguments of ``SpectralGrid(...)`` (the
classmethods :meth:`SpectralGrid.from_payne_zero` and :meth:`SpectralGrid.from_file`
call them):

**Payne Zero** (tingyuansen/payne-zero, ``payne_zero_synthesis``): one ``.npz`` per
spectrum, as its ``Spectrum.save_npz`` writes it: ``wavelength_nm`` (P,) [nm],
``normalized_flux`` (P,) (= ``flux_total / flux_continuum``), ``flux_total``,
``flux_continuum`` (P,) [F_lambda per nm], ``seconds`` (1,); spectra synthesized
from labels (``LabelSpectrum``) add ``metadata_json``, a JSON object whose
``"labels"`` holds the labels. The labels come from a label table (one row per
spectrum, a column naming its file) or, without one, from each file's
``metadata_json``. Every spectrum must share one wavelength grid; wavelengths are
converted from nm to Angstrom (vacuum assumed, as Payne Zero's APOGEE tools use).

**Generic npz / HDF5 grids**: a flux array (n_spec, n_pix) (or transposed), a
wavelength array (n_pix,) and labels, found by the names given or guessed from
:data:`FLUX_NAMES`, :data:`WAVELENGTH_NAMES`, :data:`LABEL_NAMES` and
:data:`ERROR_NAMES` (case-insensitive; HDF5 datasets at any depth, matched by their
last path component). Labels are a 2-D array (n_spec, n_lab) or (n_lab, n_spec) with
names from ``label_names=`` or a names array (:data:`LABEL_NAME_NAMES`) or an
HDF5 attribute ``label_names``/``names``; a table (a structured npz array or an
HDF5 compound dataset) whose numeric fields are the labels; or, with
``label_names=``, one 1-D array per label. Wavelengths are in Angstrom unless the
array's name ends in ``_nm`` or an HDF5 attribute ``unit``/``units`` says nm, or
``wavelength_unit="nm"`` is given. When a piece is missing or ambiguous, a
:class:`~payne_lite.FileFormatError` lists every array found (name, shape, dtype)
and the names tried.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import FileFormatError

log = logging.getLogger("payne_lite.grid")

#: Names tried for the flux array (generic files), in order.
FLUX_NAMES = (
    "flux", "spectra", "normalized_flux", "norm_flux", "fluxes", "spectrum",
    "normalised_flux", "flux_norm",
)  # fmt: skip
#: Names tried for the wavelength array.
WAVELENGTH_NAMES = (
    "wavelength", "wave", "wavelength_nm", "wavelengths", "lambda", "lam", "wl",
    "wavelength_aa", "wavelength_angstrom",
)  # fmt: skip
#: Names tried for the labels (a 2-D array or a table).
LABEL_NAMES = ("labels", "label", "parameters", "params", "stellar_labels")
#: Names tried for the label names (an array of strings).
LABEL_NAME_NAMES = ("label_names", "labels_names", "label_name", "names", "columns")
#: Names tried for the flux errors (optional).
ERROR_NAMES = ("flux_err", "spectra_err", "flux_error", "error", "sigma", "err")
#: Columns of a label table that name each spectrum's file (Payne Zero folders).
FILE_COLUMNS = ("file", "filename", "path", "spectrum", "name", "id")
#: What Payne Zero's spectrum archives hold (``Spectrum.save_npz``).
PAYNE_ZERO_KEYS = ("wavelength_nm", "normalized_flux")
NM_TO_ANGSTROM = 10.0
#: Wavelength units read (lower case) and their factor to Angstrom.
TO_ANGSTROM = {
    "angstrom": 1.0, "angstroms": 1.0, "aa": 1.0, "a": 1.0, "å": 1.0,
    "nm": NM_TO_ANGSTROM, "nanometer": NM_TO_ANGSTROM, "nanometre": NM_TO_ANGSTROM,
    "nanometers": NM_TO_ANGSTROM, "um": 1e4, "micron": 1e4, "µm": 1e4,
}  # fmt: skip


# ======================================================================================
# Payne Zero folders
# ======================================================================================
def payne_zero_arrays(
    folder,
    labels=None,
    *,
    label_names: Sequence[str] | None = None,
    label_units: Sequence[str] | None = None,
    file_column: str | None = None,
    flux: str = "normalized_flux",
    pattern: str = "*.npz",
) -> dict:
    """``SpectralGrid`` keyword arguments from a folder of Payne Zero spectra.

    Args:
        folder: the folder of ``.npz`` spectrum archives.
        labels: the label table: a path (CSV, ECSV, FITS: anything
            ``astropy.table.Table.read`` reads), an astropy ``Table``, a dict of
            columns or a NumPy structured array; one row per spectrum, a column
            (``file_column``, else the first of :data:`FILE_COLUMNS`) naming its
            file in ``folder`` (with or without ``.npz``). None: the labels in each
            file's ``metadata_json``.
        label_names: the labels to use, in order (default: every numeric column
            but the file column; without a table, the first file's labels).
        label_units: their units (default empty strings).
        file_column: the table's column of file names.
        flux: the archive's flux array: ``"normalized_flux"`` (default) or
            ``"flux_total"``.
        pattern: the files of ``folder`` to read without a table.

    Raises:
        FileNotFoundError: no such folder, or a file the table names is missing.
        payne_lite.FileFormatError: an archive without ``wavelength_nm`` or the
            flux (the message lists its keys), spectra on different wavelength
            grids, no labels to be found.
        ValueError: a bad label table (no file column, unknown label names).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    if labels is None:
        files = sorted(folder.glob(pattern))
        if not files:
            raise FileNotFoundError(f"{folder}: no files matching {pattern!r}")
        table, names = None, None
    else:
        table = _as_columns(labels)
        fcol = _file_column(table, file_column)
        files = [_spectrum_path(folder, str(v)) for v in table[fcol]]
        names = list(label_names) if label_names else _numeric_columns(table, fcol)
        missing = [n for n in names if n not in table]
        if missing:
            raise ValueError(
                f"label table has no column(s) {missing}; it has {sorted(table)}"
            )
    wave = None
    fluxes, rows = [], []
    for path in files:
        data = _read_npz(path)
        if "wavelength_nm" not in data or flux not in data:
            raise FileFormatError(
                f"{path}: not a Payne Zero spectrum archive: needs 'wavelength_nm' "
                f"and {flux!r}; found {_describe(data)}"
            )
        w = np.asarray(data["wavelength_nm"], np.float64).reshape(-1)
        f = np.asarray(data[flux], np.float64).reshape(-1)
        if f.shape != w.shape:
            raise FileFormatError(
                f"{path}: {flux} {f.shape} and wavelength_nm {w.shape} differ"
            )
        if wave is None:
            wave, first = w, path
        elif w.shape != wave.shape or not np.allclose(w, wave, rtol=1e-10, atol=0):
            raise FileFormatError(
                f"{path}: wavelength_nm ({w.size} pixels, {w[0]:.6g}-{w[-1]:.6g} nm) "
                f"differs from {first.name}'s ({wave.size}, {wave[0]:.6g}-"
                f"{wave[-1]:.6g} nm): synthesize every spectrum on one grid"
            )
        fluxes.append(f)
        if table is None:
            rows.append(_metadata_labels(path, data))
    if table is None:
        names = list(label_names) if label_names else list(rows[0])
        for path, row in zip(files, rows, strict=True):
            lack = [n for n in names if n not in row]
            if lack:
                raise FileFormatError(
                    f"{path}: metadata_json labels lack {lack} (has {sorted(row)}); "
                    "pass a label table"
                )
        lab = np.array([[row[n] for n in names] for row in rows], np.float64)
    else:
        lab = np.column_stack([np.asarray(table[n], np.float64) for n in names])
    unlisted = sorted({p.name for p in folder.glob("*.npz")} - {p.name for p in files})
    if unlisted:
        log.info("%s: %d .npz file(s) not in the label table, not read: %s",
                 folder, len(unlisted), unlisted[:5])  # fmt: skip
    return dict(
        wavelength=wave * NM_TO_ANGSTROM,
        labels=lab,
        flux=np.stack(fluxes),
        label_names=names,
        label_units=list(label_units) if label_units else [""] * len(names),
        meta={
            "source": f"Payne Zero spectra: {folder}",
            "n_files": len(files),
            "flux": flux,
            "wavelength": "wavelength_nm x 10 (vacuum assumed) [Angstrom]",
        },
    )


def _read_npz(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (named in the label table)")
    try:
        with np.load(path, allow_pickle=False) as d:
            return {k: d[k] for k in d.files}
    except (OSError, ValueError, EOFError) as err:
        raise FileFormatError(f"{path}: not a readable .npz file: {err}") from err


def _metadata_labels(path: Path, data: dict) -> dict[str, float]:
    if "metadata_json" not in data:
        raise FileFormatError(
            f"{path}: no labels: no metadata_json in the archive (found "
            f"{_describe(data)}); pass a label table (labels=)"
        )
    try:
        meta = json.loads(str(data["metadata_json"]))
        raw = meta["labels"]
    except (ValueError, KeyError, TypeError) as err:
        raise FileFormatError(
            f"{path}: metadata_json has no readable 'labels' object ({err})"
        ) from err
    return {
        str(k): float(v)
        for k, v in raw.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _as_columns(labels) -> dict[str, np.ndarray]:
    """A label table as name -> column."""
    if isinstance(labels, str | os.PathLike):
        from astropy.table import Table

        path = Path(labels)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such label table")
        kw = {"format": "ascii.csv"} if path.suffix.lower() == ".csv" else {}
        try:
            labels = Table.read(path, **kw)
        except Exception as err:  # astropy raises many kinds
            raise FileFormatError(f"{path}: not a readable table: {err}") from err
    if isinstance(labels, np.ndarray) and labels.dtype.names:
        return {n: np.asarray(labels[n]) for n in labels.dtype.names}
    if hasattr(labels, "colnames"):
        blank = [
            n for n in labels.colnames if np.any(getattr(labels[n], "mask", False))
        ]
        if blank:
            raise ValueError(f"label table has missing values in column(s) {blank}")
        return {n: np.asarray(labels[n]) for n in labels.colnames}
    if isinstance(labels, Mapping):
        return {str(k): np.asarray(v) for k, v in labels.items()}
    raise ValueError(
        "labels must be a table path, an astropy Table, a dict of columns or a "
        f"structured array, got {type(labels).__name__}"
    )


def _file_column(table: dict, given: str | None) -> str:
    if given is not None:
        if given not in table:
            raise ValueError(f"label table has no column {given!r}: {sorted(table)}")
        return given
    lower = {k.lower(): k for k in table}
    for name in FILE_COLUMNS:
        if name in lower and table[lower[name]].dtype.kind in "US":
            return lower[name]
    raise ValueError(
        f"label table has no column of file names ({', '.join(FILE_COLUMNS)}); "
        f"it has {sorted(table)}: pass file_column="
    )


def _numeric_columns(table: dict, skip: str) -> list[str]:
    return [
        k
        for k, v in table.items()
        if k != skip and v.ndim == 1 and v.dtype.kind in "iuf"
    ]


def _spectrum_path(folder: Path, name: str) -> Path:
    path = folder / name.strip()
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


# ======================================================================================
# generic npz / HDF5
# ======================================================================================
def file_arrays(
    path,
    *,
    flux: str | None = None,
    wavelength: str | None = None,
    labels: str | None = None,
    flux_err: str | None = None,
    label_names: Sequence[str] | None = None,
    label_units: Sequence[str] | None = None,
    wavelength_unit: str | None = None,
) -> dict:
    """``SpectralGrid`` keyword arguments from a generic ``.npz`` or HDF5 grid.

    Args:
        path: the file (``.npz``; anything else is opened as HDF5).
        flux, wavelength, labels, flux_err: names of the arrays (HDF5: dataset
            paths or last components); default: guessed (see the module docstring).
        label_names: the labels' names (needed when the file has no names; with
            ``labels=None`` and no labels array, the names of 1-D arrays).
        label_units: their units (default: an HDF5 attribute ``label_units`` /
            ``units`` of the labels, else empty strings).
        wavelength_unit: a key of :data:`TO_ANGSTROM` (``"Angstrom"``, ``"nm"``,
            ``"um"`` ...; default: from the name or an HDF5 ``unit`` attribute,
            else Angstrom).

    Raises:
        FileNotFoundError: no such file.
        payne_lite.FileFormatError: unreadable, or the flux, wavelength or labels
            not found or not fitting together, or a wavelength unit not known;
            the message lists what was found.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    arrays, attrs = _load_any(path)
    found = _describe(arrays)

    def fail(what: str) -> FileFormatError:
        return FileFormatError(f"{path}: {what}; found {found}")

    fkey = _pick(arrays, flux, FLUX_NAMES, "flux", fail)
    wkey = _pick(arrays, wavelength, WAVELENGTH_NAMES, "wavelength", fail)
    wave = np.asarray(arrays[wkey], np.float64)
    if wave.ndim != 1:
        wave = wave.reshape(-1) if wave.size == max(wave.shape) else wave
    if wave.ndim != 1:
        raise fail(f"wavelength {wkey!r} {np.shape(arrays[wkey])} is not 1-D")
    fl = np.asarray(arrays[fkey])
    if fl.ndim != 2 or wave.size not in fl.shape:
        raise fail(
            f"flux {fkey!r} {fl.shape} is not (n_spec, {wave.size}) for the "
            f"{wave.size} wavelengths of {wkey!r}"
        )
    if fl.shape[1] != wave.size:
        fl = fl.T
    n_spec = fl.shape[0]
    lab, names, units = _labels(
        arrays, attrs, labels, label_names, n_spec, fkey, wkey, fail
    )
    if label_units is not None:
        units = list(label_units)
    err = None
    ekey = _pick(arrays, flux_err, ERROR_NAMES, "flux_err", fail, required=False)
    if ekey is not None:
        err = np.asarray(arrays[ekey])
        err = err.T if err.shape == fl.T.shape and err.shape != fl.shape else err
        if err.shape != fl.shape:
            raise fail(f"flux_err {ekey!r} {err.shape} does not match flux {fl.shape}")
    unit = wavelength_unit or _wave_unit(wkey, attrs.get(wkey, {}))
    factor = TO_ANGSTROM.get(unit.strip().lower())
    if factor is None:
        where = "wavelength_unit" if wavelength_unit else f"the unit of {wkey!r}"
        raise fail(
            f"{where} is {unit!r}, not one of {sorted(TO_ANGSTROM)}: pass "
            "wavelength_unit="
        )
    wave = wave * factor
    return dict(
        wavelength=wave,
        labels=lab,
        flux=fl,
        flux_err=err,
        label_names=names,
        label_units=units if units else [""] * len(names),
        meta={
            "source": f"{path.name}",
            "arrays": {"flux": fkey, "wavelength": wkey, "flux_err": ekey},
            "wavelength_unit_read": unit,
        },
    )


def _load_any(path: Path) -> tuple[dict, dict]:
    """name -> array of every array in the file, and name -> attrs (HDF5)."""
    if path.suffix.lower() == ".npz":
        try:
            with np.load(path, allow_pickle=False) as d:
                return {k: d[k] for k in d.files}, {}
        except (OSError, ValueError, EOFError) as err:
            raise FileFormatError(f"{path}: not a readable .npz file: {err}") from err
    import h5py

    arrays, attrs = {}, {}
    try:
        with h5py.File(path, "r") as f:
            attrs[""] = dict(f.attrs)

            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    arrays[name] = obj[()]
                    attrs[name] = dict(obj.attrs)

            f.visititems(visit)
    except (OSError, KeyError, RuntimeError) as err:
        raise FileFormatError(
            f"{path}: neither a .npz nor a readable HDF5 file: {err}"
        ) from err
    return arrays, attrs


def _describe(arrays: dict) -> str:
    if not arrays:
        return "no arrays"
    return ", ".join(
        f"{k} {tuple(np.shape(v))} {np.asarray(v).dtype}" for k, v in arrays.items()
    )


def _pick(arrays, given, candidates, role, fail, *, required=True):
    """The key of ``role``: ``given`` (exact, or the last path component), else the
    first candidate present (case-insensitive, last path component)."""
    by_last: dict[str, list[str]] = {}
    for k in arrays:
        by_last.setdefault(k.rsplit("/", 1)[-1].lower(), []).append(k)
    if given is not None:
        if given in arrays:
            return given
        hits = by_last.get(given.lower(), [])
        if len(hits) == 1:
            return hits[0]
        raise fail(f"no {role} array {given!r}" if not hits else
                   f"{role} {given!r} is ambiguous: {hits}")  # fmt: skip
    for name in candidates:
        hits = by_last.get(name, [])
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise fail(f"several {role} arrays {hits}: pass {role}=")
    if required:
        raise fail(f"no {role} array (tried {', '.join(candidates)}): pass {role}=NAME")
    return None


def _labels(arrays, attrs, given, label_names, n_spec, fkey, wkey, fail):
    """(labels (n_spec, L), names, units) from a 2-D array, a table or 1-D arrays."""
    key = _pick(arrays, given, LABEL_NAMES, "labels", fail, required=False)
    if key is None and label_names:  # one 1-D array per label
        cols = [arrays[_pick(arrays, n, (), f"label {n!r}", fail)] for n in label_names]
        bad = [
            n
            for n, c in zip(label_names, cols, strict=True)
            if np.shape(c) != (n_spec,)
        ]
        if bad:
            raise fail(f"label array(s) {bad} are not ({n_spec},)")
        return np.column_stack(cols).astype(np.float64), list(label_names), None
    if key is None:
        raise fail(
            f"no labels (tried {', '.join(LABEL_NAMES)}, or give label_names= "
            "naming one 1-D array per label)"
        )
    arr = np.asarray(arrays[key])
    meta = attrs.get(key, {})
    if arr.dtype.names:  # a table
        names = list(label_names) if label_names else [
            n for n in arr.dtype.names if arr[n].dtype.kind in "iuf"
        ]  # fmt: skip
        missing = [n for n in names if n not in arr.dtype.names]
        if missing or arr.shape != (n_spec,):
            raise fail(f"label table {key!r} {arr.shape} lacks {missing} or has not "
                       f"{n_spec} rows")  # fmt: skip
        lab = np.column_stack([np.asarray(arr[n], np.float64) for n in names])
        return lab, names, _units(meta, len(names))
    if arr.ndim != 2 or n_spec not in arr.shape:
        raise fail(f"labels {key!r} {arr.shape} is not (n_spec={n_spec}, n_labels)")
    names = list(label_names) if label_names else _stored_names(arrays, meta)
    if arr.shape[0] != n_spec or (names and arr.shape[1] != len(names)):
        arr = arr.T
    if names is None:
        raise fail(
            f"labels {key!r} {arr.shape} has no names (tried a names array "
            f"{', '.join(LABEL_NAME_NAMES)} and attribute label_names): pass label_names="
        )
    if arr.shape != (n_spec, len(names)):
        raise fail(f"labels {key!r} {arr.shape} do not fit {len(names)} names {names}")
    return arr.astype(np.float64), names, _units(meta, len(names))


def _stored_names(arrays, meta) -> list[str] | None:
    for attr in ("label_names", "names", "columns"):
        if attr in meta:
            return _strings(meta[attr])
    for name in LABEL_NAME_NAMES:
        for k, v in arrays.items():
            if (
                k.rsplit("/", 1)[-1].lower() == name
                and np.asarray(v).dtype.kind in "USO"
            ):
                return _strings(v)
    return None


def _strings(value) -> list[str]:
    if isinstance(value, str):
        try:
            return [str(v) for v in json.loads(value)]
        except ValueError:
            return [v.strip() for v in value.split(",")]
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.ravel(value)]


def _units(meta, n: int) -> list[str] | None:
    for attr in ("label_units", "units"):
        if attr in meta:
            units = _strings(meta[attr])
            if len(units) == n:
                return units
    return None


def _wave_unit(key: str, meta) -> str:
    for attr in ("unit", "units"):
        if attr in meta:
            value = meta[attr]
            return value.decode() if isinstance(value, bytes) else str(value)
    return "nm" if key.lower().endswith("_nm") else "Angstrom"
