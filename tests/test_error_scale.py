"""The label-space scale of the emulator's error (``Emulator.error_scale``,
``payne_lite.calibrate_emulator_errors``): its formula, its file, what the fit's
covariance does with it, and a calibration that recovers a known dependence on the
labels."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest
from conftest import TINY_NAMES, TINY_UNITS
from test_error_model import _emulator_with_basis, two_noisy_stars

import payne_lite as pl
from payne_lite import Emulator, fit
from payne_lite.cli import main
from payne_lite.emulator import ERROR_SCALE_RANGE, error_scale_features
from payne_lite.observe import emulator_error_z


def _hand_features(s):
    """1, s0, s1, s2, then s_i s_j for i <= j: written out for 3 labels."""
    s0, s1, s2 = s.T
    return np.column_stack(
        [
            np.ones(len(s)),
            s0,
            s1,
            s2,
            s0 * s0,
            s0 * s1,
            s0 * s2,
            s1 * s1,
            s1 * s2,
            s2 * s2,
        ]
    )


def test_error_scale_formula_clipping_and_file_round_trip(tmp_path):
    """kappa = sqrt(exp(features @ coef)) per label and rv, the labels clipped to the
    box and kappa to ERROR_SCALE_RANGE; ones without a scale. A file with a scale is
    format version 3 (older readers refuse it rather than drop it), without one 2;
    wrong shapes and a scale without an error basis are refused."""
    e, _, _ = _emulator_with_basis()
    rng = np.random.default_rng(3)
    coef = 0.3 * rng.standard_normal((4, 10))
    es = dataclasses.replace(e, error_scale=coef)
    s = rng.uniform(-0.5, 0.5, (20, 3))
    np.testing.assert_allclose(error_scale_features(s), _hand_features(s))
    want = np.clip(np.sqrt(np.exp(_hand_features(s) @ coef.T)), *ERROR_SCALE_RANGE)
    np.testing.assert_allclose(es.error_scale_at(s), want, rtol=1e-12)
    far = np.array([[3.0, -2.0, 0.1]])  # outside the box: read at its face
    np.testing.assert_allclose(
        es.error_scale_at(far), es.error_scale_at([[0.5, -0.5, 0.1]]), rtol=1e-12
    )
    assert np.all(np.isnan(es.error_scale_at([[np.nan, 0.0, 0.0]])))
    big = dataclasses.replace(e, error_scale=np.full((4, 10), 50.0))
    assert np.all(big.error_scale_at(s) == ERROR_SCALE_RANGE[1])
    assert np.all(e.error_scale_at(s) == 1.0)
    es.save(tmp_path / "s.h5")
    e.save(tmp_path / "e.h5")
    with h5py.File(tmp_path / "s.h5") as f, h5py.File(tmp_path / "e.h5") as g:
        assert f.attrs["format_version"] == 3 and g.attrs["format_version"] == 2
    back = Emulator.load(tmp_path / "s.h5")
    np.testing.assert_array_equal(back.error_scale, coef)
    assert Emulator.load(tmp_path / "e.h5").error_scale is None
    with pytest.raises(ValueError, match=r"error_scale \(4, 9\) must be \(4, 10\)"):
        dataclasses.replace(e, error_scale=np.zeros((4, 9)))
    with pytest.raises(ValueError, match="needs one"):
        dataclasses.replace(e, error_basis=None, error_scale=coef)


def test_fit_scales_only_the_emulator_term_of_each_error():
    """With kappa constant per parameter (the scale's intercepts), each label's and
    rv's variance is var_flux + kappa^2 var_emu: with var_flux from the same fit
    with a basis of zeros, kappa^2 = 4 and 9 add 4 and 9 times what kappa^2 = 1
    adds (worked by hand, no reference code), the fitted values do not change, and
    the table says the errors were scaled."""
    e, _, _ = _emulator_with_basis()
    noisy, err, mask = two_noisy_stars(e)
    tables = []
    for k2 in (1.0, 4.0, 9.0):
        coef = np.zeros((4, 10))
        coef[:, 0] = np.log(k2)
        tables.append(
            fit(noisy, err, dataclasses.replace(e, error_scale=coef), mask=mask)
        )
    t1, t4, t9 = tables
    # the flux term alone: the same fit with a basis of zeros (no emulator term)
    zero = dataclasses.replace(e, error_basis=np.zeros_like(e.error_basis))
    t0 = fit(noisy, err, zero, mask=mask)
    assert t4.meta["emulator_error_scaled"] is True
    assert fit(noisy, err, e, mask=mask).meta["emulator_error_scaled"] is False
    for name in [*TINY_NAMES, "rv"]:
        np.testing.assert_array_equal(t1[name], t9[name])
        v0, v1, v4, v9 = (
            np.asarray(t[f"{name}_err"], np.float64) ** 2 for t in (t0, *tables)
        )
        # var = v0 + kappa^2 (v1 - v0): only the emulator term is scaled (scaling the
        # whole covariance would give v4 = 4 v1, not v0 + 4 (v1 - v0))
        np.testing.assert_allclose(v4 - v0, 4.0 * (v1 - v0), rtol=1e-4)
        np.testing.assert_allclose(v9 - v0, 9.0 * (v1 - v0), rtol=1e-4)
        assert np.all(v1 > 1.05 * v0)  # the emulator term is not negligible here
    # kappa per label: only Teff's error grows
    coef = np.zeros((4, 10))
    coef[0, 0] = np.log(4.0)
    tt = fit(noisy, err, dataclasses.replace(e, error_scale=coef), mask=mask)
    assert np.all(tt[f"{TINY_NAMES[0]}_err"] > t1[f"{TINY_NAMES[0]}_err"])
    for name in [*TINY_NAMES[1:], "rv"]:
        np.testing.assert_allclose(tt[f"{name}_err"], t1[f"{name}_err"], rtol=1e-6)


def test_calibration_recovers_a_known_dependence_on_the_labels(tmp_path, capsys):
    """Held-out 'truths' whose emulator error is exactly a(x) U^T xi (xi standard
    normal, U the emulator's own error basis), a(x)^2 = exp(1.5 s_0): the fit's
    sandwich is right for a = 1, so the emulator-induced shift over its emulator sd
    is N(0, a^2) per label and rv, and the calibration must find log kappa^2 =
    1.5 s_0 (the s_0 coefficient within 0.5 of 1.5, the others within 0.5 of 0,
    about 3.5 standard errors) and bring the RMS of z to 1."""
    e, basis, _ = _emulator_with_basis()
    rng = np.random.default_rng(5)
    n = 3000
    s = rng.uniform(-0.5, 0.5, (n, 3))
    labels = e.unscale(s)
    a = np.sqrt(np.exp(1.5 * s[:, 0]))
    truth = e.predict(labels).astype(np.float64)
    truth -= a[:, None] * (rng.standard_normal((n, basis.shape[0])) @ basis)
    z = emulator_error_z(e, labels, truth)
    np.testing.assert_allclose(
        np.sqrt(np.mean((z / a[:, None]) ** 2, 0)), 1.0, atol=0.06
    )
    grid = pl.SpectralGrid(
        wavelength=e.wavelength, labels=labels, flux=truth,
        label_names=TINY_NAMES, label_units=TINY_UNITS,
    )  # fmt: skip
    cal = pl.calibrate_emulator_errors(e, grid)
    coef = cal.error_scale
    assert coef.shape == (4, 10)
    np.testing.assert_allclose(coef[:, 1], 1.5, atol=0.5)
    np.testing.assert_allclose(coef[:, [0, 2, 3]], 0.0, atol=0.5)
    rms = cal.meta["error_scale"]["rms_z_scaled"]
    assert all(0.9 < v < 1.1 for v in rms.values()), rms
    assert cal.meta["error_scale"]["n_spectra"] == n
    # payne-lite info says so
    cal.save(tmp_path / "cal.h5")
    assert main(["info", str(tmp_path / "cal.h5")]) == 0
    out = capsys.readouterr().out
    assert "payne_lite.Emulator v3" in out and "error_scale" in out
    assert f"fitted on {n} held-out spectra" in out


def test_calibration_refuses_bad_input():
    e, _, _ = _emulator_with_basis()
    rng = np.random.default_rng(0)
    labels = e.unscale(rng.uniform(-0.5, 0.5, (30, 3)))  # < 4 x 10
    flux = e.predict(labels)
    grid = pl.SpectralGrid(
        wavelength=e.wavelength, labels=labels, flux=flux,
        label_names=TINY_NAMES, label_units=TINY_UNITS,
    )  # fmt: skip
    with pytest.raises(ValueError, match="no error_basis"):
        pl.calibrate_emulator_errors(dataclasses.replace(e, error_basis=None), grid)
    with pytest.raises(ValueError, match="too few"):
        pl.calibrate_emulator_errors(e, grid)
    other = dataclasses.replace(grid, wavelength=grid.wavelength * 1.001)
    with pytest.raises(ValueError, match="wavelengths are not the emulator's"):
        pl.calibrate_emulator_errors(e, other)


def test_cli_calibrate_errors(tmp_path, capsys):
    """payne-lite calibrate-errors EMULATOR GRID -o OUT writes the emulator with
    its error_scale and says what it measured; an emulator without an error basis
    is refused in one line, with nothing written."""
    e, basis, _ = _emulator_with_basis()
    rng = np.random.default_rng(8)
    labels = e.unscale(rng.uniform(-0.5, 0.5, (200, 3)))
    flux = e.predict(labels) - rng.standard_normal((200, basis.shape[0])) @ basis
    pl.SpectralGrid(
        wavelength=e.wavelength, labels=labels, flux=flux,
        label_names=TINY_NAMES, label_units=TINY_UNITS,
    ).save(tmp_path / "held.h5")  # fmt: skip
    e.save(tmp_path / "e.h5")
    out = tmp_path / "cal.h5"
    args = ["calibrate-errors", str(tmp_path / "e.h5"), str(tmp_path / "held.h5")]
    assert main([*args, "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "error_scale fitted on 200 spectra" in text and f"wrote {out}" in text
    cal = Emulator.load(out)
    assert cal.error_scale.shape == (4, 10)
    np.testing.assert_array_equal(cal.error_basis, e.error_basis)
    dataclasses.replace(e, error_basis=None).save(tmp_path / "nobasis.h5")
    bad = ["calibrate-errors", str(tmp_path / "nobasis.h5"), str(tmp_path / "held.h5")]
    assert main([*bad, "-o", str(tmp_path / "x.h5")]) != 0
    err = capsys.readouterr().err
    assert "no error_basis" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.h5").exists()
