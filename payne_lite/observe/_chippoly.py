"""The multiplicative continuum of the observation model: a Chebyshev polynomial
over the whole observed grid, or one per chip.

``fit(cont_deg=...)`` (and everything that takes ``cont_deg``: :func:`payne_lite.
fit_catalog`, :func:`payne_lite.sample`, :func:`~payne_lite.observe.make_model`)
accepts an int ``d`` (one polynomial of degree ``d`` over the whole grid; 0 = no
continuum) or a :class:`ChipPolynomial` (one polynomial of degree ``deg`` per
chip). The model is linear in the coefficients either way: the continuum is
``basis @ c`` with ``basis`` (P, n_cont), block-diagonal for chips (chip j's
columns are ``T_k(x_j)``, its own wavelength scaled to [-1, 1] over its observed
pixels, and zero on the other chips), so the fitter profiles it (``LMOptions(
continuum="profile")``) or fits it as LM parameters in the same way.

Parameter (and results column) names: ``cont_0 .. cont_d`` for one polynomial;
``cont_<chip>_<k>`` (chip j = 0, 1, ..., coefficient k = 0 .. deg) per chip.
Results record the continuum as ``meta["cont_deg"]`` (the degree) and, per chip,
``meta["cont_chips"]`` (the chips' wavelength ranges [A]): :meth:`ChipPolynomial.
from_meta` rebuilds it. Plain numpy, outside the jitted code.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from ._continuum import APOGEE_CHIPS, NORMALIZERS, Normalizer


@dataclasses.dataclass(frozen=True)
class ChipPolynomial:
    """A multiplicative continuum: per chip, a Chebyshev polynomial of degree ``deg``.

    Args:
        deg: degree of each chip's polynomial (>= 0; 0 is a scale per chip).
        chips: the chips as wavelength ranges ``((lo, hi), ...)`` [A], vacuum (as the
            fit's wavelengths after :class:`payne_lite.Instrument`'s conversion),
            increasing and not overlapping; a pixel belongs to the chip whose
            ``[lo, hi)`` holds it, a pixel outside all of them to the nearest chip.
            Each chip must hold observed pixels. None = one polynomial over the
            whole grid (what an int ``cont_deg`` means).

    Examples:
        >>> import payne_lite as pl
        >>> cont = pl.ChipPolynomial.apogee(deg=3)  # APOGEE's three detectors
        >>> cont.n_cont
        12
        >>> cont.names[:2]
        ('cont_0_0', 'cont_0_1')
        >>> # pl.fit(raw_flux, raw_err, emu, cont_deg=cont,
        >>> #        options=pl.LMOptions(continuum="profile"))
    """

    deg: int
    chips: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self):
        d = self.deg
        if isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 0:
            raise ValueError(f"ChipPolynomial deg must be an int >= 0, got {d!r}")
        object.__setattr__(self, "deg", int(d))
        if self.chips is None:
            if self.deg == 0:
                raise ValueError(
                    "ChipPolynomial(deg=0) without chips is no continuum: use "
                    "cont_deg=0, or give chips for a scale per chip"
                )
            return
        try:
            chips = tuple((float(lo), float(hi)) for lo, hi in self.chips)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"chips must be ((lo, hi), ...) wavelength ranges [A], got "
                f"{self.chips!r}"
            ) from err
        if not chips:
            raise ValueError("chips must hold at least one (lo, hi) range")
        for (lo, hi), nxt in zip(chips, [*chips[1:], None], strict=True):
            if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
                raise ValueError(f"chip ({lo}, {hi}): need finite lo < hi [A]")
            if nxt is not None and nxt[0] < hi:
                raise ValueError(
                    f"chips must increase and not overlap: ({lo}, {hi}) then {nxt}"
                )
        object.__setattr__(self, "chips", chips)

    @classmethod
    def apogee(cls, deg: int = 3) -> ChipPolynomial:
        """One polynomial per APOGEE detector (:data:`APOGEE_CHIPS`)."""
        return cls(deg, APOGEE_CHIPS)

    @property
    def n_chips(self) -> int:
        return 1 if self.chips is None else len(self.chips)

    @property
    def n_cont(self) -> int:
        """Number of coefficients: ``(deg + 1)`` per chip."""
        return (self.deg + 1) * self.n_chips

    @property
    def names(self) -> tuple[str, ...]:
        """Parameter and results column names of the coefficients, in order."""
        if self.chips is None:
            return tuple(f"cont_{k}" for k in range(self.deg + 1))
        return tuple(
            f"cont_{j}_{k}" for j in range(self.n_chips) for k in range(self.deg + 1)
        )

    def flat(self) -> np.ndarray:
        """(n_cont,) the coefficients of a continuum of 1 (``T_0`` of each chip)."""
        c = np.zeros(self.n_cont)
        c[:: self.deg + 1] = 1.0
        return c

    def chip_of(self, wave) -> np.ndarray:
        """(P,) int: the chip of each pixel of the grid ``wave`` (P,) [A]."""
        wave = np.asarray(wave, np.float64)
        if self.chips is None:
            return np.zeros(wave.shape, np.int64)
        lo = np.array([c[0] for c in self.chips])
        hi = np.array([c[1] for c in self.chips])
        dist = np.maximum(lo[None] - wave[:, None], wave[:, None] - hi[None])
        inside = (wave[:, None] >= lo[None]) & (wave[:, None] < hi[None])
        return np.argmin(np.where(inside, -np.inf, dist), axis=1)

    def basis(self, wave) -> np.ndarray:
        """(P, n_cont) the continuum's design matrix on the grid ``wave`` (P,) [A].

        Raises:
            ValueError: a chip without any pixel of ``wave``.
        """
        wave = np.asarray(wave, np.float64)
        chip = self.chip_of(wave)
        k = self.deg + 1
        out = np.zeros((wave.size, self.n_cont))
        for j in range(self.n_chips):
            sel = np.flatnonzero(chip == j)
            if sel.size == 0:
                raise ValueError(
                    f"continuum chip {self.chips[j]} A holds none of the observed "
                    f"pixels [{wave[0]:g}, {wave[-1]:g}] A: give the chips of this "
                    "grid"
                )
            w = wave[sel]
            span = w.max() - w.min()
            x = 2.0 * (w - w.min()) / (span if span > 0 else 1.0) - 1.0
            out[sel, j * k : (j + 1) * k] = np.polynomial.chebyshev.chebvander(
                x, self.deg
            )
        return out

    def to_meta(self) -> dict:
        """``{"cont_deg": deg}`` and, per chip, ``"cont_chips"`` (lists of [lo, hi])."""
        out = {"cont_deg": self.deg}
        if self.chips is not None:
            out["cont_chips"] = [list(c) for c in self.chips]
        return out

    @classmethod
    def from_meta(cls, meta) -> ChipPolynomial | None:
        """The continuum of a results table's ``meta`` (None when it had none)."""
        deg = int(meta.get("cont_deg", 0) or 0)
        chips = meta.get("cont_chips")
        if chips is None and deg == 0:
            return None
        return cls(deg, None if chips is None else tuple(map(tuple, chips)))


def as_continuum(cont_deg) -> ChipPolynomial | None:
    """The :class:`ChipPolynomial` of a ``cont_deg`` argument (an int or one), or
    None for no continuum (``cont_deg=0``).

    Raises:
        ValueError: anything else (a negative or non-integer degree).
    """
    if cont_deg is None:
        return None
    if isinstance(cont_deg, ChipPolynomial):
        return cont_deg
    if isinstance(cont_deg, bool) or not isinstance(cont_deg, int | np.integer):
        raise ValueError(
            f"cont_deg must be an int >= 0 or a ChipPolynomial, got {cont_deg!r}"
        )
    if cont_deg < 0:
        raise ValueError(f"cont_deg must be >= 0, got {cont_deg}")
    return ChipPolynomial(int(cont_deg)) if cont_deg > 0 else None


def continuum_names(cont_deg) -> tuple[str, ...]:
    """The coefficient names of a ``cont_deg`` argument (``()`` for none)."""
    c = as_continuum(cont_deg)
    return () if c is None else c.names


def continuum_meta(cont_deg) -> dict:
    """The results meta of a ``cont_deg`` argument: ``{"cont_deg": 0}`` for none,
    else :meth:`ChipPolynomial.to_meta`."""
    c = as_continuum(cont_deg)
    return {"cont_deg": 0} if c is None else c.to_meta()


@dataclasses.dataclass(frozen=True, kw_only=True)
class FitContinuum(Normalizer):
    """No normalisation step: the continuum is fitted with the model instead.

    The flux is kept as it is, in its own units (bad pixels masked, as by every
    normaliser); the fit multiplies the emulator by ``cont``, a per-chip
    polynomial, whose coefficients it fits with the labels (``pl.fit(...,
    cont_deg=cont)``). A reader that reads with it says so to the fit
    (:meth:`payne_lite.catalog.Reader.fit_defaults`), so :func:`payne_lite.
    fit_catalog` and ``payne-lite fit`` use ``cont`` unless given a ``cont_deg``.
    The default for APOGEE ``apStar`` files: on 200 mocks of the real network times
    a random quadratic continuum per chip (S/N 50), the labels' robust scatter is
    1.02-1.09x that of the same mocks perfectly normalised, against 1.09-1.77x
    through The Cannon's continuum pixels (``benchmarks/bench_continuum.py``).

    Attributes:
        cont: the continuum fitted (:class:`ChipPolynomial`); None =
            ``ChipPolynomial.apogee(2)``, a quadratic per APOGEE detector.

    Examples:
        >>> import payne_lite as pl
        >>> pl.FitContinuum().to_meta()["deg"]
        2
    """

    name: ClassVar[str] = "fit"
    cont: ChipPolynomial | None = None

    def __post_init__(self):
        cont = ChipPolynomial.apogee(2) if self.cont is None else self.cont
        if not isinstance(cont, ChipPolynomial):
            raise TypeError(
                f"FitContinuum.cont must be a payne_lite.ChipPolynomial, got "
                f"{type(cont).__name__}"
            )
        object.__setattr__(self, "cont", cont)

    @classmethod
    def apogee(cls, *, deg: int = 2) -> FitContinuum:
        """A polynomial of degree ``deg`` per APOGEE detector."""
        return cls(cont=ChipPolynomial.apogee(deg))

    def _fill(self, wave, flux, err, bad, cont, var_c) -> None:
        cont[...] = 1.0

    def to_meta(self) -> dict:
        c = self.cont
        return {
            "method": self.name,
            "deg": c.deg,
            "chips": None if c.chips is None else [list(x) for x in c.chips],
        }


NORMALIZERS[FitContinuum.name] = FitContinuum
