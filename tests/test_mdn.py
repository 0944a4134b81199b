"""Tests for the mixture density network (payne_lite.mdn) and fit(..., mdn=...).

A small MDN is trained once per module on a smooth random emulator (400 pixels, 3
labels; see tests/test_fit.py), a few seconds of CPU.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import restamp
from test_fit import smooth_emulator

import payne_lite as pl
from payne_lite.mdn import (
    SIGMA_FLOOR,
    mixture_moments,
    mixture_nll,
    mixture_params,
    simulate,
)
from payne_lite.mdn import _mixture as mix_mod
from payne_lite.mdn import _train as train_mod

RV_RANGE = (-150.0, 150.0)


@pytest.fixture(scope="module")
def emu():
    return smooth_emulator()


@pytest.fixture(scope="module")
def trained(emu):
    return pl.train_mdn(
        emu,
        n_train=6000,
        n_valid=1000,
        epochs=25,
        n_pca=12,
        hidden=(64, 64),
        batch_size=256,
        learning_rate=3e-3,
        rv_range=RV_RANGE,
        snr_range=(20.0, 200.0),
        seed=0,
        progress=False,
    )


@pytest.fixture(scope="module")
def held_out(emu):
    rng = np.random.default_rng(99)
    return simulate(emu, 400, rng=rng, snr_range=(30.0, 200.0), rv_range=(-100, 100))


# --------------------------------------------------------------------------------------
# Likelihood
# --------------------------------------------------------------------------------------
def test_nll_single_gaussian_matches_hand_computation():
    mu = np.array([[0.1, -0.2]])
    sigma = np.array([[0.5, 2.0]])
    y = np.array([0.3, 1.0])
    hand = sum(
        0.5 * ((yi - m) / s) ** 2 + np.log(s) + 0.5 * np.log(2 * np.pi)
        for yi, m, s in zip(y, mu[0], sigma[0], strict=True)
    )
    got = mixture_nll(jnp.zeros((2, 1)), jnp.asarray(mu.T), jnp.asarray(sigma.T), y)
    np.testing.assert_allclose(float(got), hand, rtol=1e-6)


def test_nll_two_component_mixture_matches_hand_computation():
    w = np.array([0.3, 0.7])
    mu = np.array([-1.0, 2.0])
    sigma = np.array([0.5, 1.5])
    y = 0.4
    dens = w * np.exp(-0.5 * ((y - mu) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
    got = mixture_nll(jnp.log(w)[None], mu[None], sigma[None], np.array([y]))
    np.testing.assert_allclose(float(got), -np.log(dens.sum()), rtol=1e-6)
    m, s = mixture_moments(jnp.log(w), mu, sigma)
    mean = (w * mu).sum()
    np.testing.assert_allclose(float(m), mean, rtol=1e-6)
    var = (w * (sigma**2 + mu**2)).sum() - mean**2
    np.testing.assert_allclose(float(s), np.sqrt(var), rtol=1e-6)


def test_sigmas_positive_even_for_very_negative_raw_output():
    out = jnp.full((4, 3 * 2 * 3), -1e4)
    logw, _, sigma = mixture_params(out, 3, 2)
    assert np.all(np.asarray(sigma) >= SIGMA_FLOOR)
    np.testing.assert_allclose(np.exp(np.asarray(logw)).sum(-1), 1.0, rtol=1e-6)


# --------------------------------------------------------------------------------------
# Training and prediction
# --------------------------------------------------------------------------------------
def test_training_reduces_validation_nll(trained):
    v = trained.history["valid_nll"]
    assert v.size >= 5
    assert np.all(np.isfinite(v))
    assert v.min() < v[0] - 1.0


def test_predict_shapes_units_and_positive_sigma(trained, held_out):
    mean, sigma = trained.predict(held_out["flux"], held_out["err"], held_out["mask"])
    assert mean.shape == sigma.shape == (400, 4)
    assert np.all(np.isfinite(mean)) and np.all(sigma > 0)
    truth = np.column_stack([held_out["labels"], held_out["rv"]])
    for j in range(4):
        r = np.corrcoef(mean[:, j], truth[:, j])[0, 1]
        assert r > 0.9, (trained.output_names[j], r)
    # rv located to a few km/s over +-100 km/s (pixels of 4 km/s)
    assert np.median(np.abs(mean[:, 3] - truth[:, 3])) < 2.0
    one_m, one_s = trained.predict(held_out["flux"][0], held_out["err"][0])
    assert one_m.shape == one_s.shape == (4,)


def test_predict_handles_nan_and_masked_pixels(trained, held_out):
    f = held_out["flux"][:8].copy()
    e = held_out["err"][:8].copy()
    f[:, 50:80] = np.nan
    e[:, 100:110] = 0.0
    e[:, 120:125] = np.inf
    mean, sigma = trained.predict(f, e)
    assert np.all(np.isfinite(mean)) and np.all(sigma > 0)
    ref, _ = trained.predict(held_out["flux"][:8], held_out["err"][:8])
    span = np.append(trained.label_hi - trained.label_lo, 50.0)
    assert np.all(np.abs(mean - ref) / span < 0.1)
    # every pixel masked: no information, NaN rather than a made-up answer
    m2, s2 = trained.predict(f[:2], e[:2], mask=np.ones(f.shape[1], bool))
    assert np.all(np.isnan(m2)) and np.all(np.isnan(s2))


def test_predict_does_not_modify_inputs(trained, held_out):
    f = held_out["flux"][:4].copy()
    e = held_out["err"][:4].copy()
    f[0, 3] = np.nan
    f0, e0 = f.copy(), e.copy()
    trained.predict(f, e)
    np.testing.assert_array_equal(f, f0)
    np.testing.assert_array_equal(e, e0)


def test_predict_bad_shapes_refused(trained):
    with pytest.raises(ValueError, match=r"\(n_spec, 400\)"):
        trained.predict(np.ones((2, 399)), np.ones((2, 399)))
    with pytest.raises(ValueError, match="mask"):
        trained.predict(np.ones((2, 400)), np.ones((2, 400)), mask=np.ones(3, bool))


# --------------------------------------------------------------------------------------
# Files and mismatches
# --------------------------------------------------------------------------------------
def test_save_load_round_trip_identical_outputs(trained, held_out, tmp_path, emu):
    path = tmp_path / "m.h5"
    trained.save(path)
    back = pl.MDN.load(path, emulator=emu)
    assert back.label_names == trained.label_names
    assert back.rv_range == trained.rv_range
    np.testing.assert_array_equal(
        back.history["valid_nll"], trained.history["valid_nll"]
    )
    a = trained.predict(held_out["flux"][:16], held_out["err"][:16])
    b = back.predict(held_out["flux"][:16], held_out["err"][:16])
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_mismatched_emulator_refused(trained, emu, tmp_path):
    import dataclasses

    other_names = dataclasses.replace(emu, label_names=("Teff", "logg", "[M/H]"))
    with pytest.raises(ValueError, match=r"labels \['Teff', 'logg', '\[Fe/H\]'\]"):
        trained.check_emulator(other_names)
    hi = emu.label_hi.copy()
    hi[0] += 500.0
    with pytest.raises(ValueError, match="training box"):
        trained.check_emulator(dataclasses.replace(emu, label_hi=hi))
    shifted = smooth_emulator(wavelength=emu.wavelength + 1.0)
    with pytest.raises(ValueError, match="wavelength grid"):
        trained.check_emulator(shifted)
    path = tmp_path / "m.h5"
    trained.save(path)
    with pytest.raises(ValueError, match="wavelength grid"):
        pl.MDN.load(path, emulator=shifted)
    with pytest.raises(ValueError, match="wavelength grid"):
        trained.predict(
            np.ones((1, 400)), np.ones((1, 400)), wavelength=shifted.wavelength
        )


def test_load_refuses_version_1_files(trained, tmp_path):
    """Version-1 files hold an MLP trained on other features: refused, not misread."""
    import h5py

    path = tmp_path / "m.h5"
    trained.save(path)
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 1
    restamp(path)
    with pytest.raises(pl.FileFormatError, match="format_version=1"):
        pl.MDN.load(path)


# --------------------------------------------------------------------------------------
# Feature extraction on a log-uniform grid with a gap (the APOGEE layout)
# --------------------------------------------------------------------------------------
APOGEE_STEP = 6e-6 * np.log(10.0)  # ln(lambda) step of APOGEE's grid


def _log_grid_wave(n_a=300, n_b=260, gap=40, step=APOGEE_STEP):
    idx = np.concatenate([np.arange(n_a), n_a + gap + np.arange(n_b)])
    return np.exp(np.log(15200.0) + step * idx), step


def test_rest_frame_shift_on_log_grid_matches_numpy():
    """The batched span shift equals linear interpolation in ln(lambda) by NumPy:
    NaN where a neighbour is unusable, off the grid or across the gap."""
    from payne_lite.constants import C_KMS

    wave, step = _log_grid_wave()
    grid = mix_mod.grid_model(wave, 200.0, jnp.float32)
    assert grid.log_grid is not None
    rng = np.random.default_rng(3)
    d = rng.normal(0.0, 1.0, (6, wave.size)).astype(np.float32)
    d[1, 40:45] = np.nan
    d[2, 299] = np.nan  # last pixel before the gap
    rv = np.array([0.7, 13.7, -41.2, 120.5, -150.0, 3.3])
    span = np.asarray(mix_mod._rest_span_rows(grid, jnp.asarray(d), jnp.asarray(rv)))
    pos = mix_mod.to_span(grid.log_grid, np.arange(1, wave.size + 1))
    rest = span[:, np.flatnonzero(pos)]  # the span at the pixels (gaps dropped)
    ln = np.log(wave)
    u = np.round((ln - ln[0]) / step).astype(int)  # grid index of each pixel
    full = np.full((d.shape[0], u[-1] + 1), np.nan)
    full[:, u] = d
    for i, v in enumerate(rv):
        x = (ln - ln[0]) / step + np.arctanh(v / C_KMS) / step  # where to read
        k = np.floor(x).astype(int)
        t = x - k
        ok = (k >= 0) & (k + 1 <= u[-1])
        a = np.where(ok, full[i, np.clip(k, 0, u[-1])], np.nan)
        b = np.where(ok, full[i, np.clip(k + 1, 0, u[-1])], np.nan)
        ref = a + t * (b - a)
        np.testing.assert_array_equal(np.isnan(rest[i]), np.isnan(ref))
        fin = np.isfinite(ref)
        assert fin.sum() > 400
        np.testing.assert_allclose(rest[i][fin], ref[fin], atol=2e-5, rtol=0)


def test_low_rank_fine_ccf_matches_full_templates():
    """The rank-r fine templates give the full 41-template CCF to 1e-5."""
    wave, _ = _log_grid_wave()
    rng = np.random.default_rng(5)
    lines = 1.0 - 0.4 * np.exp(-0.5 * ((np.arange(wave.size)[:, None] - rng.uniform(
        0, wave.size, 40)) / 1.5) ** 2).sum(axis=1)  # fmt: skip
    grid = mix_mod.grid_model(wave, 600.0, jnp.float32)
    coarse, fine = mix_mod.rv_grids((-500.0, 500.0))
    tf = np.asarray(
        mix_mod.template_rows(grid, jnp.asarray(1.0 - lines), jnp.asarray(fine)),
        float,
    )
    tq = mix_mod.to_span(grid.log_grid, tf)
    v, a = mix_mod.low_rank(tq, mix_mod.FINE_RTOL)
    assert v.shape[1] < len(fine)
    x = rng.normal(0.0, 0.1, (20, tq.shape[1])) + tq[rng.integers(0, len(fine), 20)]
    full = x @ tq.T
    np.testing.assert_allclose((x @ v) @ a.T, full, atol=1e-5 * np.abs(full).max())


def test_load_refuses_other_files(emu, tmp_path):
    path = tmp_path / "emu.h5"
    emu.save(path)
    with pytest.raises(pl.FileFormatError, match="payne_lite.MDN"):
        pl.MDN.load(path)
    with pytest.raises(FileNotFoundError):
        pl.MDN.load(tmp_path / "missing.h5")


def test_config_validation():
    with pytest.raises(ValueError, match="n_train"):
        train_mod.MDNConfig(n_train=0)
    with pytest.raises(ValueError, match="snr_range"):
        train_mod.MDNConfig(snr_range=(0.0, 10.0))
    with pytest.raises(ValueError, match="config or keyword"):
        pl.train_mdn(None, config=train_mod.MDNConfig(), seed=1)
    with pytest.raises(ValueError, match="tilt and mask_chunks"):
        train_mod.MDNConfig(tilt=-0.1)
    # the flow's settings: the same shared checks
    for bad, match in (
        (dict(n_layers=0), "n_layers must be a positive int"),
        (dict(hidden=(64, 0)), "hidden must be positive"),
        (dict(learning_rate=0.0), "learning_rate must be > 0"),
        (dict(batch_size=0), "batch_size must be > 0"),
    ):
        with pytest.raises(ValueError, match=match):
            pl.FlowConfig(**bad)
    assert pl.FlowConfig(hidden=32).hidden == (32,)


# --------------------------------------------------------------------------------------
# fit(..., mdn=...)
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fit_set(emu):
    rng = np.random.default_rng(5)
    return simulate(
        emu, 24, rng=rng, snr_range=(50.0, 50.0), rv_range=(-100, 100), tilt=0.0
    )


def test_fit_with_mdn_columns_and_agreement(trained, emu, fit_set):
    d = fit_set
    kw = dict(mask=d["mask"], rv_range=RV_RANGE)
    t = pl.fit(d["flux"], d["err"], emu, mdn=trained, **kw)
    ref = pl.fit(d["flux"], d["err"], emu, **kw)
    for name in (*emu.label_names, "rv"):
        assert f"{name}_mdn" in t.colnames and f"{name}_mdn_sigma" in t.colnames
        assert np.all(np.asarray(t[f"{name}_mdn_sigma"]) > 0)
        assert t[f"{name}_mdn"].unit == t[name].unit
    assert t["mdn_refit"].dtype == bool
    assert "mdn_seconds" in t.meta
    assert t.meta["flag_bits"]["6"].startswith("MDN disagrees")
    # The MDN's rv window (+-3 sigma, ~1 km/s) is narrower than the scan's (+-20 km/s),
    # so more pixels stay valid over it: the fits use a few more pixels and differ by
    # a fraction of their errors (not more).
    assert np.all(t["n_good_pixels"] >= ref["n_good_pixels"])
    assert np.all(t["mdn_refit"] == 0)
    for name in (*emu.label_names, "rv"):
        z = np.abs(np.asarray(t[name]) - np.asarray(ref[name])) / ref[f"{name}_err"]
        assert np.median(z) < 0.35 and np.max(z) < 1.5, name
    assert np.median(t["n_iter"]) <= np.median(ref["n_iter"])


def test_mdn_start_points_drawn_inside_the_mdn_bounds():
    from payne_lite.fitting._driver import FitPrior
    from payne_lite.fitting._mdn_bounds import mdn_start_points as _mdn_start_points

    n, n_lab = 50, 3
    rng = np.random.default_rng(1)
    s0 = rng.uniform(-0.3, 0.3, (n, n_lab))
    sd = np.full((n, n_lab), 0.05)
    rv = np.zeros(n)
    prior = FitPrior(s0, sd, s0 - 3 * sd, s0 + 3 * sd, rv0=rv, rv_lo=rv, rv_hi=rv)
    pts = _mdn_start_points(prior, 400, {1: 0.2}, seed=3)
    assert pts.shape == (n, 401, n_lab)
    np.testing.assert_array_equal(pts[:, 0], s0)  # the mean comes first
    assert np.all(pts >= prior.lo[:, None]) and np.all(pts <= prior.hi[:, None])
    assert np.all(pts[:, :, 1] == s0[:, None, 1])  # fixed label held
    # the free draws follow the MDN Gaussian: sd 0.05 (clipping at 3 sigma: -1.5 %)
    z = (pts[:, 1:, [0, 2]] - s0[:, None, [0, 2]]) / 0.05
    assert abs(np.mean(z)) < 0.02 and 0.96 < np.std(z) < 1.0
    np.testing.assert_array_equal(pts, _mdn_start_points(prior, 400, {1: 0.2}, seed=3))
    assert _mdn_start_points(prior, 0, {}, seed=3).shape == (n, 1, n_lab)


def test_fit_with_extra_mdn_starts(trained, emu, fit_set):
    """Extra starts around the MDN mean are screened like the default starts: on
    these well-posed fits the answers equal the single-start MDN fits within a small
    fraction of their errors, and bad values are refused."""
    d = fit_set
    kw = dict(mask=d["mask"], rv_range=RV_RANGE, mdn=trained)
    one = pl.fit(d["flux"], d["err"], emu, **kw)
    more = pl.fit(
        d["flux"], d["err"], emu, options=pl.LMOptions(mdn_starts=4), seed=1, **kw
    )
    assert np.all(more["converged"])
    for name in (*emu.label_names, "rv"):
        z = np.abs(np.asarray(more[name]) - np.asarray(one[name])) / one[f"{name}_err"]
        assert np.max(z) < 0.2, name
    assert np.all(np.asarray(more["chi2"]) <= np.asarray(one["chi2"]) + 0.05)
    with pytest.raises(ValueError, match="mdn_starts"):
        pl.LMOptions(mdn_starts=-1)
    with pytest.raises(ValueError, match="needs an mdn"):
        pl.fit(
            d["flux"], d["err"], emu, options=pl.LMOptions(mdn_starts=2),
            mask=d["mask"],
        )  # fmt: skip


class _ShiftedMDN:
    """Wraps an MDN; its Teff is confidently wrong by 800 K (sigma 20 K)."""

    def __init__(self, mdn):
        self._mdn = mdn

    def __getattr__(self, name):
        return getattr(self._mdn, name)

    def predict(self, *args, **kw):
        mean, sigma = self._mdn.predict(*args, **kw)
        mean, sigma = mean.copy(), sigma.copy()
        mean[:, 0] += np.where(mean[:, 0] > 5500.0, -800.0, 800.0)
        sigma[:, 0] = 20.0
        return mean, sigma


def test_fit_with_wrong_mdn_falls_back_and_flags(trained, emu, fit_set):
    """Every fit ends at an MDN bound, is refitted over the whole box, lands > 4 MDN
    sigma from the MDN mean and gets QA bit 6 (64)."""
    d = fit_set
    kw = dict(mask=d["mask"], rv_range=RV_RANGE)
    t = pl.fit(d["flux"], d["err"], emu, mdn=_ShiftedMDN(trained), **kw)
    ref = pl.fit(d["flux"], d["err"], emu, **kw)
    assert np.all(t["mdn_refit"])
    np.testing.assert_allclose(t["Teff"], ref["Teff"], atol=1.0)
    assert np.all(np.asarray(t["flags"]) & 64)
    assert not np.any(np.asarray(ref["flags"]) & 64)


def test_fit_mdn_bad_combinations_refused(trained, emu, fit_set):
    d = fit_set
    with pytest.raises(ValueError, match="p0 or mdn"):
        pl.fit(d["flux"], d["err"], emu, mdn=trained, p0=[5000.0, 3.0, 0.0])
    other = smooth_emulator(wavelength=emu.wavelength + 1.0)
    with pytest.raises(ValueError, match="wavelength grid"):
        pl.fit(d["flux"], d["err"], other, mdn=trained)


def test_fit_catalog_passes_mdn_through(trained, emu, fit_set, tmp_path):
    d = fit_set
    cat = pl.write_catalog(
        tmp_path / "cat.h5", d["flux"], d["err"], emu.wavelength, mask=d["mask"]
    )
    mdn_path = tmp_path / "mdn.h5"
    trained.save(mdn_path)
    t = pl.fit_catalog(
        cat,
        tmp_path / "r.fits",
        emu,
        mdn=mdn_path,
        chunk_size=16,
        progress=False,
        rv_range=RV_RANGE,
    )
    ref = pl.fit(
        d["flux"], d["err"], emu, mask=d["mask"], mdn=trained, rv_range=RV_RANGE
    )
    # the catalog stores float32 flux: equal up to its rounding
    d_mdn = np.abs(t["Teff_mdn"] - ref["Teff_mdn"]) / ref["Teff_mdn_sigma"]
    assert np.max(d_mdn) < 0.01
    assert np.max(np.abs(t["Teff"] - ref["Teff"]) / ref["Teff_err"]) < 0.05
    back = pl.read_results(tmp_path / "r.fits")
    assert "[Fe/H]_mdn_sigma" in back.colnames


def test_cli_train_mdn_and_fit_with_mdn(emu, fit_set, tmp_path, capsys):
    from payne_lite.cli import main

    emu_path = tmp_path / "emu.h5"
    emu.save(emu_path)
    mdn_path = tmp_path / "mdn.h5"
    code = main(
        [
            "train-mdn",
            str(emu_path),
            "-o",
            str(mdn_path),
            "--n-train",
            "600",
            "--n-valid",
            "200",
            "--epochs",
            "2",
            "--rv-range",
            "-150",
            "150",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    mdn = pl.MDN.load(mdn_path, emulator=emu)
    assert mdn.rv_range == (-150.0, 150.0)
    assert mdn.meta["command"].startswith("payne-lite train-mdn")
    d = fit_set
    cat = pl.write_catalog(
        tmp_path / "cat.h5", d["flux"][:8], d["err"][:8], emu.wavelength
    )
    out = tmp_path / "r.ecsv"
    args = ["fit", str(cat), "--emulator", str(emu_path), "-o", str(out)]
    assert main([*args, "--mdn", str(mdn_path), "--no-progress"]) == 0
    assert "refitted without the MDN bounds" in capsys.readouterr().out
    assert "Teff_mdn_sigma" in pl.read_results(out).colnames
    out3 = tmp_path / "r3.ecsv"
    args3 = ["fit", str(cat), "--emulator", str(emu_path), "-o", str(out3)]
    assert main([*args3, "--mdn", str(mdn_path), "--mdn-starts", "2"]) == 0
    assert "mdn_refit" in pl.read_results(out3).colnames
    assert main([*args3, "--force", "--mdn-starts", "2"]) == 2
    assert "--mdn-starts needs --mdn" in capsys.readouterr().err
    # an MDN for another emulator: one line, exit code 2
    other = smooth_emulator(wavelength=emu.wavelength + 1.0)
    other.save(tmp_path / "other.h5")
    args = ["fit", str(cat), "--emulator", str(tmp_path / "other.h5"), "-o"]
    assert main([*args, str(tmp_path / "r2.ecsv"), "--mdn", str(mdn_path)]) == 2
    assert "wavelength grid" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# The conditional flow (train_flow, flow_sample, flow-is)
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def with_flow(emu, trained):
    return pl.train_flow(
        emu, trained, n_train=6000, n_valid=1000, epochs=25, n_layers=3,
        hidden=(64, 64), n_context=32, batch_size=256, learning_rate=3e-3,
        progress=False,
    )  # fmt: skip


def _truth_targets(emu, sim, rv_ccf):
    """Held-out truths in the MDN's target space: scaled labels, rv - rv_ccf."""
    return np.column_stack([sim["scaled"], sim["rv"] - rv_ccf])


def test_flow_describes_held_out_truths_as_well_as_the_mdn(emu, with_flow, held_out):
    """The flow's mean log density of the true labels and rv is within 0.3 nat of
    the MDN's independent Gaussians' (same target space, the same held-out spectra;
    an untrained flow is ~10 nat worse; on this smooth toy there is little
    correlation to learn). Its draws (flow_sample, physical units) cover the truths
    at about 68 %."""
    mdn, d = with_flow, held_out
    feat, rv_ccf, ok = mdn.flow_context(d["flux"], d["err"], d["mask"])
    assert ok.all() and feat.shape == (400, mdn.net.weights[0].shape[0])
    y = _truth_targets(emu, d, rv_ccf)
    lp_flow = np.array(
        [mdn.flow.log_prob(feat[i], y[i : i + 1])[0] for i in range(400)]
    )
    mean, sigma = mdn.predict(d["flux"], d["err"], mask=d["mask"])
    span = emu.label_hi - emu.label_lo
    m_s = np.column_stack([emu.scale(mean[:, :3]), mean[:, 3] - rv_ccf])
    s_s = np.column_stack([sigma[:, :3] / span, sigma[:, 3]])
    lp_mdn = np.sum(
        -0.5 * ((y - m_s) / s_s) ** 2 - np.log(s_s) - 0.5 * np.log(2 * np.pi), axis=1
    )
    assert np.mean(lp_flow) > np.mean(lp_mdn) - 0.3, (lp_flow.mean(), lp_mdn.mean())
    draws = mdn.flow_sample(d["flux"], d["err"], d["mask"], n_draws=400, seed=1)
    assert draws.shape == (400, 400, 4)
    truth = np.column_stack([d["labels"], d["rv"]])
    lo, hi = np.percentile(draws, [16, 84], axis=1)
    cover = np.mean((truth > lo) & (truth < hi), axis=0)
    assert np.all((cover > 0.55) & (cover < 0.8)), cover
    assert mdn.flow.meta["trained_by"] == "payne_lite.train_flow"


def test_flow_is_agrees_with_mdn_is(emu, with_flow, held_out):
    """Two importance samplers with exact weights and different proposals give
    the same posterior (within their Monte Carlo error)."""
    d = held_out
    i = slice(0, 2)
    kw = dict(mask=d["mask"][i], mdn=with_flow, seed=5, rv_range=RV_RANGE)
    opts = pl.ISOptions(lm_share=0.0, n_draws=4096)
    t_flow = pl.sample(
        d["flux"][i], d["err"][i], emu, method="flow-is", options=opts, **kw
    )
    t_mdn = pl.sample(
        d["flux"][i], d["err"][i], emu, method="mdn-is", options=opts, **kw
    )
    assert list(t_flow["method"]) == ["flow-is"] * 2
    assert list(t_mdn["method"]) == ["mdn-is"] * 2
    for name in (*emu.label_names, "rv"):
        sd = np.asarray(t_mdn[f"{name}_std"])
        diff = np.abs(np.asarray(t_flow[f"{name}_p50"]) - t_mdn[f"{name}_p50"]) / sd
        assert np.all(diff < 0.25), (name, diff)
        np.testing.assert_allclose(t_flow[f"{name}_std"], sd, rtol=0.2)


def test_cli_train_flow(emu, trained, fit_set, tmp_path, capsys):
    """train-flow writes the MDN with its flow; info shows it; fit --method flow-is
    samples with it (the user's path end to end)."""
    from payne_lite.cli import main

    emu.save(tmp_path / "emu.h5")
    trained.save(tmp_path / "mdn.h5")
    args = ["train-flow", tmp_path / "emu.h5", tmp_path / "mdn.h5", "-o"]
    opts = ["--n-train", "600", "--n-valid", "200", "--epochs", "2", "--no-progress"]
    code = main([str(a) for a in [*args, tmp_path / "f.h5", *opts, "--layers", "2"]])
    assert code == 0, capsys.readouterr().err
    assert "trained a flow (2 MADE layers)" in capsys.readouterr().out
    back = pl.MDN.load(tmp_path / "f.h5", emulator=emu)
    assert back.flow.n_layers == 2
    assert back.flow.meta["command"].startswith("payne-lite train-flow")
    np.testing.assert_array_equal(back.net.weights[0], trained.net.weights[0])
    assert main(["info", str(tmp_path / "f.h5")]) == 0
    out = capsys.readouterr().out
    assert "payne_lite.MDN v3" in out
    assert "Flow(2 MADE layers" in out and "trained on 600 spectra, 2 epochs" in out
    d = fit_set
    cat = pl.write_catalog(
        tmp_path / "cat.h5", d["flux"][:3], d["err"][:3], emu.wavelength
    )
    res = tmp_path / "post.ecsv"
    fit_args = ["fit", cat, "--emulator", tmp_path / "emu.h5", "-o", res]
    code = main(
        [str(a) for a in [*fit_args, "--method", "flow-is", "--mdn", tmp_path / "f.h5"]]
    )
    assert code == 0, capsys.readouterr().err
    t = pl.read_results(res)
    assert set(t["method"]) <= {"flow-is", "emcee"} and "flow-is" in set(t["method"])
    assert t.meta["method"] == "flow-is" and t.meta["options"]["scale"] == 1.0
    lo, hi = np.asarray(t["Teff_p16"]), np.asarray(t["Teff_p84"])
    assert np.all(lo < hi) and np.all(
        np.abs(t["Teff"] - d["labels"][:3, 0]) < 5 * (hi - lo)
    )
    capsys.readouterr()  # the fit's progress bar
    # an emulator given as the MDN: one line, exit code 2, nothing written
    bad = [
        "train-flow",
        tmp_path / "emu.h5",
        tmp_path / "emu.h5",
        "-o",
        tmp_path / "g.h5",
    ]
    assert main([str(a) for a in bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "payne_lite.MDN" in err, err
    assert not (tmp_path / "g.h5").exists()


def test_simulated_spectra_are_band_limited_doppler_shifts():
    """simulate() shifts the emulator's rest-frame spectra with a band-limited
    interpolant (SIM_DOPPLER, a twelve-tap windowed sinc), as a star's own shift
    looks on a well-sampled grid: against an independent Lanczos-8 shift
    (conftest.lanczos_shift) RMS < 5e-4 per spectrum (seen 1.8-3.1e-4), while
    linear interpolation (the simulator before, whose blur taught the MDN to read
    real spectra's vmacro too high) is 5x further off over the spectra (seen
    7.9x). Masked: pixels whose rest wavelength is off the grid."""
    from conftest import lanczos_shift

    from payne_lite.constants import C_KMS
    from payne_lite.demo import default_emulator_path, load_default_emulator

    if not default_emulator_path().exists():
        pytest.skip(f"{default_emulator_path()} not in this checkout")
    emu = load_default_emulator()
    assert train_mod.SIM_DOPPLER == "lanczos6"
    sim = simulate(
        emu, 6, rng=np.random.default_rng(3), snr_range=(1e12, 1e12),
        rv_range=(-200.0, 200.0), tilt=0.0, mask_chunks=0,
    )  # fmt: skip
    wave = np.asarray(emu.wavelength, np.float64)
    dln = np.log(wave[1] / wave[0])
    rest = emu.predict(sim["labels"]).astype(np.float64)
    sq_lz = sq_lin = 0.0
    for k in range(6):
        f = np.sqrt((1 + sim["rv"][k] / C_KMS) / (1 - sim["rv"][k] / C_KMS))
        u = np.log(f) / dln
        lz = lanczos_shift(rest[k], u)
        lin = np.interp(np.log(wave) - np.log(f), np.log(wave), rest[k])
        used = ~sim["mask"][k]
        assert used.sum() > 0.9 * wave.size
        # off the grid: masked
        rest_pos = np.arange(wave.size) - u
        assert not np.any(used & ((rest_pos < 0) | (rest_pos > wave.size - 1)))
        good = used & np.isfinite(lz)
        d_lz = (sim["flux"][k] - lz)[good]
        assert np.sqrt(np.mean(d_lz**2)) < 5e-4, k
        sq_lz += np.sum(d_lz**2)
        sq_lin += np.sum((sim["flux"][k] - lin)[good] ** 2)
    assert np.sqrt(sq_lin / sq_lz) > 5.0
