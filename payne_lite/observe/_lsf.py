"""The instrumental line-spread function: the Gaussian that degrades the emulator's
spectra to an observed resolution (:func:`lsf_sigma_pixels`), and the rest grid's
segments it is applied on. Host-side NumPy, used by
:func:`payne_lite.observe.build_obs_model` (moved out of ``_model.py``)."""

from __future__ import annotations

import numpy as np

from ..constants import APOGEE_R
from ..emulator import Emulator
from . import broadening as _broad
from ._doppler import LOG_GRID_TOL, index_runs

#: R of an emulator's spectra when neither it nor the caller says (APOGEE's).
DEFAULT_EMULATOR_RESOLUTION = APOGEE_R


def rest_segments(wave_rest: np.ndarray) -> tuple[float, tuple[tuple[int, int], ...]]:
    """(step in ln lambda, contiguous runs (first, length)) of a log-uniform grid.

    Raises:
        ValueError: the grid is not log-uniform (gaps of whole pixels allowed).
    """
    ln_r = np.log(np.asarray(wave_rest, np.float64))
    step = float(np.median(np.diff(ln_r)))
    u = (ln_r - ln_r[0]) / step
    n = np.round(u)
    if not step > 0 or np.max(np.abs(u - n)) > LOG_GRID_TOL:
        raise ValueError(
            "broadening and resolution need an emulator on a log-uniform wavelength "
            f"grid (chip gaps allowed); this one's ln(lambda) steps range over "
            f"[{np.min(np.diff(ln_r)):.6g}, {np.max(np.diff(ln_r)):.6g}]"
        )
    runs = index_runs(n.astype(np.int64), 0)
    return step, tuple((a, length) for a, _, length in runs)


def _resolution_sigma(resolution, wave_rest, wave_obs) -> np.ndarray:
    """sigma (P_rest,) in ln lambda of the resolving power ``resolution``."""
    if callable(resolution):
        r = np.asarray(resolution(wave_rest), np.float64)
        what = "resolution(wavelength)"
        if r.shape not in ((), wave_rest.shape):
            raise ValueError(
                f"{what} returned shape {r.shape}, expected ({wave_rest.size},)"
            )
        r = np.broadcast_to(r, wave_rest.shape)
    else:
        r = np.asarray(resolution, np.float64)
        what = "resolution"
        if r.ndim == 1:
            if r.shape != wave_obs.shape:
                raise ValueError(
                    f"resolution {r.shape} must be a number, a callable of wavelength "
                    f"[A], or one R per observed pixel ({wave_obs.size},)"
                )
            r = np.interp(wave_rest, wave_obs, r)
        elif r.ndim != 0:
            raise ValueError(f"resolution must be a number or 1-D, got {r.shape}")
        r = np.broadcast_to(r, wave_rest.shape)
    if not np.all(np.isfinite(r) & (r > 0)):
        raise ValueError(f"{what} must be finite and > 0 (resolving power R)")
    return 1.0 / (r * _broad.FWHM_PER_SIGMA)


def lsf_sigma_pixels(
    emulator: Emulator,
    wave_obs,
    *,
    resolution=None,
    lsf_sigma=None,
    emulator_resolution=None,
) -> tuple[np.ndarray | None, float]:
    """The instrumental Gaussian to convolve the emulator's spectra with.

    The target profile is a Gaussian of ``sigma_t(lambda)`` (from ``resolution``
    R: FWHM = lambda / R; or ``lsf_sigma`` directly); the emulator's spectra already
    have R_emu, so the kernel is the quadrature difference,
    ``sigma^2 = sigma_t^2 - (lambda / (R_emu 2 sqrt(2 ln 2)))^2``, on the emulator's
    log-uniform grid, in pixels.

    Args:
        emulator: the emulator (its grid must be log-uniform).
        wave_obs: (P_obs,) observed (vacuum) wavelength [A], for per-pixel inputs.
        resolution: R (number), a callable ``R(wavelength [A]) -> R``, or an array
            (P_obs,) of R per observed pixel.
        lsf_sigma: Gaussian LSF sigma [A], a number or (P_obs,) per observed pixel
            (instead of ``resolution``).
        emulator_resolution: R of the emulator's spectra; default
            :attr:`Emulator.resolution`, else :data:`DEFAULT_EMULATOR_RESOLUTION`.

    Returns:
        ``(sigma (P_rest,) [pixels] or None, R_emu)``; None when neither input is
        given.

    Raises:
        ValueError: both or bad inputs, or a requested resolution above the
            emulator's (a model cannot be sharpened).
    """
    r_emu = emulator_resolution
    if r_emu is None:
        r_emu = emulator.resolution or DEFAULT_EMULATOR_RESOLUTION
    r_emu = float(r_emu)
    if not (np.isfinite(r_emu) and r_emu > 0):
        raise ValueError(f"emulator_resolution must be > 0, got {r_emu!r}")
    if resolution is None and lsf_sigma is None:
        return None, r_emu
    if resolution is not None and lsf_sigma is not None:
        raise ValueError("give resolution or lsf_sigma, not both")
    wave_rest = np.asarray(emulator.wavelength, np.float64)
    wave_obs = np.asarray(wave_obs, np.float64)
    step, _ = rest_segments(wave_rest)
    if resolution is not None:
        sig_t = _resolution_sigma(resolution, wave_rest, wave_obs)
    else:
        sa = np.asarray(lsf_sigma, np.float64)
        if sa.ndim == 1 and sa.shape == wave_obs.shape:
            sa = np.interp(wave_rest, wave_obs, sa)
        elif sa.ndim != 0:
            raise ValueError(
                f"lsf_sigma {sa.shape} must be a number [A] or one per observed "
                f"pixel ({wave_obs.size},)"
            )
        if not np.all(np.isfinite(sa) & (sa >= 0)):
            raise ValueError("lsf_sigma must be finite and >= 0 [A]")
        sig_t = np.broadcast_to(sa, wave_rest.shape) / wave_rest
    sig_e = 1.0 / (r_emu * _broad.FWHM_PER_SIGMA)
    d2 = sig_t**2 - sig_e**2
    if np.min(d2) < -1e-6 * sig_e**2:
        i = int(np.argmin(d2))
        raise ValueError(
            f"the requested resolution (R = {1 / (sig_t[i] * _broad.FWHM_PER_SIGMA):g}"
            f" at {wave_rest[i]:g} A) is higher than the emulator's (R = {r_emu:g}): "
            "a model cannot be sharpened (pass emulator_resolution= if the emulator's "
            "is not what is assumed)"
        )
    return np.sqrt(np.maximum(d2, 0.0)) / step, r_emu
