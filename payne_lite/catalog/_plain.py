"""Catalogs of spectra as people have them: any HDF5 file with flux, error and
wavelength datasets (:class:`PlainHDF5Catalog`), and FITS binary tables of spectra,
one row each (:class:`FitsTableCatalog`).

Both find their arrays by name: given (``datasets=`` / ``columns=``, a dict of role
to name) or guessed among the file's names, case-insensitively, from the common names
in :data:`NAMES`. A role with two candidates, or a required role with none, is an
error that lists what the file holds and how to name it. The roles:

* ``flux`` (n, P) (or (P,): one spectrum), required;
* the errors, one of ``flux_err`` (1-sigma), ``flux_ivar`` (inverse variance: 0 is an
  infinite error, zero weight) or ``flux_var`` (variance), required;
* ``wavelength`` (P,) or (n, P) [Angstrom unless the dataset's ``unit`` / ``units``
  attribute (HDF5) or the column's unit (FITS) says otherwise; values below 3000
  without a unit are refused as ambiguous: nm in the infrared look like Angstrom
  in the ultraviolet], or ``log_wavelength`` (log10 of Angstrom), required;
* ``mask`` (bool True = bad, or an integer bitmask: non-zero = bad), ``ids`` (n,) and
  ``group`` (n,), optional.

Values stay as stored, converted to float only when read, a chunk at a time (HDF5:
h5py slabs; FITS: a memory map).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import h5py
import numpy as np

from .._validate import check_wavelength
from ..errors import FileFormatError
from ._apogee import open_fits_checked
from ._hdf5 import (
    FITS_SUFFIXES,
    HDF5_SUFFIXES,
    CatalogChunk,
    Reader,
    check_row_grids,
    has_suffix,
    one_path,
)

#: Common names of each role (compared in lower case).
NAMES: dict[str, tuple[str, ...]] = {
    "flux": ("flux", "fluxes", "spectra", "spectrum", "spec", "norm_flux", "flux_norm"),
    "flux_err": (
        "flux_err",
        "flux_error",
        "flux_errors",
        "flux_sigma",
        "error",
        "errors",
        "err",
        "e_flux",
        "eflux",
        "sigma",
        "uncertainty",
        "noise",
    ),  # fmt: skip
    "flux_ivar": ("flux_ivar", "ivar", "inverse_variance", "invvar"),
    "flux_var": ("flux_var", "variance", "var"),
    "wavelength": ("wavelength", "wavelengths", "wave", "lambda", "lam", "wl"),
    "log_wavelength": ("log_wavelength", "loglam", "logwave", "loglambda", "log_wave"),
    "mask": ("mask", "bad_pixel_mask", "badpix", "pixmask", "bitmask"),
    "ids": (
        "ids",
        "id",
        "name",
        "names",
        "star_id",
        "obj_id",
        "object_id",
        "objid",
        "apogee_id",
        "designation",
        "source_id",
        "star",
    ),  # fmt: skip
    "group": ("group",),
}
_ERRORS = ("flux_err", "flux_ivar", "flux_var")
#: Rows of a per-row wavelength array compared or checked at a time when opened.
_WAVE_BLOCK = 4096
_WAVES = ("wavelength", "log_wavelength")


def _find(names: list[str], given: dict, where: str, what: str) -> dict[str, str]:
    """Role -> name in the file: ``given`` ones checked, the others guessed."""
    unknown = sorted(set(given) - set(NAMES))
    if unknown:
        raise ValueError(f"unknown {what} role(s) {unknown}; roles: {', '.join(NAMES)}")
    lower = {n.lower(): n for n in names}
    found: dict[str, str] = {}
    for role, name in given.items():
        if name not in names:
            raise FileFormatError(
                f"{where}: no {what} {name!r} (for {role}); it holds {names}"
            )
        found[role] = name
    for role, candidates in NAMES.items():
        if role in found or (role in _ERRORS and set(found) & set(_ERRORS)):
            continue
        if role in _WAVES and set(found) & set(_WAVES):
            continue
        hits = [
            lower[c]
            for c in candidates
            if c in lower and lower[c] not in found.values()
        ]
        if len(hits) > 1:
            raise FileFormatError(
                f"{where}: {hits} could each be {role!r}; name the {what}s, e.g. "
                f"{what}s={{{role!r}: {hits[0]!r}, ...}}; it holds {names}"
            )
        if hits:
            found[role] = hits[0]
    errs = [r for r in _ERRORS if r in found]
    waves = [r for r in _WAVES if r in found]
    problems = []
    if "flux" not in found:
        problems.append("no flux")
    if len(errs) != 1:
        problems.append(
            f"errors: {'none' if not errs else ' and '.join(found[r] for r in errs)}"
        )
    if len(waves) != 1:
        problems.append(
            f"wavelength: {'none' if not waves else ' and '.join(found[r] for r in waves)}"
        )
    if problems:
        raise FileFormatError(
            f"{where}: cannot tell the spectra apart ({'; '.join(problems)}); it holds "
            f"{what}s {names}. Name them: {what}s={{'flux': ..., 'flux_err' (or "
            "'flux_ivar', 'flux_var'): ..., 'wavelength' (or 'log_wavelength'): ...}"
        )
    return found


def _unit_scale(unit, where: str) -> float:
    """Angstrom per unit of a wavelength unit string (None: Angstrom)."""
    if unit in (None, ""):
        return 1.0
    import astropy.units as u

    try:
        return float(u.Unit(str(unit)).to(u.AA))
    except (ValueError, u.UnitConversionError) as err:
        raise FileFormatError(
            f"{where}: wavelength unit {unit!r} is not a length"
        ) from err


def _wave_values(raw, role: str, scale: float, where: str, stated: bool) -> np.ndarray:
    wave = np.asarray(raw, np.float64)
    wave = 10.0**wave if role == "log_wavelength" else wave * scale
    finite = wave[np.isfinite(wave)]
    if not stated and finite.size and np.median(finite) < 3000.0:
        # 1500-1700 could be APOGEE in nm or the UV in Angstrom: not guessed
        raise FileFormatError(
            f"{where}: wavelengths {finite.min():.4g}..{finite.max():.4g} without a "
            "unit do not look like Angstrom (nm? micron?); give the dataset a unit "
            "(attribute 'unit' = 'nm', 'um', 'Angstrom', ...)"
        )
    return wave


class _ArrayCatalog(Reader):
    """Rows of array-likes (h5py datasets or memory-mapped FITS columns)."""

    def _set_path(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.paths = [self.path]
        self.source = str(self.path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file")

    def _setup(
        self, arrays: dict, roles: dict[str, str], wave_unit, where: str
    ) -> None:
        self._arrays, self._roles = arrays, roles
        flux = arrays["flux"]
        self._one = flux.ndim == 1
        if flux.ndim not in (1, 2):
            raise FileFormatError(f"{where}: flux {flux.shape} must be (n, P) or (P,)")
        n, p = (1, flux.shape[0]) if self._one else flux.shape
        if n == 0 or p == 0:
            raise FileFormatError(f"{where}: the catalog holds no spectra")
        self._err_role = next(r for r in _ERRORS if r in arrays)
        if arrays[self._err_role].shape != flux.shape:
            raise FileFormatError(
                f"{where}: {roles[self._err_role]} {arrays[self._err_role].shape} must have "
                f"the shape of {roles['flux']} {flux.shape}"
            )
        self._wave_role = next(r for r in _WAVES if r in arrays)
        self._wave_scale = _unit_scale(wave_unit, where)
        stated = wave_unit not in (None, "") or self._wave_role == "log_wavelength"
        wave = arrays[self._wave_role]
        self._n, self._p = n, p
        self.per_row_wavelength = False
        if wave.shape == (p,) or (wave.shape == (1, p)):
            grid = _wave_values(
                wave[...], self._wave_role, self._wave_scale, where, stated
            )
            grid = grid.reshape(p)
        elif not self._one and wave.shape == (n, p):
            # compared a block of rows at a time: a catalog's grids are not all read
            # into memory (they are read with their rows if they differ)
            self._stated = stated
            first = self._grid_rows(0, 1)[0]
            grid = first  # every row on one grid: said so
            for a in range(0, n, _WAVE_BLOCK):
                rows = self._grid_rows(a, min(a + _WAVE_BLOCK, n))
                if not np.array_equal(
                    rows, np.broadcast_to(first, rows.shape), equal_nan=True
                ):
                    grid = None
                    break
            if grid is None:
                self.per_row_wavelength, self.wavelength = True, None
                for a in range(0, n, _WAVE_BLOCK):  # checked once, block by block
                    try:
                        check_row_grids(self._grid_rows(a, min(a + _WAVE_BLOCK, n)), a)
                    except ValueError as err:
                        raise FileFormatError(f"{where}: invalid {err}") from err
        else:
            raise FileFormatError(
                f"{where}: {roles[self._wave_role]} {wave.shape} must be ({p},) or "
                f"({n}, {p}) for flux {flux.shape}"
            )
        if grid is not None:
            try:
                check_wavelength(grid)
            except ValueError as err:
                raise FileFormatError(f"{where}: invalid wavelength: {err}") from err
            self.wavelength = grid
            self.wavelength.setflags(write=False)
        for role in ("mask",):
            if role in arrays and arrays[role].shape != flux.shape:
                raise FileFormatError(
                    f"{where}: {roles[role]} {arrays[role].shape} must have the shape "
                    f"of {roles['flux']} {flux.shape}"
                )
        for role in ("ids", "group"):
            if role in arrays and arrays[role].shape[:1] != (n,):
                raise FileFormatError(
                    f"{where}: {roles[role]} {arrays[role].shape} must be ({n},), one per "
                    "spectrum"
                )
        self.has_mask = "mask" in arrays
        self.has_ids = "ids" in arrays
        self.has_group = "group" in arrays

    def __len__(self) -> int:
        return self._n

    @property
    def n_pix(self) -> int:
        return self._p

    def options(self) -> dict:
        return {"roles": dict(self._roles), "wavelength_scale": self._wave_scale}

    def _rows(self, name: str, start: int, stop: int) -> np.ndarray:
        arr = self._arrays[name]
        if self._one and name not in ("ids", "group"):
            return np.asarray(arr[...])[None]
        return np.asarray(arr[start:stop])

    def read_wavelength(self, start: int, stop: int) -> np.ndarray:
        if not self.per_row_wavelength:
            return super().read_wavelength(start, stop)
        start, stop = self._check_range(start, stop)
        return self._grid_rows(start, stop)

    def _grid_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a per-row wavelength array, in Angstrom."""
        return _wave_values(
            self._arrays[self._wave_role][start:stop], self._wave_role,
            self._wave_scale, self.source, self._stated,
        )  # fmt: skip

    def read_group(self) -> np.ndarray | None:
        return self._strings("group", 0, self._n) if self.has_group else None

    def _strings(self, role: str, start: int, stop: int) -> np.ndarray:
        raw = np.asarray(self._arrays[role][start:stop]).reshape(stop - start, -1)[:, 0]
        return np.array(
            [
                x.decode().strip() if isinstance(x, bytes) else str(x).strip()
                for x in raw
            ],
            dtype=str,
        )

    def read(self, start: int, stop: int) -> CatalogChunk:
        start, stop = self._check_range(start, stop)
        try:
            flux = self._rows("flux", start, stop).astype(np.float64)
            raw = self._rows(self._err_role, start, stop).astype(np.float64)
            mask = None
            if self.has_mask:
                m = self._rows("mask", start, stop)
                mask = m.astype(bool) if m.dtype == bool else (m != 0)
            ids = self._strings("ids", start, stop) if self.has_ids else None
            group = self._strings("group", start, stop) if self.has_group else None
        except (OSError, KeyError, RuntimeError, TypeError, ValueError) as err:
            # ValueError: UnicodeDecodeError of a damaged id, a FITS column whose
            # heap is damaged; TypeError: a FITS file shorter than its header says
            raise FileFormatError(
                f"{self.source}: rows [{start}, {stop}) are corrupt or unreadable ({err})"
            ) from err
        with np.errstate(divide="ignore", invalid="ignore"):
            if self._err_role == "flux_ivar":
                err = np.where(raw > 0, 1.0 / np.sqrt(raw), np.inf)
            elif self._err_role == "flux_var":
                err = np.sqrt(raw)
            else:
                err = raw
        wave = self.read_wavelength(start, stop) if self.per_row_wavelength else None
        return CatalogChunk(flux, err, mask, ids, wave, group)


class PlainHDF5Catalog(_ArrayCatalog):
    """Any HDF5 file of spectra (see the module docstring): top-level datasets named
    by ``datasets`` (role -> dataset name) or guessed.

    Raises:
        FileNotFoundError: no such file.
        payne_lite.FileFormatError: not HDF5; names that cannot be told apart (the
            message lists the datasets); shapes that do not fit together.
    """

    name = "hdf5"

    @classmethod
    def claims(cls, paths: list[Path]) -> bool:
        return len(paths) == 1 and has_suffix(paths[0], HDF5_SUFFIXES)

    @classmethod
    def open(cls, paths, **options) -> PlainHDF5Catalog:
        return cls(one_path(paths, cls.name), **options)

    def __init__(self, path: str | os.PathLike, *, datasets: dict | None = None):
        self._set_path(path)
        try:
            self._f = h5py.File(self.path, "r")
        except (OSError, KeyError, RuntimeError) as err:
            raise FileFormatError(
                f"{self.path}: not a readable HDF5 file ({err})"
            ) from err
        try:
            names = [k for k, v in self._f.items() if isinstance(v, h5py.Dataset)]
            roles = _find(names, dict(datasets or {}), self.source, "dataset")
            arrays = {role: self._f[name] for role, name in roles.items()}
            wave = arrays[next(r for r in _WAVES if r in arrays)]
            unit = next(
                (wave.attrs[k] for k in ("unit", "units", "UNIT") if k in wave.attrs),
                None,
            )
            if isinstance(unit, bytes):
                unit = unit.decode()
            self._setup(arrays, roles, unit, self.source)
        except (OSError, KeyError, RuntimeError) as err:  # h5py on damaged metadata
            self._f.close()
            raise FileFormatError(f"{self.path}: damaged HDF5 file ({err})") from err
        except BaseException:
            self._f.close()
            raise

    def close(self) -> None:
        self._f.close()


class FitsTableCatalog(_ArrayCatalog):
    """A FITS binary table of spectra, one row each (see the module docstring):
    array columns named by ``columns`` (role -> column name) or guessed; the table
    is the first binary-table HDU, or ``hdu`` (index or name).

    Raises:
        FileNotFoundError: no such file.
        payne_lite.FileFormatError: not FITS, no binary table, names that cannot be
            told apart (the message lists the columns), shapes that disagree.
    """

    name = "fits-table"

    @classmethod
    def claims(cls, paths: list[Path]) -> bool:
        if len(paths) != 1 or not has_suffix(paths[0], FITS_SUFFIXES):
            return False
        from astropy.io import fits

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. truncated: reported when read
                with fits.open(paths[0], memmap=True) as hdul:
                    return len(hdul) > 1 and isinstance(hdul[1], fits.BinTableHDU)
        except (OSError, ValueError, TypeError, KeyError):
            return False  # the APOGEE reader reports what is wrong with it

    @classmethod
    def open(cls, paths, **options) -> FitsTableCatalog:
        return cls(one_path(paths, cls.name), **options)

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        columns: dict | None = None,
        hdu: int | str | None = None,
    ):
        from astropy.io import fits

        self._set_path(path)
        self._hdul, n_hdu = open_fits_checked(self.path, memmap=True)
        try:
            self._open_table(columns, hdu, n_hdu)
        except FileFormatError:
            self._hdul.close()
            raise
        except (OSError, ValueError, TypeError, KeyError, fits.VerifyError) as err:
            self._hdul.close()
            raise FileFormatError(
                f"{self.path}: truncated or corrupt FITS file ({type(err).__name__}: "
                f"{' '.join(str(err).split())[:200]})"
            ) from err
        except BaseException:
            self._hdul.close()
            raise

    def _open_table(self, columns, hdu, n_hdu: int) -> None:
        """Find the table and its columns (the HDUs were verified against their
        CHECKSUM / DATASUM where they have them: a table's data in one pass)."""
        from astropy.io import fits

        summed = ["CHECKSUM" in h.header for h in self._hdul[: min(n_hdu, 2)]]
        if any(summed) and not all(summed):
            raise FileFormatError(
                f"{self.path}: damaged FITS file: HDU {summed.index(False)} has no "
                f"CHECKSUM card, HDU {summed.index(True)} has one"
            )
        tables = [h for h in self._hdul if isinstance(h, fits.BinTableHDU)]
        table = self._hdul[hdu] if hdu is not None else (tables[0] if tables else None)
        if not isinstance(table, fits.BinTableHDU):
            raise FileFormatError(f"{self.path}: no binary table HDU of spectra")
        self._hdu = hdu
        names = list(table.columns.names)
        roles = _find(names, dict(columns or {}), self.source, "column")
        data = table.data
        arrays = {role: data[name] for role, name in roles.items()}
        if arrays["flux"].ndim == 1:  # one scalar per row: not spectra
            raise FileFormatError(
                f"{self.path}: column {roles['flux']!r} holds one value per row; "
                "spectra are array columns (one spectrum per row)"
            )
        wave_col = table.columns[roles[next(r for r in _WAVES if r in roles)]]
        self._setup(arrays, roles, wave_col.unit, self.source)

    def options(self) -> dict:
        return {**super().options(), "hdu": self._hdu}

    def close(self) -> None:
        self._hdul.close()
