"""Continuum normalisation of observed spectra: one part of the observation side.

Payne-style emulators model *normalised* flux, so flux in physical units (APOGEE
``apStar`` files: 1e-17 erg/s/cm^2/A) is divided by a pseudo-continuum first. A
normaliser is a frozen object, called on spectra, recorded in the results' meta:

=======================  ==============================================================
:class:`NoNormalization`  the flux is normalised already (``aspcapStar``, synthetic
                          spectra): returned as it is (bad pixels masked).
:class:`ContinuumPixels`  The Payne / Cannon way: per chip, a Chebyshev polynomial
                          (degree 2) fitted by weighted least squares through given
                          continuum pixels (:meth:`ContinuumPixels.apogee`: The
                          Cannon's 529 APOGEE pixels, Ness et al. 2015, as The Payne and
                          binspec use them).
:class:`SigmaClipped`     needs no pixel list: per chip, a polynomial (degree 4) fitted
                          again and again, each time without the pixels more than
                          ``lower`` sigma below it or ``upper`` sigma above it (the
                          ASPCAP-style rejection, as in jobovy/apogee's
                          ``continuum.fit(type='aspcap')``: 10 iterations, 0.1 and 3
                          sigma): an upper envelope, for instruments without a
                          continuum-pixel list.
=======================  ==============================================================

Calling one, ``normalizer(wavelength, flux, flux_err, mask)`` -> :class:`Normalized`
``(flux, flux_err, mask, continuum)``: ``flux / c`` and errors propagated through the
division, ``sqrt((sigma / c)^2 + (f / c)^2 var(c) / c^2)``, with ``var(c)`` the
variance of the fitted continuum at the pixel (its least-squares covariance; a small
term, correlated across the chip, added to the diagonal). Bad pixels (masked, flux
or error not finite, error <= 0) never enter a continuum fit; in the output they are
masked, with flux 1 and an infinite error (zero weight in :func:`payne_lite.fit`),
never NaN. A chip with fewer good pixels to fit than ``4 * (deg + 1)``, or whose
continuum is not positive somewhere, is masked there in the same way.

Chips are wavelength ranges [Angstrom] (:data:`APOGEE_CHIPS` for APOGEE); ``None``
splits the grid where it jumps (a step over 3 times the median) or where 20 or more
consecutive pixels are bad (APOGEE's chip gaps in ``apStar`` files hold zero flux).
Plain numpy: this runs once per spectrum before a fit, outside the jitted code.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import ClassVar, NamedTuple

import numpy as np

#: The three APOGEE detectors (blue, green, red) as vacuum wavelength ranges
#: [Angstrom]: the pixels ASPCAP keeps of the 8575-pixel apStar grid
#: (``log10 lambda = 4.179 + 6e-6 k``) are ``k`` in [322, 3242), [3648, 6048) and
#: [6412, 8306); each range here runs to the middle of the gap next to it.
APOGEE_CHIPS = ((15100.0, 15835.0), (15835.0, 16458.0), (16458.0, 17000.0))

#: Consecutive bad pixels that split a grid into chips (``chips=None``).
MIN_GAP_PIXELS = 20
#: A grid step over this multiple of the median step splits chips (as
#: :mod:`payne_lite.observe` treats gaps of the emulator's grid).
GAP_STEP_FACTOR = 3.0
#: A chip needs this many good pixels per polynomial coefficient to be fitted.
MIN_PIXELS_PER_COEF = 4


class Normalized(NamedTuple):
    """Spectra divided by their continuum.

    Attributes:
        flux: (n, P) float64 normalised flux (1 where ``mask``).
        flux_err: (n, P) float64 1-sigma errors of ``flux`` (inf where ``mask``).
        mask: (n, P) bool, True = a bad pixel (given, not finite, error <= 0, or
            where no continuum could be fitted).
        continuum: (n, P) float64, the continuum divided out (NaN where none).
    """

    flux: np.ndarray
    flux_err: np.ndarray
    mask: np.ndarray
    continuum: np.ndarray


def _check(wavelength, flux, flux_err, mask):
    flux = np.asarray(flux, np.float64)
    one = flux.ndim == 1
    flux = np.atleast_2d(flux)
    if flux.ndim != 2:
        raise ValueError(f"flux must be (P,) or (n, P), got shape {flux.shape}")
    err = np.atleast_2d(np.asarray(flux_err, np.float64))
    if err.shape != flux.shape:
        raise ValueError(
            f"flux_err {err.shape} must have the shape of flux {flux.shape}"
        )
    wave = np.asarray(wavelength, np.float64)
    if wave.shape not in ((flux.shape[1],), flux.shape):
        raise ValueError(
            f"wavelength {wave.shape} must be ({flux.shape[1]},) or {flux.shape} "
            "for flux of shape " + str(flux.shape)
        )
    m = np.zeros(flux.shape, bool)
    if mask is not None:
        mk = np.asarray(mask)
        if mk.dtype != bool or mk.shape not in ((flux.shape[1],), flux.shape):
            raise ValueError(
                f"mask must be a bool array ({flux.shape[1]},) or {flux.shape}, got "
                f"{mk.dtype} {mk.shape}"
            )
        m = m | mk
    bad = m | ~np.isfinite(flux) | ~np.isfinite(err) | ~(err > 0)
    if wave.ndim == 2:
        bad |= ~np.isfinite(wave)
    return wave, flux, err, bad, one


def _chip_slices(wave: np.ndarray, bad_all: np.ndarray, chips) -> list[np.ndarray]:
    """Index arrays of the pixels of each chip of a (P,) grid."""
    if chips is not None:
        out = [np.flatnonzero((wave >= lo) & (wave < hi)) for lo, hi in chips]
        return [c for c in out if c.size]
    good = np.isfinite(wave)
    idx = np.flatnonzero(good)
    if idx.size < 2:
        return []
    step = np.diff(np.log(wave[idx]))
    cuts = set((np.flatnonzero(step > GAP_STEP_FACTOR * np.median(step)) + 1).tolist())
    # runs of MIN_GAP_PIXELS or more pixels bad in every spectrum split chips too
    b = bad_all[idx]
    edges = np.flatnonzero(np.diff(np.concatenate([[0], b.astype(int), [0]])))
    for s, e in zip(edges[::2], edges[1::2], strict=True):
        if e - s >= MIN_GAP_PIXELS:
            cuts.update((int(s), int(e)))
    bounds = [0, *sorted(c for c in cuts if 0 < c < idx.size), idx.size]
    parts = [idx[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return [p for p in parts if p.size and not np.all(bad_all[p])]


def _wls(V, w, y):
    """Weighted least squares for every spectrum at once: V (p, k) design, w (n, p)
    weights (1/sigma^2, 0 = left out), y (n, p). Returns coefficients (n, k), their
    covariance (n, k, k) and whether each fit is determined (n,)."""
    A = np.einsum("pk,np,pj->nkj", V, w, V)
    b = np.einsum("pk,np,np->nk", V, w, y)
    n_used = np.count_nonzero(w > 0, axis=1)
    k = V.shape[1]
    ok = n_used >= MIN_PIXELS_PER_COEF * k
    A[~ok] = np.eye(k)
    b[~ok] = 0.0
    # scale the columns so that A is well conditioned before it is inverted
    d = np.sqrt(np.einsum("nkk->nk", A))
    d[d == 0] = 1.0
    As = A / d[:, :, None] / d[:, None, :]
    with np.errstate(all="ignore"):
        ok &= np.linalg.cond(As) < 1e12
    As[~ok] = np.eye(k)
    cov = np.linalg.inv(As) / d[:, :, None] / d[:, None, :]
    coef = np.einsum("nkj,nj->nk", cov, b)
    return coef, cov, ok


@dataclasses.dataclass(frozen=True, kw_only=True)
class Normalizer:
    """Base class: ``normalizer(wavelength, flux, flux_err, mask=None)`` ->
    :class:`Normalized`; :meth:`to_meta` records it."""

    #: Name in the results' meta and on the command line.
    name: ClassVar[str] = ""

    def __call__(self, wavelength, flux, flux_err, mask=None) -> Normalized:
        """Normalise spectra.

        Args:
            wavelength: (P,) or (n, P) vacuum wavelength [Angstrom] (NaN = missing).
            flux: (P,) or (n, P) flux, any units.
            flux_err: same shape, 1-sigma errors, same units.
            mask: optional bool (P,) or (n, P), True = a bad pixel.

        Returns:
            :class:`Normalized`, arrays of the shape of ``flux``.

        Raises:
            ValueError: shapes that do not fit together.
        """
        wave, flux, err, bad, one = _check(wavelength, flux, flux_err, mask)
        cont = np.full(flux.shape, np.nan)
        var_c = np.zeros(flux.shape)
        if wave.ndim == 1:
            self._fill(wave, flux, err, bad, cont, var_c)
        else:
            for i in range(flux.shape[0]):
                s = slice(i, i + 1)
                self._fill(wave[i], flux[s], err[s], bad[s], cont[s], var_c[s])
        with np.errstate(all="ignore"):
            ok = ~bad & np.isfinite(cont) & (cont > 0)
            c = np.where(ok, cont, 1.0)
            out = np.where(ok, flux / c, 1.0)
            out_err = np.where(
                ok, np.sqrt((err / c) ** 2 + out**2 * var_c / c**2), np.inf
            )
        res = Normalized(out, out_err, ~ok, cont)
        return Normalized(*(a[0] for a in res)) if one else res

    def _fill(self, wave, flux, err, bad, cont, var_c) -> None:
        """Write the continuum (and its variance) of spectra on one grid ``wave``
        (P,) into ``cont`` and ``var_c`` (n, P)."""
        raise NotImplementedError  # pragma: no cover

    def to_meta(self) -> dict:
        """A JSON-compatible record: ``{"method": name, <settings>}``."""
        return {"method": self.name}


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoNormalization(Normalizer):
    """Flux that is normalised already (``aspcapStar``, synthetic spectra): kept as
    it is; bad pixels are masked (flux 1, infinite error) as by the others."""

    name: ClassVar[str] = "none"

    def _fill(self, wave, flux, err, bad, cont, var_c) -> None:
        cont[...] = 1.0


def _chebyshev(wave, idx, deg):
    x = wave[idx]
    lo, hi = x[0], x[-1]
    t = 2.0 * (x - lo) / (hi - lo) - 1.0 if hi > lo else np.zeros_like(x)
    return np.polynomial.chebyshev.chebvander(t, deg)


def _check_chips(chips):
    if chips is None:
        return None
    try:
        out = tuple((float(lo), float(hi)) for lo, hi in chips)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"chips must be None or ((lo, hi), ...) wavelength ranges [A], got {chips!r}"
        ) from err
    if not out or any(not (0 < lo < hi) for lo, hi in out):
        raise ValueError(f"chips must be non-empty ranges 0 < lo < hi [A], got {out}")
    return out


def _check_deg(deg) -> int:
    if isinstance(deg, bool) or int(deg) != deg or not 0 <= deg <= 10:
        raise ValueError(f"deg must be an int in 0..10, got {deg!r}")
    return int(deg)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ContinuumPixels(Normalizer):
    """A pseudo-continuum through given continuum pixels, chip by chip (The Payne,
    The Cannon): per chip a Chebyshev polynomial of degree ``deg`` in wavelength,
    fitted by weighted least squares (weights ``1 / sigma^2``) to the flux of the
    good continuum pixels.

    Attributes:
        wavelength: (m,) vacuum wavelengths [Angstrom] of the continuum pixels; a
            pixel of an observed grid is a continuum pixel when it lies within
            ``rtol`` (relative) of one of them.
        deg: polynomial degree per chip (2, as The Payne and Bovy's apogee code).
        chips: wavelength ranges [Angstrom] fitted separately; None = split the grid
            at its gaps (see the module docstring).
        rtol: relative tolerance of the wavelength match (1e-6: a tenth of an
            APOGEE pixel).

    Examples:
        >>> import payne_lite as pl
        >>> norm = pl.ContinuumPixels.apogee()
        >>> norm.to_meta()["n_pixels"]
        529
    """

    name: ClassVar[str] = "continuum-pixels"
    wavelength: np.ndarray
    deg: int = 2
    chips: tuple[tuple[float, float], ...] | None = None
    rtol: float = 1e-6

    def __post_init__(self):
        w = np.sort(np.asarray(self.wavelength, np.float64).ravel())
        if w.size == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(
                "wavelength must be a non-empty array of positive, finite continuum "
                f"pixel wavelengths [A], got {w.size} value(s)"
            )
        w.setflags(write=False)
        object.__setattr__(self, "wavelength", w)
        object.__setattr__(self, "deg", _check_deg(self.deg))
        object.__setattr__(self, "chips", _check_chips(self.chips))
        if not 0 < float(self.rtol) < 1e-3:
            raise ValueError(f"rtol must be in (0, 1e-3), got {self.rtol!r}")

    @classmethod
    def apogee(cls, *, deg: int = 2) -> ContinuumPixels:
        """The Cannon's APOGEE continuum pixels (shipped with
        :func:`payne_lite.datasets.payne_apogee`) on :data:`APOGEE_CHIPS`; they
        match pixels of the ASPCAP (7214) and apStar (8575) grids."""
        from ..datasets import payne_apogee

        d = payne_apogee()
        return cls(
            wavelength=d.wavelength[d.continuum_pixels],
            deg=deg,
            chips=APOGEE_CHIPS,
        )

    def pixels(self, wave: np.ndarray) -> np.ndarray:
        """(P,) bool: the continuum pixels of the grid ``wave`` (P,) [Angstrom]."""
        wave = np.asarray(wave, np.float64)
        ref = self.wavelength
        j = np.clip(np.searchsorted(ref, wave), 1, ref.size - 1)
        near = np.minimum(np.abs(ref[j - 1] - wave), np.abs(ref[j] - wave))
        if ref.size == 1:
            near = np.abs(ref[0] - wave)
        with np.errstate(invalid="ignore"):
            return near <= self.rtol * np.abs(wave)

    def _fill(self, wave, flux, err, bad, cont, var_c) -> None:
        is_cont = self.pixels(wave)
        for idx in _chip_slices(wave, np.all(bad, axis=0), self.chips):
            V = _chebyshev(wave, idx, self.deg)
            sel = is_cont[idx]
            b = bad[:, idx][:, sel]
            w = np.where(b, 0.0, 1.0 / np.where(b, 1.0, err[:, idx][:, sel]) ** 2)
            y = np.where(w > 0, flux[:, idx][:, sel], 0.0)
            coef, cov, ok = _wls(V[sel], w, y)
            c = coef @ V.T
            cont[:, idx] = np.where(ok[:, None], c, np.nan)
            var_c[:, idx] = np.einsum("pk,nkj,pj->np", V, cov, V)

    def to_meta(self) -> dict:
        h = hashlib.sha256(np.ascontiguousarray(self.wavelength).tobytes())
        return {
            "method": self.name,
            "deg": self.deg,
            "chips": None if self.chips is None else [list(c) for c in self.chips],
            "n_pixels": int(self.wavelength.size),
            "pixels_sha256": h.hexdigest()[:16],
        }


@dataclasses.dataclass(frozen=True, kw_only=True)
class SigmaClipped(Normalizer):
    """A data-driven pseudo-continuum that needs no pixel list: per chip, a
    Chebyshev polynomial of degree ``deg`` fitted ``n_iter`` times by weighted least
    squares, each time to the pixels that the previous fit left within ``-lower``
    and ``+upper`` sigma (absorption lines fall below and drop out: the fit climbs
    to the upper envelope of the spectrum). The defaults are ASPCAP's (as in
    jobovy/apogee ``continuum.fit(type='aspcap')``): degree 4, 10 iterations, 0.1
    and 3 sigma. An emulator of spectra normalised another way sees a slightly
    different continuum level; train on spectra normalised the same way.

    Attributes:
        deg: polynomial degree per chip.
        n_iter: fits per chip (the first uses every good pixel).
        lower, upper: rejection thresholds [sigma] below and above the fit.
        chips: wavelength ranges [Angstrom]; None = split at the grid's gaps.
    """

    name: ClassVar[str] = "sigma-clipped"
    deg: int = 4
    n_iter: int = 10
    lower: float = 0.1
    upper: float = 3.0
    chips: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "deg", _check_deg(self.deg))
        object.__setattr__(self, "chips", _check_chips(self.chips))
        if (
            isinstance(self.n_iter, bool)
            or int(self.n_iter) != self.n_iter
            or not (1 <= self.n_iter <= 100)
        ):
            raise ValueError(f"n_iter must be an int in 1..100, got {self.n_iter!r}")
        for k in ("lower", "upper"):
            v = getattr(self, k)
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"{k} must be a positive number of sigma, got {v!r}")

    def _fill(self, wave, flux, err, bad, cont, var_c) -> None:
        for idx in _chip_slices(wave, np.all(bad, axis=0), self.chips):
            V = _chebyshev(wave, idx, self.deg)
            good = ~bad[:, idx]
            ivar = np.where(good, 1.0 / np.where(good, err[:, idx], 1.0) ** 2, 0.0)
            y = np.where(good, flux[:, idx], 0.0)
            use = good
            for _ in range(int(self.n_iter)):
                coef, cov, ok = _wls(V, np.where(use, ivar, 0.0), y)
                c = coef @ V.T
                z = (y - c) * np.sqrt(ivar)
                keep = good & (z > -self.lower) & (z < self.upper)
                # a fit that would keep too few pixels stops where it is
                enough = keep.sum(axis=1) >= MIN_PIXELS_PER_COEF * (self.deg + 1)
                use = np.where(enough[:, None], keep, use)
            coef, cov, ok = _wls(V, np.where(use, ivar, 0.0), y)
            cont[:, idx] = np.where(ok[:, None], coef @ V.T, np.nan)
            var_c[:, idx] = np.einsum("pk,nkj,pj->np", V, cov, V)

    def to_meta(self) -> dict:
        return {
            "method": self.name,
            "deg": self.deg,
            "n_iter": int(self.n_iter),
            "lower": float(self.lower),
            "upper": float(self.upper),
            "chips": None if self.chips is None else [list(c) for c in self.chips],
        }


#: Normalisers by name (``continuum="..."`` of readers, ``--continuum``).
NORMALIZERS = {
    NoNormalization.name: NoNormalization,
    ContinuumPixels.name: ContinuumPixels.apogee,
    SigmaClipped.name: SigmaClipped,
}


def normalizer(spec) -> Normalizer:
    """A :class:`Normalizer` from ``spec``: one (returned as it is) or a name of
    :data:`NORMALIZERS` (``"none"``, ``"continuum-pixels"`` = The Cannon's APOGEE
    pixels, ``"sigma-clipped"``, ``"fit"`` = no normalisation, a quadratic per
    APOGEE chip fitted with the model: :class:`payne_lite.FitContinuum`), each with
    its defaults.

    Raises:
        ValueError: an unknown name; TypeError: neither a name nor a Normalizer.
    """
    if isinstance(spec, Normalizer):
        return spec
    if isinstance(spec, str):
        if spec not in NORMALIZERS:
            raise ValueError(
                f"unknown continuum normalisation {spec!r}; expected one of "
                f"{', '.join(map(repr, NORMALIZERS))} or a payne_lite Normalizer"
            )
        return NORMALIZERS[spec]()
    raise TypeError(
        f"continuum must be a name ({', '.join(NORMALIZERS)}) or a "
        f"payne_lite.Normalizer, got {type(spec).__name__}"
    )
