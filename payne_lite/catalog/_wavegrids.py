"""Catalogs with one wavelength grid per spectrum: every grid checked before fitting.

:func:`payne_lite.fit_catalog` fits such a catalog chunk by chunk, each chunk with its
rows' grids (``fit(..., wavelength=chunk.wavelength)``, which fits the chunk grid by
grid). Before any chunk is fitted, :func:`scan_grids` reads the grids once, a slab of
rows at a time (never the whole catalog at once), and

* checks each distinct grid against the emulator as :func:`payne_lite.fit` would (it
  must overlap the emulator's range; with an MDN it must be the MDN's grid), naming
  the catalog row;
* warns once about a grid of the emulator's length that is not the emulator's grid;
* numbers the distinct grids catalog-wide, in the order of their first row: the
  results' ``grid_group`` (``fit`` numbers them per call, that is per chunk);
* digests every row for the identity of a resumable run.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np

from .._validate import warn_if_near_grid
from ..observe import fill_grid

#: Bytes of wavelength read at a time by :func:`scan_grids`.
SLAB_BYTES = 32 << 20


class CatalogGrids(NamedTuple):
    """The distinct wavelength grids of a catalog with one grid per spectrum.

    Attributes:
        group: (n,) int32, the catalog-wide index of each row's distinct grid (in the
            order of the grids' first rows).
        first_row: (G,) int64, the first row of each distinct grid.
        sha256: hex digest of every row's grid as stored.
    """

    group: np.ndarray
    first_row: np.ndarray
    sha256: str

    @property
    def n_grids(self) -> int:
        return int(self.first_row.size)


def _filled(raw: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    """(filled grids, missing) of rows ``start``.. as :func:`payne_lite.fit` fills them
    (:func:`payne_lite.observe.fill_grid`: NaN entries interpolated, then masked)."""
    filled = raw.copy()
    missing = ~np.isfinite(raw)
    for k in np.flatnonzero(missing.any(axis=1)):
        filled[k], missing[k] = fill_grid(raw[k], start + k)
    return filled, missing


def _check_grid(source, row, grid, missing, emulator, instrument, mdn, warn) -> bool:
    """Check one distinct grid (row ``row``) as fit will; returns True if it warned."""
    vac = grid
    if instrument is not None and instrument.air:
        vac = np.asarray(instrument.vacuum_wavelength(grid), np.float64)
    rest = np.asarray(emulator.wavelength, np.float64)
    w = vac[~missing]
    if w[-1] <= rest[0] or w[0] >= rest[-1]:
        raise ValueError(
            f"{source}: wavelength row {row}: grid [{w[0]:g}, {w[-1]:g}] A does not "
            f"overlap the emulator's [{rest[0]:g}, {rest[-1]:g}] A"
        )
    if mdn is not None:
        mdn.check_wavelength(vac, what=f"{source} row {row}'s")
        return False
    if warn and not missing.any():
        return warn_if_near_grid(
            vac,
            rest,
            name=f"{source}: wavelength row {row}",
            hint="write the catalog with the emulator's grid if they are on it",
        )
    return False


def scan_grids(cat, emulator, *, instrument=None, mdn=None) -> CatalogGrids:
    """Read, check and number the grids of ``cat`` (one grid per spectrum).

    Args:
        cat: an open reader with ``per_row_wavelength``.
        emulator: the emulator the catalog will be fitted with.
        instrument: the fit's :class:`payne_lite.Instrument` (``air`` grids are
            checked in vacuum), or None.
        mdn: the fit's MDN, or None.

    Returns:
        A :class:`CatalogGrids`.

    Raises:
        payne_lite.FileFormatError: a row with an invalid grid (from the reader).
        ValueError: a grid outside the emulator's range, or not the MDN's grid
            (naming the row).
    """
    n, n_pix = len(cat), cat.n_pix
    slab = max(1, SLAB_BYTES // (8 * n_pix))
    group = np.empty(n, np.int32)
    index: dict[bytes, int] = {}
    first: list[int] = []
    digest = hashlib.sha256(f"wavelength ({n}, {n_pix}) float64;".encode())
    warned = False
    for start in range(0, n, slab):
        stop = min(start + slab, n)
        raw = np.ascontiguousarray(cat.read_wavelength(start, stop), np.float64)
        digest.update(raw.tobytes())
        filled, missing = _filled(raw, start)
        # consecutive rows often share a grid: compared as arrays, not hashed
        same = np.zeros(stop - start, bool)
        same[1:] = np.all(filled[1:] == filled[:-1], axis=1)
        for k in range(stop - start):
            row = start + k
            if same[k]:
                group[row] = group[row - 1]
                continue
            key = hashlib.blake2b(filled[k].tobytes(), digest_size=20).digest()
            g = index.get(key)
            if g is None:
                g = index[key] = len(first)
                first.append(row)
                warned |= _check_grid(
                    cat.source,
                    row,
                    filled[k],
                    missing[k],
                    emulator,
                    instrument,
                    mdn,
                    warn=not warned,
                )
            group[row] = g
    return CatalogGrids(group, np.asarray(first, np.int64), digest.hexdigest())
