"""Catalogs of observed spectra: an HDF5 layout, an APOGEE FITS reader, and fit_catalog.

``fit_catalog(path_in, path_out, emulator, ...)`` streams a catalog in chunks of rows,
fits every chunk with :func:`payne_lite.fit` and writes one results table; only one
chunk of spectra is in memory at a time.

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
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from . import _h5
from ._h5 import FileFormatError
from ._validate import as_float_array, check_wavelength

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
            n_hdu = len(hdul)
        except (OSError, ValueError) as err:
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
# fit_catalog
# ======================================================================================
#: fit() arguments that fit_catalog sets itself.
_RESERVED = ("wavelength", "return_model", "progress")


def _fit_chunk(cat, start, stop, emulator, *, wavelength, mask, p0, fit_kwargs):
    """Fit rows ``start:stop`` of ``cat``: a results Table (with ``id`` if present).

    Depends only on the rows and the settings, so a chunk fitted again (for example
    after a restart) gives the same rows.
    """
    from .fitter import fit

    chunk = cat.read(start, stop)
    m = chunk.mask
    if mask is not None:
        m = mask if m is None else (m | mask[None, :])
    if p0 is not None and np.ndim(p0) == 2:
        p0 = p0[start:stop]
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
    progress: bool = True,
    meta: dict | None = None,
    **fit_kwargs,
):
    """Fit every spectrum of a catalog, chunk by chunk, and write one results table.

    The catalog is read ``chunk_size`` rows at a time; each chunk is fitted with
    :func:`payne_lite.fit` (same model, starts and flags) and only its results row are
    kept, so memory is bounded by one chunk of spectra plus the results. The results
    equal ``fit`` on the same arrays (up to float rounding of the batched fits).

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
        client: reserved for Dask-distributed fitting (a later issue); must be None.
        chunk_size: spectra per chunk (read, fitted, appended); a multiple of fit's
            ``batch_size`` (256) keeps every batch full.
        mask: optional (P,) bool, True = ignore the pixel in every spectrum (for
            example known model problems); combined with the catalog's own mask.
        p0: optional starting labels [physical], (L,) for all or (n, L) per spectrum.
        overwrite: replace an existing ``path_out`` (otherwise refused before any
            fitting starts).
        progress: show a tqdm progress bar over spectra.
        meta: JSON-compatible entries added to the table's meta (provenance).
        **fit_kwargs: passed to :func:`payne_lite.fit` (``cont_deg``, ``fixed``,
            ``max_iter``, ``rv_range``, ``batch_size``, ...).

    Returns:
        The results table (also written to ``path_out``): fit's columns, preceded by
        ``id`` when the catalog has ids; ``meta`` adds ``catalog``, ``n_spec``,
        ``chunk_size`` and ``fit_seconds``.

    Raises:
        NotImplementedError: ``client`` given.
        TypeError: ``mdn`` neither an MDN nor a path.
        FileExistsError: ``path_out`` exists and ``overwrite`` is False.
        FileNotFoundError, payne_lite.FileFormatError: a missing or bad catalog.
        ValueError: bad settings or shapes (named in the message).
    """
    from .emulator import Emulator
    from .results import _format_of, write_results

    if client is not None:
        raise NotImplementedError(
            "fit_catalog(client=...) is not available yet: Dask-distributed fitting "
            "comes in a later issue; pass client=None to fit in this process"
        )
    reserved = sorted(set(fit_kwargs) & set(_RESERVED))
    if reserved:
        raise ValueError(
            f"fit_catalog sets {reserved} itself (the catalog's wavelength; no model "
            "spectra, which would not fit in memory for a catalog; its own progress "
            "bar); do not pass them"
        )
    chunk_size = _check_chunk_size(chunk_size)
    path_out = Path(path_out)
    _format_of(path_out)  # unknown suffix: refused before any work
    if path_out.exists() and not overwrite:
        raise FileExistsError(f"{path_out} exists; pass overwrite=True to replace it")
    if not path_out.parent.is_dir():
        raise FileNotFoundError(f"folder {path_out.parent} does not exist")
    if isinstance(emulator, str | os.PathLike):
        emulator = Emulator.load(emulator)
    if mdn is not None:
        from .mdn import MDN

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
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc="fit_catalog", unit="spec", smoothing=0.1)
        # One chunk at a time; chunk i always covers the same rows (chunk_bounds), so
        # a resumable run can record finished chunk indices (with their results) and
        # skip them on restart without changing this loop's body.
        tables = []
        try:
            for start, stop in chunk_bounds(n, chunk_size):
                tables.append(
                    _fit_chunk(
                        cat,
                        start,
                        stop,
                        emulator,
                        wavelength=wavelength,
                        mask=mask,
                        p0=p0,
                        fit_kwargs={"method": method, **fit_kwargs},
                    )
                )
                if bar is not None:
                    bar.update(stop - start)
        finally:
            if bar is not None:
                bar.close()
        source = cat.source
    table = _stack(tables)
    seconds = time.perf_counter() - t0
    table.meta.update(
        catalog=source, n_spec=n, chunk_size=chunk_size, fit_seconds=round(seconds, 3)
    )
    table.meta.update(meta or {})
    write_results(table, path_out, overwrite=overwrite)
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
