"""Built-in synthesizer: a seeded toy line list and fast LTE-flavoured spectra in JAX.

It makes the default training grid with no download, so that everything in
``payne_lite`` runs and is tested on a fresh machine. It is *physically motivated, not
physically exact*; real users bring Kurucz/PHOENIX/Korg grids.

Labels (:data:`DEFAULT_LABEL_NAMES`): ``Teff`` [K], ``logg`` [dex, cgs], ``[Fe/H]``,
``[alpha/Fe]`` [dex] and ``vmacro`` [km/s], the **full width at half maximum of a
Gaussian** velocity broadening (macroturbulence and rotation lumped together), added in
quadrature to the instrumental FWHM ``c / R``.

Model, per line of species ``X`` (see :data:`SPECIES`), with ``theta = 5040 / Teff``
[1/eV] and ``T = Teff`` for the line-forming layer:

* electron and gas pressure [dyn cm^-2] of that layer::

      log Pe = 1.3 + (logg - 4.4) / 3 + 0.4 [Fe/H] + 5 log10(Teff / 5800)
      log Pg = 5.0 + 2 (logg - 4.4) / 3 - 0.3 [Fe/H]

* ionisation (Saha, Gray's form with the electron pressure; the ``-0.18`` holds the
  factor 2 of the free electron's spin, partition functions are set to 1)::

      log (N_II / N_I) = -0.18 + 2.5 log T - theta chi_ion - log Pe

  (equivalently ``15.68 + 1.5 log T - theta chi_ion - log Ne`` with the electron
  *density* Ne [cm^-3]; the ``1.5 log T`` form must not be used with Pe);

  and ``f_I = 1 / (1 + N_II/N_I)``, ``f_II = 1 - f_I``;
* molecules AB: the fraction of the rarer atom A bound in AB follows a dissociation
  equilibrium, ``f_AB = 1 / (1 + 10**-x)`` with
  ``x = D0 (theta - 5040 / T_half) + [B/H] + log Pg - 5.0``, so weak molecular lines
  scale as ``eps_A eps_B Pg 10**(theta D0)`` (product of two abundances) and fade above
  about 5500 K, while in cool stars ``f_AB -> 1`` (all carbon in CO, say);
* continuous opacity (H-, much of it free-free at 1.6 um):
  ``log kappa = log Pe + 0.4 theta``;
* line-centre optical depth of the Doppler core::

      log tau0 = log gf + A(X) - 12 + [X/H] - theta chi_exc + log f_pop - log kappa + C

  with ``f_pop`` = ``f_I``, ``f_II`` or ``f_AB``, ``C = 13`` (:data:`LOG_TAU_CONST`) and
  ``[X/H] = [Fe/H]`` (``+ [alpha/Fe]`` for O, Mg, Si, Ca, Ti). Neutral lines of mostly
  ionised elements (Fe I) are nearly gravity-blind, ionised lines (Fe II) and neutral
  lines of mostly neutral elements (C I, O I) strengthen at low gravity.
* profile: Voigt ``H(a, u)`` (pseudo-Voigt of Thompson et al. 1987), ``tau(v) = tau0
  H(a, v / b)``, with Doppler width ``b = sqrt(2 k T / m + xi**2)``, microturbulence
  ``xi = 1.15 - 0.25 (logg - 4.4)`` km/s (1 km/s at logg 5, 2 km/s at logg 1) and a
  Lorentz half width ``gamma = 10**(log_gamma + 0.5 (logg - 4.4))`` km/s (pressure
  damping grows with gravity). For ``tau0 << 1`` the equivalent width is
  ``W = sqrt(pi) b tau0`` [km/s]; saturation comes from ``flux = exp(-sum tau)``.
* the flux is computed on a log-uniform grid oversampled 4 times (step between 0.2
  and 1.05 km/s), each line truncated +-45 km/s from its centre (cosine taper over the
  outer 30 %), convolved by FFT with one Gaussian of FWHM ``sqrt((c/R)**2 +
  vmacro**2)`` and sampled at the output wavelengths (exactly, on a log-uniform output
  grid; by linear interpolation otherwise). The continuum is exactly 1.

The numeric core is one pure function of one star's labels, vmapped over fixed-size
batches and jitted once per shape; it runs in float32.

References:
    Ting, Y.-S., Conroy, C., Rix, H.-W., Cargile, P. 2019, ApJ 879, 69 (The Payne).
    Gray, D. F. 2005, The Observation and Analysis of Stellar Photospheres, 3rd ed.
    Thompson, P., Cox, D. E., Hastings, J. B. 1987, J. Appl. Cryst. 20, 79.
    Asplund, M., Grevesse, N., Sauval, A. J., Scott, P. 2009, ARA&A 47, 481.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft
from tqdm import tqdm

from .._validate import as_float_array, check_box, check_wavelength
from ..constants import APOGEE_DLOGLAM, APOGEE_R, C_KMS, K_BOLTZMANN_EV, THETA_CONST
from ._grid import SpectralGrid

__all__ = [
    "DEFAULT_BOX",
    "DEFAULT_LABEL_NAMES",
    "DEFAULT_LABEL_UNITS",
    "SPECIES",
    "LineList",
    "Species",
    "default_wavelength",
    "make_grid",
    "make_linelist",
    "sample_labels",
    "synthesize",
]

_log = logging.getLogger(__name__)

# --- labels -------------------------------------------------------------------------
DEFAULT_LABEL_NAMES = ("Teff", "logg", "[Fe/H]", "[alpha/Fe]", "vmacro")
DEFAULT_LABEL_UNITS = ("K", "dex", "dex", "dex", "km/s")
#: (lo, hi) of the labels the synthesizer accepts, in the order of DEFAULT_LABEL_NAMES.
DEFAULT_BOX = (
    np.array([4000.0, 1.0, -2.0, -0.2, 0.0]),
    np.array([7000.0, 5.0, 0.5, 0.6, 30.0]),
)
_N_LABELS = len(DEFAULT_LABEL_NAMES)

# --- default wavelength grid and line list ------------------------------------------
DEFAULT_LAM_MIN = 15100.0  # [Angstrom, vacuum]
DEFAULT_LAM_MAX = 16950.0  # [Angstrom, vacuum]; ~8,370 pixels at APOGEE_DLOGLAM
DEFAULT_N_LINES = 3000

# --- physics (see the module docstring) ---------------------------------------------
TEFF_REF = 5800.0  # [K] reference (solar-like) star for the pressure scalings
LOGG_REF = 4.4  # [dex]
LOG_PE_REF = 1.3  # log10 Pe [dyn cm^-2] of the line-forming layer of the reference
LOG_PE_DLOGG = 1.0 / 3.0  # Pe ~ g^(1/3), Pg ~ g^(2/3) (Gray 2005)
LOG_PE_DFEH = 0.4
LOG_PE_DLOGTEFF = 5.0
LOG_PG_REF = 5.0  # log10 Pg [dyn cm^-2]
LOG_PG_DLOGG = 2.0 / 3.0
LOG_PG_DFEH = -0.3
SAHA_CONST = -0.1762  # log10(N_II/N_I) = SAHA_CONST + 2.5 log T - theta chi - log Pe
KAPPA_THETA = 0.4  # [eV] log10 kappa_cont = log10 Pe + KAPPA_THETA * theta
LOG_TAU_CONST = 13.0  # the constant C of log10 tau0
XI_REF = 1.15  # [km/s] microturbulence at LOGG_REF
XI_DLOGG = -0.25  # [km/s per dex]
DAMP_DLOGG = 0.5  # d log10(gamma) / d logg
_AMU_KG = 1.660_539_066_60e-27
_EV_J = 1.602_176_634e-19
#: 2 k / m_u in (km/s)^2 per K: thermal b^2 = THERMAL_B2 * T / (mass [amu]).
THERMAL_B2 = 2.0 * K_BOLTZMANN_EV * _EV_J / _AMU_KG * 1e-6

# --- numerics -----------------------------------------------------------------------
OVERSAMPLE = 4  # fine-grid pixels per output pixel
MAX_FINE_STEP_KMS = 1.05  # the fine grid is at least this fine [km/s] ...
MIN_FINE_STEP_KMS = 0.2  # ... and no finer (bounds memory on very fine output grids)
LINE_WINDOW_KMS = 45.0  # each line is computed within +- this of its centre [km/s]
TAPER_START = 0.7  # cosine taper from this fraction of the window to its edge
KERNEL_NSIGMA = 6.0  # padding of the fine grid, in broadening-kernel sigmas
FLUX_FLOOR = 1e-6  # flux is clipped to [FLUX_FLOOR, 1]
#: batches are shrunk so that batch * n_lines * window pixels stays below this
#: (about 10 bytes each at peak: 0.8 GB).
MAX_BATCH_ELEMENTS = 80_000_000
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_FWHM_PER_B = 2.0 * math.sqrt(math.log(2.0))  # Doppler FWHM / b
_LN10 = math.log(10.0)


# --- species ------------------------------------------------------------------------
class Species(NamedTuple):
    """One absorbing species of the toy line list.

    Attributes:
        name: e.g. ``"Fe I"``, ``"CO"``.
        a_x: solar log abundance ``A(X) = log10(N_X / N_H) + 12`` of the element (for a
            molecule AB: of its rarer atom A) (Asplund et al. 2009).
        chi_ion: first ionisation potential of the element [eV] (of the molecule for
            molecules, where it is unused: molecules are taken as neutral).
        mass: mass of the absorber [amu] (sets the thermal Doppler width).
        ion: 0 for neutral, 1 for singly ionised.
        alpha: True if ``[X/H]`` of the element (rarer atom) includes ``[alpha/Fe]``.
        d0: dissociation energy [eV]; 0 for atoms.
        partner: the more abundant atom B of a molecule (``""`` for atoms).
        t_half: molecules only: temperature [K] at which half of atom A is bound in AB
            at the reference gas pressure and solar abundances.
    """

    name: str
    a_x: float
    chi_ion: float
    mass: float
    ion: int
    alpha: bool
    d0: float = 0.0
    partner: str = ""
    t_half: float = 0.0

    @property
    def is_molecule(self) -> bool:
        return self.d0 > 0.0


#: Elements with [X/H] = [Fe/H] + [alpha/Fe]; all others follow [Fe/H], and [H/H] = 0.
_ALPHA_ELEMENTS = {"O", "Mg", "Si", "Ca", "Ti"}

#: The species of the toy line list; ``LineList.species`` indexes this tuple.
SPECIES: tuple[Species, ...] = (
    Species("Fe I", 7.50, 7.902, 55.845, 0, False),
    Species("Fe II", 7.50, 7.902, 55.845, 1, False),
    Species("Mg I", 7.60, 7.646, 24.305, 0, True),
    Species("Si I", 7.51, 8.152, 28.086, 0, True),
    Species("Ca I", 6.34, 6.113, 40.078, 0, True),
    Species("Ti I", 4.95, 6.828, 47.867, 0, True),
    Species("Al I", 6.45, 5.986, 26.982, 0, False),
    Species("K I", 5.03, 4.341, 39.098, 0, False),
    Species("C I", 8.43, 11.260, 12.011, 0, False),
    Species("O I", 8.69, 13.618, 15.999, 0, True),
    # molecules: rarer atom first (C < O, N < C, O << H)
    Species("CO", 8.43, 14.01, 28.010, 0, False, d0=11.09, partner="O", t_half=4200.0),
    Species("CN", 7.83, 13.60, 26.018, 0, False, d0=7.76, partner="C", t_half=3500.0),
    Species("OH", 8.69, 13.02, 17.007, 0, True, d0=4.39, partner="H", t_half=3000.0),
)
_SPECIES_INDEX = {s.name: i for i, s in enumerate(SPECIES)}


class _Recipe(NamedTuple):
    """How make_linelist draws lines of one species (private tuning table)."""

    weight: float  # relative number of lines
    chi_lo: float  # excitation potential range [eV] (CO: from its rotational ladder)
    chi_hi: float
    log_tau_lo: float  # solar line-centre log10 tau0 ~ lo + truncated exponential
    log_tau_scale: float  # [dex] e-folding of the number of lines toward strong ones
    log_tau_span: float  # [dex] strongest line = lo + span
    log_gamma: float  # mean log10 Lorentz HWHM [km/s] at logg 4.4 ...
    log_gamma_sd: float  # ... and its scatter


_RECIPES: dict[str, _Recipe] = {
    "Fe I": _Recipe(0.30, 3.0, 6.7, -1.8, 1.0, 3.8, -0.9, 0.25),
    "Fe II": _Recipe(0.02, 5.5, 8.0, -2.5, 0.6, 2.5, -1.0, 0.2),
    "Mg I": _Recipe(0.03, 4.3, 6.8, -1.6, 1.0, 3.6, -0.6, 0.2),
    "Si I": _Recipe(0.05, 5.0, 7.2, -1.6, 1.0, 3.6, -0.6, 0.2),
    "Ca I": _Recipe(0.02, 3.0, 5.3, -2.0, 0.8, 3.5, -0.8, 0.2),
    "Ti I": _Recipe(0.03, 1.4, 3.0, -2.5, 0.7, 2.5, -1.0, 0.2),
    "Al I": _Recipe(0.01, 3.1, 4.8, -1.5, 0.8, 3.0, -0.8, 0.2),
    "K I": _Recipe(0.005, 2.6, 3.1, -1.5, 0.8, 2.3, -0.9, 0.2),
    "C I": _Recipe(0.03, 7.5, 9.8, -2.0, 0.8, 3.0, -1.0, 0.2),
    "O I": _Recipe(0.005, 9.1, 12.2, -2.5, 0.6, 1.5, -1.0, 0.2),
    "CO": _Recipe(0.18, 0.0, 0.0, -4.2, 0.6, 2.5, -1.6, 0.2),
    "CN": _Recipe(0.17, 0.0, 1.5, -5.0, 0.6, 2.2, -1.6, 0.2),
    "OH": _Recipe(0.15, 0.2, 2.0, -3.5, 0.7, 3.0, -1.6, 0.2),
}
#: 12C16O second-overtone (Delta v = 3) band heads in the H band [Angstrom, vacuum]
#: and the lower vibrational level v'' of each band.
_CO_BAND_HEADS = (
    (15582.0, 0),
    (15780.0, 1),
    (15982.0, 2),
    (16189.0, 3),
    (16402.0, 4),
    (16618.0, 5),
    (16840.0, 6),
)
_CO_VIB_EV = 0.266  # [eV] energy per vibrational quantum of CO
_CO_ROT_EV = 2.39e-4  # [eV] rotational constant B of CO: E_J = B J (J + 1)
_CO_J_MAX = 90
_CO_BRANCH_A = 0.025  # [Angstrom] line offset from the band head = _CO_BRANCH_A * J^2


# --- line list ----------------------------------------------------------------------
class LineList(NamedTuple):
    """A line list: one row per line, all arrays (n_lines,).

    Attributes:
        wavelength: central vacuum wavelength [Angstrom], sorted.
        species: index into :data:`SPECIES` (int).
        excitation_potential: lower-level excitation energy chi_exc [eV].
        log_gf: log10 of the oscillator strength times statistical weight.
        log_gamma: log10 of the Lorentz (damping) half width at half maximum [km/s] at
            logg = 4.4 (it scales as ``10**(0.5 (logg - 4.4))``).

    Per-line species properties (``ion``, ``mass``, ``is_alpha``, ``is_molecule``,
    ``species_names``) are derived from :data:`SPECIES`, so they cannot disagree.
    """

    wavelength: np.ndarray
    species: np.ndarray
    excitation_potential: np.ndarray
    log_gf: np.ndarray
    log_gamma: np.ndarray

    @property
    def n_lines(self) -> int:
        return int(np.size(self.wavelength))

    @property
    def species_names(self) -> np.ndarray:
        """(n_lines,) species name of each line (str)."""
        return np.array([s.name for s in SPECIES])[np.asarray(self.species)]

    @property
    def ion(self) -> np.ndarray:
        """(n_lines,) ionisation stage: 0 neutral, 1 singly ionised."""
        return _species_column("ion", int)[np.asarray(self.species)]

    @property
    def mass(self) -> np.ndarray:
        """(n_lines,) mass of the absorber [amu]."""
        return _species_column("mass", float)[np.asarray(self.species)]

    @property
    def is_alpha(self) -> np.ndarray:
        """(n_lines,) True for lines whose strength follows [alpha/Fe]."""
        return _alpha_weights()[0][np.asarray(self.species)] > 0

    @property
    def is_molecule(self) -> np.ndarray:
        """(n_lines,) True for molecular lines."""
        return _species_column("d0", float)[np.asarray(self.species)] > 0

    def select(self, index) -> LineList:
        """A new line list with the lines selected by ``index`` (slice, ints, mask)."""
        return LineList(*(np.asarray(col)[index] for col in self))


def _species_column(field: str, dtype) -> np.ndarray:
    return np.array([getattr(s, field) for s in SPECIES], dtype=dtype)


def _alpha_weights() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per species weights: ([alpha/Fe] in [A/H], [Fe/H] in [B/H], [alpha/Fe] in [B/H]).

    The [Fe/H] weight in [A/H] is 1 for every species (all A are metals).
    """
    alpha_a = np.array([float(s.alpha) for s in SPECIES])
    feh_b = np.array([float(s.partner not in ("", "H")) for s in SPECIES])
    alpha_b = np.array([float(s.partner in _ALPHA_ELEMENTS) for s in SPECIES])
    return alpha_a, feh_b, alpha_b


def _check_linelist(linelist: LineList) -> LineList:
    if not isinstance(linelist, LineList):
        raise ValueError(
            f"linelist must be a payne_lite.grid.synth.LineList, "
            f"got {type(linelist).__name__}"
        )
    cols = {}
    n = None
    for name, col in zip(LineList._fields, linelist, strict=True):
        arr = as_float_array(col, f"linelist.{name}", ndim=1)
        if n is None:
            n = arr.size
        if arr.size != n:
            raise ValueError(
                f"linelist.{name} has {arr.size} lines, linelist.wavelength has {n}"
            )
        if not np.all(np.isfinite(arr)):
            i = int(np.argmax(~np.isfinite(arr)))
            raise ValueError(f"linelist.{name}[{i}] = {float(arr[i])!r} is not finite")
        cols[name] = arr
    if n == 0:
        raise ValueError("linelist has no lines")
    sp = cols["species"]
    bad = (sp != np.round(sp)) | (sp < 0) | (sp >= len(SPECIES))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"linelist.species[{i}] = {float(sp[i])!r} is not an index "
            f"into SPECIES (0..{len(SPECIES) - 1})"
        )
    cols["species"] = sp.astype(np.int64)
    if np.any(cols["wavelength"] <= 0):
        raise ValueError("linelist.wavelength must be positive [Angstrom]")
    return LineList(**cols)


def make_linelist(
    n_lines: int = DEFAULT_N_LINES,
    *,
    seed: int = 0,
    wavelength_range: tuple[float, float] = (DEFAULT_LAM_MIN, DEFAULT_LAM_MAX),
) -> LineList:
    """A seeded, reproducible toy H-band line list.

    Species are drawn with fixed weights (Fe I most common, half of the lines from CO,
    CN and OH). Atomic, CN and OH lines are uniform in wavelength; CO lines sit in the
    second-overtone bands, piling up toward the band heads, with excitation energies
    from their vibration-rotation ladder. Line strengths are drawn as solar line-centre
    optical depths (many weak lines, a truncated exponential tail of strong ones) and
    converted into ``log_gf`` with the strength formula of the module docstring at the
    reference star (5800 K, logg 4.4, solar abundances), so ``log_gf`` carries each
    line's temperature behaviour through its excitation potential.

    Args:
        n_lines: number of lines.
        seed: seed of ``np.random.default_rng``; the same seed gives the same list.
        wavelength_range: (lo, hi) [Angstrom, vacuum].

    Returns:
        A :class:`LineList` sorted by wavelength.

    Raises:
        ValueError: ``n_lines < 1`` or an empty or non-positive wavelength range.
    """
    if int(n_lines) != n_lines or n_lines < 1:
        raise ValueError(f"n_lines must be a positive integer, got {n_lines!r}")
    n_lines = int(n_lines)
    lo, hi = (float(x) for x in wavelength_range)
    if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo < hi):
        raise ValueError(
            f"wavelength_range must be (lo, hi) with 0 < lo < hi "
            f"[Angstrom], got {wavelength_range!r}"
        )
    rng = np.random.default_rng(seed)
    names = list(_RECIPES)
    weights = np.array([_RECIPES[k].weight for k in names])
    kind = rng.choice(len(names), size=n_lines, p=weights / weights.sum())
    species = np.array([_SPECIES_INDEX[names[k]] for k in kind], dtype=np.int64)

    wave = rng.uniform(lo, hi, n_lines)
    chi = np.empty(n_lines)
    log_tau = np.empty(n_lines)
    log_gamma = np.empty(n_lines)
    for k, name in enumerate(names):
        sel = np.flatnonzero(kind == k)
        m = sel.size
        if m == 0:
            continue
        rec = _RECIPES[name]
        if name == "CO":
            wave[sel], chi[sel] = _co_lines(rng, m, lo, hi)
        else:
            chi[sel] = rng.uniform(rec.chi_lo, rec.chi_hi, m)
        u = rng.random(m)
        frac = 1.0 - math.exp(-rec.log_tau_span / rec.log_tau_scale)
        log_tau[sel] = rec.log_tau_lo - rec.log_tau_scale * np.log1p(-u * frac)
        log_gamma[sel] = rng.normal(rec.log_gamma, rec.log_gamma_sd, m)

    order = np.argsort(wave, kind="stable")
    lines = LineList(
        wavelength=wave[order],
        species=species[order],
        excitation_potential=chi[order],
        log_gf=np.zeros(n_lines),
        log_gamma=log_gamma[order],
    )
    ref = np.array([TEFF_REF, LOGG_REF, 0.0, 0.0, 0.0], dtype=np.float32)
    log_tau_zero_gf = np.asarray(
        _log_tau0_jit(ref, _line_arrays(lines)), dtype=np.float64
    )
    return lines._replace(log_gf=np.round(log_tau[order] - log_tau_zero_gf, 3))


def _co_lines(
    rng: np.random.Generator, m: int, lo: float, hi: float
) -> tuple[np.ndarray, np.ndarray]:
    """Wavelengths [A] and excitation energies [eV] of ``m`` CO lines in (lo, hi)."""
    heads = np.array([h for h, _ in _CO_BAND_HEADS])
    vib = np.array([v for _, v in _CO_BAND_HEADS])
    ok = (heads < hi) & (heads + _CO_BRANCH_A * _CO_J_MAX**2 > lo)
    if not ok.any():  # no band here: spread uniformly, low rotational levels
        j = rng.integers(1, _CO_J_MAX + 1, m)
        return rng.uniform(lo, hi, m), _CO_ROT_EV * j * (j + 1)
    wave = np.empty(m)
    chi = np.empty(m)
    todo = np.arange(m)
    while todo.size:  # rejection: keep lines that fall inside (lo, hi)
        band = rng.choice(np.flatnonzero(ok), size=todo.size)
        j = rng.integers(1, _CO_J_MAX + 1, todo.size)
        w = heads[band] + _CO_BRANCH_A * j**2
        keep = (w > lo) & (w < hi)
        wave[todo[keep]] = w[keep]
        chi[todo[keep]] = _CO_VIB_EV * vib[band[keep]] + _CO_ROT_EV * j[keep] * (
            j[keep] + 1
        )
        todo = todo[~keep]
    return wave, chi


# --- jitted numeric core ------------------------------------------------------------
class _LineArrays(NamedTuple):
    """Per-line constants of the strength and profile formulas, each (n_lines,)."""

    log_gf_eps: jax.Array  # log_gf + A(X) - 12
    chi_exc: jax.Array  # [eV]
    chi_ion: jax.Array  # [eV]
    ion: jax.Array  # 0 or 1
    molecule: jax.Array  # 0 or 1
    alpha_a: jax.Array  # weight of [alpha/Fe] in [A/H]
    feh_b: jax.Array  # weight of [Fe/H] in [B/H] (molecules)
    alpha_b: jax.Array  # weight of [alpha/Fe] in [B/H] (molecules)
    d0: jax.Array  # [eV]
    theta_half: jax.Array  # 5040 / t_half [1/eV] (molecules)
    mass: jax.Array  # [amu]
    log_gamma: jax.Array  # log10 Lorentz HWHM [km/s] at LOGG_REF


class _Sampling(NamedTuple):
    """Constants of the fine grid, the line windows and the output interpolation."""

    idx: jax.Array  # (n_lines, n_win) int32 fine-pixel index of each window pixel
    dv: jax.Array  # (n_lines, n_win) velocity from the line centre [km/s]
    taper: jax.Array  # (n_lines, n_win) window taper, 0 outside the fine grid
    freq2: jax.Array  # (n_fine // 2 + 1,) 2 pi^2 f^2, f in cycles per fine pixel
    out_i0: jax.Array  # (n_pix,) int32 fine pixel left of each output pixel
    out_w1: jax.Array  # (n_pix,) interpolation weight of out_i0 + 1
    dv_fine: jax.Array  # () fine-pixel step [km/s]


def _line_arrays(lines: LineList) -> _LineArrays:
    sp = np.asarray(lines.species)
    alpha_a, feh_b, alpha_b = _alpha_weights()
    t_half = _species_column("t_half", float)
    theta_half = np.where(
        t_half > 0, THETA_CONST / np.where(t_half > 0, t_half, 1.0), 0.0
    )
    cols = dict(
        log_gf_eps=np.asarray(lines.log_gf) + _species_column("a_x", float)[sp] - 12.0,
        chi_exc=np.asarray(lines.excitation_potential),
        chi_ion=_species_column("chi_ion", float)[sp],
        ion=_species_column("ion", float)[sp],
        molecule=(_species_column("d0", float)[sp] > 0).astype(float),
        alpha_a=alpha_a[sp],
        feh_b=feh_b[sp],
        alpha_b=alpha_b[sp],
        d0=_species_column("d0", float)[sp],
        theta_half=theta_half[sp],
        mass=_species_column("mass", float)[sp],
        log_gamma=np.asarray(lines.log_gamma),
    )
    return _LineArrays(**{k: jnp.asarray(v, jnp.float32) for k, v in cols.items()})


def _log10_1p_exp10(x: jax.Array) -> jax.Array:
    """log10(1 + 10**x), smooth and overflow-free."""
    return jnp.logaddexp(0.0, x * _LN10) / _LN10


def _log_tau0(labels: jax.Array, lines: _LineArrays) -> jax.Array:
    """log10 line-centre optical depth (n_lines,) for one star's labels (5,)."""
    teff, logg, feh, afe = labels[0], labels[1], labels[2], labels[3]
    theta = THETA_CONST / teff
    log_t = jnp.log10(teff)
    log_pe = (
        LOG_PE_REF
        + LOG_PE_DLOGG * (logg - LOGG_REF)
        + LOG_PE_DFEH * feh
        + LOG_PE_DLOGTEFF * (log_t - math.log10(TEFF_REF))
    )
    log_pg = LOG_PG_REF + LOG_PG_DLOGG * (logg - LOGG_REF) + LOG_PG_DFEH * feh
    log_kappa = log_pe + KAPPA_THETA * theta
    # atoms: fraction in the line's ionisation stage (Saha)
    log_ratio = SAHA_CONST + 2.5 * log_t - theta * lines.chi_ion - log_pe
    log_stage = lines.ion * log_ratio - _log10_1p_exp10(log_ratio)
    # molecules: fraction of the rarer atom bound (dissociation equilibrium)
    x = (
        lines.d0 * (theta - lines.theta_half)
        + lines.feh_b * feh
        + lines.alpha_b * afe
        + (log_pg - LOG_PG_REF)
    )
    log_assoc = -_log10_1p_exp10(-x)
    log_pop = jnp.where(lines.molecule > 0, log_assoc, log_stage)
    x_h = feh + lines.alpha_a * afe
    return (
        lines.log_gf_eps
        + x_h
        - theta * lines.chi_exc
        + log_pop
        - log_kappa
        + LOG_TAU_CONST
    )


_log_tau0_jit = jax.jit(_log_tau0)


def _line_params(
    labels: jax.Array, lines: _LineArrays
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Line-centre optical depth tau0, Doppler width b [km/s] and Lorentz HWHM [km/s].

    Args:
        labels: (5,) physical labels of one star.
        lines: per-line constants.

    Returns:
        (tau0, b, gamma), each (n_lines,).
    """
    teff, logg = labels[0], labels[1]
    tau0 = 10.0 ** _log_tau0(labels, lines)
    xi = XI_REF + XI_DLOGG * (logg - LOGG_REF)
    b = jnp.sqrt(THERMAL_B2 * teff / lines.mass + xi**2)
    gamma = 10.0 ** (lines.log_gamma + DAMP_DLOGG * (logg - LOGG_REF))
    return tau0, b, gamma


def _pseudo_voigt_coeffs(tau0, b, gamma):
    """Coefficients of tau(v) = g_amp exp(-g_k v^2) + l_amp / (v^2 + hw^2).

    tau(v) = tau0 * sqrt(pi) * b * V(v), with V the area-normalised pseudo-Voigt of
    Thompson et al. (1987), so that tau(0) = tau0 for gamma = 0 and the integral of
    tau over v is sqrt(pi) b tau0 [km/s] for any gamma.
    """
    f_g = _FWHM_PER_B * b
    f_l = 2.0 * gamma
    f = (
        f_g**5
        + 2.69269 * f_g**4 * f_l
        + 2.42843 * f_g**3 * f_l**2
        + 4.47163 * f_g**2 * f_l**3
        + 0.07842 * f_g * f_l**4
        + f_l**5
    ) ** 0.2
    r = f_l / f
    eta = 1.36603 * r - 0.47719 * r**2 + 0.11116 * r**3
    hw = 0.5 * f
    area = tau0 * math.sqrt(math.pi) * b
    g_amp = area * (1.0 - eta) * math.sqrt(math.log(2.0) / math.pi) / hw
    g_k = math.log(2.0) / hw**2
    l_amp = area * eta * hw / math.pi
    return g_amp, g_k, l_amp, hw**2


def _synth_one(labels: jax.Array, lines: _LineArrays, samp: _Sampling) -> jax.Array:
    """Normalised flux (n_pix,) of one star. Pure, float32.

    Args:
        labels: (6,) the 5 physical labels, then the resolving power R.
        lines: per-line constants (n_lines,).
        samp: fine-grid and output-sampling constants.
    """
    tau0, b, gamma = _line_params(labels, lines)
    g_amp, g_k, l_amp, hw2 = _pseudo_voigt_coeffs(tau0, b, gamma)
    dv2 = samp.dv**2
    tau_win = (
        g_amp[:, None] * jnp.exp(-g_k[:, None] * dv2)
        + l_amp[:, None] / (dv2 + hw2[:, None])
    ) * samp.taper
    n_fine = 2 * (samp.freq2.shape[0] - 1)
    tau = jnp.zeros(n_fine, tau_win.dtype).at[samp.idx].add(tau_win)
    depth = -jnp.expm1(-tau)
    fwhm2 = (C_KMS / labels[5]) ** 2 + labels[4] ** 2  # [km/s]^2
    sigma_pix2 = fwhm2 / (_FWHM_PER_SIGMA**2 * samp.dv_fine**2)
    depth = jnp.fft.irfft(
        jnp.fft.rfft(depth) * jnp.exp(-samp.freq2 * sigma_pix2), n=n_fine
    )
    w1 = samp.out_w1
    out = depth[samp.out_i0] * (1.0 - w1) + depth[samp.out_i0 + 1] * w1
    return jnp.clip(1.0 - out, FLUX_FLOOR, 1.0)


#: (batch, 6) labels + R -> (batch, n_pix) flux; one compilation per shape.
_synth_batch = jax.jit(jax.vmap(_synth_one, in_axes=(0, None, None)))


# --- NumPy side ---------------------------------------------------------------------
def _make_sampling(
    wave: np.ndarray, lines: LineList, *, max_resolution_fwhm: float
) -> tuple[_Sampling, np.ndarray]:
    """Fine grid, line windows and output interpolation for ``wave``.

    Args:
        wave: (n_pix,) output wavelengths [Angstrom], increasing.
        lines: the line list.
        max_resolution_fwhm: largest total broadening FWHM [km/s] to pad for.

    Returns:
        (sampling constants, mask (n_lines,) of the lines that touch the fine grid).
    """
    ln_wave = np.log(wave)
    step = float(
        np.clip(
            np.min(np.diff(ln_wave)) * C_KMS / OVERSAMPLE,
            MIN_FINE_STEP_KMS,
            MAX_FINE_STEP_KMS,
        )
    )  # [km/s]
    du = step / C_KMS
    half_win = int(math.ceil(LINE_WINDOW_KMS / step))
    sigma = max_resolution_fwhm / _FWHM_PER_SIGMA
    pad = half_win + int(math.ceil(KERNEL_NSIGMA * sigma / step)) + 2
    n_core = int(math.ceil((ln_wave[-1] - ln_wave[0]) / du)) + 1
    n_fine = 2 * scipy.fft.next_fast_len((n_core + 2 * pad + 1) // 2, real=True)
    u0 = ln_wave[0] - pad * du  # ln lambda of fine pixel 0

    ln_line = np.log(np.asarray(lines.wavelength))
    centre = np.rint((ln_line - u0) / du).astype(np.int64)
    touch = (centre + half_win >= 0) & (centre - half_win < n_fine)
    if not touch.any():  # no line near this grid: keep one, its taper is all zero
        touch[0] = True
    centre = centre[touch]
    idx = centre[:, None] + np.arange(-half_win, half_win + 1)[None, :]
    dv = (u0 + idx * du - ln_line[touch][:, None]) * C_KMS
    inside = (idx >= 0) & (idx < n_fine)
    x = np.abs(dv) / LINE_WINDOW_KMS
    ramp = np.clip((x - TAPER_START) / (1.0 - TAPER_START), 0.0, 1.0)
    taper = 0.5 * (1.0 + np.cos(np.pi * ramp)) * inside
    freq = np.fft.rfftfreq(n_fine)
    pos = (ln_wave - u0) / du
    i0 = np.clip(np.floor(pos + 1e-6).astype(np.int64), 0, n_fine - 2)
    w1 = np.clip(pos - i0, 0.0, 1.0)
    w1[w1 < 1e-5] = 0.0  # exactly sampled output pixels stay exact
    samp = _Sampling(
        idx=jnp.asarray(np.clip(idx, 0, n_fine - 1), dtype=jnp.int32),
        dv=jnp.asarray(dv, dtype=jnp.float32),
        taper=jnp.asarray(taper, dtype=jnp.float32),
        freq2=jnp.asarray(2.0 * np.pi**2 * freq**2, dtype=jnp.float32),
        out_i0=jnp.asarray(i0, dtype=jnp.int32),
        out_w1=jnp.asarray(w1, dtype=jnp.float32),
        dv_fine=jnp.asarray(step, dtype=jnp.float32),
    )
    return samp, touch


def _check_labels(labels) -> tuple[np.ndarray, bool]:
    """Labels as (n, 5) float64 and whether a single (5,) vector was given."""
    arr = as_float_array(labels, "labels", ndim=(1, 2))
    single = arr.ndim == 1
    arr2 = arr[None, :] if single else arr
    if arr2.shape[-1] != _N_LABELS or arr2.shape[0] < 1:
        raise ValueError(
            f"labels must be ({_N_LABELS},) or (n, {_N_LABELS}) with "
            f"columns {list(DEFAULT_LABEL_NAMES)}, got shape {arr.shape}"
        )
    lo, hi = DEFAULT_BOX
    for bad, what in (
        (~np.isfinite(arr2), "is not finite"),
        ((arr2 < lo) | (arr2 > hi), "is outside the synthesizer's box"),
    ):
        if bad.any():
            i, j = (int(k) for k in np.argwhere(bad)[0])
            where = f"labels[{j}]" if single else f"labels[{i}, {j}]"
            raise ValueError(
                f"{where} ({DEFAULT_LABEL_NAMES[j]}) = {float(arr2[i, j])!r} {what} "
                f"[{lo[j]:g}, {hi[j]:g}] {DEFAULT_LABEL_UNITS[j]} "
                f"({int(bad.sum())} bad value(s) in total)"
            )
    return arr2, single


def _check_positive(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a positive number, got {value!r}") from err
    if not (np.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def _prepare(wavelength, linelist, resolution):
    """Validate the non-label inputs; return (wave, lines, line arrays, sampling)."""
    if wavelength is None:
        wave = default_wavelength()
    else:
        wave = as_float_array(wavelength, "wavelength", ndim=1)
        check_wavelength(wave)
    resolution = _check_positive(resolution, "resolution")
    if linelist is None:
        lo = min(DEFAULT_LAM_MIN, float(wave[0]))
        hi = max(DEFAULT_LAM_MAX, float(wave[-1]))
        linelist = make_linelist(DEFAULT_N_LINES, seed=0, wavelength_range=(lo, hi))
    lines = _check_linelist(linelist)
    fwhm_max = math.hypot(C_KMS / resolution, float(DEFAULT_BOX[1][4]))
    samp, touch = _make_sampling(wave, lines, max_resolution_fwhm=fwhm_max)
    return wave, lines, _line_arrays(lines.select(touch)), samp


def _run_batches(
    labels: np.ndarray,
    resolution: float,
    larr: _LineArrays,
    samp: _Sampling,
    *,
    batch_size: int,
    progress: bool,
) -> np.ndarray:
    """(n, 5) labels -> (n, n_pix) float32 flux, in padded fixed-size batches."""
    n = labels.shape[0]
    size = min(batch_size, 1 << max(0, (n - 1).bit_length()))  # few distinct shapes
    size = max(1, min(size, MAX_BATCH_ELEMENTS // samp.dv.size))  # bounded memory
    full = np.empty((n, _N_LABELS + 1), dtype=np.float32)
    full[:, :_N_LABELS] = labels
    full[:, _N_LABELS] = resolution
    flux = np.empty((n, samp.out_i0.shape[0]), dtype=np.float32)
    n_batch = -(-n // size)
    with tqdm(
        total=n_batch, disable=not progress, desc="synthesizing", unit="batch"
    ) as bar:
        for start in range(0, n, size):
            chunk = full[start : start + size]
            m = chunk.shape[0]
            if m < size:  # pad with copies of the last star: one compiled shape
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - m, 0)])
            flux[start : start + m] = np.asarray(_synth_batch(chunk, larr, samp))[:m]
            bar.update(1)
    return flux


# --- public API ---------------------------------------------------------------------
def default_wavelength(
    lam_min: float = DEFAULT_LAM_MIN,
    lam_max: float = DEFAULT_LAM_MAX,
    dloglam: float = APOGEE_DLOGLAM,
) -> np.ndarray:
    """An APOGEE-like log-uniform vacuum wavelength grid.

    Args:
        lam_min: first wavelength [Angstrom].
        lam_max: upper limit [Angstrom] (the last pixel is at or below it).
        dloglam: step in log10(wavelength).

    Returns:
        (n_pix,) float64 wavelengths [Angstrom]; 8366 pixels with the defaults.
    """
    lam_min = _check_positive(lam_min, "lam_min")
    lam_max = _check_positive(lam_max, "lam_max")
    dloglam = _check_positive(dloglam, "dloglam")
    if lam_max <= lam_min:
        raise ValueError(f"lam_max ({lam_max}) must exceed lam_min ({lam_min})")
    n = int(np.floor(np.log10(lam_max / lam_min) / dloglam + 1e-9)) + 1
    if n < 2:
        raise ValueError(
            f"dloglam={dloglam} leaves fewer than 2 pixels in [{lam_min}, {lam_max}]"
        )
    return 10.0 ** (np.log10(lam_min) + dloglam * np.arange(n))


def synthesize(
    labels,
    *,
    wavelength=None,
    linelist: LineList | None = None,
    resolution: float = APOGEE_R,
    batch_size: int = 256,
) -> np.ndarray:
    """Continuum-normalised synthetic spectra for physical labels.

    Args:
        labels: (n, 5) or (5,) ``Teff`` [K], ``logg`` [dex], ``[Fe/H]``,
            ``[alpha/Fe]`` [dex], ``vmacro`` [km/s, Gaussian FWHM], inside
            :data:`DEFAULT_BOX`.
        wavelength: (n_pix,) vacuum wavelengths [Angstrom], increasing; default
            :func:`default_wavelength`. Log-uniform grids are sampled exactly, others
            by linear interpolation of the 3x oversampled spectrum.
        linelist: default ``make_linelist(3000, seed=0)`` over 15100-16950 A (widened to
            cover ``wavelength``).
        resolution: instrumental resolving power R; the instrumental profile is a
            Gaussian of FWHM ``c / R``.
        batch_size: spectra per compiled batch (peak memory about 3 MB per spectrum
            with the default grid and line list; shrunk automatically to stay below
            about 1 GB).

    Returns:
        float32 flux (n, n_pix), or (n_pix,) for one label vector, in (0, 1].

    Raises:
        ValueError: labels of the wrong shape, non-finite or outside the box (the
            message names the label and value); a bad wavelength grid, line list,
            resolution or batch size.

    Examples:
        >>> flux = synthesize([5800.0, 4.4, 0.0, 0.0, 5.0])
        >>> flux.shape, bool(flux.max() <= 1.0)
        ((8366,), True)
    """
    arr, single = _check_labels(labels)
    batch_size = _check_batch_size(batch_size)
    _, _, larr, samp = _prepare(wavelength, linelist, resolution)
    flux = _run_batches(
        arr, float(resolution), larr, samp, batch_size=batch_size, progress=False
    )
    return flux[0] if single else flux


def sample_labels(
    n: int, *, box=DEFAULT_BOX, method: str = "lhs", seed: int = 0
) -> np.ndarray:
    """Random labels filling a box, reproducible from ``seed``.

    Args:
        n: number of label vectors.
        box: (lo, hi), each (n_lab,) [physical units]; default :data:`DEFAULT_BOX`.
        method: ``"lhs"``, a Latin hypercube (each label's range cut into ``n`` equal
            strata holding exactly one sample each, strata paired at random across
            labels), or ``"uniform"``, independent uniform draws.
        seed: seed of ``np.random.default_rng``.

    Returns:
        (n, n_lab) float64 labels with ``lo <= labels <= hi``.

    Raises:
        ValueError: ``n < 1``, an unknown method or an empty box.
    """
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    n = int(n)
    lo = np.asarray(box[0], dtype=np.float64)
    lo, hi = check_box(box[0], box[1], lo.size)
    rng = np.random.default_rng(seed)
    if method == "lhs":
        strata = np.stack([rng.permutation(n) for _ in range(lo.size)], axis=1)
        unit = (strata + rng.random((n, lo.size))) / n
    elif method == "uniform":
        unit = rng.random((n, lo.size))
    else:
        raise ValueError(f"method must be 'lhs' or 'uniform', got {method!r}")
    return np.clip(lo + unit * (hi - lo), lo, hi)


def make_grid(
    n_spec: int = 3000,
    *,
    seed: int = 0,
    sampling: str = "lhs",
    n_lines: int = DEFAULT_N_LINES,
    linelist_seed: int = 0,
    wavelength=None,
    resolution: float = APOGEE_R,
    batch_size: int = 256,
    progress: bool = True,
) -> SpectralGrid:
    """A training grid from the built-in synthesizer.

    Args:
        n_spec: number of spectra.
        seed: seed of the label sampling (:func:`sample_labels`).
        sampling: ``"lhs"`` or ``"uniform"``.
        n_lines: size of the line list.
        linelist_seed: seed of :func:`make_linelist`; kept apart from ``seed`` so that
            grids with different label draws share one line list.
        wavelength: (n_pix,) [Angstrom]; default :func:`default_wavelength`.
        resolution: instrumental resolving power R.
        batch_size: spectra per compiled batch.
        progress: show a tqdm progress bar over batches.

    Returns:
        A :class:`~payne_lite.grid.SpectralGrid` with labels (n_spec, 5) in
        :data:`DEFAULT_LABEL_NAMES` order and float32 flux (n_spec, n_pix); ``meta``
        records the generator, package version and every setting.

    Raises:
        ValueError: bad settings (see :func:`sample_labels` and :func:`synthesize`).
    """
    batch_size = _check_batch_size(batch_size)
    labels = sample_labels(n_spec, method=sampling, seed=seed)
    wave = default_wavelength() if wavelength is None else wavelength
    wave = as_float_array(wave, "wavelength", ndim=1)
    check_wavelength(wave)
    lam_range = (
        min(DEFAULT_LAM_MIN, float(wave[0])),
        max(DEFAULT_LAM_MAX, float(wave[-1])),
    )
    linelist = make_linelist(n_lines, seed=linelist_seed, wavelength_range=lam_range)
    _, _, larr, samp = _prepare(wave, linelist, resolution)
    t0 = time.perf_counter()
    flux = _run_batches(
        labels, float(resolution), larr, samp, batch_size=batch_size, progress=progress
    )
    elapsed = time.perf_counter() - t0
    _log.info(
        "synthesized %d spectra x %d pixels in %.1f s", n_spec, wave.size, elapsed
    )
    lo, hi = DEFAULT_BOX
    meta = {
        "generator": "payne_lite.grid.synth",
        "payne_lite_version": _package_version(),
        "n_spec": int(n_spec),
        "seed": int(seed),
        "sampling": sampling,
        "box_lo": lo.tolist(),
        "box_hi": hi.tolist(),
        "n_lines": int(n_lines),
        "linelist_seed": int(linelist_seed),
        "linelist_wavelength_range": list(lam_range),
        "wavelength": "default" if wavelength is None else "custom",
        "resolution": float(resolution),
        "vmacro": "Gaussian FWHM [km/s], added in quadrature to c/R",
        "oversample": OVERSAMPLE,
        "line_window_kms": LINE_WINDOW_KMS,
        "dtype": "float32",
        "seconds": round(elapsed, 2),
    }
    return SpectralGrid(
        wavelength=wave,
        labels=labels,
        flux=flux,
        label_names=DEFAULT_LABEL_NAMES,
        label_units=DEFAULT_LABEL_UNITS,
        meta=meta,
        box=(lo, hi),
    )


def _package_version() -> str:
    try:
        return importlib.metadata.version("payne-lite")
    except importlib.metadata.PackageNotFoundError:
        pkg = sys.modules.get(__name__.rpartition(".")[0])
        return str(getattr(pkg, "__version__", "unknown"))
