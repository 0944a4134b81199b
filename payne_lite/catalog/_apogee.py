"""APOGEE FITS spectra read as a catalog; opening and iterating over any catalog.

APOGEE FITS files (:func:`read_apogee_fits`, aspcapStar / apStar-like): flux in HDU 1,
errors in HDU 2, an optional integer pixel bitmask in HDU 3 (apStar; aspcapStar's HDU 3
holds the floating-point best-fit model and is not a mask, so floating HDU 3 data are
ignored). A 2-D HDU (apStar with visits) gives its first row, the combined spectrum
(the visit rows are not read, so such a catalog has no ``group`` ids; joint fits of
visits take them from an HDF5 catalog, or ``fit_catalog(..., group=<ids>)``).
Wavelengths come from ``CRVAL1``, ``CDELT1`` (and ``CRPIX1``, default 1) of HDU 1's
header, or the primary header's if HDU 1 lacks them: ``log10(lambda) = CRVAL1 + CDELT1
(i + 1 - CRPIX1)`` as in APOGEE (``DC-FLAG = 1`` or ``CTYPE1 = 'LOG-LINEAR'``); with
``DC-FLAG = 0`` or a linear ``CTYPE1`` the same formula gives lambda in Angstrom.
Several such files read as one catalog (:func:`open_catalog` with a list) must share
one wavelength grid.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .._validate import check_wavelength
from ..errors import FileFormatError
from ._hdf5 import FITS_SUFFIXES, CatalogChunk, Reader, has_suffix

#: Spectra per fit_catalog chunk (the unit of reading, fitting and, later, resuming).
#: A multiple of fit()'s default ``batch_size`` (128) keeps every batch full. Peak
#: memory grows as about ``chunk_size x n_pix x 60`` bytes (float64 copies in fit).
DEFAULT_CHUNK_SIZE = 512

#: APOGEE PIXMASK bits that make a pixel unusable: 0 BADPIX, 1 CRPIX, 2 SATPIX,
#: 3 UNFIXABLE, 4 BADDARK, 5 BADFLAT, 6 BADERR, 7 NOSKY. (Bits 9-14: persistence,
#: significant sky / telluric lines, are warnings and are kept.)
APOGEE_BAD_PIXEL_BITS = 0b1111_1111


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


class ApogeeFitsCatalog(Reader):
    """A list of APOGEE-like FITS files (one spectrum each) read as one catalog.

    The constructor reads every file's headers (not its data) and refuses the list
    unless all files have the expected HDUs and share the first file's wavelength grid.
    ``read(start, stop)`` opens files ``start:stop`` only (``read_rows(rows)`` the
    files ``rows`` only). The catalog always has a mask (from HDU 3 bitmasks where
    present) and ids (file names); it has no group ids (one spectrum per file).

    Raises:
        FileNotFoundError: a missing file.
        payne_lite.FileFormatError: a file that is not APOGEE-like (see
            :func:`read_apogee_fits`) or whose wavelength grid differs.
        ValueError: an empty list.
    """

    name = "apogee-fits"

    @classmethod
    def claims(cls, paths: list[Path]) -> bool:
        """FITS files (by name; their HDUs are checked when opened)."""
        return all(has_suffix(p, FITS_SUFFIXES) for p in paths)

    def options(self) -> dict:
        return {"bad_bits": self.bad_bits}

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
                    f"{wave[0]:.3f}-{wave[-1]:.3f} A); a list of FITS files is one "
                    "catalog on one grid (spectra on several grids: write them to "
                    "one catalog with payne_lite.write_catalog(..., wavelength (n, P)))"
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


# --------------------------------------------------------------------------------------
# Any catalog: open, chunk, iterate
# --------------------------------------------------------------------------------------
def chunk_bounds(n_spec: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n_spec)`` in chunks of ``chunk_size``
    (the last one shorter). Chunk ``i`` always covers the same rows, so a chunk index
    identifies its rows for a given ``chunk_size``."""
    return [(s, min(s + chunk_size, n_spec)) for s in range(0, n_spec, chunk_size)]


def check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return int(chunk_size)
