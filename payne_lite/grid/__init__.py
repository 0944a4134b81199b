"""payne_lite.grid: see the modules inside; public names re-exported here."""

from __future__ import annotations

from . import synth as synth
from ._grid import GRID_FORMAT as GRID_FORMAT
from ._grid import SpectralGrid as SpectralGrid

__all__ = [
    "GRID_FORMAT",
    "SpectralGrid",
    "synth",
]
