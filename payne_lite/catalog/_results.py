"""Write and read fit results tables (FITS, ECSV, HDF5) without losing names.

``write_results(table, path, *, overwrite=False)`` and ``read_results(path)``; the
format comes from the suffix:

======================  ========================================================
suffix                  what is written
======================  ========================================================
``.fits``, ``.fit``     one binary table HDU (``EXTNAME = 'RESULTS'``) with
                        FITS-safe column names (:func:`safe_column_name`); the
                        original names, units and descriptions in the ``PLCOLS``
                        keyword (JSON), the table meta in ``PLMETA`` (JSON), the
                        format version in ``PLVERS``; long values use the FITS
                        ``CONTINUE`` long-string convention. Each ``TTYPEn``
                        comment repeats the original name for human readers;
                        ``TUNITn`` holds the FITS form of the unit, or its generic
                        form where FITS has none (``dex``). The flag bits are also
                        listed as ``COMMENT`` cards.
``.ecsv``               astropy's ECSV writer, names kept, meta in the YAML header.
``.h5``, ``.hdf5``      astropy's HDF5 writer, dataset ``results``,
                        ``serialize_meta=True``, names kept.
======================  ========================================================

``read_results`` restores the in-memory column names, units and the meta (the flag
documentation ``meta["flag_bits"]`` included) from any of the three.

FITS-safe names (APOGEE style). FITS readers warn on column names holding anything but
ASCII letters, digits and underscores, so FITS files get these names; the in-memory
table keeps the label names. The rule, applied to the whole column name:

1. every run of characters other than ASCII letters and digits becomes one ``_``;
2. leading and trailing ``_`` are removed;
3. the result is upper-cased.

=====================  =====================
in-memory name         FITS column name
=====================  =====================
``Teff``               ``TEFF``
``logg``               ``LOGG``
``[Fe/H]``             ``FE_H``
``[alpha/Fe]``         ``ALPHA_FE``
``[Mg/Fe]``            ``MG_FE``
``vmacro``             ``VMACRO``
``rv``                 ``RV``
``[Fe/H]_err``         ``FE_H_ERR``
``[Mg/Fe]_p16``        ``MG_FE_P16``
``logg_mdn_sigma``     ``LOGG_MDN_SIGMA``
``cont_0``             ``CONT_0``
``n_good_pixels``      ``N_GOOD_PIXELS``
=====================  =====================

(:data:`SAFE_NAME_EXAMPLES` holds this table; the tests check it.) Names that become
empty, or two columns that map to the same safe name (``[Fe/H]`` and ``Fe_H``), are
refused with a ``ValueError`` naming them: nothing is renamed silently.

Meta: every format stores the meta as plain JSON-compatible values (str keys; dict,
list, str, int, float, bool, None; tuples become lists, NumPy scalars and arrays become
Python numbers and lists). Anything else is refused with a ``TypeError`` naming the key.

Writes are atomic: the file is built in memory, written under a temporary name in
the destination folder and moved into place with ``os.replace``; an existing file is
refused unless ``overwrite=True``. A full disk (or quota, or file-size limit) is an
OSError that names the file, and nothing is left in its place.

Checksums (format version 2): FITS files carry the standard ``CHECKSUM`` /
``DATASUM`` cards in every HDU; ECSV and HDF5 files a SHA-256 of their content
(:func:`content_digest`: names, units, descriptions, values, meta) in the meta; HDF5
files also start with a 512-byte user block holding the SHA-256 of the rest of the
file, checked before the HDF5 library reads it (:func:`payne_lite._h5.check_stamp`:
libhdf5 can abort on a damaged file). ``read_results`` verifies them: a damaged
file (truncated, bits flipped, a block zeroed) raises
:class:`~payne_lite.FileFormatError`, as does any other failure to parse a results
file. Format-1 files (no checksums) are still read.
"""

from __future__ import annotations

import errno
import functools
import io
import json
import os
import re
import uuid
import warnings
from pathlib import Path

import numpy as np

from ..errors import FileFormatError

#: Version of the results file layout written here: header keyword ``PLVERS`` in FITS,
#: meta key :data:`META_VERSION_KEY` in ECSV / HDF5 (removed again on reading). Files
#: with a newer version are refused.
RESULTS_FORMAT_VERSION = 2  # 2: checksums (FITS CHECKSUM/DATASUM, content digest)
META_VERSION_KEY = "payne_lite_results_version"
#: meta key of the content checksum of ECSV and HDF5 results (:func:`content_digest`)
META_DIGEST_KEY = "payne_lite_results_sha256"

#: in-memory name -> FITS column name (the module docstring's table).
SAFE_NAME_EXAMPLES = {
    "Teff": "TEFF",
    "logg": "LOGG",
    "[Fe/H]": "FE_H",
    "[alpha/Fe]": "ALPHA_FE",
    "[Mg/Fe]": "MG_FE",
    "vmacro": "VMACRO",
    "rv": "RV",
    "[Fe/H]_err": "FE_H_ERR",
    "[Mg/Fe]_p16": "MG_FE_P16",
    "logg_mdn_sigma": "LOGG_MDN_SIGMA",
    "cont_0": "CONT_0",
    "n_good_pixels": "N_GOOD_PIXELS",
}

#: Suffix (lower case) -> format.
FORMATS = {
    ".fits": "fits",
    ".fit": "fits",
    ".ecsv": "ecsv",
    ".h5": "hdf5",
    ".hdf5": "hdf5",
}

#: FITS extension name and header keywords used by this module.
FITS_EXTNAME = "RESULTS"
KEY_VERSION, KEY_COLUMNS, KEY_META = "PLVERS", "PLCOLS", "PLMETA"
#: HDF5 dataset holding the table.
HDF5_PATH = "results"

_UNSAFE = re.compile(r"[^0-9A-Za-z]+")


def safe_column_name(label: str) -> str:
    """FITS-safe, APOGEE-style column name of ``label`` (see the module docstring).

    Examples:
        >>> safe_column_name("[alpha/Fe]_err")
        'ALPHA_FE_ERR'

    Raises:
        TypeError: ``label`` is not a str.
        ValueError: nothing of ``label`` is left (no ASCII letters or digits).
    """
    if not isinstance(label, str):
        raise TypeError(f"column name must be a str, got {type(label).__name__}")
    safe = _UNSAFE.sub("_", label).strip("_").upper()
    if not safe:
        raise ValueError(
            f"column name {label!r} has no ASCII letters or digits: no FITS-safe name"
        )
    return safe


def safe_column_names(names) -> dict[str, str]:
    """``{name: safe name}`` for all ``names``; collisions refused with a ValueError."""
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in names:
        safe = safe_column_name(name)
        if safe in seen:
            raise ValueError(
                f"columns {seen[safe]!r} and {name!r} both map to the FITS-safe name "
                f"{safe!r}; rename one of them before writing FITS"
            )
        seen[safe] = name
        out[name] = safe
    return out


# --------------------------------------------------------------------------------------
# meta
# --------------------------------------------------------------------------------------
def _plain(value, where: str):
    """``value`` as plain JSON-compatible Python; TypeError naming ``where`` if not."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, np.ndarray):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value.tolist())]
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"meta{where}: key {k!r} is a {type(k).__name__}; only str keys "
                    "can be written (JSON/YAML would change their type)"
                )
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    raise TypeError(
        f"meta{where} = {value!r} ({type(value).__name__}) cannot be written; "
        "use str, int, float, bool, None, or lists / dicts of them"
    )


def _json_default(x):  # pragma: no cover - _plain leaves nothing for it
    raise TypeError(f"not JSON-serialisable: {x!r}")


def _dumps(obj) -> str:
    """Compact JSON; non-finite floats as JSON extensions (NaN, Infinity), ASCII only."""
    return json.dumps(obj, separators=(",", ":"), default=_json_default)


# --------------------------------------------------------------------------------------
# formats
# --------------------------------------------------------------------------------------
def format_of(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"{path}: unknown results file suffix {path.suffix!r}; expected one of "
            f"{sorted(FORMATS)}"
        )
    return fmt


def _unit_strings(unit) -> tuple[str, str] | None:
    """(generic, FITS) strings of a column unit; FITS falls back to the generic one."""
    if unit is None:
        return None
    generic = unit.to_string()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fits_str = unit.to_string(format="fits")
    except ValueError:
        fits_str = generic
    return generic, fits_str


def _fits_hdul(table):
    """HDUList (empty primary + RESULTS table) with safe names and the mappings."""
    from astropy.io import fits

    mapping = safe_column_names(table.colnames)
    plain = table.copy(copy_data=False)
    plain.meta.clear()
    for col in plain.itercols():
        col.unit, col.description, col.format = None, None, None
        col.meta.clear()
    plain.rename_columns(list(mapping), list(mapping.values()))
    cols = []
    for name in table.colnames:
        col = table[name]
        units = _unit_strings(col.unit)
        entry = {"fits": mapping[name], "name": name}
        if units is not None:
            entry["unit"] = units[0]
        if col.description:
            entry["description"] = str(col.description)
        cols.append((entry, units))
    hdu = fits.table_to_hdu(plain)
    hdu.name = FITS_EXTNAME
    hdr = hdu.header
    for i, (entry, units) in enumerate(cols, start=1):
        key = f"TTYPE{i}"
        # the comment is for human readers only (the mapping is in PLCOLS): keep the
        # card within 80 characters rather than let astropy truncate it with a warning
        room = 80 - 10 - max(20, len(entry["fits"]) + 2) - 3
        if len(entry["name"]) <= room:
            hdr.comments[key] = entry["name"]
        if units is not None:
            hdr.insert(key, (f"TUNIT{i}", units[1]), after=True)
    hdr[KEY_VERSION] = (RESULTS_FORMAT_VERSION, "payne_lite results file version")
    hdr[KEY_COLUMNS] = _dumps([e for e, _ in cols])
    hdr.comments[KEY_COLUMNS] = "JSON: FITS column -> in-memory name, unit"
    hdr[KEY_META] = _dumps(_plain(dict(table.meta), ""))
    hdr.comments[KEY_META] = "JSON: table meta"
    bits = table.meta.get("flag_bits")
    if isinstance(bits, dict):
        for b, text in bits.items():
            hdr.add_comment(f"flags bit {b}: {text}"[:72])
    return fits.HDUList([fits.PrimaryHDU(), hdu])


def write_results(table, path, *, overwrite: bool = False) -> Path:
    """Write a results table to ``path``; the format comes from the suffix.

    Args:
        table: astropy Table (as returned by :func:`payne_lite.fit`).
        path: destination; ``.fits``/``.fit``, ``.ecsv`` or ``.h5``/``.hdf5``.
        overwrite: replace an existing file (otherwise refused).

    Returns:
        The path written.

    Raises:
        ValueError: unknown suffix; column names with no FITS-safe form or colliding
            safe names (FITS only).
        TypeError: meta that cannot be stored (see the module docstring).
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    fmt = format_of(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist")
    if fmt == "fits":
        hdul = _fits_hdul(table)  # validates names and meta before any file is made
    else:
        out = table.copy(copy_data=False)
        out.meta = _plain(dict(table.meta), "")
        out.meta[META_VERSION_KEY] = RESULTS_FORMAT_VERSION
        out.meta[META_DIGEST_KEY] = content_digest(out)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp{path.suffix}")
    try:
        if fmt == "fits":
            buf = io.BytesIO()  # astropy's own writes report a full disk as a
            hdul.writeto(
                buf, checksum=True
            )  # short write ("9600 requested and 4480 written")
            _write_bytes(tmp, buf)
        elif fmt == "ecsv":
            out.write(tmp, format="ascii.ecsv")
        else:
            _write_bytes(tmp, _hdf5_table_bytes(out))
        os.replace(tmp, path)
    except OSError as err:
        raise disk_error(err, path) from err
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


#: errnos of a full disk or quota, or a file size limit
DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def disk_error(err: OSError, path) -> OSError:
    """``err`` raised while writing ``path``, as an OSError that names the file
    and, for a full disk (``ENOSPC``, ``EDQUOT``) or a file-size limit
    (``EFBIG``), says so; other errors as they are."""
    if err.errno not in DISK_FULL:
        return err
    what = {
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EFBIG: "file too large (a file-size limit: ulimit -f)",
    }[err.errno]
    new = OSError(err.errno, f"cannot write: {what}; nothing was written in its place")
    new.filename = str(path)
    return new


def _hdf5_table_bytes(table) -> io.BytesIO:
    """The table as an HDF5 file in memory, behind a user block with its checksum
    (:func:`payne_lite._h5.stamp`). Written by the HDF5 library straight to a full disk, a
    results file was left half-written and the process crashed (h5py 3: SIGSEGV
    while it freed its objects); from memory, a full disk is an OSError of
    :func:`_write_bytes`."""
    import h5py

    from .. import _h5

    buf = io.BytesIO()
    with h5py.File(buf, "w", userblock_size=_h5.USERBLOCK) as f:
        table.write(f, format="hdf5", path=HDF5_PATH, serialize_meta=True)
    _h5.stamp(buf)
    return buf


def _write_bytes(path: Path, buf: io.BytesIO) -> None:
    with open(path, "wb") as fh:
        fh.write(buf.getbuffer())
        fh.flush()
        os.fsync(fh.fileno())


def _read_fits(path: Path):
    from astropy.io import fits
    from astropy.table import Table

    # checksum=True: CHECKSUM / DATASUM are verified where present (payne_lite
    # writes them); a mismatch is an AstropyUserWarning, an error in read_results
    with fits.open(path, checksum=True) as hdul:
        names = [h.name for h in hdul]
        hdu = FITS_EXTNAME if FITS_EXTNAME in names else 1
        hdr = hdul[hdu].header
        version = hdr.get(KEY_VERSION)
        cols_json = hdr.get(KEY_COLUMNS)
        meta_json = hdr.get(KEY_META)
        if _checked(version) and "CHECKSUM" not in hdr:
            raise FileFormatError(f"{path}: its CHECKSUM card is missing")
        t = Table.read(
            hdul,
            format="fits",
            hdu=hdu,
            mask_invalid=False,
            unit_parse_strict="silent",
            character_as_bytes=False,
        )
        t = t.copy()  # not a view of the file's memory map
    if version is None:  # not written here: the table as astropy reads it
        return t
    _check_version(path, version)
    from astropy import units as u

    cols = json.loads(cols_json) if cols_json else []
    missing = [c["fits"] for c in cols if c["fits"] not in t.colnames]
    if missing or len(cols) != len(t.colnames):
        raise FileFormatError(
            f"{path}: the {KEY_COLUMNS} mapping does not match the table columns "
            f"(missing {missing}, {len(cols)} mapped, {len(t.colnames)} in the file)"
        )
    for name in t.colnames:  # FITS is big-endian; hand back native arrays
        if not t[name].dtype.isnative:
            t[name] = t[name].astype(t[name].dtype.newbyteorder("="))
    t.rename_columns([c["fits"] for c in cols], [c["name"] for c in cols])
    for c in cols:
        col = t[c["name"]]
        col.unit = u.Unit(c["unit"], parse_strict="silent") if "unit" in c else None
        col.description = c.get("description")
    t.meta.clear()
    if meta_json:
        t.meta.update(json.loads(meta_json))
    return t


def _check_version(path, version) -> None:
    if int(version) > RESULTS_FORMAT_VERSION:
        raise FileFormatError(
            f"{path}: results file version {version} is newer than this payne_lite "
            f"reads ({RESULTS_FORMAT_VERSION}); upgrade payne_lite"
        )


def read_results(path):
    """Read a results table written by :func:`write_results`.

    Column names (from the FITS-safe ones via the stored mapping), units and meta
    (``flag_bits`` included) are as they were in memory. A FITS file without the
    payne_lite keywords is returned as astropy reads it.

    Raises:
        ValueError: unknown suffix; a FITS file from a newer payne_lite, or whose
            column mapping does not match its columns.
        FileNotFoundError: no such file.
    """
    from astropy.table import Table

    from .. import _h5

    path = Path(path)
    fmt = format_of(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file {path} not found")
    failed = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if fmt == "fits":
                t = _read_fits(path)
            elif fmt == "ecsv":
                t = _empty_strings_back(Table.read(path, format="ascii.ecsv"))
            else:
                _h5.check_stamp(path)
                t = Table.read(
                    path, format="hdf5", path=HDF5_PATH, character_as_bytes=False
                )
        except (FileNotFoundError, PermissionError):
            raise
        except Exception as err:  # noqa: BLE001 - any damage: one error type
            failed = err
    for w in caught:  # astropy reports a failed checksum or a truncation as a warning
        if _DAMAGE.search(str(w.message)):
            raise FileFormatError(f"{path}: {' '.join(str(w.message).split())}")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if isinstance(failed, FileFormatError):
        raise failed
    if failed is not None:
        raise FileFormatError(
            f"{path}: not a readable results file ({type(failed).__name__}: "
            f"{' '.join(str(failed).split())[:200]})"
        ) from failed
    if fmt == "fits":
        return t
    version = t.meta.get(META_VERSION_KEY)
    if version is not None:
        _check_version(path, version)
    elif any(k in t.meta for k in _OURS) or (
        fmt == "ecsv" and _header_mentions(path, (META_VERSION_KEY, META_DIGEST_KEY))
    ):  # damage in the meta lost the version (and checksum), or all of the meta
        raise FileFormatError(
            f"{path}: a payne_lite results table without its {META_VERSION_KEY!r}: "
            "the file is damaged"
        )
    digest = t.meta.pop(META_DIGEST_KEY, None)
    if (digest is not None or _checked(version)) and digest != content_digest(t):
        raise FileFormatError(
            f"{path}: its content does not match the checksum written with it "
            "(the file is damaged)"
        )
    t.meta.pop(META_VERSION_KEY, None)
    return t


def _header_mentions(path: Path, keys) -> bool:
    """Whether the ``#`` header lines of a text table name any of ``keys`` (an ECSV
    file whose ``meta`` key is damaged reads with no meta at all)."""
    with open(path, "rb") as f:
        for line in f:
            if not line.startswith(b"#"):
                return False
            if any(k.encode() in line for k in keys):
                return True
    return False


#: astropy's warnings of a damaged file
_DAMAGE = re.compile(r"checksum|datasum|truncat", re.IGNORECASE)
#: meta keys that every table of payne_lite.fit has (:mod:`payne_lite.fitting._schema`)
_OURS = (META_DIGEST_KEY, "flag_bits", "label_names")


def _checked(version) -> bool:
    """Whether a file of results format ``version`` carries checksums (from 2 on:
    FITS CHECKSUM / DATASUM, :func:`content_digest` in ECSV and HDF5)."""
    try:
        return int(version) >= 2
    except (TypeError, ValueError):
        return False


def _empty_strings_back(t):
    """``t`` with its masked string columns as plain ones, the masked entries ''.

    ECSV stores an empty string as an empty field, which astropy reads back as a
    masked entry (a string column of a sampler's table, ``failure``, is '' for
    every star that did not fail): the table written had no mask there, and the
    content digest reads ''."""
    from astropy.table import Column, MaskedColumn

    for name in t.colnames:
        col = t[name]
        if isinstance(col, MaskedColumn) and col.dtype.kind in "US":
            t[name] = Column(
                col.filled(""), name=name, unit=col.unit,
                description=col.info.description,
            )  # fmt: skip
    return t


def content_digest(table) -> str:
    """SHA-256 of a results table's content: column names, units, descriptions and
    values (NaN in one form, strings as UTF-8) and the meta (as JSON, without this
    digest). The same before an ECSV or HDF5 round trip and after: written into
    the meta, it is checked by :func:`read_results`."""
    import hashlib

    h = hashlib.sha256()
    for name in table.colnames:
        col = table[name]
        unit = "" if col.unit is None else col.unit.to_string()
        h.update(json.dumps([name, unit, col.info.description or ""]).encode())
        data = np.asarray(col)
        if data.dtype.kind in "US":
            data = np.char.encode(data.astype(str), "utf-8")
            h.update(b"\0".join(data.ravel().tolist()))
            h.update(repr(data.shape).encode())
            continue
        if data.dtype.kind == "f":
            data = np.where(np.isnan(data), np.nan, data).astype("<f8")
        elif data.dtype.kind in "iub":
            data = data.astype("<i8")
        else:
            data = data.astype(str)
            h.update("\0".join(data.ravel().tolist()).encode())
            continue
        h.update(repr(data.shape).encode())
        h.update(np.ascontiguousarray(data).tobytes())
    meta = {k: v for k, v in table.meta.items() if k != META_DIGEST_KEY}
    h.update(json.dumps(_plain(meta, ""), sort_keys=True).encode())
    return h.hexdigest()


@functools.cache
def _observe_rows():
    """``observe`` over rows of parameters, jitted (one compilation per shape: run
    op by op it took 0.7 s for 500 APOGEE rows)."""
    import jax

    from ..observe import observe

    return jax.jit(jax.vmap(observe, in_axes=(None, 0)))


def model_from_results(table, emulator, wavelength=None, *, rows=None):
    """The best-fit model spectra of a results table, rebuilt from the table alone.

    The observation model is the one that was fitted: the instrument from
    ``meta["instrument"]`` (:meth:`payne_lite.Instrument.from_meta`: air wavelengths,
    resolution, rotation and macroturbulence), the continuum from
    ``meta["cont_deg"]`` (and ``meta["cont_chips"]``: :class:`payne_lite.
    ChipPolynomial`), and each row's labels, rv, continuum and broadening columns.
    ``payne-lite plot`` draws these.

    Args:
        table: a table of :func:`payne_lite.fit` (or read by :func:`read_results`).
        emulator: the emulator it was fitted with (label names are checked).
        wavelength: the observed wavelength [A] the spectra were fitted on, (P,) (in
            air if the instrument says so); None = the emulator's grid.
        rows: optional row indices (default all).

    Returns:
        ``(model, valid)``: (m, P) model flux and (m, P) bool, False where the model
        is undefined (shifted off the emulator's grid); NaN rows where the fit
        failed.

    Raises:
        ValueError: another emulator's labels, missing columns, a per-star
            instrument (one row at a time through ``rows`` is needed then).
    """
    import jax.numpy as jnp

    from ..observe import (
        RV_RANGE,
        ChipPolynomial,
        Instrument,
        build_obs_model,
        continuum_names,
    )

    names = list(table.meta.get("label_names") or emulator.label_names)
    if tuple(names) != tuple(emulator.label_names):
        raise ValueError(
            f"the table was fitted with the labels {names}, the emulator has "
            f"{list(emulator.label_names)}"
        )
    inst = Instrument.from_meta(table.meta.get("instrument"))
    cont_deg = ChipPolynomial.from_meta(table.meta)
    cont = list(continuum_names(cont_deg))
    broad = list(inst.broadening(None, emulator))
    need = [*emulator.label_names, "rv", *cont, *broad]
    missing = [c for c in need if c not in table.colnames]
    if missing:
        raise ValueError(f"the table has no columns {missing} for the model")
    idx = np.arange(len(table)) if rows is None else np.atleast_1d(np.asarray(rows))
    if np.ndim(table["rv"]) != 1:
        raise ValueError(
            "model_from_results takes one-spectrum rows: for a group= fit, pass "
            "pl.fitting.per_visit(table) (one row per visit)"
        )
    if inst.per_star:
        if idx.size != 1:
            raise ValueError(
                "a per-star instrument: ask for one row at a time (rows=i)"
            )
        inst = inst.for_star(int(idx[0]))
    wave = inst.vacuum_wavelength(wavelength)
    rv = np.asarray(table["rv"], np.float64)[idx]
    rv_range = table.meta.get("rv_range") or RV_RANGE
    rv_max = max(
        max(abs(float(v)) for v in rv_range),
        float(np.nanmax(np.abs(rv), initial=0.0)) + 1.0,
    )
    obs = build_obs_model(
        emulator,
        wavelength=wave,
        cont_deg=cont_deg,
        rv_max=rv_max,
        **inst.model_options(None, emulator),
    )
    labels = np.stack([np.asarray(table[c], np.float64)[idx] for c in names], axis=1)
    extra = [np.asarray(table[c], np.float64)[idx] for c in cont + broad]
    p = np.column_stack([emulator.scale(labels), rv, *extra])
    dt = obs.x_obs.dtype
    model, valid = _observe_rows()(obs, jnp.asarray(p, dt))
    model = np.array(model, np.float64)
    valid = np.array(valid, bool)
    failed = ~np.all(np.isfinite(p), axis=1)
    model[failed] = np.nan
    valid[failed] = False
    return model, valid
