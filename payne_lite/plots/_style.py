"""Helpers shared by the figure modules: pyplot on the Agg backend, saving a figure as
PNG and PDF, axis-label and value formatting, and gaps of a wavelength grid."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

#: Pixels further apart than this many median steps are a gap (APOGEE's chip gaps):
#: lines are not drawn across it.
GAP_FACTOR = 3.0


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, stem: Path) -> list[Path]:
    """Write ``fig`` to ``<stem>.png`` (130 dpi) and ``<stem>.pdf``, creating the
    folder, and close it; returns ``[png, pdf]``."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(out[0], dpi=130)
    fig.savefig(out[1])
    pyplot().close(fig)
    return out


def unit_label(unit) -> str:
    """`` [unit]`` for an axis label, or ``""`` without a unit."""
    return f" [{unit}]" if unit else ""


def as_2d(a, name: str) -> np.ndarray:
    """``a`` as a float (n, d) array, (n,) becoming (n, 1).

    Raises:
        ValueError: ``a`` is neither (n,) nor (n, d) (named ``name``).
    """
    a = np.asarray(a, dtype=float)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be (n,) or (n, d), got shape {a.shape}")
    return a


def unit_suffix(unit) -> str:
    """`` unit`` after a value, or ``""`` without a unit."""
    return f" {unit}" if unit else ""


def max_n_locator(n: int):
    """A tick locator of at most ``n`` intervals."""
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(n)


def plain_formatter():
    """Tick labels without an offset (``15230`` rather than ``0 + 1.523e4``)."""
    from matplotlib.ticker import ScalarFormatter

    fmt = ScalarFormatter(useOffset=False)
    fmt.set_scientific(False)
    return fmt


def gap_breaks(wave, *ys):
    """``wave`` and ``ys`` with a NaN between pixels further apart than GAP_FACTOR
    median steps, so that plotted lines break at gaps of the grid."""
    at = np.flatnonzero(grid_gaps(wave)) + 1
    if at.size == 0:
        return (wave, *ys)
    return tuple(np.insert(np.asarray(a, float), at, np.nan) for a in (wave, *ys))


def grid_gaps(wave) -> np.ndarray:
    """(P - 1,) bool: True between pixels further apart than GAP_FACTOR median
    steps."""
    step = np.diff(wave)
    if step.size == 0:
        return np.zeros(0, bool)
    return step > GAP_FACTOR * np.median(step)


def _decimals(err: float) -> int:
    """Decimals that show two significant digits of ``err`` (3 if it is not > 0)."""
    if not (np.isfinite(err) and err > 0):
        return 3
    return max(1 - int(math.floor(math.log10(err))), 0)


def median_text(med, up, down) -> str:
    """``5500 +12 −11``, rounded to two significant digits of the smaller error."""
    nd = _decimals(min(abs(up), abs(down)))
    return f"{med:.{nd}f} +{up:.{nd}f} −{down:.{nd}f}"


def value_text(name, value, err, unit) -> str:
    """``Teff = 5825 ± 9.8 K``, the value rounded like its error."""
    if not np.isfinite(value):
        return f"{name} = nan"
    if err == 0:
        return f"{name} = {value:g}{unit_suffix(unit)} (fixed)"
    nd = _decimals(err)
    return f"{name} = {value:.{nd}f} ± {err:.{nd}f}{unit_suffix(unit)}"
