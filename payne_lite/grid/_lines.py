"""The toy line list of the built-in synthesizer and its line physics.

Species and the seeded line list (:class:`LineList`, :func:`make_linelist`), the
populations (Saha ionisation, molecular dissociation), line-centre optical depths
(:func:`line_params`) and the pseudo-Voigt profile (:func:`pseudo_voigt_coeffs`):
the model written out in the docstring of :mod:`payne_lite.grid.synth`, which
imports these and re-exports the public ones. Pure JAX for one star, float32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._validate import as_float_array
from ..constants import K_BOLTZMANN_EV, THETA_CONST

# --- default wavelength range and line list -----------------------------------------
DEFAULT_LAM_MIN = 15100.0  # [Angstrom, vacuum]
DEFAULT_LAM_MAX = 16950.0  # [Angstrom, vacuum]; ~8,370 pixels at APOGEE_DLOGLAM
DEFAULT_N_LINES = 3000

# --- physics (see the docstring of payne_lite.grid.synth) ---------------------------
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


def check_linelist(linelist: LineList) -> LineList:
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
    converted into ``log_gf`` with the strength formula of the docstring of
    :mod:`payne_lite.grid.synth` at the reference star (5800 K, logg 4.4, solar
    abundances), so ``log_gf`` carries each line's temperature behaviour through its
    excitation potential.

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
        _log_tau0_jit(ref, line_arrays(lines)), dtype=np.float64
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


# --- line strengths and profiles (pure JAX) ----------------------------------------
class LineArrays(NamedTuple):
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


def line_arrays(lines: LineList) -> LineArrays:
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
    return LineArrays(**{k: jnp.asarray(v, jnp.float32) for k, v in cols.items()})


def _log10_1p_exp10(x: jax.Array) -> jax.Array:
    """log10(1 + 10**x), smooth and overflow-free."""
    return jnp.logaddexp(0.0, x * _LN10) / _LN10


def _log_tau0(labels: jax.Array, lines: LineArrays) -> jax.Array:
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


def line_params(
    labels: jax.Array, lines: LineArrays
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


def pseudo_voigt_coeffs(tau0, b, gamma):
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
