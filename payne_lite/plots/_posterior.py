"""Posterior figures: :func:`corner_plot`, :func:`trace_plot` and
:func:`prior_posterior_plot`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ._style import median_text, pyplot, save_figure, unit_label, unit_suffix

#: 2-D credible levels of the corner plot's contours: 1 and 2 sigma of a 2-D Gaussian.
CORNER_LEVELS = (1.0 - math.exp(-0.5), 1.0 - math.exp(-2.0))


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
    weights=None,
    bins: int = 30,
    title: str = "",
) -> list[Path]:
    """Corner plot of posterior samples, drawn by ``corner`` (Foreman-Mackey 2016).

    The diagonal shows each parameter's histogram with its median and 16th / 84th
    percentiles (dashed; given above the panel as median +upper -lower); below it,
    ``corner``'s 2-D histograms of each pair (points, density, smoothed by 0.8 bins)
    with contours enclosing 39.3 % and 86.5 % of the samples (``CORNER_LEVELS``: the
    1 and 2 sigma regions of a 2-D Gaussian). The axis ranges span the 0.5-99.5th
    percentiles, widened to show ``truths`` and ``best``.

    Args:
        samples: (n, d) posterior samples (for example an emcee chain, flattened),
            n >= d.
        names: d parameter names; units: optional d units (axis labels).
        truths: optional (d,) true values (blue lines and squares).
        best: optional (d,) best-fit point (red dotted lines and star).
        weights: optional (n,) sample weights (importance sampling), else equal.
        bins: histogram bins per axis.
        title: figure title.

    Raises:
        ValueError: shapes that do not fit, fewer than 2 samples (or fewer than d),
            non-finite samples or weights.
    """
    import corner
    from matplotlib.ticker import ScalarFormatter

    plt = pyplot()
    x = _check_samples(samples)
    n, d = x.shape
    if n < d:  # corner refuses (an assert) fewer samples than dimensions
        raise ValueError(f"samples must be (n, d) with n >= d, got shape {x.shape}")
    units = _check_names(names, units, d)
    pts = {}
    for key, val in [("truths", truths), ("best", best)]:
        if val is not None:
            pts[key] = _vector(val, key, np.nan, d)
    w = None
    if weights is not None:
        w = np.asarray(weights, dtype=float)
        if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(f"weights must be (n,) = ({n},), finite, >= 0")
        if w.sum() <= 0:
            raise ValueError("weights are all 0")
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")

    ranges = []
    for j in range(d):
        lo, hi = corner.quantile(x[:, j], [0.005, 0.995], weights=w)
        extra = [v[j] for v in pts.values() if np.isfinite(v[j])]
        lo, hi = min([lo, *extra]), max([hi, *extra])
        pad = 0.05 * (hi - lo) if hi > lo else max(abs(lo) * 1e-3, 1e-3)
        ranges.append((lo - pad, hi + pad))
    labels = [f"{names[j]}{unit_label(units[j])}" for j in range(d)]
    size = min(max(2.1 * d + 0.6, 5.6), 15.0)  # room for the legend when d = 2
    fig = plt.figure(figsize=(size, size) if d > 1 else (5.0, 3.8))
    corner.corner(
        x, bins=bins, range=ranges, weights=w, labels=labels, fig=fig,
        quantiles=(0.16, 0.5, 0.84), levels=CORNER_LEVELS, smooth=0.8,
        truths=pts.get("truths"), truth_color="C0", max_n_ticks=3,
        label_kwargs=dict(fontsize=8), labelpad=0.05,
        pcolor_kwargs=dict(rasterized=True),  # a PDF of bins^2 squares is slow
    )  # fmt: skip
    axes = np.array(fig.axes).reshape(d, d)
    if "best" in pts:
        corner.overplot_lines(fig, pts["best"], color="C3", ls=":", lw=1)
        corner.overplot_points(fig, pts["best"][None], marker="*", color="C3", ms=7)
    for j in range(d):  # titles: median +up -down, rounded to the errors' digits
        q = corner.quantile(x[:, j], [0.16, 0.5, 0.84], weights=w)
        axes[j, j].set_title(
            f"{labels[j]}\n" + median_text(q[1], q[2] - q[1], q[1] - q[0]),
            fontsize=8,
        )
    for ax in axes.ravel():  # 5480 rather than 0.02 + 5.46e3
        for axis in (ax.xaxis, ax.yaxis):
            if isinstance(axis.get_major_formatter(), ScalarFormatter):
                axis.set_major_formatter(ScalarFormatter(useOffset=False))
        ax.tick_params(labelsize=7)
    _corner_legend(fig, axes, pts, f"{n} {'weighted ' * (w is not None)}samples", d)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, stem)


def _check_samples(samples) -> np.ndarray:
    """``samples`` as an (n, d) float array with n >= 2, d >= 1, all finite.

    Raises:
        ValueError: another shape, or non-finite values.
    """
    x = np.asarray(samples, dtype=float)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"samples must be (n, d) with n >= 2, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("samples hold non-finite values")
    return x


def _check_names(names, units, d: int) -> list:
    """The d units (``""`` each when None), after checking d names and units.

    Raises:
        ValueError: not d names or units.
    """
    units = [""] * d if units is None else list(units)
    if len(names) != d or len(units) != d:
        raise ValueError(
            f"{len(names)} names and {len(units)} units for {d} parameters"
        )
    return units


def _corner_legend(fig, axes, pts, head: str, d: int) -> None:
    """The corner plot's legend: in the empty upper-right triangle, or inside the
    one panel when d = 1."""
    from matplotlib.lines import Line2D

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
            title=head,
            title_fontsize=8,
        )
    else:
        axes[0, 0].legend(
            handles=handles,
            fontsize=7,
            loc="upper right",
            title=head,
            title_fontsize=7,
        )


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

    plt = pyplot()
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
    units = _check_names(names, units, d)
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
        ax.set_ylabel(f"{names[i]}{unit_label(units[i])}", fontsize=8)
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
    return save_figure(fig, stem)


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

    plt = pyplot()
    x = _check_samples(samples)
    n, d = x.shape
    w = np.full(n, 1.0 / n) if weights is None else np.asarray(weights, float)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be (n,) = ({n},), finite, >= 0, not all 0")
    w = w / w.sum()
    units = _check_names(names, units, d)
    lo = _vector(prior_lo, "prior_lo", np.nan, d)
    hi = _vector(prior_hi, "prior_hi", np.nan, d)
    if not np.all(np.isfinite(lo) & np.isfinite(hi) & (lo < hi)):
        raise ValueError("prior_lo and prior_hi must be finite with lo < hi")
    mu = _vector(prior_mu, "prior_mu", 0.0, d)
    sd = _vector(prior_sd, "prior_sd", np.inf, d)
    tr = None if truths is None else _vector(truths, "truths", np.nan, d)

    fig, axes = plt.subplots(
        d, 2, figsize=(9.0, 0.5 + 1.45 * d), squeeze=False, layout="constrained"
    )
    for j in range(d):
        left, right = axes[j]
        prior = (lo[j], hi[j], mu[j], sd[j])
        t = np.nan if tr is None else tr[j]
        _prior_support_panel(left, x[:, j], w, prior)
        q = _posterior_zoom_panel(right, x[:, j], w, prior, t, bins)
        right.set_title(
            f"{names[j]} = "
            + median_text(q[2], q[3] - q[2], q[2] - q[1])
            + unit_suffix(units[j]),
            fontsize=8,
        )
        for a in (left, right):
            if np.isfinite(t):
                a.axvline(t, color="C0", lw=1.1)
            a.tick_params(labelsize=7)
            a.set_yticks([])
            a.xaxis.set_major_locator(MaxNLocator(5))
            a.xaxis.set_major_formatter(ScalarFormatter(useOffset=False))
        left.set_ylabel(f"{names[j]}{unit_label(units[j])}", fontsize=8)
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
    return save_figure(fig, stem)


def _vector(val, key: str, default: float, d: int) -> np.ndarray:
    """``val`` as a (d,) float array, or ``default`` d times when None.

    Raises:
        ValueError: ``val`` is not (d,).
    """
    if val is None:
        return np.full(d, default)
    v = np.asarray(val, dtype=float)
    if v.shape != (d,):
        raise ValueError(f"{key} {v.shape} must be ({d},)")
    return v


def _prior_pdf(grid, lo, hi, mu, sd) -> np.ndarray:
    """Density of one parameter's prior on ``grid``: a Gaussian (mu, sd) truncated
    to [lo, hi] when sd is finite and > 0, else uniform on [lo, hi]."""
    from scipy.stats import truncnorm

    if np.isfinite(sd) and sd > 0:
        a, b = (lo - mu) / sd, (hi - mu) / sd
        return truncnorm.pdf(grid, a, b, loc=mu, scale=sd)
    return np.where((grid >= lo) & (grid <= hi), 1.0 / (hi - lo), 0.0)


def _prior_sd(lo, hi, mu, sd) -> float:
    """Standard deviation of the prior of :func:`_prior_pdf`."""
    from scipy.stats import truncnorm

    if np.isfinite(sd) and sd > 0:
        a, b = (lo - mu) / sd, (hi - mu) / sd
        return float(truncnorm.std(a, b, loc=mu, scale=sd))
    return (hi - lo) / math.sqrt(12.0)


def _prior_support_panel(ax, xj, w, prior) -> None:
    """Prior (grey band) and posterior (black steps) of one parameter on the prior's
    whole support, each scaled to its peak, with the ratio of their sds.

    Args:
        xj: (n,) samples; w: (n,) weights summing to 1.
        prior: ``(lo, hi, mu, sd)`` of the parameter's prior.
    """
    lo, hi = prior[0], prior[1]
    mean = float(w @ xj)
    post_sd = float(np.sqrt(max(w @ (xj - mean) ** 2, 0.0)))
    ratio = post_sd / _prior_sd(*prior)
    span = hi - lo
    grid = np.linspace(lo - 0.03 * span, hi + 0.03 * span, 600)
    pp = _prior_pdf(grid, *prior)
    ax.fill_between(grid, pp / pp.max(), color="0.82", lw=0)
    edges = np.linspace(lo, hi, 201)
    h, _ = np.histogram(xj, bins=edges, weights=w)
    ax.stairs(h / h.max(), edges, color="k", lw=0.9)
    ax.set_xlim(grid[0], grid[-1])
    ax.set_ylim(0, 1.35)
    ax.text(
        0.99 if mean < 0.5 * (lo + hi) else 0.01,
        0.95,
        f"sd posterior / prior = {ratio:.3g}",
        transform=ax.transAxes,
        fontsize=7,
        va="top",
        ha="right" if mean < 0.5 * (lo + hi) else "left",
    )


def _posterior_zoom_panel(ax, xj, w, prior, truth, bins) -> np.ndarray:
    """One parameter's posterior density zoomed on its 0.1-99.9th percentiles (and
    the truth), the region outside the prior's support shaded, the median and
    16th / 84th percentiles marked.

    Args:
        xj: (n,) samples; w: (n,) weights summing to 1.
        prior: ``(lo, hi, mu, sd)`` of the parameter's prior.
        truth: the true value, or NaN.
        bins: histogram bins.

    Returns:
        (5,) weighted 0.1, 16, 50, 84 and 99.9th percentiles.
    """
    lo, hi = prior[0], prior[1]
    q = _wquantiles(xj, w, [0.001, 0.16, 0.5, 0.84, 0.999])
    zlo, zhi = q[0], q[-1]
    if np.isfinite(truth):
        zlo, zhi = min(zlo, truth), max(zhi, truth)
    pad = 0.05 * (zhi - zlo) if zhi > zlo else max(abs(zlo) * 1e-3, 1e-3)
    zlo, zhi = zlo - pad, zhi + pad
    zedges = np.linspace(zlo, zhi, bins + 1)
    hz, _ = np.histogram(xj, bins=zedges, weights=w)
    hz = hz / (zedges[1] - zedges[0])  # density of the whole posterior
    ax.stairs(hz, zedges, color="k", lw=0.9, fill=False)
    if zlo < lo:
        ax.axvspan(zlo, lo, color="0.82", lw=0)
    if zhi > hi:
        ax.axvspan(hi, zhi, color="0.82", lw=0)
    for v, ls in zip(q[1:4], ("--", "-", "--"), strict=True):
        ax.axvline(v, color="k", ls=ls, lw=0.7)
    ax.set_xlim(zlo, zhi)
    ax.set_ylim(0, None)
    return q


def _wquantiles(x, w, q) -> np.ndarray:
    """Weighted quantiles of one sample (midpoint CDF, as posterior's)."""
    order = np.argsort(x)
    xs, ws = x[order], w[order]
    cdf = (np.cumsum(ws) - 0.5 * ws) / ws.sum()
    return np.interp(q, cdf, xs)
