"""APOGEE FITS spectra read as a catalog; opening and iterating over any catalog.

APOGEE FITS files (:func:`read_apogee_fits`, aspcapStar / apStar-like): flux in HDU 1,
errors in HDU 2, an optional integer pixel bitmask in HDU 3 (apStar; aspcapStar's HDU 3
holds the floating-point best-fit model and is not a mask, so floating HDU 3 data are
ignored). A 2-D HDU is an apStar file: row 0 the combined spectrum (pixel-weighted),
row 1 the combined spectrum (globally weighted), rows 2 and up the visits, shifted to
the rest frame and resampled onto the same grid (a one-visit file has row 0 only).
Wavelengths come from ``CRVAL1``, ``CDELT1`` (and ``CRPIX1``, default 1) of HDU 1's
header, or the primary header's if HDU 1 lacks them: ``log10(lambda) = CRVAL1 + CDELT1
(i + 1 - CRPIX1)`` as in APOGEE (``DC-FLAG = 1`` or ``CTYPE1 = 'LOG-LINEAR'``); with
``DC-FLAG = 0`` or a linear ``CTYPE1`` the same formula gives lambda in Angstrom.
Several such files read as one catalog (:func:`open_catalog` with a list) must share
one wavelength grid.

:class:`ApogeeFitsCatalog` treats the continuum of what it reads with a normaliser
of :mod:`payne_lite.observe`, by default by the kind of each file: ``apStar`` files
(flux in 1e-17 erg/s/cm^2/A: named ``apStar-`` / ``asStar-``, or with a ``NVISITS``
primary keyword or a flux ``BUNIT`` in erg) are left unnormalised for a quadratic
continuum per chip fitted with the labels (:class:`payne_lite.FitContinuum`, handed to
the fit by :meth:`~ApogeeFitsCatalog.fit_defaults`: on mock spectra it recovers the
labels better than a pseudo-continuum through The Cannon's continuum pixels,
``continuum="continuum-pixels"``), everything else (``aspcapStar``: ASPCAP normalised
it) as it is. With ``visits=True`` its rows are the visits of each apStar
file, with the file as their star (``group``), for joint fits.
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
from ..observe import MIN_PIXELS_PER_COEF
from ._hdf5 import FITS_SUFFIXES, CatalogChunk, Reader, has_suffix

#: Spectra per fit_catalog chunk (the unit of reading, fitting and, later, resuming).
#: A multiple of fit()'s default ``batch_size`` (128) keeps every batch full. Peak
#: memory grows as about ``chunk_size x n_pix x 60`` bytes (float64 copies in fit).
DEFAULT_CHUNK_SIZE = 512

#: The APOGEE_PIXMASK bits of apStar HDU 3 (DR13-DR17 ``APOGEE_PIXMASK``; the SDSS
#: bitmask documentation): bit -> (name, meaning). Bits 0-7 say the pixel holds no
#: usable data: they are :data:`APOGEE_BAD_PIXEL_BITS`. Bits 9-11 (persistence) and
#: 12-13 (near a sky or telluric line) are warnings on pixels the pipeline has
#: corrected, 8 and 14 warnings on the extraction: kept by default, as by The Payne
#: and binspec; pass ``bad_bits`` to drop them too. Row 0 of an apStar file (the
#: combined spectrum) holds the OR of the visits' masks, so a pixel bad in any visit
#: is dropped from the combined spectrum (conservative: the other visits' data there
#: are lost too); each visit row has its own mask.
APOGEE_PIXMASK_BITS = {
    0: ("BADPIX", "in the detector's bad-pixel mask"),
    1: ("CRPIX", "cosmic ray"),
    2: ("SATPIX", "saturated"),
    3: ("UNFIXABLE", "bad or saturated and could not be interpolated over"),
    4: ("BADDARK", "bad dark frame"),
    5: ("BADFLAT", "bad flat field"),
    6: ("BADERR", "bad error (set high)"),
    7: ("NOSKY", "no sky available for the sky subtraction"),
    8: ("LITTROW_GHOST", "in the Littrow ghost (warning)"),
    9: ("PERSIST_HIGH", "strong detector persistence (warning)"),
    10: ("PERSIST_MED", "medium detector persistence (warning)"),
    11: ("PERSIST_LOW", "weak detector persistence (warning)"),
    12: ("SIG_SKYLINE", "near a significant sky line (warning)"),
    13: ("SIG_TELLURIC", "near a significant telluric line (warning)"),
    14: ("NOT_ENOUGH_PSF", "less than 50 % of the PSF in the pixel (warning)"),
}

#: APOGEE_PIXMASK bits that make a pixel unusable: 0 BADPIX, 1 CRPIX, 2 SATPIX,
#: 3 UNFIXABLE, 4 BADDARK, 5 BADFLAT, 6 BADERR, 7 NOSKY (see
#: :data:`APOGEE_PIXMASK_BITS`; the warning bits 8-14 are kept).
APOGEE_BAD_PIXEL_BITS = sum(1 << b for b in range(8))

#: An error at or above this [flux units] marks a pixel without data: the APOGEE
#: pipeline sets the error of such pixels (chip gaps, bad pixels) to 1e10 ("BADERR").
APOGEE_NO_DATA_ERROR = 1e9

#: Kinds of APOGEE file (:attr:`ApogeeSpectrum.kind`).
APSTAR, ASPCAPSTAR, OTHER = "apStar", "aspcapStar", "other"


def visit_rows(n_rows: int) -> list[int]:
    """The HDU rows of the visits of an apStar file with ``n_rows`` rows: 2 and up
    (rows 0 and 1 are the combined spectra), or row 0 when the file has fewer than
    three rows (one visit, stored once)."""
    return list(range(2, n_rows)) if n_rows >= 3 else [0]


# --------------------------------------------------------------------------------------
# APOGEE FITS
# --------------------------------------------------------------------------------------
class ApogeeSpectrum(NamedTuple):
    """One spectrum from an APOGEE-like FITS file (see the module docstring).

    Attributes:
        flux: (P,) flux as stored (HDU 1, row ``row``).
        flux_err: (P,) 1-sigma errors (HDU 2).
        mask: (P,) bool, True = a pixel with a bad bit set in the HDU 3 bitmask
            (all False without an integer HDU 3).
        wavelength: (P,) vacuum wavelength [Angstrom] from the header.
        id: the file name without ``.fits`` / ``.fits.gz``.
        kind: ``"apStar"`` (flux in physical units: named ``apStar-`` or
            ``asStar-``, a ``NVISITS`` primary keyword or a ``BUNIT`` in erg),
            ``"aspcapStar"`` (named so) or ``"other"``.
        n_rows: rows of HDU 1 (1 for a 1-D HDU).
        row: the row read.
    """

    flux: np.ndarray
    flux_err: np.ndarray
    mask: np.ndarray
    wavelength: np.ndarray
    id: str
    kind: str = OTHER
    n_rows: int = 1
    row: int = 0


def fits_id(path: Path) -> str:
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


def _rows_of(path: Path, data, what: str, rows: list[int]) -> np.ndarray:
    """(len(rows), P): rows ``rows`` of a 2-D HDU, or the one row of a 1-D HDU
    (``rows`` must then be [0])."""
    if data is None:
        raise FileFormatError(f"{path}: {what} holds no data")
    arr = np.asarray(data)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise FileFormatError(
            f"{path}: {what} {np.shape(data)} must be (n_pix,) or (n_rows, n_pix)"
        )
    bad = [r for r in rows if not 0 <= r < arr.shape[0]]
    if bad:
        raise FileFormatError(
            f"{path}: {what} has {arr.shape[0]} row(s); row {bad[0]} asked for"
        )
    return arr[rows]


def _file_kind(path: Path, hdul) -> str:
    """``"apStar"``, ``"aspcapStar"`` or ``"other"`` (see :class:`ApogeeSpectrum`)."""
    name = path.name.lower()
    if name.startswith("aspcapstar-"):
        return ASPCAPSTAR
    bunit = str(hdul[1].header.get("BUNIT", "")).lower()
    if name.startswith(("apstar-", "asstar-")) or "erg" in bunit:
        return APSTAR
    return APSTAR if "NVISITS" in hdul[0].header else OTHER


class _FileRows(NamedTuple):
    flux: np.ndarray  # (k, P) native byte order
    flux_err: np.ndarray
    mask: np.ndarray  # (k, P) bool
    wavelength: np.ndarray
    kind: str
    n_rows: int


def _read_file(
    path: Path, rows: list[int] | None, bad_bits: int, wavelength_only: bool = False
) -> _FileRows:
    """Rows ``rows`` of an APOGEE-like file (None: none, headers only).

    A file with CHECKSUM / DATASUM cards (FITS checksums) is verified against them
    (``checksum=True``: every HDU, when the file is opened); a file without them can
    only be checked for its structure (damage to its numbers cannot be told)."""
    from astropy.io import fits

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    hdul, n_hdu = open_fits_checked(path, memmap=False)
    with hdul:
        try:
            return _read_hdus(path, hdul, n_hdu, rows, bad_bits, wavelength_only)
        except FileFormatError:
            raise
        except (OSError, ValueError, TypeError, KeyError, fits.VerifyError) as err:
            raise FileFormatError(
                f"{path}: truncated or corrupt FITS file ({type(err).__name__}: "
                f"{' '.join(str(err).split())[:200]})"
            ) from err


def open_fits_checked(path: Path, *, memmap: bool):
    """``(hdul, n_hdu)``: the FITS file ``path`` opened with every HDU read and,
    where an HDU has CHECKSUM / DATASUM cards, verified against them (its header and
    its data: one pass over the data).

    Raises:
        payne_lite.FileFormatError: not FITS, truncated, a failed checksum, a header
            astropy cannot parse.
    """
    from astropy.io import fits

    try:
        hdul = fits.open(path, memmap=memmap)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise FileFormatError(f"{path}: not a readable FITS file ({err})") from err
    try:
        with warnings.catch_warnings():
            # astropy only warns on a short file, then reads fewer HDUs
            warnings.filterwarnings("error", message=".*may have been truncated")
            n_hdu = len(hdul)
        for k, hdu in enumerate(hdul):
            for card, verify in (
                ("CHECKSUM", hdu.verify_checksum),
                ("DATASUM", hdu.verify_datasum),
            ):
                if card in hdu.header and verify() != 1:
                    raise FileFormatError(
                        f"{path}: damaged FITS file: HDU {k} does not match its "
                        f"{card} card (checksum verification failed)"
                    )
    except FileFormatError:
        hdul.close()
        raise
    except (OSError, ValueError, TypeError, KeyError, UserWarning) as err:
        hdul.close()
        raise FileFormatError(
            f"{path}: truncated or corrupt FITS file "
            f"({' '.join(str(err).split())[:200]})"
        ) from err
    return hdul, n_hdu


def _read_hdus(path, hdul, n_hdu, rows, bad_bits, wavelength_only) -> _FileRows:
    """:func:`_read_file` of the HDUs ``hdul`` (``n_hdu`` of them) of ``path``."""
    from astropy.io import fits

    if n_hdu < 3:
        raise FileFormatError(
            f"{path}: expected an APOGEE-like FITS file with flux in HDU 1 and "
            f"errors in HDU 2, found {n_hdu} HDU(s)"
        )
    summed = ["CHECKSUM" in hdul[k].header for k in range(min(n_hdu, 4))]
    if any(summed) and not all(summed):
        raise FileFormatError(
            f"{path}: damaged FITS file: HDU {summed.index(False)} has no CHECKSUM "
            f"card, HDU {summed.index(True)} has one"
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
            f"{path}: HDU 2 (error) {hdul[2].shape} does not match HDU 1 (flux) {shape}"
        )
    kind = _file_kind(path, hdul)
    n_rows = 1 if len(shape) == 1 else int(shape[0])
    if wavelength_only or rows is None:
        empty = np.zeros((0, shape[-1]))
        return _FileRows(empty, empty, empty.astype(bool), wave, kind, n_rows)
    flux = _rows_of(path, hdul[1].data, "HDU 1 (flux)", rows)
    error = _rows_of(path, hdul[2].data, "HDU 2 (error)", rows)
    mask = np.zeros(flux.shape, bool)
    if n_hdu > 3 and isinstance(hdul[3], fits.ImageHDU):
        data = hdul[3].data
        if data is not None and np.asarray(data).dtype.kind in "iu":
            if np.shape(data) != shape:
                raise FileFormatError(
                    f"{path}: HDU 3 (bitmask) {data.shape} does not match "
                    f"HDU 1 (flux) {shape}"
                )
            bits = _rows_of(path, data, "HDU 3 (bitmask)", rows)
            mask = (bits.astype(np.int64) & int(bad_bits)) != 0
    if error.shape != flux.shape:
        raise FileFormatError(
            f"{path}: HDU 2 (error) {hdul[2].shape} does not match HDU 1 (flux) {shape}"
        )
    # FITS is big-endian: hand back native arrays
    flux = flux.astype(flux.dtype.newbyteorder("="))
    error = error.astype(error.dtype.newbyteorder("="))
    return _FileRows(flux, error, mask, wave, kind, n_rows)


def read_apogee_fits(
    path: str | os.PathLike,
    *,
    bad_bits: int = APOGEE_BAD_PIXEL_BITS,
    wavelength_only: bool = False,
    row: int = 0,
) -> ApogeeSpectrum:
    """One spectrum from an APOGEE aspcapStar / apStar-like FITS file, as stored
    (not normalised: :class:`ApogeeFitsCatalog` normalises; see the module
    docstring).

    Args:
        path: the FITS file (see the module docstring for the expected layout).
        bad_bits: bits of an integer HDU 3 bitmask that mark a pixel as bad (default
            :data:`APOGEE_BAD_PIXEL_BITS`).
        wavelength_only: check the file and read its header only (flux, flux_err and
            mask are then empty arrays).
        row: the row of a 2-D HDU (apStar: 0 the combined spectrum, 2 and up the
            visits, :func:`visit_rows`); 0 for a 1-D HDU.

    Raises:
        FileNotFoundError: no such file.
        payne_lite.FileFormatError: not FITS, or without flux in HDU 1 and errors in
            HDU 2, or without wavelength keywords, or with shapes that disagree, or
            without the row asked for.
    """
    path = Path(path)
    r = _read_file(path, [int(row)], bad_bits, wavelength_only)
    if wavelength_only:
        empty = np.zeros(0)
        return ApogeeSpectrum(
            empty, empty, empty.astype(bool), r.wavelength, fits_id(path), r.kind,
            r.n_rows, int(row),
        )  # fmt: skip
    return ApogeeSpectrum(
        r.flux[0], r.flux_err[0], r.mask[0], r.wavelength, fits_id(path), r.kind,
        r.n_rows, int(row),
    )  # fmt: skip


class ApogeeFitsCatalog(Reader):
    """A list of APOGEE-like FITS files read as one catalog, its continuum treated.

    One row per file (its combined spectrum, HDU row 0), or with ``visits=True``
    one row per visit (apStar rows 2 and up, :func:`visit_rows`; a file with one
    row gives that row) with the file as the star of its visits (``group``, for
    ``fit_catalog(..., group=True)`` / ``payne-lite fit --group``) and ids
    ``<file>[<row>]``. The constructor reads every file's headers (not its data)
    and refuses the list unless all files have the expected HDUs and share the
    first file's wavelength grid. ``read(start, stop)`` opens the files of rows
    ``start:stop`` only. The catalog always has a mask (from HDU 3 bitmasks where
    present, errors of :data:`APOGEE_NO_DATA_ERROR` or more, and the normaliser's
    bad pixels) and ids.

    Args:
        paths: the FITS files.
        bad_bits: HDU 3 bits that mark a bad pixel (:data:`APOGEE_BAD_PIXEL_BITS`).
        continuum: ``"auto"`` (the default: apStar files unnormalised, their
            continuum fitted with the model, :meth:`payne_lite.FitContinuum.apogee`;
            the others as they are), a name (``"none"``, ``"continuum-pixels"``
            (The Cannon's pixels), ``"sigma-clipped"``, ``"fit"``) or a
            :class:`payne_lite.Normalizer` for every file. What was used is
            :meth:`provenance` (``fit_catalog`` writes it to the results'
            ``meta["continuum"]``); the continuum left to the fit is
            :meth:`fit_defaults`.
        visits: read the visits instead of the combined spectra.

    Raises:
        FileNotFoundError: a missing file.
        payne_lite.FileFormatError: a file that is not APOGEE-like (see
            :func:`read_apogee_fits`) or whose wavelength grid differs.
        ValueError: an empty list; a normaliser that cannot work on the files'
            grid (continuum pixels that miss it).
    """

    name = "apogee-fits"

    @classmethod
    def claims(cls, paths: list[Path]) -> bool:
        """FITS files (by name; their HDUs are checked when opened)."""
        return all(has_suffix(p, FITS_SUFFIXES) for p in paths)

    #: ``visits=True`` reads each star's visits, grouped by star (:meth:`grouped`)
    visits_option = "visits"

    def options(self) -> dict:
        return {
            "bad_bits": self.bad_bits,
            "continuum": self.continuum_spec,
            "visits": self.visits,
        }

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        bad_bits: int = APOGEE_BAD_PIXEL_BITS,
        continuum="auto",
        visits: bool = False,
    ):
        from ..observe import (
            ContinuumPixels,
            FitContinuum,
            NoNormalization,
            normalizer,
        )

        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("no FITS files given: the catalog holds no spectra")
        self.bad_bits = int(bad_bits)
        self.visits = bool(visits)
        if isinstance(continuum, str) and continuum == "auto":
            self.continuum_spec = "auto"
        else:
            norm = normalizer(continuum)
            self.continuum_spec = norm.to_meta()
        first = self.paths[0]
        self.source = (
            str(first)
            if len(self.paths) == 1
            else (f"{first} and {len(self.paths) - 1} more FITS file(s)")
        )
        wave, kinds, rows = None, [], []
        for i, p in enumerate(self.paths):
            head = _read_file(p, None, self.bad_bits)
            w = head.wavelength
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
            kinds.append(head.kind)
            hdu_rows = visit_rows(head.n_rows) if self.visits else [0]
            rows += [(i, r) for r in hdu_rows]
        self.wavelength = wave
        self.wavelength.setflags(write=False)
        self.kinds = kinds
        self._rows = np.array(rows, np.int64).reshape(-1, 2)
        if self.continuum_spec == "auto":
            raw = FitContinuum.apogee()
            self._norms = {
                k: raw if k == APSTAR else NoNormalization() for k in set(kinds)
            }
        else:
            self._norms = {k: norm for k in set(kinds)}
        for k, n in self._norms.items():
            if isinstance(n, ContinuumPixels):
                check_pixels_on_grid(n, wave, k, self.source)
        self.has_mask = True
        self.has_ids = True
        self.has_group = self.visits

    def provenance(self) -> dict:
        """What the reader did, for the results' meta: ``continuum`` (the
        normaliser's record, or ``{"method": "per-file-kind", <kind>: record}``
        when files of several kinds were normalised differently) and
        ``apogee_rows`` (which HDU rows are the catalog's rows)."""
        recs = {k: n.to_meta() for k, n in sorted(self._norms.items())}
        if len({str(r) for r in recs.values()}) == 1:
            cont = {**next(iter(recs.values())), "file_kinds": sorted(recs)}
        else:
            cont = {"method": "per-file-kind", **recs}
        rows = (
            "visits: HDU rows 2 and up (row 0 of one-visit files)"
            if self.visits
            else "combined: HDU row 0"
        )
        return {"continuum": cont, "apogee_rows": rows}

    def fit_defaults(self) -> dict:
        """``{"cont_deg": <ChipPolynomial>}`` when files are read unnormalised for a
        continuum fitted with the model (:class:`payne_lite.FitContinuum`: apStar
        files by default), applied to every row (a file of another kind, already
        normalised, then fits a continuum close to 1); else {}."""
        return continuum_to_fit(self._norms.values())

    def __len__(self) -> int:
        return int(self._rows.shape[0])

    def read_group(self) -> np.ndarray | None:
        if not self.visits:
            return None
        return np.array([fits_id(self.paths[i]) for i in self._rows[:, 0]], dtype=str)

    def read(self, start: int, stop: int) -> CatalogChunk:
        """Spectra of rows ``start:stop``, normalised; their files' grids are
        checked again."""
        start, stop = self._check_range(start, stop)
        rows = self._rows[start:stop]
        parts = []
        for i in np.unique(rows[:, 0]):  # increasing, as the rows are
            p = self.paths[i]
            hdu_rows = rows[rows[:, 0] == i, 1].tolist()
            r = _read_file(p, hdu_rows, self.bad_bits)
            if not np.array_equal(r.wavelength, self.wavelength):
                raise FileFormatError(
                    f"{p}: wavelength grid changed since it was opened"
                )
            norm = self._norms[self.kinds[i]]
            no_data = ~(r.flux_err < APOGEE_NO_DATA_ERROR)
            out = norm(self.wavelength, r.flux, r.flux_err, r.mask | no_data)
            fid = fits_id(p)
            ids = [f"{fid}[{h}]" if self.visits else fid for h in hdu_rows]
            parts.append((r.flux.dtype, out, ids))
        dtype = np.result_type(*(d for d, _, _ in parts), np.float32)
        return CatalogChunk(
            np.concatenate([o.flux for _, o, _ in parts]).astype(dtype),
            np.concatenate([o.flux_err for _, o, _ in parts]).astype(dtype),
            np.concatenate([o.mask for _, o, _ in parts]),
            np.array([x for _, _, ids in parts for x in ids], dtype=str),
            group=(
                np.array([fits_id(self.paths[i]) for i in rows[:, 0]], dtype=str)
                if self.visits
                else None
            ),
        )


def continuum_to_fit(norms) -> dict:
    """``{"cont_deg": cont}`` of the normalisers ``norms`` that leave the continuum
    to the fit (:class:`payne_lite.FitContinuum`: its ``cont``), {} for none."""
    conts = {n.cont for n in norms if getattr(n, "cont", None) is not None}
    if len(conts) > 1:
        raise ValueError(f"one catalog, several continua to fit: {sorted(conts)}")
    return {"cont_deg": conts.pop()} if conts else {}


def check_pixels_on_grid(norm, wave, kind: str, source: str) -> None:
    """Continuum pixels must land on the grid: enough of them in every chip that
    the grid covers."""
    hit = norm.pixels(wave)
    need = MIN_PIXELS_PER_COEF * (norm.deg + 1)
    chips = norm.chips or [(wave[0], np.nextafter(wave[-1], np.inf))]
    counts = [
        int(np.count_nonzero(hit & (wave >= lo) & (wave < hi)))
        for lo, hi in chips
        if np.any((wave >= lo) & (wave < hi))
    ]
    if not counts or min(counts) < need:
        raise ValueError(
            f"{source}: continuum normalisation of its {kind} files through "
            f"{norm.wavelength.size} continuum pixels: {counts or 0} of them lie on "
            f"the files' wavelength grid ({wave.size} pixels, {wave[0]:.2f}-"
            f"{wave[-1]:.2f} A) per chip, {need} needed per chip for degree "
            f"{norm.deg}; pass continuum='sigma-clipped' (needs no pixel list) or "
            "'none'"
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
