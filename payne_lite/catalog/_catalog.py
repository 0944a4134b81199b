"""Catalogs of observed spectra: an HDF5 layout, an APOGEE FITS reader, and fit_catalog.

``fit_catalog(path_in, path_out, emulator, ...)`` streams a catalog in chunks of rows,
fits every chunk with :func:`payne_lite.fit` (in this process, or on Dask workers with
``client=``; see :mod:`payne_lite.catalog`) and writes one results table; only one
chunk of spectra is in memory at a time (a few per worker with Dask). Each chunk's
results are kept in ``<path_out>.parts/`` as they are made, so a killed run resumes
where it stopped (see :func:`fit_catalog`).

Catalog file layout (``format = "payne_lite.Catalog"``, ``format_version = 1``):

=====================  =========================  ==========================================
item                   shape / type               meaning
=====================  =========================  ==========================================
``wavelength``         (P,) float64               observed vacuum wavelength [Angstrom],
                                                  strictly increasing
``flux``               (n, P) float32 or float64  observed flux (dtype kept as written)
``flux_err``           (n, P) like ``flux``       1-sigma errors; non-finite or <= 0 means
                                                  the pixel is unusable
``mask``               (n, P) bool                optional, True = ignore the pixel
``ids``                (n,) UTF-8 str             optional, one identifier per spectrum
attr ``meta``          JSON object                provenance
=====================  =========================  ==========================================

The row datasets are stored in chunks of whole rows (about 1 MB each), so reading a
slab of rows touches only those rows; ``flux``, ``flux_err`` and ``mask`` carry
Fletcher-32 checksums, so a damaged chunk is reported instead of read as numbers
(variable-length ``ids`` cannot). ``flux`` and ``flux_err`` are not compressed (noisy
floats barely compress and would cost time on every read); the mask is (gzip).

APOGEE FITS files (:func:`read_apogee_fits`, aspcapStar / apStar-like): flux in HDU 1,
errors in HDU 2, an optional integer pixel bitmask in HDU 3 (apStar; aspcapStar's HDU 3
holds the floating-point best-fit model and is not a mask, so floating HDU 3 data are
ignored). A 2-D HDU (apStar with visits) gives its first row, the combined spectrum.
Wavelengths come from ``CRVAL1``, ``CDELT1`` (and ``CRPIX1``, default 1) of HDU 1's
header, or the primary header's if HDU 1 lacks them: ``log10(lambda) = CRVAL1 + CDELT1
(i + 1 - CRPIX1)`` as in APOGEE (``DC-FLAG = 1`` or ``CTYPE1 = 'LOG-LINEAR'``); with
``DC-FLAG = 0`` or a linear ``CTYPE1`` the same formula gives lambda in Angstrom.
Several such files read as one catalog (:func:`open_catalog` with a list) must share
one wavelength grid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from .. import _h5
from .._api import fit
from .._validate import as_float_array, check_wavelength, warn_if_near_grid
from ..errors import FileFormatError, WavelengthGridWarning
from ..observe import Instrument
from ..options import options_for

_log = logging.getLogger(__name__)

CATALOG_FORMAT = "payne_lite.Catalog"
CATALOG_VERSION = 1

#: Spectra per fit_catalog chunk (the unit of reading, fitting and, later, resuming).
#: A multiple of fit()'s default ``batch_size`` (256) keeps every batch full. Peak
#: memory grows as about ``chunk_size x n_pix x 60`` bytes (float64 copies in fit).
DEFAULT_CHUNK_SIZE = 512
#: Target size of one HDF5 storage chunk of ``flux`` / ``flux_err`` [bytes].
_CHUNK_BYTES = 1 << 20

#: APOGEE PIXMASK bits that make a pixel unusable: 0 BADPIX, 1 CRPIX, 2 SATPIX,
#: 3 UNFIXABLE, 4 BADDARK, 5 BADFLAT, 6 BADERR, 7 NOSKY. (Bits 9-14: persistence,
#: significant sky / telluric lines, are warnings and are kept.)
APOGEE_BAD_PIXEL_BITS = 0b1111_1111

#: File name endings read as HDF5 catalogs and as APOGEE FITS files.
HDF5_SUFFIXES = (".h5", ".hdf5")
FITS_SUFFIXES = (".fits", ".fit", ".fits.gz", ".fit.gz")


class CatalogChunk(NamedTuple):
    """Rows ``start:stop`` of a catalog.

    Attributes:
        flux: (m, P) observed flux.
        flux_err: (m, P) 1-sigma errors.
        mask: (m, P) bool, True = ignore; None when the catalog has no mask.
        ids: (m,) str identifiers; None when the catalog has none.
    """

    flux: np.ndarray
    flux_err: np.ndarray
    mask: np.ndarray | None
    ids: np.ndarray | None


# ======================================================================================
# HDF5 catalogs: writing
# ======================================================================================
def _check_rows(flux, flux_err, mask, ids, n_pix: int | None, where: str):
    """Validated (flux, flux_err, mask, ids) copies of one block of rows."""
    f = np.asarray(flux)
    e = np.asarray(flux_err)
    dtype = np.float32 if f.dtype == np.float32 else np.float64
    f = as_float_array(f, "flux", ndim=2, dtype=dtype)
    e = as_float_array(e, "flux_err", ndim=2, dtype=dtype)
    if f.shape != e.shape:
        raise ValueError(
            f"{where}: flux {f.shape} and flux_err {e.shape} must have the same shape "
            "(n_spec, n_pix)"
        )
    if n_pix is not None and f.shape[1] != n_pix:
        raise ValueError(
            f"{where}: flux {f.shape} has {f.shape[1]} pixels, the wavelength grid has "
            f"{n_pix}: expected (n_spec, {n_pix})"
        )
    m = None
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype != bool:
            raise ValueError(
                f"{where}: mask must be boolean (True = ignore), got {m.dtype}"
            )
        if m.shape != f.shape:
            raise ValueError(
                f"{where}: mask {m.shape} must have the shape of flux {f.shape}"
            )
    i = None
    if ids is not None:
        if np.shape(ids) != (f.shape[0],):
            raise ValueError(
                f"{where}: ids {np.shape(ids)} must be ({f.shape[0]},), one per spectrum"
            )
        i = np.array(
            [s.decode() if isinstance(s, bytes) else str(s) for s in np.asarray(ids)],
            dtype=str,
        )
    return f, e, m, i


class CatalogWriter:
    """Appends rows to an open catalog file; made by :func:`catalog_writer`."""

    def __init__(
        self, f: h5py.File, path: Path, n_pix: int, dtype, with_mask, with_ids
    ):
        self._f, self.path, self.n_pix = f, path, n_pix
        self._dtype = np.dtype(dtype)
        self.with_mask, self.with_ids = with_mask, with_ids
        rows = max(1, _CHUNK_BYTES // (n_pix * self._dtype.itemsize))
        self._sets = {}
        for name in ("flux", "flux_err"):
            self._sets[name] = f.create_dataset(
                name,
                shape=(0, n_pix),
                maxshape=(None, n_pix),
                dtype=self._dtype,
                chunks=(rows, n_pix),
                fletcher32=True,
            )
        if with_mask:
            self._sets["mask"] = f.create_dataset(
                "mask",
                shape=(0, n_pix),
                maxshape=(None, n_pix),
                dtype=bool,
                chunks=(rows, n_pix),
                fletcher32=True,
                compression="gzip",
                compression_opts=4,
            )
        if with_ids:
            self._sets["ids"] = f.create_dataset(
                "ids",
                shape=(0,),
                maxshape=(None,),
                dtype=h5py.string_dtype(),
                chunks=(max(rows, 1024),),  # variable-length: no checksum filter
            )
        self.n_spec = 0

    def append(self, flux, flux_err, *, mask=None, ids=None) -> None:
        """Append rows: flux, flux_err (m, P); mask (m, P) bool and ids (m,) if the
        writer was opened ``with_mask`` / ``with_ids`` (and only then)."""
        where = f"{self.path}: append"
        if (mask is not None) != self.with_mask:
            raise ValueError(
                f"{where}: the catalog was opened with_mask={self.with_mask}; "
                f"got mask={'an array' if mask is not None else 'None'}"
            )
        if (ids is not None) != self.with_ids:
            raise ValueError(
                f"{where}: the catalog was opened with_ids={self.with_ids}; "
                f"got ids={'an array' if ids is not None else 'None'}"
            )
        f, e, m, i = _check_rows(flux, flux_err, mask, ids, self.n_pix, where)
        start, stop = self.n_spec, self.n_spec + f.shape[0]
        for name, arr in (("flux", f), ("flux_err", e), ("mask", m), ("ids", i)):
            if arr is None:
                continue
            ds = self._sets[name]
            ds.resize(stop, axis=0)
            if name.startswith("flux"):
                arr = arr.astype(self._dtype, copy=False)
            elif name == "ids":
                arr = arr.astype(object)
            ds[start:stop] = arr
        self.n_spec = stop


@contextlib.contextmanager
def catalog_writer(
    path: str | os.PathLike,
    wavelength,
    *,
    dtype=np.float32,
    with_mask: bool = False,
    with_ids: bool = False,
    meta: dict | None = None,
    overwrite: bool = False,
) -> Iterator[CatalogWriter]:
    """Write a catalog in pieces: ``with catalog_writer(...) as w: w.append(...)``.

    The file appears (atomically) when the block ends without an error; nothing of
    it is left behind otherwise. Memory stays at one appended block, so catalogs larger
    than memory can be written.

    Args:
        path: the ``.h5`` file to write.
        wavelength: (P,) observed vacuum wavelength [Angstrom], strictly increasing.
        dtype: storage dtype of flux and flux_err (float32 or float64).
        with_mask, with_ids: whether every :meth:`CatalogWriter.append` passes a mask
            / ids.
        meta: JSON-compatible provenance stored as ``attrs["meta"]``.
        overwrite: replace an existing file (otherwise FileExistsError).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: a bad wavelength grid or dtype; no spectra appended.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    wave = as_float_array(wavelength, "wavelength", ndim=1)
    check_wavelength(wave)
    if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
    with _h5.atomic_h5_writer(path, CATALOG_FORMAT, CATALOG_VERSION) as f:
        f.create_dataset("wavelength", data=wave)
        _h5.set_json_attr(f, "meta", dict(meta or {}))
        writer = CatalogWriter(f, path, wave.size, dtype, with_mask, with_ids)
        yield writer
        if writer.n_spec == 0:
            raise ValueError(
                f"{path}: no spectra were appended; a catalog is never empty"
            )


def write_catalog(
    path: str | os.PathLike,
    flux,
    flux_err,
    wavelength,
    *,
    mask=None,
    ids=None,
    meta: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write spectra to one catalog file (layout in the module docstring).

    Args:
        path: the ``.h5`` file to write (atomically).
        flux: (n, P) observed flux; float32 is stored as float32, anything else as
            float64.
        flux_err: (n, P) 1-sigma errors.
        wavelength: (P,) observed vacuum wavelength [Angstrom], strictly increasing.
        mask: optional (n, P) bool, True = ignore the pixel.
        ids: optional (n,) identifiers, stored as str.
        meta: JSON-compatible provenance.
        overwrite: replace an existing file (otherwise FileExistsError).

    Returns:
        The path written.

    Raises:
        ValueError: shapes that do not fit together (named), no spectra, a bad
            wavelength grid.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    wave = as_float_array(wavelength, "wavelength", ndim=1)
    f, e, m, i = _check_rows(flux, flux_err, mask, ids, wave.size, str(path))
    if f.shape[0] == 0:
        raise ValueError(f"{path}: flux {f.shape} holds no spectra")
    with catalog_writer(
        path,
        wave,
        dtype=f.dtype,
        with_mask=m is not None,
        with_ids=i is not None,
        meta=meta,
        overwrite=overwrite,
    ) as w:
        w.append(f, e, mask=m, ids=i)
    return Path(path)


# ======================================================================================
# Readers
# ======================================================================================
class _Reader:
    """Common interface: ``len``, ``wavelength`` (P,), ``read(start, stop)``, ``source``.

    Readers are context managers; :meth:`close` releases open files.
    """

    source: str
    wavelength: np.ndarray
    has_mask: bool
    has_ids: bool

    def __len__(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def read(self, start: int, stop: int) -> CatalogChunk:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_range(self, start: int, stop: int) -> tuple[int, int]:
        n = len(self)
        if not (0 <= start < stop <= n):
            raise IndexError(f"{self.source}: rows [{start}, {stop}) outside [0, {n})")
        return int(start), int(stop)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.source!r}, n_spec={len(self)}, "
            f"n_pix={self.wavelength.size}, mask={self.has_mask}, ids={self.has_ids})"
        )


class HDF5Catalog(_Reader):
    """A catalog file written by :func:`write_catalog`, read a slab of rows at a time.

    The file stays open until :meth:`close` (or the end of a ``with`` block); the
    constructor checks format, version and shapes and reads only ``wavelength``.

    Raises:
        FileNotFoundError: no such file.
        payne_lite.FileFormatError: not a catalog file, another version, corrupt or
            truncated, missing datasets, shapes that do not fit together, no spectra.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.source = str(self.path)
        self._stack = contextlib.ExitStack()
        try:
            self._f = self._stack.enter_context(
                _h5.open_checked(self.path, CATALOG_FORMAT, (CATALOG_VERSION,))
            )
            self._open()
        except BaseException:
            self._stack.close()
            raise

    def _open(self) -> None:
        p, f = self.path, self._f
        wave = _h5.read_dataset(f, "wavelength", p)
        try:
            wave = as_float_array(wave, "wavelength", ndim=1)
            check_wavelength(wave)
        except ValueError as err:
            raise FileFormatError(f"{p}: invalid wavelength: {err}") from err
        for name in ("flux", "flux_err"):
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise FileFormatError(f"{p}: missing dataset {name!r}")
        flux, err = f["flux"], f["flux_err"]
        n_pix = wave.size
        if flux.ndim != 2 or flux.shape[1] != n_pix:
            raise FileFormatError(
                f"{p}: flux {flux.shape} must be (n_spec, {n_pix}) for the "
                f"{n_pix}-pixel wavelength grid"
            )
        if err.shape != flux.shape:
            raise FileFormatError(
                f"{p}: flux_err {err.shape} must have the shape of flux {flux.shape}"
            )
        if flux.dtype.kind != "f" or err.dtype.kind != "f":
            raise FileFormatError(
                f"{p}: flux and flux_err must be floating point, got {flux.dtype} "
                f"and {err.dtype}"
            )
        if flux.shape[0] == 0:
            raise FileFormatError(f"{p}: the catalog holds no spectra")
        self._mask = f.get("mask")
        if self._mask is not None and (
            self._mask.shape != flux.shape or self._mask.dtype != bool
        ):
            raise FileFormatError(
                f"{p}: mask {self._mask.shape} {self._mask.dtype} must be bool with "
                f"the shape of flux {flux.shape}"
            )
        self._ids = f.get("ids")
        if self._ids is not None and self._ids.shape != (flux.shape[0],):
            raise FileFormatError(
                f"{p}: ids {self._ids.shape} must be ({flux.shape[0]},), one per spectrum"
            )
        self._flux, self._err = flux, err
        self.wavelength = wave
        self.wavelength.setflags(write=False)
        self.has_mask = self._mask is not None
        self.has_ids = self._ids is not None
        self.meta = _h5.get_json_attr(f, "meta", p) if "meta" in f.attrs else {}

    def __len__(self) -> int:
        return int(self._flux.shape[0])

    def read(self, start: int, stop: int) -> CatalogChunk:
        """Rows ``start:stop`` (only those are read from disk)."""
        start, stop = self._check_range(start, stop)
        try:
            mask = self._mask[start:stop] if self.has_mask else None
            ids = None
            if self.has_ids:
                ids = np.array(self._ids.asstr()[start:stop], dtype=str)
            return CatalogChunk(
                self._flux[start:stop], self._err[start:stop], mask, ids
            )
        except (OSError, KeyError, RuntimeError) as err:
            raise FileFormatError(
                f"{self.source}: rows [{start}, {stop}) are corrupt or unreadable "
                f"({err})"
            ) from err

    def close(self) -> None:
        self._stack.close()


# --------------------------------------------------------------------------------------
# APOGEE FITS
# --------------------------------------------------------------------------------------
class ApogeeSpectrum(NamedTuple):
    """One spectrum from an APOGEE-like FITS file (see the module docstring).

    Attributes:
        flux: (P,) flux as stored (HDU 1, first row).
        flux_err: (P,) 1-sigma errors (HDU 2).
        mask: (P,) bool, True = a pixel with a bad bit set in the HDU 3 bitmask
            (all False without an integer HDU 3).
        wavelength: (P,) vacuum wavelength [Angstrom] from the header.
        id: the file name without ``.fits`` / ``.fits.gz``.
    """

    flux: np.ndarray
    flux_err: np.ndarray
    mask: np.ndarray
    wavelength: np.ndarray
    id: str


def _fits_id(path: Path) -> str:
    name = path.name
    for suffix in sorted(FITS_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _fits_wavelength(path: Path, hdul, n_pix: int) -> np.ndarray:
    hdr = hdul[1].header
    if "CRVAL1" not in hdr or ("CDELT1" not in hdr and "CD1_1" not in hdr):
        hdr = hdul[0].header
    if "CRVAL1" not in hdr or ("CDELT1" not in hdr and "CD1_1" not in hdr):
        raise FileFormatError(
            f"{path}: no wavelength keywords: expected CRVAL1 and CDELT1 (log10 "
            "wavelength, as in APOGEE) in the header of HDU 1 or the primary HDU"
        )
    try:
        crval = float(hdr["CRVAL1"])
        cdelt = float(hdr["CDELT1"] if "CDELT1" in hdr else hdr["CD1_1"])
        crpix = float(hdr.get("CRPIX1", 1.0))
    except (TypeError, ValueError) as err:
        raise FileFormatError(f"{path}: CRVAL1/CDELT1/CRPIX1 are not numbers") from err
    ctype = str(hdr.get("CTYPE1", "")).upper()
    dc_flag = hdr.get("DC-FLAG")
    log = dc_flag == 1 or "LOG" in ctype or (dc_flag is None and not ctype)
    x = crval + cdelt * (np.arange(n_pix) + 1.0 - crpix)
    wave = 10.0**x if log else x
    try:
        check_wavelength(wave)
    except ValueError as err:
        raise FileFormatError(
            f"{path}: header wavelength (CRVAL1={crval:g}, CDELT1={cdelt:g}, "
            f"{'log10' if log else 'linear'}) is invalid: {err}"
        ) from err
    return wave


def _first_row(path: Path, data, what: str) -> np.ndarray:
    if data is None:
        raise FileFormatError(f"{path}: {what} holds no data")
    arr = np.asarray(data)
    if arr.ndim == 2:
        arr = arr[0]  # apStar: row 0 is the combined spectrum, then the visits
    if arr.ndim != 1 or arr.size < 2:
        raise FileFormatError(
            f"{path}: {what} {np.shape(data)} must be (n_pix,) or (n_rows, n_pix)"
        )
    return arr


def read_apogee_fits(
    path: str | os.PathLike,
    *,
    bad_bits: int = APOGEE_BAD_PIXEL_BITS,
    wavelength_only: bool = False,
) -> ApogeeSpectrum:
    """One spectrum from an APOGEE aspcapStar / apStar-like FITS file.

    Args:
        path: the FITS file (see the module docstring for the expected layout).
        bad_bits: bits of an integer HDU 3 bitmask that mark a pixel as bad (default
            :data:`APOGEE_BAD_PIXEL_BITS`).
        wavelength_only: check the file and read its header only (flux, flux_err and
            mask are then empty arrays).

    Raises:
        FileNotFoundError: no such file.
        payne_lite.FileFormatError: not FITS, or without flux in HDU 1 and errors in
            HDU 2, or without wavelength keywords, or with shapes that disagree.
    """
    from astropy.io import fits

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        hdul = fits.open(path, memmap=False)
    except (OSError, ValueError, TypeError) as err:
        raise FileFormatError(f"{path}: not a readable FITS file ({err})") from err
    with hdul:
        try:
            with warnings.catch_warnings():
                # astropy only warns on a short file, then reads fewer HDUs
                warnings.filterwarnings("error", message=".*may have been truncated")
                n_hdu = len(hdul)
        except (OSError, ValueError, UserWarning) as err:
            raise FileFormatError(
                f"{path}: truncated or corrupt FITS file ({err})"
            ) from err
        if n_hdu < 3:
            raise FileFormatError(
                f"{path}: expected an APOGEE-like FITS file with flux in HDU 1 and "
                f"errors in HDU 2, found {n_hdu} HDU(s)"
            )
        for k, what in ((1, "flux"), (2, "error")):
            if not isinstance(hdul[k], fits.ImageHDU | fits.CompImageHDU):
                raise FileFormatError(
                    f"{path}: HDU {k} ({what}) must be an image, got "
                    f"{type(hdul[k]).__name__}"
                )
        shape = hdul[1].shape
        if len(shape) not in (1, 2) or shape[-1] < 2:
            raise FileFormatError(
                f"{path}: HDU 1 (flux) {shape} must be (n_pix,) or (n_rows, n_pix)"
            )
        wave = _fits_wavelength(path, hdul, shape[-1])
        if hdul[2].shape[-1:] != shape[-1:]:
            raise FileFormatError(
                f"{path}: HDU 2 (error) {hdul[2].shape} does not match HDU 1 (flux) "
                f"{shape}"
            )
        empty = np.zeros(0)
        if wavelength_only:
            return ApogeeSpectrum(
                empty, empty, empty.astype(bool), wave, _fits_id(path)
            )
        try:
            flux = _first_row(path, hdul[1].data, "HDU 1 (flux)")
            error = _first_row(path, hdul[2].data, "HDU 2 (error)")
            mask = np.zeros(flux.shape, bool)
            if len(hdul) > 3 and isinstance(hdul[3], fits.ImageHDU):
                data = hdul[3].data
                if data is not None and np.asarray(data).dtype.kind in "iu":
                    bits = _first_row(path, data, "HDU 3 (bitmask)")
                    if bits.shape != flux.shape:
                        raise FileFormatError(
                            f"{path}: HDU 3 (bitmask) {data.shape} does not match "
                            f"HDU 1 (flux) {shape}"
                        )
                    mask = (bits.astype(np.int64) & int(bad_bits)) != 0
        except (OSError, ValueError, TypeError) as err:
            if isinstance(err, FileFormatError):
                raise
            raise FileFormatError(
                f"{path}: truncated or corrupt FITS data ({err})"
            ) from err
    if error.shape != flux.shape:
        raise FileFormatError(
            f"{path}: HDU 2 (error) {error.shape} does not match HDU 1 (flux) "
            f"{flux.shape}"
        )
    # FITS is big-endian: hand back native arrays
    flux = flux.astype(flux.dtype.newbyteorder("="))
    error = error.astype(error.dtype.newbyteorder("="))
    return ApogeeSpectrum(flux, error, mask, wave, _fits_id(path))


class ApogeeFitsCatalog(_Reader):
    """A list of APOGEE-like FITS files (one spectrum each) read as one catalog.

    The constructor reads every file's headers (not its data) and refuses the list
    unless all files have the expected HDUs and share the first file's wavelength grid.
    ``read(start, stop)`` opens files ``start:stop`` only. The catalog always has a
    mask (from HDU 3 bitmasks where present) and ids (file names).

    Raises:
        FileNotFoundError: a missing file.
        payne_lite.FileFormatError: a file that is not APOGEE-like (see
            :func:`read_apogee_fits`) or whose wavelength grid differs.
        ValueError: an empty list.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        bad_bits: int = APOGEE_BAD_PIXEL_BITS,
    ):
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("no FITS files given: the catalog holds no spectra")
        self.bad_bits = int(bad_bits)
        first = self.paths[0]
        self.source = (
            str(first)
            if len(self.paths) == 1
            else (f"{first} and {len(self.paths) - 1} more FITS file(s)")
        )
        wave = None
        for p in self.paths:
            w = read_apogee_fits(p, wavelength_only=True).wavelength
            if wave is None:
                wave = w
            elif w.shape != wave.shape or not np.array_equal(w, wave):
                raise FileFormatError(
                    f"{p}: wavelength grid ({w.size} pixels, {w[0]:.3f}-{w[-1]:.3f} A) "
                    f"differs from {first}'s ({wave.size} pixels, "
                    f"{wave[0]:.3f}-{wave[-1]:.3f} A); one catalog needs one grid"
                )
        self.wavelength = wave
        self.wavelength.setflags(write=False)
        self.has_mask = True
        self.has_ids = True

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, start: int, stop: int) -> CatalogChunk:
        """Spectra of files ``start:stop``; their grids are checked again."""
        start, stop = self._check_range(start, stop)
        rows = [
            read_apogee_fits(p, bad_bits=self.bad_bits) for p in self.paths[start:stop]
        ]
        for p, r in zip(self.paths[start:stop], rows, strict=True):
            if not np.array_equal(r.wavelength, self.wavelength):
                raise FileFormatError(
                    f"{p}: wavelength grid changed since it was opened"
                )
        dtype = np.result_type(*(r.flux.dtype for r in rows), np.float32)
        return CatalogChunk(
            np.stack([r.flux for r in rows]).astype(dtype, copy=False),
            np.stack([r.flux_err for r in rows]).astype(dtype, copy=False),
            np.stack([r.mask for r in rows]),
            np.array([r.id for r in rows], dtype=str),
        )


def _is_fits(path: Path) -> bool:
    return any(path.name.lower().endswith(s) for s in FITS_SUFFIXES)


def open_catalog(source, **kw) -> HDF5Catalog | ApogeeFitsCatalog:
    """A reader for ``source``: a catalog ``.h5`` file, or one or more APOGEE FITS files.

    Args:
        source: path of a ``.h5``/``.hdf5`` catalog (:func:`write_catalog`), or of a
            ``.fits`` file, or a list of ``.fits`` paths (one spectrum each), or a
            reader (returned as is).
        **kw: passed to :class:`ApogeeFitsCatalog` (``bad_bits``).

    Returns:
        A reader with ``len()``, ``wavelength`` (P,), ``has_mask``, ``has_ids`` and
        ``read(start, stop) -> CatalogChunk``; use it as a context manager.

    Raises:
        ValueError: an unknown file type, an empty list, a list mixing HDF5 and FITS.
        FileNotFoundError, payne_lite.FileFormatError: see the readers.
    """
    if isinstance(source, _Reader):
        return source
    paths = (
        [Path(source)]
        if isinstance(source, str | os.PathLike)
        else [Path(p) for p in source]
    )
    if not paths:
        raise ValueError("no catalog files given")
    if all(_is_fits(p) for p in paths):
        return ApogeeFitsCatalog(paths, **kw)
    if len(paths) == 1 and paths[0].suffix.lower() in HDF5_SUFFIXES:
        if kw:
            raise ValueError(f"{sorted(kw)} apply to FITS catalogs only")
        return HDF5Catalog(paths[0])
    bad = [str(p) for p in paths if not _is_fits(p)]
    if len(paths) > 1:
        raise ValueError(
            f"a catalog is one HDF5 file ({'/'.join(HDF5_SUFFIXES)}) or a list of FITS "
            f"files ({'/'.join(FITS_SUFFIXES)}); not FITS: {', '.join(bad[:3])}"
        )
    raise ValueError(
        f"{paths[0]}: unknown catalog file type {paths[0].suffix!r}; expected an HDF5 "
        f"catalog ({'/'.join(HDF5_SUFFIXES)}) or APOGEE FITS ({'/'.join(FITS_SUFFIXES)})"
    )


def chunk_bounds(n_spec: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n_spec)`` in chunks of ``chunk_size``
    (the last one shorter). Chunk ``i`` always covers the same rows, so a chunk index
    identifies its rows for a given ``chunk_size``."""
    return [(s, min(s + chunk_size, n_spec)) for s in range(0, n_spec, chunk_size)]


def _check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return int(chunk_size)


def iter_catalog(
    source, chunk_size: int = DEFAULT_CHUNK_SIZE, **kw
) -> Iterator[tuple[int, CatalogChunk]]:
    """Yield ``(start, CatalogChunk)`` for consecutive chunks of ``chunk_size`` rows.

    Only one chunk is in memory at a time; files are closed when the iteration ends.
    ``source`` and ``kw`` are as for :func:`open_catalog`.
    """
    chunk_size = _check_chunk_size(chunk_size)
    with open_catalog(source, **kw) as cat:
        for start, stop in chunk_bounds(len(cat), chunk_size):
            yield start, cat.read(start, stop)


# ======================================================================================
# fit_catalog: resumable parts
# ======================================================================================
#: Layout of the parts folder of a fit_catalog run (see :func:`fit_catalog`).
PARTS_FORMAT = "payne_lite.fit_catalog.parts"
PARTS_VERSION = 1
#: The parts folder of ``results.fits`` is ``results.fits.parts`` (same folder).
PARTS_SUFFIX = ".parts"
_MANIFEST = "manifest.json"
#: meta keys a part file carries and the final table does not.
_PART_KEYS = ("parts_key", "chunk", "rows")
#: fit() options that do not change the numbers, so a resume may change them.
_NOT_IDENTITY = ("n_threads",)


def parts_folder(path_out: str | os.PathLike) -> Path:
    """The folder where :func:`fit_catalog` keeps per-chunk results for ``path_out``."""
    path_out = Path(path_out)
    return path_out.with_name(path_out.name + PARTS_SUFFIX)


def _feed(h, obj) -> None:
    """Feed a canonical byte form of ``obj`` to the hash ``h``."""
    if obj is None or isinstance(obj, bool | int | float | str):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    elif isinstance(obj, bytes):
        h.update(b"bytes:" + obj + b";")
    elif isinstance(obj, dict):
        h.update(b"dict{")
        for k in sorted(obj, key=str):
            _feed(h, str(k))
            _feed(h, obj[k])
        h.update(b"}")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        # the model itself, not its provenance (history, meta) or caches (_*)
        h.update(f"{type(obj).__name__}(".encode())
        for f in dataclasses.fields(obj):
            if f.name in ("history", "meta") or f.name.startswith("_"):
                continue
            _feed(h, f.name)
            _feed(h, getattr(obj, f.name))
        h.update(b")")
    elif isinstance(obj, tuple | list):
        h.update(f"{type(obj).__name__}[".encode())
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    elif isinstance(obj, np.generic) or hasattr(obj, "__array__"):
        a = np.ascontiguousarray(np.asarray(obj))
        h.update(f"array:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    else:
        raise TypeError(
            f"cannot record {type(obj).__name__} {obj!r} in the fit_catalog manifest; "
            "pass plain numbers, strings, lists, dicts or arrays"
        )


def _digest(obj) -> str:
    """sha256 (hex) of ``obj``'s canonical form (arrays by dtype, shape and bytes)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _input_identity(cat) -> dict:
    """What identifies the catalog: its files (resolved path, size, mtime), rows, grid."""
    ident = {
        "n_spec": len(cat),
        "n_pix": int(cat.wavelength.size),
        "wavelength_sha256": _digest(cat.wavelength),
        "has_mask": bool(cat.has_mask),
        "has_ids": bool(cat.has_ids),
    }
    if isinstance(cat, HDF5Catalog):
        paths = [cat.path]
    elif isinstance(cat, ApogeeFitsCatalog):
        paths = cat.paths
        ident["bad_bits"] = cat.bad_bits
    else:  # another reader: its description is all there is
        ident["source"] = cat.source
        return ident
    files = []
    for p in paths:
        st = p.stat()
        files.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    # a few files are listed (readable in an error message); many are hashed
    ident["files"] = files if len(files) <= 4 else _digest(files)
    return ident


def _run_identity(cat, emulator, *, mdn, method, chunk_size, mask, p0, fit_kwargs):
    """Everything a resumed run must share with the run that wrote the parts."""
    opts = {k: v for k, v in fit_kwargs.items() if k not in _NOT_IDENTITY}
    opts.pop("mdn", None)
    if hasattr(opts.get("options"), "n_threads"):  # threads never change results
        opts["options"] = dataclasses.replace(opts["options"], n_threads=None)
    ident = {
        "input": _input_identity(cat),
        "emulator_sha256": _digest(emulator),
        "mdn_sha256": None if mdn is None else _digest(mdn),
        "method": method,
        "chunk_size": chunk_size,
        "mask_sha256": None if mask is None else _digest(mask),
        "p0_sha256": None if p0 is None else _digest(np.asarray(p0, np.float64)),
        "fit_options_sha256": _digest(opts),
        "fit_options": sorted(opts),
    }
    return json.loads(json.dumps(ident))  # as it reads back from the manifest


def _differences(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _differences(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def _is_temp(p: Path) -> bool:
    return p.name.startswith(".") and ".tmp" in p.name


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


class _Parts:
    """The parts folder of one fit_catalog run: a manifest and one file per chunk.

    A chunk's file (``chunk-000012.h5``, :func:`payne_lite.write_results`' HDF5) is
    written under a temporary name and renamed, so it exists only complete; its meta
    repeats the run key, chunk index and rows. The manifest (JSON, also replaced
    atomically) holds the run identity and, for progress, the chunks done.
    """

    def __init__(self, folder: Path, identity: dict, bounds, done: set[int]):
        self.folder, self.identity, self.bounds = folder, identity, bounds
        self.key = _digest(identity)
        self.done = done
        self.created = not done

    @classmethod
    def open(cls, path_out: Path, identity: dict, bounds, *, restart: bool):
        folder = parts_folder(path_out)
        manifest = folder / _MANIFEST
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(f"{folder} exists and is not a folder; move it away")
        if folder.is_dir():
            if not manifest.exists():
                other = [p.name for p in folder.iterdir() if not _is_temp(p)]
                if other:
                    raise FileExistsError(
                        f"{folder} exists but holds no {_MANIFEST} (found "
                        f"{', '.join(sorted(other)[:3])}): not a fit_catalog parts "
                        "folder; move it away"
                    )
            elif restart:
                cls._read_manifest(manifest)  # only ever delete a parts folder
                shutil.rmtree(folder)
            else:
                old = cls._read_manifest(manifest)
                if old["identity"] != identity:
                    diff = _differences(old["identity"], identity)
                    raise ValueError(
                        f"cannot resume: {folder} holds results of a run with other "
                        f"inputs or options (differs: {', '.join(diff)}); rerun with "
                        "the same inputs and options, or pass restart=True "
                        "(payne-lite fit --restart) to discard those results"
                    )
        folder.mkdir(exist_ok=True)
        for p in folder.iterdir():  # left by a run killed while writing
            if _is_temp(p):
                p.unlink()
        parts = cls(folder, identity, bounds, set())
        parts.done = parts._scan()
        parts.created = not parts.done
        parts._write_manifest()
        return parts

    @staticmethod
    def _read_manifest(path: Path) -> dict:
        try:
            man = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise FileFormatError(f"{path}: unreadable manifest ({err})") from err
        if not isinstance(man, dict) or man.get("format") != PARTS_FORMAT:
            raise FileFormatError(f"{path}: not a {PARTS_FORMAT} manifest")
        if man.get("format_version") != PARTS_VERSION:
            raise FileFormatError(
                f"{path}: {PARTS_FORMAT} format_version={man.get('format_version')!r} "
                f"is not supported (this payne_lite reads [{PARTS_VERSION}]); pass "
                "restart=True (payne-lite fit --restart) to discard those results"
            )
        return man

    def file(self, i: int) -> Path:
        return self.folder / f"chunk-{i:06d}.h5"

    def _scan(self) -> set[int]:
        """Indices of the chunks whose files are complete and belong to this run;
        files that do not (another run's, a wrong length) are removed."""
        done = set()
        for i in range(len(self.bounds)):
            p = self.file(i)
            if not p.exists():
                continue
            try:
                self.read(i)
            except (OSError, ValueError) as err:
                _log.warning("%s: refitting chunk %d (%s)", p, i, err)
                p.unlink()
                continue
            done.add(i)
        return done

    def _write_manifest(self) -> None:
        man = {
            "format": PARTS_FORMAT,
            "format_version": PARTS_VERSION,
            "identity": self.identity,
            "key": self.key,
            "n_chunks": len(self.bounds),
            "done": sorted(self.done),
        }
        _atomic_write_text(self.folder / _MANIFEST, json.dumps(man, indent=1) + "\n")

    def missing(self) -> list[int]:
        return [i for i in range(len(self.bounds)) if i not in self.done]

    def write(self, i: int, table) -> None:
        """Record chunk ``i``'s results (atomically), then the manifest."""
        from ._results import write_results

        start, stop = self.bounds[i]
        if len(table) != stop - start:
            raise RuntimeError(
                f"chunk {i}: {len(table)} result rows for rows [{start}, {stop})"
            )
        table = table.copy(copy_data=False)
        table.meta.update(parts_key=self.key, chunk=i, rows=[start, stop])
        write_results(table, self.file(i), overwrite=True)
        self.done.add(i)
        self._write_manifest()

    def read(self, i: int):
        """Chunk ``i``'s results table, checked to be this run's and complete."""
        from ._results import read_results

        p = self.file(i)
        t = read_results(p)
        start, stop = self.bounds[i]
        got = (t.meta.get("parts_key"), t.meta.get("chunk"), t.meta.get("rows"))
        if got != (self.key, i, [start, stop]) or len(t) != stop - start:
            raise FileFormatError(
                f"{p}: not chunk {i} (rows [{start}, {stop})) of this run"
            )
        for k in _PART_KEYS:
            t.meta.pop(k)
        return t

    def remove(self) -> None:
        """Delete the folder: chunk files first, the manifest last."""
        for i in range(len(self.bounds)):
            with contextlib.suppress(FileNotFoundError):
                self.file(i).unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.folder / _MANIFEST).unlink()
        shutil.rmtree(self.folder, ignore_errors=True)


# ======================================================================================
# fit_catalog
# ======================================================================================
#: fit() arguments that fit_catalog sets itself.
_RESERVED = ("wavelength", "return_model", "progress")


def _check_fit_options(method: str, fit_kwargs: dict) -> None:
    """Bind the options to :func:`payne_lite.fit`'s signature and check the method's
    options object, before a catalog is opened or any work starts."""
    names = set(inspect.signature(fit).parameters) - {"flux", "flux_err", "emulator"}
    unknown = sorted(set(fit_kwargs) - names)
    if unknown:
        raise TypeError(
            f"fit_catalog: unknown fit option(s) {unknown}; payne_lite.fit takes "
            f"{sorted(names - set(_RESERVED) - {'mask', 'p0', 'method', 'mdn'})} "
            "(method settings such as max_iter go in options=payne_lite.LMOptions(...))"
        )
    options_for(method, fit_kwargs.get("options"))
    if fit_kwargs.get("group") is not None:
        raise ValueError(
            "group= (joint multi-visit fits) is not through fit_catalog yet: a chunk "
            "would split a star's visits; fit the visits with payne_lite.fit"
        )
    instrument = fit_kwargs.get("instrument")
    if instrument is not None and not isinstance(instrument, Instrument):
        raise TypeError(
            f"instrument must be a payne_lite.Instrument, got {type(instrument).__name__}"
        )


def fit_rows(chunk: CatalogChunk, emulator, *, wavelength, mask, p0, fit_kwargs):
    """Fit one chunk of rows: a results Table (with ``id`` if the chunk has ids).

    Depends only on the rows and the settings (fit's rows do not depend on the batch
    they share or on threads), so a chunk fitted again, after a restart or on another
    worker, gives the same rows. ``p0`` is None, (L,) or this chunk's (m, L).
    """
    m = chunk.mask
    if mask is not None:
        m = mask if m is None else (m | mask[None, :])
    with warnings.catch_warnings():  # fit_catalog warned once for the catalog
        warnings.simplefilter("ignore", WavelengthGridWarning)
        table = fit(
            chunk.flux,
            chunk.flux_err,
            emulator,
            mask=m,
            wavelength=wavelength,
            p0=p0,
            progress=False,
            **fit_kwargs,
        )
    if chunk.ids is not None:
        table.add_column(chunk.ids, name="id", index=0)
    return table


def _chunk_p0(p0, start: int, stop: int):
    return p0[start:stop] if p0 is not None and np.ndim(p0) == 2 else p0


def fit_catalog(
    path_in,
    path_out: str | os.PathLike,
    emulator,
    *,
    mdn=None,
    method: str = "lm",
    client=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    mask=None,
    p0=None,
    overwrite: bool = False,
    restart: bool = False,
    keep_parts: bool = False,
    progress: bool = True,
    meta: dict | None = None,
    **fit_kwargs,
):
    """Fit every spectrum of a catalog, chunk by chunk, resumably; write one table.

    The catalog is read ``chunk_size`` rows at a time; each chunk is fitted with
    :func:`payne_lite.fit` (same model, starts and flags), in this process or on the
    workers of a Dask ``client``. A row's results depend only on that row and the
    settings, so the output is the same, number for number, however it was run.

    **Resume.** Each chunk's results are written, as soon as they exist, to the parts
    folder ``<path_out>.parts/`` (``chunk-000000.h5``, ... and ``manifest.json``;
    :func:`parts_folder`). Every write is atomic (a temporary file, then a rename), so
    a run killed at any point (Ctrl-C, a killed process or worker, a crash) leaves
    only complete chunk files. The same call (or ``payne-lite fit`` command) run again
    fits only the chunks that are missing; the final file is assembled from the
    chunk files in input order (each input row exactly once) and written atomically,
    then the parts folder is deleted (``keep_parts=True`` keeps it). The manifest
    records the run's identity: the catalog (resolved file paths, sizes and
    modification times, row count, wavelength grid), sha256 digests of the emulator
    and MDN weights, ``method``, ``chunk_size``, ``mask``, ``p0`` and the other fit
    options; a resume whose identity differs is refused (``ValueError`` naming what
    differs) rather than mixing results. ``options.n_threads``, ``client``, ``progress``,
    ``meta``, ``overwrite`` and ``keep_parts`` may change between runs.

    **Dask.** With ``client`` (a ``distributed.Client``; see
    :func:`payne_lite.catalog.local_client`), the emulator, MDN and settings are
    scattered to every worker once, chunks are read here and sent to the workers (at
    most two per worker in flight, so memory stays bounded), and results come back
    here to be written; workers need neither the catalog nor the output folder. A
    worker keeps its compiled solver: chunks of one shape compile once per worker.

    Args:
        path_in: a catalog ``.h5`` (:func:`write_catalog`), one or more APOGEE FITS
            files, or an open reader (see :func:`open_catalog`).
        path_out: results file, ``.fits``, ``.ecsv`` or ``.h5`` (see
            :func:`payne_lite.write_results`; FITS gets FITS-safe column names).
        emulator: a :class:`payne_lite.Emulator`, or the path of an emulator file.
        mdn: optional :class:`payne_lite.MDN` (or the path of an MDN file) trained
            for ``emulator``: passed to :func:`payne_lite.fit` (MDN starts and
            bounds, ``<label>_mdn`` columns); the catalog must be on the emulator's
            wavelength grid.
        method: ``"lm"`` or ``"curve_fit"`` (see :func:`payne_lite.fit`).
        client: optional ``distributed.Client``; None fits in this process.
        chunk_size: spectra per chunk (read, fitted, recorded); a multiple of
            ``LMOptions.batch_size`` (256) keeps every batch full.
        mask: optional (P,) bool, True = ignore the pixel in every spectrum (for
            example known model problems); combined with the catalog's own mask.
        p0: optional starting labels [physical], (L,) for all or (n, L) per spectrum.
        overwrite: replace an existing ``path_out`` (otherwise refused before any
            fitting starts).
        restart: discard the results of an earlier run in the parts folder and fit
            every chunk again.
        keep_parts: keep the parts folder after the final file is written.
        progress: show a tqdm progress bar over spectra.
        meta: JSON-compatible entries added to the table's meta (provenance).
        **fit_kwargs: passed to :func:`payne_lite.fit` (``instrument``,
            ``cont_deg``, ``rv_range``, ``fixed``, ``group``, ``options``, ...);
            checked against its signature and ``method`` before the catalog is
            opened (a misspelled name is a ``TypeError`` naming it).

    Returns:
        The results table (also written to ``path_out``): fit's columns, preceded by
        ``id`` when the catalog has ids; ``meta`` adds ``catalog``, ``n_spec``,
        ``chunk_size``, ``n_chunks_resumed`` (chunks taken from an earlier run),
        ``n_workers`` (0 without a client) and ``fit_seconds`` (this run).

    Raises:
        TypeError: ``client`` not a ``distributed.Client``; ``mdn`` neither an MDN
            nor a path.
        ImportError: ``client`` given but dask.distributed is not installed.
        FileExistsError: ``path_out`` exists and ``overwrite`` is False; the parts
            folder's name is taken by something else.
        FileNotFoundError, payne_lite.FileFormatError: a missing or bad catalog; an
            unreadable manifest.
        ValueError: bad settings or shapes (named in the message); a resume with
            other inputs or options.
    """
    from ..emulator import Emulator
    from ._results import format_of, write_results

    if client is not None:
        from ._distributed import check_client

        check_client(client)
    reserved = sorted(set(fit_kwargs) & set(_RESERVED))
    if reserved:
        raise ValueError(
            f"fit_catalog sets {reserved} itself (the catalog's wavelength; no model "
            "spectra, which would not fit in memory for a catalog; its own progress "
            "bar); do not pass them"
        )
    _check_fit_options(method, fit_kwargs)
    chunk_size = _check_chunk_size(chunk_size)
    path_out = Path(path_out)
    format_of(path_out)  # unknown suffix: refused before any work
    if path_out.exists() and not overwrite:
        parts = parts_folder(path_out)
        raise FileExistsError(
            f"{path_out} exists; pass overwrite=True to replace it"
            + (
                f" ({parts} is also there: kept, or left by a run stopped after "
                "its final write; overwrite=True rebuilds the file from it)"
                if parts.is_dir()
                else ""
            )
        )
    if not path_out.parent.is_dir():
        raise FileNotFoundError(f"folder {path_out.parent} does not exist")
    if isinstance(emulator, str | os.PathLike):
        emulator = Emulator.load(emulator)
    if mdn is not None:
        from ..mdn import MDN

        if isinstance(mdn, str | os.PathLike):
            mdn = MDN.load(mdn, emulator=emulator)
        elif not isinstance(mdn, MDN):
            raise TypeError(
                f"mdn must be a payne_lite.MDN or the path of an MDN file, got "
                f"{type(mdn).__name__}"
            )
        else:
            mdn.check_emulator(emulator)
        fit_kwargs = {**fit_kwargs, "mdn": mdn}

    t0 = time.perf_counter()
    # a reader passed in stays open for its owner; paths are opened and closed here
    opened = (
        contextlib.nullcontext(path_in)
        if isinstance(path_in, _Reader)
        else open_catalog(path_in)
    )
    with opened as cat:
        n = len(cat)
        wave = cat.wavelength
        same = wave.shape == emulator.wavelength.shape and np.array_equal(
            wave, emulator.wavelength
        )
        wavelength = None if same else wave
        if wavelength is not None:  # once here; the chunks' fits do not repeat it
            warn_if_near_grid(
                wave,
                emulator.wavelength,
                name=f"{cat.source}: wavelength",
                hint="write the catalog with the emulator's grid if they are on it",
            )
        if mask is not None:
            mask = np.asarray(mask)
            if mask.dtype != bool or mask.shape != wave.shape:
                raise ValueError(
                    f"mask must be a bool array ({wave.size},) over the catalog's "
                    f"pixels, got {mask.dtype} {mask.shape}"
                )
        if p0 is not None and np.ndim(p0) == 2 and np.shape(p0)[0] != n:
            raise ValueError(
                f"p0 {np.shape(p0)} must be ({emulator.n_labels},) or "
                f"({n}, {emulator.n_labels}) for the catalog's {n} spectra"
            )
        if p0 is not None:  # every row, before any chunk is fitted
            emulator.check_labels(p0, name="p0")
        bounds = chunk_bounds(n, chunk_size)
        identity = _run_identity(
            cat,
            emulator,
            mdn=mdn,
            method=method,
            chunk_size=chunk_size,
            mask=mask,
            p0=p0,
            fit_kwargs=fit_kwargs,
        )
        parts = _Parts.open(path_out, identity, bounds, restart=restart)
        todo = parts.missing()
        n_resumed = len(bounds) - len(todo)
        if n_resumed:
            _log.info(
                "%s: resuming, %d of %d chunks done",
                parts.folder,
                n_resumed,
                len(bounds),
            )
        settings = {
            "emulator": emulator,
            "wavelength": wavelength,
            "mask": mask,
            "fit_kwargs": {"method": method, **fit_kwargs},
        }
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=n,
                initial=n - sum(bounds[i][1] - bounds[i][0] for i in todo),
                desc="fit_catalog",
                unit="spec",
                smoothing=0.1,
            )

        def record(i, table):
            parts.write(i, table)
            if bar is not None:
                bar.update(bounds[i][1] - bounds[i][0])

        n_workers = 0
        try:
            if client is None:
                for i in todo:
                    start, stop = bounds[i]
                    table = fit_rows(
                        cat.read(start, stop), p0=_chunk_p0(p0, start, stop), **settings
                    )
                    record(i, table)
            else:
                from ._distributed import fit_chunks

                n_workers = fit_chunks(
                    client,
                    cat,
                    bounds,
                    todo,
                    settings,
                    task=fit_rows,
                    p0_of=lambda start, stop: _chunk_p0(p0, start, stop),
                    record=record,
                )
        except BaseException:
            if parts.created and not parts.done:
                parts.remove()  # nothing of this run to resume from
            raise
        finally:
            if bar is not None:
                bar.close()
        source = cat.source
        tables = [parts.read(i) for i in range(len(bounds))]
    table = _stack(tables)
    seconds = time.perf_counter() - t0
    table.meta.update(
        catalog=source,
        n_spec=n,
        chunk_size=chunk_size,
        n_chunks_resumed=n_resumed,
        n_workers=n_workers,
        fit_seconds=round(seconds, 3),
    )
    table.meta.update(meta or {})
    write_results(table, path_out, overwrite=overwrite)
    if not keep_parts:
        parts.remove()
    return table


def _stack(tables):
    """One table from the per-chunk tables (same columns; meta of the first)."""
    from astropy.table import vstack

    if len(tables) == 1:
        return tables[0]
    meta = dict(tables[0].meta)
    for t in tables:
        t.meta.clear()
    out = vstack(tables, join_type="exact")
    out.meta.update(meta)
    return out
