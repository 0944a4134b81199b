"""``payne-lite info``: what a payne_lite file (grid, emulator, MDN, catalog, predicted
spectra, results table) holds, as aligned ``key  text`` lines."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import h5py
import numpy as np

from .. import _h5
from ..catalog import CATALOG_FORMAT
from ..catalog import FORMATS as RESULTS_FORMATS
from ..constants import C_KMS
from ..emulator import EMULATOR_FORMAT, Emulator
from ..emulator._report import NEAR_EDGE, POOR_FACTOR, POOR_MIN_COUNT
from ..emulator._train_ckpt import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from ..errors import FileFormatError
from ..fitting import FLAG_BITS
from ..grid import GRID_FORMAT, SpectralGrid
from ..mdn import MDN_FORMAT
from ..posterior import SAMPLES_FORMAT
from ._common import (
    EXIT_OK,
    add_subcommand,
    checked_read,
    flag_name,
    human_size,
    require_file,
)
from ._predict import SPECTRA_FORMAT, SPECTRA_VERSION


def add_info(sub) -> None:
    p = add_subcommand(
        sub,
        "info",
        help="describe a grid, emulator, MDN, catalog, spectra or results file",
        description=(
            "Print what a payne_lite file holds: its kind and format\n"
            "version, labels and their box, the wavelength grid, and for\n"
            "emulators the network and a summary of its training."
        ),
        epilog="example:\n  payne-lite info emulator.h5",
    )
    p.add_argument(
        "file",
        metavar="FILE",
        help="a payne_lite .h5 file (grid, emulator, MDN, catalog or "
        "predicted spectra), a results table (.fits, .ecsv, .h5 from "
        "payne-lite fit), or a training .npz in The Payne's layout",
    )


def _file_format(path: Path) -> tuple[str, int]:
    _h5.check_stamp(path)  # before libhdf5 reads a byte of it
    try:
        with h5py.File(path, "r") as f:
            fmt = f.attrs.get("format")
            ver = f.attrs.get("format_version")
    except OSError as err:
        raise FileFormatError(
            f"{path}: not a readable HDF5 file (corrupt or truncated?): {err}"
        ) from err
    if isinstance(fmt, bytes):
        fmt = fmt.decode()
    known = (
        GRID_FORMAT, EMULATOR_FORMAT, SPECTRA_FORMAT, CATALOG_FORMAT, MDN_FORMAT,
        SAMPLES_FORMAT, CHECKPOINT_FORMAT,
    )  # fmt: skip
    if fmt not in known:
        raise FileFormatError(
            f"{path}: not a payne_lite file (format={fmt!r}); info "
            f"reads {', '.join(known)}"
        )
    return str(fmt), int(ver) if ver is not None else -1


def _is_results_hdf5(path: Path) -> bool:
    """An HDF5 file without a payne_lite format attribute holding an astropy table
    (how write_results stores results)."""
    try:
        _h5.check_stamp(path)
        with h5py.File(path, "r") as f:
            return "format" not in f.attrs and any(
                isinstance(f[k], h5py.Dataset) and f[k].dtype.names for k in f
            )
    except OSError:
        return False


def _is_foreign_hdf5(path: Path) -> bool:
    """An HDF5 file without payne_lite's checksum block or ``format`` attribute (a
    grid from another code, read by :meth:`SpectralGrid.from_file`)."""
    if _h5.looks_stamped(path):
        return False
    try:
        with h5py.File(path, "r") as f:
            return "format" not in f.attrs
    except OSError:
        return False  # not HDF5: _file_format names why


def _row(key: str, text: str) -> str:
    return f"  {key:<11} {text}"


def _label_rows(names, units, lo, hi, note: str) -> list[str]:
    """One line per label: name, range and unit, as a small table."""
    w = max(len(n) for n in names)
    lows = [f"{a:.6g}" for a in lo]
    highs = [f"{b:.6g}" for b in hi]
    wl, wh = max(map(len, lows)), max(map(len, highs))
    rows = [
        f"{n:<{w}}  {a:>{wl}} .. {b:<{wh}}  {u}".rstrip()
        for n, a, b, u in zip(names, lows, highs, units, strict=True)
    ]
    return [_row("labels" if i == 0 else "", r) for i, r in enumerate(rows)] + [
        _row("", f"({note})")
    ]


def _meta_rows(meta: dict, prefix: str = "meta.") -> list[str]:
    """One line per provenance entry."""
    if not meta:
        return []
    w = max(len(prefix + k) for k in meta)
    return [f"  {prefix + k:<{w}}  {_fmt_value(v, 100)}" for k, v in meta.items()]


def _wrapped_pairs(key: str, mapping: dict) -> list[str]:
    """``key  a=1; b=2; ...`` wrapped to 88 columns."""
    text = "; ".join(f"{k}={_fmt_value(v, 60)}" for k, v in mapping.items())
    return textwrap.wrap(
        text,
        88,
        initial_indent=_row(key, ""),
        subsequent_indent=" " * 14,
        break_long_words=False,
        break_on_hyphens=False,
    )


def _lines_grid(grid: SpectralGrid) -> list[str]:
    lo, hi = grid.label_box
    err = "none" if grid.flux_err is None else "yes"
    return [
        _row("spectra", str(grid.n_spec)),
        _row("wavelength", _fmt_wavelength(grid.wavelength)),
        *_label_rows(
            grid.label_names, grid.label_units, lo, hi, "range of the grid's labels"
        ),
        _row("flux", f"{grid.flux.min():.3g}..{grid.flux.max():.3g}; flux_err: {err}"),
        *_meta_rows(grid.meta),
    ]


def _lines_emulator(emu: Emulator) -> list[str]:
    n_par = sum(int(np.size(a)) for a in emu.net.weights + emu.net.biases)
    lines = [
        _row(
            "network",
            f"{emu.kind}, hidden {','.join(map(str, emu.hidden))}, "
            f"{emu.activation}, {emu.n_pix} pixels x {emu.n_labels} "
            f"labels, {n_par} parameters",
        ),
        _row("wavelength", _fmt_wavelength(emu.wavelength)),
        *_label_rows(
            emu.label_names,
            emu.label_units,
            emu.label_lo,
            emu.label_hi,
            "training box: predictions outside it extrapolate",
        ),
    ]
    m = emu.meta
    if "config" in m:
        cfg = m["config"]
        n_iter = len(emu.history.get("valid_rms", ()))
        lines.append(
            _row(
                "training",
                (
                    f"{cfg.get('optimizer')}, {n_iter} of {cfg.get('max_iter')} iterations "
                    f"in {m.get('train_seconds', math.nan):.1f} s ({m.get('dtype')}), "
                    f"{m.get('n_train')} training + {m.get('n_valid')} held-out spectra, "
                    f"{m.get('n_restarted_pixels', 0)} pixels restarted"
                ),
            )
        )
        med = m.get("valid_median_abs_error", math.nan)
        p99 = m.get("valid_p99_pixel_abs_error", math.nan)
        lines.append(
            _row(
                "held-out",
                f"median |error| {med:.2e}; 99th percentile over pixels {p99:.2e}",
            )
        )
    if emu.pixel_error is not None:
        k = int(np.argmax(emu.pixel_error))
        lines.append(
            _row(
                "pixel_error",
                (
                    f"held-out RMS per pixel: median {np.median(emu.pixel_error):.2e}, "
                    f"max {emu.pixel_error[k]:.2e} at {emu.wavelength[k]:.2f} A"
                ),
            )
        )
    if emu.error_basis is not None:
        basis = np.asarray(emu.error_basis, np.float64)
        lines.append(
            _row(
                "error_basis",
                (
                    f"{basis.shape[0]} principal components of the held-out errors "
                    f"(RMS {np.sqrt(np.mean(np.sum(basis**2, axis=0))):.2e}): the "
                    "fit's correlated emulator error"
                ),
            )
        )
    if emu.local_error is not None:
        loc = emu.local_error
        lines.append(
            _row(
                "local_error",
                (
                    f"{loc.n_held_out} held-out errors with their labels, the "
                    f"{loc.neighbours} nearest a star's labels its error covariance, "
                    f"shrunk {loc.shrink:g} toward the global one (estimator='gls' "
                    "and the samplers)"
                ),
            )
        )
    if emu.error_scale is not None:
        cal = m.get("error_scale", {})
        rms = cal.get("rms_z", {})
        rms_s = cal.get("rms_z_scaled", {})
        lines.append(
            _row(
                "error_scale",
                (
                    "the emulator term of each label's error scaled over the box, "
                    f"fitted on {cal.get('n_spectra', '?')} held-out spectra; RMS of "
                    "the emulator-induced shifts over that term: "
                    + ", ".join(
                        f"{k} {rms[k]:.2f} -> {rms_s.get(k, math.nan):.2f}" for k in rms
                    )
                ),
            )
        )
    lines += _lines_report(emu)
    if "config" in m:
        lines += _wrapped_pairs("config", m["config"])
    if m.get("grid_meta"):
        lines += _wrapped_pairs("grid", m["grid_meta"])
    shown = {
        "error_scale",
        "config",
        "grid_meta",
        "n_train",
        "n_valid",
        "train_seconds",
        "dtype",
        "valid_median_abs_error",
        "valid_p99_pixel_abs_error",
        "n_restarted_pixels",
    }
    lines += _meta_rows({k: v for k, v in m.items() if k not in shown})
    return lines


def _lines_report(emu: Emulator) -> list[str]:
    """The emulator's validation report: held-out errors by label bin, box edges
    and corners, the training labels' coverage and the provenance."""
    rep = emu.report
    if rep is None:
        return [
            _row(
                "validation",
                "no validation report in this file (an imported network or a file "
                "from before format v2); Emulator.validate(grid) makes one",
            )
        ]
    prov = rep.provenance
    k = int(np.argmax(rep.pixel_p99))
    out = [
        _row(
            "validation",
            f"{rep.n_spectra} held-out spectra: {prov.get('held_out', '?')}",
        ),
        _row(
            "",
            "error of a spectrum = its median |emulator - truth| over the pixels; "
            f"median over all {rep.median_error:.2e}",
        ),
        _row(
            "",
            f"per pixel, |error| over the spectra: median {np.median(rep.pixel_median):.2e}"
            f" and 99th percentile {np.median(rep.pixel_p99):.2e} (median over pixels;"
            f" worst 99th {rep.pixel_p99[k]:.2e} at {emu.wavelength[k]:.2f} A)",
        ),
        _row(
            "",
            "cells: median error (held-out spectra in the cell); * = poor: median > "
            f"{POOR_FACTOR:g} x {rep.median_error:.2e} with >= {POOR_MIN_COUNT} spectra",
        ),
    ]
    lab, edge, corner = rep.poor_cells()
    t = rep.label_bins()
    names = [
        f"{n} [{u}]" if u else n
        for n, u in zip(rep.label_names, rep.label_units, strict=True)
    ]
    w = max(len(n) for n in names + ["fraction of box"])
    cell = 15
    out.append(
        _row("by label", f"{'fraction of box':<{w}} "
             + "".join(f"{c:>{cell - 1}} " for c in t.labels).rstrip())
    )  # fmt: skip
    for j, name in enumerate(names):
        cells = [
            _cell(t.median[j, b], t.count[j, b], lab[j, b], cell)
            for b in range(t.median.shape[1])
        ]
        out.append(_row("", f"{name:<{w}} " + "".join(cells).rstrip()))
        if rep.coverage is not None:
            out.append(
                _row("", f"{'  trained on':<{w}} "
                     + "".join(f"{int(c):>{cell - 1}} " for c in rep.coverage[j]).rstrip())
            )  # fmt: skip
    for key, title, tab, poor in (
        ("box edge", "distance to the nearest face (fraction of range)", rep.edge_bins(), edge),
        ("corners", f"labels in the outer {NEAR_EDGE:g} of their range", rep.corner_bins(), corner),
    ):  # fmt: skip
        out.append(_row(key, title))
        out.append(
            _row(
                "",
                f"{'':<{w}} "
                + "".join(f"{c:>{cell - 1}} " for c in tab.labels).rstrip(),
            )
        )
        out.append(
            _row(
                "",
                f"{'':<{w}} "
                + "".join(
                    _cell(tab.median[c], tab.count[c], poor[c], cell)
                    for c in range(tab.median.size)
                ).rstrip(),
            )
        )
    sha = prov.get("grid_sha256")
    checked = prov.get("validated_grid_sha256")
    made = {
        "grid_sha256": f"{sha[:16]}..." if isinstance(sha, str) else None,
        "validated_on": f"{checked[:16]}..." if isinstance(checked, str) else None,
        "payne_lite": prov.get("payne_lite_version"),
        "created": prov.get("created"),
        "train_seconds": (
            round(prov["train_seconds"], 2)
            if isinstance(prov.get("train_seconds"), int | float)
            else None
        ),
        "devices": prov.get("devices"),
    }
    out += _wrapped_pairs("made by", {k: v for k, v in made.items() if v is not None})
    return out


def _cell(median: float, count: int, poor: bool, width: int) -> str:
    """``1.23e-03 (25)*`` right-aligned in ``width``; ``-`` for an empty cell."""
    if count == 0 or not np.isfinite(median):
        return f"{'- (0)':>{width}}"
    return f"{f'{median:.2e} ({int(count)})' + ('*' if poor else ' '):>{width}}"


def _lines_spectra(path: Path) -> list[str]:
    with _h5.open_checked(path, SPECTRA_FORMAT, (SPECTRA_VERSION,)) as f:
        wave = _h5.read_dataset(f, "wavelength", path)
        labels = _h5.read_dataset(f, "labels", path)
        flux = _h5.read_dataset(f, "flux", path)
        names = _h5.get_json_attr(f, "label_names", path)
        units = _h5.get_json_attr(f, "label_units", path)
        meta = _h5.get_json_attr(f, "meta", path)
    return [
        _row("spectra", str(flux.shape[0])),
        _row("wavelength", _fmt_wavelength(wave)),
        *_label_rows(
            names, units, labels.min(0), labels.max(0), "range of the spectra's labels"
        ),
        _row("flux", f"{flux.min():.3g}..{flux.max():.3g}"),
        *_meta_rows(meta),
    ]


def _lines_catalog(path: Path) -> list[str]:
    """Summary of a catalog file; reads the wavelength, not the spectra."""
    from ..catalog import HDF5Catalog

    with HDF5Catalog(path) as cat:
        n = len(cat)
        dtype = cat.read(0, 1).flux.dtype
        ids = "none"
        if cat.has_ids:
            first, last = cat.read(0, 1).ids[0], cat.read(n - 1, n).ids[0]
            ids = f"{str(first)!r} .. {str(last)!r}"
        return [
            _row(
                "spectra",
                f"{n} (flux and flux_err {dtype}; mask: "
                f"{'yes' if cat.has_mask else 'none'})",
            ),
            _row("wavelength", _catalog_wavelength(cat)),
            _row("ids", ids),
            _row("group", _catalog_group(cat)),
            _row(
                "checksums",
                "HDF5 metadata, Fletcher-32 on every numeric dataset, SHA-256 of "
                "ids and group (verified)"
                if cat.version >= 3
                else f"Fletcher-32 on the row datasets only (format version "
                f"{cat.version}, written before catalogs had checksums)",
            ),
            *_meta_rows(cat.meta),
        ]


def _catalog_group(cat) -> str:
    """The catalog's group ids (the star of each spectrum): how many stars, and the
    most visits of one."""
    group = cat.read_group()
    if group is None:
        return "none"
    _, counts = np.unique(group, return_counts=True)
    return (
        f"{counts.size} star{'' if counts.size == 1 else 's'} (up to "
        f"{int(counts.max())} visit{'' if counts.max() == 1 else 's'} each; "
        "payne-lite fit --group)"
    )


def _catalog_wavelength(cat) -> str:
    """A catalog's grid; with one grid per spectrum, the first row's (the others
    are not read: the catalog may be large)."""
    if not cat.per_row_wavelength:
        return _fmt_wavelength(cat.wavelength)
    row = cat.read_wavelength(0, 1)[0]
    finite = row[np.isfinite(row)]
    text = f"one grid per spectrum, {cat.n_pix} pixels; row 0: " + _fmt_wavelength(
        finite
    )
    if finite.size < row.size:
        text += f", {row.size - finite.size} missing (NaN)"
    return text


def _lines_results(table) -> list[str]:
    """Summary of a fit results table (payne_lite.fit / fit_catalog)."""
    meta = table.meta
    n = len(table)
    labels = [c for c in table.colnames if f"{c}_err" in table.colnames]
    rows = [
        _row("fits", f"{n} (method {meta.get('method', '?')})"),
        _row(
            "parameters",
            ", ".join(
                f"{c} [{table[c].unit}]" if table[c].unit is not None else c
                for c in labels
            ),
        ),
    ]
    if n and "chi2_red" in table.colnames:
        chi2 = np.asarray(table["chi2_red"], float)
        conv = (
            np.asarray(table["converged"], bool)
            if "converged" in table.colnames
            else np.ones(n, bool)
        )
        rows.append(
            _row(
                "fit quality",
                f"{int(conv.sum())} converged, median "
                f"chi2_red {np.nanmedian(chi2):.3g}",
            )
        )
    if n and "flags" in table.colnames:
        flags = np.asarray(table["flags"])
        per_bit = [
            f"{int(np.count_nonzero(flags & (1 << b)))} {flag_name(text)}"
            for b, text in FLAG_BITS.items()
            if np.any(flags & (1 << b))
        ]
        rows.append(
            _row(
                "flags",
                f"{int(np.count_nonzero(flags))} flagged"
                + (f" ({', '.join(per_bit)})" if per_bit else ""),
            )
        )
    if "mdn_refit" in table.colnames:
        rows.append(
            _row(
                "MDN",
                f"columns <name>_mdn, <name>_mdn_sigma; "
                f"{int(np.count_nonzero(table['mdn_refit']))} "
                "refitted without its bounds",
            )
        )
    skip = {"flag_bits", "cov_params", "column_names"}
    return rows + _meta_rows({k: v for k, v in meta.items() if k not in skip})


def _lines_mdn(path: Path) -> list[str]:
    from ..mdn import MDN

    mdn = MDN.load(path)
    rows = [
        _row("network", repr(mdn)),
        _row("wavelength", _fmt_wavelength(np.asarray(mdn.wavelength))),
        *_meta_rows(mdn.meta),
    ]
    if mdn.flow is not None:
        fm = mdn.flow.meta
        cfg = fm.get("config", {})
        rows.append(
            _row(
                "flow",
                f"{mdn.flow!r}: trained on {cfg.get('n_train', '?')} spectra, "
                f"{fm.get('epochs_run', '?')} epochs, validation NLL "
                + (
                    f"{fm['best_valid_nll']:.3f}"
                    if isinstance(fm.get("best_valid_nll"), int | float)
                    else "?"
                )
                + " (method='flow-is', MDN.flow_sample)",
            )
        )
    return rows


def _lines_samples(path: Path) -> list[str]:
    from ..posterior import load_samples

    post, meta = load_samples(path)
    n = len(post.samples)
    sizes = [int(np.shape(x)[0]) for x in post.samples]
    ran = [m for m in post.method if m]
    lines = [
        _row("stars", f"{n}"),
        _row(
            "parameters",
            ", ".join(
                f"{nm} [{u}]" if u else nm
                for nm, u in zip(post.names, post.units, strict=True)
            ),
        ),  # fmt: skip
        _row("draws", f"{min(sizes)}-{max(sizes)} per star" if sizes else "none"),
        _row(
            "methods",
            ", ".join(f"{m} x{ran.count(m)}" for m in dict.fromkeys(ran)) or "none",
        ),
        _row(
            "weighted",
            "yes ("
            + (", ".join(m for m in dict.fromkeys(ran) if m.endswith("-is")) or "IS")
            + ")"
            if any(w is not None for w in post.weights)
            else "no",
        ),
        _row(
            "kept",
            ", ".join(
                k
                for k, v in (("log_prob", post.log_prob), ("diverging", post.diverging))
                if v is not None and any(x is not None for x in v)
            )
            or "draws only",
        ),  # fmt: skip
    ]
    return lines + _meta_rows(
        {k: meta[k] for k in ("method", "prior", "seed") if k in meta}
    )


def _lines_checkpoint(path: Path) -> list[str]:
    with _h5.open_checked(path, CHECKPOINT_FORMAT, (CHECKPOINT_VERSION,)) as f:
        ident = _h5.get_json_attr(f, "identity", path)
        it = int(f.attrs.get("iteration", -1))
        states = sorted(f["state"]) if "state" in f else []
    cfg = ident.get("config", {}) if isinstance(ident, dict) else {}
    return [
        _row("iterations", f"{it} completed (payne-lite train --resume continues)"),
        _row("state", ", ".join(states) or "none"),
        *[_row(k, _fmt_value(v)) for k, v in sorted(cfg.items())[:12]],
    ]


def _describe_folder(path: Path) -> int:
    """A fit_catalog parts folder: its manifest (chunks done of all)."""
    from ..catalog._parts import read_manifest

    manifest = path / "manifest.json"
    if not manifest.is_file():
        raise FileFormatError(
            f"{path}: a folder without manifest.json; info describes files and "
            "fit_catalog parts folders (RESULTS.parts/)"
        )
    man = read_manifest(manifest)
    ident = man.get("identity", {})
    done, n = man.get("done", []), int(man.get("n_chunks", 0))
    chunks = sorted(path.glob("chunk-*.h5"))
    size = human_size(sum(c.stat().st_size for c in chunks))
    print(f"{path}: fit_catalog parts folder (v{man.get('format_version')}), {size}")
    inp = ident.get("input", {}) if isinstance(ident, dict) else {}
    lines = [
        _row(
            "chunks",
            f"{len(done)} of {n} done ({n - len(done)} to fit); "
            f"{len(chunks)} chunk files",
        ),  # fmt: skip
        _row(
            "catalog",
            f"{inp.get('n_spec', '?')} spectra x {inp.get('n_pix', '?')} pixels",
        ),
        _row("method", str(ident.get("method", "?"))),
        _row("chunk size", str(ident.get("chunk_size", "?"))),
        _row("resume", "run the same command again; --restart discards these"),
    ]
    print("\n".join(lines))
    return EXIT_OK


def _describe_lock(path: Path) -> int:
    from ..catalog._lock import describe, read_owner

    owner = read_owner(path)
    if owner is None:
        raise FileFormatError(f"{path}: not a readable fit_catalog lock file")
    print(f"{path}: fit_catalog output lock")
    print(_row("owner", describe(owner)))
    print(_row("note", "held while that run lives; a dead run's lock is taken over"))
    return EXIT_OK


def run_info(args) -> int:
    given = Path(args.file)
    if given.is_dir():
        return _describe_folder(given)
    path = require_file(args.file)
    size = human_size(path.stat().st_size)
    suffix = path.suffix.lower()
    if suffix == ".lock":
        return _describe_lock(path)
    if suffix == ".npz":
        try:
            grid = checked_read(SpectralGrid.from_payne_npz, path)
            kind = "The Payne training grid (.npz)"
        except FileFormatError as err:  # another layout: as payne-lite train reads it
            if "not a Payne training set" not in str(err):
                raise
            grid = checked_read(SpectralGrid.from_file, path)
            kind = "a grid (.npz) as SpectralGrid.from_file reads it"
        print(f"{path}: {kind}, {size}")
        print("\n".join(_lines_grid(grid)))
        return EXIT_OK
    if suffix in RESULTS_FORMATS and RESULTS_FORMATS[suffix] != "hdf5":
        from ..catalog import read_results

        table = checked_read(read_results, path)
        print(f"{path}: fit results ({RESULTS_FORMATS[suffix]}), {size}")
        print("\n".join(_lines_results(table)))
        return EXIT_OK
    if _is_results_hdf5(path):
        from ..catalog import read_results

        print(f"{path}: fit results (hdf5), {size}")
        print("\n".join(_lines_results(checked_read(read_results, path))))
        return EXIT_OK
    if _is_foreign_hdf5(path):
        grid = checked_read(SpectralGrid.from_file, path)
        print(f"{path}: a grid (HDF5) as SpectralGrid.from_file reads it, {size}")
        print("\n".join(_lines_grid(grid)))
        return EXIT_OK
    fmt, ver = checked_read(_file_format, path)
    if fmt == GRID_FORMAT:
        lines = _lines_grid(checked_read(SpectralGrid.load, path))
    elif fmt == EMULATOR_FORMAT:
        lines = _lines_emulator(checked_read(Emulator.load, path))
    elif fmt == CATALOG_FORMAT:
        lines = checked_read(_lines_catalog, path)
    elif fmt == MDN_FORMAT:
        lines = checked_read(_lines_mdn, path)
    elif fmt == SAMPLES_FORMAT:
        lines = checked_read(_lines_samples, path)
    elif fmt == CHECKPOINT_FORMAT:
        lines = checked_read(_lines_checkpoint, path)
    else:
        lines = checked_read(_lines_spectra, path)
    print(f"{path}: {fmt} v{ver}, {size}")
    print("\n".join(lines))
    return EXIT_OK


def _fmt_wavelength(wave: np.ndarray) -> str:
    """Range, pixel count and sampling of a wavelength grid [Angstrom]."""
    text = f"{wave[0]:.2f}-{wave[-1]:.2f} A, {wave.size} pixels"
    dlog = np.diff(np.log10(wave))
    if np.allclose(dlog, dlog[0], rtol=1e-4, atol=0.0):
        kms = (10.0 ** dlog[0] - 1.0) * C_KMS
        text += f" (log-uniform, dlog10(lambda) = {dlog[0]:.3g}, {kms:.3g} km/s/pixel)"
    else:
        step = np.diff(wave)
        text += f" (step {step.min():.3g}-{step.max():.3g} A)"
    return text


def _fmt_value(value, width: int = 70) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."
