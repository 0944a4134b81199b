"""Joint fits of the visits of each star of a catalog (``fit_catalog(..., group=)``).

A star's visits must be fitted in one call of :func:`payne_lite.fit`, so such a run is
chunked by stars, not by rows (:func:`star_chunks`): the stars in the order of their
first row, consecutive stars in one chunk until it holds ``chunk_size`` spectra (a star
with more visits has a chunk of its own). A chunk's rows need not be contiguous: they
are read in increasing catalog order (:meth:`Reader.read_rows`), so that the fit of a
chunk numbers its stars and their visits as a fit of the whole catalog would. Each
chunk's table is then made the catalog's: ``visit_rows`` become catalog rows and the
ids of the visits an ``id`` column (:func:`visit_table`, where the chunk is fitted),
and every chunk's visit columns are padded to the catalog's most visits
(:func:`pad_chunk`), so the chunk tables stack.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np

from ..fitting import pad_visits


class StarChunks(NamedTuple):
    """The chunks of a joint fit of a catalog's visits.

    Attributes:
        ids: (n,) the star of each catalog row.
        order: (n,) int64, the catalog rows star by star (stars in the order of
            their first row, each star's rows increasing).
        offsets: (n_stars + 1,) int64: star ``s``'s rows are
            ``order[offsets[s]:offsets[s + 1]]``.
        bounds: ``[(s0, s1), ...]``, the stars of each chunk.
        sha256: hex digest of ``ids`` (dtype, shape and values): the grouping, for
            the identity of a resumable run.
    """

    ids: np.ndarray
    order: np.ndarray
    offsets: np.ndarray
    bounds: list[tuple[int, int]]
    sha256: str

    @property
    def n_stars(self) -> int:
        return int(self.offsets.size - 1)

    @property
    def n_visits_max(self) -> int:
        """The most visits of any star (V of the stacked table)."""
        return int(np.diff(self.offsets).max())

    def rows(self, i: int) -> np.ndarray:
        """(m,) int64, the catalog rows of chunk ``i``, increasing."""
        s0, s1 = self.bounds[i]
        return np.sort(self.order[self.offsets[s0] : self.offsets[s1]])

    def n_rows(self, i: int) -> int:
        s0, s1 = self.bounds[i]
        return int(self.offsets[s1] - self.offsets[s0])

    def read(self, cat, i: int):
        """Chunk ``i`` of the reader ``cat``: a :class:`CatalogChunk` with ``rows``
        (catalog rows) and ``group`` (the star of each row) set."""
        rows = self.rows(i)
        return cat.read_rows(rows)._replace(group=self.ids[rows])


def _digest(ids: np.ndarray) -> str:
    a = np.ascontiguousarray(ids.astype(str) if ids.dtype == object else ids)
    h = hashlib.sha256(f"group {a.dtype.str} {a.shape};".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def star_chunks(group, n: int, chunk_size: int, *, where: str) -> StarChunks:
    """Plan the chunks of a joint fit of ``n`` catalog rows by their stars.

    Args:
        group: (n,) the star of each row (values ``numpy.unique`` can sort).
        n: catalog rows.
        chunk_size: spectra per chunk (a star with more visits has a chunk of its
            own).
        where: the catalog, for messages.

    Raises:
        ValueError: ``group`` not (n,), or identifiers that cannot be sorted.
    """
    ids = np.asarray(group)
    if ids.shape != (n,):
        raise ValueError(
            f"group {ids.shape} must be ({n},): one star id per row of {where}"
        )
    try:
        _, first, inv = np.unique(ids, return_index=True, return_inverse=True)
    except TypeError as err:
        raise ValueError(f"group: identifiers that cannot be sorted ({err})") from err
    rank = np.empty(first.size, np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    star = rank[np.asarray(inv).reshape(-1)]
    order = np.argsort(star, kind="stable")
    counts = np.bincount(star, minlength=first.size)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    bounds, s0 = [], 0
    for s in range(1, first.size + 1):
        if s == first.size or offsets[s + 1] - offsets[s0] > chunk_size:
            bounds.append((s0, s))
            s0 = s
    return StarChunks(ids, order, offsets, bounds, _digest(ids))


def check_star_grids(stars: StarChunks, grid_of: np.ndarray, where: str) -> None:
    """Refuse, before any fit, a star whose visits are on more than one of a
    catalog's distinct wavelength grids (``grid_of`` (n,) int: each row's), as
    :func:`payne_lite.fit` would refuse it in its chunk."""
    g = np.asarray(grid_of)[stars.order]
    star = np.repeat(np.arange(stars.n_stars), np.diff(stars.offsets))
    first = g[stars.offsets[:-1]]
    bad = np.flatnonzero(g != first[star])
    if bad.size:
        s = int(star[bad[0]])
        rows = stars.order[stars.offsets[s] : stars.offsets[s + 1]]
        n_grids = np.unique(np.asarray(grid_of)[rows]).size
        raise ValueError(
            f"{where}: group: the visits of star {stars.ids[rows[:1]].tolist()[0]!r} "
            f"(rows {', '.join(map(str, rows[:4]))}{', ...' if rows.size > 4 else ''})"
            f" are on {n_grids} different wavelength grids; resample them onto one "
            "grid"
        )


def visit_table(table, chunk):
    """The table of a joint fit of ``chunk``'s rows made the catalog's: ``visit_rows``
    the catalog rows of each visit (-1 = none) and, when the chunk has ids, an ``id``
    column first, (n_star, V) str, the id of each visit ('' = none)."""
    vr = np.asarray(table["visit_rows"])
    real = vr >= 0
    col = table["visit_rows"]
    table["visit_rows"] = np.where(real, chunk.rows[np.maximum(vr, 0)], -1)
    table["visit_rows"].description = col.description or "catalog row of each visit"
    if chunk.ids is not None:
        ids = np.where(real, chunk.ids[np.maximum(vr, 0)], "")
        table.add_column(ids, name="id", index=0)
        table["id"].description = "id of each visit ('' after a star's last visit)"
    return table


def pad_chunk(table, n_visits: int):
    """``table`` (a chunk's, from :func:`visit_table`) padded to ``n_visits`` visits
    (:func:`payne_lite.fitting.pad_visits`; ``id`` with '')."""
    out = pad_visits(table, n_visits)
    if "id" in out.colnames and np.ndim(out["id"]) == 2:
        ids = np.asarray(out["id"])
        extra = np.full((ids.shape[0], n_visits - ids.shape[1]), "", ids.dtype)
        col = out["id"]
        out["id"] = np.concatenate([ids, extra], axis=1)
        out["id"].description = col.description
    return out
