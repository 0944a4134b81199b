"""Tests of payne_lite.SpectralGrid: validation, HDF5 files, refusals, split, npz."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import restamp

import payne_lite
from payne_lite import SpectralGrid

N_SPEC, N_PIX = 40, 30


def _grid_kwargs(
    seed: int = 0, *, n_spec: int = N_SPEC, n_pix: int = N_PIX, with_err: bool = False
) -> dict:
    rng = np.random.default_rng(seed)
    kw = dict(
        wavelength=np.linspace(15000.0, 15000.0 + 0.3 * (n_pix - 1), n_pix),
        labels=np.column_stack(
            [
                rng.uniform(4000, 7000, n_spec),
                rng.uniform(1, 5, n_spec),
                rng.uniform(-2, 0.5, n_spec),
            ]
        ),
        flux=1.0 - rng.uniform(0.0, 0.6, (n_spec, n_pix)),
        label_names=["Teff", "logg", "[Fe/H]"],
        label_units=["K", "dex", "dex"],
        meta={"creator": "test_grid", "seed": seed, "settings": {"R": 22500}},
    )
    if with_err:
        err = rng.uniform(0.005, 0.02, (n_spec, n_pix))
        err[0, :3] = np.inf  # unusable pixels are allowed and must survive the file
        kw["flux_err"] = err
    return kw


def _flip_bytes(path: Path, offset: int, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _chunk_spans(path: Path, name: str) -> list[tuple[int, int]]:
    """(byte_offset, size) of every stored chunk of dataset ``name``."""
    with h5py.File(path, "r") as f:
        dsid = f[name].id
        infos = [dsid.get_chunk_info(i) for i in range(dsid.get_num_chunks())]
    return [(int(c.byte_offset), int(c.size)) for c in infos]


@pytest.fixture
def grid() -> SpectralGrid:
    return SpectralGrid(**_grid_kwargs(0))


@pytest.fixture
def saved_grid(tmp_path, grid) -> Path:
    path = tmp_path / "grid.h5"
    grid.save(path)
    return path


# --- construction ---------------------------------------------------------------------
def test_properties(grid):
    assert (grid.n_spec, grid.n_pix, grid.n_labels) == (N_SPEC, N_PIX, 3)
    assert len(grid) == N_SPEC
    assert grid.label_names == ("Teff", "logg", "[Fe/H]")
    assert grid.label_units == ("K", "dex", "dex")
    assert grid.flux.dtype == np.float32
    assert grid.labels.dtype == np.float64
    lo, hi = grid.label_box
    np.testing.assert_array_equal(lo, grid.labels.min(axis=0))
    np.testing.assert_array_equal(hi, grid.labels.max(axis=0))


def _bad(**changes):
    def edit(kw):
        kw = dict(kw)
        for key, value in changes.items():
            kw[key] = value(kw) if callable(value) else value
        return kw

    return edit


def _with_nan(key, index):
    def make(kw):
        arr = np.array(kw[key], dtype=float)
        arr[index] = np.nan
        return arr

    return make


BAD_GRIDS = {
    "flux_wrong_n_pix": (_bad(flux=lambda kw: kw["flux"][:, :-1]), r"flux \(40, 29\)"),
    "flux_wrong_n_spec": (_bad(flux=lambda kw: kw["flux"][:-1]), r"flux \(39, 30\)"),
    "flux_1d": (_bad(flux=lambda kw: kw["flux"][0]), r"flux must have 2 dim"),
    "labels_1d": (_bad(labels=lambda kw: kw["labels"][:, 0]), r"labels must have 2"),
    "wavelength_2d": (
        _bad(wavelength=lambda kw: kw["wavelength"][None]),
        r"wavelength must have 1 dim",
    ),
    "no_spectra": (
        _bad(labels=np.zeros((0, 3)), flux=np.zeros((0, N_PIX))),
        r"at least one spectrum",
    ),
    "nan_flux": (
        _bad(flux=_with_nan("flux", (3, 7))),
        r"flux has 1 non-finite value.*\(3, 7\)",
    ),
    "inf_labels": (
        _bad(labels=lambda kw: np.where(np.arange(3) == 1, np.inf, kw["labels"])),
        r"labels has \d+ non-finite",
    ),
    "non_monotonic_wavelength": (
        _bad(wavelength=lambda kw: kw["wavelength"][[0, 1, 2, 4, 3, *range(5, N_PIX)]]),
        r"wavelength must be strictly increasing.*wavelength\[4\]",
    ),
    "repeated_wavelength": (
        _bad(wavelength=lambda kw: np.r_[kw["wavelength"][:-1], kw["wavelength"][-2]]),
        r"strictly increasing",
    ),
    "negative_wavelength": (
        _bad(wavelength=lambda kw: kw["wavelength"] - 15010.0),
        r"wavelength must be positive",
    ),
    "nan_wavelength": (
        _bad(wavelength=_with_nan("wavelength", 5)),
        r"wavelength has 1 non-finite",
    ),
    "duplicate_label_names": (
        _bad(label_names=["Teff", "logg", "Teff"]),
        r"label_names: names must be unique",
    ),
    "too_few_label_names": (
        _bad(label_names=["Teff", "logg"]),
        r"label_names: 2 names .* for 3 columns",
    ),
    "too_many_units": (
        _bad(label_units=["K", "dex", "dex", "km/s"]),
        r"label_units: 4 units for 3 labels",
    ),
    "too_few_units": (_bad(label_units=["K"]), r"label_units: 1 units for 3 labels"),
    "flux_err_shape": (
        _bad(flux_err=lambda kw: np.ones((N_SPEC, N_PIX - 1))),
        r"flux_err \(40, 29\) must match flux \(40, 30\)",
    ),
    "flux_err_nan": (
        _bad(flux_err=lambda kw: np.where(np.eye(N_SPEC, N_PIX) > 0, np.nan, 0.01)),
        r"flux_err has NaN",
    ),
    "non_numeric_flux": (
        _bad(flux=lambda kw: np.full((N_SPEC, N_PIX), "x")),
        r"flux must be a numeric array",
    ),
}


@pytest.mark.parametrize("case", list(BAD_GRIDS))
def test_invalid_grid_raises(case):
    edit, message = BAD_GRIDS[case]
    with pytest.raises(ValueError, match=message):
        SpectralGrid(**edit(_grid_kwargs(0)))


def test_inputs_not_mutated_and_grid_copies():
    kw = _grid_kwargs(1, with_err=True)
    originals = {
        k: np.array(v, copy=True) for k, v in kw.items() if isinstance(v, np.ndarray)
    }
    grid = SpectralGrid(**kw)
    for key, arr in originals.items():
        np.testing.assert_array_equal(kw[key], arr, err_msg=key)
    # The grid owns its arrays: editing the caller's arrays afterwards changes nothing.
    snapshot = {k: np.array(getattr(grid, k), copy=True) for k in originals}
    for key in originals:
        kw[key][...] = 0.0
    for key, arr in snapshot.items():
        np.testing.assert_array_equal(getattr(grid, key), arr, err_msg=key)
        assert not np.shares_memory(getattr(grid, key), kw[key]), key
    # ... and the grid's own arrays are read-only.
    with pytest.raises(ValueError, match="read-only"):
        grid.flux[0, 0] = 2.0
    with pytest.raises(ValueError, match="read-only"):
        grid.labels[0, 0] = 2.0


def test_meta_is_copied():
    kw = _grid_kwargs(0)
    grid = SpectralGrid(**kw)
    kw["meta"]["creator"] = "someone else"
    assert grid.meta["creator"] == "test_grid"


# --- HDF5 round trip ------------------------------------------------------------------
@pytest.mark.parametrize("with_err", [False, True], ids=["no_err", "with_err"])
def test_save_load_round_trip(tmp_path, with_err):
    grid = SpectralGrid(**_grid_kwargs(2, with_err=with_err))
    path = tmp_path / "sub" / "grid.h5"  # the folder is created by save
    grid.save(path)
    back = SpectralGrid.load(path)
    for name in ("wavelength", "labels", "flux"):
        a, b = getattr(grid, name), getattr(back, name)
        assert b.dtype == a.dtype, name
        np.testing.assert_array_equal(b, a, err_msg=name)
    if with_err:
        assert back.flux_err.dtype == np.float32
        np.testing.assert_array_equal(back.flux_err, grid.flux_err)
        assert np.isinf(back.flux_err[0, :3]).all()
    else:
        assert back.flux_err is None
    assert back.label_names == grid.label_names
    assert back.label_units == grid.label_units
    assert back.meta == grid.meta
    assert [p.name for p in path.parent.iterdir()] == ["grid.h5"]  # no temp file left


def test_save_overwrites_atomically(tmp_path):
    path = tmp_path / "grid.h5"
    SpectralGrid(**_grid_kwargs(0)).save(path)
    second = SpectralGrid(**_grid_kwargs(5))
    second.save(path)
    np.testing.assert_array_equal(SpectralGrid.load(path).labels, second.labels)


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.h5"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        SpectralGrid.load(path)


def test_load_refuses_non_hdf5(tmp_path):
    path = tmp_path / "random.h5"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(payne_lite.FileFormatError, match=re.escape(str(path))):
        SpectralGrid.load(path)


def test_load_refuses_empty_file(tmp_path):
    path = tmp_path / "empty.h5"
    path.write_bytes(b"")
    with pytest.raises(payne_lite.FileFormatError, match=re.escape(str(path))):
        SpectralGrid.load(path)


def test_load_refuses_truncated(saved_grid):
    data = saved_grid.read_bytes()
    saved_grid.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        payne_lite.FileFormatError, match=re.escape(str(saved_grid)) + ".*truncated"
    ):
        SpectralGrid.load(saved_grid)


def test_load_refuses_corrupted_flux(tmp_path):
    """Bytes flipped in the middle of the file land in a compressed flux chunk."""
    grid = SpectralGrid(**_grid_kwargs(3, n_spec=64, n_pix=400))
    path = tmp_path / "grid.h5"
    grid.save(path)
    middle = path.stat().st_size // 2
    spans = _chunk_spans(path, "flux")
    assert any(off <= middle and middle + 16 <= off + size for off, size in spans), (
        "test set-up: the middle of the file should be flux data",
        middle,
        spans,
    )
    _flip_bytes(path, middle)
    restamp(path)  # past the file's checksum block: the datasets' own checksums
    with pytest.raises(
        payne_lite.FileFormatError, match=re.escape(str(path)) + ".*'flux' is corrupt"
    ):
        SpectralGrid.load(path)


def test_load_refuses_corrupted_uncompressed_labels(saved_grid):
    """Labels are stored uncompressed: only the Fletcher-32 checksum can notice."""
    (offset, size), *_ = _chunk_spans(saved_grid, "labels")
    _flip_bytes(saved_grid, offset + size // 2, n=4)
    restamp(saved_grid)  # past the file's checksum block: Fletcher-32 alone
    with pytest.raises(
        payne_lite.FileFormatError,
        match=re.escape(str(saved_grid)) + ".*'labels' is corrupt",
    ):
        SpectralGrid.load(saved_grid)


def test_load_refuses_emulator_file(tmp_path, tiny_emulator):
    path = tmp_path / "emu.h5"
    tiny_emulator.save(path)
    with pytest.raises(
        payne_lite.FileFormatError,
        match=re.escape(str(path)) + ".*payne_lite.SpectralGrid",
    ):
        SpectralGrid.load(path)


def test_load_refuses_other_format_version(saved_grid):
    with h5py.File(saved_grid, "r+") as f:
        f.attrs["format_version"] = 99
    restamp(saved_grid)
    with pytest.raises(
        payne_lite.FileFormatError,
        match=re.escape(str(saved_grid))
        + r".*format_version=\S*99\S* is not supported",
    ):
        SpectralGrid.load(saved_grid)


def test_load_refuses_foreign_hdf5(tmp_path):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as f:
        f["flux"] = np.ones((3, 4))
    with pytest.raises(payne_lite.FileFormatError, match=re.escape(str(path))):
        SpectralGrid.load(path)


def test_load_refuses_missing_dataset(saved_grid):
    with h5py.File(saved_grid, "r+") as f:
        del f["labels"]
    restamp(saved_grid)
    with pytest.raises(payne_lite.FileFormatError, match="missing dataset 'labels'"):
        SpectralGrid.load(saved_grid)


def test_load_refuses_inconsistent_contents(saved_grid):
    with h5py.File(saved_grid, "r+") as f:
        wave = f["wavelength"][()]
        del f["wavelength"]
        f["wavelength"] = wave[:-1]
    restamp(saved_grid)
    with pytest.raises(
        payne_lite.FileFormatError,
        match=re.escape(str(saved_grid)) + ".*invalid grid contents",
    ):
        SpectralGrid.load(saved_grid)


# --- split / subset -------------------------------------------------------------------
def _rows(grid: SpectralGrid) -> set[tuple[float, ...]]:
    return {tuple(r) for r in grid.labels}


def test_split_reproducible_disjoint_complete(grid):
    train, valid = grid.split(0.25, seed=7)
    train2, valid2 = grid.split(0.25, seed=7)
    np.testing.assert_array_equal(train.labels, train2.labels)
    np.testing.assert_array_equal(valid.labels, valid2.labels)
    assert len(valid) == round(0.25 * N_SPEC)
    assert len(train) + len(valid) == N_SPEC
    assert not _rows(train) & _rows(valid)
    assert _rows(train) | _rows(valid) == _rows(grid)
    # rows keep their flux (and everything else) together
    index = {tuple(r): i for i, r in enumerate(grid.labels)}
    for part in (train, valid):
        rows = [index[tuple(r)] for r in part.labels]
        np.testing.assert_array_equal(part.flux, grid.flux[rows])
        assert rows == sorted(rows)
        assert part.label_names == grid.label_names
        np.testing.assert_array_equal(part.wavelength, grid.wavelength)
    other_train, _ = grid.split(0.25, seed=8)
    assert _rows(other_train) != _rows(train)


def test_split_with_flux_err_keeps_rows():
    grid = SpectralGrid(**_grid_kwargs(4, with_err=True))
    train, valid = grid.split(0.5, seed=1)
    index = {tuple(r): i for i, r in enumerate(grid.labels)}
    for part in (train, valid):
        rows = [index[tuple(r)] for r in part.labels]
        np.testing.assert_array_equal(part.flux_err, grid.flux_err[rows])


def test_split_tiny_grid_keeps_one_of_each():
    grid = SpectralGrid(**_grid_kwargs(0, n_spec=2))
    for fraction in (0.01, 0.99):
        train, valid = grid.split(fraction)
        assert (len(train), len(valid)) == (1, 1)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_bad_fraction(grid, fraction):
    with pytest.raises(ValueError, match="valid_fraction must be in"):
        grid.split(fraction)


def test_split_single_spectrum():
    grid = SpectralGrid(**_grid_kwargs(0, n_spec=1))
    with pytest.raises(ValueError, match="fewer than 2"):
        grid.split(0.5)


def test_subset_bool_mask(grid):
    mask = grid.labels[:, 0] > 5500.0
    sub = grid.subset(mask)
    np.testing.assert_array_equal(sub.labels, grid.labels[mask])
    np.testing.assert_array_equal(sub.flux, grid.flux[mask])


# --- The Payne's npz layout -----------------------------------------------------------
def _payne_npz(
    path: Path,
    *,
    transposed: bool = True,
    with_wave: bool = True,
    with_err: bool = False,
    seed: int = 0,
):
    kw = _grid_kwargs(seed, n_spec=12, n_pix=20)
    arrays = dict(
        labels=kw["labels"].T if transposed else kw["labels"], spectra=kw["flux"]
    )
    if with_wave:
        arrays["wavelength"] = kw["wavelength"]
    if with_err:
        arrays["spectra_err"] = np.full_like(kw["flux"], 0.01)
    np.savez(path, **arrays)
    return kw


@pytest.mark.parametrize("transposed", [True, False], ids=["payne_T", "row_major"])
def test_from_payne_npz(tmp_path, transposed):
    path = tmp_path / "training.npz"
    kw = _payne_npz(path, transposed=transposed)
    grid = SpectralGrid.from_payne_npz(
        path, label_names=kw["label_names"], label_units=kw["label_units"]
    )
    assert (grid.n_spec, grid.n_labels, grid.n_pix) == (12, 3, 20)
    np.testing.assert_array_equal(grid.labels, kw["labels"])
    np.testing.assert_array_equal(grid.flux, kw["flux"].astype(np.float32))
    np.testing.assert_array_equal(grid.wavelength, kw["wavelength"])
    assert grid.label_names == ("Teff", "logg", "[Fe/H]")
    assert grid.label_units == ("K", "dex", "dex")
    assert grid.flux_err is None
    assert "training.npz" in grid.meta["source"]


def test_from_payne_npz_defaults_and_errors(tmp_path):
    path = tmp_path / "training.npz"
    kw = _payne_npz(path, with_wave=False, with_err=True)
    with pytest.raises(payne_lite.FileFormatError, match="no 'wavelength' key"):
        SpectralGrid.from_payne_npz(path)
    grid = SpectralGrid.from_payne_npz(path, wavelength=kw["wavelength"])
    assert grid.label_names == ("label_0", "label_1", "label_2")
    assert grid.label_units == ("", "", "")
    np.testing.assert_array_equal(grid.flux_err, np.full((12, 20), 0.01, np.float32))


def test_from_payne_npz_refuses_bad_files(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(payne_lite.FileFormatError, match="not a readable .npz"):
        SpectralGrid.from_payne_npz(junk)
    partial = tmp_path / "partial.npz"
    np.savez(partial, labels=np.ones((3, 5)))
    with pytest.raises(
        payne_lite.FileFormatError, match=r"missing key\(s\) \['spectra'\]"
    ):
        SpectralGrid.from_payne_npz(partial)


# --- the design box ------------------------------------------------------------------
BOX = (np.array([4000.0, 1.0, -2.0]), np.array([7000.0, 5.0, 0.5]))


def test_box_round_trip_and_label_box(tmp_path):
    g = SpectralGrid(**_grid_kwargs(), box=BOX)
    np.testing.assert_array_equal(g.label_box[0], BOX[0])
    np.testing.assert_array_equal(g.label_box[1], BOX[1])
    g.save(tmp_path / "g.h5")
    back = SpectralGrid.load(tmp_path / "g.h5")
    np.testing.assert_array_equal(back.box[0], BOX[0])
    np.testing.assert_array_equal(back.box[1], BOX[1])
    train, valid = back.split(0.25, seed=1)  # subsets keep the design box
    np.testing.assert_array_equal(train.label_box[1], BOX[1])
    np.testing.assert_array_equal(valid.label_box[0], BOX[0])
    # without a box: the labels' own range
    plain = SpectralGrid(**_grid_kwargs())
    assert plain.box is None
    np.testing.assert_array_equal(plain.label_box[0], plain.labels.min(axis=0))


def test_labels_outside_the_box_are_refused():
    with pytest.raises(
        ValueError, match=r"labels\[\d+\] logg = .* outside the grid's box"
    ):
        SpectralGrid(**_grid_kwargs(), box=(BOX[0], np.array([7000.0, 4.0, 0.5])))
    with pytest.raises(ValueError, match="empty"):
        SpectralGrid(**_grid_kwargs(), box=(BOX[1], BOX[0]))
