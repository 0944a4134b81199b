"""Tests for the observation model (payne_lite.observe) and the fitter (payne_lite.fitting).

Synthetic spectra come from a small random per-pixel emulator whose weights are
smoothed along the pixel axis, so that its spectra are oversampled like real ones
(a few pixels per feature). Spectra of independent random pixels ("white noise")
have a local chi2 minimum in RV one pixel from the truth, which no real spectrograph
produces. The real 5-label Payne network (shipped in data/payne_apogee) is used too.
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    OTHER_DOPPLER,
    PAYNE_LABELS_5,
    TINY_HI,
    TINY_LO,
    TINY_NAMES,
    TINY_UNITS,
    doppler_interp,
    keys_kernel,
)
from scipy.ndimage import gaussian_filter1d
from scipy.optimize import minimize_scalar

import payne_lite as pl
from payne_lite import Emulator, LMOptions, PixelNet, fit
from payne_lite.constants import C_KMS
from payne_lite.fitting import FLAG_FAILED
from payne_lite.observe import (
    TAP_OFFSETS,
    _problem,
    build_obs_model,
    doppler_shift,
    make_model,
    observe,
    observe_jac,
    window_valid,
)

lm_mod = importlib.import_module("payne_lite.fitting._lm")
rvscan_mod = importlib.import_module("payne_lite.fitting._rvscan")
driver_mod = importlib.import_module("payne_lite.fitting._driver")
schema_mod = importlib.import_module("payne_lite.fitting._schema")

N_PIX = 400


def _factor(rv):
    b = np.asarray(rv) / C_KMS
    return np.sqrt((1 + b) / (1 - b))


def log_wavelength(n_pix: int = N_PIX, gap: tuple[int, int] = (150, 190)) -> np.ndarray:
    """A log-uniform grid (step 1.3e-5 in ln lambda, APOGEE's) with a chip gap:
    grid points gap[0] .. gap[1] - 1 are left out."""
    idx = np.arange(n_pix + gap[1] - gap[0])
    idx = idx[(idx < gap[0]) | (idx >= gap[1])]
    return 15100.0 * np.exp(1.3e-5 * idx)


def smooth_emulator(
    n_pix: int = N_PIX, n_hid: int = 5, *, seed: int = 1, wavelength=None
) -> Emulator:
    """Random per-pixel sigmoid net, 3 labels, weights smoothed over ~2 pixels."""
    rng = np.random.default_rng(seed)

    def smooth(a):
        b = gaussian_filter1d(a, 2.0, axis=0, mode="nearest")
        return b * (a.std() / b.std())

    w0 = smooth(rng.normal(0.0, 1.0, (n_pix, n_hid, 3)))
    b0 = smooth(rng.normal(0.0, 0.5, (n_pix, n_hid)))
    w1 = smooth(rng.normal(0.0, 0.3, (n_pix, n_hid)))
    b1 = 1.0 + smooth(rng.normal(0.0, 0.05, n_pix))
    return Emulator(
        net=PixelNet((w0, w1), (b0, b1)),
        activation="sigmoid",
        label_names=TINY_NAMES,
        label_units=TINY_UNITS,
        label_lo=TINY_LO,
        label_hi=TINY_HI,
        wavelength=(
            np.linspace(15100.0, 15100.0 + 0.2 * (n_pix - 1), n_pix)
            if wavelength is None
            else wavelength
        ),
    )


def reference_spectra(emu, scaled, rv, wave_obs=None, cont=None):
    """Observed spectra by NumPy: emulator flux, the fitter's interpolant
    (:func:`conftest.doppler_interp`) at lambda/f, continuum. Pixels whose taps leave
    the rest grid (invalid in the model) get np.interp's value instead of NaN."""
    wave = emu.wavelength
    wave_obs = wave if wave_obs is None else wave_obs
    # jnp.tanh, the fitter's model, to the last bit (predict's default tanh differs
    # by up to 6e-7, enough to stall one of the 20 noisy float32 fits below)
    rest = emu.predict(emu.unscale(scaled), fast_tanh=False).astype(np.float64)
    out = []
    for v, r in zip(rv, rest, strict=True):
        cubic = doppler_interp(wave_obs / _factor(v), wave, r)
        out.append(
            np.where(np.isnan(cubic), np.interp(wave_obs / _factor(v), wave, r), cubic)
        )
    out = np.array(out)
    if cont is not None:
        x = 2 * (wave_obs - wave_obs[0]) / (wave_obs[-1] - wave_obs[0]) - 1
        out = out * np.polynomial.chebyshev.chebval(x, np.asarray(cont).T)
    return out


def scaled_labels(emu, table):
    return emu.scale(np.column_stack([table[n] for n in emu.label_names]))


@pytest.fixture(scope="module")
def emu():
    return smooth_emulator()


@pytest.fixture(scope="module")
def truth():
    rng = np.random.default_rng(7)
    return rng.uniform(-0.4, 0.4, (16, 3)), rng.uniform(-100.0, 100.0, 16)


@pytest.fixture(scope="module")
def noise_free(emu, truth):
    s, rv = truth
    flux = reference_spectra(emu, s, rv)
    return flux, np.full_like(flux, 0.01)


@pytest.fixture(scope="module")
def lm_fit(emu, noise_free):
    return fit(*noise_free, emu, method="lm")


# --- the observation model -------------------------------------------------------------
def test_doppler_shift_gaussian_line_hand_worked():
    wave = np.linspace(15000.0, 15100.0, 2001)  # 0.05 A pixels (~1 km/s)
    lam0, sig = 15050.0, 0.3
    rest = 1.0 - 0.6 * np.exp(-0.5 * ((wave - lam0) / sig) ** 2)
    rv = 100.0
    # by hand: beta = 100 / 299792.458 = 3.33564e-4, f = sqrt((1+b)/(1-b)) = 1.000333620
    f = np.sqrt((1 + 100.0 / 299_792.458) / (1 - 100.0 / 299_792.458))
    assert f == pytest.approx(1.000333620, abs=1e-9)
    expected = lam0 * f  # 15055.0210 A
    flux, valid = doppler_shift(wave, rest, rv, wave)
    flux, valid = np.asarray(flux, np.float64), np.asarray(valid)
    depth = 1.0 - flux
    near = np.abs(wave - expected) < 5 * sig
    centroid = np.sum(wave[near] * depth[near]) / np.sum(depth[near])
    assert abs(centroid - expected) < 0.05 * 0.05  # 5 % of a pixel
    assert abs(wave[np.argmin(flux)] - expected) <= 0.5 * 0.05
    # blue pixels map below the rest grid: invalid; everything else valid
    np.testing.assert_array_equal(valid, wave / f >= wave[0])


def test_doppler_shift_flags_gaps():
    wave = np.concatenate(
        [np.linspace(15000, 15010, 201), np.linspace(15020, 15030, 201)]
    )
    flux = np.ones_like(wave)
    _, valid = doppler_shift(wave, flux, 150.0, wave)  # 7.5 A shift
    inside_gap = (wave / _factor(150.0) > 15010) & (wave / _factor(150.0) < 15020)
    below = wave / _factor(150.0) < 15000
    np.testing.assert_array_equal(np.asarray(valid), ~(inside_gap | below))


@pytest.mark.parametrize("kind, degree", [("linear", 1), ("cubic", 2), ("cubic6", 3)])
def test_doppler_interpolants_are_keys_kernels(kind, degree):
    """tap_weights against the kernels' piecewise formulas (conftest.keys_kernel,
    Keys 1981) and the hat function: weights summing to 1 that reproduce
    polynomials up to the interpolant's degree exactly, derivatives by t that match
    a central difference, and (the cubic ones) a derivative continuous across a
    node: its value at t = 1 equals the next interval's at t = 0."""
    from payne_lite.observe import TAP_OFFSETS, tap_weights

    offs = np.array(TAP_OFFSETS[kind], np.float64)
    t = np.linspace(0.0, 1.0, 41)[1:-1]
    with jax.enable_x64():
        w, dw = (np.array(x) for x in tap_weights(kind, jnp.asarray(t)))
        h = 1e-6
        up = np.array(tap_weights(kind, jnp.asarray(t + h))[0])
        down = np.array(tap_weights(kind, jnp.asarray(t - h))[0])
        w0, dw0 = (np.array(x) for x in tap_weights(kind, jnp.asarray(0.0)))
        w1, dw1 = (np.array(x) for x in tap_weights(kind, jnp.asarray(1.0)))
    dist = t[None, :] - offs[:, None]
    ref = (
        np.maximum(1.0 - np.abs(dist), 0.0)
        if kind == "linear"
        else keys_kernel(dist, taps=offs.size)
    )
    np.testing.assert_allclose(w, ref, rtol=0, atol=1e-14)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, rtol=0, atol=1e-14)
    for p in range(degree + 1):  # sum_j w_j o_j^p = t^p
        np.testing.assert_allclose(offs**p @ w, t**p, rtol=0, atol=1e-12)
    if kind != "linear":  # not exact one degree up
        assert np.max(np.abs(offs ** (degree + 1) @ w - t ** (degree + 1))) > 1e-3
    np.testing.assert_allclose(dw, (up - down) / (2 * h), rtol=0, atol=1e-8)
    np.testing.assert_allclose(w0, offs == 0, atol=1e-14)  # a node: one tap
    if kind != "linear":
        # the node at t = 1 is t = 0 of the next interval (taps one further on)
        np.testing.assert_allclose(dw1[1:], dw0[:-1], atol=1e-12)
        assert abs(dw1[0]) < 1e-12 and abs(dw0[-1]) < 1e-12


def test_lanczos_interpolant_is_a_normalised_windowed_sinc():
    """tap_weights("lanczos6") against sinc(x) sinc(x / 6) normalised to sum 1 by
    NumPy; one-hot at a node; derivatives by t that match a central difference and
    are continuous across a node; and on sampled sinusoids of 2.5 to 4 pixels a
    period (the band a 2-3 pixel line keeps) at most a third of the error of Keys'
    six-tap cubic between the samples."""
    from payne_lite.observe import TAP_OFFSETS, tap_weights

    offs = np.array(TAP_OFFSETS["lanczos6"], np.float64)
    t = np.linspace(0.0, 1.0, 41)[1:-1]
    with jax.enable_x64():
        w, dw = (np.array(x) for x in tap_weights("lanczos6", jnp.asarray(t)))
        h = 1e-6
        up = np.array(tap_weights("lanczos6", jnp.asarray(t + h))[0])
        down = np.array(tap_weights("lanczos6", jnp.asarray(t - h))[0])
        w0, dw0 = (np.array(x) for x in tap_weights("lanczos6", jnp.asarray(0.0)))
        w1, dw1 = (np.array(x) for x in tap_weights("lanczos6", jnp.asarray(1.0)))
        wk = np.array(tap_weights("cubic6", jnp.asarray(t))[0])
    d = t[None, :] - offs[:, None]
    ref = np.sinc(d) * np.sinc(d / 6.0)
    np.testing.assert_allclose(w, ref / ref.sum(axis=0), rtol=0, atol=1e-14)
    np.testing.assert_allclose(dw, (up - down) / (2 * h), rtol=0, atol=1e-8)
    np.testing.assert_allclose(w0, offs == 0, atol=1e-14)
    np.testing.assert_allclose(dw1[1:], dw0[:-1], atol=1e-12)  # C1 across a node
    assert abs(dw1[0]) < 1e-12 and abs(dw0[-1]) < 1e-12
    koffs = np.array(TAP_OFFSETS["cubic6"], np.float64)
    for period in (2.5, 3.0, 4.0):
        k = 2 * np.pi / period
        for phase in np.linspace(0.0, np.pi, 5):
            true = np.cos(k * t + phase)
            err_l = np.max(np.abs(np.cos(k * offs + phase) @ w - true))
            err_k = np.max(np.abs(np.cos(k * koffs + phase) @ wk - true))
            assert err_l < err_k / 3, (period, phase, err_l, err_k)


def test_another_interpolant_in_the_fit_recovers_its_own_shift(emu, tmp_path):
    """``Instrument(doppler=...)`` of the interpolant that is not the default (of
    Keys' six-tap cubic and Lanczos-6): the fit of a spectrum made by that model
    (noise-free, rv 137.3 km/s, on a log grid) returns its labels and rv, as for the
    default interpolant; the default fit of the same spectrum does not (the
    interpolants differ); the table records the interpolant, and the model rebuilt
    from the saved table is the fitted one."""
    from payne_lite.observe import DOPPLER_INTERP, observe

    other = OTHER_DOPPLER
    inst = pl.Instrument(doppler=other)
    obs = build_obs_model(emu, **inst.model_options())
    assert obs.interp == other and build_obs_model(emu).interp == DOPPLER_INTERP
    s = np.array([0.1, -0.2, 0.15])
    p = jnp.asarray(np.r_[s, 137.3], obs.x_obs.dtype)
    flux = np.asarray(observe(obs, p)[0], np.float64)
    err = np.full_like(flux, 1e-4)
    t = fit(flux, err, emu, instrument=inst, return_model=True)
    assert abs(float(t["rv"][0]) - 137.3) < 1e-3
    np.testing.assert_allclose(scaled_labels(emu, t)[0], s, atol=1e-4)
    assert t.meta["instrument"]["doppler"] == other
    # the default interpolant reads this spectrum's shift differently
    plain = fit(flux, err, emu)
    assert float(plain["chi2"][0]) > 10 * max(float(t["chi2"][0]), 1.0)
    pl.write_results(t, tmp_path / "t.fits")
    back = pl.read_results(tmp_path / "t.fits")
    assert pl.Instrument.from_meta(back.meta["instrument"]).doppler == other
    model, valid = pl.model_from_results(back, emu)
    fitted = np.asarray(t["model_flux"], np.float64)
    ok = valid & np.isfinite(fitted)
    np.testing.assert_allclose(model[ok], fitted[ok], atol=1e-5, rtol=0)


def test_instrument_doppler_is_validated_and_old_records_read(emu):
    with pytest.raises(ValueError, match="Instrument.doppler must be one of"):
        pl.Instrument(doppler="sinc")
    old = pl.Instrument(resolution=8000.0).to_meta()
    old["version"] = 1
    del old["doppler"]  # a version-1 record (before the field existed): fitted
    assert pl.Instrument.from_meta(old).doppler == "cubic6"  # with the cubic then
    assert pl.Instrument.from_meta({}).doppler == pl.Instrument().doppler
    with pytest.raises(ValueError, match="unknown Doppler interpolant"):
        build_obs_model(emu, interp="sinc")


def test_model_matches_numpy_reference(emu):
    model, layout = make_model(emu, cont_deg=2)
    assert layout.names == (*TINY_NAMES, "rv", "cont_0", "cont_1", "cont_2")
    np.testing.assert_array_equal(layout.lower[:3], -0.5)
    assert (layout.lower[3], layout.upper[3]) == (-500.0, 500.0)
    s, rv, c = np.array([0.1, -0.2, 0.3]), 37.5, np.array([1.0, 0.05, -0.02])
    flux, valid = jax.jit(model)(jnp.asarray(np.r_[s, rv, c], jnp.float32))
    ref = reference_spectra(emu, s[None], [rv], cont=c[None])[0]
    valid = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(flux)[valid], ref[valid], atol=2e-4)
    taps_inside = np.isfinite(
        doppler_interp(emu.wavelength / _factor(rv), *[emu.wavelength] * 2)
    )
    np.testing.assert_array_equal(valid, taps_inside)


@pytest.mark.parametrize("cont_deg", [0, 2])
def test_analytic_jacobian_matches_autodiff_and_finite_differences(emu, cont_deg):
    """observe_jac's hand-written chain rule against jax.jacfwd of observe (float64)
    and a central finite difference of the rv column."""
    with jax.enable_x64():
        obs = build_obs_model(emu, cont_deg=cont_deg, dtype=jnp.float64)
        c = [1.0, 0.05, -0.02][: cont_deg + 1] if cont_deg else []
        p = jnp.asarray([0.1, -0.2, 0.3, 37.5, *c], jnp.float64)
        flux, valid, jac = observe_jac(obs, p)
        ref_flux, ref_valid = observe(obs, p)
        ref_jac = jax.jacfwd(lambda q: observe(obs, q)[0])(p)
        np.testing.assert_array_equal(valid, ref_valid)
        np.testing.assert_allclose(flux, ref_flux, rtol=0, atol=1e-14)
        np.testing.assert_allclose(jac, ref_jac, rtol=1e-10, atol=1e-12)
        h = 1e-4  # km/s
        up, down = observe(obs, p.at[3].add(h))[0], observe(obs, p.at[3].add(-h))[0]
        fd = (up - down) / (2 * h)
        np.testing.assert_allclose(jac[:, 3], fd, rtol=1e-5, atol=1e-9)
        assert np.max(np.abs(jac[:, 3])) > 1e-4  # the rv column is not trivially zero
        # rv = 0 on the emulator's own grid puts every pixel on a node, where the
        # cubic interpolant's derivative is continuous: the central difference
        # across the node, from both sides.
        p0 = p.at[3].set(0.0)
        jac0 = observe_jac(obs, p0)[2][:, 3]
        h = 1e-6  # the second derivative jumps at a node: an O(h) error here
        fd0 = (observe(obs, p0.at[3].add(h))[0] - observe(obs, p0.at[3].add(-h))[0]) / (
            2 * h
        )
        ok = np.asarray(
            observe(obs, p0.at[3].add(h))[1] & observe(obs, p0.at[3].add(-h))[1]
        )
        assert ok.sum() > 0.9 * ok.size
        np.testing.assert_allclose(jac0[ok], fd0[ok], rtol=1e-5, atol=1e-8)


def test_log_grid_fast_path_matches_per_pixel_interpolation():
    """On a log-uniform grid with a gap, the slice-based shift (interpolation in
    ln lambda) equals the per-pixel one (in lambda) to the step/8 bound, with the
    same validity and Jacobian (float64)."""
    emu_log = smooth_emulator(wavelength=log_wavelength(), seed=3)
    with jax.enable_x64():
        fast = build_obs_model(emu_log, cont_deg=1, dtype=jnp.float64)
        slow = build_obs_model(emu_log, cont_deg=1, dtype=jnp.float64, log_grid=False)
        assert fast.log_grid is not None and slow.log_grid is None
        assert len(fast.log_grid.rest) == 2  # the two "chips"
        for rv in (-431.7, -60.2, 0.0, 3.3, 137.9, 499.0):
            p = jnp.asarray([0.2, -0.1, 0.35, rv, 1.02, -0.03])
            f1, v1, j1 = observe_jac(fast, p)
            f2, v2, j2 = observe_jac(slow, p)
            v1, v2 = np.asarray(v1), np.array(v2)
            np.testing.assert_array_equal(v1, v2)
            assert 0.3 * N_PIX < v1.sum() <= N_PIX  # all at rv 0: every pixel on a node
            np.testing.assert_allclose(f1[v1], f2[v1], rtol=0, atol=2e-6)
            # the derivatives where every tap is on the grid (on a node, rv 0, a
            # pixel at a chip's edge is valid, its rv derivative undefined)
            vj = v1 & np.asarray(window_valid(fast, rv - 1e-3, rv + 1e-3))
            reach = max(abs(o) for o in TAP_OFFSETS[fast.interp])  # cubic6: 3
            assert vj.sum() >= v1.sum() - 4 * reach  # reach per chip end at most
            np.testing.assert_allclose(j1[vj], j2[vj], rtol=1e-3, atol=2e-6)
            np.testing.assert_allclose(observe(fast, p)[0][v1], f1[v1], atol=1e-14)


@pytest.mark.parametrize("cont_deg", [0, 2])
def test_fast_normal_equations_match_the_general_path(cont_deg):
    """``normal_equations`` (one-hidden-layer nets on a log grid: embedded layout,
    rv row first, residual row in the product) gives the chi2, J^T W J, J^T W r and
    residuals of the general path (observe_jac_t and explicit products), float64,
    with masked pixels, at rv values across the range."""
    from payne_lite.fitting._lm import _normal
    from payne_lite.observe import embed_obs, normal_equations

    emu_log = smooth_emulator(wavelength=log_wavelength(), seed=3)
    rng = np.random.default_rng(5)
    with jax.enable_x64():
        fast = build_obs_model(emu_log, cont_deg=cont_deg, dtype=jnp.float64)
        assert fast.jet is not None
        general = dataclasses.replace(fast, jet=None)
        flux = jnp.asarray(1.0 + 0.01 * rng.standard_normal(N_PIX))
        sw = jnp.asarray(np.where(rng.uniform(size=N_PIX) < 0.1, 0.0, 50.0))
        fe, swe = embed_obs(fast, flux), embed_obs(fast, sw)
        for rv in (-431.7, -60.2, 0.0, 3.3, 137.9):
            p = [0.2, -0.1, 0.35, rv] + ([1.02, -0.03, 0.01] if cont_deg else [])
            p = jnp.asarray(p)
            c1, a1, g1, r1 = normal_equations(fast, p, fe, swe)
            c2, a2, g2, r2 = _normal(general, p, flux, sw)
            np.testing.assert_allclose(c1, c2, rtol=1e-10)
            np.testing.assert_allclose(a1, a2, rtol=1e-9, atol=1e-9 * np.abs(a2).max())
            np.testing.assert_allclose(g1, g2, rtol=1e-9, atol=1e-9 * np.abs(g2).max())
            np.testing.assert_allclose(r1, embed_obs(fast, r2), atol=1e-12)


def test_lm_recovers_noise_free_truth_on_log_grid(truth):
    emu_log = smooth_emulator(wavelength=log_wavelength(), seed=3)
    s, rv = truth
    flux = reference_spectra(emu_log, s[:8], rv[:8])
    t = fit(flux, np.full_like(flux, 0.01), emu_log)
    assert np.all(t["converged"]) and np.all(t["flags"] == 0)
    np.testing.assert_allclose(scaled_labels(emu_log, t), s[:8], atol=1e-4)
    np.testing.assert_allclose(t["rv"], rv[:8], atol=0.05)


# --- recovery ---------------------------------------------------------------------------
def test_lm_recovers_noise_free_truth(emu, truth, lm_fit):
    s, rv = truth
    t = lm_fit
    assert len(t) == len(rv)
    assert np.all(t["converged"]) and np.all(t["flags"] == 0)
    np.testing.assert_allclose(scaled_labels(emu, t), s, atol=1e-4)
    np.testing.assert_allclose(t["rv"], rv, atol=0.05)
    assert t["Teff"].unit == "K" and t["rv_err"].unit == "km / s"
    assert t["covariance"].shape == (len(rv), 4, 4)
    cov_err = np.sqrt(np.diagonal(t["covariance"], axis1=1, axis2=2))
    np.testing.assert_allclose(cov_err[:, 0], t["Teff_err"])
    assert np.all(t["Teff_err"] > 0) and np.all(t["n_iter"] > 0)
    assert np.all(t["n_good_pixels"] > 300)


def test_curve_fit_agrees_with_lm(emu, noise_free, lm_fit):
    t = fit(noise_free[0][:6], noise_free[1][:6], emu, method="curve_fit")
    assert np.all(t["converged"])
    np.testing.assert_allclose(
        scaled_labels(emu, t), scaled_labels(emu, lm_fit[:6]), atol=1e-3
    )
    np.testing.assert_allclose(t["rv"], lm_fit["rv"][:6], atol=0.01)
    assert t.colnames == lm_fit.colnames  # the same table (no model unless asked)


def test_continuum_tilt_recovered(emu, truth):
    s, rv = truth[0][:8], truth[1][:8]
    cont = np.tile([1.0, 0.08], (8, 1))
    flux = reference_spectra(emu, s, rv, cont=cont)
    err = np.full_like(flux, 0.01)
    t = fit(flux, err, emu, cont_deg=1, return_model=True)
    assert np.all(t["flags"] == 0)
    np.testing.assert_allclose(t["cont_0"], 1.0, atol=1e-4)
    np.testing.assert_allclose(t["cont_1"], 0.08, atol=1e-4)
    np.testing.assert_allclose(scaled_labels(emu, t), s, atol=1e-4)
    np.testing.assert_allclose(t["rv"], rv, atol=0.05)
    lam = emu.wavelength / _factor(rv[:, None])
    taps_inside = np.isfinite(doppler_interp(lam, emu.wavelength, emu.wavelength))
    good = np.isfinite(t["model_flux"]) & (lam > 15105) & taps_inside
    np.testing.assert_allclose(t["model_flux"][good], flux[good], atol=1e-4)


def test_fixed_parameter_held(emu, truth, noise_free):
    s = truth[0][:4]
    logg = emu.unscale(s)[:, 1]
    t = fit(noise_free[0][:4], noise_free[1][:4], emu, fixed={"logg": float(logg[0])})
    assert t["logg"][0] == pytest.approx(logg[0], rel=1e-6)
    assert t["logg_err"][0] == 0.0
    np.testing.assert_allclose(scaled_labels(emu, t[:1]), s[:1], atol=1e-4)
    with pytest.raises(ValueError, match=r"unknown parameter 'vturb'.*'Teff'"):
        fit(noise_free[0][:4], noise_free[1][:4], emu, fixed={"vturb": 3.0})
    # vsini is a parameter when asked for (tests/test_broadening.py), but needs an
    # emulator on a log-uniform grid; this one's is linear
    with pytest.raises(ValueError, match="log-uniform wavelength grid"):
        fit(noise_free[0][:4], noise_free[1][:4], emu, fixed={"vsini": 3.0})


def test_every_parameter_fixed_gives_chi2_at_those_values(emu, truth, noise_free):
    """With every label and rv fixed (chi2 at given values, a user's check of a
    catalogue's labels) the fit returns that chi2 (hand-computed from the NumPy
    reference model over the pixels it used), zero errors and no flag; it raised
    an IndexError (no free parameter to invert) before."""
    s, rv = truth[0][:2], truth[1][:2]
    rng = np.random.default_rng(4)
    flux = noise_free[0][:2] + 0.01 * rng.standard_normal((2, N_PIX))
    labels = emu.unscale(s)
    for i in range(2):
        fixed = {n: float(labels[i, j]) for j, n in enumerate(TINY_NAMES)}
        t = fit(
            flux[i], noise_free[1][i], emu, fixed={**fixed, "rv": float(rv[i])},
            return_model=True,
        )  # fmt: skip
        model = reference_spectra(emu, s[i : i + 1], rv[i : i + 1])[0]
        # the fitted pixels: those valid at that rv (the window is one rv), where
        # the reference is the fitter's interpolant
        used = np.asarray(window_valid(build_obs_model(emu), rv[i], rv[i]))
        assert used.sum() == t["n_good_pixels"][0] > 0.9 * N_PIX
        assert np.abs(np.asarray(t["model_flux"][0]) - model)[used].max() < 1e-4
        want = np.sum(((flux[i] - model) / 0.01)[used] ** 2)
        assert t["chi2"][0] == pytest.approx(want, rel=1e-4)
        assert t["flags"][0] == 0 and t["Teff_err"][0] == 0.0 and t["rv_err"][0] == 0.0


# --- pixels that carry no weight ------------------------------------------------------------
def test_masked_nan_inf_pixels_are_ignored(emu, truth, noise_free):
    rng = np.random.default_rng(3)
    flux = noise_free[0][:8] + 0.01 * rng.standard_normal((8, N_PIX))
    err = noise_free[1][:8].copy()
    bad = np.zeros_like(flux, bool)
    bad[:, rng.choice(N_PIX, 40, replace=False)] = True
    clean = fit(flux, err, emu, mask=bad)

    junk_f, junk_e = flux.copy(), err.copy()
    cols = np.flatnonzero(bad[0])
    junk_f[:, cols[:10]] = 1e6  # garbage, masked
    junk_f[:, cols[10:20]] = np.nan
    junk_f[:, cols[20:25]] = np.inf
    junk_e[:, cols[25:30]] = np.nan
    junk_e[:, cols[30:35]] = -0.01  # negative errors: zero weight, not an error
    junk_e[:, cols[35:40]] = 0.0
    mask = np.zeros(N_PIX, bool)
    mask[cols[:10]] = True
    before = (junk_f.copy(), junk_e.copy(), mask.copy())
    t = fit(junk_f, junk_e, emu, mask=mask)
    for a, b in zip((junk_f, junk_e, mask), before, strict=True):
        np.testing.assert_array_equal(a, b)  # inputs not mutated
    np.testing.assert_array_equal(t["n_good_pixels"], clean["n_good_pixels"])
    for name in (*TINY_NAMES, "rv", "chi2"):
        np.testing.assert_allclose(t[name], clean[name], rtol=1e-12)
    assert np.all(t["flags"] == 0)


def test_all_pixels_masked_is_flagged_failed(emu, noise_free):
    flux, err = noise_free[0][:3], noise_free[1][:3]
    mask = np.zeros_like(flux, bool)
    mask[1] = True
    t = fit(flux, err, emu, mask=mask)
    assert t["flags"][1] & FLAG_FAILED and not t["converged"][1]
    assert t["n_good_pixels"][1] == 0 and np.isnan(t["Teff"][1])
    assert t["flags"][0] == 0 and t["flags"][2] == 0
    one = fit(flux[0], np.full(N_PIX, -1.0), emu)  # (P,) input, all errors negative
    assert len(one) == 1 and one["flags"][0] & FLAG_FAILED


# --- bad input ----------------------------------------------------------------------------
def test_bad_input_errors(emu, noise_free):
    flux, err = noise_free[0][:2], noise_free[1][:2]
    with pytest.raises(ValueError, match=r"\(2, 399\) has 399 pixels.*400"):
        fit(flux[:, :-1], err[:, :-1], emu)
    with pytest.raises(ValueError, match=r"flux \(2, 400\) and flux_err \(2, 399\)"):
        fit(flux, err[:, :-1], emu)
    with pytest.raises(ValueError, match=r"\(2, 400\) has 400 pixels.*has 300"):
        fit(flux, err, emu, wavelength=np.linspace(15100.0, 15160.0, 300))
    with pytest.raises(ValueError, match="does not overlap"):
        fit(flux, err, emu, wavelength=np.linspace(16000.0, 16080.0, N_PIX))
    with pytest.raises(ValueError, match=r"mask \(7,\) must be \(400,\)"):
        fit(flux, err, emu, mask=np.zeros(7, bool))
    with pytest.raises(ValueError, match="method must be one of"):
        fit(flux, err, emu, method="simplex")
    with pytest.raises(ValueError, match="rv_range"):
        fit(flux, err, emu, rv_range=(100.0, -100.0))
    with pytest.raises(ValueError, match="outside the training box"):
        fit(flux, err, emu, p0=[9000.0, 3.0, 0.0])


# --- compilation ---------------------------------------------------------------------------
def test_one_compilation_per_batch_shape(monkeypatch):
    emu = smooth_emulator(123, 3, seed=5)  # a pixel count no other test uses
    n_traces = 0
    original = lm_mod._lm_lanes

    def counted(*args):
        nonlocal n_traces
        n_traces += 1
        return original(*args)

    monkeypatch.setattr(lm_mod, "_lm_lanes", counted)
    rng = np.random.default_rng(11)
    counts = []
    for _ in range(3):
        s, rv = rng.uniform(-0.4, 0.4, (5, 3)), rng.uniform(-50, 50, 5)
        flux = reference_spectra(emu, s, rv)
        fit(
            flux, np.full_like(flux, 0.01), emu, rv_range=(-100, 100),
            options=LMOptions(max_iter=20),
        )  # fmt: skip
        counts.append(n_traces)
    # at most two programs per batch shape (all starts; then the best start of stars
    # not yet converged), compiled by the first batch and reused by the others
    assert counts[0] >= 1 and counts[-1] <= 2, counts
    # max_iter is an argument of the LM program, not part of it: another value runs
    # the executables already compiled, and every lane stops at it
    short = fit(
        flux, np.full_like(flux, 0.01), emu, rv_range=(-100, 100),
        options=LMOptions(max_iter=1),
    )  # fmt: skip
    assert n_traces == counts[-1]
    assert np.all(np.asarray(short["n_iter"]) == 1) and not np.any(short["converged"])


# --- the real Payne network ---------------------------------------------------------------
def test_real_network_recovery_and_errors(payne_apogee):
    emu, mask = payne_apogee
    rng = np.random.default_rng(2019)
    s = rng.uniform(-0.4, 0.4, (20, 5))  # the middle 80 % of the box
    rv = rng.uniform(-200.0, 200.0, 20)
    flux = reference_spectra(emu, s, rv)
    err = np.full_like(flux, 0.01)  # S/N 100

    t = fit(flux, err, emu, mask=mask)
    assert np.all(t["flags"] == 0)
    np.testing.assert_allclose(scaled_labels(emu, t), s, atol=1e-3)
    np.testing.assert_allclose(t["rv"], rv, atol=0.1)

    noisy = flux + err * rng.standard_normal(flux.shape)
    t = fit(noisy, err, emu, mask=mask)
    assert np.all(t["converged"])
    truth = np.column_stack([emu.unscale(s), rv])
    names = (*PAYNE_LABELS_5, "rv")
    est = np.column_stack([t[n] for n in names])
    sig = np.column_stack([t[f"{n}_err"] for n in names])
    z = np.median(np.abs(est - truth) / sig, axis=0)
    assert np.all(z < 2.0), dict(zip(names, z, strict=True))
    assert 0.8 < np.median(t["chi2_red"]) < 1.2


def test_rv_scan_parabola_vertex_hand_worked():
    """chi2 = 2 (rv - v)^2 + 7 sampled every 4 km/s: the vertex is v exactly; at the
    grid's ends, or where the three values are not convex, the grid RV is kept."""
    from payne_lite.fitting._rvscan import _parabola_vertex

    grid = jnp.arange(-20.0, 20.1, 4.0)  # 11 points
    true = np.array([3.3, -1.9, 0.0, -20.0, 20.0])
    red = 2.0 * (grid[None, :] - true[:, None]) ** 2 + 7.0
    i = jnp.argmin(red, axis=1)
    got = np.asarray(_parabola_vertex(red, i, grid))
    np.testing.assert_allclose(got, true, atol=1e-4)
    # flat around the minimum (zero curvature) or a NaN neighbour: grid value kept;
    # a lopsided triple moves by at most half a step
    bad = jnp.array(
        [[9.0, 1.0, 1.0, 1.0, 9.0], [9.0, jnp.nan, 1.0, 2.0, 9.0], [9, 1, 0, 9, 9]]
    )
    g5 = jnp.arange(5.0) * 4.0
    out = np.asarray(_parabola_vertex(bad, jnp.array([2, 2, 2]), g5))
    np.testing.assert_allclose(out, [8.0, 8.0, 8.0 - 0.5 * 8 / 10 * 4.0])


def test_bucket_lookup_interpolation_equals_binary_search():
    """The O(1) bucket search used inside fits gives the same interpolation and
    validity as the binary search, on a grid with a gap, at random and edge points."""
    import jax.numpy as jnp

    from payne_lite.observe import _model as M

    rng = np.random.default_rng(11)
    wave = 15100.0 * np.exp(6e-6 * np.arange(900) * np.log(10))
    wave = np.concatenate([wave[:400], wave[520:]])  # a chip gap
    ref = 0.5 * (wave[0] + wave[-1])
    x_rest = jnp.asarray(wave - ref)
    gap_cum = jnp.asarray(M.gap_cum(wave))
    flux = jnp.asarray(rng.uniform(0.3, 1.0, wave.size))
    lookup = M.make_lookup(wave - ref, jnp.float32)
    obs = np.sort(
        np.concatenate(
            [rng.uniform(wave[0] - 2, wave[-1] + 2, 3000), wave[:50], wave[-50:]]
        )
    )
    for rv in (-180.0, 0.0, 3.3, 250.0):
        a = M._shift(
            x_rest, gap_cum, flux, jnp.asarray(obs - ref), jnp.asarray(obs), rv
        )
        b = M._shift(
            x_rest, gap_cum, flux, jnp.asarray(obs - ref), jnp.asarray(obs), rv, lookup
        )
        np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
        np.testing.assert_allclose(np.asarray(b[0]), np.asarray(a[0]), atol=2e-6)
        # and both agree with NumPy's interpolation where valid
        ref_flux = np.interp(
            obs / np.sqrt((1 + rv / 299792.458) / (1 - rv / 299792.458)),
            wave,
            np.asarray(flux),
        )
        ok = np.asarray(b[1])
        np.testing.assert_allclose(np.asarray(b[0])[ok], ref_flux[ok], atol=1e-4)


def test_window_validity_is_validity_at_every_rv_of_the_window():
    """window_valid (slices of a cumulative count on a log grid; interval search
    otherwise) against the AND of observe's validity over a fine rv sweep."""
    from payne_lite.observe import _model as M

    sweep_valid = jax.jit(jax.vmap(lambda o, p: observe(o, p)[1], in_axes=(None, 0)))
    for wave in (log_wavelength(), None):
        emu_w = smooth_emulator(wavelength=wave, seed=4)
        obs = build_obs_model(emu_w)
        assert (obs.log_grid is not None) == (wave is not None)
        for lo, hi in ((-30.0, 10.0), (180.0, 220.0), (-2.0, 2.0)):
            sweep = np.linspace(lo, hi, 801)
            params = jnp.zeros((sweep.size, 4)).at[:, 3].set(sweep)
            every = np.all(np.asarray(sweep_valid(obs, params)), axis=0)
            got = np.asarray(M.window_valid(obs, lo, hi))
            # the sweep can only miss a pixel invalid between two of its rvs
            assert np.all(got <= every)
            assert np.sum(every & ~got) <= 2, (lo, hi, np.flatnonzero(every & ~got))
            assert 0.4 * N_PIX < got.sum() < N_PIX


def test_shift_on_the_observed_span_is_shift_pair():
    """The scan's shift (one dynamic slice per tap over the span of the observed
    pixels) against shift_pair's observed layout, every interpolant, rvs on and
    between rest nodes (a gap in the grid, rvs to the margin); span_pixels inverts
    embed_obs."""
    from payne_lite.observe import (
        TAP_OFFSETS,
        embed,
        embed_obs,
        shift_pair,
        shift_span,
        span_pixels,
    )

    emu_w = smooth_emulator(wavelength=log_wavelength(), seed=4)
    row = emu_w.predict(emu_w.unscale(np.zeros((1, 3)))).astype(np.float32)
    step_kms = C_KMS * np.log(emu_w.wavelength[1] / emu_w.wavelength[0])
    rvs = [0.0, step_kms, -3 * step_kms, 0.37, -123.4, 249.0, -499.0]
    for kind in TAP_OFFSETS:
        obs = build_obs_model(emu_w, interp=kind)
        emb = embed(obs.log_grid, jnp.asarray(row))[0]
        x = jnp.arange(N_PIX, dtype=jnp.float32)
        np.testing.assert_array_equal(span_pixels(obs, embed_obs(obs, x)), x)
        for rv in rvs:
            sh = shift_pair(obs, jnp.asarray(row), jnp.float32(rv))
            val, ok = shift_span(obs, emb, jnp.float32(rv))
            np.testing.assert_array_equal(span_pixels(obs, ok), sh.valid)
            assert 0 < int(np.sum(sh.valid)) <= N_PIX
            v = np.asarray(sh.valid)
            np.testing.assert_allclose(
                np.asarray(span_pixels(obs, val))[v], np.asarray(sh.value()[0])[v],
                rtol=0, atol=1e-6,
            )  # fmt: skip


def test_observation_models_are_kept_per_emulator_and_setting(monkeypatch):
    """cached_obs_model: the same settings give the same model (built once), other
    settings another; an emulator keeps the last OBS_CACHE_SIZE; an argument too
    large to key (per-star grids) is built every time; fits reuse the kept model
    and give the same table."""
    from payne_lite.observe import _cache as M

    built = []
    original = M.build_obs_model

    def counted(*args, **kwargs):
        built.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(M, "build_obs_model", counted)
    emu_c = smooth_emulator(seed=7)
    a, derived = M.cached_obs_model(emu_c, cont_deg=0, rv_max=500.0)
    b, derived_b = M.cached_obs_model(emu_c, rv_max=500.0, cont_deg=0)
    assert a is b and derived is derived_b and len(built) == 1
    c, _ = M.cached_obs_model(emu_c, cont_deg=2, rv_max=500.0)
    assert c is not a and c.n_cont == 3 and len(built) == 2
    wave = emu_c.wavelength * (1 + 1e-6)
    d, _ = M.cached_obs_model(emu_c, wavelength=wave, rv_max=500.0)
    assert d is M.cached_obs_model(emu_c, wavelength=wave.copy(), rv_max=500.0)[0]
    assert len(built) == 3
    for v in (300.0, 400.0, 450.0, 499.0):  # four more settings push ``a`` out
        M.cached_obs_model(emu_c, cont_deg=0, rv_max=v)
    assert M.cached_obs_model(emu_c, cont_deg=0, rv_max=500.0)[0] is not a
    assert len(built) == 8
    monkeypatch.setattr(M, "OBS_CACHE_KEY_BYTES", 100)
    e1 = M.cached_obs_model(emu_c, wavelength=wave, rv_max=500.0)[0]
    assert e1 is not M.cached_obs_model(emu_c, wavelength=wave, rv_max=500.0)[0]
    monkeypatch.undo()

    flux = emu_c.predict(emu_c.unscale(np.zeros((2, 3)))).astype(np.float64)
    err = np.full_like(flux, 0.01)
    t1, t2 = fit(flux, err, emu_c), fit(flux, err, emu_c)
    for name in t1.colnames:
        np.testing.assert_array_equal(np.asarray(t1[name]), np.asarray(t2[name]))


# --- QA flags and error scaling -----------------------------------------------------------
def test_label_beyond_the_box_is_flagged_outside_training_box(emu):
    """A star made by extrapolating the net beyond the box's top Teff edge: the fit
    stops at the edge with chi2 still falling outwards (bits 1 and 4); a star inside
    the box gets neither."""
    s = np.array([[0.75, 0.1, -0.1], [0.2, 0.1, -0.1]])  # scaled; 0.75 is outside
    rest = emu.predict(emu.unscale(s), allow_outside=True).astype(np.float64)
    t = fit(rest, np.full_like(rest, 0.005), emu)
    flags = np.asarray(t["flags"])
    assert (
        flags[0] & schema_mod.FLAG_OUTSIDE_BOX and flags[0] & schema_mod.FLAG_AT_BOUND
    )
    assert t["Teff"][0] == pytest.approx(emu.label_hi[0], abs=1e-3)
    assert flags[1] == 0, flags[1]
    assert t.meta["flag_bits"]["4"].startswith("outside the training box")


def test_low_snr_flag_and_snr_column(emu, noise_free):
    flux, _ = noise_free
    f = flux[:2]
    err = np.stack([np.full(N_PIX, 0.2), np.full(N_PIX, 0.01)])  # S/N ~5 and ~100
    t = fit(f, err, emu)
    np.testing.assert_allclose(
        t["snr"], np.median(np.abs(f), axis=1) / err[:, 0], rtol=0.05
    )
    assert t["flags"][0] & schema_mod.FLAG_LOW_SNR
    assert not t["flags"][1] & schema_mod.FLAG_LOW_SNR


def test_scale_errors_multiplies_by_sqrt_chi2_red(emu, truth, noise_free):
    """Errors quoted 2x too small: chi2_red ~ 4, and scale_errors=True restores the
    error bars by sqrt(chi2_red) exactly, leaving the labels unchanged."""
    flux, err = noise_free
    rng = np.random.default_rng(5)
    noisy = flux[:4] + 0.02 * rng.standard_normal(flux[:4].shape)
    plain = fit(noisy, err[:4], emu)
    scaled = fit(noisy, err[:4], emu, options=LMOptions(scale_errors=True))
    assert np.all(plain["chi2_red"] > 3.0) and np.all(plain["chi2_red"] < 5.0)
    np.testing.assert_array_equal(plain["Teff"], scaled["Teff"])
    for name in ("Teff", "logg", "rv"):
        np.testing.assert_allclose(
            scaled[f"{name}_err"],
            plain[f"{name}_err"] * np.sqrt(plain["chi2_red"]),
            rtol=1e-12,
        )
    assert scaled.meta["errors_scaled_by_chi2_red"] is True


def test_covariance_batch_matches_per_star_inverse_and_flags_bad_ones():
    rng = np.random.default_rng(3)
    j = rng.standard_normal((50, 4))
    good = j.T @ j  # well conditioned
    tilted = np.diag([1e4, 1.0, 1.0, 1e-4]) @ good @ np.diag([1e4, 1.0, 1.0, 1e-4])
    near = good.copy()
    near[3] = near[2] * (1 + 1e-9)  # rows almost equal: ill-conditioned
    near[:, 3] = near[:, 2] * (1 + 1e-9)
    singular = good.copy()
    singular[3], singular[:, 3] = 0.0, 0.0  # zero diagonal
    bad = good.copy()
    bad[0, 1] = np.nan
    a = np.stack([good, tilted, near, singular, bad])
    free = np.array([True, True, True, True])
    cov, ill = schema_mod._covariance(a, free, np.float32)
    np.testing.assert_allclose(cov[0], np.linalg.inv(good), rtol=1e-10)
    np.testing.assert_allclose(cov[1], np.linalg.inv(tilted), rtol=1e-8)  # scaling is
    # removed before the condition test: the correlation form is well conditioned
    assert list(ill) == [False, False, True, True, True]
    assert np.all(np.isnan(cov[3])) and np.all(np.isnan(cov[4]))
    # a fixed parameter's row and column are zero; the rest is the free block's inverse
    cov_f, ill_f = schema_mod._covariance(
        a[:1], np.array([True, False, True, True]), np.float32
    )
    sub = np.ix_([0, 2, 3], [0, 2, 3])
    np.testing.assert_allclose(cov_f[0][sub], np.linalg.inv(good[sub]), rtol=1e-10)
    assert np.all(cov_f[0][1] == 0) and not ill_f[0]


def test_vmapped_lanes_accelerator_path_gives_the_same_fits(
    emu, noise_free, monkeypatch
):
    """The accelerator path (all LM lanes under vmap) fits like the CPU path (lanes
    one after the other with a per-lane skip): same algorithm, other schedule."""
    flux, err = noise_free[0][:6], noise_free[1][:6]
    rng = np.random.default_rng(8)
    noisy = flux + 0.01 * rng.standard_normal(flux.shape)
    seq = fit(noisy, err, emu, options=LMOptions(batch_size=8))
    jax.clear_caches()
    monkeypatch.setattr(lm_mod, "SEQUENTIAL_LANES", False)
    seen = []
    original = lm_mod.sequential_lanes
    monkeypatch.setattr(
        lm_mod, "sequential_lanes", lambda: seen.append(original()) or seen[-1]
    )
    try:
        par = fit(noisy, err, emu, options=LMOptions(batch_size=8))
    finally:
        jax.clear_caches()
    assert seen and not any(seen)  # traced, and on the vmap path
    for name in (*TINY_NAMES, "rv"):
        np.testing.assert_allclose(
            par[name],
            seq[name],
            rtol=0,
            atol=1e-3 * np.asarray(seq[f"{name}_err"]).max(),
        )
    np.testing.assert_array_equal(par["flags"], seq["flags"])


# --- the emulator's own error in the likelihood --------------------------------------------
def test_emulator_error_is_shifted_to_each_stars_rest_wavelength():
    wave = np.linspace(15000.0, 15100.0, 501)
    ramp = 1e-3 + 1e-5 * (wave - wave[0])  # linear: interpolation is exact
    rv = np.array([0.0, 150.0, -300.0])
    got = _problem.emulator_error_on(wave, wave, ramp, rv)
    lam_rest = wave[None, :] / _factor(rv)[:, None]
    expected = np.where(
        (lam_rest >= wave[0]) & (lam_rest <= wave[-1]),
        1e-3 + 1e-5 * (lam_rest - wave[0]),
        0.0,
    )
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


def test_emulator_error_added_in_quadrature(emu, noise_free):
    """A constant emulator error equal to the flux error halves every weight: the
    labels stay, the error bars grow by sqrt(2); switched off, nothing changes."""
    flux, err = noise_free[0][:4], noise_free[1][:4]  # err = 0.01 everywhere
    rng = np.random.default_rng(12)
    noisy = flux + 0.01 * rng.standard_normal(flux.shape)
    with_err = dataclasses.replace(emu, pixel_error=np.full(N_PIX, 0.01))
    plain = fit(noisy, err, emu)
    both = fit(noisy, err, with_err)
    off = fit(noisy, err, with_err, emulator_error=False)
    assert both.meta["emulator_error_in_likelihood"] is True
    assert plain.meta["emulator_error_in_likelihood"] is False
    for name in (*TINY_NAMES, "rv"):
        sig = np.asarray(plain[f"{name}_err"])
        np.testing.assert_allclose(both[name], plain[name], atol=0.05 * sig.max())
        np.testing.assert_allclose(both[f"{name}_err"], sig * np.sqrt(2), rtol=2e-3)
        np.testing.assert_array_equal(off[name], plain[name])
    np.testing.assert_allclose(both["chi2"], plain["chi2"] / 2, rtol=2e-3)
    np.testing.assert_allclose(both["snr"], plain["snr"])  # S/N of the data alone


# --- leaving local minima in rv ----------------------------------------------------------
@pytest.mark.parametrize("cont_deg", [0, 1])
def test_rv_probe_is_the_exact_minimum_over_each_pixel_interval(cont_deg):
    """On a log grid the probe returns, per pixel interval, chi2's minimum over rv
    with the rest held: checked against NumPy chi2 (the model's interpolant,
    conftest.doppler_interp, at lambda / f) and Brent's minimum per interval on a
    dense rv grid over the seven intervals; and, as the reference of a probe's
    gain, the minimum of the interval that holds the fit's rv (and of its neighbour
    near their node). Off the log grid it
    returns chi2 at the probe rvs themselves, and at the fit's rv."""
    emu_log = smooth_emulator(wavelength=log_wavelength(), seed=3)
    rng = np.random.default_rng(5)
    s = np.array([[0.2, -0.1, 0.35]])
    cont = [1.02, -0.03] if cont_deg else None
    err = 0.01
    with jax.enable_x64():
        fast = build_obs_model(emu_log, cont_deg=cont_deg, dtype=jnp.float64)
        slow = build_obs_model(
            emu_log, cont_deg=cont_deg, dtype=jnp.float64, log_grid=False
        )
        px = rvscan_mod.rv_pixel_kms(fast)
        assert px == pytest.approx(1.3e-5 * C_KMS, rel=1e-9)
        flux = reference_spectra(
            emu_log, s, [39.0], cont=None if cont is None else [cont]
        )
        flux = flux + err * rng.standard_normal(flux.shape)
        rv0 = 37.3
        p = np.concatenate([s[0], [rv0], cont or []])
        dv = np.arange(-3, 4) * px
        valid = np.asarray(
            rvscan_mod.window_valid(fast, rv0 - 4.5 * px, rv0 + 4.5 * px)
        )
        w = np.where(valid, 1.0 / err**2, 0.0)[None]
        args = (jnp.asarray(p[None]), jnp.asarray(dv[None]), jnp.asarray(flux), w)
        c_fast, v_fast, here_fast = (
            np.asarray(a)[0]
            for a in rvscan_mod._rv_probe_batch(fast, *args, jnp.ones(1, bool))
        )
        c_slow, v_slow, here_slow = (
            np.asarray(a)[0]
            for a in rvscan_mod._rv_probe_batch(slow, *args, jnp.ones(1, bool))
        )
        skipped = rvscan_mod._rv_probe_batch(fast, *args, jnp.zeros(1, bool))
    assert np.all(np.isinf(np.asarray(skipped[0]))) and np.isinf(skipped[2][0])

    def chi2_np(v):
        m = reference_spectra(emu_log, s, [v], cont=None if cont is None else [cont])
        return float(np.sum(w * (m - flux) ** 2))

    # off the log grid: chi2 at rv0 + dv
    np.testing.assert_allclose(v_slow, rv0 + dv, rtol=0, atol=1e-12)
    np.testing.assert_allclose(c_slow, [chi2_np(v) for v in rv0 + dv], rtol=1e-6)
    # the reference of a probe's gain: off the log grid chi2 at rv0 itself, on it
    # the minimum over the interval that holds rv0
    assert here_slow == pytest.approx(chi2_np(rv0), rel=1e-6)
    # on it: the minimum within each interval, at the rv that attains it
    grid = np.linspace(rv0 - 4.5 * px, rv0 + 4.5 * px, 6001)
    dense = np.array([chi2_np(v) for v in grid])
    inv_step = fast.log_grid.inv_step
    u = -np.arctanh(grid / C_KMS) * inv_step
    u_top = np.floor(-np.arctanh((rv0 + dv[-1]) / C_KMS) * inv_step)
    for j in range(dv.size):  # probe j is the interval u_top + j
        # the probe's chi2 is NumPy's at its rv; NumPy's minimum inside the interval
        # (Brent) is not lower; and no dense point in the interval widened by 1 %
        # of a pixel (its ends in lambda and in ln lambda differ by less) is lower
        # than the probe by more than the grid's resolution allows (0.1)
        assert chi2_np(v_fast[j]) == pytest.approx(c_fast[j], rel=1e-6)
        ends = -C_KMS * np.tanh((u_top + j + np.array([0.99, 0.01])) / inv_step)
        best = minimize_scalar(
            chi2_np, bounds=ends, method="bounded", options={"xatol": 1e-7}
        )
        assert c_fast[j] <= best.fun * (1 + 1e-6)
        outer = (u > u_top + j - 0.01) & (u < u_top + j + 1.01)
        assert c_fast[j] >= dense[outer].min() - 0.1
    # chi2 of this strong-lined toy changes 4x within a tenth of a pixel: the probe
    # may sit below the dense grid's best point, never above it by more than 0.1
    assert dense.min() - 0.1 <= c_fast.min() <= dense.min() * (1 + 1e-6)
    assert abs(v_fast[np.argmin(c_fast)] - grid[np.argmin(dense)]) < 0.05
    u0 = -np.arctanh(rv0 / C_KMS) * inv_step
    j0, t0 = int(np.floor(u0) - u_top), u0 - np.floor(u0)
    near = [j0 - 1] if t0 < rvscan_mod.PROBE_NODE_TOL else []
    near += [j0 + 1] if t0 > 1 - rvscan_mod.PROBE_NODE_TOL else []
    assert 0 <= j0 < dv.size and here_fast == min(c_fast[[j0, *near]])


def test_searches_shift_with_the_cheaper_interpolant(monkeypatch):
    """Screening and the rv polish's probe compare chi2 values only among
    themselves: with Lanczos-6 they shift with Keys' six-tap cubic
    (SEARCH_INTERP), and the probe compares with its own chi2 at the fit's rv. So
    a gain is measured within one interpolant, not across the two (whose chi2 at a
    fit differ by far more than the probe's threshold): converged fits are not
    moved, and a fit put two pixels off its minimum is moved back to within a
    tenth of a pixel of it."""
    emu_log = smooth_emulator(wavelength=log_wavelength(), seed=3)
    inst = pl.Instrument(doppler="lanczos6")
    obs = build_obs_model(emu_log, **inst.model_options())
    assert rvscan_mod.search_model(obs).interp == "cubic6"
    cub = build_obs_model(emu_log, interp="cubic6")
    assert rvscan_mod.search_model(cub) is cub
    seen = []
    probe = rvscan_mod._rv_probe_batch
    monkeypatch.setattr(
        rvscan_mod,
        "_rv_probe_batch",
        lambda o, *a: seen.append(o.interp) or probe(o, *a),
    )
    rng = np.random.default_rng(8)
    s = rng.uniform(-0.3, 0.3, (6, 3))
    rv = rng.uniform(-80.0, 80.0, 6)
    lam = emu_log.wavelength / _factor(rv[:, None])
    rest = emu_log.predict(emu_log.unscale(s), fast_tanh=False).astype(np.float64)
    clean = np.stack(
        [
            doppler_interp(x, emu_log.wavelength, r, "lanczos6")
            for x, r in zip(lam, rest, strict=True)
        ]
    )
    err = np.full(clean.shape, 0.002)
    flux = np.where(np.isnan(clean), 1.0, clean) + err * rng.standard_normal(
        clean.shape
    )
    err = np.where(np.isnan(clean), np.inf, err)
    t = fit(flux, err, emu_log, instrument=inst)
    assert seen and set(seen) == {"cubic6"}
    assert np.all(t["flags"] == 0)
    np.testing.assert_allclose(t["rv"], rv, atol=5 * np.max(t["rv_err"]))
    # the probe at the fits: nobody moves (the two interpolants' chi2 differ by more
    # than the probe's threshold, which compared with the fit's chi2 would move some)
    p = np.column_stack([scaled_labels(emu_log, t), t["rv"]])
    px = rvscan_mod.rv_pixel_kms(obs)
    lo, hi = p[:, 3] - 20.0, p[:, 3] + 20.0
    w = np.stack(
        [
            np.where(np.asarray(window_valid(obs, a, b)) & np.isfinite(err[i]),
                     1.0 / err[i] ** 2, 0.0)
            for i, (a, b) in enumerate(zip(lo, hi, strict=True))
        ]
    )  # fmt: skip
    args = (jnp.asarray(flux, jnp.float32), jnp.asarray(w, jnp.float32))
    run = np.ones(6, bool)
    _, gain = rvscan_mod._rv_probe(obs, p, *args, run, lo, hi, 3)
    assert not gain.any()
    both = [build_obs_model(emu_log, interp=k) for k in ("lanczos6", "cubic6")]
    c2 = [
        np.asarray(
            rvscan_mod.chi2_batch(o, jnp.asarray(p[:, None], jnp.float32), *args)
        )
        for o in both
    ]
    # the cubic's chi2 at a fit differs from the fit's own (Lanczos-6) by far more
    # than the threshold (here 1-55 higher): compared with the fit's chi2, a gain
    # that large would go unseen
    assert np.max(np.abs(c2[1] - c2[0])) > 10 * rvscan_mod.RV_PROBE_GAIN
    off = p.copy()
    off[:, 3] += 2 * px
    rv_new, gain = rvscan_mod._rv_probe(obs, off, *args, run, lo, hi, 3)
    assert gain.all()
    np.testing.assert_allclose(rv_new, p[:, 3], atol=0.1 * px)


def test_fit_leaves_no_local_rv_minima(payne_apogee, monkeypatch):
    """Real network, 200 stars at S/N 50. With linear interpolation chi2(rv) had a
    kink at every pixel crossing and fits stopped in notches or in the next basin
    (24 of 1,000 rvs beyond 4 sigma without the rv polish, which then probed every
    star). With the cubic interpolant chi2(rv) is smooth: the fits alone leave at
    most one rv beyond 4 sigma (0.013 expected by chance), the polish (for every
    fit) changes none of these, and no chi2 ends higher with it."""
    emu, mask = payne_apogee
    rng = np.random.default_rng(11)
    n = 200
    s = rng.uniform(-0.4, 0.4, (n, 5))
    rv = rng.uniform(-200.0, 200.0, n)
    err = np.full((n, emu.n_pix), 0.02)
    flux = reference_spectra(emu, s, rv) + err * rng.standard_normal(err.shape)

    def z_rv(t):
        return np.abs(np.asarray(t["rv"]) - rv) / np.asarray(t["rv_err"])

    t = fit(flux, err, emu, mask=mask)
    assert np.all(t["converged"])
    assert np.sum(z_rv(t) > 4) <= 1, np.sort(z_rv(t))[-5:]
    monkeypatch.setattr(driver_mod, "rv_polish", lambda *a, **k: a[8])  # a[8]: best
    t_off = fit(flux, err, emu, mask=mask)
    assert np.sum(z_rv(t_off) > 4) <= 1, np.sort(z_rv(t_off))[-5:]
    worse = np.asarray(t_off["chi2"]) - np.asarray(t["chi2"])
    assert worse.min() > -1e-6 * np.asarray(t["chi2"]).max()  # never higher


# --- a second RV scan when the first one put the window in the wrong place ------------------
def test_near_window_edge_by_hand():
    """A fit is scanned again when its rv is closer to an end of its window than
    the rv polish's probe reaches: RV_PROBE_CELLS pixels (3 x 3.90 km/s on this
    grid), at most a quarter of the window; never at an end of rv_range, never
    for a NaN rv."""
    from types import SimpleNamespace

    obs = build_obs_model(smooth_emulator(wavelength=log_wavelength(), seed=3))
    px = rvscan_mod.rv_pixel_kms(obs)
    assert rvscan_mod.RV_PROBE_CELLS * px == pytest.approx(11.69, abs=0.01)
    ctx = SimpleNamespace(obs=obs, rv_range=(-500.0, 500.0))
    rv = np.array([9.9, 10.1, -10.1, -9.9, -499.0, 3.5, 2.0, 30.0, np.nan])
    lo = np.array([-20, -20, -20, -20, -500, 0, 0, 20, -20], float)
    hi = np.array([20, 20, 20, 20, -460, 4, 4, 80, 20], float)
    # windows 40 km/s wide: reach min(11.69, 10) = 10; [0, 4]: 1; [20, 80]: 11.69
    want = [False, True, True, False, False, True, False, True, False]
    np.testing.assert_array_equal(driver_mod.near_window_edge(ctx, rv, lo, hi), want)


def test_rescan_batch_scans_each_star_with_its_own_template():
    """rescan_batch is scan_batch with one template per row: each row's rv and
    continuum are those of scan_batch with that row's labels and broadening alone;
    rows that do not run return rv 0 and continuum 1."""
    emu_log = smooth_emulator(wavelength=log_wavelength(), seed=3)
    obs = build_obs_model(emu_log, cont_deg=1)
    rng = np.random.default_rng(2)
    s = np.array([[0.2, -0.1, 0.35], [-0.3, 0.25, -0.2], [0.0, 0.0, 0.0]])
    rv_true = np.array([-61.0, 45.0, 3.0])
    flux = reference_spectra(emu_log, s, rv_true, cont=[[1.1, 0.02]] * 3)
    flux = flux + 0.01 * rng.standard_normal(flux.shape)
    w = np.full(flux.shape, 1e4)
    grid = jnp.linspace(-200.0, 200.0, 101)
    b = np.zeros((3, 0))
    run = np.array([True, True, False])
    rv, c = (
        np.asarray(a)
        for a in rvscan_mod.rescan_batch(
            obs,
            jnp.asarray(s),
            jnp.asarray(b),
            grid,
            jnp.asarray(flux),
            jnp.asarray(w),
            jnp.asarray(run),
        )  # fmt: skip
    )
    for i in range(2):
        rv_i, c_i = rvscan_mod.scan_batch(
            obs,
            jnp.asarray(s[i]),
            jnp.asarray(b[i]),
            grid,
            flux[i : i + 1],
            w[i : i + 1],
        )
        assert rv[i] == pytest.approx(float(rv_i[0]), abs=1e-3)
        np.testing.assert_allclose(c[i], np.asarray(c_i)[0], rtol=1e-4)
        assert abs(rv[i] - rv_true[i]) < 2.0  # its own template finds its rv
    assert rv[2] == 0.0 and np.all(c[2] == 1.0)


@pytest.mark.parametrize("joint", [False, True])
def test_a_scan_that_landed_off_is_recovered_by_a_second_scan(
    payne_apogee, monkeypatch, joint
):
    """Real network, S/N 50. The first RV scan (box-centre template) is made to
    land 30 km/s above every spectrum's truth, so that the truth lies outside the
    +-20 km/s window: without the second scan every rv ends at its window's end,
    > 10 sigma off and flagged at a bound; with it (the fits near the window's end
    scanned again with their own labels, refitted in the new window) every rv and
    label is within 4 sigma of the truth, unflagged. Joint fits of 2 visits per
    star: the same, per visit."""
    emu, mask = payne_apogee
    rng = np.random.default_rng(4)
    n_star, n_vis = 4, 2 if joint else 1
    s = rng.uniform(-0.3, 0.3, (n_star, 5))
    rv = rng.uniform(-150.0, 150.0, (n_star, n_vis))
    flux = reference_spectra(emu, np.repeat(s, n_vis, axis=0), rv.ravel())
    err = np.full_like(flux, 0.02)
    flux = flux + err * rng.standard_normal(flux.shape)
    group = np.repeat(np.arange(n_star), n_vis) if joint else None
    real_scan = driver_mod.scan_batch

    def scan_off(*a, **k):
        rv0, c0 = real_scan(*a, **k)
        return rv0 + 30.0, c0

    monkeypatch.setattr(driver_mod, "scan_batch", scan_off)

    def z(t):
        rv_fit = np.asarray(t["rv"]).reshape(n_star, n_vis)
        return np.abs(rv_fit - rv) / np.asarray(t["rv_err"]).reshape(n_star, n_vis)

    t = fit(flux, err, emu, mask=mask, group=group)
    assert t.meta["rv_rescanned"] == n_star * n_vis
    assert np.all(z(t) < 4), z(t)
    if not joint:
        # an MDN's windows are not the scan's: its fits are not rescanned, however
        # near their window's end they stop (here rv_mdn = truth + 2, sigma 1: the
        # window truth - 1 .. truth + 5, the fit 1 km/s from its end, inside the
        # reach of a quarter window, 1.5 km/s)
        from test_visits import FakeMDN

        mean = np.column_stack([emu.unscale(s), rv[:, 0] + 2.0])
        sigma = np.tile([200.0, 0.3, 0.2, 0.1, 3.0, 1.0], (n_star, 1))
        t_mdn = fit(flux, err, emu, mask=mask, mdn=FakeMDN(mean, sigma))
        assert t_mdn.meta["rv_rescanned"] == 0 and not np.any(t_mdn["mdn_refit"])
        assert np.all(z(t_mdn) < 4), z(t_mdn)
    assert np.all(np.asarray(t["flags"]) == 0), list(t["flags"])
    for j, name in enumerate(emu.label_names):
        truth = emu.unscale(s)[:, j]
        assert np.all(np.abs(np.asarray(t[name]) - truth) < 4 * t[f"{name}_err"]), name
    fit_mod = importlib.import_module("payne_lite.fitting._fit")
    visits_mod = importlib.import_module("payne_lite.fitting._visits")
    monkeypatch.setattr(
        fit_mod, "rescan_fits", lambda ctx, f, i, res, *a: (res, np.zeros(len(f), bool))
    )
    monkeypatch.setattr(visits_mod, "_rescan_visits", lambda *a: 0)
    t_off = fit(flux, err, emu, mask=mask, group=group)
    assert np.all(z(t_off) > 10), z(t_off)
    assert np.all(np.asarray(t_off["flags"]) & schema_mod.FLAG_AT_BOUND)
