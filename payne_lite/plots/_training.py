"""Training figures: emulator error on held-out spectra
(:func:`emulator_error_histogram`, :func:`pixel_error_plot`) and training / validation
loss curves of an emulator or MDN (:func:`loss_curves`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._style import gap_breaks, pyplot, save_figure


# ======================================================================================
# emulator error
# ======================================================================================
def emulator_error_histogram(resid: np.ndarray, stem: Path) -> list[Path]:
    """Histogram of per-pixel emulator errors on held-out spectra.

    Args:
        resid: (n_spec, n_pix) emulator minus truth [normalised flux].
    """
    plt = pyplot()
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
    return save_figure(fig, stem)


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
    plt = pyplot()
    wave = np.asarray(wave, dtype=float)
    err = np.asarray(pixel_error, dtype=float)
    if wave.ndim != 1 or err.shape != wave.shape:
        raise ValueError(
            f"wave {wave.shape} and pixel_error {err.shape} must both be (P,)"
        )
    fig, (a, b) = plt.subplots(
        1, 2, figsize=(12, 3.8), width_ratios=[1.8, 1], layout="constrained"
    )
    w, e = gap_breaks(wave, np.where(err > 0, err, np.nan))
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
    return save_figure(fig, stem)


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
    plt = pyplot()
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
    return save_figure(fig, stem)
