"""Catalog readers: one protocol (:class:`~payne_lite.catalog.Reader`), a registry, and
:func:`open_catalog`, which picks the reader for a source.

The readers, in the order they are asked whether a source is theirs:

========================  ================================================================
``"payne-lite"``          this package's HDF5 catalog (:func:`write_catalog`)
``"hdf5"``                any other HDF5 file with flux, error and wavelength datasets
                          (:class:`PlainHDF5Catalog`: names given or guessed)
``"fits-table"``          a FITS binary table of spectra, one row each
                          (:class:`FitsTableCatalog`)
``"apogee-visit"``        APOGEE apVisit files (one visit each, observed frame, own grid):
                          resampled onto the apStar grid, one row per visit grouped by
                          star, or one combined row per star
                          (:class:`ApogeeVisitCatalog`)
``"apogee-fits"``         APOGEE aspcapStar / apStar-like FITS files, one spectrum each
                          (:class:`ApogeeFitsCatalog`)
``"specutils"``           any file specutils' loaders read, one spectrum each
                          (:class:`SpecutilsCatalog`; asked for by name only)
========================  ================================================================

Adding a survey is one file: a :class:`Reader` subclass with a ``name``, a
``claims(paths)`` class method (cheap: headers, not data) and a constructor taking
``(paths, **options)``, registered with :func:`register_reader`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from ._apogee import (
    DEFAULT_CHUNK_SIZE,
    ApogeeFitsCatalog,
    check_chunk_size,
    chunk_bounds,
)
from ._apvisit import ApogeeVisitCatalog
from ._hdf5 import (
    FITS_SUFFIXES,
    HDF5_SUFFIXES,
    CatalogChunk,
    HDF5Catalog,
    Reader,
    has_suffix,
)
from ._plain import FitsTableCatalog, PlainHDF5Catalog
from ._specutils import SpecutilsCatalog

#: Registered reader classes, in the order :func:`open_catalog` asks them.
READERS: list[type[Reader]] = []

#: Suffixes a folder is searched for (HDF5 and FITS files).
FOLDER_SUFFIXES = (*HDF5_SUFFIXES, *FITS_SUFFIXES)


def register_reader(cls: type[Reader]) -> type[Reader]:
    """Add a reader class to the registry (a class decorator). Readers registered
    later are asked after the built-in ones."""
    if not getattr(cls, "name", ""):
        raise ValueError(f"{cls.__name__} needs a name")
    if any(r.name == cls.name for r in READERS):
        raise ValueError(f"a reader named {cls.name!r} is registered already")
    READERS.append(cls)
    return cls


def reader_names() -> list[str]:
    """Names of the registered readers, in the order they are asked."""
    return [r.name for r in READERS]


def expand_paths(source) -> list[Path]:
    """``source`` (a path, a folder, or a list of paths) as a list of paths; a folder
    gives its HDF5 and FITS files, sorted by name (not recursive)."""
    if isinstance(source, str | os.PathLike):
        p = Path(source)
        if p.is_dir():
            files = sorted(
                f for f in p.iterdir() if f.is_file() and has_suffix(f, FOLDER_SUFFIXES)
            )
            if not files:
                raise ValueError(
                    f"{p}: a folder with no catalog files ({', '.join(FOLDER_SUFFIXES)})"
                )
            return files
        return [p]
    return [Path(s) for s in source]


def _open(cls: type[Reader], paths: list[Path], options: dict) -> Reader:
    """``cls.open(paths, **options)``; options it does not take are a ValueError."""
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        bad = sorted(set(options) - set(accepted))
        if bad:
            takes = sorted(k for k, p in accepted.items() if p.kind is p.KEYWORD_ONLY)
            raise ValueError(
                f"the {cls.name!r} reader takes no option(s) {bad}; its options: "
                f"{takes or 'none'}"
            )
    return cls.open(paths, **options)


def open_catalog(source, *, reader: str | None = None, **options) -> Reader:
    """A reader for ``source``.

    Args:
        source: a file, a folder (its HDF5 / FITS files, by name), a list of files,
            or a reader (returned as it is).
        reader: the reader's name (see the module docstring; :func:`reader_names`);
            None = the first registered reader that claims the files.
        **options: the reader's options, e.g. ``bad_bits`` (``"apogee-fits"``),
            ``datasets`` (``"hdf5"``), ``columns`` (``"fits-table"``), ``format``
            (``"specutils"``).

    Returns:
        A :class:`Reader`: ``len()``, ``n_pix``, ``wavelength`` (P,) (None with one
        grid per spectrum: ``per_row_wavelength``), ``has_mask``, ``has_ids``,
        ``read(start, stop) -> CatalogChunk``, ``read_wavelength(start, stop)``; use
        it as a context manager.

    Raises:
        ValueError: an unknown reader name, an empty list or folder, files no reader
            claims, options a reader does not take.
        FileNotFoundError, payne_lite.FileFormatError: see the readers.
    """
    if isinstance(source, Reader):
        return source
    paths = expand_paths(source)
    if not paths:
        raise ValueError("no catalog files given")
    if reader is not None:
        by_name = {r.name: r for r in READERS}
        if reader not in by_name:
            raise ValueError(
                f"unknown reader {reader!r}; readers: {', '.join(by_name)}"
            )
        return _open(by_name[reader], paths, options)
    for cls in READERS:
        if cls.claims(paths):
            return _open(cls, paths, options)
    kinds = (
        f"an HDF5 file ({'/'.join(HDF5_SUFFIXES)}) or FITS files "
        f"({'/'.join(FITS_SUFFIXES)})"
    )
    if len(paths) > 1:
        bad = [str(p) for p in paths if not has_suffix(p, FITS_SUFFIXES)]
        raise ValueError(
            f"a catalog is {kinds}; a list is FITS files, one spectrum each; not FITS: "
            f"{', '.join(bad[:3])}"
        )
    raise ValueError(
        f"{paths[0]}: unknown catalog file type {paths[0].suffix!r}; expected {kinds}, "
        f"or name a reader (readers: {', '.join(reader_names())})"
    )


def iter_catalog(
    source, chunk_size: int = DEFAULT_CHUNK_SIZE, **kw
) -> Iterator[tuple[int, CatalogChunk]]:
    """Yield ``(start, CatalogChunk)`` for consecutive chunks of ``chunk_size`` rows.

    Only one chunk is in memory at a time; files are closed when the iteration ends.
    ``source`` and ``kw`` are as for :func:`open_catalog`.
    """
    chunk_size = check_chunk_size(chunk_size)
    with open_catalog(source, **kw) as cat:
        for start, stop in chunk_bounds(len(cat), chunk_size):
            yield start, cat.read(start, stop)


for _cls in (
    HDF5Catalog,
    PlainHDF5Catalog,
    FitsTableCatalog,
    ApogeeVisitCatalog,
    ApogeeFitsCatalog,
    SpecutilsCatalog,
):
    register_reader(_cls)
