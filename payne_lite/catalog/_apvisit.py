"""APOGEE apVisit files (one visit of one star, observed frame) read as a catalog.

An apVisit file (SDSS DR13-DR17 data model, ``apVisit-<apred>-<plate>-<mjd>-<fiber>
.fits``, ``asVisit-`` from LCO) holds one visit as the spectrograph saw it:

=====  =================================================================================
HDU 1  flux (3, 4096) [1e-17 erg/s/cm^2/A], one row per detector: a (red), b (green),
       c (blue); 4096 pixels per chip (two dither positions of 2048 combined)
HDU 2  1-sigma errors, same shape and units
HDU 3  APOGEE_PIXMASK bitmask (integer), same shape
       (:data:`payne_lite.catalog.APOGEE_PIXMASK_BITS`)
HDU 4  vacuum wavelength [Angstrom] of every pixel, same shape, in the *observed*
       frame (not corrected for the Earth's motion nor the star's); it decreases
       along each row in the survey's files (either direction is read)
HDU 0  header: the star (``OBJID``; or ``APOGEE_ID``, ``OBJECT``), the night
       (``MJD5``; or ``MJD``, or the ``-<mjd>-`` of the file name) and the velocities
       [km/s] the pipeline measured: ``VHELIO`` (the star's barycentric velocity),
       ``VRAD`` (DR13-DR16; ``VREL`` in DR17: relative to the observatory) and
       ``BC`` (the barycentric correction), ``VHELIO = VRAD + BC``
=====  =================================================================================

:class:`ApogeeVisitCatalog` (reader ``"apogee-visit"``) reads a list of such files.
Each visit is on its own grid, which the fitter's joint fits of a star's visits do not
take (they need one grid per star), so each is **resampled** onto the apStar grid
(:func:`apstar_wavelength`: ``log10 lambda = 4.179 + 6e-6 k``, ``k < 8575``, the grid
The Payne's APOGEE network lives on) in the barycentric frame (``frame=
"barycentric"``: the observed wavelengths times the Doppler factor of ``BC``, so that
the fitted rv of each visit is its barycentric velocity, comparable with ``VHELIO``;
``frame="observed"`` skips the correction and the fitted rv is then relative to the
observatory). Resampling (:func:`resample_visit`) is Keys' cubic convolution (a =
-0.5, Catmull-Rom) in the pixel index of the visit's own grid: four input pixels per
output pixel, exact for quadratics, no smoothing of lines beyond the interpolant's
own; errors are propagated as ``sqrt(sum w_k^2 sigma_k^2)``; an output pixel with a
bad input pixel (bad bits, no-data error) among its four (nonzero weight) is masked,
as is every pixel outside the chips. The noise of neighbouring output pixels is then
correlated (each input pixel feeds several outputs); the fitter treats pixels as
independent, as it does for apStar visits, which the pipeline resampled in the same
way: the results' ``meta["apvisit"]`` says so.

Continuum normalisation (``continuum="auto"``: The Cannon's continuum pixels,
:meth:`payne_lite.ContinuumPixels.apogee`): those pixels are rest-frame wavelengths,
so for each visit they are moved by the star's velocity in the frame read (the
header's ``VHELIO`` in the barycentric frame, ``VRAD`` in the observed one) and
snapped to the nearest pixel of the grid; the chips (:data:`payne_lite.observe.
APOGEE_CHIPS`, cut in the middle of the detector gaps) stay where they are, in the
frame of the detectors. A normaliser without a pixel list (``"sigma-clipped"``,
``"none"``) needs no velocity.

With ``visits=True`` (the default for apVisit files) each file is a row, id the file
name without ``.fits``, its star (``group``) the header's ``OBJID``: a list of several
stars' visits is several groups, one joint fit per star. With ``visits=False`` each
star is one row, id its ``OBJID``: its *combined* spectrum, as apStar's row 0: every
visit resampled onto the apStar grid in the star's rest frame (the observed
wavelengths divided by the Doppler factor of the header's ``VRAD``), normalised there
and averaged with inverse-variance weights pixel by pixel (a pixel bad in one visit
only loses that visit's weight).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..constants import C_KMS
from ..errors import FileFormatError
from ._apogee import (
    APOGEE_BAD_PIXEL_BITS,
    APOGEE_NO_DATA_ERROR,
    check_pixels_on_grid,
    continuum_to_fit,
    fits_id,
    open_fits_checked,
)
from ._hdf5 import FITS_SUFFIXES, CatalogChunk, Reader, has_suffix

#: The apStar grid: ``log10(lambda / A) = APSTAR_LOG10_START + APSTAR_LOG10_STEP k``.
APSTAR_LOG10_START = 4.179
APSTAR_LOG10_STEP = 6e-6
APSTAR_N_PIX = 8575

#: Frames an apVisit catalog reads its visits in (``frame=``).
FRAMES = ("barycentric", "observed")

#: File name beginnings of apVisit files (APO, LCO), lower case.
APVISIT_PREFIXES = ("apvisit-", "asvisit-")

#: Header keywords, in the order they are asked: the star, the night, velocities.
STAR_KEYS = ("OBJID", "APOGEE_ID", "OBJECT")
MJD_KEYS = ("MJD5", "MJD")
VRAD_KEYS = ("VRAD", "VREL")


def apstar_wavelength() -> np.ndarray:
    """(8575,) float64 the apStar grid [Angstrom, vacuum]: ``10 ** (4.179 + 6e-6
    k)``."""
    k = np.arange(APSTAR_N_PIX)
    return 10.0 ** (APSTAR_LOG10_START + APSTAR_LOG10_STEP * k)


def doppler_factor(v_kms: float) -> float:
    """The relativistic Doppler factor ``sqrt((1 + v/c) / (1 - v/c))`` of a velocity
    [km/s] (``lambda_obs = lambda_emitted * factor``), as the fitter's model."""
    return float(np.exp(np.arctanh(float(v_kms) / C_KMS)))


class ApVisit(NamedTuple):
    """One apVisit file as stored (see the module docstring).

    Attributes:
        flux: (C, N) flux (HDU 1) [1e-17 erg/s/cm^2/A], native byte order.
        flux_err: (C, N) 1-sigma errors (HDU 2).
        bits: (C, N) int64 APOGEE_PIXMASK bits (HDU 3).
        wavelength: (C, N) float64 observed vacuum wavelength [A] (HDU 4).
        id: the file name without ``.fits`` / ``.fits.gz``.
        star: the star's id (``OBJID``, ``APOGEE_ID`` or ``OBJECT``), or None.
        mjd: the night (``MJD5``, ``MJD`` or the file name), or None.
        vhelio: the star's barycentric velocity [km/s] (``VHELIO``, or ``VRAD + BC``),
            or None.
        vrad: its velocity relative to the observatory [km/s] (``VRAD`` / ``VREL``, or
            ``VHELIO - BC``), or None.
        bc: the barycentric correction [km/s] (``BC``, or ``VHELIO - VRAD``), or None.
    """

    flux: np.ndarray
    flux_err: np.ndarray
    bits: np.ndarray
    wavelength: np.ndarray
    id: str
    star: str | None
    mjd: int | None
    vhelio: float | None
    vrad: float | None
    bc: float | None


def _number(hdr, keys) -> float | None:
    for k in keys:
        if k in hdr:
            try:
                v = float(hdr[k])
            except (TypeError, ValueError):
                continue
            if np.isfinite(v):
                return v
    return None


def _header_info(path: Path, hdr) -> dict:
    star = None
    for k in STAR_KEYS:
        val = str(hdr.get(k, "") or "").strip()
        if val:
            star = val
            break
    mjd = _number(hdr, MJD_KEYS)
    if mjd is None:
        m = re.match(r"a[ps]visit-.*-(\d{5})-\d+$", fits_id(path), re.IGNORECASE)
        mjd = float(m.group(1)) if m else None
    vhelio, vrad, bc = _number(hdr, ("VHELIO",)), _number(hdr, VRAD_KEYS), None
    bc = _number(hdr, ("BC",))
    if bc is None and vhelio is not None and vrad is not None:
        bc = vhelio - vrad
    if vhelio is None and vrad is not None and bc is not None:
        vhelio = vrad + bc
    if vrad is None and vhelio is not None and bc is not None:
        vrad = vhelio - bc
    return {
        "star": star,
        "mjd": None if mjd is None else int(mjd),
        "vhelio": vhelio,
        "vrad": vrad,
        "bc": bc,
    }


def is_apvisit_name(path) -> bool:
    """``path``'s name is an apVisit file's (``apVisit-`` / ``asVisit-``, FITS)."""
    name = Path(path).name.lower()
    return name.startswith(APVISIT_PREFIXES) and has_suffix(Path(path), FITS_SUFFIXES)


def looks_like_apvisit(path) -> bool:
    """``path`` is named as an apVisit file, or is a FITS file laid out as one (a 2-D
    HDU 1 without wavelength keywords and an image HDU 4 of its shape); headers only.
    A file that cannot be opened is not one (its error is another reader's)."""
    path = Path(path)
    if is_apvisit_name(path):
        return True
    if not has_suffix(path, FITS_SUFFIXES) or not path.is_file():
        return False
    try:
        with warnings.catch_warnings():  # a short file warns: not ours to say
            warnings.simplefilter("ignore")
            return _laid_out_as_apvisit(path)
    except (OSError, ValueError, TypeError, KeyError, IndexError, UserWarning):
        return False


def _laid_out_as_apvisit(path: Path) -> bool:
    """:func:`looks_like_apvisit` of an existing FITS file not named as one."""
    from astropy.io import fits

    with fits.open(path, memmap=True, lazy_load_hdus=True) as hdul:
        h1 = hdul[1].header
        h4 = hdul[4].header
        return (
            h1.get("NAXIS") == 2
            and "CRVAL1" not in h1
            and "CRVAL1" not in hdul[0].header
            and h4.get("NAXIS") == 2
            and (h4.get("NAXIS1"), h4.get("NAXIS2"))
            == (h1.get("NAXIS1"), h1.get("NAXIS2"))
        )


def read_apvisit(path: str | os.PathLike) -> ApVisit:
    """One apVisit file, as stored (see the module docstring), checked.

    Raises:
        FileNotFoundError: no such file.
        payne_lite.FileFormatError: not FITS, truncated or damaged (a failed
            checksum), or not laid out as an apVisit file: HDUs 1-4 images of one
            shape (C, N), an integer HDU 3, wavelengths finite, positive and
            strictly monotonic along each chip, chips that do not overlap.
    """
    from astropy.io import fits

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    hdul, n_hdu = open_fits_checked(path, memmap=False)
    with hdul:
        try:
            return _read_hdus(path, hdul, n_hdu)
        except FileFormatError:
            raise
        except (
            OSError, ValueError, TypeError, KeyError, IndexError, fits.VerifyError
        ) as err:  # fmt: skip
            raise FileFormatError(
                f"{path}: truncated or corrupt FITS file ({type(err).__name__}: "
                f"{' '.join(str(err).split())[:200]})"
            ) from err


def _read_hdus(path: Path, hdul, n_hdu: int) -> ApVisit:
    from astropy.io import fits

    if n_hdu > 1 and ("CRVAL1" in hdul[1].header or "CRVAL1" in hdul[0].header):
        raise FileFormatError(
            f"{path}: not an apVisit file (its wavelength is in header keywords, as "
            "in apStar / aspcapStar files: the 'apogee-fits' reader's); a list of "
            "files is apVisit files or apStar / aspcapStar files, not both"
        )
    if n_hdu < 5:
        raise FileFormatError(
            f"{path}: expected an apVisit file with flux, error, bitmask and "
            f"wavelength in HDUs 1-4, found {n_hdu} HDU(s)"
        )
    arrays = {}
    for k, what in ((1, "flux"), (2, "error"), (3, "bitmask"), (4, "wavelength")):
        hdu = hdul[k]
        if not isinstance(hdu, fits.ImageHDU | fits.CompImageHDU) or hdu.data is None:
            raise FileFormatError(
                f"{path}: HDU {k} ({what}) must be an image, got "
                f"{type(hdu).__name__}{'' if hdu.data is not None else ' without data'}"
            )
        data = np.asarray(hdu.data)
        if data.ndim != 2 or data.shape[0] > 3 or data.shape[1] < 8:
            raise FileFormatError(
                f"{path}: HDU {k} ({what}) {data.shape} must be (n_chips <= 3, n_pix)"
            )
        if k > 1 and data.shape != arrays["flux"].shape:
            raise FileFormatError(
                f"{path}: HDU {k} ({what}) {data.shape} does not match HDU 1 (flux) "
                f"{arrays['flux'].shape}"
            )
        arrays[what] = data.astype(data.dtype.newbyteorder("="))
    if arrays["bitmask"].dtype.kind not in "iu":
        raise FileFormatError(
            f"{path}: HDU 3 (bitmask) must hold integers, got {arrays['bitmask'].dtype}"
        )
    wave = arrays["wavelength"].astype(np.float64)
    if not np.all(np.isfinite(wave)) or np.any(wave <= 0):
        raise FileFormatError(
            f"{path}: HDU 4 (wavelength) must be finite and positive [Angstrom]"
        )
    step = np.diff(wave, axis=1)
    if not np.all((step > 0).all(axis=1) | (step < 0).all(axis=1)):
        raise FileFormatError(
            f"{path}: HDU 4 (wavelength) must be strictly monotonic along each chip"
        )
    lo, hi = wave.min(axis=1), wave.max(axis=1)
    o = np.argsort(lo)
    if np.any(lo[o][1:] <= hi[o][:-1]):
        raise FileFormatError(f"{path}: HDU 4 (wavelength): chips overlap")
    info = _header_info(path, hdul[0].header)
    return ApVisit(
        arrays["flux"],
        arrays["error"],
        arrays["bitmask"].astype(np.int64),
        wave,
        fits_id(path),
        **info,
    )


def _keys_weights(t: np.ndarray) -> np.ndarray:
    """(m, 4) weights of Keys' cubic convolution (a = -0.5) of the pixels ``i - 1 ..
    i + 2`` at ``x = i + t``, ``t`` (m,) in [0, 1]."""
    t2, t3 = t * t, t * t * t
    return 0.5 * np.stack(
        [-t3 + 2 * t2 - t, 3 * t3 - 5 * t2 + 2, -3 * t3 + 4 * t2 + t, t3 - t2], axis=1
    )


def resample_visit(wave, flux, flux_err, bad, grid):
    """A visit's chips resampled onto ``grid`` (see the module docstring).

    Args:
        wave: (C, N) wavelength of each pixel, strictly monotonic along each chip.
        flux, flux_err: (C, N) flux and 1-sigma errors.
        bad: (C, N) bool, True = no usable data.
        grid: (P,) increasing wavelengths, in the frame of ``wave``.

    Returns:
        ``(flux (P,), flux_err (P,), mask (P,))`` float64, float64, bool: mask True
        outside the chips (one input pixel from their ends and beyond) and where a bad
        pixel has weight; flux 0 and error inf there.
    """
    grid = np.asarray(grid, np.float64)
    out_f = np.zeros(grid.size)
    out_v = np.full(grid.size, np.inf)
    out_bad = np.ones(grid.size, bool)
    for c in range(wave.shape[0]):
        w, f, e, b = (np.asarray(a[c]) for a in (wave, flux, flux_err, bad))
        if w[0] > w[-1]:
            w, f, e, b = w[::-1], f[::-1], e[::-1], b[::-1]
        n = w.size
        sel = np.flatnonzero((grid >= w[1]) & (grid <= w[-2]))
        x = np.interp(grid[sel], w, np.arange(n, dtype=np.float64))
        i0 = np.clip(np.floor(x).astype(np.int64), 1, n - 3)
        wts = _keys_weights(x - i0)
        idx = i0[:, None] + np.arange(-1, 3)
        b = b | ~np.isfinite(f) | ~np.isfinite(e) | ~(e > 0)
        fb = np.where(b, 0.0, f)[idx]
        eb = np.where(b, 0.0, e)[idx]
        out_f[sel] = np.sum(wts * fb, axis=1)
        out_v[sel] = np.sum(wts**2 * eb**2, axis=1)
        out_bad[sel] = np.any(b[idx] & (wts != 0), axis=1)
    out_f[out_bad] = 0.0
    out_v[out_bad] = np.inf
    return out_f, np.sqrt(out_v), out_bad


class ApogeeVisitCatalog(Reader):
    """A list of APOGEE apVisit files read as one catalog (see the module
    docstring): resampled onto the apStar grid, continuum-normalised, masked by their
    bitmasks; one row per visit grouped by star (``visits=True``, the default) or
    one combined row per star (``visits=False``).

    The constructor reads and checks every file (its arrays are read again by
    :meth:`read`, not kept); a file that is not an apVisit file is refused.

    Args:
        paths: the apVisit files.
        bad_bits: HDU 3 bits that mark a bad pixel
            (:data:`payne_lite.catalog.APOGEE_BAD_PIXEL_BITS`).
        continuum: ``"auto"`` (The Cannon's continuum pixels, moved by each visit's
            velocity), a name (``"none"``, ``"continuum-pixels"``,
            ``"sigma-clipped"``) or a :class:`payne_lite.Normalizer`.
        visits: one row per visit (True; None, the default, means True) or one
            combined row per star (False).
        frame: ``"barycentric"`` (default; needs ``BC``, or ``VHELIO`` and ``VRAD``,
            in every header) or ``"observed"``: the frame of the visits' rows (the
            combined rows are at rest).

    Raises:
        FileNotFoundError: a missing file.
        payne_lite.FileFormatError: a file that is not an apVisit file (see
            :func:`read_apvisit`); a header without the star (``OBJID``) or a
            velocity that is needed (``BC`` for the barycentric frame, ``VHELIO`` /
            ``VRAD`` to move the continuum pixels or to put a visit at rest).
        ValueError: an empty list; an unknown frame or continuum.
    """

    name = "apogee-visit"

    @classmethod
    def claims(cls, paths: list[Path]) -> bool:
        """FITS files the first of which is named or laid out as an apVisit file
        (the others are checked when opened)."""
        return bool(paths) and looks_like_apvisit(paths[0])

    #: ``visits=True`` reads each star's visits, grouped by star (:meth:`grouped`)
    visits_option = "visits"

    def options(self) -> dict:
        return {
            "bad_bits": self.bad_bits,
            "continuum": self.continuum_spec,
            "visits": self.visits,
            "frame": self.frame,
        }

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        bad_bits: int = APOGEE_BAD_PIXEL_BITS,
        continuum="auto",
        visits: bool | None = None,
        frame: str = "barycentric",
    ):
        from ..observe import ContinuumPixels, normalizer

        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("no apVisit files given: the catalog holds no spectra")
        if frame not in FRAMES:
            raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
        self.frame = frame
        self.bad_bits = int(bad_bits)
        self.visits = True if visits is None else bool(visits)
        if isinstance(continuum, str) and continuum == "auto":
            self.continuum_spec = "auto"
            self._norm = ContinuumPixels.apogee()
        else:
            self._norm = normalizer(continuum)
            self.continuum_spec = self._norm.to_meta()
        first = self.paths[0]
        self.source = (
            str(first)
            if len(self.paths) == 1
            else f"{first} and {len(self.paths) - 1} more apVisit file(s)"
        )
        self.wavelength = apstar_wavelength()
        self.wavelength.setflags(write=False)
        if isinstance(self._norm, ContinuumPixels):
            check_pixels_on_grid(self._norm, self.wavelength, "apVisit", self.source)
        self._info = [self._check_file(p) for p in self.paths]
        self.kinds = ["apVisit"] * len(self.paths)
        stars = [i["star"] for i in self._info]
        if self.visits:
            self._rows = [[i] for i in range(len(self.paths))]
            self._ids = [fits_id(p) for p in self.paths]
            self._group = stars
        else:
            order = list(dict.fromkeys(stars))
            self._rows = [[i for i, s in enumerate(stars) if s == o] for o in order]
            self._ids = order
            self._group = None
        self.has_mask = True
        self.has_ids = True
        self.has_group = self.visits

    def _check_file(self, path: Path) -> dict:
        """A file's header items, after checking it is an apVisit file with what
        this catalog needs of its header."""
        from ..observe import ContinuumPixels

        v = read_apvisit(path)
        need = []
        if v.star is None:
            need.append(f"the star ({' / '.join(STAR_KEYS)})")
        if self.visits and self.frame == "barycentric" and v.bc is None:
            need.append(
                "the barycentric correction for frame='barycentric' (BC, or VHELIO "
                "and VRAD; or read frame='observed')"
            )
        v_star = self._star_velocity(v._asdict())
        if v_star is None and (
            not self.visits or isinstance(self._norm, ContinuumPixels)
        ):
            what = "VHELIO" if self.frame == "barycentric" else "VRAD / VREL"
            need.append(
                f"the star's velocity ({what}) to "
                + (
                    "put the visit at rest for the combined spectrum"
                    if not self.visits
                    else "move the continuum pixels (or continuum='sigma-clipped')"
                )
            )
        if need:
            raise FileFormatError(f"{path}: apVisit header without {'; '.join(need)}")
        return {k: getattr(v, k) for k in ("star", "mjd", "vhelio", "vrad", "bc")}

    def _star_velocity(self, info: dict) -> float | None:
        """The star's velocity [km/s] in the frame its rows are read in (0 at rest:
        the combined rows)."""
        if not self.visits:
            return None if info["vrad"] is None else 0.0
        return info["vhelio"] if self.frame == "barycentric" else info["vrad"]

    def _frame_shift(self, info: dict) -> float:
        """The velocity [km/s] whose Doppler factor takes observed wavelengths to the
        frame read."""
        if not self.visits:
            return -info["vrad"]  # at rest
        return info["bc"] if self.frame == "barycentric" else 0.0

    def fit_defaults(self) -> dict:
        """``{"cont_deg": <ChipPolynomial>}`` with ``continuum="fit"`` (the visits
        unnormalised, their continuum fitted with the model); else {}."""
        return continuum_to_fit([self._norm])

    def provenance(self) -> dict:
        """``continuum`` (the normaliser's record, how its pixels were moved),
        ``apogee_rows`` (what a row is) and ``apvisit`` (frame, grid, resampling,
        the correlated noise)."""
        from ..observe import ContinuumPixels

        cont = {**self._norm.to_meta(), "file_kinds": ["apVisit"]}
        if isinstance(self._norm, ContinuumPixels):
            cont["pixels_moved_by"] = (
                "nothing (at rest)"
                if not self.visits
                else (
                    "each visit's VHELIO"
                    if self.frame == "barycentric"
                    else "each visit's VRAD"
                )
            )
        rows = (
            "apVisit files: one visit each, grouped by OBJID"
            if self.visits
            else "apVisit files: one combined spectrum per OBJID (inverse-variance "
            "mean of its visits at rest, each normalised)"
        )
        return {
            "continuum": cont,
            "apogee_rows": rows,
            "apvisit": {
                "frame": "rest (VRAD removed)" if not self.visits else self.frame,
                "grid": (
                    f"apStar: log10(lambda) = {APSTAR_LOG10_START} + "
                    f"{APSTAR_LOG10_STEP} k, k < {APSTAR_N_PIX}"
                ),
                "resampling": (
                    "Keys cubic convolution (a=-0.5) in each chip's pixel index; "
                    "errors sqrt(sum w^2 sigma^2); outputs touching a bad pixel masked"
                ),
                "noise": "correlated between neighbouring resampled pixels "
                "(treated as independent by the fit)",
            },
        }

    def __len__(self) -> int:
        return len(self._rows)

    def read_group(self) -> np.ndarray | None:
        return None if self._group is None else np.array(self._group, dtype=str)

    def _visit_on_grid(self, i: int):
        """File ``i`` resampled onto the grid in its row's frame and normalised: a
        :class:`payne_lite.observe.Normalized` of one spectrum (P,)."""
        from ..observe import ContinuumPixels

        v = read_apvisit(self.paths[i])
        info = self._info[i]
        bad = ((v.bits & self.bad_bits) != 0) | ~(v.flux_err < APOGEE_NO_DATA_ERROR)
        wave = v.wavelength * doppler_factor(self._frame_shift(info))
        f, e, m = resample_visit(wave, v.flux, v.flux_err, bad, self.wavelength)
        norm = self._norm
        if isinstance(norm, ContinuumPixels):
            norm = _moved_pixels(norm, self._star_velocity(info), self.wavelength)
        return norm(self.wavelength, f, e, m)

    def read(self, start: int, stop: int) -> CatalogChunk:
        """Rows ``start:stop``: resampled, normalised (and combined) as they are
        read."""
        start, stop = self._check_range(start, stop)
        flux, err, mask = [], [], []
        for files in self._rows[start:stop]:
            outs = [self._visit_on_grid(i) for i in files]
            if len(outs) == 1:
                o = outs[0]
                flux.append(o.flux)
                err.append(o.flux_err)
                mask.append(o.mask)
                continue
            w = np.array([np.where(o.mask, 0.0, 1.0 / o.flux_err**2) for o in outs])
            sw = w.sum(axis=0)
            m = ~(sw > 0)
            s = np.where(m, 1.0, sw)
            mean = np.sum(w * np.array([o.flux for o in outs]), axis=0) / s
            flux.append(np.where(m, 1.0, mean))
            err.append(np.where(m, np.inf, 1.0 / np.sqrt(s)))
            mask.append(m)
        return CatalogChunk(
            np.array(flux, np.float32),
            np.array(err, np.float32),
            np.array(mask, bool),
            np.array(self._ids[start:stop], dtype=str),
            group=(
                None if self._group is None else np.array(self._group[start:stop], str)
            ),
        )


def _moved_pixels(norm, v_kms: float, grid: np.ndarray):
    """``norm`` (a ContinuumPixels) with its rest-frame pixels moved by ``v_kms``
    and snapped to the nearest pixels of ``grid`` (P,) increasing."""
    import dataclasses

    moved = norm.wavelength * doppler_factor(v_kms)
    j = np.clip(np.searchsorted(grid, moved), 1, grid.size - 1)
    j = np.where(moved - grid[j - 1] < grid[j] - moved, j - 1, j)
    keep = (moved >= grid[0]) & (moved <= grid[-1])
    return dataclasses.replace(norm, wavelength=np.unique(grid[j[keep]]))
