"""Figures from saved files (``payne-lite plot``): :func:`figures_from_files` and the
figures it makes of results, truth tables, catalogs, emulator, MDN and samples files."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from .._validate import existing_file
from ._fits import WINDOW_WIDTH, coverage_plot, fit_vs_truth, spectrum_with_model
from ._posterior import corner_plot, prior_posterior_plot, trace_plot
from ._style import value_text
from ._training import loss_curves, pixel_error_plot
from ._validation import validation_report_plot


# ======================================================================================
# figures from saved files (payne-lite plot)
# ======================================================================================
class Figures(NamedTuple):
    """What :func:`figures_from_files` did.

    Attributes:
        written: ``(description, [png, pdf])`` per figure.
        skipped: why a figure that the inputs suggest was not made.
    """

    written: list
    skipped: list


def figures_from_files(
    outdir,
    *,
    results=None,
    truth=None,
    spectra=None,
    emulator=None,
    mdn=None,
    rows=None,
    windows="auto",
    window_width: float = WINDOW_WIDTH,
) -> Figures:
    """Make every figure that the given saved files allow (``payne-lite plot``).

    ====================================  ===============================================
    given                                 figures (in ``outdir``)
    ====================================  ===============================================
    results + truth                       ``fit_vs_truth``; ``fit_coverage`` (the fit's
                                          ``<name>_err``); ``mdn_coverage`` when the
                                          results have ``<name>_mdn`` and
                                          ``<name>_mdn_sigma`` columns
    results + spectra (+ emulator)        ``spectrum_row<N>`` for the chosen rows: data,
                                          best-fit model (the ``model_flux`` column, or
                                          recomputed with the emulator), residuals
    emulator                              ``emulator_loss`` (its training history),
                                          ``emulator_pixel_error`` (its held-out error)
    mdn                                   ``mdn_loss`` (its training history)
    samples (in the place of results)     per star (``rows``, default the first 3 with
                                          samples): ``trace_star<N>`` (emcee, nuts),
                                          ``prior_posterior_star<N>``,
                                          ``corner_star<N>`` (mdn-is: resampled by
                                          weight); the file from
                                          ``payne_lite.sample(samples_path=...)``
    ====================================  ===============================================

    Args:
        outdir: folder for the figures (created; existing figures are replaced).
        results: a results table (FITS, ECSV or HDF5 from ``payne-lite fit`` /
            :func:`payne_lite.write_results`). An emulator or MDN file given here is
            plotted as if given as ``emulator`` / ``mdn``.
        truth: a table of true values (any of those formats, e.g. the demo's
            ``catalog_truth.ecsv``) with columns named like the fitted labels and
            ``rv``, on the rows of ``results`` in order, or matched by an ``id``
            column present in both.
        spectra: the catalog ``results`` was fitted from (an HDF5 catalog, or FITS
            paths; :func:`payne_lite.open_catalog`), one row per results row.
        emulator: an emulator file: models for ``spectra``, and its own figures.
        mdn: an MDN file.
        rows: results rows to draw spectra for (default: the one with the median
            and the one with the highest ``chi2_red``), or the stars of a samples
            file.
        windows, window_width: zoom windows, see :func:`spectrum_with_model`.

    Returns:
        :class:`Figures`.

    Raises:
        FileNotFoundError: a file that does not exist.
        ValueError: a combination that makes no figure, a table without the needed
            columns, tables whose rows do not match, rows out of range.
        payne_lite.FileFormatError: an unreadable or corrupt file.
    """
    outdir = Path(outdir)
    paths, spectra = _input_paths(results, truth, spectra, emulator, mdn, rows)
    res_path = paths.get("results")

    from ..catalog import read_results
    from ..emulator import Emulator

    written: list = []
    skipped: list = []
    emu = Emulator.load(paths["emulator"]) if "emulator" in paths else None
    if res_path is not None:
        res = read_results(res_path)
        params, units = _fit_params(res, res_path)
        if truth is not None:
            tru = _read_table(paths["truth"])
            _truth_figures(
                outdir,
                res,
                res_path,
                params,
                units,
                tru,
                paths["truth"],
                written,
                skipped,
            )
        if spectra is not None:
            _spectrum_figures(
                outdir,
                res,
                res_path,
                params,
                units,
                spectra,
                emu,
                paths.get("emulator"),
                rows,
                windows,
                window_width,
                written,
            )
    if "samples" in paths:
        _samples_figures(outdir, paths["samples"], rows, written, skipped)
    if emu is not None:
        _emulator_figures(outdir, emu, paths["emulator"], written, skipped)
    if "mdn" in paths:
        from ..mdn import MDN

        net = MDN.load(paths["mdn"])
        if net.history:
            written.append(
                (
                    f"MDN training and validation loss ({len(next(iter(net.history.values())))}"
                    " epochs)",
                    loss_curves(
                        net.history,
                        outdir / "mdn_loss",
                        xlabel="epoch",
                        title=f"MDN {paths['mdn'].name}: {net.n_components} "
                        f"component(s), outputs {', '.join(net.output_names)}",
                    ),
                )
            )
        else:
            skipped.append(f"{paths['mdn']}: no training history, no loss curves")
    if not written:
        raise ValueError("nothing to plot: " + "; ".join(skipped))
    return Figures(written, skipped)


def _input_paths(results, truth, spectra, emulator, mdn, rows):
    """The files :func:`figures_from_files` was given, checked and sorted by kind.

    Returns:
        ``(paths, spectra)``: kind (``results``, ``truth``, ``emulator``, ``mdn``,
        ``samples``) -> existing path, an emulator, MDN or samples file given as
        ``results`` moved to its kind; the spectra files as a list (or None).

    Raises:
        FileNotFoundError, ValueError: as :func:`figures_from_files`.
    """
    from ..emulator import EMULATOR_FORMAT
    from ..mdn import MDN_FORMAT
    from ..posterior import SAMPLES_FORMAT

    paths = {}
    for key, val in [
        ("results", results),
        ("truth", truth),
        ("emulator", emulator),
        ("mdn", mdn),
    ]:
        if val is not None:
            paths[key] = existing_file(val)
    if spectra is not None:
        spectra = (
            [existing_file(spectra)]
            if isinstance(spectra, str | Path)
            else [existing_file(p) for p in spectra]
        )
    if "results" in paths:  # an emulator or MDN file where a results table goes
        fmt = _hdf5_format(paths["results"])
        for kind, known in [("emulator", EMULATOR_FORMAT), ("mdn", MDN_FORMAT)]:
            if fmt == known:
                if kind in paths or truth is not None or spectra is not None:
                    raise ValueError(
                        f"{paths['results']} is an {kind} file, not a results table"
                    )
                paths[kind] = paths.pop("results")
        if fmt == SAMPLES_FORMAT:
            if truth is not None or spectra is not None:
                raise ValueError(
                    f"{paths['results']} is a samples file: its figures "
                    "need no truth table or spectra"
                )
            paths["samples"] = paths.pop("results")
    res_path = paths.get("results")
    if res_path is None and not ({"emulator", "mdn", "samples"} & set(paths)):
        raise ValueError(
            "nothing to plot: give a results table, an emulator file or an MDN file"
        )
    if res_path is None and (truth is not None or spectra is not None):
        raise ValueError(
            "a truth table and spectra are compared with a results "
            "table: give the results table too"
        )
    if res_path is not None and truth is None and spectra is None:
        raise ValueError(
            f"{res_path}: a results table alone makes no figure; add the "
            "truth table (fit minus truth, calibration) or the spectra "
            "it was fitted from (spectra with their models)"
        )
    if rows is not None and spectra is None and "samples" not in paths:
        raise ValueError("rows choose the spectra to draw: give the spectra too")
    return paths, spectra


def _samples_figures(outdir, path, rows, written, skipped) -> None:
    """Trace, prior-posterior and corner figures of stars of a samples file."""
    from ..posterior import load_samples

    post, meta = load_samples(path)
    n_star = len(post.samples)
    have = [i for i in range(n_star) if post.samples[i].shape[0] >= 2]
    if rows is None:
        rows = have[:3]
    bad = [r for r in rows if r >= n_star]
    if bad:
        raise ValueError(f"{path}: rows {bad} out of range (it has {n_star} stars)")
    for i in rows:
        x = np.asarray(post.samples[i], float)
        method = post.method[i]
        if x.shape[0] < max(2, x.shape[1]):  # a corner plot needs n >= d
            skipped.append(f"{path}: star {i} has no samples ({method})")
            continue
        head = f"{path.name}, star {i}: {method}"
        c = post.n_chains[i] if post.n_chains is not None else 0
        if c > 0 and x.shape[0] % c == 0 and x.shape[0] // c >= 2:
            written.append(
                (
                    f"star {i}: traces of {c} chains ({method})",
                    trace_plot(
                        x.reshape(-1, c, x.shape[1]),
                        post.names,
                        outdir / f"trace_star{i}",
                        units=post.units,
                        title=f"{head}, traces",
                    ),
                )
            )
        else:
            skipped.append(f"{path}: star {i} ({method}) has no chains to trace")
        w = post.weights[i]
        if post.prior_lo is not None and post.prior_lo[i] is not None:
            written.append(
                (
                    f"star {i}: prior and posterior per parameter",
                    prior_posterior_plot(
                        x,
                        post.names,
                        outdir / f"prior_posterior_star{i}",
                        prior_lo=post.prior_lo[i],
                        prior_hi=post.prior_hi[i],
                        prior_mu=post.prior_mu[i],
                        prior_sd=post.prior_sd[i],
                        weights=w,
                        units=post.units,
                        title=f"{head}, prior {meta.get('prior', '?')}",
                    ),
                )
            )
        else:
            skipped.append(f"{path}: star {i} has no prior stored")
        written.append(
            (
                f"star {i}: corner plot ({method})",
                corner_plot(
                    x,
                    post.names,
                    outdir / f"corner_star{i}",
                    units=post.units,
                    weights=w,
                    title=head,
                ),
            )
        )


def _hdf5_format(path: Path) -> str | None:
    """The ``format`` attribute of an HDF5 file, or None (not HDF5, no attribute)."""
    import h5py

    from .. import _h5

    if _h5.looks_stamped(path):
        _h5.check_stamp(path)  # before libhdf5 reads a byte of it
    elif not h5py.is_hdf5(path):
        return None
    try:
        with h5py.File(path, "r") as f:
            fmt = f.attrs.get("format")
    except (OSError, KeyError, RuntimeError):
        return None
    return fmt.decode() if isinstance(fmt, bytes) else fmt


def _read_table(path: Path):
    """A table in any format :func:`payne_lite.read_results` or astropy reads."""
    from astropy.table import Table

    from .. import _h5
    from ..catalog import FORMATS, HDF5_PATH, read_results

    fmt = FORMATS.get(path.suffix.lower())
    if fmt == "hdf5":
        import h5py

        _h5.check_stamp(path)  # before libhdf5 reads a byte of it

        with h5py.File(path, "r") as f:
            has_results = HDF5_PATH in f
        if not has_results:
            return Table.read(path)
    if fmt is not None:
        return read_results(path)
    try:
        return Table.read(path)
    except Exception as err:  # astropy raises many kinds for unknown formats
        raise ValueError(f"{path}: not a table astropy can read ({err})") from err


def _values(table, name: str, path: Path) -> np.ndarray:
    """Column ``name`` as float64 with masked entries NaN."""
    try:
        return np.ma.filled(np.ma.masked_array(table[name], dtype=float), np.nan)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: column {name!r} is not numeric") from err


def _fit_params(res, path: Path) -> tuple[list[str], list[str]]:
    """Fitted parameters (labels, then rv) with their error columns, and units."""
    label_names = list(res.meta.get("label_names") or [])
    if label_names:
        names = [*label_names, "rv"]
        label_units = list(res.meta.get("label_units") or [""] * len(label_names))
        unit_of = dict(zip(names, [*label_units, "km/s"], strict=False))
    else:  # not written by payne_lite: every <name> with a <name>_err
        names = [
            c[:-4]
            for c in res.colnames
            if c.endswith("_err")
            and c[:-4] in res.colnames
            and not c.startswith("cont_")
        ]
        unit_of = {}
    params = [p for p in names if p in res.colnames and f"{p}_err" in res.colnames]
    if not params:
        raise ValueError(
            f"{path}: no fitted parameter columns (a <name> column with its "
            "<name>_err, e.g. Teff and Teff_err, as payne-lite fit writes); columns: "
            + ", ".join(res.colnames[:12])
            + (" ..." if len(res.colnames) > 12 else "")
        )
    units = []
    for p in params:
        u = unit_of.get(p)
        if u is None:
            col_unit = getattr(res[p], "unit", None)
            u = col_unit.to_string() if col_unit is not None else ""
        units.append(u)
    return params, units


def _truth_rows(res, res_path, tru, tru_path) -> np.ndarray:
    """Index into ``tru`` of each results row."""
    if "id" in res.colnames and "id" in tru.colnames:
        where = {str(v): i for i, v in enumerate(tru["id"])}
        ids = [str(v) for v in res["id"]]
        missing = [i for i in ids if i not in where]
        if missing:
            raise ValueError(
                f"{tru_path}: no row for id {missing[0]!r} of {res_path} "
                f"({len(missing)} of {len(ids)} ids missing)"
            )
        return np.array([where[i] for i in ids], dtype=int)
    if len(tru) != len(res):
        raise ValueError(
            f"{res_path} has {len(res)} rows and {tru_path} {len(tru)}: "
            "the truth table must hold the results' rows in order (or "
            "both need an id column)"
        )
    return np.arange(len(res))


def _truth_figures(
    outdir, res, res_path, params, units, tru, tru_path, written, skipped
):
    common = [j for j, p in enumerate(params) if p in tru.colnames]
    if not common:
        raise ValueError(
            f"{tru_path}: none of the fitted parameters ({', '.join(params)}) is a "
            "column; columns: "
            + ", ".join(tru.colnames[:12])
            + (" ..." if len(tru.colnames) > 12 else "")
        )
    idx = _truth_rows(res, res_path, tru, tru_path)
    names = [params[j] for j in common]
    unit = [units[j] for j in common]
    t = np.column_stack([_values(tru, p, tru_path)[idx] for p in names])
    f = np.column_stack([_values(res, p, res_path) for p in names])
    e = np.column_stack([_values(res, f"{p}_err", res_path) for p in names])
    snr = None
    for table, path, rows in [(tru, tru_path, idx), (res, res_path, slice(None))]:
        if "snr" in table.colnames:
            snr = _values(table, "snr", path)[rows]
            break
    flagged = (np.asarray(res["flags"]) != 0) if "flags" in res.colnames else None
    n = len(res)
    what = f"{res_path.name} against {tru_path.name}"
    written.append(
        (
            f"fit minus truth, {len(names)} parameters x {n} spectra",
            fit_vs_truth(
                t,
                f,
                e,
                names,
                unit,
                outdir / "fit_vs_truth",
                color=snr,
                color_label="S/N",
                flagged=flagged,
                title=what,
            ),
        )
    )
    scaled = (
        " (scaled by sqrt(chi2_red))"
        if res.meta.get("errors_scaled_by_chi2_red")
        else ""
    )
    written.append(
        (
            f"coverage of the fit errors, {len(names)} parameters",
            coverage_plot(
                t,
                f,
                e,
                names,
                outdir / "fit_coverage",
                title=f"calibration of the fit errors{scaled}: " + what,
            ),
        )
    )
    mdn_cols = [
        j
        for j, p in enumerate(names)
        if f"{p}_mdn" in res.colnames and f"{p}_mdn_sigma" in res.colnames
    ]
    if not mdn_cols:
        skipped.append(
            f"{res_path}: no <name>_mdn / <name>_mdn_sigma columns (fit "
            "without an MDN), no MDN calibration"
        )
        return
    m = np.column_stack([_values(res, f"{names[j]}_mdn", res_path) for j in mdn_cols])
    s = np.column_stack(
        [_values(res, f"{names[j]}_mdn_sigma", res_path) for j in mdn_cols]
    )
    written.append(
        (
            f"coverage of the MDN sigmas, {len(mdn_cols)} parameters",
            coverage_plot(
                t[:, mdn_cols],
                m,
                s,
                [names[j] for j in mdn_cols],
                outdir / "mdn_coverage",
                title=f"calibration of the MDN: {what}",
            ),
        )
    )


def _default_rows(res) -> list[tuple[int, str]]:
    if "chi2_red" not in res.colnames:
        return [(0, "first row")]
    c = np.asarray(res["chi2_red"], dtype=float)
    ok = np.flatnonzero(np.isfinite(c))
    if ok.size == 0:
        return [(0, "first row")]
    order = ok[np.argsort(c[ok], kind="stable")]
    med, worst = int(order[(order.size - 1) // 2]), int(order[-1])
    out = [(med, "median chi2_red")]
    if worst != med:
        out.append((worst, "highest chi2_red"))
    return out


def _spectrum_figures(
    outdir,
    res,
    res_path,
    params,
    units,
    spectra,
    emu,
    emu_path,
    rows,
    windows,
    window_width,
    written,
):
    from ..catalog import open_catalog

    if "visit_rows" in res.colnames:  # a joint fit of visits: a row per visit
        from ..fitting import per_visit

        res = per_visit(res)
        res = res[np.argsort(np.asarray(res["row"]), kind="stable")]  # catalog's
        if "chi2_visit" in res.colnames:  # the visit's own, at the joint fit
            res["chi2_red"] = np.asarray(res["chi2_visit"], float) / np.maximum(
                np.asarray(res["n_good_pixels_visit"], float), 1.0
            )
    n = len(res)
    if rows is None:
        chosen = _default_rows(res)
    else:
        chosen = []
        for r in rows:
            if isinstance(r, bool) or int(r) != r or not 0 <= r < n:
                raise ValueError(
                    f"row {r!r} is not one of the {n} rows (0..{n - 1}) of {res_path}"
                )
            chosen.append((int(r), ""))
    source = spectra[0] if len(spectra) == 1 else spectra
    with open_catalog(source) as cat:
        if len(cat) != n:
            raise ValueError(
                f"{cat.source} holds {len(cat)} spectra and {res_path} "
                f"{n} rows: give the catalog the results were fitted from"
            )
        if cat.per_row_wavelength:
            raise ValueError(
                f"{cat.source} has one wavelength grid per spectrum: spectrum "
                "figures are drawn for catalogs with one grid only (not yet for "
                "per-spectrum grids)"
            )
        wave = cat.wavelength
        has_model = (
            "model_flux" in res.colnames
            and np.shape(res["model_flux"])[1:] == wave.shape
        )
        if not has_model and emu is None:
            raise ValueError(
                f"{res_path} has no model_flux column: give the emulator "
                "to compute the best-fit models"
            )
        model_fn = (
            None if has_model else _model_function(res, res_path, emu, emu_path, wave)
        )
        for row, why in chosen:
            chunk = cat.read(row, row + 1)
            rid = None if chunk.ids is None else str(chunk.ids[0])
            if rid is not None and "id" in res.colnames and str(res["id"][row]) != rid:
                raise ValueError(
                    f"row {row}: catalog id {rid!r} but results id "
                    f"{str(res['id'][row])!r}: not the same spectra"
                )
            flux = np.asarray(chunk.flux[0], dtype=float)
            err = np.asarray(chunk.flux_err[0], dtype=float)
            mask = (
                np.zeros(wave.size, bool)
                if chunk.mask is None
                else np.asarray(chunk.mask[0], bool)
            )
            note = ""
            if has_model:
                model = np.asarray(res["model_flux"][row], dtype=float)
            else:
                model, valid, err, note = model_fn(row, err)
                model = np.where(valid, model, np.nan)  # no model off the grid
                mask = mask | ~valid
            title = _row_title(res, row, rid, params, units, why) + note
            stem = outdir / f"spectrum_row{row}"
            written.append(
                (
                    f"spectrum, model and residuals of row {row}"
                    + (f" ({rid})" if rid else "")
                    + (f", {why}" if why else ""),
                    spectrum_with_model(
                        wave,
                        flux,
                        model,
                        stem,
                        err=err,
                        mask=mask,
                        title=title,
                        model_label="best-fit model",
                        windows=windows,
                        window_width=window_width,
                    ),
                )
            )


def _model_function(res, res_path, emu, emu_path, wave):
    """``f(row, err) -> (model, valid, err, note)`` computing the best-fit model of a
    results row with the emulator (:func:`payne_lite.catalog.model_from_results`:
    the instrument and continuum recorded in the table), and the errors the fit
    used."""
    from ..catalog import model_from_results
    from ..observe import (
        ChipPolynomial,
        Instrument,
        continuum_names,
        emulator_error_on,
    )

    names = list(res.meta.get("label_names") or emu.label_names)
    if tuple(names) != tuple(emu.label_names):
        raise ValueError(
            f"{emu_path} has the labels {list(emu.label_names)}, "
            f"{res_path} was fitted with {names}: not its emulator"
        )
    need = [*emu.label_names, "rv"]
    missing = [c for c in need if c not in res.colnames]
    if missing:
        raise ValueError(f"{res_path}: missing columns {missing} for the model")
    cont_deg = ChipPolynomial.from_meta(res.meta)
    cont = list(continuum_names(cont_deg))
    if any(c not in res.colnames for c in cont):
        raise ValueError(
            f"{res_path}: continuum {cont_deg} but columns "
            f"{[c for c in cont if c not in res.colnames]} are missing"
        )
    rv_all = _values(res, "rv", res_path)
    wave_vac = Instrument.from_meta(res.meta.get("instrument")).vacuum_wavelength(wave)
    add_emu_err = bool(res.meta.get("emulator_error_in_likelihood")) and (
        emu.pixel_error is not None
    )

    def model_fn(row, err):
        labels = np.array([_values(res, c, res_path)[row] for c in emu.label_names])
        rv = rv_all[row]
        if not (np.all(np.isfinite(labels)) and np.isfinite(rv)):
            raise ValueError(
                f"row {row} of {res_path}: the fit failed (NaN labels), "
                "there is no model to draw"
            )
        model, valid = model_from_results(res, emu, wave, rows=[row])
        note = ""
        if add_emu_err:
            e_emu = emulator_error_on(wave_vac, emu.wavelength, emu.pixel_error, [rv])
            err = np.sqrt(err**2 + e_emu[0] ** 2)
            note = "; σ = flux error ⊕ emulator error, as in the fit"
        return model[0], valid[0], err, note

    return model_fn


def _row_title(res, row, rid, params, units, why) -> str:
    parts = []
    for p, u in zip(params, units, strict=True):
        v, e = float(res[p][row]), float(res[f"{p}_err"][row])
        parts.append(value_text(p, v, e, u).replace(" ", "\u00a0"))  # no breaks
    head = f"row {row}" + (f" ({rid})" if rid else "") + (f", {why}" if why else "")
    tail = []
    if "chi2_red" in res.colnames:
        tail.append(f"χ²_red = {float(res['chi2_red'][row]):.3g}")
    if "flags" in res.colnames:
        tail.append(f"flags = {int(res['flags'][row])}")
    tail = [t.replace(" ", "\u00a0") for t in tail]
    return f"{head}: " + ", ".join(parts) + ("; " + ", ".join(tail) if tail else "")


def _emulator_figures(outdir, emu, path, written, skipped):
    if emu.history:
        opt = (emu.meta.get("config") or {}).get("optimizer")
        xlabel = {"lm": "Levenberg-Marquardt iteration", "adam": "epoch"}.get(opt)
        n_iter = max(len(np.ravel(v)) for v in emu.history.values())
        written.append(
            (
                f"emulator training and validation loss ({n_iter} "
                f"{'epochs' if opt == 'adam' else 'iterations'})",
                loss_curves(
                    emu.history,
                    outdir / "emulator_loss",
                    xlabel=xlabel,
                    title=f"emulator {path.name}",
                ),
            )
        )
    else:
        skipped.append(f"{path}: no training history, no loss curves")
    if emu.report is not None:
        written.append(
            (
                "emulator held-out error across the label box (validation report)",
                validation_report_plot(
                    emu.report,
                    outdir / "emulator_validation",
                    title=f"emulator {path.name}",
                ),
            )
        )
    else:
        skipped.append(f"{path}: no validation report, no error across the box")
    if emu.pixel_error is not None:
        written.append(
            (
                "emulator error per pixel on held-out spectra",
                pixel_error_plot(
                    emu.wavelength,
                    emu.pixel_error,
                    outdir / "emulator_pixel_error",
                    title=f"emulator {path.name}: {emu!r}",
                ),
            )
        )
    else:
        skipped.append(f"{path}: no pixel_error (held-out error), no error figure")
