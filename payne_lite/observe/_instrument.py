"""The observation side of the model: :class:`Instrument`.

One frozen, validated object says how the emulator's rest-frame, vacuum spectra are
turned into what an instrument records, apart from the Doppler shift and the
continuum (parameters of every fit):

* ``air``: the observed wavelengths are in air (converted to vacuum, IAU standard);
* the instrumental profile: ``resolution`` R = lambda / FWHM, or ``lsf_sigma`` [A],
  against the emulator's own ``emulator_resolution``;
* which broadening kernels are modelled: rotation (``vsini``, Gray's profile with
  linear ``limb_darkening``) and Gaussian macroturbulence (``vmacro``). Their
  *values* are parameters of the fit: free, or held with ``fixed={"vsini": 30}``
  (which turns the kernel on by itself).

Every method takes it (``pl.fit``, ``pl.sample``, ``pl.log_posterior``,
``pl.fit_catalog``, ``payne-lite fit``), and every results table stores it in
``meta["instrument"]`` (:meth:`Instrument.to_meta`), so plots and resumed catalogs
rebuild exactly the model that was fitted (:meth:`Instrument.from_meta`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

from .._validate import as_float_array
from ._doppler import DOPPLER_INTERP, TAP_OFFSETS
from ._model import BROADENING_PARAMS
from .broadening import LIMB_DARKENING, air_to_vacuum

__all__ = ["Instrument"]

#: Version of the ``meta["instrument"]`` record (2 added ``doppler``).
INSTRUMENT_META_VERSION = 2
#: The interpolant of version-1 records, made before ``doppler`` was recorded: Keys'
#: six-tap cubic, the default then (the earliest were fitted with linear
#: interpolation, which a record cannot tell apart); explicit, so that a later
#: default does not change how they are read.
V1_DOPPLER = "cubic6"


def _profile_value(value, name: str):
    """A resolution or LSF width: None, a positive number, a callable, or an array of
    positive values (P,) or (n, P) (read-only float64 copy)."""
    if value is None or callable(value):
        return value
    if np.ndim(value) == 0:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"{name} must be a number, a callable or an array, got {value!r}"
            ) from None
        if not (np.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be finite and > 0, got {value!r}")
        return v
    arr = as_float_array(value, name, ndim=(1, 2))
    finite = arr[np.isfinite(arr)]
    if finite.size == 0 or np.any(finite <= 0):
        raise ValueError(f"{name}: every finite value must be > 0")
    arr.setflags(write=False)
    return arr


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Instrument:
    """How the emulator's spectra are observed (see the module docstring).

    Args:
        air: the observed wavelengths are in air (the emulator's grid is vacuum, as
            APOGEE's): they are converted with :func:`payne_lite.air_to_vacuum`.
        resolution: instrumental resolving power R = lambda / FWHM to degrade the
            model to: a number, a callable ``R(wavelength [A])``, or an array of R
            per observed pixel, (P,) or (n, P) with per-star grids. The model is
            convolved with the quadrature difference of this and
            ``emulator_resolution`` (:func:`payne_lite.observe.lsf_sigma_pixels`).
        lsf_sigma: instead of ``resolution``, the Gaussian LSF sigma [A]: a number
            or an array per observed pixel.
        emulator_resolution: R of the emulator's spectra; None = the emulator's
            ``resolution`` attribute, else 22,500 (APOGEE, The Payne's networks).
        vsini: model rotation; its value ``vsini`` [km/s] is fitted in [0, 100]
            (started at 10) unless ``fixed`` holds it.
        vmacro: model a Gaussian macroturbulence, FWHM ``vmacro`` [km/s] in [0, 50]
            (started at 5); not with an emulator that has a ``vmacro`` label.
        limb_darkening: linear limb-darkening coefficient of the rotation profile,
            in [0, 1].
        doppler: how the rest-frame model is interpolated at the shifted
            wavelengths: ``"lanczos6"`` (a twelve-tap windowed sinc, the default:
            the band-limited reconstruction of well-sampled spectra, such as survey
            spectra resampled with sinc interpolation; at S/N ~300 it keeps rv and
            label errors calibrated where a cubic's own shift bias, ~0.03 km/s on
            APOGEE, exceeds them), ``"cubic6"`` (Keys' six-tap cubic convolution,
            the default before 2026-12; 2-5 % less fit time), ``"cubic"`` (four
            taps) or ``"linear"`` (The Payne's).

    Raises:
        ValueError: both ``resolution`` and ``lsf_sigma``; a non-positive or
            non-finite width or resolution; ``limb_darkening`` outside [0, 1]; an
            unknown ``doppler``.

    Examples:
        >>> import payne_lite as pl
        >>> inst = pl.Instrument(resolution=8000.0, vsini=True)
        >>> pl.Instrument.from_meta(inst.to_meta()).resolution
        8000.0
    """

    air: bool = False
    resolution: float | Callable | np.ndarray | None = None
    lsf_sigma: float | np.ndarray | None = None
    emulator_resolution: float | None = None
    vsini: bool = False
    vmacro: bool = False
    limb_darkening: float = LIMB_DARKENING
    doppler: str = DOPPLER_INTERP

    def __post_init__(self):
        for name in ("air", "vsini", "vmacro"):
            value = getattr(self, name)
            if not isinstance(value, bool | np.bool_):
                raise ValueError(
                    f"Instrument.{name} must be True or False, got {value!r}"
                )
            object.__setattr__(self, name, bool(value))
        if self.resolution is not None and self.lsf_sigma is not None:
            raise ValueError("Instrument: give resolution or lsf_sigma, not both")
        object.__setattr__(
            self, "resolution", _profile_value(self.resolution, "resolution")
        )
        if callable(self.lsf_sigma):
            raise ValueError("Instrument.lsf_sigma must be a number or an array")
        object.__setattr__(
            self, "lsf_sigma", _profile_value(self.lsf_sigma, "lsf_sigma")
        )
        if self.emulator_resolution is not None:
            r = float(self.emulator_resolution)
            if not (np.isfinite(r) and r > 0):
                raise ValueError(
                    f"emulator_resolution must be > 0, got {self.emulator_resolution!r}"
                )
            object.__setattr__(self, "emulator_resolution", r)
        ld = float(self.limb_darkening)
        if not 0.0 <= ld <= 1.0:
            raise ValueError(f"limb_darkening must be in [0, 1], got {ld!r}")
        object.__setattr__(self, "limb_darkening", ld)
        if self.doppler not in TAP_OFFSETS:
            raise ValueError(
                f"Instrument.doppler must be one of {tuple(TAP_OFFSETS)}, "
                f"got {self.doppler!r}"
            )

    # ---------------------------------------------------------------- properties
    @property
    def has_profile(self) -> bool:
        """An instrumental profile is modelled (``resolution`` or ``lsf_sigma``)."""
        return self.resolution is not None or self.lsf_sigma is not None

    @property
    def per_star(self) -> bool:
        """The profile is given per spectrum: an (n, P) array."""
        return any(
            isinstance(v, np.ndarray) and v.ndim == 2
            for v in (self.resolution, self.lsf_sigma)
        )

    def broadening(self, fixed=None, emulator=None) -> tuple[str, ...]:
        """Names of the broadening parameters in the model, in
        :data:`payne_lite.observe.BROADENING_PARAMS` order: those switched on here and
        those that ``fixed`` holds (unless ``emulator`` has a label of that name)."""
        fixed = dict(fixed or {})
        labels = () if emulator is None else tuple(emulator.label_names)
        on = {"vsini": self.vsini, "vmacro": self.vmacro}
        return tuple(
            b for b in BROADENING_PARAMS if on[b] or (b in fixed and b not in labels)
        )

    # ---------------------------------------------------------------- the model
    def vacuum_wavelength(self, wavelength):
        """The observed ``wavelength`` (P,) or (n, P) in vacuum [A] (a float64 copy
        when ``air``; else returned as it is). None stays None (the emulator's grid)
        unless ``air``, which needs the observed grid."""
        if not self.air:
            return wavelength
        if wavelength is None:
            raise ValueError(
                "Instrument(air=True) needs the observed wavelength (the emulator's "
                "grid is vacuum)"
            )
        return air_to_vacuum(as_float_array(wavelength, "wavelength", ndim=(1, 2)))

    def for_star(self, i: int) -> Instrument:
        """This instrument with per-star (n, P) profiles reduced to star ``i``'s row."""
        changes = {
            name: value[i]
            for name in ("resolution", "lsf_sigma")
            if isinstance(value := getattr(self, name), np.ndarray) and value.ndim == 2
        }
        return dataclasses.replace(self, **changes) if changes else self

    def model_options(self, fixed=None, emulator=None) -> dict:
        """Keyword arguments of :func:`payne_lite.observe.build_obs_model` for this
        instrument (and the broadening that ``fixed`` switches on)."""
        if self.per_star:
            raise ValueError(
                "a per-star (n, P) resolution or lsf_sigma needs one wavelength grid "
                "per spectrum (n, P); call for_star(i) for one star's model"
            )
        return dict(
            resolution=self.resolution,
            lsf_sigma=self.lsf_sigma,
            emulator_resolution=self.emulator_resolution,
            broadening=self.broadening(fixed, emulator),
            limb_darkening=self.limb_darkening,
            interp=self.doppler,
        )

    # ---------------------------------------------------------------- records
    def to_meta(self, wavelength=None) -> dict:
        """A JSON-compatible record for a results table's meta.

        A callable ``resolution`` is stored as its values at ``wavelength`` (the
        observed vacuum grid the model was built on, (P,) or (n, P)); arrays as
        (nested) lists. :meth:`from_meta` gives back an instrument that builds the
        same model on that grid.
        """
        res = self.resolution
        if callable(res):
            if wavelength is None:
                raise ValueError(
                    "Instrument.to_meta: a callable resolution is recorded at the "
                    "observed wavelengths: pass wavelength="
                )
            res = np.asarray(res(np.asarray(wavelength, np.float64)), np.float64)

        def plain(v):
            return v.tolist() if isinstance(v, np.ndarray) else v

        return {
            "version": INSTRUMENT_META_VERSION,
            "air": self.air,
            "resolution": plain(res),
            "lsf_sigma": plain(self.lsf_sigma),
            "emulator_resolution": self.emulator_resolution,
            "vsini": self.vsini,
            "vmacro": self.vmacro,
            "limb_darkening": self.limb_darkening,
            "doppler": self.doppler,
        }

    @classmethod
    def from_meta(cls, record: Mapping | None) -> Instrument:
        """The instrument recorded by :meth:`to_meta` (None or {} = the default)."""
        if not record:
            return cls()
        record = dict(record)
        version = record.pop("version", None)
        if version not in (1, INSTRUMENT_META_VERSION):
            raise ValueError(
                f"instrument record version {version!r}; this payne_lite reads "
                f"versions 1-{INSTRUMENT_META_VERSION}"
            )
        if version == 1:
            record.setdefault("doppler", V1_DOPPLER)
        unknown = set(record) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"instrument record: unknown fields {sorted(unknown)}")
        for name in ("resolution", "lsf_sigma"):
            if isinstance(record.get(name), list):
                record[name] = np.asarray(record[name], np.float64)
        return cls(**record)

    def __repr__(self) -> str:
        def short(v):
            if isinstance(v, np.ndarray):
                return f"array{v.shape}"
            return repr(v)

        fields = [
            f"{f.name}={short(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not f.default
            and not (
                f.default is not dataclasses.MISSING
                and not isinstance(getattr(self, f.name), np.ndarray)
                and getattr(self, f.name) == f.default
            )
        ]
        return f"Instrument({', '.join(fields)})"
