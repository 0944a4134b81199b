"""Figures (matplotlib, Agg backend): each function writes ``<stem>.png`` and ``.pdf``."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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


def emulator_error_histogram(resid: np.ndarray, stem: Path) -> list[Path]:
    """Histogram of per-pixel emulator errors on held-out spectra.

    Args:
        resid: (n_spec, n_pix) emulator minus truth [normalised flux].
    """
    plt = _pyplot()
    pixel_mae = np.median(np.abs(resid), axis=0)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    lim = np.percentile(np.abs(resid), 99.9)
    a.hist(resid.ravel(), bins=200, range=(-lim, lim), color="C0")
    a.set_yscale("log")
    a.set_xlabel("emulator - truth [normalised flux]")
    a.set_ylabel("pixels x spectra")
    a.set_title("all held-out pixels")
    bins = np.logspace(
        np.log10(max(pixel_mae.min(), 1e-7)), np.log10(pixel_mae.max()), 60
    )
    b.hist(pixel_mae, bins=bins, color="C1")
    b.set_xscale("log")
    for q, ls in [(50, "-"), (99, "--")]:
        v = np.percentile(pixel_mae, q)
        b.axvline(v, color="k", ls=ls, label=f"{q}th percentile: {v:.1e}")
    b.set_xlabel("per-pixel median |emulator - truth|")
    b.set_ylabel("pixels")
    b.set_title("per pixel")
    b.legend(fontsize=8)
    return _save(fig, stem)


def spectrum_with_model(
    wave,
    flux,
    model,
    stem: Path,
    *,
    title: str = "",
    data_label: str = "data",
    model_label: str = "model",
    windows=((15200.0, 15350.0), (16150.0, 16300.0)),
) -> list[Path]:
    """A spectrum, a model of it and the residuals: the full range and zoomed windows.

    Args:
        wave: (P,) wavelength [Angstrom]; flux, model: (P,) normalised flux.
        windows: wavelength ranges [Angstrom] for the zoomed panels (those that overlap
            ``wave``).
    """
    plt = _pyplot()
    wave, flux, model = (np.asarray(a) for a in (wave, flux, model))
    wins = [(lo, hi) for lo, hi in windows if hi > wave[0] and lo < wave[-1]]
    ncol = 1 + len(wins)
    fig, axes = plt.subplots(
        2,
        ncol,
        figsize=(5 * ncol, 5),
        sharex="col",
        gridspec_kw={"height_ratios": [3, 1]},
        layout="constrained",
        squeeze=False,
    )
    ranges = [(wave[0], wave[-1])] + wins
    for c, (lo, hi) in enumerate(ranges):
        m = (wave >= lo) & (wave <= hi)
        top, bot = axes[0, c], axes[1, c]
        top.plot(wave[m], flux[m], color="k", lw=0.6, label=data_label)
        top.plot(wave[m], model[m], color="C3", lw=0.6, label=model_label)
        bot.plot(wave[m], model[m] - flux[m], color="C0", lw=0.5)
        bot.axhline(0, color="k", lw=0.5)
        bot.set_xlabel("vacuum wavelength [Å]")
        top.set_title("full range" if c == 0 else f"{lo:.0f}-{hi:.0f} Å", fontsize=9)
    axes[0, 0].set_ylabel("normalised flux")
    axes[1, 0].set_ylabel(f"{model_label} - {data_label}")
    axes[0, 0].legend(fontsize=8, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, stem)


def loss_curves(history: dict, stem: Path) -> list[Path]:
    """Training and validation loss curves from ``Emulator.history``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    it = np.arange(1, len(history["train_rms"]) + 1)
    ax.plot(it, history["train_rms"], label="training (median pixel RMS)")
    ax.plot(
        it, history["valid_rms"], label="validation, best so far (median pixel RMS)"
    )
    if "valid_mae" in history:
        ax.plot(it, history["valid_mae"], ls="--",
                label="validation, best so far (median pixel median |error|)")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("error [normalised flux]")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, stem)


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
) -> list[Path]:
    """Fit minus truth against truth, one panel per label (the one-to-one check).

    Args:
        truth, fit, err: (n, L) true values, fitted values and their 1-sigma errors.
        names, units: L label names and units (axis labels).
        color: optional (n,) values to colour the points by (for example S/N).
    """
    plt = _pyplot()
    n_lab = truth.shape[1]
    ncol = min(n_lab, 3)
    nrow = -(-n_lab // ncol)
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(4.2 * ncol, 3.3 * nrow), layout="constrained", squeeze=False
    )
    sc = None
    for j in range(n_lab):
        ax = axes.flat[j]
        d = fit[:, j] - truth[:, j]
        ok = np.isfinite(d)
        ax.errorbar(truth[ok, j], d[ok], yerr=err[ok, j], fmt="none", ecolor="0.75",
                    lw=0.6, zorder=1)
        sc = ax.scatter(truth[ok, j], d[ok], c=None if color is None else color[ok],
                        s=9, cmap="viridis", zorder=2)
        ax.axhline(0.0, color="k", lw=0.8)
        lo, hi = np.percentile(d[ok], [16, 84]) if ok.any() else (np.nan, np.nan)
        unit = f" [{units[j]}]" if units[j] else ""
        ax.set_title(f"{names[j]}: bias {np.median(d[ok]):.3g}, "
                     f"scatter {(hi - lo) / 2:.3g}", fontsize=9)
        ax.set_xlabel(f"true {names[j]}{unit}")
        ax.set_ylabel(f"fit - true{unit}")
    for ax in list(axes.flat)[n_lab:]:
        ax.set_visible(False)
    if color is not None and sc is not None:
        fig.colorbar(sc, ax=axes, label=color_label, shrink=0.8)
    return _save(fig, stem)
