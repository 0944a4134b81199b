"""Grids from other synthesizers' files (issue 19, part 3): a folder of Payne Zero
spectrum archives with a label table, and generic npz / HDF5 grids, read into a
SpectralGrid (checked against the arrays written) and trained on."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from astropy.table import Table

import payne_lite as pl
from payne_lite.grid import synth

N_PIX = 40


@pytest.fixture(scope="module")
def source():
    """150 built-in spectra on 40 pixels: what the files below hold."""
    wave = synth.default_wavelength()[3000 : 3000 + N_PIX]
    return synth.make_grid(150, wavelength=wave, seed=3, progress=False)


def _write_payne_zero(folder, grid, *, metadata=False, names=None):
    """One archive per spectrum as Payne Zero's Spectrum.save_npz writes it
    (wavelength in nm), file names spec_<i>.npz; ``metadata``: labels in
    metadata_json as its label-driven spectra carry them."""
    folder.mkdir(exist_ok=True)
    cont = 1e6 * (1.0 + 1e-5 * (grid.wavelength - grid.wavelength[0]))
    names = names or grid.label_names
    for i, (lab, f) in enumerate(zip(grid.labels, grid.flux, strict=True)):
        extra = {}
        if metadata:
            labels = dict(zip(names, map(float, lab), strict=True))
            labels["atmosphere_family"] = "five_label"  # not a number: ignored
            extra["metadata_json"] = np.asarray(
                json.dumps({"labels": labels, "provenance": {}}, sort_keys=True)
            )
        np.savez(
            folder / f"spec_{i}.npz",
            wavelength_nm=grid.wavelength / 10.0,
            flux_total=f * cont,
            flux_continuum=cont,
            normalized_flux=f.astype(np.float64),
            seconds=np.asarray([1.5]),
            **extra,
        )


def test_payne_zero_folder_with_a_label_table_reads_and_trains(source, tmp_path):
    folder = tmp_path / "pz"
    _write_payne_zero(folder, source)
    order = np.random.default_rng(0).permutation(source.n_spec)  # any row order
    table = Table({"file": [f"spec_{i}" for i in order]})
    for j, name in enumerate(source.label_names):
        table[name] = source.labels[order, j]
    table["snr_note"] = np.zeros(len(order))  # a numeric column not asked for
    table.write(tmp_path / "labels.csv", format="ascii.csv")
    grid = pl.SpectralGrid.from_payne_zero(
        folder, tmp_path / "labels.csv", label_names=source.label_names
    )
    np.testing.assert_allclose(grid.wavelength, source.wavelength, rtol=1e-14)
    np.testing.assert_array_equal(grid.labels, source.labels[order])
    np.testing.assert_array_equal(grid.flux, source.flux[order])
    assert grid.label_names == source.label_names
    emu = pl.train_emulator(grid, hidden=3, max_iter=15, progress=False)
    _, valid = grid.split(0.2, seed=0)
    err = np.median(np.abs(emu.predict(valid.labels) - valid.flux))
    spread = np.median(np.abs(valid.flux - grid.flux.mean(0)))
    assert err < 0.3 * spread, (err, spread)  # it learned something
    assert emu.report.provenance["grid_meta"]["n_files"] == source.n_spec


def test_payne_zero_labels_from_metadata_json(source, tmp_path):
    small = source.subset(slice(0, 12))
    _write_payne_zero(tmp_path / "pz", small, metadata=True)
    grid = pl.SpectralGrid.from_payne_zero(
        tmp_path / "pz", label_names=small.label_names
    )
    # files are read in name order: spec_0, spec_1, spec_10, spec_11, spec_2 ...
    idx = [int(p.split("_")[1]) for p in sorted(f"spec_{i}" for i in range(12))]
    np.testing.assert_array_equal(grid.labels, small.labels[idx])
    default = pl.SpectralGrid.from_payne_zero(tmp_path / "pz")
    assert set(default.label_names) == set(small.label_names)  # numbers only


def test_payne_zero_bad_folders_are_refused_with_what_was_found(source, tmp_path):
    small = source.subset(slice(0, 4))
    folder = tmp_path / "pz"
    _write_payne_zero(folder, small)
    table = {"file": np.array(["spec_0", "spec_1", "spec_9"]), "Teff": np.ones(3)}
    with pytest.raises(FileNotFoundError, match="spec_9.npz"):
        pl.SpectralGrid.from_payne_zero(folder, table)
    with pytest.raises(ValueError, match="no column of file names"):
        pl.SpectralGrid.from_payne_zero(folder, {"Teff": np.ones(4)})
    holes = Table({"file": ["spec_0", "spec_1"], "Teff": [5000.0, 6000.0]}, masked=True)
    holes["Teff"].mask = [False, True]  # a blank cell of a CSV
    with pytest.raises(ValueError, match=r"missing values in column\(s\) \['Teff'\]"):
        pl.SpectralGrid.from_payne_zero(folder, holes)
    with pytest.raises(pl.FileFormatError, match="no labels: no metadata_json"):
        pl.SpectralGrid.from_payne_zero(folder)
    np.savez(folder / "spec_1.npz", wave=np.arange(3.0), flux=np.ones(3))
    table = {"file": np.array(["spec_0", "spec_1"]), "Teff": np.ones(2)}
    with pytest.raises(pl.FileFormatError, match=r"found wave \(3,\) float64, flux"):
        pl.SpectralGrid.from_payne_zero(folder, table)
    d = dict(np.load(folder / "spec_2.npz"))
    d["wavelength_nm"] = d["wavelength_nm"] * 1.01
    np.savez(folder / "spec_1.npz", **d)
    with pytest.raises(pl.FileFormatError, match="differs from spec_0.npz"):
        pl.SpectralGrid.from_payne_zero(folder, table)


def test_generic_npz_grid_reads_and_trains(source, tmp_path):
    path = tmp_path / "grid.npz"
    np.savez(
        path,
        spectra=source.flux.T,  # (n_pix, n_spec): transposed on reading
        wavelength_nm=source.wavelength / 10.0,  # nm by its name
        labels=source.labels.T,  # (n_lab, n_spec), The Payne's orientation
        label_names=np.array(source.label_names),
    )
    grid = pl.SpectralGrid.from_file(path)
    np.testing.assert_allclose(grid.wavelength, source.wavelength, rtol=1e-14)
    np.testing.assert_array_equal(grid.labels, source.labels)
    np.testing.assert_array_equal(grid.flux, source.flux)
    assert grid.label_names == source.label_names
    emu = pl.train_emulator(grid, hidden=3, max_iter=15, progress=False)
    assert emu.report.n_spectra == 30 and emu.n_pix == N_PIX


def test_generic_hdf5_grid_with_a_label_table(source, tmp_path):
    path = tmp_path / "grid.h5"
    rec = np.zeros(
        source.n_spec, [(n, "f8") for n in source.label_names] + [("id", "S8")]
    )
    for j, n in enumerate(source.label_names):
        rec[n] = source.labels[:, j]
    with h5py.File(path, "w") as f:
        g = f.create_group("synth")
        g["flux"] = source.flux
        g["flux_err"] = np.full(source.flux.shape, 0.01, np.float32)
        g["wave"] = source.wavelength / 10.0
        g["wave"].attrs["unit"] = "nm"
        g["params"] = rec
        g["params"].attrs["units"] = json.dumps(list(source.label_units))
    grid = pl.SpectralGrid.from_file(path)
    np.testing.assert_allclose(grid.wavelength, source.wavelength, rtol=1e-14)
    np.testing.assert_array_equal(grid.labels, source.labels)
    assert grid.label_names == source.label_names  # the numeric fields, not "id"
    assert grid.label_units == source.label_units
    assert np.all(grid.flux_err == np.float32(0.01))


def test_names_can_be_given(source, tmp_path):
    path = tmp_path / "odd.npz"
    np.savez(path, y=source.flux, x=source.wavelength, t=source.labels[:, 0],
             g=source.labels[:, 1])  # fmt: skip
    grid = pl.SpectralGrid.from_file(
        path, flux="y", wavelength="x", label_names=["t", "g"]
    )
    np.testing.assert_array_equal(grid.labels, source.labels[:, :2])
    np.testing.assert_array_equal(grid.wavelength, source.wavelength)


def test_unrecognised_layouts_list_what_was_found(source, tmp_path):
    path = tmp_path / "odd.npz"
    np.savez(path, y=source.flux, x=source.wavelength)
    with pytest.raises(pl.FileFormatError) as info:
        pl.SpectralGrid.from_file(path)
    msg = str(info.value)
    assert "no flux array (tried flux, spectra" in msg
    assert f"y {source.flux.shape} float32" in msg and "x (40,) float64" in msg
    with pytest.raises(pl.FileFormatError, match="no labels .*pass label_names|tried"):
        pl.SpectralGrid.from_file(path, flux="y", wavelength="x")
    np.savez(path, flux=source.flux, wavelength=source.wavelength, labels=source.labels)
    with pytest.raises(pl.FileFormatError, match="has no names"):
        pl.SpectralGrid.from_file(path)
    np.savez(path, flux=source.flux[:, :-1], wavelength=source.wavelength)
    with pytest.raises(pl.FileFormatError, match=r"is not \(n_spec, 40\)"):
        pl.SpectralGrid.from_file(path)
    with h5py.File(tmp_path / "um.h5", "w") as f:
        f["flux"], f["wavelength"] = source.flux, source.wavelength / 1e4
        f["wavelength"].attrs["unit"] = "um"
        f["labels"] = source.labels
        f["labels"].attrs["label_names"] = json.dumps(list(source.label_names))
    np.testing.assert_allclose(
        pl.SpectralGrid.from_file(tmp_path / "um.h5").wavelength, source.wavelength
    )
    with h5py.File(tmp_path / "um.h5", "r+") as f:
        f["wavelength"].attrs["unit"] = "furlong"
    with pytest.raises(pl.FileFormatError, match="unit of 'wavelength' is 'furlong'"):
        pl.SpectralGrid.from_file(tmp_path / "um.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(pl.FileFormatError, match="neither a .npz nor a readable HDF5"):
        pl.SpectralGrid.from_file(tmp_path / "junk.h5")
    bad = source.flux.copy()
    bad[0, 0] = np.nan
    np.savez(path, flux=bad, wavelength=source.wavelength, labels=source.labels,
             label_names=np.array(source.label_names))  # fmt: skip
    with pytest.raises(pl.FileFormatError, match="invalid grid contents.*flux"):
        pl.SpectralGrid.from_file(path)


def test_payne_lite_train_reads_these_grids(source, tmp_path, capsys):
    """`payne-lite train FOLDER --labels TABLE` and `payne-lite train OTHER.npz`."""
    from payne_lite.cli import main

    _write_payne_zero(tmp_path / "pz", source)
    table = Table({"filename": [f"spec_{i}.npz" for i in range(source.n_spec)]})
    for j, name in enumerate(source.label_names):
        table[name] = source.labels[:, j]
    table.write(tmp_path / "labels.ecsv")
    np.savez(tmp_path / "other.npz", flux=source.flux, wave=source.wavelength,
             params=source.labels, label_names=np.array(source.label_names))  # fmt: skip
    fast = ["--hidden", "3", "--max-iter", "3", "--no-progress"]
    for grid, extra in (
        (tmp_path / "pz", ["--labels", str(tmp_path / "labels.ecsv")]),
        (tmp_path / "other.npz", []),
    ):
        out = tmp_path / f"{grid.stem}_emu.h5"
        assert main(["train", str(grid), "-o", str(out), *fast, *extra]) == 0
        emu = pl.Emulator.load(out)
        assert emu.label_names == source.label_names
        np.testing.assert_allclose(emu.wavelength, source.wavelength, rtol=1e-14)
        assert emu.report.n_spectra == 30
    assert main(["train", str(tmp_path / "other.npz"), "-o", str(tmp_path / "x.h5"),
                 "--labels", "labels.ecsv", *fast]) == 2  # fmt: skip
    assert "--labels applies to a folder" in capsys.readouterr().err


def test_info_describes_foreign_grids(source, tmp_path, capsys):
    from payne_lite.cli import main

    np.savez(tmp_path / "other.npz", flux=source.flux, wave=source.wavelength,
             params=source.labels, label_names=np.array(source.label_names))  # fmt: skip
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["spectra"], f["wavelength"] = source.flux, source.wavelength
        f["labels"] = source.labels
        f["labels"].attrs["label_names"] = json.dumps(list(source.label_names))
    for name, kind in (("other.npz", "(.npz)"), ("other.h5", "(HDF5)")):
        assert main(["info", str(tmp_path / name)]) == 0
        out = capsys.readouterr().out
        assert f"a grid {kind} as SpectralGrid.from_file reads it" in out
        assert f"spectra     {source.n_spec}" in out and "Teff" in out
    np.savez(tmp_path / "odd.npz", y=source.flux)
    assert main(["info", str(tmp_path / "odd.npz")]) == 2
    assert "no flux array" in capsys.readouterr().err
