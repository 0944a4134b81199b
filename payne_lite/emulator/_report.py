"""The validation report an emulator carries: where in its label box it is good.

:class:`ValidationReport` holds the emulator's errors on held-out spectra and what
made it (grid digest and provenance, training config, package version, time,
device). Its tables are derived from the stored arrays, so a report
read back from a file gives the same tables:

* ``labels`` (N, L) and ``spectrum_error`` (N,): each held-out spectrum's labels
  and its median ``|emulator - truth|`` over the usable pixels (the spectrum's
  error, in normalised flux);
* ``pixel_median``, ``pixel_p99`` (P,): per pixel, the median and 99th percentile
  of ``|emulator - truth|`` over the held-out spectra;
* ``coverage`` (L, B) and ``coverage_2d`` (L, L, B, B): counts of the *training*
  labels in each label bin (and pair of bins).

Tables (each cell: the median of ``spectrum_error`` over the held-out spectra that
fall in it, its count, and the sampling noise of that median):

* :meth:`ValidationReport.label_bins`: each label's box cut into ``B`` equal bins
  (:data:`REPORT_BINS`; labels outside the box count in the end bins);
* :meth:`ValidationReport.edge_bins`: by the distance of a spectrum's labels to the
  nearest face of the box, as a fraction of each label's range
  (:data:`EDGE_DISTANCES`);
* :meth:`ValidationReport.corner_bins`: by how many labels sit in the outer
  :data:`NEAR_EDGE` of their range (0, 1, 2, 3 or more: the box's faces, edges
  and corners);
* :meth:`ValidationReport.pair_bins`: 2-D, for a pair of labels.

"Poor" (:meth:`ValidationReport.poor`, QA bit 8 of the fitter): a cell of the
label, edge or corner tables with at least :data:`POOR_MIN_COUNT` held-out spectra
whose median error exceeds :data:`POOR_FACTOR` times the median over all held-out
spectra.

The sampling noise of a median of ``n`` values is taken from the order statistics
(distribution-free): half the spread between the sorted values of (0-based) index
``n/2 - sqrt(n)/2`` and ``n/2 + sqrt(n)/2``, rounded (the quantiles 0.5 -+
0.5/sqrt(n): the binomial 1-sigma interval of the median).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os

import numpy as np

from .. import _h5
from .._version import __version__
from ..errors import FileFormatError

#: Bins per label of the report's tables (equal fractions of the training box).
REPORT_BINS = 5
#: Edges of the edge-distance table: distance of the labels to the nearest face of
#: the box, in fractions of each label's range (0.5 is the centre).
EDGE_DISTANCES = (0.0, 0.05, 0.1, 0.2, 0.5)
#: A label "near an edge" for the corner table: in the outer 10 % of its range.
NEAR_EDGE = 0.1
#: A cell is poor when its median error exceeds this many times the overall median ...
POOR_FACTOR = 2.0
#: ... and it holds at least this many held-out spectra.
POOR_MIN_COUNT = 10


@dataclasses.dataclass(frozen=True)
class BinTable:
    """One table of a :class:`ValidationReport`: per cell the median error, count and
    the median's sampling noise.

    Attributes:
        median: (..., n_cells) median ``spectrum_error`` of the held-out spectra in
            each cell [normalised flux] (NaN for an empty cell).
        count: (..., n_cells) held-out spectra in each cell.
        noise: (..., n_cells) 1-sigma sampling noise of ``median`` (NaN for fewer
            than 4 spectra).
        labels: names of the cells along the last axis.
    """

    median: np.ndarray
    count: np.ndarray
    noise: np.ndarray
    labels: tuple[str, ...]


def median_and_noise(values) -> tuple[float, float]:
    """Median of ``values`` and its 1-sigma sampling noise from the order statistics
    (NaN, NaN for no values; noise NaN for fewer than 4)."""
    v = np.sort(np.asarray(values, np.float64))
    n = v.size
    if n == 0:
        return np.nan, np.nan
    med = float(np.median(v))
    if n < 4:
        return med, np.nan
    half = 0.5 * np.sqrt(n)
    lo = int(np.clip(np.rint(n / 2 - half), 0, n - 1))
    hi = int(np.clip(np.rint(n / 2 + half), 0, n - 1))
    return med, 0.5 * float(v[hi] - v[lo])


def _table(errors, cell, n_cells: int, names) -> BinTable:
    med = np.full(n_cells, np.nan)
    noise = np.full(n_cells, np.nan)
    count = np.bincount(cell, minlength=n_cells)[:n_cells]
    for c in range(n_cells):
        med[c], noise[c] = median_and_noise(errors[cell == c])
    return BinTable(med, count, noise, tuple(names))


@dataclasses.dataclass(frozen=True, eq=False)
class ValidationReport:
    """An emulator's errors on held-out spectra, and what made it.

    See the module docstring for the tables derived from these arrays.

    Attributes:
        label_names, label_units: L names and units.
        label_lo, label_hi: (L,) the emulator's training box (the bins cut it).
        labels: (N, L) held-out labels [physical units].
        spectrum_error: (N,) each held-out spectrum's median ``|emulator - truth|`` over
            its usable pixels [normalised flux].
        pixel_median, pixel_p99: (P,) per pixel, median and 99th percentile of
            ``|emulator - truth|`` over the held-out spectra [normalised flux].
        coverage: optional (L, B) training labels per bin (B = :data:`REPORT_BINS`).
        coverage_2d: optional (L, L, B, B) training labels per pair of bins.
        provenance: JSON-able dict: ``grid_sha256`` and ``grid_meta`` of the training
            grid, ``config``, ``payne_lite_version``, ``train_seconds``,
            ``devices``, ``held_out`` (where the held-out spectra came from),
            ``created`` (UTC).
    """

    label_names: tuple[str, ...]
    label_units: tuple[str, ...]
    label_lo: np.ndarray
    label_hi: np.ndarray
    labels: np.ndarray
    spectrum_error: np.ndarray
    pixel_median: np.ndarray
    pixel_p99: np.ndarray
    coverage: np.ndarray | None = None
    coverage_2d: np.ndarray | None = None
    provenance: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        names = tuple(str(n) for n in self.label_names)
        units = tuple(str(u) for u in self.label_units)
        n_lab = len(names)
        lo = np.asarray(self.label_lo, np.float64).reshape(-1)
        hi = np.asarray(self.label_hi, np.float64).reshape(-1)
        labels = np.asarray(self.labels, np.float64)
        err = np.asarray(self.spectrum_error, np.float64).reshape(-1)
        pmed = np.asarray(self.pixel_median, np.float64).reshape(-1)
        p99 = np.asarray(self.pixel_p99, np.float64).reshape(-1)
        if len(units) != n_lab or lo.shape != (n_lab,) or hi.shape != (n_lab,):
            raise ValueError(
                f"report: {n_lab} label names, {len(units)} units, box {lo.shape} "
                f"and {hi.shape} do not agree"
            )
        if not np.all(np.isfinite(lo) & np.isfinite(hi) & (hi > lo)):
            raise ValueError(f"report: bad label box {lo} .. {hi}")
        if labels.ndim != 2 or labels.shape[1] != n_lab or err.shape[0] != len(labels):
            raise ValueError(
                f"report: labels {labels.shape} and spectrum_error {err.shape} must "
                f"be (N, {n_lab}) and (N,)"
            )
        if pmed.shape != p99.shape:
            raise ValueError(
                f"report: pixel_median {pmed.shape} and pixel_p99 {p99.shape} differ"
            )
        for name, arr in (("labels", labels), ("spectrum_error", err),
                          ("pixel_median", pmed), ("pixel_p99", p99)):  # fmt: skip
            if not np.all(np.isfinite(arr)) or (name != "labels" and np.any(arr < 0)):
                raise ValueError(f"report: {name} has non-finite or negative values")
        cov = None if self.coverage is None else np.asarray(self.coverage, np.int64)
        cov2 = (
            None if self.coverage_2d is None else np.asarray(self.coverage_2d, np.int64)
        )
        b = REPORT_BINS
        if cov is not None and cov.shape != (n_lab, b):
            raise ValueError(f"report: coverage {cov.shape} is not ({n_lab}, {b})")
        for name, c in (("coverage", cov), ("coverage_2d", cov2)):
            if c is not None and np.any(c < 0):
                raise ValueError(f"report: {name} has negative counts")
        if cov2 is not None and cov2.shape != (n_lab, n_lab, b, b):
            raise ValueError(
                f"report: coverage_2d {cov2.shape} is not ({n_lab}, {n_lab}, {b}, {b})"
            )
        for name, val in [
            ("label_names", names),
            ("label_units", units),
            ("label_lo", lo),
            ("label_hi", hi),
            ("labels", labels),
            ("spectrum_error", err),
            ("pixel_median", pmed),
            ("pixel_p99", p99),
            ("coverage", cov),
            ("coverage_2d", cov2),
            ("provenance", dict(self.provenance)),
        ]:
            if isinstance(val, np.ndarray):
                val.setflags(write=False)
            object.__setattr__(self, name, val)

    def __repr__(self) -> str:
        n_poor = int(sum(int(c.sum()) for c in self.poor_cells()))
        return (
            f"ValidationReport({self.n_spectra} held-out spectra, "
            f"{len(self.label_names)} labels, {self.pixel_median.size} pixels, median "
            f"error {self.median_error:.2e}, {n_poor} poor cell(s))"
        )

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_errors(
        cls,
        abs_error,
        labels,
        *,
        label_names,
        label_units,
        label_lo,
        label_hi,
        train_labels=None,
        provenance: dict | None = None,
    ) -> ValidationReport:
        """A report from ``|emulator - truth|`` of held-out spectra.

        Args:
            abs_error: (N, P) ``|emulator - truth|`` [normalised flux]; NaN marks an
                unusable pixel (left out of that spectrum's and pixel's statistics).
            labels: (N, L) the held-out spectra's labels [physical units].
            label_names, label_units, label_lo, label_hi: the emulator's.
            train_labels: optional (M, L) training labels, for the coverage maps.
            provenance: JSON-able dict (see the class docstring).
        """
        e = np.asarray(abs_error, np.float32)
        labels = np.asarray(labels, np.float64)
        if e.ndim != 2 or labels.ndim != 2 or e.shape[0] != labels.shape[0]:
            raise ValueError(
                f"abs_error {e.shape} and labels {labels.shape} must be (N, P) and "
                "(N, L) for the same N"
            )
        if e.shape[0] < 1:
            raise ValueError("a validation report needs at least one held-out spectrum")
        bad = np.isnan(e)
        if bad.any():
            with np.errstate(all="ignore"):
                spec = np.nanmedian(np.where(bad.all(1, keepdims=True), 0.0, e), 1)
                pmed = np.nanmedian(np.where(bad.all(0, keepdims=True), 0.0, e), 0)
                p99 = np.nanpercentile(
                    np.where(bad.all(0, keepdims=True), 0.0, e), 99, 0
                )
        else:
            spec = np.median(e, 1)
            pmed = np.median(e, 0)
            p99 = np.percentile(e, 99, 0)
        cov = cov2 = None
        lo = np.asarray(label_lo, np.float64)
        hi = np.asarray(label_hi, np.float64)
        if train_labels is not None:
            cells = _bin_index(np.asarray(train_labels, np.float64), lo, hi)
            b, n_lab = REPORT_BINS, lo.size
            cov = np.stack([np.bincount(c, minlength=b) for c in cells.T])
            cov2 = np.zeros((n_lab, n_lab, b, b), np.int64)
            for i in range(n_lab):
                for j in range(n_lab):
                    np.add.at(cov2[i, j], (cells[:, i], cells[:, j]), 1)
        prov = {
            "payne_lite_version": __version__,
            "created": datetime.datetime.now(datetime.UTC).isoformat(
                timespec="seconds"
            ),
            **(provenance or {}),
        }
        return cls(
            label_names=label_names,
            label_units=label_units,
            label_lo=lo,
            label_hi=hi,
            labels=labels,
            spectrum_error=spec,
            pixel_median=pmed,
            pixel_p99=p99,
            coverage=cov,
            coverage_2d=cov2,
            provenance=json.loads(json.dumps(prov, default=str)),  # as in a file
        )

    # -- tables -----------------------------------------------------------------------
    @property
    def n_spectra(self) -> int:
        """Held-out spectra behind the report."""
        return int(self.spectrum_error.size)

    @property
    def median_error(self) -> float:
        """Median of ``spectrum_error`` over all held-out spectra [normalised flux]."""
        return float(np.median(self.spectrum_error))

    @property
    def bin_edges(self) -> np.ndarray:
        """(L, B + 1) edges of the label bins [physical units]."""
        f = np.linspace(0.0, 1.0, REPORT_BINS + 1)
        return (
            self.label_lo[:, None]
            + f[None, :] * (self.label_hi - self.label_lo)[:, None]
        )

    def label_bins(self) -> BinTable:
        """(L, B) table: each label's box cut into :data:`REPORT_BINS` equal bins."""
        cells = _bin_index(self.labels, self.label_lo, self.label_hi)
        rows = [
            _table(self.spectrum_error, cells[:, j], REPORT_BINS, _bin_names())
            for j in range(len(self.label_names))
        ]
        return BinTable(
            np.stack([r.median for r in rows]),
            np.stack([r.count for r in rows]),
            np.stack([r.noise for r in rows]),
            _bin_names(),
        )

    def edge_bins(self) -> BinTable:
        """Table by the labels' distance to the nearest face of the box (fraction of
        each label's range; :data:`EDGE_DISTANCES`)."""
        d = _edge_distance(self.labels, self.label_lo, self.label_hi)
        return _table(
            self.spectrum_error, _edge_cell(d), len(EDGE_DISTANCES) - 1, _edge_names()
        )

    def corner_bins(self) -> BinTable:
        """Table by the number of labels in the outer :data:`NEAR_EDGE` of their
        range: 0, 1, 2, 3 or more."""
        return _table(
            self.spectrum_error,
            _corner_cell(self.labels, self.label_lo, self.label_hi),
            4,
            ("0", "1", "2", ">=3"),
        )

    def pair_bins(self, i: int, j: int) -> BinTable:
        """(B, B) table of labels ``i`` (rows) and ``j`` (columns)."""
        cells = _bin_index(self.labels, self.label_lo, self.label_hi)
        flat = cells[:, i] * REPORT_BINS + cells[:, j]
        t = _table(self.spectrum_error, flat, REPORT_BINS**2, ())
        shape = (REPORT_BINS, REPORT_BINS)
        return BinTable(
            t.median.reshape(shape),
            t.count.reshape(shape),
            t.noise.reshape(shape),
            _bin_names(),
        )

    # -- the fitter's QA --------------------------------------------------------------
    def poor_cells(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks of the poor cells of the label (L, B), edge and corner tables (see
        the module docstring)."""
        limit = POOR_FACTOR * self.median_error

        def poor(t: BinTable) -> np.ndarray:
            with np.errstate(invalid="ignore"):
                return (t.count >= POOR_MIN_COUNT) & (t.median > limit)

        return poor(self.label_bins()), poor(self.edge_bins()), poor(self.corner_bins())

    def poor(self, labels) -> np.ndarray:
        """Whether labels (n, L) fall in a cell where the emulator is poor.

        Returns:
            (n,) bool; False for rows with a non-finite label.
        """
        x = np.asarray(labels, np.float64)
        x = x[None] if x.ndim == 1 else x
        if x.ndim != 2 or x.shape[1] != len(self.label_names):
            raise ValueError(
                f"labels {np.shape(labels)} must be (n, {len(self.label_names)})"
            )
        ok = np.all(np.isfinite(x), axis=1)
        x = np.where(ok[:, None], x, 0.5 * (self.label_lo + self.label_hi))
        lab, edge, corner = self.poor_cells()
        cells = _bin_index(x, self.label_lo, self.label_hi)
        out = np.any(lab[np.arange(x.shape[1])[None, :], cells], axis=1)
        out |= edge[_edge_cell(_edge_distance(x, self.label_lo, self.label_hi))]
        out |= corner[_corner_cell(x, self.label_lo, self.label_hi)]
        return out & ok

    # -- files --------------------------------------------------------------------------
    def write(self, group) -> None:
        """Write into an HDF5 group (see :mod:`payne_lite.emulator._file`)."""
        _h5.set_json_attr(group, "label_names", list(self.label_names))
        _h5.set_json_attr(group, "label_units", list(self.label_units))
        _h5.set_json_attr(group, "provenance", self.provenance)
        for name in ("label_lo", "label_hi", "labels", "spectrum_error"):
            _h5.write_dataset(group, name, getattr(self, name), compress=False)
        for name in ("pixel_median", "pixel_p99", "coverage", "coverage_2d"):
            if getattr(self, name) is not None:
                _h5.write_dataset(group, name, getattr(self, name))

    @classmethod
    def read(cls, group, path) -> ValidationReport:
        """Read what :meth:`write` wrote; FileFormatError naming ``path`` if broken."""
        kw = {
            name: _h5.read_dataset(group, name, path)
            for name in (
                "label_lo", "label_hi", "labels", "spectrum_error", "pixel_median",
                "pixel_p99",
            )
        }  # fmt: skip
        for name in ("coverage", "coverage_2d"):
            kw[name] = _h5.read_dataset(group, name, path) if name in group else None
        try:
            return cls(
                label_names=_h5.get_json_attr(group, "label_names", path),
                label_units=_h5.get_json_attr(group, "label_units", path),
                provenance=_h5.get_json_attr(group, "provenance", path),
                **kw,
            )
        except (ValueError, TypeError) as err:
            raise FileFormatError(
                f"{os.fspath(path)}: inconsistent validation report: {err}"
            ) from err


# --------------------------------------------------------------------------------------
# cells
# --------------------------------------------------------------------------------------
def _bin_names() -> tuple[str, ...]:
    f = np.linspace(0.0, 1.0, REPORT_BINS + 1)
    return tuple(f"{a:.2g}-{b:.2g}" for a, b in zip(f[:-1], f[1:], strict=True))


def _edge_names() -> tuple[str, ...]:
    d = EDGE_DISTANCES
    return tuple(f"{a:g}-{b:g}" for a, b in zip(d[:-1], d[1:], strict=True))


def _unit(labels, lo, hi) -> np.ndarray:
    """Labels as fractions of the box, (n, L) in [0, 1] inside it."""
    return (np.asarray(labels, np.float64) - lo) / (hi - lo)


def _bin_index(labels, lo, hi) -> np.ndarray:
    """(n, L) bin of each label, 0 .. B-1 (outside the box: the end bins)."""
    u = _unit(labels, lo, hi)
    return np.clip(np.floor(u * REPORT_BINS), 0, REPORT_BINS - 1).astype(np.int64)


def _edge_distance(labels, lo, hi) -> np.ndarray:
    """(n,) distance of each row's labels to the nearest face of the box, in
    fractions of the ranges (0 on a face or outside, 0.5 at the centre)."""
    u = np.clip(_unit(labels, lo, hi), 0.0, 1.0)
    return np.min(np.minimum(u, 1.0 - u), axis=1)


def _edge_cell(d) -> np.ndarray:
    edges = np.asarray(EDGE_DISTANCES)
    return np.clip(np.searchsorted(edges, d, side="right") - 1, 0, edges.size - 2)


def _corner_cell(labels, lo, hi) -> np.ndarray:
    u = np.clip(_unit(labels, lo, hi), 0.0, 1.0)
    near = np.minimum(u, 1.0 - u) < NEAR_EDGE
    return np.minimum(near.sum(axis=1), 3)
