"""HDF5 catalogs of observed spectra: the file layout, a writer and a reader.

Catalog file layout (``format = "payne_lite.Catalog"``, ``format_version`` 1 or 2):

=====================  =========================  ==========================================
item                   shape / type               meaning
=====================  =========================  ==========================================
``wavelength``         (P,) float64               one grid for every spectrum: observed
                                                  vacuum wavelength [Angstrom], finite,
                                                  positive, strictly increasing
                       or (n, P) float64          (version 2) one grid per spectrum (row
                                                  i is spectrum i's); NaN marks a missing
                                                  pixel (masked when fitted, as in
                                                  :func:`payne_lite.fit`); each row has at
                                                  least 2 finite values, positive and
                                                  strictly increasing
``flux``               (n, P) float32 or float64  observed flux (dtype kept as written)
``flux_err``           (n, P) like ``flux``       1-sigma errors; non-finite or <= 0 means
                                                  the pixel is unusable
``mask``               (n, P) bool                optional, True = ignore the pixel
``ids``                (n,) UTF-8 str             optional, one identifier per spectrum
``group``              (n,) UTF-8 str             optional, the star of each spectrum:
                                                  spectra with the same (non-empty)
                                                  value are visits of one star, fitted
                                                  jointly by ``fit_catalog(...,
                                                  group=True)``
attr ``meta``          JSON object                provenance
=====================  =========================  ==========================================

Versions: version 2 added the (n, P) ``wavelength``. A catalog with one grid is
written as version 1, so that every payne_lite reads it; one with a grid per spectrum
as version 2, which older readers refuse by its version (instead of misreading it).
This reader reads both and refuses any other version (``FileFormatError``).

``group`` needs no new version: it changes no other item, and a reader that does not
know it reads every spectrum as it is stored; its only use is to ask for joint fits
(``fit_catalog(..., group=True)``, ``payne-lite fit --group``), which such a reader
cannot be asked for. An older payne_lite fits the visits one by one, which is what it
can do, and says so by its one row per spectrum.

The row datasets are stored in chunks of whole rows (about 1 MB each), so reading a
slab of rows touches only those rows; ``flux``, ``flux_err``, ``mask`` and a per-row
``wavelength`` carry Fletcher-32 checksums, so a damaged chunk is reported instead of
read as numbers (variable-length ``ids`` and ``group`` cannot). ``flux``,
``flux_err`` and ``wavelength`` are not compressed (noisy floats barely compress and
would cost time on every read); the mask is (gzip).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, NamedTuple

import h5py
import numpy as np

from .. import _h5
from .._validate import as_float_array, check_wavelength
from ..errors import FileFormatError

CATALOG_FORMAT = "payne_lite.Catalog"
#: The newest catalog layout (2: a wavelength grid per spectrum may be stored). A
#: catalog with one grid is still written as version 1 (see the module docstring).
CATALOG_VERSION = 2
#: The catalog versions this reader reads.
CATALOG_VERSIONS = (1, 2)

#: File name endings of HDF5 and FITS files (catalog readers claim files by them).
HDF5_SUFFIXES = (".h5", ".hdf5")
FITS_SUFFIXES = (".fits", ".fit", ".fits.gz", ".fit.gz")

#: Target size of one HDF5 storage chunk of ``flux`` / ``flux_err`` [bytes].
_CHUNK_BYTES = 1 << 20


class CatalogChunk(NamedTuple):
    """Rows of a catalog: ``start:stop`` (:meth:`Reader.read`) or given rows
    (:meth:`Reader.read_rows`).

    Attributes:
        flux: (m, P) observed flux.
        flux_err: (m, P) 1-sigma errors.
        mask: (m, P) bool, True = ignore; None when the catalog has no mask.
        ids: (m,) str identifiers; None when the catalog has none.
        wavelength: (m, P) float64 observed wavelength [Angstrom] of each row (NaN =
            missing pixel) when the catalog has one grid per spectrum; None when it
            has one grid for all (the reader's ``wavelength``).
        group: (m,) the star of each row (visits of one star share it): the
            catalog's ``group`` (str), or the ids a caller set; None when absent.
        rows: (m,) int64, the catalog row of each row, from :meth:`Reader.read_rows`;
            None for rows ``start:stop``.
    """

    flux: np.ndarray
    flux_err: np.ndarray
    mask: np.ndarray | None
    ids: np.ndarray | None
    wavelength: np.ndarray | None = None
    group: np.ndarray | None = None
    rows: np.ndarray | None = None


def check_row_grids(wave: np.ndarray, first_row: int = 0, rows=None) -> None:
    """Per-spectrum grids (m, P) (rows ``first_row`` on, or the catalog rows
    ``rows`` (m,)): every row has at least 2 finite values, positive and strictly
    increasing; non-finite entries (NaN) are missing pixels, as
    :func:`payne_lite.fit` takes them. ValueError naming the first bad row."""

    def row(i) -> int:
        return first_row + int(i) if rows is None else int(rows[i])

    ok = np.isfinite(wave)
    n_ok = ok.sum(axis=1)
    bad = np.flatnonzero(n_ok < 2)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"wavelength row {row(i)} has {int(n_ok[i])} finite value(s); at "
            "least 2 needed (NaN marks a missing pixel)"
        )
    bad = np.flatnonzero(np.any(ok & ~(np.where(ok, wave, 1.0) > 0), axis=1))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"wavelength row {row(i)} must be positive [Angstrom], min is "
            f"{float(np.nanmin(wave[i]))}"
        )
    full = ok.all(axis=1)
    rising = np.ones(wave.shape[0], bool)
    if full.any():
        rising[full] = np.all(np.diff(wave[full], axis=1) > 0, axis=1)
    for i in np.flatnonzero(~full):
        rising[i] = bool(np.all(np.diff(wave[i][ok[i]]) > 0))
    if not rising.all():
        i = int(np.flatnonzero(~rising)[0])
        raise ValueError(
            f"wavelength row {row(i)} must be strictly increasing (where finite)"
        )


# ======================================================================================
# HDF5 catalogs: writing
# ======================================================================================
def _str_per_row(values, name: str, n: int, where: str, *, empty: bool = True):
    """``values`` as a (n,) str array (bytes decoded), one per row; ``empty=False``
    refuses an empty string (naming the row)."""
    if np.shape(values) != (n,):
        raise ValueError(
            f"{where}: {name} {np.shape(values)} must be ({n},), one per spectrum"
        )
    out = np.array(
        [s.decode() if isinstance(s, bytes) else str(s) for s in np.asarray(values)],
        dtype=str,
    )
    if not empty:
        bad = np.flatnonzero(out == "")
        if bad.size:
            raise ValueError(
                f"{where}: {name} of row {int(bad[0])} is empty; every spectrum "
                "needs its star's identifier"
            )
    return out


def _check_rows(flux, flux_err, mask, ids, n_pix: int | None, where: str, group=None):
    """Validated (flux, flux_err, mask, ids, group) copies of one block of rows."""
    f = np.asarray(flux)
    e = np.asarray(flux_err)
    dtype = np.float32 if f.dtype == np.float32 else np.float64
    f = as_float_array(f, "flux", ndim=2, dtype=dtype)
    e = as_float_array(e, "flux_err", ndim=2, dtype=dtype)
    if f.shape != e.shape:
        raise ValueError(
            f"{where}: flux {f.shape} and flux_err {e.shape} must have the same shape "
            "(n_spec, n_pix)"
        )
    if n_pix is not None and f.shape[1] != n_pix:
        raise ValueError(
            f"{where}: flux {f.shape} has {f.shape[1]} pixels, the wavelength grid has "
            f"{n_pix}: expected (n_spec, {n_pix})"
        )
    m = None
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype != bool:
            raise ValueError(
                f"{where}: mask must be boolean (True = ignore), got {m.dtype}"
            )
        if m.shape != f.shape:
            raise ValueError(
                f"{where}: mask {m.shape} must have the shape of flux {f.shape}"
            )
    i = None if ids is None else _str_per_row(ids, "ids", f.shape[0], where)
    g = None
    if group is not None:
        g = _str_per_row(group, "group", f.shape[0], where, empty=False)
    return f, e, m, i, g


def _row_wavelength(wavelength, shape, where: str, first_row: int) -> np.ndarray:
    """A validated float64 copy of per-spectrum grids, which must have ``shape``."""
    w = as_float_array(wavelength, "wavelength", ndim=2)
    if w.shape != tuple(shape):
        raise ValueError(
            f"{where}: wavelength {w.shape} must have the shape of flux "
            f"{tuple(shape)} (one grid per spectrum)"
        )
    try:
        check_row_grids(w, first_row)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return w


class CatalogWriter:
    """Appends rows to an open catalog file; made by :func:`catalog_writer`.

    Attributes:
        path: the catalog being written.
        n_pix: pixels per spectrum (None until the first append of a catalog with
            one grid per spectrum).
        per_row_wavelength: whether each append passes its rows' wavelength grids.
        with_mask, with_ids, with_group: whether each append passes a mask / ids /
            group (star ids).
        n_spec: rows appended so far.
    """

    def __init__(
        self,
        f: h5py.File,
        path: Path,
        n_pix: int | None,
        dtype,
        with_mask,
        with_ids,
        per_row_wavelength: bool = False,
        with_group: bool = False,
    ):
        self._f, self.path, self.n_pix = f, path, None
        self._dtype = np.dtype(dtype)
        self.with_mask, self.with_ids = with_mask, with_ids
        self.with_group = with_group
        self.per_row_wavelength = per_row_wavelength
        self._sets = {}
        self.n_spec = 0
        if n_pix is not None:
            self._create(n_pix)

    def _create(self, n_pix: int) -> None:
        """The row datasets, chunked by whole rows, for spectra of ``n_pix`` pixels."""
        f = self._f
        self.n_pix = n_pix
        rows = max(1, _CHUNK_BYTES // (n_pix * self._dtype.itemsize))
        for name in ("flux", "flux_err"):
            self._sets[name] = f.create_dataset(
                name,
                shape=(0, n_pix),
                maxshape=(None, n_pix),
                dtype=self._dtype,
                chunks=(rows, n_pix),
                fletcher32=True,
            )
        if self.per_row_wavelength:
            self._sets["wavelength"] = f.create_dataset(
                "wavelength",
                shape=(0, n_pix),
                maxshape=(None, n_pix),
                dtype=np.float64,
                chunks=(max(1, _CHUNK_BYTES // (n_pix * 8)), n_pix),
                fletcher32=True,
            )
        if self.with_mask:
            self._sets["mask"] = f.create_dataset(
                "mask",
                shape=(0, n_pix),
                maxshape=(None, n_pix),
                dtype=bool,
                chunks=(rows, n_pix),
                fletcher32=True,
                compression="gzip",
                compression_opts=4,
            )
        for name, given in (("ids", self.with_ids), ("group", self.with_group)):
            if given:
                self._sets[name] = f.create_dataset(
                    name,
                    shape=(0,),
                    maxshape=(None,),
                    dtype=h5py.string_dtype(),
                    chunks=(max(rows, 1024),),  # variable-length: no checksum filter
                )

    def append(
        self, flux, flux_err, *, wavelength=None, mask=None, ids=None, group=None
    ) -> None:
        """Append rows: flux, flux_err (m, P); wavelength (m, P), the rows' grids
        [Angstrom] (NaN = missing pixel), if the catalog has one grid per spectrum
        (and only then); mask (m, P) bool, ids (m,) and group (m,) (each row's star,
        not empty; visits of one star may be in different appends) if the writer was
        opened ``with_mask`` / ``with_ids`` / ``with_group`` (and only then)."""
        where = f"{self.path}: append"
        if (wavelength is not None) != self.per_row_wavelength:
            raise ValueError(
                f"{where}: "
                + (
                    "the catalog has one wavelength grid per spectrum: pass each "
                    "block's wavelength (m, P)"
                    if self.per_row_wavelength
                    else "the catalog has one wavelength grid (given to "
                    "catalog_writer); pass no wavelength"
                )
            )
        if (mask is not None) != self.with_mask:
            raise ValueError(
                f"{where}: the catalog was opened with_mask={self.with_mask}; "
                f"got mask={'an array' if mask is not None else 'None'}"
            )
        for name, val, opened in (
            ("ids", ids, self.with_ids),
            ("group", group, self.with_group),
        ):
            if (val is not None) != opened:
                raise ValueError(
                    f"{where}: the catalog was opened with_{name}={opened}; "
                    f"got {name}={'an array' if val is not None else 'None'}"
                )
        f, e, m, i, g = _check_rows(
            flux, flux_err, mask, ids, self.n_pix, where, group=group
        )
        w = None
        if self.per_row_wavelength:
            w = _row_wavelength(wavelength, f.shape, where, self.n_spec)
        if self.n_pix is None:
            self._create(f.shape[1])
        start, stop = self.n_spec, self.n_spec + f.shape[0]
        blocks = (("flux", f), ("flux_err", e), ("wavelength", w), ("mask", m))
        for name, arr in (*blocks, ("ids", i), ("group", g)):
            if arr is None:
                continue
            ds = self._sets[name]
            ds.resize(stop, axis=0)
            if name.startswith("flux"):
                arr = arr.astype(self._dtype, copy=False)
            elif name in ("ids", "group"):
                arr = arr.astype(object)
            ds[start:stop] = arr
        self.n_spec = stop


@contextlib.contextmanager
def catalog_writer(
    path: str | os.PathLike,
    wavelength,
    *,
    dtype=np.float32,
    with_mask: bool = False,
    with_ids: bool = False,
    with_group: bool = False,
    meta: dict | None = None,
    overwrite: bool = False,
) -> Iterator[CatalogWriter]:
    """Write a catalog in pieces: ``with catalog_writer(...) as w: w.append(...)``.

    The file appears (atomically) when the block ends without an error; nothing of
    it is left behind otherwise. Memory stays at one appended block, so catalogs larger
    than memory can be written.

    Args:
        path: the ``.h5`` file to write.
        wavelength: (P,) observed vacuum wavelength [Angstrom], strictly increasing,
            of every spectrum (a version-1 file); or None for one grid per spectrum
            (a version-2 file): every :meth:`CatalogWriter.append` then passes its
            rows' grids (m, P), and P is set by the first append.
        dtype: storage dtype of flux and flux_err (float32 or float64).
        with_mask, with_ids, with_group: whether every :meth:`CatalogWriter.append`
            passes a mask / ids / group (the star of each spectrum).
        meta: JSON-compatible provenance stored as ``attrs["meta"]``.
        overwrite: replace an existing file (otherwise FileExistsError).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: a bad wavelength grid or dtype; no spectra appended.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    per_row = wavelength is None
    wave = None
    if not per_row:
        wave = as_float_array(wavelength, "wavelength", ndim=(1, 2))
        if wave.ndim != 1:
            raise ValueError(
                f"catalog_writer: wavelength must be (P,), one grid for every "
                f"spectrum, or None, one grid per spectrum passed with each append; "
                f"got shape {wave.shape}"
            )
        check_wavelength(wave)
    if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
    version = CATALOG_VERSION if per_row else 1  # the oldest that holds the file
    with _h5.atomic_h5_writer(path, CATALOG_FORMAT, version, stamped=False) as f:
        if not per_row:
            f.create_dataset("wavelength", data=wave)
        _h5.set_json_attr(f, "meta", dict(meta or {}))
        writer = CatalogWriter(
            f,
            path,
            None if per_row else wave.size,
            dtype,
            with_mask,
            with_ids,
            per_row_wavelength=per_row,
            with_group=with_group,
        )
        yield writer
        if writer.n_spec == 0:
            raise ValueError(
                f"{path}: no spectra were appended; a catalog is never empty"
            )


def write_catalog(
    path: str | os.PathLike,
    flux,
    flux_err,
    wavelength,
    *,
    mask=None,
    ids=None,
    group=None,
    meta: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write spectra to one catalog file (layout in the module docstring).

    Args:
        path: the ``.h5`` file to write (atomically).
        flux: (n, P) observed flux; float32 is stored as float32, anything else as
            float64.
        flux_err: (n, P) 1-sigma errors.
        wavelength: observed vacuum wavelength [Angstrom]: (P,), strictly increasing,
            one grid for every spectrum; or (n, P), one grid per spectrum (for
            example visits not resampled, or several spectrographs), NaN for a
            missing pixel, each row's finite values strictly increasing (stored as
            format version 2).
        mask: optional (n, P) bool, True = ignore the pixel.
        ids: optional (n,) identifiers, stored as str.
        group: optional (n,) star identifier of each spectrum (not empty), stored
            as str: spectra with the same value are visits of one star, fitted
            jointly by ``fit_catalog(..., group=True)`` (in any row order).
        meta: JSON-compatible provenance.
        overwrite: replace an existing file (otherwise FileExistsError).

    Returns:
        The path written.

    Raises:
        ValueError: shapes that do not fit together (named), no spectra, a bad
            wavelength grid (naming the row).
        FileExistsError: ``path`` exists and ``overwrite`` is False.

    Examples:
        >>> import numpy as np, payne_lite as pl
        >>> wave = np.linspace(15100.0, 15200.0, 50)
        >>> grids = np.stack([wave, wave + 0.5])  # two spectra, two grids
        >>> flux = np.ones((2, 50))
        >>> path = pl.write_catalog(  # doctest: +SKIP
        ...     "c.h5", flux, 0.01 * flux, grids)
    """
    wave = as_float_array(wavelength, "wavelength", ndim=(1, 2))
    per_row = wave.ndim == 2
    f, e, m, i, g = _check_rows(
        flux, flux_err, mask, ids, None if per_row else wave.size, str(path), group
    )
    if f.shape[0] == 0:
        raise ValueError(f"{path}: flux {f.shape} holds no spectra")
    if per_row:
        wave = _row_wavelength(wave, f.shape, str(path), 0)
    with catalog_writer(
        path,
        None if per_row else wave,
        dtype=f.dtype,
        with_mask=m is not None,
        with_ids=i is not None,
        with_group=g is not None,
        meta=meta,
        overwrite=overwrite,
    ) as w:
        w.append(f, e, wavelength=wave if per_row else None, mask=m, ids=i, group=g)
    return Path(path)


# ======================================================================================
# Readers
# ======================================================================================
def _take(chunk: CatalogChunk, index) -> CatalogChunk:
    """``chunk``'s rows ``index`` (every per-row field)."""
    return CatalogChunk(*(None if a is None else a[index] for a in chunk))


def _concat(chunks: list[CatalogChunk]) -> CatalogChunk:
    """The rows of ``chunks`` one after the other (fields None stay None)."""
    if len(chunks) == 1:
        return chunks[0]
    return CatalogChunk(
        *(
            None if parts[0] is None else np.concatenate(parts)
            for parts in zip(*chunks, strict=True)
        )
    )


def one_path(paths, name: str) -> Path:
    """The one path of a one-file reader; ValueError otherwise."""
    paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if len(paths) != 1:
        raise ValueError(f"the {name!r} reader reads one file, got {len(paths)}")
    return Path(paths[0])


def has_suffix(path: Path, suffixes) -> bool:
    """``path``'s name ends with one of ``suffixes`` (case-insensitive)."""
    return any(Path(path).name.lower().endswith(s) for s in suffixes)


class Reader:
    """Common interface: ``len``, ``n_pix``, ``wavelength``, ``read(start, stop)``,
    ``read_rows(rows)``, ``read_wavelength(start, stop)``, ``read_group()``,
    ``source``.

    A reader class is registered (:func:`payne_lite.catalog.register_reader`) with a
    ``name``, :meth:`claims` (is this source mine? from names and headers, cheaply)
    and :meth:`open` (``cls(paths, **options)`` unless overridden); :meth:`identity`
    is what a resumed ``fit_catalog`` run compares.

    ``wavelength`` is the (P,) grid of every spectrum; it is None when the catalog has
    one grid per spectrum (``per_row_wavelength``): the grids then come with each
    chunk (:attr:`CatalogChunk.wavelength`) and from :meth:`read_wavelength`.
    ``has_group``: the catalog names the star of each spectrum (:meth:`read_group`).
    Readers are context managers; :meth:`close` releases open files.
    """

    #: The reader's name in the registry (``open_catalog(..., reader=name)``).
    name: ClassVar[str] = ""
    source: str
    wavelength: np.ndarray | None
    has_mask: bool
    has_ids: bool
    #: The files read (for the resume identity: path, size, modification time).
    paths: list[Path] = []

    @classmethod
    def claims(cls, paths: list[Path]) -> bool:
        """Whether ``paths`` (existing files) are this reader's to read."""
        return False

    @classmethod
    def open(cls, paths: list[Path], **options) -> Reader:
        """A reader of ``paths`` with the reader's ``options``."""
        return cls(paths, **options)

    def options(self) -> dict:
        """The reader's settings that change what is read (part of the identity)."""
        return {}

    def provenance(self) -> dict:
        """What the reader did to the spectra, JSON-compatible, for the results'
        meta (:func:`payne_lite.fit_catalog` adds it): for example the continuum
        normalisation (``"continuum"``); {} = the spectra as stored."""
        return {}

    #: True when every spectrum has its own wavelength grid (then ``wavelength`` is
    #: None).
    per_row_wavelength: bool = False
    #: True when the catalog holds the star of each spectrum (``group``).
    has_group: bool = False

    def __len__(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def n_pix(self) -> int:
        """Pixels per spectrum (P)."""
        return int(self.wavelength.size)

    def read(self, start: int, stop: int) -> CatalogChunk:  # pragma: no cover
        raise NotImplementedError

    def read_rows(self, rows) -> CatalogChunk:
        """The catalog rows ``rows`` ((m,) int, each once, in any order), in that
        order, with :attr:`CatalogChunk.rows` set: for example the visits of some
        stars, wherever they are in the catalog. Only those rows are read (this
        default reads each run of consecutive rows with :meth:`read`)."""
        r, order = self._row_indices(rows)
        srt = r[order]
        cuts = np.flatnonzero(np.diff(srt) != 1) + 1
        runs = np.split(srt, cuts)
        chunk = _concat([self.read(int(run[0]), int(run[-1]) + 1) for run in runs])
        return self._in_order(chunk, r, order)

    def read_group(self) -> np.ndarray | None:
        """(n,) str, the star of every row (visits of one star share it); None when
        the catalog has none (``has_group`` False)."""
        return None

    def read_wavelength(self, start: int, stop: int) -> np.ndarray:
        """(m, P) float64 wavelength grids [Angstrom] of rows ``start:stop`` (NaN =
        missing pixel), without their spectra; for a catalog with one grid, that grid
        repeated (a read-only view)."""
        start, stop = self._check_range(start, stop)
        return np.broadcast_to(self.wavelength, (stop - start, self.n_pix))

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_range(self, start: int, stop: int) -> tuple[int, int]:
        n = len(self)
        if not (0 <= start < stop <= n):
            raise IndexError(f"{self.source}: rows [{start}, {stop}) outside [0, {n})")
        return int(start), int(stop)

    def _row_indices(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """``rows`` checked (1-D ints in [0, n), each once, at least one) as int64,
        and the order that sorts them."""
        r = np.asarray(rows)
        n = len(self)
        if r.ndim != 1 or r.size == 0 or r.dtype.kind not in "iu":
            raise IndexError(
                f"{self.source}: rows must be a non-empty 1-D array of ints, got "
                f"{r.dtype} {r.shape}"
            )
        r = r.astype(np.int64)
        order = np.argsort(r, kind="stable")
        srt = r[order]
        if srt[0] < 0 or srt[-1] >= n:
            raise IndexError(
                f"{self.source}: rows {int(srt[0])}..{int(srt[-1])} outside [0, {n})"
            )
        if np.any(np.diff(srt) == 0):
            raise IndexError(f"{self.source}: rows repeat a row")
        return r, order

    @staticmethod
    def _in_order(chunk: CatalogChunk, r, order) -> CatalogChunk:
        """``chunk`` of the sorted rows ``r[order]`` put back in the order of ``r``,
        with ``rows`` = ``r``."""
        if np.any(np.diff(order) != 1):
            back = np.empty_like(order)
            back[order] = np.arange(order.size)
            chunk = _take(chunk, back)
        return chunk._replace(rows=r)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.source!r}, n_spec={len(self)}, "
            f"n_pix={self.n_pix}, mask={self.has_mask}, ids={self.has_ids}"
            + (", wavelength='per row'" if self.per_row_wavelength else "")
            + (", group=True" if self.has_group else "")
            + ")"
        )


class HDF5Catalog(Reader):
    """A catalog file written by :func:`write_catalog`, read a slab of rows at a time.

    The file stays open until :meth:`close` (or the end of a ``with`` block); the
    constructor checks format, version and shapes and reads only a one-grid
    ``wavelength``. Per-spectrum grids are read (and checked) with their rows.

    Raises:
        FileNotFoundError: no such file.
        payne_lite.FileFormatError: not a catalog file, an unknown version, corrupt or
            truncated, missing datasets, shapes that do not fit together, no spectra.
    """

    name = "payne-lite"

    @classmethod
    def claims(cls, paths: list[Path]) -> bool:
        """One HDF5 file with a ``format`` attribute, as payne_lite writes (or that
        cannot be opened, so that its error is this reader's)."""
        if len(paths) != 1 or not has_suffix(paths[0], HDF5_SUFFIXES):
            return False
        try:
            with h5py.File(paths[0], "r") as f:
                return "format" in f.attrs or "format_version" in f.attrs
        except (OSError, ValueError):
            return True

    @classmethod
    def open(cls, paths, **options) -> HDF5Catalog:
        if options:
            raise ValueError(
                f"the {cls.name!r} reader takes no options, got {sorted(options)}"
            )
        return cls(one_path(paths, cls.name))

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.paths = [self.path]
        self.source = str(self.path)
        self._stack = contextlib.ExitStack()
        try:
            self._f = self._stack.enter_context(
                _h5.open_checked(self.path, CATALOG_FORMAT, CATALOG_VERSIONS)
            )
            try:
                self._open()
            except (OSError, KeyError, RuntimeError) as err:  # h5py on damaged metadata
                raise FileFormatError(
                    f"{self.path}: damaged HDF5 catalog ({err})"
                ) from err
        except BaseException:
            self._stack.close()
            raise

    def _open_wavelength(self) -> int:
        """Check ``wavelength``; keep a one-grid one (read) or the per-row dataset.
        Returns P."""
        p, f = self.path, self._f
        if "wavelength" not in f or not isinstance(f["wavelength"], h5py.Dataset):
            raise FileFormatError(f"{p}: missing dataset 'wavelength'")
        ds = f["wavelength"]
        self.version = int(f.attrs["format_version"])
        self._wave = None
        self.per_row_wavelength = ds.ndim == 2
        if self.per_row_wavelength:
            if self.version < 2:
                raise FileFormatError(
                    f"{p}: wavelength {ds.shape}: a format_version 1 catalog holds one "
                    "grid (P,); one grid per spectrum needs format_version 2"
                )
            if ds.dtype.kind != "f":
                raise FileFormatError(
                    f"{p}: wavelength must be floating point, got {ds.dtype}"
                )
            self._wave, self.wavelength = ds, None
            return int(ds.shape[1])
        try:
            wave = as_float_array(_h5.read_dataset(f, "wavelength", p), "wavelength")
            if wave.ndim != 1:
                raise ValueError(
                    f"wavelength must be (P,) or (n_spec, P), got shape {wave.shape}"
                )
            check_wavelength(wave)
        except ValueError as err:
            raise FileFormatError(f"{p}: invalid wavelength: {err}") from err
        self.wavelength = wave
        self.wavelength.setflags(write=False)
        return int(wave.size)

    def _open(self) -> None:
        p, f = self.path, self._f
        for name in ("flux", "flux_err"):
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise FileFormatError(f"{p}: missing dataset {name!r}")
        n_pix = self._open_wavelength()
        flux, err = f["flux"], f["flux_err"]
        if flux.ndim != 2 or flux.shape[1] != n_pix:
            raise FileFormatError(
                f"{p}: flux {flux.shape} must be (n_spec, {n_pix}) for the "
                f"{n_pix}-pixel wavelength grid"
            )
        if self._wave is not None and self._wave.shape != flux.shape:
            raise FileFormatError(
                f"{p}: wavelength {self._wave.shape} must have the shape of flux "
                f"{flux.shape} (one grid per spectrum)"
            )
        if err.shape != flux.shape:
            raise FileFormatError(
                f"{p}: flux_err {err.shape} must have the shape of flux {flux.shape}"
            )
        if flux.dtype.kind != "f" or err.dtype.kind != "f":
            raise FileFormatError(
                f"{p}: flux and flux_err must be floating point, got {flux.dtype} "
                f"and {err.dtype}"
            )
        if flux.shape[0] == 0:
            raise FileFormatError(f"{p}: the catalog holds no spectra")
        self._mask = f.get("mask")
        if self._mask is not None and (
            self._mask.shape != flux.shape or self._mask.dtype != bool
        ):
            raise FileFormatError(
                f"{p}: mask {self._mask.shape} {self._mask.dtype} must be bool with "
                f"the shape of flux {flux.shape}"
            )
        self._ids, self._group = f.get("ids"), f.get("group")
        for name, ds in (("ids", self._ids), ("group", self._group)):
            if ds is not None and (
                not isinstance(ds, h5py.Dataset) or ds.shape != (flux.shape[0],)
            ):
                raise FileFormatError(
                    f"{p}: {name} {getattr(ds, 'shape', '')} must be "
                    f"({flux.shape[0]},), one per spectrum"
                )
        self._flux, self._err, self._n_pix = flux, err, n_pix
        self.has_mask = self._mask is not None
        self.has_ids = self._ids is not None
        self.has_group = self._group is not None
        self.meta = _h5.get_json_attr(f, "meta", p) if "meta" in f.attrs else {}

    def __len__(self) -> int:
        return int(self._flux.shape[0])

    @property
    def n_pix(self) -> int:
        """Pixels per spectrum (P)."""
        return self._n_pix

    def _unreadable(self, start: int, stop: int, err) -> FileFormatError:
        return FileFormatError(
            f"{self.source}: rows [{start}, {stop}) are corrupt or unreadable ({err})"
        )

    def _grids(self, sel, start: int, stop: int) -> np.ndarray:
        """Rows ``sel`` (a slice, or increasing rows) of a per-row ``wavelength``,
        read and checked; ``start:stop`` spans them."""
        try:
            wave = np.asarray(self._wave[sel], np.float64)
        except (OSError, KeyError, RuntimeError) as err:
            raise self._unreadable(start, stop, err) from err
        try:
            if isinstance(sel, slice):
                check_row_grids(wave, start)
            else:
                check_row_grids(wave, rows=sel)
        except ValueError as err:
            raise FileFormatError(f"{self.source}: invalid {err}") from err
        return wave

    def read_wavelength(self, start: int, stop: int) -> np.ndarray:
        """(m, P) float64 grids [Angstrom] of rows ``start:stop`` (only those are
        read; NaN = missing pixel); a one-grid catalog's grid repeated (read-only)."""
        if not self.per_row_wavelength:
            return super().read_wavelength(start, stop)
        start, stop = self._check_range(start, stop)
        return self._grids(slice(start, stop), start, stop)

    def read(self, start: int, stop: int) -> CatalogChunk:
        """Rows ``start:stop`` (only those are read from disk)."""
        start, stop = self._check_range(start, stop)
        return self._read(slice(start, stop), start, stop)

    def _read(self, sel, start: int, stop: int) -> CatalogChunk:
        """The rows ``sel`` (a slice, or increasing row numbers: h5py's fancy
        indexing) of every row dataset; ``start:stop`` spans them (for messages)."""
        wave = self._grids(sel, start, stop) if self.per_row_wavelength else None
        try:
            mask = self._mask[sel] if self.has_mask else None
            ids = group = None
            if self.has_ids:
                ids = np.array(self._ids.asstr()[sel], dtype=str)
            if self.has_group:
                group = np.array(self._group.asstr()[sel], dtype=str)
            return CatalogChunk(self._flux[sel], self._err[sel], mask, ids, wave, group)
        except (OSError, KeyError, RuntimeError, UnicodeDecodeError) as err:
            raise self._unreadable(start, stop, err) from err

    def read_rows(self, rows) -> CatalogChunk:
        """The rows ``rows`` ((m,) int, each once, any order), in that order, with
        :attr:`CatalogChunk.rows` set; only those rows are read (consecutive rows
        as one slab, others with h5py's fancy indexing in increasing order)."""
        r, order = self._row_indices(rows)
        srt = r[order]
        start, stop = int(srt[0]), int(srt[-1]) + 1
        sel = slice(start, stop) if stop - start == srt.size else srt
        return self._in_order(self._read(sel, start, stop), r, order)

    def read_group(self) -> np.ndarray | None:
        """(n,) str, the star of every row (the ``group`` dataset, read whole);
        None when the catalog has none.

        Raises:
            payne_lite.FileFormatError: unreadable, or an empty identifier (naming
                the row).
        """
        if not self.has_group:
            return None
        n = len(self)
        try:
            group = np.array(self._group.asstr()[()], dtype=str)
        except (OSError, KeyError, RuntimeError, UnicodeDecodeError) as err:
            raise self._unreadable(0, n, err) from err
        bad = np.flatnonzero(group == "")
        if bad.size:
            raise FileFormatError(
                f"{self.source}: group of row {int(bad[0])} is empty; every spectrum "
                "needs its star's identifier"
            )
        return group

    def close(self) -> None:
        self._stack.close()
