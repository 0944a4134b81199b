"""The figure of an emulator's validation report: its held-out error across the
label box (:func:`validation_report_plot`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..emulator import POOR_FACTOR, ValidationReport
from ._style import pyplot, save_figure, unit_label


def validation_report_plot(
    report: ValidationReport, stem: Path, *, title: str = ""
) -> list[Path]:
    """An emulator's held-out error across its label box, from its report.

    A corner layout over the L labels: on the diagonal, each label's bins (median
    error of the held-out spectra in the bin, with the median's 1-sigma sampling
    noise; grey bars, right axis: training spectra per bin); below it, each pair of
    labels' 2-D bins coloured by median error (empty cells blank; ``*`` marks a cell
    above :data:`POOR_FACTOR` times the overall median: the QA bit uses the 1-D
    cells only); top right, the error against the distance to the box's nearest face and
    against the number of labels near an edge (the box's faces, edges, corners).
    Dashed: the median over all held-out spectra; dotted: :data:`POOR_FACTOR` times it.

    Args:
        report: a :class:`payne_lite.ValidationReport` (``Emulator.report`` or
            ``Emulator.validate(grid)``).
        stem: output path without suffix.
        title: figure title.
    """
    from matplotlib.colors import LogNorm

    if not isinstance(report, ValidationReport):
        raise TypeError(
            f"report must be a ValidationReport, got {type(report).__name__}"
        )
    plt = pyplot()
    n = len(report.label_names)
    size = max(2.1 * n, 6.0)
    fig, axes = plt.subplots(
        n, n, figsize=(size, size), layout="constrained", squeeze=False
    )
    med_all = report.median_error
    edges = report.bin_edges
    names = [
        f"{a}{unit_label(u)}"
        for a, u in zip(report.label_names, report.label_units, strict=True)
    ]
    t1 = report.label_bins()
    lab_poor, edge_poor, corner_poor = report.poor_cells()
    pos = report.spectrum_error[report.spectrum_error > 0]
    vmin = float(np.min(pos)) if pos.size else 1e-6
    vmax = max(float(np.nanmax(t1.median)), POOR_FACTOR * med_all, vmin * 10)
    norm = LogNorm(vmin=max(vmin, med_all / 10), vmax=vmax)
    mesh = None
    for i in range(n):
        for j in range(n):
            ax = axes[i, j]
            if i == j:
                _diagonal(ax, report, j, t1, lab_poor[j], edges[j], med_all)
            elif i > j:
                mesh = _pair(ax, report, i, j, edges, norm)
            else:
                ax.axis("off")
            if i == n - 1:
                ax.set_xlabel(names[j])
            if j == 0 and i > 0:
                ax.set_ylabel(names[i])
    axes[0, 0].set_ylabel("median |error|")
    if n >= 3:
        for ax, tab, poor, xlabel in (
            (axes[0, n - 1], report.edge_bins(), edge_poor, "distance to box face"),
            (axes[1, n - 1], report.corner_bins(), corner_poor, "labels near an edge"),
        ):
            ax.axis("on")
            _bars(ax, tab, poor, med_all, xlabel)
    if mesh is not None:
        fig.colorbar(
            mesh,
            ax=axes[1:, 0],
            location="left",
            label="median held-out |error| [flux]",
            shrink=0.8,
        )
    fig.suptitle(
        (title + "\n" if title else "")
        + f"held-out error across the label box ({report.n_spectra} spectra; error "
        f"of a spectrum = median |emulator - truth|; all: {med_all:.2e})",
        fontsize=10,
    )
    return save_figure(fig, stem)


def _diagonal(ax, report, j, table, poor, edges, med_all) -> None:
    centre = 0.5 * (edges[:-1] + edges[1:])
    width = np.diff(edges)
    if report.coverage is not None:
        twin = ax.twinx()
        twin.bar(centre, report.coverage[j], width=0.9 * width, color="0.88", zorder=0)
        twin.set_ylabel("training spectra", fontsize=7, color="0.5")
        twin.tick_params(labelsize=6, colors="0.5")
        ax.set_zorder(twin.get_zorder() + 1)
        ax.patch.set_visible(False)
    noise = np.nan_to_num(table.noise[j])
    ax.errorbar(centre, table.median[j], yerr=noise, fmt="o-", color="C0", ms=4)
    ax.plot(centre[poor], table.median[j][poor], "o", color="C3", ms=7, zorder=5)
    ax.axhline(med_all, color="k", ls="--", lw=0.8)
    ax.axhline(POOR_FACTOR * med_all, color="C3", ls=":", lw=0.8)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_yscale("log")
    ax.tick_params(labelsize=7)


def _pair(ax, report, i, j, edges, norm):
    t = report.pair_bins(i, j)
    med = np.ma.masked_invalid(t.median)
    mesh = ax.pcolormesh(edges[j], edges[i], med, norm=norm, cmap="viridis")
    limit = POOR_FACTOR * report.median_error
    cy = 0.5 * (edges[i][:-1] + edges[i][1:])
    cx = 0.5 * (edges[j][:-1] + edges[j][1:])
    for a in range(t.median.shape[0]):
        for b in range(t.median.shape[1]):
            if t.count[a, b] > 0 and t.median[a, b] > limit:
                ax.text(cx[b], cy[a], "*", ha="center", va="center", color="w")
    ax.tick_params(labelsize=7)
    return mesh


def _bars(ax, tab, poor, med_all, xlabel) -> None:
    x = np.arange(tab.median.size)
    colors = ["C3" if p else "C0" for p in poor]
    ax.bar(x, np.nan_to_num(tab.median), yerr=np.nan_to_num(tab.noise), color=colors)
    ax.axhline(med_all, color="k", ls="--", lw=0.8)
    ax.axhline(POOR_FACTOR * med_all, color="C3", ls=":", lw=0.8)
    ticks = [f"{a}\nn={int(c)}" for a, c in zip(tab.labels, tab.count, strict=True)]
    ax.set_xticks(x, ticks, fontsize=6, rotation=30)
    ax.set_xlabel(xlabel, fontsize=7)
    ax.tick_params(labelsize=7)
