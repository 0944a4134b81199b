"""A second set of lines in a fit's residuals: double-lined binaries.

A single-star fit of a double-lined binary (SB2) leaves the companion's lines in
the residuals, at the companion's velocity relative to the fitted star, and dilutes
the fitted star's own lines. :func:`companion_search` looks for that pattern: for
each velocity offset ``dv`` (whole pixels of a log-uniform grid, ``DV_RANGE``
from the fitted rv) it fits the residuals ``flux - model`` by a copy of the fitted
model's own line depths ``1 - model`` shifted by ``dv``, per chip, by weighted least
squares with a constant (a continuum offset is not a line)::

    flux - model ~ c_chip - a(dv) (1 - model)(shifted by dv),

and reports the largest ``a``: the companion's line depth relative to the fitted
star's (for a twin, about its light ratio ``L2 / L1``), the ``dv`` where it is, and
``a`` over its standard error (noise alone: about N(0, 1) at each offset). The
template is the fitted star's own spectrum: a companion of another type still
correlates with it through the lines they share, at a smaller ``a``.

Measured on the real data that ship with payne_lite (The Payne's APOGEE network,
rv free, its mask): the three visits of the double-lined binary
2M06133561+2433362 (S/N 100) give ``a`` = 0.48 and 0.46 at -116 and +66 km/s and
0.065 at +46 km/s (a visit where the two stars' lines blend), at 22-157 sigma; the
single dwarf 2M13012770+5754582 (S/N 197) gives 0.037 at -29 km/s, where its
residuals follow the shape of its own lines (a line-shape misfit, antisymmetric
about 0, not a companion). Mocks of the same network at S/N 100 and 200: noise
alone at most 0.009 (median 2.1 sigma); a twin at a light ratio of 0.1, 0.3 and
0.5, 40-150 km/s away, 0.089, 0.23 and 0.34 (medians of 20), its dv within 0.8-1.4
km/s (median; ``benchmarks/bench_checks_real.py``). On 2,000 noise-only mocks at
S/N 100 (through :func:`payne_lite.check_catalog`): 99 % below 0.017, the largest
0.025 at 4.3 sigma, none reported. A companion is reported
(:meth:`Companion.flagged`, QA bit 10) where ``a`` reaches ``COMPANION_DEPTH`` at
``COMPANION_NSIGMA`` or more.

Host-side NumPy (FFT correlations per chip, about 0.3 ms a spectrum on the APOGEE
grid), after the fit: it needs the fit's model (``fit(..., return_model=True)``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..constants import C_KMS
from ..observe import rest_segments
from ._ppc import fitted_arrays

FLAG_COMPANION = 1024  # QA bit 10 (._schema.FLAG_BITS)

#: abs(dv) searched [km/s]: from beyond the fitted star's own lines (an APOGEE line
#: is about 3 pixels, 12 km/s, wide) to the widest SB2 separations.
DV_RANGE = (20.0, 250.0)
#: Flag a companion whose lines are at least this deep relative to the fitted
#: star's (:meth:`Companion.flagged`) ...
COMPANION_DEPTH = 0.05
#: ... and this many standard errors from zero.
COMPANION_NSIGMA = 5.0


class Companion(NamedTuple):
    """The strongest second set of lines in each fit's residuals
    (:func:`companion_search`), each (n,) (joint fits of visits: (n_star, V), a
    visit each); NaN for rows without a usable fit.

    Attributes:
        depth: its line depth relative to the fitted star's (``a``; positive =
            absorption lines; about the light ratio of a twin).
        dv: its velocity relative to the fitted rv [km/s].
        nsigma: ``depth`` over its standard error.
    """

    depth: np.ndarray
    dv: np.ndarray
    nsigma: np.ndarray

    def flagged(
        self, depth: float = COMPANION_DEPTH, nsigma: float = COMPANION_NSIGMA
    ) -> np.ndarray:
        """(n,) bool: a companion at least ``depth`` deep and ``nsigma`` significant."""
        with np.errstate(invalid="ignore"):
            return (self.depth >= depth) & (self.nsigma >= nsigma)

    def add_to(self, table, **limits) -> None:
        """Write ``companion_depth``, ``companion_dv`` [km/s] and
        ``companion_nsigma`` into ``table`` (the fits searched, rows in order) and
        set QA bit 10 (1024) in its ``flags`` where :meth:`flagged` (``limits``:
        its ``depth`` and ``nsigma``; a joint fit where any visit is); the bit is
        cleared elsewhere, so a second search replaces the first. The limits
        used go to ``meta["companion_search"]``."""
        if len(table) != self.depth.shape[0]:
            raise ValueError(
                f"table has {len(table)} rows, the search {self.depth.shape[0]}"
            )
        table["companion_depth"] = self.depth
        table["companion_dv"] = self.dv
        table["companion_dv"].unit = "km / s"
        table["companion_nsigma"] = self.nsigma
        hit = self.flagged(**limits)
        if hit.ndim == 2:  # joint fits: a star with a companion in any visit
            hit = hit.any(axis=1)
        old = np.asarray(table["flags"])
        flags = old & ~FLAG_COMPANION
        table["flags"] = np.where(hit, flags | FLAG_COMPANION, flags).astype(old.dtype)
        table.meta["companion_search"] = {
            "depth": float(limits.get("depth", COMPANION_DEPTH)),
            "nsigma": float(limits.get("nsigma", COMPANION_NSIGMA)),
        }


def chip_segments(wavelength) -> tuple[list[tuple[int, int]], float]:
    """The chips of a log-uniform wavelength grid (P,) as pixel ranges ``[(lo, hi),
    ...]`` (split where whole pixels are missing, as the observation model splits
    them: :func:`payne_lite.observe.rest_segments`) and the velocity of one pixel
    [km/s].

    Raises:
        ValueError: not one increasing grid, or not log-uniform.
    """
    lw = np.log(np.asarray(wavelength, np.float64))
    if lw.ndim != 1 or lw.size < 3 or not np.all(np.diff(lw) > 0):
        raise ValueError("wavelength must be one increasing (P,) grid")
    try:
        step, runs = rest_segments(np.exp(lw))
    except ValueError as err:
        raise ValueError(
            "companion_search needs a log-uniform wavelength grid (chips may have "
            f"gaps of whole pixels): {err}"
        ) from err
    return [(a, a + n) for a, n in runs], C_KMS * step


def _correlations(pairs, lags, n_fft):
    """``[sum_i a[:, i] b[:, i - k] for k in lags]`` (n, L) of each pair ``(a, b)``
    of ``pairs`` (zero outside the arrays), by FFTs of length ``n_fft``; an array
    that appears in several pairs is transformed once."""
    ffts = {}

    def f(x):
        if id(x) not in ffts:
            ffts[id(x)] = np.fft.rfft(x, n_fft, axis=1)
        return ffts[id(x)]

    at = np.mod(lags, n_fft)
    return [np.fft.irfft(f(a) * np.conj(f(b)), n_fft, axis=1)[:, at] for a, b in pairs]


def companion_search(
    flux, flux_err, table, wavelength, mask=None, *, dv_range=DV_RANGE
) -> Companion:
    """The strongest second set of lines in each fit's residuals (module docstring).

    Args:
        flux, flux_err: (n, P) the spectra as fitted.
        table: their fits with the model (``fit(..., return_model=True)``): point
            fits (rows in order), or joint fits of visits (``group=``: each
            visit of ``visit_rows`` is searched against its model).
        wavelength: (P,) the observed grid [A], log-uniform within chips.
        mask: optional (P,) or (n, P) bool, True = leave the pixel out (as in
            ``fit``).
        dv_range: (min, max) of abs(dv) searched [km/s].

    Returns:
        :class:`Companion`, (n,) arrays, or for joint fits (n_star, V) (a visit
        each). Rows whose fit failed (QA bit 2), padding visits and spectra with
        fewer than 100 usable pixels are NaN.
    """
    if "visit_rows" in table.colnames:  # joint fits: their visits one by one
        if "model_flux" not in table.colnames:
            raise ValueError(
                "companion_search needs the fits' models: fit(..., return_model=True)"
            )
        vis = np.asarray(table["visit_rows"])
        model = np.asarray(table["model_flux"], np.float64)
        flux = np.atleast_2d(np.asarray(flux, np.float64))
        err = np.atleast_2d(np.asarray(flux_err, np.float64))
        ok = vis >= 0
        if err.shape != flux.shape or np.any(vis >= flux.shape[0]):
            raise ValueError(
                f"flux {flux.shape} and flux_err {err.shape} must be the fitted "
                "spectra, one row per visit (visit_rows)"
            )
        if model.shape != (*vis.shape, flux.shape[1]):
            raise ValueError(
                f"the table's model_flux {model.shape} is not (stars, visits, "
                f"{flux.shape[1]})"
            )
        rows = vis[ok]
        failed = np.broadcast_to(
            (np.asarray(table["flags"]) & 4 != 0)[:, None], vis.shape
        )[ok]
        masks = None if mask is None else np.broadcast_to(mask, flux.shape)[rows]
        found = _search(
            flux[rows], err[rows], model[ok], failed, wavelength, masks, dv_range
        )
        out = []
        for x in found:
            full = np.full(vis.shape, np.nan)
            full[ok] = x
            out.append(full)
        return Companion(*out)
    flux, err, model = fitted_arrays("companion_search", flux, flux_err, table)
    failed = (
        np.asarray(table["flags"]) & 4 != 0
        if "flags" in table.colnames
        else np.zeros(flux.shape[0], bool)
    )
    return Companion(*_search(flux, err, model, failed, wavelength, mask, dv_range))


def _search(flux, err, model, failed, wavelength, mask, dv_range):
    """``(depth, dv, nsigma)`` (n,) of the spectra ``flux``, ``err``, ``model`` (n,
    P); ``failed`` (n,) rows left NaN."""
    if np.shape(wavelength) != (flux.shape[1],):
        raise ValueError(
            f"wavelength {np.shape(wavelength)} must be ({flux.shape[1]},), the "
            "spectra's grid"
        )
    lo_v, hi_v = (float(v) for v in dv_range)
    if not 0.0 <= lo_v < hi_v:
        raise ValueError(f"dv_range must be (min, max) with 0 <= min < max: {dv_range}")
    segments, v_pix = chip_segments(wavelength)
    k_max = int(np.floor(hi_v / v_pix))
    lags = np.arange(-k_max, k_max + 1)
    lags = lags[np.abs(lags) * v_pix >= lo_v]
    if lags.size == 0:
        raise ValueError(f"dv_range {dv_range} holds no whole pixel ({v_pix:.2f} km/s)")

    with np.errstate(invalid="ignore", divide="ignore"):
        good = np.isfinite(flux) & np.isfinite(err) & (err > 0) & np.isfinite(model)
        if mask is not None:
            good &= ~np.broadcast_to(np.asarray(mask, bool), flux.shape)
        w = np.where(good, 1.0 / np.where(good, err, 1.0) ** 2, 0.0)
        r = np.where(good, flux - model, 0.0)
    depth_t = np.where(np.isfinite(model), 1.0 - model, 0.0)  # the template's lines
    # per offset, weighted least squares of r on the template and one constant per
    # chip, over the pixels both cover: the constant partialled out chip by chip
    # from the sums of w r y, w r, w y, w y^2 and w (FFT correlations)
    num = np.zeros((flux.shape[0], lags.size))
    den = np.zeros_like(num)
    for a, b in segments:
        ws, rs, ys = w[:, a:b], r[:, a:b], depth_t[:, a:b]
        n_fft = int(2 ** np.ceil(np.log2(b - a + k_max + 1)))
        one, wrs, ys2 = np.ones((1, b - a)), ws * rs, ys * ys
        wry, wr, wy, wy2, wsum = _correlations(
            [(wrs, ys), (wrs, one), (ws, ys), (ws, ys2), (ws, one)], lags, n_fft
        )
        inv_w = 1.0 / np.where(wsum > 0, wsum, np.inf)
        num += wry - wr * wy * inv_w
        den += wy2 - wy**2 * inv_w
    with np.errstate(invalid="ignore", divide="ignore"):
        amp = np.where(den > 0, -num / den, np.nan)  # positive: absorption lines
        se = np.where(den > 0, 1.0 / np.sqrt(den), np.nan)
    usable = (good.sum(axis=1) >= 100) & ~np.asarray(failed, bool)
    j = np.argmax(np.where(np.isfinite(amp), amp, -np.inf), axis=1)
    rows = np.arange(flux.shape[0])
    depth = np.where(usable, amp[rows, j], np.nan)
    return (
        depth,
        np.where(usable, lags[j] * v_pix, np.nan),
        np.where(usable, depth / se[rows, j], np.nan),
    )
