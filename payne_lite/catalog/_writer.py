"""Writing HDF5 catalogs of observed spectra (the layout is described in
:mod:`payne_lite.catalog._hdf5`, which reads them): :func:`write_catalog` for arrays in
memory, :func:`catalog_writer` / :class:`CatalogWriter` for catalogs written in pieces.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from .. import _h5
from .._validate import as_float_array, check_wavelength
from ._hdf5 import (
    CATALOG_FORMAT,
    CATALOG_VERSION,
    STRINGS_DIGEST_ATTR,
    StringsDigest,
    check_row_grids,
)

#: Target size of one HDF5 storage chunk of ``flux`` / ``flux_err`` [bytes].
_CHUNK_BYTES = 1 << 20


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
        self._digests = {}
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
                self._digests[name] = StringsDigest()  # their checksum instead

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
                self._digests[name].update(arr)
                arr = arr.astype(object)
            ds[start:stop] = arr
        self.n_spec = stop

    def strings_digests(self) -> dict:
        """{name: SHA-256 hex} of the string datasets written (``ids``, ``group``)."""
        return {name: d.hexdigest() for name, d in self._digests.items()}


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
            of every spectrum; or None for one grid per spectrum: every
            :meth:`CatalogWriter.append` then passes its rows' grids (m, P), and P
            is set by the first append.
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
    with _h5.atomic_h5_writer(
        path,
        CATALOG_FORMAT,
        CATALOG_VERSION,
        stamped=False,
        libver=_h5.CHECKSUMMED_LIBVER,  # metadata checksums (the layout's docstring)
    ) as f:
        if not per_row:  # chunked, with its Fletcher-32 checksum
            _h5.write_dataset(f, "wavelength", wave, compress=False)
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
        _h5.set_json_attr(f, STRINGS_DIGEST_ATTR, writer.strings_digests())


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
    """Write spectra to one catalog file (format version 3, with checksums: the
    layout is in :mod:`payne_lite.catalog._hdf5`).

    Args:
        path: the ``.h5`` file to write (atomically).
        flux: (n, P) observed flux; float32 is stored as float32, anything else as
            float64.
        flux_err: (n, P) 1-sigma errors.
        wavelength: observed vacuum wavelength [Angstrom]: (P,), strictly increasing,
            one grid for every spectrum; or (n, P), one grid per spectrum (for
            example visits not resampled, or several spectrographs), NaN for a
            missing pixel, each row's finite values strictly increasing.
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
