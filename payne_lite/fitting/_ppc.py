"""Posterior predictive checks of a point fit: does the model describe the spectrum?

Two per-star statistics of the weighted residuals ``(flux - model) / error`` at the
best fit, beside chi2 itself:

* ``chi2_pvalue``: the probability of a chi2 at least as large as the fit's if the
  model were right and the errors Gaussian (chi2 distribution with ``ndof = n_good -
  n_free`` degrees of freedom). Uniform on [0, 1] for spectra the model describes;
  near 0 for any misfit, and, at high S/N, for any emulator error.
* ``max_dip``: the largest ``|sum of (flux - model) / error|`` over ``DIP_WIDTH``
  (5) consecutive weighted pixels, over the square root of their number: a narrow
  unmodelled line in units of sigma. Each window is N(0, 1) for a good fit; QA bit 9 is set when it
  reaches :func:`dip_limit` (Bonferroni over the spectrum's windows at
  ``DIP_FALSE_ALARM``: 5.4 sigma for 6,000 pixels).

Measured on 300 mocks of the real APOGEE network at S/N 100 (rv fixed):
``chi2_pvalue`` below 0.05 for 3.3 % and below 0.5 for 47 %, ``max_dip`` median 3.8,
at most 5.7, one spectrum with bit 9; with three unmodelled Gaussian lines each
(depth 15 %, sigma 2 pixels) all are flagged (``max_dip`` median 27). The longest
run of one-signed residuals, tried as well, moved from a median of 12 to 13 pixels
there (the lines are too narrow), said nothing of the residuals' size (a noise-free
fit's rounding-level residuals run for hundreds of pixels) and cost ~10 ms of host
time a batch of 128: not kept.

Both come from the fit's own model, evaluated once more per spectrum on the device
with the window sums (:func:`dip_batch`: the model's flux row only, about 3 % of a
default fit).

Across a catalog, :func:`pixel_residuals` gathers each pixel's residuals over many
fits; :meth:`PixelResiduals.propose_mask` marks the pixels whose residuals are
consistently off (biased, or scattered beyond the errors), as a mask ``fit`` takes:
the data-driven counterpart of hand-made masks such as APOGEE's.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._serial import serial_jit
from ..observe import embed_obs, observe, weighted_residuals
from ._lm import over, sequential_lanes
from ._window import DIP_WIDTH, window_dip

#: QA bit 9: the chance of a dip (:func:`max_dip`) this large from noise alone, per
#: spectrum.
DIP_FALSE_ALARM = 1e-3


def chi2_pvalue(chi2, ndof) -> np.ndarray:
    """P(chi2' >= chi2) for chi2' ~ chi2(ndof), per row; NaN where ndof < 1 or chi2
    is not finite."""
    from scipy.stats import chi2 as dist

    chi2 = np.asarray(chi2, np.float64)
    ndof = np.asarray(ndof, np.float64)
    ok = np.isfinite(chi2) & (ndof >= 1)
    with np.errstate(invalid="ignore"):
        p = dist.sf(np.where(ok, chi2, 0.0), np.where(ok, ndof, 1.0))
    return np.where(ok, p, np.nan)


def max_dip(flux, weight, model, width: int = DIP_WIDTH) -> np.ndarray:
    """(n,) largest ``|sum z| / sqrt(m)`` over windows of ``width`` consecutive
    pixels, ``z = (flux - model) sqrt(weight)`` and ``m`` the weighted pixels in the
    window (windows with fewer than ``width // 2 + 1`` are skipped); 0 for rows
    without any."""
    w = np.asarray(weight, np.float64)
    good = w > 0
    z = np.where(good, (np.asarray(flux) - np.asarray(model)) * np.sqrt(w), 0.0)
    z = np.nan_to_num(z)
    n, p = z.shape
    if p < width:
        return np.zeros(n)
    zero = np.zeros((n, 1))
    cz = np.concatenate([zero, np.cumsum(z, axis=1)], axis=1)
    cg = np.concatenate([zero, np.cumsum(good, axis=1)], axis=1)
    s = cz[:, width:] - cz[:, :-width]
    m = cg[:, width:] - cg[:, :-width]
    stat = np.where(m >= width // 2 + 1, np.abs(s) / np.sqrt(np.maximum(m, 1)), 0.0)
    return stat.max(axis=1)


def dip_limit(n_good) -> np.ndarray:
    """``max_dip`` (n,) at which a spectrum of ``n_good`` weighted pixels gets QA
    bit 9: the two-sided normal quantile at ``DIP_FALSE_ALARM / n_good``."""
    from scipy.stats import norm

    n_good = np.maximum(np.asarray(n_good, np.float64), 1.0)
    return norm.isf(0.5 * DIP_FALSE_ALARM / n_good)


class PixelResiduals(NamedTuple):
    """Per-pixel statistics of the normalised residuals ``z = (flux - model) / error``
    of many fits (:func:`pixel_residuals`), each (P,).

    Attributes:
        n: spectra with a usable residual at the pixel.
        mean: mean of z (0 for a model that describes the pixel).
        rms: root mean square of z (1 for a model and errors that describe it).
    """

    n: np.ndarray
    mean: np.ndarray
    rms: np.ndarray

    def propose_mask(self, false_alarm: float = DIP_FALSE_ALARM) -> np.ndarray:
        """(P,) bool, True for pixels whose residuals no model here describes: the
        mean of z beyond what noise allows (``abs(mean) sqrt(n)`` above the two-sided
        normal quantile at ``false_alarm / P``: a line missing from the training
        grid, a telluric band), or the sum of z^2 beyond the chi2(n) quantile at
        ``false_alarm / P`` (excess scatter: a variable sky line, a bad column).
        Noise alone marks a pixel of a good fit with a chance of about
        ``2 false_alarm / P``. Pixels seen in fewer than 10 spectra are left alone.
        Pass it on as ``fit(mask=old_mask | proposed)``."""
        from scipy.stats import chi2, norm

        n = self.n.astype(np.float64)
        p = max(int(self.n.size), 1)
        ok = n >= 10
        z_lim = norm.isf(0.5 * false_alarm / p)
        biased = np.abs(self.mean) * np.sqrt(np.maximum(n, 1.0)) > z_lim
        chi_lim = chi2.isf(false_alarm / p, np.maximum(n, 1.0))
        scatter = self.rms**2 * n > chi_lim
        return ok & (biased | scatter)

    @classmethod
    def merge(cls, parts) -> PixelResiduals:
        """The statistics of several sets of fits (chunks of a catalog) as one:
        counts added, means and mean squares weighted by them."""
        parts = list(parts)
        if not parts:
            raise ValueError("PixelResiduals.merge needs at least one part")
        n = sum(np.asarray(x.n, np.int64) for x in parts)
        s1 = sum(x.n * np.asarray(x.mean, np.float64) for x in parts)
        s2 = sum(x.n * np.asarray(x.rms, np.float64) ** 2 for x in parts)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, s1 / np.maximum(n, 1), 0.0)
            rms = np.where(n > 0, np.sqrt(s2 / np.maximum(n, 1)), 0.0)
        return cls(n=n, mean=mean, rms=rms)

    def save(self, path) -> None:
        """The proposed mask (:meth:`propose_mask`) as a (P,) bool ``.npy`` file,
        the form ``payne-lite fit --mask`` reads."""
        np.save(path, self.propose_mask(), allow_pickle=False)


def fitted_arrays(who: str, flux, flux_err, table):
    """``(flux, err, model)`` (n, P) float64 of point fits made with
    ``return_model=True``, checked to have one shape; ``who`` names the caller in
    the errors."""
    if "model_flux" not in table.colnames:
        raise ValueError(f"{who} needs the fits' models: fit(..., return_model=True)")
    flux = np.atleast_2d(np.asarray(flux, np.float64))
    err = np.atleast_2d(np.asarray(flux_err, np.float64))
    model = np.asarray(table["model_flux"], np.float64)
    if model.shape != flux.shape or err.shape != flux.shape:
        raise ValueError(
            f"flux {flux.shape}, flux_err {err.shape} and the table's model_flux "
            f"{model.shape} must have one shape (point fits, rows in order)"
        )
    return flux, err, model


def pixel_residuals(flux, flux_err, table, mask=None) -> PixelResiduals:
    """Per-pixel residual statistics of point fits across a catalog.

    Args:
        flux, flux_err: (n, P) the spectra as fitted.
        table: their results table from ``fit(..., return_model=True)`` (rows in
            the same order): its ``model_flux``.
        mask: optional (P,) or (n, P) bool, True = leave the pixel out (as in
            ``fit``).

    Pixels with a non-finite flux, model or error, a non-positive error, or failed
    fits (QA bit 2) do not count.
    """
    flux, err, model = fitted_arrays("pixel_residuals", flux, flux_err, table)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (flux - model) / err
    use = np.isfinite(z) & (err > 0)
    use &= (np.asarray(table["flags"]) & 4 == 0)[:, None]
    if mask is not None:
        use &= ~np.broadcast_to(np.asarray(mask, bool), flux.shape)
    z = np.where(use, z, 0.0)
    n = use.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, z.sum(axis=0) / n, 0.0)
        rms = np.where(n > 0, np.sqrt((z * z).sum(axis=0) / n), 0.0)
    return PixelResiduals(n=n.astype(np.int64), mean=mean, rms=rms)


@jax.jit
def dip_batch(obs, p, flux, w):
    """:func:`max_dip` (n,) of ``flux`` (n, P) with weights ``w`` (n, P) at the
    parameters ``p`` (n, k), on the device (about 60 us a star on the APOGEE grid,
    the model included). One-hidden-layer
    nets on a log grid (``obs.jet``) take the fast path's model
    (:func:`payne_lite.observe.weighted_residuals`, in its embedded layout: chip
    gaps are zero-weight pixels, so no window spans two chips), others
    :func:`payne_lite.observe.observe`."""
    sw = jnp.sqrt(jnp.where(w > 0, w, 0.0))
    if obs.jet is not None:
        flux, sw = embed_obs(obs, jnp.where(sw > 0, flux, 0.0)), embed_obs(obs, sw)

    def one(args):
        q, f, swi = args
        return jax.lax.cond(
            jnp.any(swi > 0), dip, lambda *_: jnp.zeros((), swi.dtype), q, f, swi
        )  # batch padding (no weight) is not computed

    def dip(q, f, swi):
        if obs.jet is not None:
            z = weighted_residuals(obs, q, f, swi)
        else:
            z = (observe(obs, q)[0] - f) * swi
        return window_dip(z, swi > 0)

    return over(one, (p, flux, sw))


dip_batch = serial_jit(dip_batch, key=sequential_lanes)
