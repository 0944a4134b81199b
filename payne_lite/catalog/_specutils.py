"""Files that specutils' loaders read, one spectrum each, as a catalog
(:class:`SpecutilsCatalog`, reader ``"specutils"``; ``pip install
'payne-lite[specutils]'``).

Each file is read with ``specutils.Spectrum.read(path, format=format)`` (``format``
None lets specutils identify it; for example ``"APOGEE aspcapStar"``,
``"APOGEE apStar"``, ``"tabular-fits"``, ``"wcs1d-fits"``), and its wavelength,
uncertainty, mask and medium are taken as :mod:`payne_lite.spectra` takes them from
any spectrum. Air wavelengths are converted to vacuum here (the catalog is then in
vacuum, as every catalog is). All files must share the first file's grid, medium
and flux unit: checked when each is read.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import FileFormatError
from ..observe.broadening import air_to_vacuum
from ..spectra import SpectraInput, read_spectra
from ._hdf5 import CatalogChunk, Reader


class SpecutilsCatalog(Reader):
    """Files read by specutils' loaders, one spectrum per file (see the module
    docstring). The constructor reads the first file; ``read(start, stop)`` reads
    files ``start:stop``. Ids are the file names without their suffixes.

    Raises:
        ImportError: specutils is not installed.
        FileNotFoundError: a missing file.
        payne_lite.FileFormatError: a file specutils cannot read, or whose grid,
            medium or flux unit differs from the first's.
        ValueError: an empty list.
    """

    name = "specutils"

    def __init__(
        self, paths: Sequence[str | os.PathLike], *, format: str | None = None
    ):
        try:
            import specutils  # noqa: F401
        except ImportError as err:
            raise ImportError(
                "the 'specutils' reader needs specutils: pip install "
                "'payne-lite[specutils]'"
            ) from err
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("no files given: the catalog holds no spectra")
        for p in self.paths:
            if not p.is_file():
                raise FileNotFoundError(f"{p}: no such file")
        self.format = format
        first = self.paths[0]
        self.source = (
            str(first)
            if len(self.paths) == 1
            else f"{first} and {len(self.paths) - 1} more file(s) (specutils)"
        )
        s = self._read_one(first)
        self._first = s
        self.wavelength = self._vacuum(s)
        self.wavelength.setflags(write=False)
        self.has_mask = True
        self.has_ids = True
        self.medium = s.medium or "vacuum (not stated)"
        if s.medium is None:
            warnings.warn(
                f"{first}: the spectrum does not state air or vacuum; vacuum is assumed "
                "for every file of the catalog",
                UserWarning,
                stacklevel=3,
            )

    def options(self) -> dict:
        return {"format": self.format}

    def __len__(self) -> int:
        return len(self.paths)

    def _read_one(self, path: Path) -> SpectraInput:
        from specutils import Spectrum

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # astropy's unit and keyword chatter
                spec = Spectrum.read(path, format=self.format)
            s = read_spectra(spec)
        except (OSError, ValueError, TypeError, KeyError, IndexError) as err:
            how = f"format={self.format!r}" if self.format else "any specutils loader"
            raise FileFormatError(f"{path}: not readable with {how} ({err})") from err
        if s.flux.ndim != 1:
            raise FileFormatError(
                f"{path}: {s.flux.shape[0]} spectra in one file; this reader takes one "
                "spectrum per file"
            )
        return s

    @staticmethod
    def _vacuum(s: SpectraInput) -> np.ndarray:
        wave = np.asarray(s.wavelength, np.float64)
        return air_to_vacuum(wave) if s.medium == "air" else wave.copy()

    def read(self, start: int, stop: int) -> CatalogChunk:
        """Spectra of files ``start:stop``; each is checked against the first."""
        start, stop = self._check_range(start, stop)
        rows = []
        for p in self.paths[start:stop]:
            s = self._read_one(p)
            same_unit = s.flux_unit.to_string() == self._first.flux_unit.to_string()
            if s.medium != self._first.medium or not same_unit:
                raise FileFormatError(
                    f"{p}: medium {s.medium} and flux unit {s.flux_unit} differ from "
                    f"{self.paths[0]}'s ({self._first.medium}, {self._first.flux_unit})"
                )
            if not np.array_equal(self._vacuum(s), self.wavelength):
                raise FileFormatError(
                    f"{p}: wavelength grid differs from {self.paths[0]}'s; the files "
                    "of one catalog share one grid"
                )
            rows.append(s)
        ids = np.array([_stem(p) for p in self.paths[start:stop]], dtype=str)
        return CatalogChunk(
            np.stack([r.flux for r in rows]),
            np.stack([r.flux_err for r in rows]),
            np.stack([r.mask for r in rows]),
            ids,
        )


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (
        ".fits.gz",
        ".fit.gz",
        ".fits",
        ".fit",
        ".h5",
        ".hdf5",
        ".txt",
        ".csv",
    ):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem
