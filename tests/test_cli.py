"""End-to-end tests of the ``payne-lite`` command line, run in-process through main().

One tiny grid (40 spectra, 200 lines, 478 pixels over 15100-15200 A) and one tiny
emulator (3 hidden units, 5 LM iterations) are made once per module by the CLI itself
and shared by the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from test_catalog import assert_tables_equal

import payne_lite as pl
from payne_lite import Emulator, SpectralGrid
from payne_lite.cli import build_parser, main

SMALL_GRID = [
    "--n-spec",
    "40",
    "--n-lines",
    "200",
    "--lam-min",
    "15100",
    "--lam-max",
    "15200",
    "--no-progress",
]
TINY_TRAIN = ["--hidden", "3", "--max-iter", "5", "--no-progress"]
STAR = [5000.0, 4.5, 0.0, 0.1, 5.0]  # Teff, logg, [Fe/H], [alpha/Fe], vmacro
STAR_TEXT = ",".join(f"{v:g}" for v in STAR)


def run(capsys, *argv) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("payne-lite: error: ")
    assert "Traceback" not in err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    """grid.h5 and emu.h5 made by `payne-lite grid` and `payne-lite train`."""
    d = tmp_path_factory.mktemp("cli")
    grid, emu = d / "grid.h5", d / "emu.h5"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code_grid = main(["grid", "-o", str(grid), *SMALL_GRID])
        code_train = main(["train", str(grid), "-o", str(emu), *TINY_TRAIN])
    assert (code_grid, code_train) == (0, 0), err.getvalue()
    grid_line, train_line = out.getvalue().splitlines()
    return SimpleNamespace(
        dir=d, grid=grid, emu=emu, grid_line=grid_line, train_line=train_line
    )


# --- grid and train ---------------------------------------------------------------
def test_grid_writes_file_and_one_line_summary(files):
    grid = SpectralGrid.load(files.grid)
    assert (grid.n_spec, grid.n_pix) == (40, 478)
    assert grid.meta["n_lines"] == 200
    assert grid.meta["command"].startswith("payne-lite grid -o ")
    line = files.grid_line
    assert line.startswith(f"wrote {files.grid}: 40 spectra x 478 pixels, ")
    for frag in (
        "15100.0-15199.8 A",
        "Teff [4000, 7000] K",
        "vmacro [0, 30] km/s",
        " kB; ",
        " s",
    ):
        assert frag in line, frag


def test_train_writes_emulator_and_reports_held_out_error(files):
    emu = Emulator.load(files.emu)
    assert emu.hidden == (3,)
    assert emu.meta["config"]["max_iter"] == 5
    assert emu.meta["grid_file"] == str(files.grid)
    m = emu.meta
    line = files.train_line
    assert f"held-out median |error| {m['valid_median_abs_error']:.2e}" in line
    assert f"99th percentile pixel {m['valid_p99_pixel_abs_error']:.2e}" in line
    assert f"{m['train_seconds']:.1f} s" in line
    assert line.endswith(f"wrote {files.emu}")


def test_train_config_file_overridden_by_flags(files, tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"hidden": [2], "max_iter": 2, "patience": 3}))
    out_path = tmp_path / "emu2.h5"
    code, out, err = run(
        capsys,
        "-v",
        "train",
        files.grid,
        "-o",
        out_path,
        "--config",
        cfg,
        "--max-iter",
        "3",
        "--no-progress",
    )
    assert code == 0, err
    config = Emulator.load(out_path).meta["config"]
    assert (config["hidden"], config["max_iter"], config["patience"]) == ([2], 3, 3)
    assert "INFO payne_lite.emulator: trained 478 pixels" in err  # -v logs to stderr


# --- predict ----------------------------------------------------------------------
def read_spectra(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(wavelength, flux (n, n_pix)) from any output format of `predict`."""
    if path.suffix == ".npy":
        arr = np.load(path)
        return arr[0], arr[1:]
    if path.suffix == ".csv":
        table = np.genfromtxt(path, delimiter=",", names=True)
        names = table.dtype.names
        assert names[0] == "wavelength"
        return table["wavelength"], np.stack([table[n] for n in names[1:]])
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "payne_lite.PredictedSpectra"
        return f["wavelength"][()], f["flux"][()]


@pytest.mark.parametrize("suffix", [".npy", ".h5", ".csv"])
def test_predict_from_labels_flags(files, tmp_path, capsys, suffix):
    emu = Emulator.load(files.emu)
    other = [5500.0, 3.0, -1.0, 0.3, 10.0]
    out_path = tmp_path / f"flux{suffix}"
    code, out, err = run(
        capsys,
        "predict",
        files.emu,
        "--labels",
        STAR_TEXT,
        "--labels",
        " ".join(map(str, other)),
        "-o",
        out_path,
    )
    assert code == 0, err
    assert out.strip() == (
        f"wrote {out_path}: 2 spectra x 478 pixels, 15100.0-15199.8 "
        f"A, flux {out.split('flux ')[1].strip()}"
    )
    wave, flux = read_spectra(out_path)
    np.testing.assert_allclose(wave, emu.wavelength, rtol=1e-9)
    np.testing.assert_allclose(flux, emu.predict([STAR, other]), rtol=1e-6, atol=1e-7)


def test_predict_labels_csv_with_reordered_header(files, tmp_path, capsys):
    emu = Emulator.load(files.emu)
    names = ["logg", "vmacro", "Teff", "[alpha/Fe]", "[Fe/H]"]
    rows = np.array([STAR, [6000.0, 4.0, -0.5, 0.2, 8.0]])
    order = [emu.label_names.index(n) for n in names]
    text = (
        "# two stars\n"
        + ",".join(names)
        + "\n"
        + "\n".join(",".join(f"{v:g}" for v in row[order]) for row in rows)
        + "\n"
    )
    (tmp_path / "stars.csv").write_text(text)
    out_path = tmp_path / "flux.h5"
    code, out, err = run(
        capsys,
        "predict",
        files.emu,
        "--labels-file",
        tmp_path / "stars.csv",
        "-o",
        out_path,
    )
    assert code == 0, err
    with h5py.File(out_path, "r") as f:
        np.testing.assert_array_equal(f["labels"][()], rows)
        np.testing.assert_allclose(f["flux"][()], emu.predict(rows), rtol=1e-6)


def test_predict_allow_outside_extrapolates_with_a_warning(files, tmp_path, capsys):
    out_path = tmp_path / "flux.npy"
    code, out, err = run(
        capsys,
        "predict",
        files.emu,
        "--labels",
        "9000,4.5,0,0.1,5",
        "-o",
        out_path,
        "--allow-outside",
    )
    assert code == 0, err
    assert "outside the training box" in err and "WARNING" in err
    assert np.load(out_path).shape == (2, 478)


# --- info -------------------------------------------------------------------------
def test_info_grid(files, capsys):
    code, out, err = run(capsys, "info", files.grid)
    assert code == 0, err
    assert out.startswith(f"{files.grid}: payne_lite.SpectralGrid v1, ")
    for frag in (
        "spectra     40",
        "15100.00-15199.84 A, 478 pixels",
        "log-uniform",
        "[alpha/Fe]",
        "meta.n_lines",
        "flux_err: none",
    ):
        assert frag in out, frag


def test_info_emulator(files, capsys):
    code, out, err = run(capsys, "info", files.emu)
    assert code == 0, err
    assert out.startswith(f"{files.emu}: payne_lite.Emulator v2, ")
    for frag in (
        "pixel, hidden 3, sigmoid, 478 pixels x 5 labels",
        "training box",
        "lm, ",
        "of 5 iterations",
        "held-out    median |error|",
        "config",
        "max_iter=5",
        "pixel_error",
        "error_basis",
        f"{Emulator.load(files.emu).error_basis.shape[0]} principal components",
        "validation  ",  # the validation report training wrote (tests/test_report.py)
        "held-out spectra: split off the training grid",
        "by label",
        "trained on",
    ):
        assert frag in out, frag


# --- fit --------------------------------------------------------------------------
def noisy_catalog(emu, n, seed=0):
    """(flux, flux_err) float32 of n noisy spectra (S/N 50) inside the training box."""
    rng = np.random.default_rng(seed)
    lo, hi = emu.label_lo, emu.label_hi
    labels = lo + (hi - lo) * rng.uniform(0.2, 0.8, (n, emu.n_labels))
    err = np.full((n, emu.n_pix), 0.02)
    flux = emu.predict(labels) + err * rng.normal(size=err.shape)
    return flux.astype(np.float32), err.astype(np.float32)


@pytest.fixture(scope="module")
def fit_files(files):
    """A 6-spectrum catalog (with ids and a partial mask) for the emulator of `files`."""
    emu = Emulator.load(files.emu)
    flux, err = noisy_catalog(emu, 6)
    mask = np.zeros(flux.shape, bool)
    mask[1, :100] = True
    ids = [f"star{i}" for i in range(6)]
    cat = files.dir / "catalog.h5"
    pl.write_catalog(cat, flux, err, emu.wavelength, mask=mask, ids=ids)
    return SimpleNamespace(emu=emu, cat=cat, flux=flux, err=err, mask=mask, ids=ids)


def test_fit_with_a_continuum_per_chip(files, fit_files, tmp_path, capsys):
    """--cont-chips: one polynomial of degree --cont-deg per wavelength range, as
    pl.fit(cont_deg=pl.ChipPolynomial(...)); a range that is not LO:HI is one line."""
    wave = np.asarray(fit_files.emu.wavelength)
    mid = float(wave[wave.size // 2])
    chips = ((float(wave[0]), mid), (mid, float(wave[-1]) + 1.0))
    out_path = tmp_path / "chips.ecsv"
    ranges = [f"{lo!r}:{hi!r}" for lo, hi in chips]
    argv = ["fit", fit_files.cat, "--emulator", files.emu, "-o", out_path,
            "--cont-deg", "1", "--cont-chips", *ranges, "--max-iter", "10",
            "--options", '{"continuum": "profile"}', "--no-progress"]  # fmt: skip
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "(lm, cont_deg 1 per chip)" in out.splitlines()[0]
    table = pl.read_results(out_path)
    ref = pl.fit(
        fit_files.flux, fit_files.err, fit_files.emu, mask=fit_files.mask,
        cont_deg=pl.ChipPolynomial(1, chips),
        options=pl.LMOptions(max_iter=10, continuum="profile"),
    )  # fmt: skip
    assert table.meta["cont_chips"] == [list(c) for c in chips]
    assert_tables_equal(table, ref, ref.colnames)
    code, out, err = run(capsys, *argv[:-6], "--force", "--cont-chips", "1-2")
    assert_one_line_error(code, out, err, "--cont-chips: '1-2' is not LO:HI")


def test_fit_end_to_end_and_force(files, fit_files, tmp_path, capsys):
    out_path = tmp_path / "results.fits"
    argv = [
        "fit",
        fit_files.cat,
        "--emulator",
        files.emu,
        "-o",
        out_path,
        "--chunk-size",
        "4",
        "--max-iter",
        "20",
        "--fixed",
        "vmacro=5",
        "--rv-range",
        "-200",
        "150",
        "--no-progress",
    ]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    table = pl.read_results(out_path)
    ref = pl.fit(
        fit_files.flux,
        fit_files.err,
        fit_files.emu,
        mask=fit_files.mask,
        fixed={"vmacro": 5.0},
        rv_range=(-200.0, 150.0),
        options=pl.LMOptions(max_iter=20),
    )
    assert list(table["id"]) == fit_files.ids
    assert table.meta["rv_range"] == [-200.0, 150.0]
    assert_tables_equal(table, ref, ref.colnames)
    np.testing.assert_allclose(table["vmacro"], 5.0, rtol=1e-6)  # float32 fit space
    assert table["n_good_pixels"][1] <= 478 - 100
    assert table.meta["command"].startswith("payne-lite fit ")
    lines = out.splitlines()
    n_conv = int(np.count_nonzero(table["converged"]))
    n_flag = int(np.count_nonzero(table["flags"]))
    assert (
        lines[0]
        == f"fitted 6 spectra x 478 pixels from {fit_files.cat} (lm, cont_deg 0)"
    )
    assert lines[1].startswith(f"  {n_conv} converged, {n_flag} flagged")
    assert "median chi2_red" in lines[1]
    assert lines[2].startswith("  ") and " per spectrum (" in lines[2]
    assert lines[3] == f"wrote {out_path}"

    before = out_path.read_bytes()
    code, out, err = run(capsys, *argv)
    assert_one_line_error(code, out, err, f"{out_path} exists; use --force")
    assert out_path.read_bytes() == before
    code, out, err = run(capsys, *argv, "--force")
    assert code == 0, err
    assert out.splitlines()[-1] == f"wrote {out_path}"


#: Every argument of pl.fit, pl.sample and pl.fit_catalog -> the `payne-lite fit`
#: flags that reach it (the others are listed, with reasons, in PYTHON_ONLY).
CLI_OF = {
    "flux": ["CATALOG"], "flux_err": ["CATALOG"], "wavelength": ["CATALOG"],
    "path_in": ["CATALOG", "--reader", "--reader-option"], "path_out": ["--output"],
    "emulator": ["--emulator"], "mdn": ["--mdn"], "method": ["--method"],
    "mask": ["--mask"], "p0": ["--p0"], "group": ["--group"], "fixed": ["--fixed"],
    "instrument": ["--air", "--resolution", "--lsf-sigma", "--emulator-resolution",
                   "--vsini", "--vmacro", "--doppler"],
    "cont_deg": ["--cont-deg", "--cont-chips"], "rv_range": ["--rv-range"], "seed": ["--seed"],
    "emulator_error": ["--no-emulator-error"],
    "progress": ["--no-progress"], "options": ["--options", "--max-iter", "--mdn-starts",
                "--refine-continuum"],
    "chunk_size": ["--chunk-size"], "overwrite": ["--force"], "restart": ["--restart"],
    "keep_parts": ["--keep-parts"], "meta": ["--meta"],
    "fit_kwargs": [],  # pl.fit's own arguments, each mapped above
}  # fmt: skip


def test_every_python_argument_has_a_flag_or_a_reason():
    import inspect

    from payne_lite.cli._fit import PYTHON_ONLY
    from payne_lite.cli._main import build_parser

    sub = next(
        a
        for a in build_parser()._actions
        if isinstance(a, __import__("argparse")._SubParsersAction)
    )
    fit_parser = sub.choices["fit"]
    flags = {o for a in fit_parser._actions for o in a.option_strings} | {"CATALOG"}
    names = set()
    for f in (pl.fit, pl.sample, pl.fit_catalog):
        names |= set(inspect.signature(f).parameters)
    assert not (set(CLI_OF) & set(PYTHON_ONLY))
    assert names == set(CLI_OF) | set(PYTHON_ONLY), names ^ (
        set(CLI_OF) | set(PYTHON_ONLY)
    )
    for name, wanted in CLI_OF.items():
        assert set(wanted) <= flags, (name, set(wanted) - flags)
    help_text = fit_parser.format_help()
    for name in PYTHON_ONLY:
        assert f"  {name}: " in help_text


def test_doppler_flag_reaches_the_instrument(files, fit_files):
    """--doppler sets Instrument.doppler (DOPPLER_INTERP without it); an unknown
    name is refused by the parser."""
    from payne_lite.cli._fit import _models
    from payne_lite.cli._main import build_parser

    parser = build_parser()
    base = ["fit", str(fit_files.cat), "--emulator", str(files.emu), "-o", "x.fits"]
    from conftest import OTHER_DOPPLER as other

    from payne_lite.observe import DOPPLER_INTERP

    for extra, want in (([], DOPPLER_INTERP), (["--doppler", other], other)):
        args = parser.parse_args([*base, *extra])
        assert _models(args, files.emu)[2].doppler == want
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--doppler", "sinc"])


def test_fit_run_options_reach_fit(files, fit_files, tmp_path, capsys):
    """--p0, --mask, --seed, --no-emulator-error, --meta: the table is pl.fit's with
    the same arguments."""
    emu = fit_files.emu
    p0 = np.array([5200.0, 3.5, -0.2])[: len(emu.label_names)]
    if len(emu.label_names) > 3:
        p0 = np.r_[p0, 0.5 * (emu.label_lo + emu.label_hi)[3:]]
    pix = np.zeros(fit_files.flux.shape[1], bool)
    pix[100:140] = True
    np.save(tmp_path / "mask.npy", pix)
    out_path = tmp_path / "run.fits"
    code, out, err = run(
        capsys, "fit", fit_files.cat, "--emulator", files.emu, "-o", out_path,
        "--no-progress", "--max-iter", "20", "--p0", ",".join(map(str, p0)),
        "--mask", tmp_path / "mask.npy", "--no-emulator-error", "--seed", "3",
        "--meta", "survey=test",
    )  # fmt: skip
    assert code == 0, err
    table = pl.read_results(out_path)
    ref = pl.fit(
        fit_files.flux, fit_files.err, emu, mask=fit_files.mask | pix, p0=p0, seed=3,
        emulator_error=False, options=pl.LMOptions(max_iter=20),
    )  # fmt: skip
    assert_tables_equal(table, ref, ref.colnames)
    assert table.meta["survey"] == "test"
    code, out, err = run(
        capsys, "fit", fit_files.cat, "--emulator", files.emu, "-o", out_path,
        "--force", "--p0", "1,2",
    )  # fmt: skip
    assert_one_line_error(code, out, err, "--p0: 2 labels given, the emulator has")


def test_fit_and_info_on_a_catalog_with_one_grid_per_spectrum(
    files, fit_files, tmp_path, capsys
):
    emu = fit_files.emu
    m = emu.n_pix - 10
    start = [0, 5, 0, 5, 5, 0]  # two slices of the emulator's grid
    flux = np.stack([fit_files.flux[i, k : k + m] for i, k in enumerate(start)])
    err = np.stack([fit_files.err[i, k : k + m] for i, k in enumerate(start)])
    wave = np.stack([emu.wavelength[k : k + m] for k in start])
    wave[3, -4:] = np.nan  # missing pixels at the red end: a third grid
    cat = pl.write_catalog(tmp_path / "rows.h5", flux, err, wave, ids=fit_files.ids)

    code, out, err_text = run(capsys, "info", cat)
    assert code == 0, err_text
    assert out.startswith(f"{cat}: payne_lite.Catalog v3, ")
    assert f"one grid per spectrum, {m} pixels; row 0: 15100.00-" in out

    out_path = tmp_path / "rows.ecsv"
    code, out, err_text = run(
        capsys, "fit", cat, "--emulator", files.emu, "-o", out_path,
        "--chunk-size", "4", "--max-iter", "20", "--no-progress",
    )  # fmt: skip
    assert code == 0, err_text
    assert out.splitlines()[0] == (
        f"fitted 6 spectra x {m} pixels (one wavelength grid each) from {cat} "
        "(lm, cont_deg 0)"
    )
    table = pl.read_results(out_path)
    ref = pl.fit(flux, err, emu, wavelength=wave, options=pl.LMOptions(max_iter=20))
    assert list(table["id"]) == fit_files.ids
    assert_tables_equal(table, ref, [c for c in ref.colnames if c != "grid_group"])
    np.testing.assert_array_equal(table["grid_group"], [0, 1, 0, 2, 1, 0])
    assert table.meta["n_wavelength_grids"] == 3
    assert table["n_good_pixels"][3] <= m - 4
    # spectrum figures take one grid: refused in one line, not a traceback
    assert_one_line_error(
        *run(
            capsys,
            "plot",
            out_path,
            "--spectra",
            cat,
            "--emulator",
            files.emu,
            "-o",
            tmp_path / "figs",
        ),  # fmt: skip
        "rows.h5 has one wavelength grid per spectrum: spectrum figures",
    )


def test_fit_group_fits_each_stars_visits_jointly(files, fit_files, tmp_path, capsys):
    f = fit_files
    star = ["a", "b", "a", "c", "b", "a"]  # 3 stars; their visits not contiguous
    cat = pl.write_catalog(
        tmp_path / "visits.h5", f.flux, f.err, f.emu.wavelength, mask=f.mask,
        ids=f.ids, group=star,
    )  # fmt: skip
    code, out, err = run(capsys, "info", cat)
    assert code == 0, err
    assert "group       3 stars (up to 3 visits each; payne-lite fit --group)" in out
    out_path = tmp_path / "stars.fits"
    code, out, err = run(
        capsys, "fit", cat, "--emulator", files.emu, "-o", out_path, "--group",
        "--max-iter", "20", "--fixed", "vmacro=5", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert out.splitlines()[0] == (
        f"fitted 6 spectra (3 stars, joint visits) x 478 pixels from {cat} "
        "(lm, cont_deg 0)"
    )
    table = pl.read_results(out_path)
    ref = pl.fit(
        f.flux, f.err, f.emu, mask=f.mask, group=star, fixed={"vmacro": 5.0},
        options=pl.LMOptions(max_iter=20),
    )  # fmt: skip
    assert list(table["group"]) == ["a", "b", "c"] and table.meta["n_stars"] == 3
    assert_tables_equal(table, ref, ref.colnames)
    assert table["id"][0].tolist() == ["star0", "star2", "star5"]
    # a catalog without group ids: one line, before any fit
    assert_one_line_error(
        *run(
            capsys,
            "fit",
            f.cat,
            "--emulator",
            files.emu,
            "-o",
            tmp_path / "x.fits",
            "--group",
            "--no-progress",
        ),  # fmt: skip
        f"--group: {f.cat} holds no group ids",
    )
    assert not (tmp_path / "x.fits").exists()
    assert not (tmp_path / "x.fits.parts").exists()


def test_info_catalog(fit_files, capsys):
    code, out, err = run(capsys, "info", fit_files.cat)
    assert code == 0, err
    assert out.startswith(f"{fit_files.cat}: payne_lite.Catalog v3, ")
    for frag in (
        "HDF5 metadata, Fletcher-32 on every numeric dataset, SHA-256 of ids",
        "spectra     6 (flux and flux_err float32; mask: yes)",
        "15100.00-15199.84 A, 478 pixels",
        "ids         'star0' .. 'star5'",
        "group       none",
    ):
        assert frag in out, frag


@pytest.mark.parametrize("suffix", [".fits", ".ecsv", ".h5"])
def test_info_results(fit_files, tmp_path, capsys, suffix):
    """A results table in any of the three formats: rows, parameters with units,
    convergence, chi2_red and flags as in the table, then its meta."""
    table = pl.fit(
        fit_files.flux, fit_files.err, fit_files.emu, mask=fit_files.mask,
        options=pl.LMOptions(max_iter=20),
    )  # fmt: skip
    table["flags"][0] |= 4
    path = tmp_path / f"r{suffix}"
    pl.write_results(table, path)
    code, out, err = run(capsys, "info", path)
    assert code == 0, err
    fmt = {".fits": "fits", ".ecsv": "ecsv", ".h5": "hdf5"}[suffix]
    assert out.startswith(f"{path}: fit results ({fmt}), ")
    n_conv = int(np.count_nonzero(table["converged"]))
    chi2 = np.median(np.asarray(table["chi2_red"]))
    assert "fits        6 (method lm)" in out
    assert "rv [km / s]" in out
    assert f"{n_conv} converged, median chi2_red {chi2:.3g}" in out
    assert "1 failed" in out
    assert "meta.method" in out


def test_info_mdn(tmp_path, capsys):
    from payne_lite.demo import default_mdn_path

    DEFAULT_MDN = default_mdn_path()
    if not DEFAULT_MDN.exists():
        pytest.skip(f"{DEFAULT_MDN} not in this checkout")
    code, out, err = run(capsys, "info", DEFAULT_MDN)
    assert code == 0, err
    # the shipped MDN has no flow: written as version 2
    assert out.startswith(f"{DEFAULT_MDN}: payne_lite.MDN v2, ")
    assert (
        "MDN(1 component(s), 8366 pixels" in out and "8366 pixels (log-uniform" in out
    )


def test_fit_apogee_fits_files_to_ecsv(files, fit_files, tmp_path, capsys):
    from astropy.io import fits

    emu = fit_files.emu
    x0 = np.log10(emu.wavelength[0])
    dlog = float(np.log10(emu.wavelength[-1]) - x0) / (emu.n_pix - 1)
    paths = []
    for i in range(2):
        hdr = fits.Header()
        hdr["CRVAL1"], hdr["CDELT1"], hdr["CTYPE1"] = x0, dlog, "LOG-LINEAR"
        p = tmp_path / f"aspcapStar-{i}.fits"
        fits.HDUList(
            [
                fits.PrimaryHDU(),
                fits.ImageHDU(fit_files.flux[i], header=hdr),
                fits.ImageHDU(fit_files.err[i]),
            ]
        ).writeto(p)
        paths.append(p)
    out_path = tmp_path / "sub" / "results.ecsv"
    code, out, err = run(
        capsys,
        "fit",
        *paths,
        "--emulator",
        files.emu,
        "-o",
        out_path,
        "--cont-deg",
        "1",
        "--max-iter",
        "10",
        "--no-progress",
    )
    assert code == 0, err
    assert out.splitlines()[0] == (
        "fitted 2 spectra x 478 pixels from 2 FITS files (lm, cont_deg 1)"
    )
    table = pl.read_results(out_path)
    with pl.open_catalog(paths) as cat:
        wave = cat.wavelength
    np.testing.assert_allclose(wave, emu.wavelength, rtol=1e-12)
    ref = pl.fit(
        fit_files.flux[:2],
        fit_files.err[:2],
        emu,
        cont_deg=1,
        options=pl.LMOptions(max_iter=10),
        wavelength=None if np.array_equal(wave, emu.wavelength) else wave,
    )
    assert list(table["id"]) == ["aspcapStar-0", "aspcapStar-1"]
    assert "cont_1" in table.colnames
    assert_tables_equal(table, ref, ref.colnames)


def test_fit_bad_input_is_one_line(files, fit_files, tmp_path, capsys):
    def fit_cli(*extra, cat=fit_files.cat, out=tmp_path / "r.fits"):
        return run(
            capsys,
            "fit",
            cat,
            "--emulator",
            files.emu,
            "-o",
            out,
            "--no-progress",
            *extra,
        )

    assert_one_line_error(
        *fit_cli("--fixed", "vmacro5"), "--fixed 'vmacro5': expected NAME=VALUE"
    )
    assert_one_line_error(*fit_cli("--fixed", "vmacro=fast"), "'fast' is not a number")
    assert_one_line_error(
        *fit_cli("--fixed", "vturb=1"), "unknown parameter 'vturb'", "vmacro"
    )
    assert_one_line_error(
        *fit_cli(out=tmp_path / "r.txt"), "unknown results file suffix '.txt'"
    )
    assert_one_line_error(
        *fit_cli(cat=tmp_path / "missing.h5"), "missing.h5: no such file"
    )
    assert_one_line_error(
        *fit_cli(cat=files.grid), "expected a 'payne_lite.Catalog' file"
    )
    assert_one_line_error(*fit_cli(out=fit_files.cat), "overwrite the input")
    assert_one_line_error(
        *fit_cli("--chunk-size", "0"), "--chunk-size", "positive integer"
    )
    assert_one_line_error(*fit_cli("--rv-range", "50", "-50"), "rv_range", "lo < hi")
    assert not (tmp_path / "r.fits").exists()


# --- errors -----------------------------------------------------------------------
@pytest.mark.parametrize("command", ["train", "predict", "info"])
def test_missing_file_is_one_line_exit_2(tmp_path, capsys, command):
    missing = tmp_path / "missing.h5"
    extra = {
        "train": ["-o", tmp_path / "e.h5"],
        "predict": ["--labels", STAR_TEXT, "-o", tmp_path / "f.npy"],
        "info": [],
    }[command]
    code, out, err = run(capsys, command, missing, *extra)
    assert_one_line_error(code, out, err, str(missing), "no such file")


@pytest.mark.parametrize("command", ["train", "predict", "info"])
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file_is_one_line_exit_2(files, tmp_path, capsys, command, damage):
    bad = tmp_path / "bad.h5"
    source = files.grid if command == "train" else files.emu
    if damage == "garbage":
        bad.write_bytes(b"this is not an HDF5 file\n" * 10)
    else:
        bad.write_bytes(source.read_bytes()[:3000])
    extra = {
        "train": ["-o", tmp_path / "e.h5"],
        "predict": ["--labels", STAR_TEXT, "-o", tmp_path / "f.npy"],
        "info": [],
    }[command]
    code, out, err = run(capsys, command, bad, *extra)
    assert_one_line_error(code, out, err, str(bad), "corrupt or truncated")


def test_wrong_kind_of_file_is_one_line_exit_2(files, tmp_path, capsys):
    code, out, err = run(
        capsys, "predict", files.grid, "--labels", STAR_TEXT, "-o", tmp_path / "f.npy"
    )
    assert_one_line_error(code, out, err, "expected a 'payne_lite.Emulator' file")


def test_wrong_number_of_labels(files, tmp_path, capsys):
    code, out, err = run(
        capsys,
        "predict",
        files.emu,
        "--labels",
        "5000,4.5,0,0.1",
        "-o",
        tmp_path / "f.npy",
    )
    assert_one_line_error(
        code,
        out,
        err,
        "4 value(s)",
        "takes 5",
        "Teff, logg, [Fe/H], [alpha/Fe], vmacro",
    )
    (tmp_path / "four.txt").write_text("5000 4.5 0 0.1\n")
    code, out, err = run(
        capsys,
        "predict",
        files.emu,
        "--labels-file",
        tmp_path / "four.txt",
        "-o",
        tmp_path / "f.npy",
    )
    assert_one_line_error(code, out, err, "4 column(s)", "5 labels")


def test_unknown_label_name_in_header(files, tmp_path, capsys):
    (tmp_path / "s.csv").write_text("Teff,logg,[Fe/H],alpha,vmacro\n5000,4.5,0,0.1,5\n")
    code, out, err = run(
        capsys,
        "predict",
        files.emu,
        "--labels-file",
        tmp_path / "s.csv",
        "-o",
        tmp_path / "f.npy",
    )
    assert_one_line_error(code, out, err, "unknown label name(s) ['alpha']")


@pytest.mark.parametrize("teff", ["9000", "-5000"])  # a leading minus is a value too
def test_labels_outside_box_mention_allow_outside(files, tmp_path, capsys, teff):
    code, out, err = run(
        capsys,
        "predict",
        files.emu,
        "--labels",
        f"{teff},4.5,0,0.1,5",
        "-o",
        tmp_path / "f.npy",
    )
    assert_one_line_error(
        code, out, err, f"Teff = {teff}", "training box", "--allow-outside"
    )
    assert not (tmp_path / "f.npy").exists()


def test_unknown_config_key_lists_valid_keys(files, tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"hiden": 3, "max_iter": 2}))
    code, out, err = run(
        capsys, "train", files.grid, "-o", tmp_path / "e.h5", "--config", cfg
    )
    assert_one_line_error(
        code,
        out,
        err,
        "unknown TrainConfig key(s) ['hiden']",
        "valid keys: hidden, activation, optimizer, max_iter",
    )
    cfg.write_text(json.dumps({"max_iter": "many"}))
    code, out, err = run(
        capsys, "train", files.grid, "-o", tmp_path / "e.h5", "--config", cfg
    )
    assert_one_line_error(code, out, err, "max_iter must be an integer")


def test_invalid_setting_and_usage_errors_are_one_line(files, tmp_path, capsys):
    code, out, err = run(
        capsys, "train", files.grid, "-o", tmp_path / "e.h5", "--valid-fraction", "1.5"
    )
    assert_one_line_error(code, out, err, "valid_fraction must be in (0, 1)")
    code, out, err = run(capsys, "grid", "-o", tmp_path / "g.h5", "--n-spec", "0")
    assert_one_line_error(
        code, out, err, "--n-spec", "positive integer", "payne-lite grid --help"
    )
    code, out, err = run(capsys, "train", files.grid, "-o", files.grid)
    assert_one_line_error(code, out, err, "overwrite the input")
    code, out, err = run(capsys)
    assert_one_line_error(code, out, err, "COMMAND")


def test_debug_shows_the_exception(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        main(["--debug", "info", str(tmp_path / "missing.h5")])


# --- help -------------------------------------------------------------------------
def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    )
    return dict(action.choices)


def test_top_level_help_lists_commands(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for name in ("grid", "train", "predict", "info", "fit", "--verbose", "--debug"):
        assert name in out


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_subcommand_help_explains_every_option(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    text = " ".join(out.split())
    for action in _subparsers()[command]._actions:
        assert action.help, f"{command}: {action.option_strings or action.dest}"
        for flag in action.option_strings:
            assert flag in text, (command, flag)
        if not action.option_strings:
            assert action.metavar in text


def test_console_script_runs():
    exe = Path(sys.executable).with_name("payne-lite")
    script = str(exe) if exe.exists() else shutil.which("payne-lite")
    if script is None:
        pytest.skip(
            "the payne-lite console script is not installed "
            "(pip install -e . puts it on PATH)"
        )
    proc = subprocess.run(
        [script, "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: payne-lite")
    assert "predict" in proc.stdout


def test_info_samples_parts_folder_and_lock(tmp_path, capsys):
    """info describes the other files fit_catalog and pl.sample write: a samples file,
    a parts folder left by a killed run, an output lock."""
    import json

    from payne_lite.catalog._lock import LOCK_FORMAT
    from payne_lite.catalog._parts import PARTS_FORMAT
    from payne_lite.posterior import PosteriorSamples, save_samples

    rng = np.random.default_rng(0)
    post = PosteriorSamples(
        names=("Teff", "rv"), units=("K", "km/s"),
        samples=[rng.normal(size=(40, 2)), rng.normal(size=(64, 2))],
        weights=[None, np.full(64, 1 / 64)], method=["emcee", "mdn-is"],
    )  # fmt: skip
    save_samples(tmp_path / "post.h5", post, {"method": "mdn-is", "seed": 4})
    code, out, err = run(capsys, "info", tmp_path / "post.h5")
    assert code == 0, err
    assert "payne_lite.samples v1" in out and "Teff [K], rv [km/s]" in out
    assert (
        "40-64 per star" in out
        and "emcee x1, mdn-is x1" in out
        and "yes (mdn-is)" in out
    )

    parts = tmp_path / "out.fits.parts"
    parts.mkdir()
    man = {"format": PARTS_FORMAT, "format_version": 1, "n_chunks": 5, "done": [0, 2],
           "identity": {"method": "lm", "chunk_size": 64,
                        "input": {"n_spec": 300, "n_pix": 7214}}}  # fmt: skip
    (parts / "manifest.json").write_text(json.dumps(man))
    code, out, err = run(capsys, "info", parts)
    assert code == 0, err
    assert "2 of 5 done (3 to fit)" in out and "300 spectra x 7214 pixels" in out

    lock = tmp_path / "out.fits.lock"
    owner = {"format": LOCK_FORMAT, "host": "node7", "pid": 4242, "started": "today",
             "argv": ["payne-lite", "fit", "cat.h5"]}  # fmt: skip
    lock.write_text(json.dumps(owner))
    code, out, err = run(capsys, "info", lock)
    assert code == 0, err
    assert "pid 4242 on host 'node7'" in out and "payne-lite fit cat.h5" in out
    (tmp_path / "empty").mkdir()
    code, out, err = run(capsys, "info", tmp_path / "empty")
    assert_one_line_error(code, out, err, "a folder without manifest.json")
