"""Training grids of synthetic spectra: :class:`SpectralGrid` and its HDF5 file format.

File layout (``format = "payne_lite.SpectralGrid"``, ``format_version = 1``):

=====================  =========================  ==========================================
item                   shape / type               meaning
=====================  =========================  ==========================================
``wavelength``         (n_pix,) float64           vacuum wavelength [Angstrom], increasing
``labels``             (n_spec, n_lab) float64    physical label values
``flux``               (n_spec, n_pix) float32    continuum-normalised flux
``flux_err``           (n_spec, n_pix) float32    optional 1-sigma flux errors
attr ``label_names``   JSON list of str           e.g. ``["Teff", "logg", "[Fe/H]"]``
attr ``label_units``   JSON list of str           e.g. ``["K", "dex", "dex"]``
attr ``meta``          JSON object                provenance (who made it, seed, settings)
=====================  =========================  ==========================================
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from .. import _h5
from .._validate import (
    as_float_array,
    check_box,
    check_finite,
    check_names,
    check_wavelength,
)
from ..errors import FileFormatError
from ._readers import file_arrays, payne_zero_arrays

GRID_FORMAT = "payne_lite.SpectralGrid"
GRID_VERSION = 1


@dataclasses.dataclass(frozen=True, eq=False)
class SpectralGrid:
    """A grid of spectra with known labels, the input to :func:`payne_lite.train_emulator`.

    Attributes:
        wavelength: (n_pix,) vacuum wavelength [Angstrom], strictly increasing.
        labels: (n_spec, n_lab) physical labels.
        flux: (n_spec, n_pix) normalised flux.
        label_names: n_lab names, e.g. ``("Teff", "logg", "[Fe/H]")``.
        label_units: n_lab units, e.g. ``("K", "dex", "dex")``.
        flux_err: optional (n_spec, n_pix) 1-sigma errors (non-positive or inf = unusable).
        meta: provenance dictionary, stored with the file.
        box: optional (lo, hi), each (n_lab,): the label box the grid was designed to
            cover (for example the box a synthesizer sampled). An emulator trained on
            the grid takes it as its training box; without it, the box is the grid's
            per-label minimum and maximum.
    """

    wavelength: np.ndarray
    labels: np.ndarray
    flux: np.ndarray
    label_names: tuple[str, ...]
    label_units: tuple[str, ...]
    flux_err: np.ndarray | None = None
    meta: dict = dataclasses.field(default_factory=dict)
    box: tuple[np.ndarray, np.ndarray] | None = None

    def __post_init__(self):
        wave = as_float_array(self.wavelength, "wavelength", ndim=1)
        check_wavelength(wave)
        labels = as_float_array(self.labels, "labels", ndim=2)
        flux = as_float_array(self.flux, "flux", ndim=2, dtype=np.float32)
        n_spec, n_lab = labels.shape
        if n_spec < 1:
            raise ValueError("a SpectralGrid needs at least one spectrum")
        if flux.shape != (n_spec, wave.size):
            raise ValueError(
                f"flux {flux.shape} must be (n_spec, n_pix) = "
                f"({n_spec}, {wave.size}) to match labels {labels.shape} "
                f"and wavelength {wave.shape}"
            )
        check_finite(labels, "labels")
        check_finite(flux, "flux")
        names = check_names(self.label_names, n_lab, "label_names")
        units = tuple(str(u) for u in self.label_units)
        if len(units) != n_lab:
            raise ValueError(f"label_units: {len(units)} units for {n_lab} labels")
        err = None
        if self.flux_err is not None:
            err = as_float_array(self.flux_err, "flux_err", ndim=2, dtype=np.float32)
            if err.shape != flux.shape:
                raise ValueError(f"flux_err {err.shape} must match flux {flux.shape}")
            if np.isnan(err).any():
                raise ValueError(
                    "flux_err has NaN values (use inf for unusable pixels)"
                )
        box = None
        if self.box is not None:
            box = check_box(self.box[0], self.box[1], n_lab)
            span = box[1] - box[0]
            outside = (labels < box[0] - 1e-9 * span) | (labels > box[1] + 1e-9 * span)
            if outside.any():
                i, j = (int(v) for v in np.argwhere(outside)[0])
                raise ValueError(
                    f"labels[{i}] {names[j]} = {labels[i, j]:g} is outside the "
                    f"grid's box [{box[0][j]:g}, {box[1][j]:g}]"
                )
            for a in box:
                a.setflags(write=False)
        for name, val in [
            ("box", box),
            ("wavelength", wave),
            ("labels", labels),
            ("flux", flux),
            ("label_names", names),
            ("label_units", units),
            ("flux_err", err),
            ("meta", dict(self.meta)),
        ]:
            if isinstance(val, np.ndarray):
                val.setflags(write=False)
            object.__setattr__(self, name, val)

    # -- shape conveniences ---------------------------------------------------------
    @property
    def n_spec(self) -> int:
        return self.labels.shape[0]

    @property
    def n_pix(self) -> int:
        return self.wavelength.size

    @property
    def n_labels(self) -> int:
        return self.labels.shape[1]

    @property
    def label_box(self) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi): the design ``box`` if set, else per-label minimum and maximum."""
        if self.box is not None:
            return self.box
        return self.labels.min(axis=0), self.labels.max(axis=0)

    def __len__(self) -> int:
        return self.n_spec

    def __repr__(self) -> str:
        return (
            f"SpectralGrid(n_spec={self.n_spec}, n_pix={self.n_pix}, "
            f"labels={list(self.label_names)}, "
            f"wavelength={self.wavelength[0]:.1f}-{self.wavelength[-1]:.1f} A)"
        )

    def subset(self, index) -> SpectralGrid:
        """A new grid holding the spectra selected by ``index`` (slice, ints or bool mask)."""
        index = np.arange(self.n_spec)[index]
        return dataclasses.replace(
            self,
            labels=self.labels[index],
            flux=self.flux[index],
            flux_err=None if self.flux_err is None else self.flux_err[index],
        )

    def split(
        self, valid_fraction: float = 0.2, *, seed: int = 0
    ) -> tuple[SpectralGrid, SpectralGrid]:
        """Random train/validation split, reproducible from ``seed``.

        Returns:
            (train, valid), with ``round(valid_fraction * n_spec)`` spectra in ``valid``
            (at least one of each when ``n_spec >= 2``).
        """
        if not 0.0 < valid_fraction < 1.0:
            raise ValueError(
                f"valid_fraction must be in (0, 1), got {valid_fraction!r}"
            )
        if self.n_spec < 2:
            raise ValueError("cannot split a grid of fewer than 2 spectra")
        n_valid = min(max(1, round(valid_fraction * self.n_spec)), self.n_spec - 1)
        perm = np.random.default_rng(seed).permutation(self.n_spec)
        return self.subset(np.sort(perm[n_valid:])), self.subset(
            np.sort(perm[:n_valid])
        )

    # -- files ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the grid to one HDF5 file (atomically; see the module docstring)."""
        with _h5.atomic_h5_writer(path, GRID_FORMAT, GRID_VERSION) as f:
            _h5.write_dataset(f, "wavelength", self.wavelength, compress=False)
            _h5.write_dataset(f, "labels", self.labels, compress=False)
            _h5.write_dataset(f, "flux", self.flux)
            if self.flux_err is not None:
                _h5.write_dataset(f, "flux_err", self.flux_err)
            _h5.set_json_attr(f, "label_names", list(self.label_names))
            _h5.set_json_attr(f, "label_units", list(self.label_units))
            _h5.set_json_attr(f, "meta", self.meta)
            if self.box is not None:
                _h5.write_dataset(f, "box_lo", self.box[0], compress=False)
                _h5.write_dataset(f, "box_hi", self.box[1], compress=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SpectralGrid:
        """Read and validate a grid written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file.
            payne_lite.FileFormatError: corrupt, truncated, wrong kind or version.
            ValueError: inconsistent contents (shapes, non-finite values, wavelengths).
        """
        with _h5.open_checked(path, GRID_FORMAT, (GRID_VERSION,)) as f:
            kw = dict(
                wavelength=_h5.read_dataset(f, "wavelength", path),
                labels=_h5.read_dataset(f, "labels", path),
                flux=_h5.read_dataset(f, "flux", path),
                flux_err=_h5.read_dataset(f, "flux_err", path)
                if "flux_err" in f
                else None,
                label_names=_h5.get_json_attr(f, "label_names", path),
                label_units=_h5.get_json_attr(f, "label_units", path),
                meta=_h5.get_json_attr(f, "meta", path),
                box=(
                    (
                        _h5.read_dataset(f, "box_lo", path),
                        _h5.read_dataset(f, "box_hi", path),
                    )
                    if "box_lo" in f
                    else None
                ),
            )
        try:
            return cls(**kw)
        except ValueError as err:
            raise FileFormatError(f"{path}: invalid grid contents: {err}") from err

    @classmethod
    def from_payne_npz(
        cls,
        path: str | os.PathLike,
        *,
        label_names: Sequence[str] | None = None,
        label_units: Sequence[str] | None = None,
        wavelength=None,
    ) -> SpectralGrid:
        """Read a training-spectra ``.npz`` file in The Payne's layout.

        The Payne's files hold ``labels`` as (n_lab, n_spec) (its convention) or
        (n_spec, n_lab), ``spectra`` as (n_spec, n_pix) and usually ``wavelength``;
        ``wavelength`` can be given when the file lacks it. The orientation of
        ``labels`` is taken from ``label_names`` when given, otherwise (n_lab, n_spec)
        whenever its second axis matches the number of spectra.
        """
        path = os.fspath(path)
        data = _h5.read_npz(path, ("labels", "spectra"), "a Payne training set")
        flux = np.asarray(data["spectra"])
        labels = np.asarray(data["labels"])
        if labels.ndim != 2 or flux.ndim != 2:
            raise FileFormatError(
                f"{path}: labels {labels.shape} and spectra "
                f"{flux.shape} must both be 2-D"
            )
        n_spec = flux.shape[0]
        if label_names is not None and labels.shape != (n_spec, len(label_names)):
            if labels.shape == (len(label_names), n_spec):
                labels = labels.T
        elif labels.shape[1] == n_spec:
            # The Payne stores (n_lab, n_spec); a square array is read that way too.
            labels = labels.T
        if labels.shape[0] != n_spec:
            raise FileFormatError(
                f"{path}: labels {data['labels'].shape} do not match {n_spec} spectra"
            )
        if wavelength is None:
            if "wavelength" not in data:
                raise FileFormatError(f"{path}: no 'wavelength' key; pass wavelength=")
            wavelength = data["wavelength"]
        n_lab = labels.shape[1]
        if label_names is None:
            label_names = [f"label_{i}" for i in range(n_lab)]
        if label_units is None:
            label_units = [""] * n_lab
        return cls(
            wavelength=wavelength,
            labels=labels,
            flux=flux,
            label_names=label_names,
            label_units=label_units,
            flux_err=data.get("spectra_err"),
            meta={"source": f"The Payne npz: {os.path.basename(path)}"},
        )

    @classmethod
    def from_payne_zero(
        cls,
        folder: str | os.PathLike,
        labels=None,
        *,
        label_names: Sequence[str] | None = None,
        label_units: Sequence[str] | None = None,
        file_column: str | None = None,
        flux: str = "normalized_flux",
        pattern: str = "*.npz",
    ) -> SpectralGrid:
        """Read a folder of Payne Zero spectrum archives (one ``.npz`` per spectrum,
        wavelength in nm) with a label table.

        The layout read and the guesses made are described in
        ``payne_lite/grid/_readers.py`` (shown in the file formats page).

        Args:
            folder: the folder of ``.npz`` spectrum archives.
            labels: the label table: a path (CSV, ECSV, FITS), an astropy
                ``Table``, a dict of columns or a structured array; one row per
                spectrum and a column (``file_column``, else ``file``,
                ``filename``, ``path``, ``spectrum``, ``name`` or ``id``) naming
                its file (with or without ``.npz``). None: each archive's
                ``metadata_json`` labels (Payne Zero's label-driven spectra).
            label_names: labels to use, in order (default: every numeric column
                but the file names).
            label_units: their units.
            file_column: the table's column of file names.
            flux: ``"normalized_flux"`` (default) or ``"flux_total"``.
            pattern: files to read without a table.

        Raises:
            FileNotFoundError: no folder, or a file the table names is missing.
            payne_lite.FileFormatError: an archive of another layout (its keys are
                listed), spectra on different wavelength grids, no labels found,
                or arrays a grid cannot hold (non-finite values, wavelengths not
                increasing).
            ValueError: a bad label table.
        """
        kw = payne_zero_arrays(
            folder,
            labels,
            label_names=label_names,
            label_units=label_units,
            file_column=file_column,
            flux=flux,
            pattern=pattern,
        )
        try:
            return cls(**kw)
        except ValueError as err:
            raise FileFormatError(f"{folder}: invalid grid contents: {err}") from err

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        *,
        flux: str | None = None,
        wavelength: str | None = None,
        labels: str | None = None,
        flux_err: str | None = None,
        label_names: Sequence[str] | None = None,
        label_units: Sequence[str] | None = None,
        wavelength_unit: str | None = None,
    ) -> SpectralGrid:
        """Read a generic ``.npz`` or HDF5 grid: a flux array, a wavelength array and
        labels, by the names given or guessed (the names tried are in
        ``payne_lite/grid/_readers.py``, shown in the file formats page).

        Args:
            path: a ``.npz`` file, or anything else as HDF5.
            flux, wavelength, labels, flux_err: the arrays' names (HDF5: dataset
                paths or their last component); default guessed.
            label_names: the labels' names when the file has none, or the 1-D
                arrays holding one label each.
            label_units: their units.
            wavelength_unit: ``"Angstrom"`` or ``"nm"`` (default: ``nm`` for a name
                ending ``_nm`` or an HDF5 ``unit`` attribute saying so, else
                Angstrom).

        Raises:
            FileNotFoundError: no such file.
            payne_lite.FileFormatError: the layout is not recognised: the message
                lists every array found (name, shape, dtype) and the names tried;
                or arrays a grid cannot hold.
        """
        kw = file_arrays(
            path,
            flux=flux,
            wavelength=wavelength,
            labels=labels,
            flux_err=flux_err,
            label_names=label_names,
            label_units=label_units,
            wavelength_unit=wavelength_unit,
        )
        try:
            return cls(**kw)
        except ValueError as err:
            raise FileFormatError(f"{path}: invalid grid contents: {err}") from err
