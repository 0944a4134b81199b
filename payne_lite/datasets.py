"""Real example data that ships with payne_lite: The Payne's APOGEE network and spectra.

Two folders of real data, made by nobody on this project, ship in the repository's
``data/`` and in wheels as ``payne_lite/_data/`` (found as
:func:`payne_lite._datafiles.shipped_dir` finds them: installed package data first,
then the checkout's ``data/``):

* :func:`payne_apogee`: The Payne's classic per-pixel networks for APOGEE (Ting et al.
  2019; the 5-label network of continuum-normalised spectra, El-Badry et al. 2018),
  the APOGEE (ASPCAP) wavelength grid, pixel mask and continuum pixels, one real
  combined spectrum and three real visits of a double-lined binary. From The Payne /
  binspec code base (Ting, El-Badry et al. 2018-2019), MIT License; the spectra are
  public SDSS/APOGEE data.
* :func:`apogee_raw`: two real stars as the survey delivers them (SDSS DR13 ``apStar``
  and ASPCAP ``aspcapStar`` FITS files), as committed in jbirky/apogee_tools (MIT).

Each folder's ``README.md`` (shipped with it) describes every file and array::

    import payne_lite as pl

    d = pl.datasets.payne_apogee()
    emu = d.emulator()  # pl.Emulator, 5 labels, 7214 pixels
    s = d.combined_spectrum()
    table = pl.fit(s.flux, s.flux_err, emu, mask=d.mask)

Arrays are read from the files on every access (they are small), unchanged: the
dtypes are those stored, stated in each docstring. Wavelengths are in vacuum,
Angstrom.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import _datafiles
from .emulator import Emulator

__all__ = [
    "ApogeeRaw",
    "ApogeeVisits",
    "PayneApogee",
    "RawStar",
    "Spectrum",
    "apogee_raw",
    "payne_apogee",
]

#: Label names and units of the 5-label network, in its order. The fourth label is
#: [Mg/Fe], The Payne's alpha-element proxy, named ``[alpha/Fe]`` here.
PAYNE_LABELS_5 = ("Teff", "logg", "[Fe/H]", "[alpha/Fe]", "vmacro")
PAYNE_UNITS_5 = ("K", "dex", "dex", "dex", "km/s")

#: Files of ``payne_apogee/`` (attribute of :class:`PayneApogee` -> file name).
PAYNE_APOGEE_FILES = {
    "network": "nn_normalized_spectra_5label.npz",
    "network_unnormalized": "nn_unnormalized_spectra_4label.npz",
    "wavelength_file": "apogee_wavelength.npz",
    "mask_file": "apogee_mask.npz",
    "continuum_file": "apogee_cannon_continuum_pixels.npz",
    "visit_wavelength_file": "apogee_visit_wavelength.npz",
    "combined_file": "apogee_combined_2M13012770+5754582.npz",
    "visits_file": "apogee_visits_2M06133561+2433362.npz",
    "readme": "README.md",
}

#: The stars of ``apogee_raw/`` (2MASS ids) and the licence file shipped with them.
APOGEE_RAW_STARS = ("2M00452143+1634446", "2M03122509+0021585")
APOGEE_RAW_LICENSE = "LICENSE-apogee_tools"


class Spectrum(NamedTuple):
    """One continuum-normalised APOGEE spectrum on the ASPCAP grid."""

    flux: np.ndarray  #: (7214,) float32, continuum-normalised
    flux_err: np.ndarray  #: (7214,) float32, 1-sigma, same units
    wavelength: np.ndarray  #: (7214,) float64, vacuum Angstrom
    star: str  #: 2MASS id


class ApogeeVisits(NamedTuple):
    """Visit spectra of one star, normalised, on the ASPCAP grid, each in its own
    (observed) frame: not shifted to rest."""

    flux: np.ndarray  #: (V, 7214) float64, continuum-normalised
    flux_err: np.ndarray  #: (V, 7214) float64, 1-sigma
    snr: np.ndarray  #: (V,) float32, S/N of each visit
    vhelio: np.ndarray  #: (V,) float32, APOGEE's heliocentric radial velocity, km/s
    hjd: np.ndarray  #: (V,) float64, heliocentric Julian date - 2,400,000, days
    wavelength: np.ndarray  #: (7214,) float64, vacuum Angstrom
    star: str  #: 2MASS id


def _load(path: Path, key: str) -> np.ndarray:
    with np.load(path) as d:
        return d[key]


def _find(name: str, root: str | os.PathLike | None, files: list[str]) -> Path:
    """The folder of dataset ``name`` holding ``files``, or a FileNotFoundError
    naming where it looked."""
    if root is not None:
        folder, looked = Path(root), [Path(root)]
        if not folder.is_dir():
            raise FileNotFoundError(f"example data {name!r}: no folder {folder}")
    else:
        folder = _datafiles.shipped_dir(name)
        looked = [r / name for r in _datafiles.search_roots()]
        if folder is None:
            where = ", ".join(str(p) for p in looked) or "(no search folder exists)"
            raise FileNotFoundError(
                f"payne_lite's example data {name!r} not found; looked in: {where}. "
                f"It ships in the repository's data/{name}/ and in wheels as "
                f"payne_lite/_data/{name}/: reinstall payne_lite from a checkout or "
                f"a wheel, or pass root= the folder of a copy"
            )
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"example data {name!r} in {folder} is incomplete: missing {missing}"
        )
    return folder


@dataclass(frozen=True)
class PayneApogee:
    """The Payne's APOGEE data: file paths (``Path``) and loaders.

    Paths: :attr:`network` (the 5-label network of normalised flux),
    :attr:`network_unnormalized` (4 labels, unnormalised flux), :attr:`wavelength_file`,
    :attr:`mask_file`, :attr:`continuum_file`, :attr:`visit_wavelength_file`,
    :attr:`combined_file`, :attr:`visits_file`, :attr:`readme`, and :attr:`root`, the
    folder. Made by :func:`payne_apogee`.
    """

    root: Path
    network: Path
    network_unnormalized: Path
    wavelength_file: Path
    mask_file: Path
    continuum_file: Path
    visit_wavelength_file: Path
    combined_file: Path
    visits_file: Path
    readme: Path

    #: Label names and units of :meth:`emulator` (the network's order).
    label_names = PAYNE_LABELS_5
    label_units = PAYNE_UNITS_5

    @property
    def wavelength(self) -> np.ndarray:
        """(7214,) float64: the APOGEE (ASPCAP) grid, vacuum Angstrom, 15168-16937,
        log10(lambda) = 4.179 + 6e-6 k without the chip gaps."""
        return _load(self.wavelength_file, "wavelength")

    @property
    def mask(self) -> np.ndarray:
        """(7214,) bool: True = leave the pixel out of fits (875 pixels with known
        model or data problems); ``pl.fit(..., mask=d.mask)``."""
        return _load(self.mask_file, "apogee_mask")

    @property
    def continuum_pixels(self) -> np.ndarray:
        """(7214,) bool: True = a continuum pixel (The Cannon's choice)."""
        return _load(self.continuum_file, "pixels_cannon")

    @property
    def visit_wavelength(self) -> np.ndarray:
        """(12288,) float64: the wavelength grid of APOGEE visit (apVisit) spectra,
        vacuum Angstrom."""
        return _load(self.visit_wavelength_file, "wave")

    def emulator(self) -> Emulator:
        """The 5-label per-pixel network of continuum-normalised flux as an
        :class:`~payne_lite.Emulator` (read by :meth:`Emulator.from_payne_npz`).

        Labels :attr:`label_names` in :attr:`label_units` (Teff K, logg dex, [Fe/H]
        dex, [alpha/Fe] dex (The Payne's [Mg/Fe]), vmacro km/s); training box
        ``emu.label_lo .. emu.label_hi`` (about 4200-7000 K, logg 4.0-5.0: dwarfs);
        7214 pixels on :attr:`wavelength`; 5 sigmoid hidden units per pixel,
        float32 weights. Trained on observed APOGEE combined spectra with their
        labels (El-Badry et al. 2018). A new object on every call.
        """
        return Emulator.from_payne_npz(
            self.network,
            label_names=PAYNE_LABELS_5,
            label_units=PAYNE_UNITS_5,
            wavelength=self.wavelength,
        )

    def unnormalized_emulator(self) -> Emulator:
        """The 4-label network of unnormalised flux (Teff K, logg dex, [Fe/H] dex,
        [alpha/Fe] dex), trained on synthetic spectra; box about 3530-6980 K, logg
        0.34-5.2. The file predicts 1e6 f_lambda: the emulator's output is
        f_lambda itself (``flux_scale=1e-6``, folded into the last layer)."""
        return Emulator.from_payne_npz(
            self.network_unnormalized,
            label_names=PAYNE_LABELS_5[:4],
            label_units=PAYNE_UNITS_5[:4],
            wavelength=self.wavelength,
            flux_scale=1e-6,
        )

    def combined_spectrum(self) -> Spectrum:
        """The real combined spectrum of 2M13012770+5754582: continuum-normalised,
        on the ASPCAP grid (:attr:`wavelength`), with its 1-sigma errors."""
        with np.load(self.combined_file) as d:
            flux, err = d["spectrum"], d["spec_err"]
        return Spectrum(flux, err, self.wavelength, "2M13012770+5754582")

    def visits(self) -> ApogeeVisits:
        """Three real visits of 2M06133561+2433362, a double-lined binary (a
        single-star fit gives chi2/n of 4-9): normalised, on the ASPCAP grid, not
        shifted to rest, with APOGEE's heliocentric rv of each visit."""
        with np.load(self.visits_file) as d:
            arrays = (d["spectra"], d["spec_errs"], d["snrs"], d["vhelios"], d["hjds"])
        return ApogeeVisits(*arrays, self.wavelength, "2M06133561+2433362")


def payne_apogee(root: str | os.PathLike | None = None) -> PayneApogee:
    """The Payne's APOGEE network and the small real APOGEE files.

    Args:
        root: the folder of a copy of the data; default: the copy payne_lite ships.

    Returns:
        :class:`PayneApogee`: the file paths, and loaders (``emulator()``,
        ``wavelength``, ``mask``, ``combined_spectrum()``, ``visits()``, ...).

    Raises:
        FileNotFoundError: the folder (or one of its files) is missing; the message
            names where it looked.
    """
    folder = _find("payne_apogee", root, list(PAYNE_APOGEE_FILES.values()))
    return PayneApogee(
        root=folder, **{k: folder / f for k, f in PAYNE_APOGEE_FILES.items()}
    )


class RawStar(NamedTuple):
    """One star of :func:`apogee_raw`: its 2MASS id and FITS files."""

    star: str
    apstar: Path  #: apStar: HDU1 flux (1e-17 erg/s/cm^2/A), HDU2 error, HDU3 pixmask
    aspcapstar: Path  #: aspcapStar: HDU1 normalised flux, HDU2 error, HDU4 ASPCAP table


@dataclass(frozen=True)
class ApogeeRaw:
    """Two real APOGEE stars as the survey delivers them (SDSS DR13).

    ``apStar`` files: HDU1 flux (not continuum-normalised, 1e-17 erg/s/cm^2/Angstrom),
    HDU2 error, HDU3 the APOGEE_PIXMASK bitmask; rows 0-1 combined spectra, rows 2+
    the visits. ``aspcapStar`` files: HDU1 flux normalised by ASPCAP, HDU2 error,
    HDU4 the ASPCAP table. Both on 8575 pixels, log10(lambda / Angstrom) = 4.179 +
    6e-6 k (vacuum); the 7214-pixel ASPCAP grid of :func:`payne_apogee` is pixels
    ``numpy.r_[322:3242, 3648:6048, 6412:8306]``. Both stars are cool dwarfs outside
    the 5-label network's box: for reading, masking, normalisation and visits, not
    for label accuracy. Made by :func:`apogee_raw`.
    """

    root: Path
    stars: tuple[RawStar, ...]
    readme: Path
    license: Path

    @property
    def apstar(self) -> tuple[Path, ...]:
        """The apStar files, one per star."""
        return tuple(s.apstar for s in self.stars)

    @property
    def aspcapstar(self) -> tuple[Path, ...]:
        """The aspcapStar files, one per star."""
        return tuple(s.aspcapstar for s in self.stars)


def _raw_names(star: str) -> tuple[str, str]:
    return f"apStar-r6-{star}.fits", f"aspcapStar-r6-l30e.2-{star}.fits"


def apogee_raw(root: str | os.PathLike | None = None) -> ApogeeRaw:
    """Paths of two real APOGEE stars' apStar and aspcapStar FITS files.

    Args:
        root: the folder of a copy of the data; default: the copy payne_lite ships.

    Returns:
        :class:`ApogeeRaw`: ``stars``, one :class:`RawStar` (2MASS id, apStar and
        aspcapStar paths) per star, and the README and licence paths.

    Raises:
        FileNotFoundError: the folder (or one of its files) is missing; the message
            names where it looked.
    """
    files = [n for s in APOGEE_RAW_STARS for n in _raw_names(s)]
    folder = _find("apogee_raw", root, [*files, "README.md", APOGEE_RAW_LICENSE])
    stars = tuple(
        RawStar(s, *(folder / n for n in _raw_names(s))) for s in APOGEE_RAW_STARS
    )
    return ApogeeRaw(folder, stars, folder / "README.md", folder / APOGEE_RAW_LICENSE)
