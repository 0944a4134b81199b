"""Fit figures: fit minus truth (:func:`fit_vs_truth`), a spectrum with its model and
residuals (:func:`spectrum_with_model`), and the calibration of Gaussian errors
(:func:`coverage`, :func:`coverage_plot`)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from ._style import (
    as_2d,
    gap_breaks,
    grid_gaps,
    max_n_locator,
    plain_formatter,
    pyplot,
    save_figure,
    unit_label,
    unit_suffix,
)

#: Default width [Angstrom] and number of the automatically picked zoom windows.
WINDOW_WIDTH = 30.0
N_WINDOWS = 3

_DATA, _MODEL, _RESID, _MASKED, _WINDOW = "k", "C3", "C0", "0.85", "C1"


# ======================================================================================
# fit minus truth
# ======================================================================================
def fit_vs_truth(
    truth: np.ndarray,
    fit: np.ndarray,
    err: np.ndarray,
    names,
    units,
    stem: Path,
    *,
    color=None,
    color_label: str = "",
    flagged=None,
    title: str = "",
) -> list[Path]:
    """Fit minus truth against truth, one panel per label (the one-to-one check).

    Each panel's title gives the bias (median of fit - truth) and the scatter (half
    the 16-84th percentile range of fit - truth) in the label's unit.

    Args:
        truth, fit, err: (n, L) true values, fitted values and their 1-sigma errors.
        names, units: L label names and units (axis labels).
        color: optional (n,) values to colour the points by (for example S/N).
        flagged: optional (n,) bool, True = fit flagged (drawn as open red circles).
        title: figure title.

    Raises:
        ValueError: shapes that do not fit together.
    """
    plt = pyplot()
    truth, fit, err = (
        as_2d(a, n) for a, n in [(truth, "truth"), (fit, "fit"), (err, "err")]
    )
    n, n_lab = truth.shape
    if fit.shape != truth.shape or err.shape != truth.shape:
        raise ValueError(
            f"truth {truth.shape}, fit {fit.shape} and err {err.shape} "
            "must have one shape (n, L)"
        )
    if len(names) != n_lab or len(units) != n_lab:
        raise ValueError(
            f"{len(names)} names and {len(units)} units for {n_lab} labels"
        )
    flag = np.zeros(n, bool) if flagged is None else np.asarray(flagged, bool)
    if flag.shape != (n,):
        raise ValueError(f"flagged {flag.shape} must be ({n},)")
    col = None if color is None else np.asarray(color, float)
    if col is not None and col.shape != (n,):
        raise ValueError(f"color {col.shape} must be ({n},)")
    err = np.where(np.isfinite(err) & (err >= 0), err, np.nan)
    ncol = min(n_lab, 3)
    nrow = -(-n_lab // ncol)
    fig, axes = plt.subplots(
        nrow,
        ncol,
        figsize=(4.3 * ncol + 0.8, 3.3 * nrow + 0.5),
        layout="constrained",
        squeeze=False,
    )
    sc = None
    any_flag = False
    for j in range(n_lab):
        ax = axes.flat[j]
        d = fit[:, j] - truth[:, j]
        ok = np.isfinite(d)
        u = units[j]
        if ok.any():
            ax.errorbar(
                truth[ok, j],
                d[ok],
                yerr=err[ok, j],
                fmt="none",
                ecolor="0.75",
                lw=0.6,
                zorder=1,
            )
            sc = ax.scatter(
                truth[ok, j],
                d[ok],
                c=None if col is None else col[ok],
                s=9,
                cmap="viridis",
                zorder=2,
            )
            bad = ok & flag
            if bad.any():
                any_flag = True
                ax.scatter(
                    truth[bad, j],
                    d[bad],
                    s=40,
                    facecolors="none",
                    edgecolors="C3",
                    lw=0.9,
                    zorder=3,
                )
            lo, hi = np.percentile(d[ok], [16, 84])
            ax.set_title(
                f"{names[j]}: bias {np.median(d[ok]):+.3g}{unit_suffix(u)}, "
                f"scatter {(hi - lo) / 2:.3g}{unit_suffix(u)}",
                fontsize=9,
            )
        else:
            ax.text(
                0.5,
                0.5,
                "no finite fits",
                transform=ax.transAxes,
                ha="center",
                va="center",
            )
            ax.set_title(names[j], fontsize=9)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xlabel(f"true {names[j]}{unit_label(u)}")
        ax.set_ylabel(f"fit − true{unit_label(u)}")
    for ax in list(axes.flat)[n_lab:]:
        ax.set_visible(False)
    if col is not None and sc is not None:
        fig.colorbar(sc, ax=axes, label=color_label, shrink=0.8)
    if any_flag:
        axes.flat[0].scatter(
            [],
            [],
            s=40,
            facecolors="none",
            edgecolors="C3",
            label=f"flagged fit ({int(flag.sum())})",
        )
        axes.flat[0].legend(fontsize=8, loc="best")
    fig.suptitle(
        (title + "\n" if title else "") + f"{n} spectra; bias = median, "
        "scatter = half the 16-84th percentile range of fit − true",
        fontsize=9,
    )
    return save_figure(fig, stem)


# ======================================================================================
# spectrum, model and residuals
# ======================================================================================
def spectrum_with_model(
    wave,
    flux,
    model,
    stem: Path,
    *,
    err=None,
    mask=None,
    title: str = "",
    data_label: str = "data",
    model_label: str = "model",
    windows="auto",
    n_windows: int = N_WINDOWS,
    window_width: float = WINDOW_WIDTH,
    residual: str | None = None,
) -> list[Path]:
    """A spectrum, a model of it and the residuals: the full range and zoomed windows.

    The top row shows the whole spectrum with the zoom windows shaded and lettered;
    below, one column per window. Masked pixels get a grey band, their flux is drawn
    as grey dots and they have no residual. Lines are not drawn across gaps in the
    wavelength grid (APOGEE's chips).

    Args:
        wave: (P,) wavelength [Angstrom], increasing; flux, model: (P,) normalised flux.
        stem: output path without suffix.
        err: optional (P,) 1-sigma flux errors; with them, residuals are in sigma.
        mask: optional (P,) bool, True = pixel not used. Pixels with non-finite flux,
            model or err, or err <= 0, count as masked too.
        title: figure title.
        data_label, model_label: legend names of the two spectra.
        windows: ``"auto"``: ``n_windows`` windows of ``window_width`` Angstrom, the
            first where the lines are strongest (largest summed 1 - model), the others
            where the residuals are largest (summed squares); or a sequence of
            ``(lo, hi)`` [Angstrom] (those outside ``wave`` are dropped); or None / ()
            for the full range only.
        residual: ``"sigma"`` ((data - model) / err; needs ``err``) or ``"flux"``
            (data - model); default ``"sigma"`` when ``err`` is given.

    Raises:
        ValueError: shapes that do not fit, a wavelength grid that is not increasing,
            an unknown ``windows`` or ``residual`` option.
    """
    plt = pyplot()
    wave, flux, model = (np.asarray(a, dtype=float) for a in (wave, flux, model))
    bad, resid, residual = _spectrum_residuals(wave, flux, model, err, mask, residual)
    wins = _choose_windows(wave, model, resid, bad, windows, n_windows, window_width)

    nw = len(wins)
    width = max(11.0, 4.3 * nw)
    fig = plt.figure(figsize=(width, 7.4 if nw else 3.9), layout="constrained")
    if nw:
        top, bottom = fig.subfigures(2, 1, height_ratios=[1.0, 1.08])
    else:
        top, bottom = fig, None
    diff = f"{data_label} − {model_label}"
    rlabel = f"({diff}) / σ" if residual == "sigma" else diff
    runit = "resid. [σ]" if residual == "sigma" else "resid. [flux]"
    data = (wave, flux, model, resid, bad)
    sigma = residual == "sigma"
    _full_range_panels(
        top, data, wins, sigma, runit, data_label, model_label, f"residual: {rlabel}"
    )
    if nw:
        _window_panels(bottom, data, wins, sigma, runit)
    if title:
        fig.suptitle(textwrap.fill(title, int(width * 15)), fontsize=9)
    return save_figure(fig, stem)


def _spectrum_residuals(wave, flux, model, err, mask, residual):
    """Check the inputs of :func:`spectrum_with_model` and make its residuals.

    Args:
        wave, flux, model: (P,) float arrays; err: (P,) or None; mask: (P,) or None.
        residual: ``"sigma"``, ``"flux"`` or None (``"sigma"`` when err is given).

    Returns:
        ``(bad, resid, residual)``: (P,) bool, True = pixel masked or unusable; (P,)
        residuals (NaN where bad) [sigma or normalised flux]; the residual kind.

    Raises:
        ValueError: as :func:`spectrum_with_model`.
    """
    n_pix = wave.size
    if wave.ndim != 1 or flux.shape != wave.shape or model.shape != wave.shape:
        raise ValueError(
            f"wave {wave.shape}, flux {flux.shape} and model "
            f"{model.shape} must all be (P,)"
        )
    if n_pix < 2 or not np.all(np.diff(wave) > 0):
        raise ValueError("wave must hold at least 2 strictly increasing wavelengths")
    bad = ~np.isfinite(flux) | ~np.isfinite(model)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != wave.shape:
            raise ValueError(f"mask {mask.shape} must be ({n_pix},)")
        bad |= mask
    if err is not None:
        err = np.asarray(err, dtype=float)
        if err.shape != wave.shape:
            raise ValueError(f"err {err.shape} must be ({n_pix},)")
        with np.errstate(invalid="ignore"):
            bad |= ~(np.isfinite(err) & (err > 0))
    if residual is None:
        residual = "sigma" if err is not None else "flux"
    if residual not in ("sigma", "flux"):
        raise ValueError(f"residual must be 'sigma' or 'flux', got {residual!r}")
    if residual == "sigma" and err is None:
        raise ValueError("residual='sigma' needs err")
    with np.errstate(invalid="ignore", divide="ignore"):
        resid = flux - model
        if residual == "sigma":
            resid = resid / err
    return bad, np.where(bad, np.nan, resid), residual


def _full_range_panels(
    top, data, wins, sigma, runit, data_label, model_label, resid_label
) -> None:
    """The whole spectrum and its residuals in ``top`` (a figure or subfigure), the
    zoom windows ``wins`` shaded and lettered, and the legend above.

    Args:
        data: ``(wave, flux, model, resid, bad)``, each (P,).
        wins: [(lo, hi, reason), ...] zoom windows [Angstrom].
        sigma: residuals in sigma (else in flux); runit: their axis label.
    """
    wave, flux, model, resid, bad = data
    a_full, r_full = top.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    _spectrum_panel(
        a_full,
        r_full,
        wave,
        flux,
        model,
        resid,
        bad,
        wave[0],
        wave[-1],
        zoom=False,
        sigma=sigma,
    )
    nw = len(wins)
    if nw:  # headroom for the window letters
        ylo, yhi = a_full.get_ylim()
        a_full.set_ylim(ylo, yhi + 0.12 * (yhi - ylo))
    for k, (lo, hi, _) in enumerate(wins):
        for ax in (a_full, r_full):
            ax.axvspan(lo, hi, color=_WINDOW, alpha=0.25, lw=0, zorder=0)
        a_full.text(
            (lo + hi) / 2,
            0.97,
            "abcdefghij"[k % 10],
            color="C1",
            transform=a_full.get_xaxis_transform(),
            ha="center",
            va="top",
            fontsize=9,
            fontweight="bold",
        )
    a_full.set_ylabel("normalised flux")
    r_full.set_ylabel(runit)
    r_full.set_xlabel("wavelength [Å]")
    a_full.set_xlim(wave[0], wave[-1])
    r_full.xaxis.set_major_formatter(plain_formatter())
    handles = [
        a_full.plot([], [], color=_DATA, lw=1, label=data_label)[0],
        a_full.plot([], [], color=_MODEL, lw=1, label=model_label)[0],
        a_full.plot([], [], color=_RESID, lw=1, label=resid_label)[0],
    ]
    if bad.any():
        handles.append(
            a_full.fill_between(
                [], [], color=_MASKED, label=f"masked ({int(bad.sum())} pixels)"
            )
        )
    if nw:
        handles.append(
            a_full.fill_between([], [], color=_WINDOW, alpha=0.25, label="zoom window")
        )
    a_full.legend(
        handles=handles,
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        ncols=len(handles),
        frameon=False,
        fontsize=8,
        borderaxespad=0.2,
    )
    a_full.set_title("full range", loc="left", fontsize=9)


def _window_panels(bottom, data, wins, sigma, runit) -> None:
    """One column per zoom window in ``bottom`` (a subfigure): spectrum, model and
    residuals on ``(lo, hi)`` [Angstrom], titled with its letter and reason.

    Args:
        data: ``(wave, flux, model, resid, bad)``, each (P,).
        wins: [(lo, hi, reason), ...], at least one.
        sigma: residuals in sigma (else in flux); runit: their axis label.
    """
    wave, flux, model, resid, bad = data
    nw = len(wins)
    axes = bottom.subplots(2, nw, sharex="col", height_ratios=[3, 1], squeeze=False)
    for k, (lo, hi, why) in enumerate(wins):
        a, r = axes[0, k], axes[1, k]
        _spectrum_panel(
            a,
            r,
            wave,
            flux,
            model,
            resid,
            bad,
            lo,
            hi,
            zoom=True,
            sigma=sigma,
        )
        a.set_xlim(lo, hi)
        a.set_title(
            f"({'abcdefghij'[k % 10]}) {lo:.1f}–{hi:.1f} Å"
            + (f": {why}" if why else ""),
            fontsize=9,
        )
        r.set_xlabel("wavelength [Å]")
        for ax in (a, r):
            ax.xaxis.set_major_locator(max_n_locator(4))
            ax.xaxis.set_major_formatter(plain_formatter())
    axes[0, 0].set_ylabel("normalised flux")
    axes[1, 0].set_ylabel(runit)


def _runs(flag: np.ndarray, gaps: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) index ranges of the True runs of ``flag``, split at ``gaps``."""
    out = []
    edges = np.concatenate([[0], np.flatnonzero(gaps) + 1, [flag.size]])
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        d = np.diff(np.concatenate([[0], flag[a:b].astype(np.int8), [0]]))
        out += [
            (a + i, a + j)
            for i, j in zip(
                np.flatnonzero(d == 1), np.flatnonzero(d == -1), strict=True
            )
        ]
    return out


def _spectrum_panel(top, bot, wave, flux, model, resid, bad, lo, hi, *, zoom, sigma):
    m = (wave >= lo) & (wave <= hi)
    w, f, mo, r, b = wave[m], flux[m], model[m], resid[m], bad[m]
    if w.size == 0:
        return
    good_f = np.where(b, np.nan, f)
    style = dict(drawstyle="steps-mid") if zoom else {}
    lw = 0.8 if zoom else 0.3
    # grey bands over masked pixels, each from half a pixel before to half after
    # (the smaller neighbouring step: no band reaches into a gap of the grid)
    gaps = grid_gaps(w)
    if w.size > 1:
        d = np.diff(w)
        half = np.minimum(np.r_[d[0], d], np.r_[d, d[-1]]) / 2
    else:
        half = np.array([0.5])
    spans = [
        (w[i] - half[i], w[j - 1] + half[j - 1] - (w[i] - half[i]))
        for i, j in _runs(b, gaps)
    ]
    for ax in (top, bot):
        if spans:
            ax.broken_barh(
                spans,
                (0, 1),
                transform=ax.get_xaxis_transform(),
                color=_MASKED,
                lw=0,
                zorder=0,
            )
    if b.any():
        top.plot(w[b], f[b], ".", color="0.55", ms=2 if zoom else 1, zorder=1)
    ww, gf, gm, gr = gap_breaks(w, good_f, mo, r)
    raster = not zoom  # thousands of pixels: keep the PDF small and quick
    top.plot(ww, gf, color=_DATA, lw=lw, zorder=2, rasterized=raster, **style)
    top.plot(ww, gm, color=_MODEL, lw=lw, alpha=0.85, zorder=3, rasterized=raster)
    good_m = mo[~b & np.isfinite(mo)]
    good_d = good_f[np.isfinite(good_f)]
    if good_d.size and not zoom:  # single spikes (cosmics, sky) do not set the range
        good_d = good_d[
            (good_d >= np.percentile(good_d, 0.1))
            & (good_d <= np.percentile(good_d, 99.9))
        ]
    vals = np.concatenate([good_d, good_m])
    if vals.size:
        vlo, vhi = vals.min(), vals.max()
        pad = 0.05 * max(vhi - vlo, 1e-3)
        top.set_ylim(vlo - pad, vhi + pad)
    bot.plot(ww, gr, color=_RESID, lw=lw if zoom else 0.4, rasterized=raster, **style)
    bot.axhline(0.0, color="k", lw=0.6)
    if sigma:
        bot.axhspan(-1.0, 1.0, color=_RESID, alpha=0.12, lw=0)
    fin = np.abs(r[np.isfinite(r)])
    if fin.size:
        floor = 3.0 if sigma else 1e-3
        lim = max(floor, 1.1 * (fin.max() if zoom else np.percentile(fin, 99.9)))
        bot.set_ylim(-lim, lim)
        n_out = int(np.count_nonzero(fin > lim))
        if n_out:
            bot.text(
                0.005,
                0.04,
                f"{n_out} pixel{'s' if n_out > 1 else ''} beyond ±{lim:.3g}",
                transform=bot.transAxes,
                fontsize=7,
                color="0.2",
                va="bottom",
                bbox=dict(facecolor="white", alpha=0.8, lw=0, pad=1),
            )


def _choose_windows(wave, model, resid, bad, windows, n_windows, width):
    """[(lo, hi, reason), ...] of the zoom panels."""
    if windows is None:
        return []
    if isinstance(windows, str):
        if windows != "auto":
            raise ValueError(
                f"windows must be 'auto', None or (lo, hi) pairs, got {windows!r}"
            )
        if n_windows <= 0:
            return []
        if not width > 0:
            raise ValueError(f"window_width must be > 0, got {width!r}")
        depth = np.where(bad, 0.0, np.clip(1.0 - model, 0.0, None))
        depth = np.nan_to_num(depth, nan=0.0)
        chi = np.nan_to_num(np.where(bad, 0.0, resid) ** 2, nan=0.0)
        out = _pick_windows(wave, depth, width, 1, [], "strongest lines")
        out = _pick_windows(
            wave, chi, width, n_windows - len(out), out, "largest residuals"
        )
        return sorted(out)
    out = []
    for item in windows:
        lo, hi = (float(v) for v in item)
        if not lo < hi:
            raise ValueError(f"window ({lo}, {hi}): expected lo < hi")
        if hi > wave[0] and lo < wave[-1]:
            out.append((max(lo, wave[0]), min(hi, wave[-1]), ""))
    return out


def _pick_windows(wave, score, width, n, taken, reason):
    """Greedily add up to ``n`` windows of ``width`` with the largest summed
    ``score``, not overlapping the windows in ``taken``; returns taken + new ones."""
    out = list(taken)
    if n <= 0:
        return out
    half = width / 2
    if wave[-1] - wave[0] <= width:
        return out or [(wave[0], wave[-1], reason)]
    # windows inside one stretch of the grid between gaps (else anywhere)
    seg = np.concatenate([[0], np.cumsum(grid_gaps(wave))])
    seg_lo = wave[np.searchsorted(seg, seg, "left")]
    seg_hi = wave[np.searchsorted(seg, seg, "right") - 1]
    inside = (wave - half >= seg_lo) & (wave + half <= seg_hi)
    if not inside.any():
        inside = (wave >= wave[0] + half) & (wave <= wave[-1] - half)
    centres = wave[inside]
    csum = np.concatenate([[0.0], np.cumsum(score)])
    tot = (
        csum[np.searchsorted(wave, centres + half, "right")]
        - csum[np.searchsorted(wave, centres - half, "left")]
    )
    for lo, hi, _ in out:
        tot[np.abs(centres - (lo + hi) / 2) < width] = -np.inf
    for _ in range(n):
        if not np.isfinite(tot).any():
            break
        c = centres[int(np.argmax(tot))]
        out.append((c - half, c + half, reason))
        tot[np.abs(centres - c) < width] = -np.inf
    return out


# ======================================================================================
# calibration
# ======================================================================================
def coverage(truth, mean, sigma, z) -> np.ndarray:
    """Fraction of truths within ``z`` sigma of the estimate, per column.

    A column is well calibrated (Gaussian errors of the right size) when
    ``coverage(...)`` is close to ``erf(z / sqrt(2))``: 0.683 at z = 1, 0.954 at 2.

    Args:
        truth, mean, sigma: (n,) or (n, d) true values, estimates and their 1-sigma
            errors. Rows where any of the three is non-finite or sigma <= 0 are left
            out of that column.
        z: scalar or (m,) multiples of sigma.

    Returns:
        (m, d) fractions of rows with ``|mean - truth| <= z * sigma`` (NaN for a
        column without usable rows); (d,) for a scalar ``z``.

    Raises:
        ValueError: shapes that do not fit together, negative z.

    Examples:
        >>> coverage([0.0, 0.0, 0.0, 0.0], [0.5, -1.5, 2.5, 0.9], [1.0] * 4, [1, 2, 3])
        array([[0.5 ],
               [0.75],
               [1.  ]])
    """
    truth, mean, sigma = (
        as_2d(a, n) for a, n in [(truth, "truth"), (mean, "mean"), (sigma, "sigma")]
    )
    if mean.shape != truth.shape or sigma.shape != truth.shape:
        raise ValueError(
            f"truth {truth.shape}, mean {mean.shape} and sigma "
            f"{sigma.shape} must have one shape (n, d)"
        )
    z_arr = np.asarray(z, dtype=float)
    if z_arr.ndim > 1 or not np.all(np.isfinite(z_arr)) or np.any(z_arr < 0):
        raise ValueError(f"z must be a scalar or (m,) of values >= 0, got {z!r}")
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = np.isfinite(truth) & np.isfinite(mean) & np.isfinite(sigma) & (sigma > 0)
        dist = np.where(ok, np.abs(mean - truth) / np.where(ok, sigma, 1.0), np.inf)
    n = ok.sum(axis=0)
    inside = dist[None, :, :] <= np.atleast_1d(z_arr)[:, None, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(n > 0, inside.sum(axis=1) / n, np.nan)
    return frac[0] if z_arr.ndim == 0 else frac


def coverage_plot(
    truth,
    mean,
    sigma,
    names,
    stem: Path,
    *,
    title: str = "",
) -> list[Path]:
    """Calibration of Gaussian estimates: the fraction of truths within z sigma.

    Left: that fraction against the nominal coverage ``erf(z / sqrt 2)`` of a
    Gaussian, one line per column, and the diagonal (perfect calibration); above the
    diagonal the sigmas are too large, below too small. Right: the difference from
    the nominal against z, with the +-2 sigma binomial scatter expected from the
    number of rows.

    Args:
        truth, mean, sigma: (n, d) true values, estimates (MDN means or fitted
            values) and their 1-sigma errors.
        names: d column names (labels, then ``rv``).
        title: figure title (what is calibrated).

    Raises:
        ValueError: shapes that do not fit together, or no usable rows.
    """
    from scipy.special import erf

    plt = pyplot()
    truth = as_2d(truth, "truth")
    d = truth.shape[1]
    if len(names) != d:
        raise ValueError(f"{len(names)} names for {d} columns")
    z = np.linspace(0.0, 3.5, 141)
    cov = coverage(truth, mean, sigma, z)
    mean, sigma = as_2d(mean, "mean"), as_2d(sigma, "sigma")
    with np.errstate(invalid="ignore"):
        n = (
            np.isfinite(truth) & np.isfinite(mean) & np.isfinite(sigma) & (sigma > 0)
        ).sum(axis=0)
    if not np.any(n > 0):
        raise ValueError("no row has a finite truth, estimate and sigma > 0")
    nominal = erf(z / np.sqrt(2.0))
    fig, (a, b) = plt.subplots(
        1, 2, figsize=(11.0, 5.4), width_ratios=[1.0, 1.3], layout="constrained"
    )
    a.plot(
        [0, 1], [0, 1], color="k", lw=1, ls="--", label="Gaussian expectation erf(z/√2)"
    )
    marks = np.searchsorted(z, [1.0, 2.0, 3.0])
    for j in range(d):
        if n[j] == 0:
            continue
        c = f"C{j % 10}"
        lab = f"{names[j]}: {100 * cov[marks[0], j]:.0f} % within 1σ"
        if len(set(n[n > 0])) > 1:
            lab += f" (n = {n[j]})"
        a.plot(nominal, cov[:, j], color=c, lw=1.4, label=lab)
        a.plot(nominal[marks], cov[marks, j], "o", color=c, ms=4)
        b.plot(z, cov[:, j] - nominal, color=c, lw=1.4)
    a.set_xlim(0, 1)
    a.set_ylim(0, 1.02)
    a.set_aspect("equal")
    a.set_xlabel("nominal coverage erf(z/√2)")
    a.set_ylabel("fraction of truths within z σ")
    top = a.secondary_xaxis("top")
    top.set_xticks(nominal[marks[:2]], labels=["z = 1", "z = 2"])
    top.tick_params(labelsize=8)
    n_min = int(n[n > 0].min())
    band = 2.0 * np.sqrt(nominal * (1.0 - nominal) / n_min)
    b.fill_between(
        z, -band, band, color="0.85", lw=0, label=f"±2σ binomial scatter (n = {n_min})"
    )
    b.axhline(0.0, color="k", lw=1, ls="--")
    b.set_xlim(0, z[-1])
    b.set_xlabel("z [multiples of the quoted σ]")
    b.set_ylabel("fraction within z σ − erf(z/√2)")
    b.legend(fontsize=8, loc="lower right")
    b.grid(alpha=0.3)
    a.grid(alpha=0.3)
    fig.legend(
        *a.get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8
    )
    if len(set(n[n > 0])) == 1:
        title = (title + f" (n = {n_min})") if title else f"n = {n_min}"
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, stem)
