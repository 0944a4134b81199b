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
batches and jitted once per shape; it runs in float32. The line list and the line
physics (populations, strengths, profiles) are in :mod:`payne_lite.grid._lines`; its
public names (:class:`LineList`, :data:`SPECIES`, :func:`make_linelist`, the physical
constants) are re-exported here.

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
from ..constants import APOGEE_DLOGLAM, APOGEE_R, C_KMS
from ._grid import SpectralGrid
from ._lines import DAMP_DLOGG as DAMP_DLOGG
from ._lines import DEFAULT_LAM_MAX as DEFAULT_LAM_MAX
from ._lines import DEFAULT_LAM_MIN as DEFAULT_LAM_MIN
from ._lines import DEFAULT_N_LINES as DEFAULT_N_LINES
from ._lines import KAPPA_THETA as KAPPA_THETA
from ._lines import LOG_PE_DFEH as LOG_PE_DFEH
from ._lines import LOG_PE_DLOGG as LOG_PE_DLOGG
from ._lines import LOG_PE_DLOGTEFF as LOG_PE_DLOGTEFF
from ._lines import LOG_PE_REF as LOG_PE_REF
from ._lines import LOG_PG_DFEH as LOG_PG_DFEH
from ._lines import LOG_PG_DLOGG as LOG_PG_DLOGG
from ._lines import LOG_PG_REF as LOG_PG_REF
from ._lines import LOG_TAU_CONST as LOG_TAU_CONST
from ._lines import LOGG_REF as LOGG_REF
from ._lines import SAHA_CONST as SAHA_CONST
from ._lines import SPECIES as SPECIES
from ._lines import TEFF_REF as TEFF_REF
from ._lines import THERMAL_B2 as THERMAL_B2
from ._lines import XI_DLOGG as XI_DLOGG
from ._lines import XI_REF as XI_REF
from ._lines import (
    LineArrays,
    check_linelist,
    line_arrays,
    line_params,
    pseudo_voigt_coeffs,
)
from ._lines import LineList as LineList
from ._lines import Species as Species
from ._lines import make_linelist as make_linelist

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

_log = logging.getLogger("payne_lite.grid")  # one logger per stage

# --- labels -------------------------------------------------------------------------
DEFAULT_LABEL_NAMES = ("Teff", "logg", "[Fe/H]", "[alpha/Fe]", "vmacro")
DEFAULT_LABEL_UNITS = ("K", "dex", "dex", "dex", "km/s")
#: (lo, hi) of the labels the synthesizer accepts, in the order of DEFAULT_LABEL_NAMES.
DEFAULT_BOX = (
    np.array([4000.0, 1.0, -2.0, -0.2, 0.0]),
    np.array([7000.0, 5.0, 0.5, 0.6, 30.0]),
)
_N_LABELS = len(DEFAULT_LABEL_NAMES)

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


# --- fine grid and spectra (pure JAX) -----------------------------------------------
class _Sampling(NamedTuple):
    """Constants of the fine grid, the line windows and the output interpolation."""

    idx: jax.Array  # (n_lines, n_win) int32 fine-pixel index of each window pixel
    dv: jax.Array  # (n_lines, n_win) velocity from the line centre [km/s]
    taper: jax.Array  # (n_lines, n_win) window taper, 0 outside the fine grid
    freq2: jax.Array  # (n_fine // 2 + 1,) 2 pi^2 f^2, f in cycles per fine pixel
    out_i0: jax.Array  # (n_pix,) int32 fine pixel left of each output pixel
    out_w1: jax.Array  # (n_pix,) interpolation weight of out_i0 + 1
    dv_fine: jax.Array  # () fine-pixel step [km/s]


def _synth_one(labels: jax.Array, lines: LineArrays, samp: _Sampling) -> jax.Array:
    """Normalised flux (n_pix,) of one star. Pure, float32.

    Args:
        labels: (6,) the 5 physical labels, then the resolving power R.
        lines: per-line constants (n_lines,).
        samp: fine-grid and output-sampling constants.
    """
    tau0, b, gamma = line_params(labels, lines)
    g_amp, g_k, l_amp, hw2 = pseudo_voigt_coeffs(tau0, b, gamma)
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
    lines = check_linelist(linelist)
    fwhm_max = math.hypot(C_KMS / resolution, float(DEFAULT_BOX[1][4]))
    samp, touch = _make_sampling(wave, lines, max_resolution_fwhm=fwhm_max)
    return wave, lines, line_arrays(lines.select(touch)), samp


def _run_batches(
    labels: np.ndarray,
    resolution: float,
    larr: LineArrays,
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
