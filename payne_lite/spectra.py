"""specutils spectra in and out: :func:`payne_lite.fit` and :func:`payne_lite.sample`
take a ``specutils.Spectrum`` (one spectrum, or several sharing a spectral axis), a
list of them, or a ``SpectrumCollection``, and :func:`model_spectrum` returns the
fitted model as one.

What is taken from a spectrum, and how (:func:`read_spectra`):

* **wavelength**: the spectral axis, converted to Angstrom (any length, frequency,
  energy or wavenumber unit, with astropy's spectral equivalencies); it must
  increase after the conversion. Air or vacuum is read from, in this order,
  ``spectrum.meta["medium"]`` (``"air"`` or ``"vacuum"``), the WCS axis type
  (``AWAV`` air, ``WAVE`` vacuum; FITS paper III), a FITS header in
  ``spectrum.meta["header"]`` (``CTYPE1``, or an APOGEE header: vacuum), else it is
  not stated: the ``instrument``'s ``air`` decides when one is given, and without
  one vacuum is assumed with a warning. A stated medium that disagrees with the
  instrument is an error; air wavelengths are converted to vacuum by the
  :class:`~payne_lite.Instrument` (``air=True``).
* **flux**: its values, in its unit. The emulators model continuum-normalised flux:
  a flux in a physical unit (a spectral flux density) is refused unless a continuum
  is fitted (``cont_deg >= 1``), which absorbs its scale; dimensionless and
  arbitrary units are taken as normalised.
* **uncertainty**: ``StdDevUncertainty``, ``VarianceUncertainty`` or
  ``InverseVariance``, converted to a 1-sigma error in the flux's unit (zero inverse
  variance is an infinite error: zero weight). A spectrum without one is refused.
* **mask**: True = bad (specutils' convention, and this package's), joined with the
  call's ``mask``.

Several spectra on different grids become per-spectrum grids (``(n, P)``
wavelengths), padded with NaN (masked) to the longest. The call's results record
what was read in ``meta["input"]``.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import numpy as np

__all__ = ["SpectraInput", "is_spectral", "model_spectrum", "read_spectra", "unpack"]

#: Primary-header keys and values that identify an APOGEE file (vacuum wavelengths).
_APOGEE_TELESCOPES = ("apo25m", "lco25m", "apo1m")


class SpectraInput(NamedTuple):
    """Arrays read from specutils spectra (:func:`read_spectra`).

    ``flux``, ``flux_err``, ``mask`` (True = bad) are (P,) for one spectrum, else
    (n, P); ``wavelength`` [Angstrom, in ``medium``] is (P,) when every spectrum has
    the same axis, else (n, P) padded with NaN; ``lengths`` (n,) each spectrum's
    pixel count; ``medium`` ``"air"``, ``"vacuum"`` or None (not stated), and
    ``medium_from`` what stated it; ``flux_unit`` an astropy unit; ``kind``
    ``"Spectrum"``, ``"list"`` or ``"SpectrumCollection"``.
    """

    flux: np.ndarray
    flux_err: np.ndarray
    mask: np.ndarray
    wavelength: np.ndarray
    lengths: tuple[int, ...]
    medium: str | None
    medium_from: str
    flux_unit: Any
    kind: str

    def meta(self) -> dict:
        """What was read, for a results table's ``meta["input"]``."""
        return {
            "kind": f"specutils.{self.kind}"
            if self.kind != "list"
            else "list of specutils.Spectrum",
            "n_spectra": len(self.lengths),
            "flux_unit": self.flux_unit.to_string() or "dimensionless",
            "medium": self.medium or "not stated",
            "medium_from": self.medium_from,
        }


def is_spectral(obj) -> bool:
    """True for a specutils ``Spectrum`` / ``Spectrum1D`` / ``SpectrumCollection``, or
    a non-empty list or tuple of spectra (without importing specutils)."""
    if isinstance(obj, list | tuple):
        return len(obj) > 0 and all(_is_specutils(x) for x in obj)
    return _is_specutils(obj)


def _is_specutils(obj) -> bool:
    return any(c.__module__.split(".")[0] == "specutils" for c in type(obj).__mro__)


def _units():
    import astropy.units as u

    return u


# --- the parts of one spectrum ----------------------------------------------------
def _wavelength(axis, where: str) -> np.ndarray:
    u = _units()
    q = u.Quantity(axis)
    try:
        wave = q.to_value(u.AA, equivalencies=u.spectral())
    except u.UnitConversionError as err:
        raise ValueError(
            f"{where}: the spectral axis is in {q.unit}, which does not convert to a "
            "wavelength"
        ) from err
    wave = np.asarray(wave, np.float64)
    if wave.ndim >= 1 and wave.shape[-1] > 1 and np.any(np.diff(wave, axis=-1) <= 0):
        raise ValueError(
            f"{where}: the spectral axis (in {q.unit}) does not increase as a "
            "wavelength; reverse the spectrum (or use a wavelength axis)"
        )
    return wave


def _flux_err(spec, where: str) -> np.ndarray:
    unc = spec.uncertainty
    if unc is None:
        raise ValueError(
            f"{where}: the spectrum has no uncertainty; give it one (StdDevUncertainty, "
            "VarianceUncertainty or InverseVariance): the fit weighs pixels by it"
        )
    u = _units()
    kind = type(unc).__name__
    flux_unit = spec.flux.unit
    arr = np.asarray(unc.array, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "StdDevUncertainty":
            unit, err = flux_unit, arr
        elif kind == "VarianceUncertainty":
            unit, err = flux_unit**2, arr
        elif kind == "InverseVariance":
            unit, err = flux_unit**-2, arr
        else:
            raise ValueError(
                f"{where}: uncertainty of type {kind}; give StdDevUncertainty, "
                "VarianceUncertainty or InverseVariance"
            )
        if unc.unit is not None and unc.unit != unit:
            try:
                err = (err * unc.unit).to_value(unit)
            except u.UnitConversionError as e:
                raise ValueError(
                    f"{where}: the uncertainty is in {unc.unit}, which does not "
                    f"convert to {unit} (the flux is in {flux_unit})"
                ) from e
        if kind == "VarianceUncertainty":
            err = np.sqrt(err)
        elif kind == "InverseVariance":
            err = np.where(err > 0, 1.0 / np.sqrt(err), np.inf)
    return err


def _medium(spec) -> tuple[str | None, str]:
    """(``"air"`` / ``"vacuum"`` / None, what said so) for one spectrum."""
    meta = getattr(spec, "meta", None) or {}
    stated = meta.get("medium")
    if stated is not None:
        m = str(stated).strip().lower()
        if m not in ("air", "vacuum"):
            raise ValueError(
                f'spectrum.meta["medium"] must be "air" or "vacuum", got {stated!r}'
            )
        return m, 'meta["medium"]'
    wcs = getattr(spec, "wcs", None)
    ctypes = list(getattr(getattr(wcs, "wcs", None), "ctype", []) or [])
    header = meta.get("header")
    if header is not None and hasattr(header, "get"):
        ctypes.append(header.get("CTYPE1"))
    for ctype in ctypes:
        head = str(ctype or "")[:4].upper()
        if head == "AWAV":
            return "air", f"axis type {ctype!r}"
        if head == "WAVE":
            return "vacuum", f"axis type {ctype!r}"
    if header is not None and hasattr(header, "get"):
        telescope = str(header.get("TELESCOP", "")).strip().lower()
        if (
            telescope in _APOGEE_TELESCOPES
            or "apogee" in str(header.get("SURVEY", "")).lower()
        ):
            return "vacuum", f"APOGEE header (TELESCOP={telescope or '?'})"
        if "FERRE" in header and "SPECLIB" in header:  # ASPCAP's aspcapStar
            return "vacuum", "APOGEE header (ASPCAP)"
    return None, "not stated"


def _one(spec, where: str, flux_unit=None):
    """(flux, err, mask, wave) of one ``Spectrum``, flux in ``flux_unit`` if given."""
    u = _units()
    flux_q = spec.flux
    err = _flux_err(spec, where)
    flux = np.asarray(flux_q.value, np.float64)
    if flux_unit is not None and flux_q.unit != flux_unit:
        try:
            scale = (1.0 * flux_q.unit).to_value(flux_unit)
        except u.UnitConversionError as e:
            raise ValueError(
                f"{where}: flux in {flux_q.unit}, which does not convert to the first "
                f"spectrum's {flux_unit}"
            ) from e
        flux, err = flux * scale, err * scale
    mask = spec.mask
    mask = np.zeros(flux.shape, bool) if mask is None else np.asarray(mask, bool)
    if mask.shape != flux.shape:
        mask = np.broadcast_to(mask, flux.shape).copy()
    wave = _wavelength(spec.spectral_axis, where)
    return flux, np.broadcast_to(err, flux.shape), mask, wave


def read_spectra(obj) -> SpectraInput:
    """Arrays and medium of a ``Spectrum``, a list of them or a
    ``SpectrumCollection`` (see the module docstring for the rules).

    Raises:
        ValueError: no uncertainty, a spectral axis that is not a wavelength or does
            not increase, spectra with different media or flux units that do not
            convert, an empty list, shapes that disagree.
        TypeError: not specutils spectra.
    """
    if not is_spectral(obj):
        raise TypeError(f"expected specutils spectra, got {type(obj).__name__}")
    name = type(obj).__name__
    if isinstance(obj, list | tuple):
        parts = [_one(s, f"spectrum {i}", obj[0].flux.unit) for i, s in enumerate(obj)]
        media = [_medium(s) for s in obj]
        for i, (f, *_rest) in enumerate(parts):
            if f.ndim != 1:
                raise ValueError(
                    f"spectrum {i}: flux of shape {f.shape}; a list takes one spectrum "
                    "per entry (give a 2-D Spectrum on its own)"
                )
        lengths = tuple(p[0].shape[0] for p in parts)
        n_pix = max(lengths)
        waves = [p[3] for p in parts]
        same = all(
            w.shape == waves[0].shape and np.array_equal(w, waves[0]) for w in waves
        )

        def stack(k, fill):
            out = np.full((len(parts), n_pix), fill, parts[0][k].dtype)
            for i, p in enumerate(parts):
                out[i, : lengths[i]] = p[k]
            return out

        flux, err, mask = stack(0, np.nan), stack(1, np.inf), stack(2, True)
        wave = waves[0] if same else stack(3, np.nan)
        kind, unit = "list", obj[0].flux.unit
    else:
        flux, err, mask, wave = _one(obj, name)
        media = [_medium(obj)]
        if name == "SpectrumCollection":
            if flux.ndim != 2:
                raise ValueError(
                    f"SpectrumCollection of flux shape {flux.shape}; expected (n, P)"
                )
            wave = np.broadcast_to(wave, flux.shape)
            if all(np.array_equal(w, wave[0]) for w in wave):
                wave = wave[0]
        elif flux.ndim > 2:
            raise ValueError(
                f"{name}: flux of shape {flux.shape}; expected (P,) or (n, P)"
            )
        elif wave.ndim != 1 or wave.shape[0] != flux.shape[-1]:
            raise ValueError(
                f"{name}: spectral axis of shape {wave.shape} for flux {flux.shape}"
            )
        lengths = (flux.shape[-1],) * (1 if flux.ndim == 1 else flux.shape[0])
        kind, unit = (
            ("SpectrumCollection" if name == "SpectrumCollection" else "Spectrum"),
            obj.flux.unit,
        )
    stated = {m for m, _ in media if m is not None}
    if len(stated) > 1:
        raise ValueError("the spectra mix air and vacuum wavelengths; give one medium")
    if stated and any(m is None for m, _ in media):
        raise ValueError(
            "some spectra state their medium and others do not; state it for all "
            '(spectrum.meta["medium"] = "air" or "vacuum")'
        )
    medium, medium_from = media[0]
    return SpectraInput(
        flux, np.asarray(err, np.float64), mask, np.asarray(wave), lengths, medium,
        medium_from, unit, kind,
    )  # fmt: skip


def _check_flux_unit(unit, cont_deg) -> None:
    from .observe import as_continuum

    u = _units()
    if unit in (u.dimensionless_unscaled, None) or as_continuum(cont_deg) is not None:
        return
    physical = unit.physical_type
    if str(physical) != "unknown" and unit.decompose() != u.dimensionless_unscaled:
        raise ValueError(
            f"the spectrum's flux is in {unit} ({physical}), not continuum-normalised, "
            "and the emulator models normalised flux: normalise it (a "
            "payne_lite.Normalizer: ContinuumPixels.apogee() for APOGEE, "
            "SigmaClipped() without a pixel list; APOGEE apStar files read with "
            "payne_lite.open_catalog come normalised), or fit a multiplicative "
            "continuum (cont_deg >= 1, or a payne_lite.ChipPolynomial) that absorbs "
            "its scale"
        )


def unpack(flux, flux_err, emulator, *, mask, wavelength, instrument, cont_deg: int):
    """The arrays behind :func:`payne_lite.fit`'s and :func:`payne_lite.sample`'s
    first arguments: ``(flux, flux_err, emulator, mask, wavelength, instrument,
    input_meta)``.

    With specutils spectra as ``flux``, ``flux_err`` must be None (or the emulator,
    given second by position), ``wavelength`` None, and the instrument's ``air``
    follows the spectra's stated medium (see the module docstring); ``input_meta`` is
    :meth:`SpectraInput.meta`. Arrays pass through unchanged (``input_meta`` None).

    Raises:
        TypeError: no emulator; ``flux_err`` missing for arrays.
        ValueError: see :func:`read_spectra`; ``wavelength`` or ``flux_err`` given
            with spectra; a stated medium that disagrees with ``instrument.air``.
    """
    from .emulator import Emulator
    from .observe import Instrument

    if emulator is None and isinstance(flux_err, Emulator):
        flux_err, emulator = None, flux_err
    if emulator is None:
        raise TypeError("an emulator is required (the third argument, or emulator=)")
    if not is_spectral(flux):
        if flux_err is None:
            raise TypeError(
                "flux_err is required with array flux (a specutils Spectrum carries "
                "its own uncertainty)"
            )
        return flux, flux_err, emulator, mask, wavelength, instrument, None
    if flux_err is not None:
        raise ValueError(
            "flux_err is taken from the spectrum's uncertainty: give flux_err=None"
        )
    if wavelength is not None:
        raise ValueError(
            "wavelength is taken from the spectrum's spectral axis: give wavelength=None"
        )
    s = read_spectra(flux)
    _check_flux_unit(s.flux_unit, cont_deg)
    if s.medium is None:
        if instrument is None:
            warnings.warn(
                "the spectrum does not state whether its wavelengths are in air or "
                'vacuum; vacuum is assumed (set spectrum.meta["medium"], or pass '
                "instrument=pl.Instrument(air=...))",
                UserWarning,
                stacklevel=3,
            )
    else:
        air = s.medium == "air"
        if instrument is None:
            instrument = Instrument(air=air)
        elif instrument.air != air:
            raise ValueError(
                f"the spectrum's wavelengths are in {s.medium} ({s.medium_from}) but "
                f"the instrument has air={instrument.air}"
            )
    full = s.mask if mask is None else (s.mask | np.asarray(mask, bool))
    return s.flux, s.flux_err, emulator, full, s.wavelength, instrument, s.meta()


def model_spectrum(table, spectra):
    """The fitted model as specutils spectra on ``spectra``'s own axes.

    Args:
        table: the results of ``pl.fit(spectra, ..., return_model=True)`` (its
            ``model_flux`` column, one row per spectrum).
        spectra: the ``Spectrum``, list or ``SpectrumCollection`` that was fitted.

    Returns:
        The same kind as ``spectra``: model flux in the spectra's flux unit, on their
        spectral axes (units and all), without uncertainty or mask; NaN where the
        model is undefined (shifted off the emulator's grid).

    Raises:
        ValueError: no ``model_flux`` column, or rows that do not match the spectra.
    """
    from specutils import Spectrum, SpectrumCollection

    if "model_flux" not in table.colnames:
        raise ValueError(
            "the table has no model_flux column: fit with return_model=True"
        )
    model = np.asarray(table["model_flux"], np.float64)
    s = read_spectra(spectra)
    if model.shape[0] != len(s.lengths) or model.shape[-1] != s.flux.shape[-1]:
        raise ValueError(
            f"model_flux of shape {model.shape} does not match {len(s.lengths)} "
            f"spectra of {s.flux.shape[-1]} pixels"
        )
    if s.kind == "list":
        return [
            Spectrum(flux=model[i, :n] * s.flux_unit, spectral_axis=sp.spectral_axis)
            for i, (n, sp) in enumerate(zip(s.lengths, spectra, strict=True))
        ]
    if s.kind == "SpectrumCollection":
        return SpectrumCollection(
            flux=model * s.flux_unit, spectral_axis=spectra.spectral_axis
        )
    flux = model[0] if s.flux.ndim == 1 else model
    return Spectrum(flux=flux * s.flux_unit, spectral_axis=spectra.spectral_axis)
