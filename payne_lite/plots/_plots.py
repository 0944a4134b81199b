"""Figures (matplotlib, Agg backend): each function writes ``<stem>.png`` and ``.pdf``.

==================================  ===================================================
function                            figure
==================================  ===================================================
:func:`fit_vs_truth`                fit minus truth against truth, one panel per label
:func:`spectrum_with_model`         a spectrum, its model and the residuals: the full
                                    range and zoomed wavelength windows
:func:`emulator_error_histogram`    emulator minus truth on held-out spectra
:func:`pixel_error_plot`            an emulator's stored per-pixel held-out error
:func:`loss_curves`                 training and validation loss (emulator or MDN)
:func:`coverage_plot`               calibration: fraction of truths within z sigma
                                    against the Gaussian expectation erf(z / sqrt 2)
:func:`corner_plot`                 1-D and 2-D marginals of posterior samples
:func:`trace_plot`                  MCMC traces per parameter and chain, with each
                                    chain's marginal beside them
:func:`prior_posterior_plot`        per parameter, the posterior over the prior on
                                    the prior's whole support, and zoomed
==================================  ===================================================

Every figure function returns the paths it wrote, ``[png, pdf]``. :func:`coverage`
gives the calibration numbers behind :func:`coverage_plot`; :func:`figures_from_files`
makes every figure a set of saved files allows (``payne-lite plot``).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .._validate import existing_file

#: Pixels further apart than this many median steps are a gap (APOGEE's chip gaps):
#: lines are not drawn across it.
GAP_FACTOR = 3.0
#: Default width [Angstrom] and number of the automatically picked zoom windows.
WINDOW_WIDTH = 30.0
N_WINDOWS = 3
#: 2-D credible levels of the corner plot's contours: 1 and 2 sigma of a 2-D Gaussian.
CORNER_LEVELS = (1.0 - math.exp(-0.5), 1.0 - math.exp(-2.0))

_DATA, _MODEL, _RESID, _MASKED, _WINDOW = "k", "C3", "C0", "0.85", "C1"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, stem: Path) -> list[Path]:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(out[0], dpi=130)
    fig.savefig(out[1])
    _pyplot().close(fig)
    return out


def _unit(unit) -> str:
    return f" [{unit}]" if unit else ""


def _as_2d(a, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=float)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be (n,) or (n, d), got shape {a.shape}")
    return a


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
    plt = _pyplot()
    truth, fit, err = (
        _as_2d(a, n) for a, n in [(truth, "truth"), (fit, "fit"), (err, "err")]
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
                f"{names[j]}: bias {np.median(d[ok]):+.3g}{_sp(u)}, "
                f"scatter {(hi - lo) / 2:.3g}{_sp(u)}",
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
        ax.set_xlabel(f"true {names[j]}{_unit(u)}")
        ax.set_ylabel(f"fit − true{_unit(u)}")
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
    return _save(fig, stem)


def _sp(unit) -> str:
    return f" {unit}" if unit else ""


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
    plt = _pyplot()
    wave, flux, model = (np.asarray(a, dtype=float) for a in (wave, flux, model))
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
    resid = np.where(bad, np.nan, resid)
    wins = _choose_windows(wave, model, resid, bad, windows, n_windows, window_width)

    nw = len(wins)
    width = max(11.0, 4.3 * nw)
    fig = plt.figure(figsize=(width, 7.4 if nw else 3.9), layout="constrained")
    if nw:
        top, bottom = fig.subfigures(2, 1, height_ratios=[1.0, 1.08])
    else:
        top, bottom = fig, None
    a_full, r_full = top.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    diff = f"{data_label} − {model_label}"
    rlabel = f"({diff}) / σ" if residual == "sigma" else diff
    runit = "resid. [σ]" if residual == "sigma" else "resid. [flux]"
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
        sigma=residual == "sigma",
    )
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
    r_full.xaxis.set_major_formatter(_plain_formatter())
    handles = [
        a_full.plot([], [], color=_DATA, lw=1, label=data_label)[0],
        a_full.plot([], [], color=_MODEL, lw=1, label=model_label)[0],
        a_full.plot([], [], color=_RESID, lw=1, label=f"residual: {rlabel}")[0],
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
    if nw:
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
                sigma=residual == "sigma",
            )
            a.set_xlim(lo, hi)
            a.set_title(
                f"({'abcdefghij'[k % 10]}) {lo:.1f}–{hi:.1f} Å"
                + (f": {why}" if why else ""),
                fontsize=9,
            )
            r.set_xlabel("wavelength [Å]")
            for ax in (a, r):
                ax.xaxis.set_major_locator(_max_n_locator(4))
                ax.xaxis.set_major_formatter(_plain_formatter())
        axes[0, 0].set_ylabel("normalised flux")
        axes[1, 0].set_ylabel(runit)
    if title:
        fig.suptitle(textwrap.fill(title, int(width * 15)), fontsize=9)
    return _save(fig, stem)


def _max_n_locator(n: int):
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(n)


def _plain_formatter():
    """Tick labels without an offset (``15230`` rather than ``0 + 1.523e4``)."""
    from matplotlib.ticker import ScalarFormatter

    fmt = ScalarFormatter(useOffset=False)
    fmt.set_scientific(False)
    return fmt


def _gap_breaks(wave, *ys):
    """``wave`` and ``ys`` with a NaN between pixels further apart than GAP_FACTOR
    median steps, so that plotted lines break at gaps of the grid."""
    at = np.flatnonzero(_gaps(wave)) + 1
    if at.size == 0:
        return (wave, *ys)
    return tuple(np.insert(np.asarray(a, float), at, np.nan) for a in (wave, *ys))


def _gaps(wave) -> np.ndarray:
    """(P - 1,) bool: True between pixels further apart than GAP_FACTOR median
    steps."""
    step = np.diff(wave)
    if step.size == 0:
        return np.zeros(0, bool)
    return step > GAP_FACTOR * np.median(step)


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
    gaps = _gaps(w)
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
    ww, gf, gm, gr = _gap_breaks(w, good_f, mo, r)
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
    seg = np.concatenate([[0], np.cumsum(_gaps(wave))])
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
# emulator error
# ======================================================================================
def emulator_error_histogram(resid: np.ndarray, stem: Path) -> list[Path]:
    """Histogram of per-pixel emulator errors on held-out spectra.

    Args:
        resid: (n_spec, n_pix) emulator minus truth [normalised flux].
    """
    plt = _pyplot()
    resid = np.asarray(resid, dtype=float)
    if resid.ndim != 2 or resid.size == 0:
        raise ValueError(f"resid must be (n_spec, n_pix), got shape {resid.shape}")
    pixel_mae = np.median(np.abs(resid), axis=0)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    lim = np.percentile(np.abs(resid), 99.9)
    a.hist(resid.ravel(), bins=200, range=(-lim, lim), color="C0")
    a.set_yscale("log")
    a.set_xlabel("emulator − truth [normalised flux]")
    a.set_ylabel("pixels × spectra")
    a.set_title(
        f"all held-out pixels ({resid.shape[0]} spectra; central 99.9 %)", fontsize=10
    )
    _log_histogram(b, pixel_mae)
    b.set_xlabel("per-pixel median |emulator − truth| [normalised flux]")
    b.set_title(f"per pixel ({resid.shape[1]} pixels)", fontsize=10)
    return _save(fig, stem)


def _log_histogram(ax, values) -> None:
    """Histogram of positive ``values`` on log-spaced bins, 50th / 99th percentiles."""
    v = values[np.isfinite(values) & (values > 0)]
    if v.size == 0:
        ax.text(
            0.5,
            0.5,
            "no positive values",
            transform=ax.transAxes,
            ha="center",
            va="center",
        )
        return
    lo, hi = max(v.min(), 1e-7), max(v.max(), 1e-7)
    bins = np.logspace(np.log10(lo), np.log10(hi * 1.0001), 60) if hi > lo else 10
    ax.hist(v, bins=bins, color="C1")
    ax.set_xscale("log")
    for q, ls in [(50, "-"), (99, "--")]:
        x = np.percentile(v, q)
        ax.axvline(x, color="k", ls=ls, label=f"{q}th percentile: {x:.1e}")
    ax.set_ylabel("pixels")
    ax.legend(fontsize=8)


def pixel_error_plot(wave, pixel_error, stem: Path, *, title: str = "") -> list[Path]:
    """An emulator's per-pixel error on held-out spectra: against wavelength, and its
    histogram.

    Args:
        wave: (P,) wavelength [Angstrom].
        pixel_error: (P,) RMS emulator error per pixel on held-out spectra
            [normalised flux] (``Emulator.pixel_error``).
        title: figure title.
    """
    plt = _pyplot()
    wave = np.asarray(wave, dtype=float)
    err = np.asarray(pixel_error, dtype=float)
    if wave.ndim != 1 or err.shape != wave.shape:
        raise ValueError(
            f"wave {wave.shape} and pixel_error {err.shape} must both be (P,)"
        )
    fig, (a, b) = plt.subplots(
        1, 2, figsize=(12, 3.8), width_ratios=[1.8, 1], layout="constrained"
    )
    w, e = _gap_breaks(wave, np.where(err > 0, err, np.nan))
    a.plot(w, e, color="C0", lw=0.4)
    a.set_yscale("log")
    a.set_xlabel("wavelength [Å]")
    a.set_ylabel("held-out RMS error [normalised flux]")
    a.set_title("per pixel", fontsize=10)
    _log_histogram(b, err)
    b.set_xlabel("held-out RMS error per pixel [normalised flux]")
    b.set_title(f"{err.size} pixels", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, stem)


# ======================================================================================
# loss curves
# ======================================================================================
#: Known history curves: name -> (legend text, line style).
_CURVES = {
    "train_rms": ("training: median pixel RMS", dict(color="C0")),
    "valid_rms": ("validation, best so far: median pixel RMS", dict(color="C1")),
    "valid_mae": (
        "validation, best so far: median pixel median |error|",
        dict(color="C1", ls="--"),
    ),
    "train_nll": ("training", dict(color="C0")),
    "valid_nll": ("validation", dict(color="C1")),
}


def loss_curves(
    history: dict,
    stem: Path,
    *,
    xlabel: str | None = None,
    ylabel: str | None = None,
    title: str = "",
) -> list[Path]:
    """Training and validation loss curves from a training history.

    Works with :attr:`payne_lite.Emulator.history` (``train_rms``, ``valid_rms``,
    ``valid_mae`` per iteration [normalised flux]; log scale when they span a
    decade),
    :attr:`payne_lite.MDN.history` (``train_nll``, ``valid_nll`` per epoch: mean
    negative log-likelihood per spectrum in the MDN's scaled units, which can be
    negative; the epoch of the lowest validation NLL, whose parameters the MDN keeps,
    is marked), and any other dict of ``train_*`` / ``valid_*`` arrays.

    Args:
        history: name -> (n_iter,) array; names not starting ``train_`` or ``valid_``
            (``seconds``, ``n_active``, ...) are ignored.
        xlabel, ylabel: axis labels (default from the kind of history).
        title: figure title.

    Raises:
        ValueError: no ``train_*`` or ``valid_*`` curve with a finite value.
    """
    plt = _pyplot()
    curves = {}
    for k in [*_CURVES, *sorted(history)]:
        if k in history and k.startswith(("train_", "valid_")) and k not in curves:
            a = np.asarray(history[k], dtype=float).ravel()
            if np.isfinite(a).any():
                curves[k] = a
    if not curves:
        raise ValueError(
            "history has no train_* or valid_* curve with finite values "
            f"(names: {sorted(history)})"
        )
    nll = "train_nll" in curves or "valid_nll" in curves
    emu = "train_rms" in curves or "valid_rms" in curves
    if xlabel is None:
        xlabel = "epoch" if nll else "iteration"
    if ylabel is None:
        ylabel = (
            "negative log-likelihood per spectrum (scaled units)"
            if nll
            else "error [normalised flux]"
            if emu
            else "loss"
        )
    fig, ax = plt.subplots(figsize=(6.5, 4.2), layout="constrained")
    for k, a in curves.items():
        label, style = _CURVES.get(
            k,
            (
                k.replace("train_", "training ", 1).replace("valid_", "validation ", 1),
                {},
            ),
        )
        ax.plot(np.arange(1, a.size + 1), a, label=label, **style)
    if "valid_nll" in curves:
        v = curves["valid_nll"]
        k = int(np.nanargmin(v))
        ax.plot(
            k + 1,
            v[k],
            "o",
            color="C1",
            ms=6,
            label=f"lowest validation: epoch {k + 1} (parameters kept)",
        )
    # log scale for errors spanning a decade or more; an NLL is a log already
    fin = np.concatenate([a[np.isfinite(a)] for a in curves.values()])
    if not nll and fin.min() > 0 and fin.max() > 10 * fin.min():
        ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, stem)


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
        _as_2d(a, n) for a, n in [(truth, "truth"), (mean, "mean"), (sigma, "sigma")]
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

    plt = _pyplot()
    truth = _as_2d(truth, "truth")
    d = truth.shape[1]
    if len(names) != d:
        raise ValueError(f"{len(names)} names for {d} columns")
    z = np.linspace(0.0, 3.5, 141)
    cov = coverage(truth, mean, sigma, z)
    mean, sigma = _as_2d(mean, "mean"), _as_2d(sigma, "sigma")
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
    return _save(fig, stem)


# ======================================================================================
# corner plot
# ======================================================================================
def corner_plot(
    samples,
    names,
    stem: Path,
    *,
    units=None,
    truths=None,
    best=None,
    bins: int = 30,
    title: str = "",
) -> list[Path]:
    """Corner plot of posterior samples: 1-D histograms and 2-D densities.

    The diagonal shows each parameter's histogram with its median and 16th / 84th
    percentiles (dashed; given above the panel as median +upper -lower); below it,
    the 2-D histograms of each pair (grey) with contours enclosing 39.3 % and 86.5 %
    of the samples (the 1 and 2 sigma regions of a 2-D Gaussian). The axis ranges
    span the 0.5-99.5th percentiles, widened to show ``truths`` and ``best``.

    Args:
        samples: (n, d) posterior samples (for example an emcee chain, flattened).
        names: d parameter names; units: optional d units (axis labels).
        truths: optional (d,) true values (blue lines).
        best: optional (d,) best-fit point (red star and lines).
        bins: histogram bins per axis.
        title: figure title.

    Raises:
        ValueError: shapes that do not fit, fewer than 2 samples, non-finite samples.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator, ScalarFormatter
    from scipy.ndimage import gaussian_filter

    plt = _pyplot()
    x = np.asarray(samples, dtype=float)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"samples must be (n, d) with n >= 2, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("samples hold non-finite values")
    n, d = x.shape
    units = [""] * d if units is None else list(units)
    if len(names) != d or len(units) != d:
        raise ValueError(
            f"{len(names)} names and {len(units)} units for {d} parameters"
        )
    pts = {}
    for key, val in [("truths", truths), ("best", best)]:
        if val is not None:
            v = np.asarray(val, dtype=float)
            if v.shape != (d,):
                raise ValueError(f"{key} {v.shape} must be ({d},)")
            pts[key] = v
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")

    ranges = []
    for j in range(d):
        lo, hi = np.percentile(x[:, j], [0.5, 99.5])
        extra = [v[j] for v in pts.values() if np.isfinite(v[j])]
        lo, hi = min([lo, *extra]), max([hi, *extra])
        pad = 0.05 * (hi - lo) if hi > lo else max(abs(lo) * 1e-3, 1e-3)
        ranges.append((lo - pad, hi + pad))

    size = min(2.1 * d + 0.6, 15.0)
    fig, axes = plt.subplots(
        d,
        d,
        figsize=(max(size, 5.0), max(size, 3.8)),
        squeeze=False,
        layout="constrained",
    )
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.03, hspace=0.03)
    q = np.percentile(x, [16, 50, 84], axis=0)
    for i in range(d):
        for j in range(d):
            ax = axes[i, j]
            if j > i:
                ax.set_visible(False)
                continue
            if i == j:
                ax.hist(
                    x[:, j],
                    bins=bins,
                    range=ranges[j],
                    histtype="step",
                    color="k",
                    density=True,
                )
                for v, ls in zip(q[:, j], ("--", "-", "--"), strict=True):
                    ax.axvline(v, color="k", ls=ls, lw=0.8)
                ax.set_yticks([])
                ax.set_title(
                    f"{names[j]}{_unit(units[j])}\n"
                    + _median_text(q[1, j], q[2, j] - q[1, j], q[1, j] - q[0, j]),
                    fontsize=8,
                )
            else:
                h, xe, ye = np.histogram2d(
                    x[:, j], x[:, i], bins=bins, range=[ranges[j], ranges[i]]
                )
                h = gaussian_filter(h, 0.8)
                ax.pcolormesh(
                    xe, ye, h.T, cmap="Greys", shading="flat", rasterized=True
                )
                levels = _density_levels(h, CORNER_LEVELS)
                if levels is not None:
                    xc, yc = (xe[1:] + xe[:-1]) / 2, (ye[1:] + ye[:-1]) / 2
                    ax.contour(xc, yc, h.T, levels=levels, colors="k", linewidths=0.8)
                ax.set_ylim(ranges[i])
            ax.set_xlim(ranges[j])
            for key, color in [("truths", "C0"), ("best", "C3")]:
                if key not in pts:
                    continue
                v = pts[key]
                ls = "-" if key == "truths" else ":"
                ax.axvline(v[j], color=color, lw=1, ls=ls)
                if i != j:
                    ax.axhline(v[i], color=color, lw=1, ls=ls)
                    ax.plot(
                        v[j],
                        v[i],
                        "*" if key == "best" else "s",
                        color=color,
                        ms=7 if key == "best" else 4,
                    )
            axis_list = [ax.xaxis] if i == j else [ax.xaxis, ax.yaxis]
            for axis in axis_list:
                axis.set_major_locator(MaxNLocator(3, prune="both"))
                axis.set_major_formatter(ScalarFormatter(useOffset=False))
            ax.tick_params(labelsize=7)
            if i == d - 1:
                ax.set_xlabel(f"{names[j]}{_unit(units[j])}", fontsize=8)
                for lab in ax.get_xticklabels():
                    lab.set_rotation(45)
                    lab.set_ha("right")
            else:
                ax.tick_params(labelbottom=False)
            if j == 0 and i > 0:
                ax.set_ylabel(f"{names[i]}{_unit(units[i])}", fontsize=8)
            elif i != j:
                ax.tick_params(labelleft=False)
    handles = [
        Line2D(
            [], [], color="k", ls="--", lw=0.8, label="median and 16th/84th percentiles"
        )
    ]
    if d > 1:
        handles.append(
            Line2D(
                [],
                [],
                color="k",
                lw=0.8,
                label="39 % and 86 % contours (1σ, 2σ in 2-D)",
            )
        )
    if "truths" in pts:
        handles.append(Line2D([], [], color="C0", marker="s", ms=4, label="truth"))
    if "best" in pts:
        handles.append(
            Line2D([], [], color="C3", ls=":", marker="*", ms=7, label="best fit")
        )
    if d > 1:  # the empty upper-right triangle
        fig.legend(
            handles=handles,
            loc="upper right",
            bbox_to_anchor=(0.98, 0.95),
            fontsize=8,
            frameon=False,
            title=f"{n} samples",
            title_fontsize=8,
        )
    else:
        axes[0, 0].legend(
            handles=handles,
            fontsize=7,
            loc="upper right",
            title=f"{n} samples",
            title_fontsize=7,
        )
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, stem)


#: At most this many chains (emcee walkers) are drawn in a trace plot.
TRACE_MAX_CHAINS = 8


def trace_plot(
    chains,
    names,
    stem: Path,
    *,
    units=None,
    truths=None,
    title: str = "",
    max_chains: int = TRACE_MAX_CHAINS,
) -> list[Path]:
    """Trace plot: one row per parameter, the value against the step of each chain
    (left) and each chain's histogram beside it (right, same vertical axis).

    Chains that agree overlap on the right; a chain stuck apart, or a trend on the
    left, is what R-hat and the autocorrelation time report as numbers.

    Args:
        chains: (n_steps, n_chains, d) draws (emcee: walkers as chains; nuts: its
            chains), or (n_steps, d) for one chain.
        names: d parameter names; units: optional d units.
        truths: optional (d,) true values (blue lines).
        title: figure title.
        max_chains: draw at most this many chains (the first ones).

    Raises:
        ValueError: shapes that do not fit, fewer than 2 steps, non-finite draws.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    plt = _pyplot()
    x = np.asarray(chains, dtype=float)
    if x.ndim == 2:
        x = x[:, None, :]
    if x.ndim != 3 or x.shape[0] < 2 or x.shape[2] < 1:
        raise ValueError(
            "chains must be (n_steps, n_chains, d) or (n_steps, d) with "
            f"n_steps >= 2, got shape {np.shape(chains)}"
        )
    if not np.all(np.isfinite(x)):
        raise ValueError("chains hold non-finite values")
    n, c, d = x.shape
    units = [""] * d if units is None else list(units)
    if len(names) != d or len(units) != d:
        raise ValueError(
            f"{len(names)} names and {len(units)} units for {d} parameters"
        )
    tr = None
    if truths is not None:
        tr = np.asarray(truths, dtype=float)
        if tr.shape != (d,):
            raise ValueError(f"truths {tr.shape} must be ({d},)")
    shown = min(c, max_chains)
    colors = [f"C{j % 10}" for j in range(shown)]
    fig, axes = plt.subplots(
        d,
        2,
        figsize=(9.0, 0.4 + 1.35 * d),
        squeeze=False,
        sharey="row",
        width_ratios=(4, 1),
        layout="constrained",
    )
    steps = np.arange(n)
    for i in range(d):
        ax, side = axes[i]
        lo, hi = np.percentile(x[:, :, i], [0.1, 99.9])
        if tr is not None and np.isfinite(tr[i]):
            lo, hi = min(lo, tr[i]), max(hi, tr[i])
        pad = 0.05 * (hi - lo) if hi > lo else max(abs(lo) * 1e-3, 1e-3)
        edges = np.linspace(lo - pad, hi + pad, 41)
        for j in range(shown):
            ax.plot(
                steps, x[:, j, i], color=colors[j], lw=0.5, alpha=0.8, rasterized=True
            )
            side.hist(
                x[:, j, i],
                bins=edges,
                orientation="horizontal",
                histtype="step",
                color=colors[j],
                density=True,
                lw=0.8,
            )
        if tr is not None:
            ax.axhline(tr[i], color="C0", lw=1.2, ls="--")
            side.axhline(tr[i], color="C0", lw=1.2, ls="--")
        ax.set_ylim(edges[0], edges[-1])
        ax.set_xlim(0, n - 1)
        ax.set_ylabel(f"{names[i]}{_unit(units[i])}", fontsize=8)
        ax.yaxis.set_major_locator(MaxNLocator(4))
        ax.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))
        side.set_xticks([])
        for a in (ax, side):
            a.tick_params(labelsize=7)
        if i < d - 1:
            ax.tick_params(labelbottom=False)
    axes[-1, 0].set_xlabel(
        "step (after burn-in / warm-up, thinned as saved)", fontsize=8
    )
    axes[-1, 1].set_xlabel("density", fontsize=8)
    what = f"{shown} of {c} chains" if shown < c else f"{c} chain{'s' * (c > 1)}"
    handles = [Line2D([], [], color="C0", lw=0.8, label=f"{what}, {n} steps each")]
    if tr is not None:
        handles.append(Line2D([], [], color="C0", ls="--", lw=1.2, label="truth"))
    axes[0, 0].legend(handles=handles, fontsize=7, loc="upper right", framealpha=0.8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, stem)


def prior_posterior_plot(
    samples,
    names,
    stem: Path,
    *,
    prior_lo,
    prior_hi,
    prior_mu=None,
    prior_sd=None,
    weights=None,
    units=None,
    truths=None,
    bins: int = 40,
    title: str = "",
) -> list[Path]:
    """Prior against posterior, one row per parameter: on the prior's whole support
    (left, each density scaled to its own peak, so that a flat prior is a band and a
    well-measured label's posterior a spike in it), and the posterior zoomed
    (right, the region outside the prior's support shaded).

    The prior is uniform on [prior_lo, prior_hi], or a Gaussian (prior_mu, prior_sd)
    truncated to it where ``prior_sd`` is finite. Each row gives the ratio of
    posterior to prior sd (how much the data taught; 1 = nothing).

    Args:
        samples: (n, d) posterior samples; weights: optional (n,) (importance
            sampling), else equal.
        names: d parameter names; units: optional d units.
        prior_lo, prior_hi: (d,) the prior's support.
        prior_mu, prior_sd: optional (d,) Gaussian prior (sd = inf: flat).
        truths: optional (d,) true values (blue lines).
        bins: histogram bins of the zoomed panel.
        title: figure title.

    Raises:
        ValueError: shapes that do not fit, a support with lo >= hi, fewer than 2
            samples, non-finite samples or weights.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator, ScalarFormatter
    from scipy.stats import truncnorm

    plt = _pyplot()
    x = np.asarray(samples, dtype=float)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"samples must be (n, d) with n >= 2, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("samples hold non-finite values")
    n, d = x.shape
    w = np.full(n, 1.0 / n) if weights is None else np.asarray(weights, float)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be (n,) = ({n},), finite, >= 0, not all 0")
    w = w / w.sum()
    units = [""] * d if units is None else list(units)
    if len(names) != d or len(units) != d:
        raise ValueError(
            f"{len(names)} names and {len(units)} units for {d} parameters"
        )

    def vec(val, key, default):
        if val is None:
            return np.full(d, default)
        v = np.asarray(val, dtype=float)
        if v.shape != (d,):
            raise ValueError(f"{key} {v.shape} must be ({d},)")
        return v

    lo, hi = vec(prior_lo, "prior_lo", np.nan), vec(prior_hi, "prior_hi", np.nan)
    if not np.all(np.isfinite(lo) & np.isfinite(hi) & (lo < hi)):
        raise ValueError("prior_lo and prior_hi must be finite with lo < hi")
    mu, sd = vec(prior_mu, "prior_mu", 0.0), vec(prior_sd, "prior_sd", np.inf)
    tr = None if truths is None else vec(truths, "truths", np.nan)

    fig, axes = plt.subplots(
        d, 2, figsize=(9.0, 0.5 + 1.45 * d), squeeze=False, layout="constrained"
    )

    def prior_pdf(j, grid):
        if np.isfinite(sd[j]) and sd[j] > 0:
            a, b = (lo[j] - mu[j]) / sd[j], (hi[j] - mu[j]) / sd[j]
            return truncnorm.pdf(grid, a, b, loc=mu[j], scale=sd[j])
        return np.where((grid >= lo[j]) & (grid <= hi[j]), 1.0 / (hi[j] - lo[j]), 0.0)

    def prior_sd_of(j):
        if np.isfinite(sd[j]) and sd[j] > 0:
            a, b = (lo[j] - mu[j]) / sd[j], (hi[j] - mu[j]) / sd[j]
            return float(truncnorm.std(a, b, loc=mu[j], scale=sd[j]))
        return (hi[j] - lo[j]) / math.sqrt(12.0)

    for j in range(d):
        left, right = axes[j]
        mean = float(w @ x[:, j])
        post_sd = float(np.sqrt(max(w @ (x[:, j] - mean) ** 2, 0.0)))
        ratio = post_sd / prior_sd_of(j)
        # whole support
        span = hi[j] - lo[j]
        grid = np.linspace(lo[j] - 0.03 * span, hi[j] + 0.03 * span, 600)
        pp = prior_pdf(j, grid)
        left.fill_between(grid, pp / pp.max(), color="0.82", lw=0)
        edges = np.linspace(lo[j], hi[j], 201)
        h, _ = np.histogram(x[:, j], bins=edges, weights=w)
        left.stairs(h / h.max(), edges, color="k", lw=0.9)
        left.set_xlim(grid[0], grid[-1])
        left.set_ylim(0, 1.35)
        left.text(
            0.99 if mean < 0.5 * (lo[j] + hi[j]) else 0.01,
            0.95,
            f"sd posterior / prior = {ratio:.3g}",
            transform=left.transAxes,
            fontsize=7,
            va="top",
            ha="right" if mean < 0.5 * (lo[j] + hi[j]) else "left",
        )
        # zoom on the posterior
        q = _wquantiles(x[:, j], w, [0.001, 0.16, 0.5, 0.84, 0.999])
        zlo, zhi = q[0], q[-1]
        if tr is not None and np.isfinite(tr[j]):
            zlo, zhi = min(zlo, tr[j]), max(zhi, tr[j])
        pad = 0.05 * (zhi - zlo) if zhi > zlo else max(abs(zlo) * 1e-3, 1e-3)
        zlo, zhi = zlo - pad, zhi + pad
        zedges = np.linspace(zlo, zhi, bins + 1)
        hz, _ = np.histogram(x[:, j], bins=zedges, weights=w)
        hz = hz / (zedges[1] - zedges[0])  # density of the whole posterior
        right.stairs(hz, zedges, color="k", lw=0.9, fill=False)
        if zlo < lo[j]:
            right.axvspan(zlo, lo[j], color="0.82", lw=0)
        if zhi > hi[j]:
            right.axvspan(hi[j], zhi, color="0.82", lw=0)
        for v, ls in zip(q[1:4], ("--", "-", "--"), strict=True):
            right.axvline(v, color="k", ls=ls, lw=0.7)
        right.set_xlim(zlo, zhi)
        right.set_ylim(0, None)
        right.set_title(
            f"{names[j]} = "
            + _median_text(q[2], q[3] - q[2], q[2] - q[1])
            + _sp(units[j]),
            fontsize=8,
        )
        for a in (left, right):
            if tr is not None and np.isfinite(tr[j]):
                a.axvline(tr[j], color="C0", lw=1.1)
            a.tick_params(labelsize=7)
            a.set_yticks([])
            a.xaxis.set_major_locator(MaxNLocator(5))
            a.xaxis.set_major_formatter(ScalarFormatter(useOffset=False))
        left.set_ylabel(f"{names[j]}{_unit(units[j])}", fontsize=8)
    axes[0, 0].set_title(
        "on the prior's support, each density scaled to its peak",
        fontsize=8,
        loc="left",
    )
    handles = [
        Line2D([], [], color="0.82", lw=6, label="prior"),
        Line2D([], [], color="k", lw=0.9, label="posterior"),
        Line2D(
            [],
            [],
            color="k",
            ls="--",
            lw=0.7,
            label="median, 16th/84th percentiles (zoomed)",
        ),
    ]
    if tr is not None:
        handles.append(Line2D([], [], color="C0", lw=1.1, label="truth"))
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=len(handles),
        fontsize=7,
        frameon=False,
    )
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, stem)


def _wquantiles(x, w, q) -> np.ndarray:
    """Weighted quantiles of one sample (midpoint CDF, as posterior's)."""
    order = np.argsort(x)
    xs, ws = x[order], w[order]
    cdf = (np.cumsum(ws) - 0.5 * ws) / ws.sum()
    return np.interp(q, cdf, xs)


def _decimals(err: float) -> int:
    """Decimals that show two significant digits of ``err`` (3 if it is not > 0)."""
    if not (np.isfinite(err) and err > 0):
        return 3
    return max(1 - int(math.floor(math.log10(err))), 0)


def _median_text(med, up, down) -> str:
    """``5500 +12 −11``, rounded to two significant digits of the smaller error."""
    nd = _decimals(min(abs(up), abs(down)))
    return f"{med:.{nd}f} +{up:.{nd}f} −{down:.{nd}f}"


def _value_text(name, value, err, unit) -> str:
    """``Teff = 5825 ± 9.8 K``, the value rounded like its error."""
    if not np.isfinite(value):
        return f"{name} = nan"
    if err == 0:
        return f"{name} = {value:g}{_sp(unit)} (fixed)"
    nd = _decimals(err)
    return f"{name} = {value:.{nd}f} ± {err:.{nd}f}{_sp(unit)}"


def _density_levels(h, fractions) -> list[float] | None:
    """Histogram values whose super-level sets enclose ``fractions`` of the total,
    increasing; None when they do not give distinct levels."""
    flat = np.sort(h.ravel())[::-1]
    total = flat.sum()
    if total <= 0:
        return None
    cum = np.cumsum(flat) / total
    levels = sorted(
        {float(flat[min(np.searchsorted(cum, f), flat.size - 1)]) for f in fractions}
    )
    levels = [v for v in levels if v > 0]
    return levels if len(levels) == len(fractions) else None


# ======================================================================================
# figures from saved files (payne-lite plot)
# ======================================================================================
class Figures(NamedTuple):
    """What :func:`figures_from_files` did.

    Attributes:
        written: ``(description, [png, pdf])`` per figure.
        skipped: why a figure that the inputs suggest was not made.
    """

    written: list
    skipped: list


def figures_from_files(
    outdir,
    *,
    results=None,
    truth=None,
    spectra=None,
    emulator=None,
    mdn=None,
    rows=None,
    windows="auto",
    window_width: float = WINDOW_WIDTH,
) -> Figures:
    """Make every figure that the given saved files allow (``payne-lite plot``).

    ====================================  ===============================================
    given                                 figures (in ``outdir``)
    ====================================  ===============================================
    results + truth                       ``fit_vs_truth``; ``fit_coverage`` (the fit's
                                          ``<name>_err``); ``mdn_coverage`` when the
                                          results have ``<name>_mdn`` and
                                          ``<name>_mdn_sigma`` columns
    results + spectra (+ emulator)        ``spectrum_row<N>`` for the chosen rows: data,
                                          best-fit model (the ``model_flux`` column, or
                                          recomputed with the emulator), residuals
    emulator                              ``emulator_loss`` (its training history),
                                          ``emulator_pixel_error`` (its held-out error)
    mdn                                   ``mdn_loss`` (its training history)
    samples (in the place of results)     per star (``rows``, default the first 3 with
                                          samples): ``trace_star<N>`` (emcee, nuts),
                                          ``prior_posterior_star<N>``,
                                          ``corner_star<N>`` (mdn-is: resampled by
                                          weight); the file from
                                          ``payne_lite.sample(samples_path=...)``
    ====================================  ===============================================

    Args:
        outdir: folder for the figures (created; existing figures are replaced).
        results: a results table (FITS, ECSV or HDF5 from ``payne-lite fit`` /
            :func:`payne_lite.write_results`). An emulator or MDN file given here is
            plotted as if given as ``emulator`` / ``mdn``.
        truth: a table of true values (any of those formats, e.g. the demo's
            ``catalog_truth.ecsv``) with columns named like the fitted labels and
            ``rv``, on the rows of ``results`` in order, or matched by an ``id``
            column present in both.
        spectra: the catalog ``results`` was fitted from (an HDF5 catalog, or FITS
            paths; :func:`payne_lite.open_catalog`), one row per results row.
        emulator: an emulator file: models for ``spectra``, and its own figures.
        mdn: an MDN file.
        rows: results rows to draw spectra for (default: the one with the median
            and the one with the highest ``chi2_red``), or the stars of a samples
            file.
        windows, window_width: zoom windows, see :func:`spectrum_with_model`.

    Returns:
        :class:`Figures`.

    Raises:
        FileNotFoundError: a file that does not exist.
        ValueError: a combination that makes no figure, a table without the needed
            columns, tables whose rows do not match, rows out of range.
        payne_lite.FileFormatError: an unreadable or corrupt file.
    """
    from ..emulator import EMULATOR_FORMAT
    from ..mdn import MDN_FORMAT
    from ..posterior import SAMPLES_FORMAT

    outdir = Path(outdir)
    paths = {}
    for key, val in [
        ("results", results),
        ("truth", truth),
        ("emulator", emulator),
        ("mdn", mdn),
    ]:
        if val is not None:
            paths[key] = existing_file(val)
    if spectra is not None:
        spectra = (
            [existing_file(spectra)]
            if isinstance(spectra, str | Path)
            else [existing_file(p) for p in spectra]
        )
    if "results" in paths:  # an emulator or MDN file where a results table goes
        fmt = _hdf5_format(paths["results"])
        for kind, known in [("emulator", EMULATOR_FORMAT), ("mdn", MDN_FORMAT)]:
            if fmt == known:
                if kind in paths or truth is not None or spectra is not None:
                    raise ValueError(
                        f"{paths['results']} is an {kind} file, not a results table"
                    )
                paths[kind] = paths.pop("results")
        if fmt == SAMPLES_FORMAT:
            if truth is not None or spectra is not None:
                raise ValueError(
                    f"{paths['results']} is a samples file: its figures "
                    "need no truth table or spectra"
                )
            paths["samples"] = paths.pop("results")
    res_path = paths.get("results")
    if res_path is None and not ({"emulator", "mdn", "samples"} & set(paths)):
        raise ValueError(
            "nothing to plot: give a results table, an emulator file or an MDN file"
        )
    if res_path is None and (truth is not None or spectra is not None):
        raise ValueError(
            "a truth table and spectra are compared with a results "
            "table: give the results table too"
        )
    if res_path is not None and truth is None and spectra is None:
        raise ValueError(
            f"{res_path}: a results table alone makes no figure; add the "
            "truth table (fit minus truth, calibration) or the spectra "
            "it was fitted from (spectra with their models)"
        )
    if rows is not None and spectra is None and "samples" not in paths:
        raise ValueError("rows choose the spectra to draw: give the spectra too")

    from ..catalog import read_results
    from ..emulator import Emulator

    written: list = []
    skipped: list = []
    emu = Emulator.load(paths["emulator"]) if "emulator" in paths else None
    if res_path is not None:
        res = read_results(res_path)
        params, units = _fit_params(res, res_path)
        if truth is not None:
            tru = _read_table(paths["truth"])
            _truth_figures(
                outdir,
                res,
                res_path,
                params,
                units,
                tru,
                paths["truth"],
                written,
                skipped,
            )
        if spectra is not None:
            _spectrum_figures(
                outdir,
                res,
                res_path,
                params,
                units,
                spectra,
                emu,
                paths.get("emulator"),
                rows,
                windows,
                window_width,
                written,
            )
    if "samples" in paths:
        _samples_figures(outdir, paths["samples"], rows, written, skipped)
    if emu is not None:
        _emulator_figures(outdir, emu, paths["emulator"], written, skipped)
    if "mdn" in paths:
        from ..mdn import MDN

        net = MDN.load(paths["mdn"])
        if net.history:
            written.append(
                (
                    f"MDN training and validation loss ({len(next(iter(net.history.values())))}"
                    " epochs)",
                    loss_curves(
                        net.history,
                        outdir / "mdn_loss",
                        xlabel="epoch",
                        title=f"MDN {paths['mdn'].name}: {net.n_components} "
                        f"component(s), outputs {', '.join(net.output_names)}",
                    ),
                )
            )
        else:
            skipped.append(f"{paths['mdn']}: no training history, no loss curves")
    if not written:
        raise ValueError("nothing to plot: " + "; ".join(skipped))
    return Figures(written, skipped)


def _samples_figures(outdir, path, rows, written, skipped) -> None:
    """Trace, prior-posterior and corner figures of stars of a samples file."""
    from ..posterior import load_samples

    post, meta = load_samples(path)
    n_star = len(post.samples)
    have = [i for i in range(n_star) if post.samples[i].shape[0] >= 2]
    if rows is None:
        rows = have[:3]
    bad = [r for r in rows if r >= n_star]
    if bad:
        raise ValueError(f"{path}: rows {bad} out of range (it has {n_star} stars)")
    for i in rows:
        x = np.asarray(post.samples[i], float)
        method = post.method[i]
        if x.shape[0] < 2:
            skipped.append(f"{path}: star {i} has no samples ({method})")
            continue
        head = f"{path.name}, star {i}: {method}"
        c = post.n_chains[i] if post.n_chains is not None else 0
        if c > 0 and x.shape[0] % c == 0 and x.shape[0] // c >= 2:
            written.append(
                (
                    f"star {i}: traces of {c} chains ({method})",
                    trace_plot(
                        x.reshape(-1, c, x.shape[1]),
                        post.names,
                        outdir / f"trace_star{i}",
                        units=post.units,
                        title=f"{head}, traces",
                    ),
                )
            )
        else:
            skipped.append(f"{path}: star {i} ({method}) has no chains to trace")
        w = post.weights[i]
        if post.prior_lo is not None and post.prior_lo[i] is not None:
            written.append(
                (
                    f"star {i}: prior and posterior per parameter",
                    prior_posterior_plot(
                        x,
                        post.names,
                        outdir / f"prior_posterior_star{i}",
                        prior_lo=post.prior_lo[i],
                        prior_hi=post.prior_hi[i],
                        prior_mu=post.prior_mu[i],
                        prior_sd=post.prior_sd[i],
                        weights=w,
                        units=post.units,
                        title=f"{head}, prior {meta.get('prior', '?')}",
                    ),
                )
            )
        else:
            skipped.append(f"{path}: star {i} has no prior stored")
        xc = x
        if w is not None:  # equal-weight draws for the corner plot
            rng = np.random.default_rng(i)
            xc = x[rng.choice(x.shape[0], size=x.shape[0], p=w / w.sum())]
        written.append(
            (
                f"star {i}: corner plot ({method})",
                corner_plot(
                    xc,
                    post.names,
                    outdir / f"corner_star{i}",
                    units=post.units,
                    title=head,
                ),
            )
        )


def _hdf5_format(path: Path) -> str | None:
    """The ``format`` attribute of an HDF5 file, or None (not HDF5, no attribute)."""
    import h5py

    if not h5py.is_hdf5(path):
        return None
    try:
        with h5py.File(path, "r") as f:
            fmt = f.attrs.get("format")
    except (OSError, KeyError, RuntimeError):
        return None
    return fmt.decode() if isinstance(fmt, bytes) else fmt


def _read_table(path: Path):
    """A table in any format :func:`payne_lite.read_results` or astropy reads."""
    from astropy.table import Table

    from ..catalog import FORMATS, HDF5_PATH, read_results

    fmt = FORMATS.get(path.suffix.lower())
    if fmt == "hdf5":
        import h5py

        with h5py.File(path, "r") as f:
            has_results = HDF5_PATH in f
        if not has_results:
            return Table.read(path)
    if fmt is not None:
        return read_results(path)
    try:
        return Table.read(path)
    except Exception as err:  # astropy raises many kinds for unknown formats
        raise ValueError(f"{path}: not a table astropy can read ({err})") from err


def _values(table, name: str, path: Path) -> np.ndarray:
    """Column ``name`` as float64 with masked entries NaN."""
    try:
        return np.ma.filled(np.ma.masked_array(table[name], dtype=float), np.nan)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: column {name!r} is not numeric") from err


def _fit_params(res, path: Path) -> tuple[list[str], list[str]]:
    """Fitted parameters (labels, then rv) with their error columns, and units."""
    label_names = list(res.meta.get("label_names") or [])
    if label_names:
        names = [*label_names, "rv"]
        label_units = list(res.meta.get("label_units") or [""] * len(label_names))
        unit_of = dict(zip(names, [*label_units, "km/s"], strict=False))
    else:  # not written by payne_lite: every <name> with a <name>_err
        names = [
            c[:-4]
            for c in res.colnames
            if c.endswith("_err")
            and c[:-4] in res.colnames
            and not c.startswith("cont_")
        ]
        unit_of = {}
    params = [p for p in names if p in res.colnames and f"{p}_err" in res.colnames]
    if not params:
        raise ValueError(
            f"{path}: no fitted parameter columns (a <name> column with its "
            "<name>_err, e.g. Teff and Teff_err, as payne-lite fit writes); columns: "
            + ", ".join(res.colnames[:12])
            + (" ..." if len(res.colnames) > 12 else "")
        )
    units = []
    for p in params:
        u = unit_of.get(p)
        if u is None:
            col_unit = getattr(res[p], "unit", None)
            u = col_unit.to_string() if col_unit is not None else ""
        units.append(u)
    return params, units


def _truth_rows(res, res_path, tru, tru_path) -> np.ndarray:
    """Index into ``tru`` of each results row."""
    if "id" in res.colnames and "id" in tru.colnames:
        where = {str(v): i for i, v in enumerate(tru["id"])}
        ids = [str(v) for v in res["id"]]
        missing = [i for i in ids if i not in where]
        if missing:
            raise ValueError(
                f"{tru_path}: no row for id {missing[0]!r} of {res_path} "
                f"({len(missing)} of {len(ids)} ids missing)"
            )
        return np.array([where[i] for i in ids], dtype=int)
    if len(tru) != len(res):
        raise ValueError(
            f"{res_path} has {len(res)} rows and {tru_path} {len(tru)}: "
            "the truth table must hold the results' rows in order (or "
            "both need an id column)"
        )
    return np.arange(len(res))


def _truth_figures(
    outdir, res, res_path, params, units, tru, tru_path, written, skipped
):
    common = [j for j, p in enumerate(params) if p in tru.colnames]
    if not common:
        raise ValueError(
            f"{tru_path}: none of the fitted parameters ({', '.join(params)}) is a "
            "column; columns: "
            + ", ".join(tru.colnames[:12])
            + (" ..." if len(tru.colnames) > 12 else "")
        )
    idx = _truth_rows(res, res_path, tru, tru_path)
    names = [params[j] for j in common]
    unit = [units[j] for j in common]
    t = np.column_stack([_values(tru, p, tru_path)[idx] for p in names])
    f = np.column_stack([_values(res, p, res_path) for p in names])
    e = np.column_stack([_values(res, f"{p}_err", res_path) for p in names])
    snr = None
    for table, path, rows in [(tru, tru_path, idx), (res, res_path, slice(None))]:
        if "snr" in table.colnames:
            snr = _values(table, "snr", path)[rows]
            break
    flagged = (np.asarray(res["flags"]) != 0) if "flags" in res.colnames else None
    n = len(res)
    what = f"{res_path.name} against {tru_path.name}"
    written.append(
        (
            f"fit minus truth, {len(names)} parameters x {n} spectra",
            fit_vs_truth(
                t,
                f,
                e,
                names,
                unit,
                outdir / "fit_vs_truth",
                color=snr,
                color_label="S/N",
                flagged=flagged,
                title=what,
            ),
        )
    )
    scaled = (
        " (scaled by sqrt(chi2_red))"
        if res.meta.get("errors_scaled_by_chi2_red")
        else ""
    )
    written.append(
        (
            f"coverage of the fit errors, {len(names)} parameters",
            coverage_plot(
                t,
                f,
                e,
                names,
                outdir / "fit_coverage",
                title=f"calibration of the fit errors{scaled}: " + what,
            ),
        )
    )
    mdn_cols = [
        j
        for j, p in enumerate(names)
        if f"{p}_mdn" in res.colnames and f"{p}_mdn_sigma" in res.colnames
    ]
    if not mdn_cols:
        skipped.append(
            f"{res_path}: no <name>_mdn / <name>_mdn_sigma columns (fit "
            "without an MDN), no MDN calibration"
        )
        return
    m = np.column_stack([_values(res, f"{names[j]}_mdn", res_path) for j in mdn_cols])
    s = np.column_stack(
        [_values(res, f"{names[j]}_mdn_sigma", res_path) for j in mdn_cols]
    )
    written.append(
        (
            f"coverage of the MDN sigmas, {len(mdn_cols)} parameters",
            coverage_plot(
                t[:, mdn_cols],
                m,
                s,
                [names[j] for j in mdn_cols],
                outdir / "mdn_coverage",
                title=f"calibration of the MDN: {what}",
            ),
        )
    )


def _default_rows(res) -> list[tuple[int, str]]:
    if "chi2_red" not in res.colnames:
        return [(0, "first row")]
    c = np.asarray(res["chi2_red"], dtype=float)
    ok = np.flatnonzero(np.isfinite(c))
    if ok.size == 0:
        return [(0, "first row")]
    order = ok[np.argsort(c[ok], kind="stable")]
    med, worst = int(order[(order.size - 1) // 2]), int(order[-1])
    out = [(med, "median chi2_red")]
    if worst != med:
        out.append((worst, "highest chi2_red"))
    return out


def _spectrum_figures(
    outdir,
    res,
    res_path,
    params,
    units,
    spectra,
    emu,
    emu_path,
    rows,
    windows,
    window_width,
    written,
):
    from ..catalog import open_catalog

    n = len(res)
    if rows is None:
        chosen = _default_rows(res)
    else:
        chosen = []
        for r in rows:
            if isinstance(r, bool) or int(r) != r or not 0 <= r < n:
                raise ValueError(
                    f"row {r!r} is not one of the {n} rows (0..{n - 1}) of {res_path}"
                )
            chosen.append((int(r), ""))
    source = spectra[0] if len(spectra) == 1 else spectra
    with open_catalog(source) as cat:
        if len(cat) != n:
            raise ValueError(
                f"{cat.source} holds {len(cat)} spectra and {res_path} "
                f"{n} rows: give the catalog the results were fitted from"
            )
        wave = cat.wavelength
        has_model = (
            "model_flux" in res.colnames
            and np.shape(res["model_flux"])[1:] == wave.shape
        )
        if not has_model and emu is None:
            raise ValueError(
                f"{res_path} has no model_flux column: give the emulator "
                "to compute the best-fit models"
            )
        model_fn = (
            None if has_model else _model_function(res, res_path, emu, emu_path, wave)
        )
        for row, why in chosen:
            chunk = cat.read(row, row + 1)
            rid = None if chunk.ids is None else str(chunk.ids[0])
            if rid is not None and "id" in res.colnames and str(res["id"][row]) != rid:
                raise ValueError(
                    f"row {row}: catalog id {rid!r} but results id "
                    f"{str(res['id'][row])!r}: not the same spectra"
                )
            flux = np.asarray(chunk.flux[0], dtype=float)
            err = np.asarray(chunk.flux_err[0], dtype=float)
            mask = (
                np.zeros(wave.size, bool)
                if chunk.mask is None
                else np.asarray(chunk.mask[0], bool)
            )
            note = ""
            if has_model:
                model = np.asarray(res["model_flux"][row], dtype=float)
            else:
                model, valid, err, note = model_fn(row, err)
                model = np.where(valid, model, np.nan)  # no model off the grid
                mask = mask | ~valid
            title = _row_title(res, row, rid, params, units, why) + note
            stem = outdir / f"spectrum_row{row}"
            written.append(
                (
                    f"spectrum, model and residuals of row {row}"
                    + (f" ({rid})" if rid else "")
                    + (f", {why}" if why else ""),
                    spectrum_with_model(
                        wave,
                        flux,
                        model,
                        stem,
                        err=err,
                        mask=mask,
                        title=title,
                        model_label="best-fit model",
                        windows=windows,
                        window_width=window_width,
                    ),
                )
            )


def _model_function(res, res_path, emu, emu_path, wave):
    """``f(row, err) -> (model, valid, err, note)`` computing the best-fit model of a
    results row with the emulator (:func:`payne_lite.catalog.model_from_results`:
    the instrument and continuum recorded in the table), and the errors the fit
    used."""
    from ..catalog import model_from_results
    from ..observe import Instrument, emulator_error_on

    names = list(res.meta.get("label_names") or emu.label_names)
    if tuple(names) != tuple(emu.label_names):
        raise ValueError(
            f"{emu_path} has the labels {list(emu.label_names)}, "
            f"{res_path} was fitted with {names}: not its emulator"
        )
    need = [*emu.label_names, "rv"]
    missing = [c for c in need if c not in res.colnames]
    if missing:
        raise ValueError(f"{res_path}: missing columns {missing} for the model")
    cont_deg = int(res.meta.get("cont_deg", 0) or 0)
    cont = [f"cont_{k}" for k in range(cont_deg + 1)] if cont_deg > 0 else []
    if any(c not in res.colnames for c in cont):
        raise ValueError(
            f"{res_path}: cont_deg {cont_deg} but columns "
            f"{[c for c in cont if c not in res.colnames]} are missing"
        )
    rv_all = _values(res, "rv", res_path)
    wave_vac = Instrument.from_meta(res.meta.get("instrument")).vacuum_wavelength(wave)
    add_emu_err = bool(res.meta.get("emulator_error_in_likelihood")) and (
        emu.pixel_error is not None
    )

    def model_fn(row, err):
        labels = np.array([_values(res, c, res_path)[row] for c in emu.label_names])
        rv = rv_all[row]
        if not (np.all(np.isfinite(labels)) and np.isfinite(rv)):
            raise ValueError(
                f"row {row} of {res_path}: the fit failed (NaN labels), "
                "there is no model to draw"
            )
        model, valid = model_from_results(res, emu, wave, rows=[row])
        note = ""
        if add_emu_err:
            e_emu = emulator_error_on(wave_vac, emu.wavelength, emu.pixel_error, [rv])
            err = np.sqrt(err**2 + e_emu[0] ** 2)
            note = "; σ = flux error ⊕ emulator error, as in the fit"
        return model[0], valid[0], err, note

    return model_fn


def _row_title(res, row, rid, params, units, why) -> str:
    parts = []
    for p, u in zip(params, units, strict=True):
        v, e = float(res[p][row]), float(res[f"{p}_err"][row])
        parts.append(_value_text(p, v, e, u).replace(" ", "\u00a0"))  # no breaks
    head = f"row {row}" + (f" ({rid})" if rid else "") + (f", {why}" if why else "")
    tail = []
    if "chi2_red" in res.colnames:
        tail.append(f"χ²_red = {float(res['chi2_red'][row]):.3g}")
    if "flags" in res.colnames:
        tail.append(f"flags = {int(res['flags'][row])}")
    tail = [t.replace(" ", "\u00a0") for t in tail]
    return f"{head}: " + ", ".join(parts) + ("; " + ", ".join(tail) if tail else "")


def _emulator_figures(outdir, emu, path, written, skipped):
    if emu.history:
        opt = (emu.meta.get("config") or {}).get("optimizer")
        xlabel = {"lm": "Levenberg-Marquardt iteration", "adam": "epoch"}.get(opt)
        n_iter = max(len(np.ravel(v)) for v in emu.history.values())
        written.append(
            (
                f"emulator training and validation loss ({n_iter} "
                f"{'epochs' if opt == 'adam' else 'iterations'})",
                loss_curves(
                    emu.history,
                    outdir / "emulator_loss",
                    xlabel=xlabel,
                    title=f"emulator {path.name}",
                ),
            )
        )
    else:
        skipped.append(f"{path}: no training history, no loss curves")
    if emu.pixel_error is not None:
        written.append(
            (
                "emulator error per pixel on held-out spectra",
                pixel_error_plot(
                    emu.wavelength,
                    emu.pixel_error,
                    outdir / "emulator_pixel_error",
                    title=f"emulator {path.name}: {emu!r}",
                ),
            )
        )
    else:
        skipped.append(f"{path}: no pixel_error (held-out error), no error figure")
