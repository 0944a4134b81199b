"""The real example data that ships (``data/payne_apogee``, ``data/apogee_raw``) and
``payne_lite.datasets``, which reads it.

The emulator is checked against The Payne's formula for its classic network (the data
README), evaluated here in NumPy float64 from the raw npz arrays; the shipped files
against the project's reference copy when it is beside the checkout; the wheel's
``force-include`` table against the files in ``data/``.
"""

from __future__ import annotations

import dataclasses
import filecmp
import shutil
import tomllib
from pathlib import Path, PurePosixPath

import jax
import numpy as np
import pytest
from astropy.io import fits

import payne_lite as pl
from payne_lite import _datafiles, datasets

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
#: The project's reference copy the shipped files were taken from (beside the clone).
REFERENCE = ROOT.parent / "shared" / "data"
FOLDERS = ("payne_apogee", "apogee_raw")


@pytest.fixture(scope="module")
def d() -> datasets.PayneApogee:
    return pl.datasets.payne_apogee()


def _readme_flux(net: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The data README's formula for the classic per-pixel network, float64."""
    w0, b0, w1, b1 = (
        net[k].astype(np.float64)
        for k in ("w_array_0", "b_array_0", "w_array_1", "b_array_1")
    )
    s = (x - net["x_min"]) / (net["x_max"] - net["x_min"]) - 0.5
    hidden = 1.0 / (1.0 + np.exp(-(np.einsum("pjk,nk->npj", w0, s) + b0)))
    return np.einsum("pj,npj->np", w1, hidden) + b1


# --- what ships, and where it is found ---------------------------------------------
def test_payne_apogee_paths_exist(d):
    assert d.root.is_dir() and d.root.name == "payne_apogee"
    for field in dataclasses.fields(d):
        path = getattr(d, field.name)
        assert isinstance(path, Path) and path.exists(), field.name
        assert path == d.root or path.parent == d.root
    assert d.network.name == "nn_normalized_spectra_5label.npz"
    assert pl.datasets is datasets  # the public face: pl.datasets.payne_apogee()
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.root = Path("elsewhere")


def test_data_is_found_in_the_search_roots(d):
    """The installed package data, else the checkout's data/: when the package is
    imported from this source tree, that is this checkout's data/."""
    raw = pl.datasets.apogee_raw()
    roots = _datafiles.search_roots()
    assert d.root in [r / "payne_apogee" for r in roots]
    assert raw.root in [r / "apogee_raw" for r in roots]
    if Path(pl.__file__).resolve().parents[1] == ROOT:
        assert (d.root, raw.root) == (DATA / "payne_apogee", DATA / "apogee_raw")


def test_apogee_raw_paths_and_fits_files():
    raw = pl.datasets.apogee_raw()
    assert [s.star for s in raw.stars] == ["2M00452143+1634446", "2M03122509+0021585"]
    assert raw.readme.is_file() and raw.license.is_file()
    assert "MIT License" in raw.license.read_text()
    assert raw.apstar == tuple(s.apstar for s in raw.stars)
    for star in raw.stars:
        assert star.star in star.apstar.name and star.star in star.aspcapstar.name
        with fits.open(star.apstar) as h:
            # rows 0-1 combined, 2+ visits: 3 and 4 visits (the README)
            assert h[1].data.shape[1] == 8575 and h[1].data.shape[0] in (5, 6)
            assert h[3].data.dtype.kind == "i"  # APOGEE_PIXMASK
        with fits.open(star.aspcapstar) as h:
            assert h[1].data.shape == (8575,)


def test_the_aspcap_grid_is_the_apstar_grid_without_chip_gaps(d):
    """Both folders' docstrings: the 7214-pixel grid is apStar's log-linear grid at
    pixels r_[322:3242, 3648:6048, 6412:8306]."""
    h = fits.getheader(pl.datasets.apogee_raw().apstar[0], 1)
    k = np.r_[322:3242, 3648:6048, 6412:8306]
    apstar = 10.0 ** (h["CRVAL1"] + h["CDELT1"] * (k + 1 - h["CRPIX1"]))
    np.testing.assert_allclose(d.wavelength, apstar, rtol=1e-12, atol=0.0)


def test_loaded_arrays_dtypes_and_shapes(d):
    wave = d.wavelength
    assert wave.shape == (7214,) and wave.dtype == np.float64
    assert np.all(np.diff(wave) > 0) and 15168 < wave[0] < wave[-1] < 16937
    assert d.mask.dtype == bool and d.mask.shape == (7214,) and d.mask.sum() == 875
    assert d.continuum_pixels.dtype == bool and d.continuum_pixels.shape == (7214,)
    assert d.visit_wavelength.shape == (12288,)
    s = d.combined_spectrum()
    assert s.star == "2M13012770+5754582" and s.flux.dtype == np.float32
    assert s.flux.shape == s.flux_err.shape == (7214,)
    np.testing.assert_array_equal(s.wavelength, wave)
    v = d.visits()
    assert v.star == "2M06133561+2433362"
    assert v.flux.shape == v.flux_err.shape == (3, 7214)
    assert v.snr.shape == v.vhelio.shape == v.hjd.shape == (3,)
    assert np.all(np.abs(v.vhelio) < 100.0)  # km/s


def test_loaders_return_fresh_arrays(d):
    m = d.mask
    m[:] = False
    assert d.mask.sum() == 875


# --- the emulator ---------------------------------------------------------------------
LABELS = np.array(
    [
        [5777.0, 4.44, 0.0, 0.0, 5.0],  # the Sun, near enough
        [4500.0, 4.7, -0.5, 0.3, 2.0],  # a metal-poor K dwarf
        [6800.0, 4.1, 0.3, -0.2, 30.0],  # a hot, metal-rich one
    ]
)


def test_emulator_reproduces_the_readme_formula(d, tol):
    emu = d.emulator()
    assert isinstance(emu, pl.Emulator) and (emu.n_pix, emu.n_labels) == (7214, 5)
    assert emu.label_names == datasets.PAYNE_LABELS_5 == d.label_names
    assert emu.label_units == ("K", "dex", "dex", "dex", "km/s")
    np.testing.assert_array_equal(emu.wavelength, d.wavelength)
    with np.load(d.network) as f:
        net = {k: f[k] for k in f.files}
    np.testing.assert_array_equal(emu.label_lo, net["x_min"])
    np.testing.assert_array_equal(emu.label_hi, net["x_max"])
    box = np.vstack([LABELS, 0.5 * (net["x_min"] + net["x_max"])])
    assert np.all((box >= net["x_min"]) & (box <= net["x_max"]))
    ref = _readme_flux(net, box)
    assert 0.3 < ref.min() and ref.max() < 1.3  # normalised flux
    flux32 = emu.predict(box)
    assert flux32.dtype == np.float32
    np.testing.assert_allclose(flux32, ref, rtol=0.0, atol=tol(np.float32))
    with jax.enable_x64(True):
        flux64 = emu.predict(box, dtype=np.float64)
    np.testing.assert_allclose(flux64, ref, rtol=0.0, atol=tol(np.float64))


def test_unnormalized_emulator_predicts_f_lambda(d, tol):
    emu = d.unnormalized_emulator()
    assert emu.n_labels == 4 and emu.label_names == datasets.PAYNE_LABELS_5[:4]
    with np.load(d.network_unnormalized) as f:
        net = {k: f[k] for k in f.files}
    x = LABELS[:, :4]
    ref = _readme_flux(net, x) / 1e6  # the file predicts 1e6 f_lambda
    with jax.enable_x64(True):
        flux = emu.predict(x, dtype=np.float64)
    np.testing.assert_allclose(
        flux, ref, rtol=0.0, atol=tol(np.float64) * np.abs(ref).max()
    )


# --- the shipped copy is the reference, byte for byte -------------------------------
@pytest.mark.parametrize("folder", FOLDERS)
def test_shipped_files_are_the_reference_files(folder):
    ref = REFERENCE / folder
    if not ref.is_dir():
        pytest.skip(f"the reference copy {ref} is not beside this checkout")
    shipped = sorted(p.name for p in (DATA / folder).iterdir())
    assert shipped == sorted(p.name for p in ref.iterdir())
    differ = [n for n in shipped if not filecmp.cmp(DATA / folder / n, ref / n, False)]
    assert not differ, f"data/{folder} differs from {ref}: {differ}"


# --- missing data -----------------------------------------------------------------
def test_missing_data_names_where_it_looked(monkeypatch, tmp_path):
    roots = [tmp_path / "site" / "_data", tmp_path / "checkout" / "data"]
    monkeypatch.setattr(_datafiles, "search_roots", lambda: roots)
    for load, name in (
        (pl.datasets.payne_apogee, "payne_apogee"),
        (pl.datasets.apogee_raw, "apogee_raw"),
    ):
        with pytest.raises(FileNotFoundError) as err:
            load()
        msg = str(err.value)
        assert f"'{name}' not found" in msg and f"data/{name}/" in msg
        for r in roots:
            assert str(r / name) in msg


def test_incomplete_or_absent_copy_is_refused(d, tmp_path):
    copy = tmp_path / "payne_apogee"
    shutil.copytree(d.root, copy)
    assert pl.datasets.payne_apogee(copy).mask.sum() == 875  # root= reads a copy
    (copy / "apogee_mask.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"incomplete: missing \['apogee_mask"):
        pl.datasets.payne_apogee(copy)
    with pytest.raises(FileNotFoundError, match="no folder"):
        pl.datasets.apogee_raw(tmp_path / "nowhere")


# --- packaging --------------------------------------------------------------------
def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _shipped_data_files() -> list[str]:
    """Every data file in data/ (the make_*.py scripts stay out of wheels)."""
    return sorted(
        p.relative_to(ROOT).as_posix()
        for p in DATA.rglob("*")
        if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts
    )


def test_wheel_force_include_covers_every_data_file():
    """Each file of data/ (payne_apogee/ and apogee_raw/ included) lands in the wheel
    at payne_lite/_data/<the same path>, where payne_lite._datafiles looks."""
    table = _pyproject()["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    files = _shipped_data_files()
    assert {f"data/{n}/README.md" for n in FOLDERS} <= set(files)
    assert "data/apogee_raw/LICENSE-apogee_tools" in files
    uncovered = []
    for f in files:
        # an entry for the file itself or for a folder above it
        src = next((k for k in table if f == k or f.startswith(k + "/")), None)
        if src is None:
            uncovered.append(f)
            continue
        dest = table[src] + f[len(src) :]
        assert dest == "payne_lite/_data/" + f.removeprefix("data/"), (f, dest)
    assert not uncovered, f"add to force-include in pyproject.toml: {uncovered}"


def test_sdist_keeps_the_data_folders():
    """No sdist exclude pattern drops a shipped file (a wheel built from the sdist
    force-includes them). Patterns are matched as paths from the right, as
    gitignore does for the simple patterns used there."""
    sdist = _pyproject()["tool"]["hatch"]["build"]["targets"].get("sdist", {})
    dropped = [
        (f, pat)
        for f in _shipped_data_files()
        for pat in sdist.get("exclude", [])
        if PurePosixPath(f).match(pat.lstrip("/"))
    ]
    assert not dropped
