"""Line-broadening kernels and wavelength conventions for real instruments.

Pure JAX kernels (one star; ``vmap`` for many) that act on a spectrum sampled on a
log-uniform wavelength grid, where a velocity is a fixed number of pixels:

* :func:`rotation_profile`: Gray's rotational broadening profile with linear limb
  darkening (the analytic function of velocity);
* :func:`rotation_kernel`, :func:`gaussian_kernel`: their discrete weights on the
  pixel grid;
* :func:`convolve_segments`: a banded direct convolution (static half-width) that
  treats each contiguous segment of the grid (a chip) on its own, padding its ends
  with the end pixel: nothing is convolved across a chip gap.

Discretisation. The weight of pixel offset ``j`` is the kernel convolved with the
band-limited (Whittaker-Shannon, ``sinc``) interpolant of the pixels,
``w_j = int K(v) sinc(j - v / dv) dv``, by quadrature (Gauss-Chebyshev of the second
kind for the rotation profile, whose edges have square-root behaviour;
Gauss-Hermite for Gaussians), then normalised to sum to 1 over the static
half-width. This is the exact convolution of a spectrum that is band-limited at
the pixel Nyquist frequency (a model at R = 22,500 on APOGEE's 3 pixels per
resolution element is, to 1e-4), it is a smooth function of the kernel width, it
becomes the identity as the width goes to 0 (so ``vsini = 0`` and ``vmacro = 0``
are ordinary values, not special cases), and its variance is the continuous
kernel's (a sampled kernel is wrong below a pixel; a pixel-integrated one adds a
one-pixel box). A broadening whose width goes to 0 changes the spectrum by a term
quadratic in the width: near 0 a fitted ``vsini`` is poorly determined (see
:func:`payne_lite.fit`).

Wavelengths: :func:`vacuum_to_air` and :func:`air_to_vacuum` use the IAU standard
refractive index of air (Morton 2000, ApJS 130, 403, eq. 8, after Ciddor 1996, for
dry air at 15 C, 101 325 Pa, 450 ppm CO2), as VALD and SDSS do; the inverse is
solved by fixed-point iteration of the same formula (round trip < 1e-8 A).

References:
    Gray 2005, The Observation and Analysis of Stellar Photospheres, 3rd ed., ch. 18
    (rotation profile, eq. 18.14). Morton 2000, ApJS 130, 403. Ciddor 1996, Appl.
    Opt. 35, 1566.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

#: FWHM of a Gaussian in units of its sigma, 2 sqrt(2 ln 2).
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
#: Default linear limb-darkening coefficient of the rotation profile (Gray 2005).
LIMB_DARKENING = 0.6
#: Gauss-Chebyshev (2nd kind) nodes of the rotation-kernel quadrature.
N_ROT_NODES = 160
#: Gauss-Hermite nodes of the Gaussian-kernel quadrature.
N_GAUSS_NODES = 80
#: Extra pixels of half-width beyond a kernel's support (the sinc interpolant's
#: ringing of a rotation profile's sharp edges).
SINC_MARGIN = 6
#: Half-width of a Gaussian kernel in sigmas.
GAUSS_TRUNCATE = 5.0


# --------------------------------------------------------------------------------------
# Air and vacuum wavelengths
# --------------------------------------------------------------------------------------
def _n_air(wave_vac: np.ndarray) -> np.ndarray:
    """Refractive index of standard air at vacuum wavelength [A] (Morton 2000)."""
    s2 = (1e4 / wave_vac) ** 2
    return 1.0 + 8.34254e-5 + 2.406147e-2 / (130.0 - s2) + 1.5998e-4 / (38.9 - s2)


def vacuum_to_air(wave_vac):
    """Air wavelength of a vacuum wavelength, ``lambda_air = lambda_vac / n``.

    IAU standard (Morton 2000 eq. 8, Ciddor 1996): with ``s = 1e4 / lambda_vac``
    [1/um], ``n = 1 + 8.34254e-5 + 2.406147e-2 / (130 - s^2) + 1.5998e-4 /
    (38.9 - s^2)``. Valid above 2000 A (below that, wavelengths are vacuum by
    convention and are returned unchanged).

    Args:
        wave_vac: vacuum wavelength [A], any shape.

    Returns:
        float64 array of the same shape, air wavelength [A].

    Examples:
        >>> round(float(vacuum_to_air(15000.0)), 3)
        14995.901
    """
    w = np.asarray(wave_vac, dtype=np.float64)
    return np.where(w > 2000.0, w / _n_air(np.maximum(w, 2000.0)), w)


def air_to_vacuum(wave_air):
    """Vacuum wavelength of an air wavelength: the inverse of :func:`vacuum_to_air`.

    Solves ``lambda_vac = lambda_air n(lambda_vac)`` by fixed-point iteration of the
    same IAU formula (each step gains a factor ~1e-6; four steps reach float64), so
    that the round trip closes to < 1e-8 A.

    Args:
        wave_air: air wavelength [A], any shape.

    Returns:
        float64 array of the same shape, vacuum wavelength [A].
    """
    w = np.asarray(wave_air, dtype=np.float64)
    vac = w.copy()
    for _ in range(5):
        vac = w * _n_air(np.maximum(vac, 2000.0))
    return np.where(w > 2000.0 / _n_air(np.array(2000.0)), vac, w)


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------
def _rot_weights(epsilon):
    """Fractions of the ellipse and parabola parts of Gray's profile."""
    a_e = (1.0 - epsilon) / (1.0 - epsilon / 3.0)
    return a_e, 1.0 - a_e


def rotation_profile(v, vsini, epsilon=LIMB_DARKENING):
    """Gray's rotational broadening profile G(v) [1/(km/s)] (Gray 2005, eq. 18.14).

    ``G(v) = [2 (1 - e) sqrt(1 - x^2) + (pi e / 2) (1 - x^2)] / (pi vsini (1 - e/3))``
    with ``x = v / vsini`` for ``|x| < 1``, else 0: a star rotating rigidly with
    projected equatorial velocity ``vsini`` and a linear limb-darkening law with
    coefficient ``e``. Integrates to 1 over v; variance
    ``vsini^2 (a/4 + (1 - a)/5)`` with ``a = (1 - e) / (1 - e/3)``.

    Args:
        v: velocity offsets [km/s], any shape.
        vsini: projected rotation velocity [km/s], > 0.
        epsilon: linear limb-darkening coefficient in [0, 1].

    Returns:
        G(v), the shape of ``v``.
    """
    x = jnp.asarray(v) / vsini
    inside = jnp.abs(x) < 1.0
    x2 = jnp.where(inside, x * x, 0.0)
    g = (
        2.0 * (1.0 - epsilon) * jnp.sqrt(1.0 - x2) + 0.5 * jnp.pi * epsilon * (1.0 - x2)
    ) / (jnp.pi * vsini * (1.0 - epsilon / 3.0))
    return jnp.where(inside, g, 0.0)


def _offsets(half_width: int, dtype):
    return jnp.arange(-half_width, half_width + 1, dtype=dtype)


def rotation_kernel(vsini, dv, half_width: int, epsilon=LIMB_DARKENING):
    """Weights (2 K + 1,) of the rotation profile on a log-uniform pixel grid.

    ``w_j = int G(v) sinc(j - v / dv) dv`` (see the module docstring), j = -K..K,
    normalised to sum to 1. Smooth in ``vsini`` (also through 0, where it is the
    identity) and differentiable, so ``vsini`` can be a fit parameter.

    Args:
        vsini: projected rotation velocity [km/s], >= 0 (traced).
        dv: velocity width of one pixel [km/s], ``c * d ln(lambda)``.
        half_width: static K [pixels]; at least ``vsini / dv + SINC_MARGIN``.
        epsilon: linear limb-darkening coefficient.

    Returns:
        (2 K + 1,) weights, offset -K first.
    """
    n = N_ROT_NODES
    i = np.arange(1, n + 1)
    theta = i * np.pi / (n + 1)
    x = np.cos(theta)  # nodes on (-1, 1)
    w_sq = np.pi / (n + 1) * np.sin(theta) ** 2  # int sqrt(1 - x^2) f(x) dx
    a_e, a_p = _rot_weights(epsilon)
    # G(x) dx = [a_e (2/pi) sqrt(1 - x^2) + a_p (3/4) (1 - x^2)] dx
    wq = w_sq * (a_e * 2.0 / np.pi + a_p * 0.75 * np.sqrt(1.0 - x**2))
    wq = wq / np.sum(wq)  # exactly normalised quadrature
    dtype = jnp.result_type(vsini, float)
    j = _offsets(half_width, dtype)
    u = jnp.asarray(x, dtype) * (vsini / dv)  # node positions [pixels]
    w = jnp.sinc(j[:, None] - u[None, :]) @ jnp.asarray(wq, dtype)
    return w / jnp.sum(w)


def gaussian_kernel(sigma, half_width: int):
    """Weights (2 K + 1,) of a Gaussian of ``sigma`` [pixels] on the pixel grid.

    Band-limited like :func:`rotation_kernel` (Gauss-Hermite quadrature of
    ``N(v; 0, sigma) sinc(j - v)``); for ``sigma`` above a pixel this is the sampled
    Gaussian to 1e-6, with variance ``sigma^2``; ``sigma = 0`` is the identity.

    Args:
        sigma: standard deviation [pixels], >= 0 (traced, scalar).
        half_width: static K [pixels], about ``GAUSS_TRUNCATE * sigma`` or more.

    Returns:
        (2 K + 1,) weights summing to 1, offset -K first.
    """
    x, wh = np.polynomial.hermite.hermgauss(N_GAUSS_NODES)
    dtype = jnp.result_type(sigma, float)
    j = _offsets(half_width, dtype)
    u = jnp.asarray(np.sqrt(2.0) * x, dtype) * sigma
    w = jnp.sinc(j[:, None] - u[None, :]) @ jnp.asarray(wh / np.sqrt(np.pi), dtype)
    return w / jnp.sum(w)


def gaussian_kernels(sigma: np.ndarray, half_width: int) -> np.ndarray:
    """Per-pixel Gaussian weights (2 K + 1, P) for ``sigma`` (P,) [pixels] (NumPy).

    Sampled Gaussians ``exp(-j^2 / (2 sigma^2))`` normalised per pixel (column),
    for a fixed instrumental profile built once on the host; where
    ``sigma < 1`` pixel the band-limited form of :func:`gaussian_kernel` is used
    (sampling is wrong there). Float64.
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    j = np.arange(-half_width, half_width + 1, dtype=np.float64)[:, None]
    s = np.maximum(sigma, 1e-12)[None, :]
    w = np.exp(-0.5 * (j / s) ** 2)
    small = np.flatnonzero(sigma < 1.0)
    if small.size:
        x, wh = np.polynomial.hermite.hermgauss(N_GAUSS_NODES)
        u = np.sqrt(2.0) * x[None, :] * sigma[small, None]  # (m, nodes)
        ws = np.sinc(j[None, :, 0, None] - u[:, None, :]) @ (wh / np.sqrt(np.pi))
        w[:, small] = ws.T
    return w / np.sum(w, axis=0, keepdims=True)


def convolve_segments(flux, weights, segments):
    """Banded convolution of ``flux`` (..., P) segment by segment (pure JAX).

    ``out[i] = sum_o weights[K + o] flux[i + o]`` for o = -K..K (a correlation; the
    kernels here are symmetric, so it is the convolution), within each contiguous
    segment; a segment's ends are padded with its end pixel, so nothing crosses a
    gap.

    Args:
        flux: (..., P) spectrum (leading axes, e.g. Jacobian tangents, broadcast).
        weights: (2 K + 1,) one kernel, or (2 K + 1, P) one kernel per pixel.
        segments: static tuple of ``(first pixel, length)`` covering the pixels to
            convolve (pixels outside every segment are returned unchanged).

    Returns:
        (..., P) convolved flux.
    """
    k = (weights.shape[0] - 1) // 2
    per_pixel = weights.ndim == 2
    out = []
    pos = 0
    p = flux.shape[-1]
    for a, n in segments:
        if a > pos:
            out.append(flux[..., pos:a])
        seg = flux[..., a : a + n]
        lead = seg.shape[:-1]
        left = jnp.broadcast_to(seg[..., :1], (*lead, k))
        right = jnp.broadcast_to(seg[..., -1:], (*lead, k))
        x = jnp.concatenate([left, seg, right], axis=-1)
        acc = None
        for o in range(2 * k + 1):
            wo = weights[o, a : a + n] if per_pixel else weights[o]
            term = wo * x[..., o : o + n]
            acc = term if acc is None else acc + term
        out.append(acc)
        pos = a + n
    if pos < p:
        out.append(flux[..., pos:])
    return jnp.concatenate(out, axis=-1) if len(out) > 1 else out[0]
