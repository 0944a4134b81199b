"""HDF5 catalogs of observed spectra: the file layout and the reader (the writer is
``payne_lite/catalog/_writer.py``).

Catalog file layout (``format = "payne_lite.Catalog"``, ``format_version`` 1, 2 or 3):

=========================  =========================  ==========================================
item                       shape / type               meaning
=========================  =========================  ==========================================
``wavelength``             (P,) float64               one grid for every spectrum: observed
                                                      vacuum wavelength [Angstrom], finite,
                                                      positive, strictly increasing
                           or (n, P) float64          (version 2 on) one grid per spectrum (row
                                                      i is spectrum i's); NaN marks a missing
                                                      pixel (masked when fitted, as in
                                                      :func:`payne_lite.fit`); each row has at
                                                      least 2 finite values, positive and
                                                      strictly increasing
``flux``                   (n, P) float32 or float64  observed flux (dtype kept as written)
``flux_err``               (n, P) like ``flux``       1-sigma errors; non-finite or <= 0 means
                                                      the pixel is unusable
``mask``                   (n, P) bool                optional, True = ignore the pixel
``ids``                    (n,) UTF-8 str             optional, one identifier per spectrum
``group``                  (n,) UTF-8 str             optional, the star of each spectrum:
                                                      spectra with the same (non-empty)
                                                      value are visits of one star, fitted
                                                      jointly by ``fit_catalog(...,
                                                      group=True)``
attr ``meta``              JSON object                provenance
attr ``strings_sha256``    JSON object                (version 3) the SHA-256 of ``ids`` and
                                                      of ``group`` (those present), see
                                                      :class:`StringsDigest`
=========================  =========================  ==========================================

Versions: version 2 added the (n, P) ``wavelength``; version 3 adds checksums that
cover the whole file, so that damage is refused (``FileFormatError``) instead of read
as other numbers:

* the file is written in HDF5's 1.10 file format (``libver=("v110", "latest")``),
  whose metadata (superblock, object headers with the attributes, the chunk indexes)
  carries checksums that libhdf5 verifies whenever it reads them;
* every numeric dataset, the one-grid ``wavelength`` included, is chunked with the
  Fletcher-32 filter, which libhdf5 verifies for each chunk it reads, so that
  verifying costs nothing extra and only the rows read are verified;
* ``ids`` and ``group`` (variable-length strings: HDF5's heap for them has no
  checksum) are covered by ``strings_sha256``, verified when the file is opened
  (about 0.1 s for 100,000 rows).

Versions 1 and 2 (written by payne_lite before version 3: one grid as 1, a grid per
spectrum as 2) are still read, with only the Fletcher-32 checksums of their row
datasets; older payne_lite versions refuse a version-3 file by its version (instead
of misreading it). This reader refuses any other version.

``group`` needs no new version: it changes no other item, and a reader that does not
know it reads every spectrum as it is stored; its only use is to ask for joint fits
(``fit_catalog(..., group=True)``, ``payne-lite fit --group``), which such a reader
cannot be asked for. An older payne_lite fits the visits one by one, which is what it
can do, and says so by its one row per spectrum.

The row datasets are stored in chunks of whole rows (about 1 MB each), so reading a
slab of rows touches only those rows. ``flux``,
``flux_err`` and ``wavelength`` are not compressed (noisy floats barely compress and
would cost time on every read); the mask is (gzip).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import ClassVar, NamedTuple

import h5py
import numpy as np

from .. import _h5
from .._validate import as_float_array, check_wavelength
from ..errors import FileFormatError

CATALOG_FORMAT = "payne_lite.Catalog"
#: The catalog layout written (3: checksums cover the whole file; 2 added a
#: wavelength grid per spectrum; see the module docstring).
CATALOG_VERSION = 3
#: The catalog versions this reader reads.
CATALOG_VERSIONS = (1, 2, 3)
#: attrs key (version 3) of the checksums of the string datasets (JSON object).
STRINGS_DIGEST_ATTR = "strings_sha256"

#: File name endings of HDF5 and FITS files (catalog readers claim files by them).
HDF5_SUFFIXES = (".h5", ".hdf5")
FITS_SUFFIXES = (".fits", ".fit", ".fits.gz", ".fit.gz")


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


class StringsDigest:
    """SHA-256 of a string dataset's values in row order, fed a block of rows at a
    time (the same for any split into blocks): their UTF-8 bytes joined by NUL
    (which HDF5 strings cannot hold); the row count is the dataset's shape."""

    def __init__(self):
        self._h = hashlib.sha256()
        self._n = 0

    def update(self, values) -> None:
        """Add the next rows' values (str or bytes)."""
        enc = [v if isinstance(v, bytes) else str(v).encode() for v in values]
        if enc:
            self._h.update((b"\0" if self._n else b"") + b"\0".join(enc))
            self._n += len(enc)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


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

    #: The option (set to True) under which this reader reads each star's visits,
    #: grouped by star (apStar, apVisit files: ``"visits"``); None when its files
    #: cannot say which star a spectrum belongs to.
    visits_option: str | None = None

    def grouped(self) -> Reader:
        """This catalog read as stars of one or more spectra, for joint visit fits
        (``fit_catalog(group=True)``, ``payne-lite fit --group``): ``self`` when it
        holds group ids or has no :attr:`visits_option`; else a new reader of the
        same files with that option on (an apStar file's visits), which the caller
        closes."""
        if self.has_group or self.visits_option is None:
            return self
        return type(self).open(
            self.paths, **{**self.options(), self.visits_option: True}
        )

    def provenance(self) -> dict:
        """What the reader did to the spectra, JSON-compatible, for the results'
        meta (:func:`payne_lite.fit_catalog` adds it): for example the continuum
        normalisation (``"continuum"``); {} = the spectra as stored."""
        return {}

    def fit_defaults(self) -> dict:
        """Keywords of :func:`payne_lite.fit` that this catalog's spectra need, as
        the reader read them; the caller's own win. :func:`payne_lite.fit_catalog`
        and ``payne-lite fit`` use them; with ``open_catalog`` and ``pl.fit``, pass
        them on (``pl.fit(..., **{**cat.fit_defaults(), **mine})``). For example
        ``{"cont_deg": ChipPolynomial}`` when the flux was left unnormalised for a
        continuum fitted with the model (:class:`payne_lite.FitContinuum`); {} =
        none."""
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
        except (OSError, ValueError, KeyError, RuntimeError):  # KeyError: h5py on a
            return True  # header that fails its metadata checksum

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
        if self.version >= 3:
            self._check_checksums()

    def _check_checksums(self) -> None:
        """Version 3: the file has what makes damage show (module docstring), and its
        ``ids`` and ``group`` match their checksums."""
        p, f = self.path, self._f
        if f.id.get_create_plist().get_version()[0] < 2:
            raise FileFormatError(
                f"{p}: a format_version 3 catalog has HDF5 metadata checksums "
                "(superblock version >= 2); this file has none"
            )
        for name in ("wavelength", "flux", "flux_err", "mask"):
            if name in f and not f[name].fletcher32:
                raise FileFormatError(
                    f"{p}: {name} has no Fletcher-32 checksum, which every numeric "
                    "dataset of a format_version 3 catalog has"
                )
        want = _h5.get_json_attr(f, STRINGS_DIGEST_ATTR, p)
        if not isinstance(want, dict):
            raise FileFormatError(f"{p}: attribute {STRINGS_DIGEST_ATTR!r} is damaged")
        for name, ds in (("ids", self._ids), ("group", self._group)):
            if (ds is None) != (name not in want):
                raise FileFormatError(
                    f"{p}: damaged catalog: {name!r} is "
                    + ("missing" if ds is None else "not covered by its checksum")
                )
            if ds is None:
                continue
            digest = StringsDigest()
            digest.update(ds[()])
            if digest.hexdigest() != want[name]:
                raise FileFormatError(
                    f"{p}: damaged catalog: its {name!r} do not match the checksum "
                    "written with them"
                )

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
