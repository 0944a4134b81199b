"""The validation report in emulator files (issue 19, part 1): written by training,
stored and read back, recomputed by ``Emulator.validate`` on a new held-out grid,
printed by ``payne-lite info``, drawn, and used by the fitter's QA bit 8."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest
from conftest import restamp

import payne_lite as pl
from payne_lite.cli import main
from payne_lite.emulator import POOR_FACTOR, REPORT_BINS, ValidationReport
from payne_lite.fitting import FLAG_BITS, FLAG_EMULATOR_POOR
from payne_lite.grid import synth

N_PIX = 60


@pytest.fixture(scope="module")
def toy():
    """A toy emulator trained on 600 built-in spectra (60 pixels, 5 labels), its
    grid, and a new held-out grid of 600 spectra (other label draws)."""
    wave = synth.default_wavelength()[2000 : 2000 + N_PIX]
    grid = synth.make_grid(600, wavelength=wave, seed=1, progress=False)
    emu = pl.train_emulator(grid, hidden=5, max_iter=40, progress=False)
    new = synth.make_grid(600, wavelength=wave, seed=7, progress=False)
    return emu, grid, new


def _hand_bins(labels, errors, lo, hi):
    """Median error per label and bin, and counts, by np.digitize (B equal bins)."""
    n_lab = labels.shape[1]
    med = np.full((n_lab, REPORT_BINS), np.nan)
    cnt = np.zeros((n_lab, REPORT_BINS), int)
    for j in range(n_lab):
        edges = np.linspace(lo[j], hi[j], REPORT_BINS + 1)
        b = np.clip(np.digitize(labels[:, j], edges) - 1, 0, REPORT_BINS - 1)
        for k in range(REPORT_BINS):
            sel = errors[b == k]
            cnt[j, k] = sel.size
            if sel.size:
                med[j, k] = np.median(sel)
    return med, cnt


def test_training_writes_a_report_of_the_held_out_split(toy):
    emu, grid, _ = toy
    rep = emu.report
    _, valid = grid.split(0.2, seed=0)  # the split training made (seed 0)
    np.testing.assert_array_equal(rep.labels, valid.labels)
    # independent recomputation: Emulator.predict on the held-out spectra
    err = np.abs(emu.predict(valid.labels) - valid.flux)
    np.testing.assert_allclose(rep.spectrum_error, np.median(err, 1), atol=2e-6)
    np.testing.assert_allclose(rep.pixel_median, np.median(err, 0), atol=2e-6)
    np.testing.assert_allclose(rep.pixel_p99, np.percentile(err, 99, 0), atol=2e-5)
    med, cnt = _hand_bins(rep.labels, rep.spectrum_error, emu.label_lo, emu.label_hi)
    t = rep.label_bins()
    np.testing.assert_array_equal(t.count, cnt)
    np.testing.assert_allclose(t.median, med, rtol=1e-12)
    # coverage: the training labels (the other 480) per bin, and pairs
    train, _ = grid.split(0.2, seed=0)
    _, cov = _hand_bins(
        train.labels, np.zeros(train.n_spec), emu.label_lo, emu.label_hi
    )
    np.testing.assert_array_equal(rep.coverage, cov)
    assert rep.coverage_2d[0, 1].sum() == train.n_spec
    np.testing.assert_array_equal(rep.coverage_2d[2, 2].diagonal(), cov[2])
    prov = rep.provenance
    assert prov["grid_sha256"] == pl.emulator._train_ckpt.grid_digest(grid)
    assert prov["grid_meta"] == grid.meta and prov["config"]["max_iter"] == 40
    assert prov["payne_lite_version"] == pl.__version__
    assert prov["devices"] and prov["train_seconds"] > 0


def test_report_agrees_with_a_new_held_out_grid_within_sampling_noise(toy):
    emu, _, new = toy
    again = emu.validate(new)
    assert again.n_spectra == new.n_spec
    prov = again.provenance
    assert prov["validated_grid_sha256"] == pl.emulator._train_ckpt.grid_digest(new)
    assert prov["grid_sha256"] == emu.report.provenance["grid_sha256"]  # training's
    np.testing.assert_array_equal(again.coverage, emu.report.coverage)
    z = []
    for a, b in (
        (emu.report.label_bins(), again.label_bins()),
        (emu.report.edge_bins(), again.edge_bins()),
        (emu.report.corner_bins(), again.corner_bins()),
    ):
        ok = (a.count >= 10) & (b.count >= 10)
        z.append(((a.median - b.median) / np.hypot(a.noise, b.noise))[ok])
    z = np.concatenate(z)
    assert z.size >= 25
    assert np.all(np.abs(z) < 4.0), z
    assert np.median(np.abs(z)) < 1.5, z  # 0.67 expected for unit-normal z
    # and the noise is a real yardstick: errors twice as large are not "in agreement"
    doubled = emu.report.label_bins().median * 2
    zz = (doubled - again.label_bins().median) / np.hypot(
        emu.report.label_bins().noise, again.label_bins().noise
    )
    assert np.median(np.abs(zz)) > 4.0


def test_median_noise_is_calibrated_and_hand_checked():
    from payne_lite.emulator._report import median_and_noise

    med, noise = median_and_noise(np.arange(1.0, 17.0))  # indices 8 -+ 2: 7 and 11
    assert (med, noise) == (8.5, 2.0)
    rng = np.random.default_rng(3)
    draws = rng.normal(size=(400, 100))
    meds = np.median(draws, 1)
    noises = np.array([median_and_noise(d)[1] for d in draws])
    # the median of 100 unit normals scatters by sqrt(pi / 2) / 10 = 0.125
    assert np.std(meds) == pytest.approx(0.125, rel=0.1)
    assert np.mean(noises) == pytest.approx(0.125, rel=0.1)
    assert np.isnan(median_and_noise([1.0, 2.0])[1])


def test_report_round_trips_through_the_file(toy, tmp_path):
    emu = toy[0]
    path = tmp_path / "emu.h5"
    emu.save(path)
    back = pl.Emulator.load(path).report
    for name in (
        "labels", "spectrum_error", "pixel_median", "pixel_p99", "coverage",
        "coverage_2d", "label_lo", "label_hi",
    ):  # fmt: skip
        np.testing.assert_array_equal(getattr(back, name), getattr(emu.report, name))
    assert back.provenance == emu.report.provenance
    assert back.label_names == emu.label_names
    assert repr(back) == repr(emu.report)
    assert repr(back).startswith(f"ValidationReport({back.n_spectra} held-out spectra")
    for a, b in zip(back.poor_cells(), emu.report.poor_cells(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_info_prints_the_report(toy, tmp_path, capsys):
    emu = toy[0]
    path = tmp_path / "emu.h5"
    emu.save(path)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "payne_lite.Emulator v2" in out
    rep, t = emu.report, emu.report.label_bins()
    assert f"{rep.n_spectra} held-out spectra: split off the training grid" in out
    assert f"median over all {rep.median_error:.2e}" in out
    lines = out.splitlines()
    for j, name in enumerate(emu.label_names):
        row = next(x for x in lines if x.strip().startswith(f"{name} ["))
        for k in range(REPORT_BINS):
            assert f"{t.median[j, k]:.2e} ({t.count[j, k]})" in row
        cov = lines[lines.index(row) + 1].split()
        assert cov[:2] == ["trained", "on"]
        assert [int(c) for c in cov[2:]] == rep.coverage[j].tolist()
    assert "box edge" in out and "corners" in out
    assert f"grid_sha256={rep.provenance['grid_sha256'][:16]}..." in out


def test_files_without_a_report_still_work(tiny_emulator, tmp_path, capsys):
    """A format-1 file (before reports) loads; info says there is no report; the
    fitter sets no bit 8."""
    path = tmp_path / "old.h5"
    tiny_emulator.save(path)
    with h5py.File(path, "r+") as f:
        assert "report" not in f
        f.attrs["format_version"] = 1
    restamp(path)
    emu = pl.Emulator.load(path)
    assert emu.report is None
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "payne_lite.Emulator v1" in out and "no validation report" in out


def test_the_shipped_payne_network_has_no_report(payne_apogee, tmp_path, capsys):
    emu = payne_apogee[0]
    assert emu.report is None
    emu.save(tmp_path / "payne.h5")
    assert pl.Emulator.load(tmp_path / "payne.h5").report is None
    assert main(["info", str(tmp_path / "payne.h5")]) == 0
    assert "no validation report in this file" in capsys.readouterr().out


def test_a_damaged_report_is_refused(toy, tmp_path):
    path = tmp_path / "emu.h5"
    toy[0].save(path)
    with h5py.File(path, "r+") as f:
        del f["report/spectrum_error"]
        f["report/spectrum_error"] = -np.ones(toy[0].report.n_spectra)
    restamp(path)
    with pytest.raises(pl.FileFormatError, match="validation report.*spectrum_error"):
        pl.Emulator.load(path)


def test_validate_refuses_another_grid(toy):
    emu, _, new = toy
    other = dataclasses.replace(new, wavelength=new.wavelength * 1.001)
    with pytest.raises(ValueError, match="grid wavelengths"):
        emu.validate(other)
    renamed = dataclasses.replace(new, label_names=("a", "b", "c", "d", "e"))
    with pytest.raises(ValueError, match="grid labels"):
        emu.validate(renamed)


def _hand_made_report(emu, n=500, seed=0):
    """Errors 1e-3 everywhere but 5 times larger in the lowest fifth of Teff."""
    rng = np.random.default_rng(seed)
    lo, hi = emu.label_lo, emu.label_hi
    labels = lo + (hi - lo) * rng.uniform(size=(n, emu.n_labels))
    low = labels[:, 0] < lo[0] + 0.2 * (hi[0] - lo[0])
    err = np.where(low, 5e-3, 1e-3) * rng.uniform(0.9, 1.1, n)
    return ValidationReport.from_errors(
        np.repeat(err[:, None], emu.n_pix, 1),
        labels,
        label_names=emu.label_names,
        label_units=emu.label_units,
        label_lo=lo,
        label_hi=hi,
    )


def test_poor_cells_follow_the_definition(toy):
    emu = toy[0]
    rep = _hand_made_report(emu)
    lab, edge, corner = rep.poor_cells()
    expect = np.zeros_like(lab)
    expect[0, 0] = True  # 5e-3 > POOR_FACTOR x the overall median (about 1e-3)
    assert 5e-3 > POOR_FACTOR * rep.median_error > 1e-3
    np.testing.assert_array_equal(lab, expect)
    assert not edge.any() and not corner.any()
    mid = 0.5 * (emu.label_lo + emu.label_hi)
    cool = mid.copy()
    cool[0] = emu.label_lo[0] + 0.1 * (emu.label_hi[0] - emu.label_lo[0])
    nan = np.full_like(mid, np.nan)
    np.testing.assert_array_equal(rep.poor([mid, cool, nan]), [False, True, False])
    # a cell of fewer than POOR_MIN_COUNT spectra is never poor
    few = _hand_made_report(emu, n=30)
    assert few.label_bins().count[0, 0] < 10 and not few.poor_cells()[0].any()


def test_fit_sets_bit_8_where_the_report_says_poor(toy):
    emu = toy[0]
    marked = dataclasses.replace(emu, report=_hand_made_report(emu))
    lo, hi = emu.label_lo, emu.label_hi
    frac = np.array(
        [
            [0.1, 0.5, 0.5, 0.5, 0.5],
            [0.5, 0.5, 0.5, 0.5, 0.5],
            [0.8, 0.4, 0.6, 0.5, 0.5],
        ]
    )
    truth = lo + frac * (hi - lo)
    flux = emu.predict(truth).astype(np.float64)
    err = np.full_like(flux, 0.002)
    t = pl.fit(flux, err, marked, rv_range=(-20.0, 20.0))
    teff = np.asarray(t["Teff"])
    expect = teff < lo[0] + 0.2 * (hi[0] - lo[0])  # the one poor cell, by hand
    assert expect.tolist() == [True, False, False]
    got = (np.asarray(t["flags"]) & FLAG_EMULATOR_POOR) > 0
    np.testing.assert_array_equal(got, expect)
    assert t.meta["flag_bits"]["8"] == FLAG_BITS[8]
    plain = pl.fit(flux, err, dataclasses.replace(emu, report=None), rv_range=(-20, 20))
    assert not np.any(np.asarray(plain["flags"]) & FLAG_EMULATOR_POOR)


def test_validation_figure(toy, tmp_path):
    from payne_lite import plots

    paths = plots.validation_report_plot(toy[0].report, tmp_path / "val", title="toy")
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    assert all(p.stat().st_size > 10_000 for p in paths)
    with pytest.raises(TypeError, match="ValidationReport"):
        plots.validation_report_plot(toy[0], tmp_path / "x")
