"""Catalog readers for what people have (payne_lite.catalog._readers, _plain,
_specutils): a plain HDF5 file written with h5py, a FITS table of spectra and a folder
of APOGEE files read through specutils each give, through fit_catalog, the table that
pl.fit gives on the same arrays; names are guessed or refused with what the file
holds; one reader protocol, one registry."""

from __future__ import annotations

import shutil
import warnings

import h5py
import numpy as np
import pytest

import payne_lite as pl
from payne_lite.catalog import (
    CatalogChunk,
    FitsTableCatalog,
    PlainHDF5Catalog,
    Reader,
    read_apogee_fits,
    reader_names,
    register_reader,
)
from payne_lite.errors import FileFormatError

N = 6
COLS = ("Teff", "logg", "[Fe/H]", "rv")


@pytest.fixture(scope="module")
def mock(tiny_emulator_module):
    emu = tiny_emulator_module
    rng = np.random.default_rng(3)
    lo, hi = emu.label_lo, emu.label_hi
    labels = lo + (hi - lo) * rng.uniform(0.25, 0.75, (N, len(lo)))
    flux = np.asarray(emu.predict(labels), np.float64)
    err = np.full(flux.shape, 0.01)
    flux = flux + err * rng.standard_normal(flux.shape)
    flux[2, 10:14] = np.nan  # a few bad pixels
    ids = np.array([f"star{i}" for i in range(N)])
    ref = pl.fit(flux, err, emu, wavelength=emu.wavelength)
    return emu, flux, err, ids, ref


@pytest.fixture(scope="module")
def tiny_emulator_module():
    from conftest import build_tiny_emulator

    return build_tiny_emulator()


def assert_same(got, ref, rtol=0.0):
    assert len(got) == len(ref)
    for c in COLS:
        np.testing.assert_allclose(got[c], ref[c], rtol=rtol, atol=0, err_msg=c)
    assert list(got["flags"]) == list(ref["flags"])


def test_plain_hdf5_with_guessed_names(mock, tmp_path):
    """Datasets named as people name them: 'spectra', inverse variances, 'wave' in
    nm (its unit attribute says so), 'names'; ids come along, errors converted."""
    emu, flux, err, ids, ref = mock
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f["spectra"] = flux
        f["ivar"] = 1.0 / err**2
        f["wave"] = emu.wavelength / 10.0
        f["wave"].attrs["unit"] = "nm"
        f["names"] = ids.astype("S")
        f["other_thing"] = np.arange(3)
    with pl.open_catalog(path) as cat:
        assert isinstance(cat, PlainHDF5Catalog) and len(cat) == N and cat.has_ids
        assert cat.options()["roles"] == {
            "flux": "spectra",
            "flux_ivar": "ivar",
            "wavelength": "wave",
            "ids": "names",
        }
        chunk = cat.read(0, N)
        np.testing.assert_allclose(chunk.flux_err, err, rtol=1e-12)
    t = pl.fit_catalog(path, tmp_path / "plain.fits", emu, progress=False)
    assert list(t["id"]) == list(ids)
    assert_same(t, ref, rtol=1e-9)


def test_plain_hdf5_names_refused_with_what_the_file_holds(mock, tmp_path):
    emu, flux, err, ids, _ = mock
    path = tmp_path / "ambiguous.h5"
    with h5py.File(path, "w") as f:
        f["flux"], f["err"], f["sigma"] = flux, err, err
        f["wavelength"] = emu.wavelength
    with pytest.raises(
        FileFormatError, match=r"\['err', 'sigma'\] could each be 'flux_err'"
    ):
        pl.open_catalog(path)
    # named: read
    with pl.open_catalog(path, datasets={"flux_err": "sigma"}) as cat:
        assert cat.options()["roles"]["flux_err"] == "sigma"
    bare = tmp_path / "bare.h5"
    with h5py.File(bare, "w") as f:
        f["a"], f["b"], f["c"] = flux, err, emu.wavelength
    with pytest.raises(
        FileFormatError, match=r"no flux.*it holds datasets \['a', 'b', 'c'\]"
    ):
        pl.open_catalog(bare)
    with pl.open_catalog(
        bare, datasets={"flux": "a", "flux_err": "b", "wavelength": "c"}
    ) as cat:
        np.testing.assert_array_equal(cat.read(0, 2).flux, flux[:2])
    with h5py.File(tmp_path / "nm.h5", "w") as f:  # nm without a unit: not guessed
        f["flux"], f["flux_err"], f["wavelength"] = flux, err, emu.wavelength / 10
    with pytest.raises(FileFormatError, match="do not look like Angstrom"):
        pl.open_catalog(tmp_path / "nm.h5")


def test_fits_table_of_spectra(mock, tmp_path):
    from astropy.table import Table

    emu, flux, err, ids, ref = mock
    t = Table()
    t["OBJID"] = ids
    t["FLUX"] = flux.astype(np.float32).astype(np.float64)
    t["FLUX_ERR"] = err
    t["WAVELENGTH"] = np.broadcast_to(emu.wavelength, flux.shape)
    t["WAVELENGTH"].unit = "Angstrom"
    t["MASK"] = np.zeros(flux.shape, np.int16)
    t["MASK"][4, 20:25] = 1  # a bitmask: non-zero is bad
    t["SNR"] = np.full(N, 50.0)
    path = tmp_path / "spectra.fits"
    t.write(path)
    with pl.open_catalog(path) as cat:
        assert isinstance(cat, FitsTableCatalog)
        assert not cat.per_row_wavelength  # identical rows: one grid
        chunk = cat.read(3, 6)
        assert chunk.mask[1, 20:25].all() and chunk.mask.sum() == 5
    got = pl.fit_catalog(path, tmp_path / "out.fits", emu, progress=False)
    mask = np.zeros(flux.shape, bool)
    mask[4, 20:25] = True
    want = pl.fit(t["FLUX"].data, err, emu, wavelength=emu.wavelength, mask=mask)
    assert list(got["id"]) == list(ids)
    assert_same(got, want)
    assert got["Teff"][4] != ref["Teff"][4]  # the mask was used


def test_apogee_folder_through_specutils(tmp_path):
    """Both real stars' aspcapStar files in a folder, read by specutils' loader:
    fit_catalog gives pl.fit's table on the arrays payne_lite's own reader reads."""
    pytest.importorskip("specutils")
    d = pl.datasets.payne_apogee()
    emu = d.emulator()
    folder = tmp_path / "aspcap"
    folder.mkdir()
    stars = pl.datasets.apogee_raw().stars
    for s in stars:
        shutil.copy(s.aspcapstar, folder)
    cat = pl.open_catalog(folder, reader="specutils", format="APOGEE aspcapStar")
    assert len(cat) == 2 and cat.options() == {"format": "APOGEE aspcapStar"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pl.WavelengthGridWarning)
        got = pl.fit_catalog(cat, tmp_path / "out.fits", emu, progress=False)
        cat.close()
        ours = [
            read_apogee_fits(s.aspcapstar)
            for s in sorted(stars, key=lambda s: s.aspcapstar.name)
        ]
        want = pl.fit(
            np.stack([o.flux for o in ours]),
            np.stack([o.flux_err for o in ours]),
            emu,
            mask=np.stack([o.mask for o in ours]),
            wavelength=ours[0].wavelength,
        )
    assert list(got["id"]) == [o.id for o in ours]
    for c in (*emu.label_names, "rv"):
        np.testing.assert_array_equal(got[c], want[c], err_msg=c)


def test_registry_takes_a_new_reader(tmp_path):
    """Adding a survey is one class: registered, it is asked after the built-ins."""

    class Npz(Reader):
        name = "test-npz"

        @classmethod
        def claims(cls, paths):
            return len(paths) == 1 and paths[0].suffix == ".npz"

        def __init__(self, paths):
            z = np.load(paths[0])
            self.paths, self.source = list(paths), str(paths[0])
            self._flux, self._err = z["flux"], z["err"]
            self.wavelength, self.has_mask, self.has_ids = z["wave"], False, False

        def __len__(self):
            return len(self._flux)

        def read(self, start, stop):
            return CatalogChunk(
                self._flux[start:stop], self._err[start:stop], None, None
            )

    np.savez(
        tmp_path / "x.npz",
        flux=np.ones((3, 4)),
        err=np.ones((3, 4)),
        wave=np.arange(4.0) + 5000,
    )
    with pytest.raises(ValueError, match="unknown catalog file type '.npz'"):
        pl.open_catalog(tmp_path / "x.npz")
    from payne_lite.catalog import _readers

    register_reader(Npz)
    try:
        assert reader_names()[-1] == "test-npz"
        with pl.open_catalog(tmp_path / "x.npz") as cat:
            assert isinstance(cat, Npz) and cat.read(0, 2).flux.shape == (2, 4)
        with pytest.raises(ValueError, match="already"):
            register_reader(Npz)
    finally:
        _readers.READERS.remove(Npz)
    with pytest.raises(
        ValueError, match=r"unknown reader 'nope'; readers: payne-lite, hdf5"
    ):
        pl.open_catalog(tmp_path / "x.npz", reader="nope")


def test_cli_reads_them_too(mock, tmp_path, capsys):
    """payne-lite fit on a plain HDF5 file with --reader-option datasets=..., and on a
    folder: the table fit_catalog writes; options a reader lacks are refused."""
    from payne_lite.cli import main

    emu, flux, err, ids, ref = mock
    emu_path = tmp_path / "emu.h5"
    emu.save(emu_path)
    folder = tmp_path / "in"
    folder.mkdir()
    with h5py.File(folder / "bare.h5", "w") as f:
        f["a"], f["b"], f["c"] = flux, err, emu.wavelength
    out = tmp_path / "out.fits"
    argv = [
        "fit",
        str(folder),
        "--emulator",
        str(emu_path),
        "-o",
        str(out),
        "--no-progress",
    ]
    assert (
        main([*argv, "--reader-option", "datasets=flux:a,flux_err:b,wavelength:c"]) == 0
    )
    assert_same(pl.read_results(out), ref)
    capsys.readouterr()
    assert main([*argv, "--force", "--reader-option", "bad_bits=3"]) == 2
    err_text = capsys.readouterr().err
    assert (
        "the 'hdf5' reader takes no option(s) ['bad_bits']; its options: ['datasets']"
        in err_text
    )


def test_plain_hdf5_per_row_grids(mock, tmp_path):
    """(n, P) wavelengths that differ by row: one grid per spectrum, read with their
    rows; a row that does not increase is refused naming it."""
    emu, flux, err, ids, _ = mock
    wave = np.stack([emu.wavelength * (1 + 1e-5 * i) for i in range(N)])
    path = tmp_path / "rows.h5"
    with h5py.File(path, "w") as f:
        f["flux"], f["flux_err"], f["wavelength"] = flux, err, wave
    with pl.open_catalog(path) as cat:
        assert cat.per_row_wavelength and cat.wavelength is None
        np.testing.assert_array_equal(cat.read_wavelength(2, 5), wave[2:5])
        np.testing.assert_array_equal(cat.read(1, 3).wavelength, wave[1:3])
    wave[4, 10] = wave[4, 9]
    with h5py.File(path, "w") as f:
        f["flux"], f["flux_err"], f["wavelength"] = flux, err, wave
    with pytest.raises(FileFormatError, match="row 4"):
        pl.open_catalog(path)
