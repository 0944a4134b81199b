"""HDF5 catalogs of observed spectra: the file layout, a writer and a reader.

Catalog file layout (``format = "payne_lite.Catalog"``, ``format_version = 1``):

=====================  =========================  ==========================================
item                   shape / type               meaning
=====================  =========================  ==========================================
``wavelength``         (P,) float64               observed vacuum wavelength [Angstrom],
                                                  strictly increasing
``flux``               (n, P) float32 or float64  observed flux (dtype kept as written)
``flux_err``           (n, P) like ``flux``       1-sigma errors; non-finite or <= 0 means
                                                  the pixel is unusable
``mask``               (n, P) bool                optional, True = ignore the pixel
``ids``                (n,) UTF-8 str             optional, one identifier per spectrum
attr ``meta``          JSON object                provenance
=====================  =========================  ==========================================

The row datasets are stored in chunks of whole rows (about 1 MB each), so reading a
slab of rows touches only those rows; ``flux``, ``flux_err`` and ``mask`` carry
Fletcher-32 checksums, so a damaged chunk is reported instead of read as numbers
(variable-length ``ids`` cannot). ``flux`` and ``flux_err`` are not compressed (noisy
floats barely compress and would cost time on every read); the mask is (gzip).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from .. import _h5
from .._validate import as_float_array, check_wavelength
from ..errors import FileFormatError

CATALOG_FORMAT = "payne_lite.Catalog"
CATALOG_VERSION = 1

#: Target size of one HDF5 storage chunk of ``flux`` / ``flux_err`` [bytes].
_CHUNK_BYTES = 1 << 20


class CatalogChunk(NamedTuple):
    """Rows ``start:stop`` of a catalog.

    Attributes:
        flux: (m, P) observed flux.
        flux_err: (m, P) 1-sigma errors.
        mask: (m, P) bool, True = ignore; None when the catalog has no mask.
        ids: (m,) str identifiers; None when the catalog has none.
    """

    flux: np.ndarray
    flux_err: np.ndarray
    mask: np.ndarray | None
    ids: np.ndarray | None


# ======================================================================================
# HDF5 catalogs: writing
# ======================================================================================
def _check_rows(flux, flux_err, mask, ids, n_pix: int | None, where: str):
    """Validated (flux, flux_err, mask, ids) copies of one block of rows."""
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
    i = None
    if ids is not None:
        if np.shape(ids) != (f.shape[0],):
            raise ValueError(
                f"{where}: ids {np.shape(ids)} must be ({f.shape[0]},), one per spectrum"
            )
        i = np.array(
            [s.decode() if isinstance(s, bytes) else str(s) for s in np.asarray(ids)],
            dtype=str,
        )
    return f, e, m, i


class CatalogWriter:
    """Appends rows to an open catalog file; made by :func:`catalog_writer`."""

    def __init__(
        self, f: h5py.File, path: Path, n_pix: int, dtype, with_mask, with_ids
    ):
        self._f, self.path, self.n_pix = f, path, n_pix
        self._dtype = np.dtype(dtype)
        self.with_mask, self.with_ids = with_mask, with_ids
        rows = max(1, _CHUNK_BYTES // (n_pix * self._dtype.itemsize))
        self._sets = {}
        for name in ("flux", "flux_err"):
            self._sets[name] = f.create_dataset(
                name,
                shape=(0, n_pix),
                maxshape=(None, n_pix),
                dtype=self._dtype,
                chunks=(rows, n_pix),
                fletcher32=True,
            )
        if with_mask:
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
        if with_ids:
            self._sets["ids"] = f.create_dataset(
                "ids",
                shape=(0,),
                maxshape=(None,),
                dtype=h5py.string_dtype(),
                chunks=(max(rows, 1024),),  # variable-length: no checksum filter
            )
        self.n_spec = 0

    def append(self, flux, flux_err, *, mask=None, ids=None) -> None:
        """Append rows: flux, flux_err (m, P); mask (m, P) bool and ids (m,) if the
        writer was opened ``with_mask`` / ``with_ids`` (and only then)."""
        where = f"{self.path}: append"
        if (mask is not None) != self.with_mask:
            raise ValueError(
                f"{where}: the catalog was opened with_mask={self.with_mask}; "
                f"got mask={'an array' if mask is not None else 'None'}"
            )
        if (ids is not None) != self.with_ids:
            raise ValueError(
                f"{where}: the catalog was opened with_ids={self.with_ids}; "
                f"got ids={'an array' if ids is not None else 'None'}"
            )
        f, e, m, i = _check_rows(flux, flux_err, mask, ids, self.n_pix, where)
        start, stop = self.n_spec, self.n_spec + f.shape[0]
        for name, arr in (("flux", f), ("flux_err", e), ("mask", m), ("ids", i)):
            if arr is None:
                continue
            ds = self._sets[name]
            ds.resize(stop, axis=0)
            if name.startswith("flux"):
                arr = arr.astype(self._dtype, copy=False)
            elif name == "ids":
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
    meta: dict | None = None,
    overwrite: bool = False,
) -> Iterator[CatalogWriter]:
    """Write a catalog in pieces: ``with catalog_writer(...) as w: w.append(...)``.

    The file appears (atomically) when the block ends without an error; nothing of
    it is left behind otherwise. Memory stays at one appended block, so catalogs larger
    than memory can be written.

    Args:
        path: the ``.h5`` file to write.
        wavelength: (P,) observed vacuum wavelength [Angstrom], strictly increasing.
        dtype: storage dtype of flux and flux_err (float32 or float64).
        with_mask, with_ids: whether every :meth:`CatalogWriter.append` passes a mask
            / ids.
        meta: JSON-compatible provenance stored as ``attrs["meta"]``.
        overwrite: replace an existing file (otherwise FileExistsError).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: a bad wavelength grid or dtype; no spectra appended.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    wave = as_float_array(wavelength, "wavelength", ndim=1)
    check_wavelength(wave)
    if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
    with _h5.atomic_h5_writer(path, CATALOG_FORMAT, CATALOG_VERSION) as f:
        f.create_dataset("wavelength", data=wave)
        _h5.set_json_attr(f, "meta", dict(meta or {}))
        writer = CatalogWriter(f, path, wave.size, dtype, with_mask, with_ids)
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
    meta: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write spectra to one catalog file (layout in the module docstring).

    Args:
        path: the ``.h5`` file to write (atomically).
        flux: (n, P) observed flux; float32 is stored as float32, anything else as
            float64.
        flux_err: (n, P) 1-sigma errors.
        wavelength: (P,) observed vacuum wavelength [Angstrom], strictly increasing.
        mask: optional (n, P) bool, True = ignore the pixel.
        ids: optional (n,) identifiers, stored as str.
        meta: JSON-compatible provenance.
        overwrite: replace an existing file (otherwise FileExistsError).

    Returns:
        The path written.

    Raises:
        ValueError: shapes that do not fit together (named), no spectra, a bad
            wavelength grid.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    wave = as_float_array(wavelength, "wavelength", ndim=1)
    f, e, m, i = _check_rows(flux, flux_err, mask, ids, wave.size, str(path))
    if f.shape[0] == 0:
        raise ValueError(f"{path}: flux {f.shape} holds no spectra")
    with catalog_writer(
        path,
        wave,
        dtype=f.dtype,
        with_mask=m is not None,
        with_ids=i is not None,
        meta=meta,
        overwrite=overwrite,
    ) as w:
        w.append(f, e, mask=m, ids=i)
    return Path(path)


# ======================================================================================
# Readers
# ======================================================================================
class Reader:
    """Common interface: ``len``, ``wavelength`` (P,), ``read(start, stop)``, ``source``.

    Readers are context managers; :meth:`close` releases open files.
    """

    source: str
    wavelength: np.ndarray
    has_mask: bool
    has_ids: bool

    def __len__(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def read(self, start: int, stop: int) -> CatalogChunk:  # pragma: no cover
        raise NotImplementedError

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

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.source!r}, n_spec={len(self)}, "
            f"n_pix={self.wavelength.size}, mask={self.has_mask}, ids={self.has_ids})"
        )


class HDF5Catalog(Reader):
    """A catalog file written by :func:`write_catalog`, read a slab of rows at a time.

    The file stays open until :meth:`close` (or the end of a ``with`` block); the
    constructor checks format, version and shapes and reads only ``wavelength``.

    Raises:
        FileNotFoundError: no such file.
        payne_lite.FileFormatError: not a catalog file, another version, corrupt or
            truncated, missing datasets, shapes that do not fit together, no spectra.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.source = str(self.path)
        self._stack = contextlib.ExitStack()
        try:
            self._f = self._stack.enter_context(
                _h5.open_checked(self.path, CATALOG_FORMAT, (CATALOG_VERSION,))
            )
            self._open()
        except BaseException:
            self._stack.close()
            raise

    def _open(self) -> None:
        p, f = self.path, self._f
        wave = _h5.read_dataset(f, "wavelength", p)
        try:
            wave = as_float_array(wave, "wavelength", ndim=1)
            check_wavelength(wave)
        except ValueError as err:
            raise FileFormatError(f"{p}: invalid wavelength: {err}") from err
        for name in ("flux", "flux_err"):
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise FileFormatError(f"{p}: missing dataset {name!r}")
        flux, err = f["flux"], f["flux_err"]
        n_pix = wave.size
        if flux.ndim != 2 or flux.shape[1] != n_pix:
            raise FileFormatError(
                f"{p}: flux {flux.shape} must be (n_spec, {n_pix}) for the "
                f"{n_pix}-pixel wavelength grid"
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
        self._ids = f.get("ids")
        if self._ids is not None and self._ids.shape != (flux.shape[0],):
            raise FileFormatError(
                f"{p}: ids {self._ids.shape} must be ({flux.shape[0]},), one per spectrum"
            )
        self._flux, self._err = flux, err
        self.wavelength = wave
        self.wavelength.setflags(write=False)
        self.has_mask = self._mask is not None
        self.has_ids = self._ids is not None
        self.meta = _h5.get_json_attr(f, "meta", p) if "meta" in f.attrs else {}

    def __len__(self) -> int:
        return int(self._flux.shape[0])

    def read(self, start: int, stop: int) -> CatalogChunk:
        """Rows ``start:stop`` (only those are read from disk)."""
        start, stop = self._check_range(start, stop)
        try:
            mask = self._mask[start:stop] if self.has_mask else None
            ids = None
            if self.has_ids:
                ids = np.array(self._ids.asstr()[start:stop], dtype=str)
            return CatalogChunk(
                self._flux[start:stop], self._err[start:stop], mask, ids
            )
        except (OSError, KeyError, RuntimeError) as err:
            raise FileFormatError(
                f"{self.source}: rows [{start}, {stop}) are corrupt or unreadable "
                f"({err})"
            ) from err

    def close(self) -> None:
        self._stack.close()
