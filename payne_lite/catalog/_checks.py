"""Predictive checks of a fitted catalog, chunk by chunk: :func:`check_catalog`.

A catalog's fits do not keep their model spectra (20,000 APOGEE models are 1.2 GB
in float64), so the checks that need them rebuild them a chunk at a time from the
results table (:func:`payne_lite.catalog.model_from_results`: the instrument and
continuum the fit recorded) beside the catalog's spectra:

* :func:`payne_lite.companion_search` on every spectrum (``companion_depth``,
  ``companion_dv``, ``companion_nsigma`` columns, QA bit 10: a double-lined
  binary);
* :func:`payne_lite.pixel_residuals` gathered over the catalog
  (:meth:`~payne_lite.fitting.PixelResiduals.merge`), whose
  :meth:`~payne_lite.fitting.PixelResiduals.propose_mask` is the data-driven mask
  for the next fit.

The residuals are in units of the errors the fit weighted them by: the flux errors,
and, where the fit added it (``meta["emulator_error_in_likelihood"]``), the
emulator's per-pixel error at each star's rv. ``payne-lite check`` runs it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from astropy.table import Table

from ..fitting import (
    Companion,
    PixelResiduals,
    companion_search,
    per_visit,
    pixel_residuals,
)
from ..observe import Instrument, emulator_error_on
from ._apogee import DEFAULT_CHUNK_SIZE, chunk_bounds
from ._readers import open_catalog
from ._results import model_from_results, read_results


class CatalogChecks(NamedTuple):
    """What :func:`check_catalog` found.

    Attributes:
        table: a copy of the results with the companion columns and QA bit 10.
        companion: the :class:`~payne_lite.fitting.Companion` of every row.
        residuals: per-pixel residual statistics over the catalog (its
            ``propose_mask()`` is the data-driven mask).
    """

    table: Table
    companion: Companion
    residuals: PixelResiduals


def check_catalog(
    results, catalog, emulator, *, mask=None, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> CatalogChecks:
    """Predictive checks of the fits ``results`` of the spectra ``catalog``.

    Args:
        results: the results table of ``catalog`` (``pl.fit`` / ``payne-lite fit``,
            one row per spectrum in order; or a joint fit of its visits,
            ``group=`` / ``--group``, one row per star: each visit is checked
            against the joint model at its own rv and continuum,
            :func:`payne_lite.fitting.per_visit`), or the path of one.
        catalog: the catalog it was fitted from (a path, or what
            :func:`payne_lite.open_catalog` takes), one wavelength grid for all.
        emulator: the emulator of the fit (an :class:`payne_lite.Emulator` or a
            path).
        mask: optional (P,) bool, True = pixels the fit left out (the catalog's
            own mask is added).
        chunk_size: spectra rebuilt and checked at a time.

    Returns:
        :class:`CatalogChecks`; for a joint fit the companion columns are
        (n_star, V), a visit each, and bit 10 is set where any visit has one.

    Raises:
        ValueError: another number of rows (visits) or other ids than the
            catalog's, a catalog with one grid per spectrum, another emulator's
            labels.
    """
    from ..emulator import Emulator

    table = read_results(results) if not isinstance(results, Table) else results
    emu = emulator if isinstance(emulator, Emulator) else Emulator.load(emulator)
    group = "visit_rows" in table.colnames
    # one row per spectrum: the table itself, or a joint fit's visits
    spectra = per_visit(table) if group else table
    cat_rows = np.asarray(spectra["row"]) if group else np.arange(len(table))
    m = len(spectra)
    depth, dv, nsig = np.full(m, np.nan), np.full(m, np.nan), np.full(m, np.nan)
    parts = []
    with open_catalog(catalog) as cat:
        n = len(cat)
        if group and not np.array_equal(np.sort(cat_rows), np.arange(n)):
            raise ValueError(
                f"{cat.source} holds {n} spectra and the results {m} visits of rows "
                f"{int(cat_rows.min())}..{int(cat_rows.max())}: give the catalog "
                "the results were fitted from"
            )
        if not group and n != m:
            raise ValueError(
                f"{cat.source} holds {n} spectra and the results {m} rows: "
                "give the catalog the results were fitted from"
            )
        if cat.per_row_wavelength:
            raise ValueError(
                f"{cat.source} has one wavelength grid per spectrum: check_catalog "
                "needs one grid for all"
            )
        wave = np.asarray(cat.wavelength, np.float64)
        if mask is not None and np.shape(mask) != wave.shape:
            raise ValueError(f"mask {np.shape(mask)} must be {wave.shape}")
        add_emu = bool(table.meta.get("emulator_error_in_likelihood")) and (
            emu.pixel_error is not None
        )
        wave_vac = Instrument.from_meta(table.meta.get("instrument")).vacuum_wavelength(
            wave
        )
        order = np.argsort(cat_rows, kind="stable")  # the catalog read in its order
        for start, stop in chunk_bounds(m, chunk_size):
            sel = order[start:stop]
            if group:
                chunk = cat.read_rows(cat_rows[sel])
            else:
                chunk = cat.read(start, stop)
            sub = spectra[sel]
            if chunk.ids is not None and "id" in sub.colnames:
                bad = np.flatnonzero(
                    np.asarray(chunk.ids, str) != np.asarray(sub["id"], str)
                )
                if bad.size:
                    raise ValueError(
                        f"row {cat_rows[sel[bad[0]]]}: catalog id "
                        f"{chunk.ids[bad[0]]!r}, results id {sub['id'][bad[0]]!r}: "
                        "not the same spectra"
                    )
            model, valid = model_from_results(spectra, emu, wave, rows=sel)
            flux = np.asarray(chunk.flux, np.float64)
            err = np.asarray(chunk.flux_err, np.float64)
            if add_emu:
                rv = np.nan_to_num(np.asarray(sub["rv"], np.float64))
                e_emu = emulator_error_on(wave_vac, emu.wavelength, emu.pixel_error, rv)
                err = np.sqrt(err**2 + e_emu**2)
            skip = ~valid
            if chunk.mask is not None:
                skip |= np.asarray(chunk.mask, bool)
            if mask is not None:
                skip |= np.asarray(mask, bool)[None, :]
            fits = Table(
                {
                    "model_flux": np.where(valid, model, np.nan),
                    "flags": np.asarray(sub["flags"]),
                }
            )
            found = companion_search(flux, err, fits, wave, mask=skip)
            depth[sel], dv[sel], nsig[sel] = found.depth, found.dv, found.nsigma
            parts.append(pixel_residuals(flux, err, fits, mask=skip))
    if group:  # (n_star, V), NaN for padding visits
        shape = np.shape(table["visit_rows"])
        star, visit = np.asarray(spectra["star"]), np.asarray(spectra["visit"])
        grids = []
        for a in (depth, dv, nsig):
            g = np.full(shape, np.nan)
            g[star, visit] = a
            grids.append(g)
        depth, dv, nsig = grids
    companion = Companion(depth, dv, nsig)
    out = table.copy(copy_data=True)
    companion.add_to(out)
    return CatalogChecks(out, companion, PixelResiduals.merge(parts))
