"""Tests for the forward model of real instruments (issue 6, items 1-3).

* kernels of :mod:`payne_lite.observe.broadening` against hand-worked values and
  independent NumPy/SciPy computations;
* air/vacuum wavelengths;
* the fitter with an instrumental resolution (shipped default emulator), rotation
  (the real APOGEE network shipped in data/payne_apogee), per-star wavelength grids;
* the fast normal-equations path is still taken, and unchanged, with broadening off.

Reference spectra are made here by NumPy/SciPy (``gaussian_filter1d``, a cubic
spline and a finely sampled Gray profile), not by the code under test.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import doppler_interp
from scipy.interpolate import CubicSpline
from scipy.ndimage import gaussian_filter1d

from payne_lite import Emulator, Instrument, PixelNet, fit
from payne_lite.constants import C_KMS
from payne_lite.observe import build_obs_model, lsf_sigma_pixels, observe, observe_jac_t
from payne_lite.observe.broadening import (
    FWHM_PER_SIGMA,
    air_to_vacuum,
    convolve_segments,
    gaussian_kernel,
    gaussian_kernels,
    rotation_kernel,
    rotation_profile,
    vacuum_to_air,
)

lm_mod = importlib.import_module("payne_lite.fitting._lm")


# --- fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_emu() -> Emulator:
    from payne_lite.demo import default_emulator_path

    DEFAULT_EMULATOR = default_emulator_path()
    if not DEFAULT_EMULATOR.exists():
        pytest.skip(f"{DEFAULT_EMULATOR} not in this checkout")
    return Emulator.load(DEFAULT_EMULATOR)


@pytest.fixture(scope="module")
def payne5(payne_data) -> Emulator:
    return payne_data.emulator()


def log_emulator(n_pix: int = 300, gap=(120, 150), seed: int = 2) -> Emulator:
    """Small random per-pixel net on a log-uniform grid (APOGEE's step) with a gap;
    weights smoothed over ~2 pixels so that its spectra look sampled."""
    rng = np.random.default_rng(seed)
    idx = np.arange(n_pix + gap[1] - gap[0])
    idx = idx[(idx < gap[0]) | (idx >= gap[1])]

    def smooth(a):
        b = gaussian_filter1d(a, 2.0, axis=0, mode="nearest")
        return b * (a.std() / b.std())

    w0 = smooth(rng.normal(0.0, 1.0, (n_pix, 4, 3)))
    b0 = smooth(rng.normal(0.0, 0.5, (n_pix, 4)))
    w1 = smooth(rng.normal(0.0, 0.3, (n_pix, 4)))
    b1 = 1.0 + smooth(rng.normal(0.0, 0.05, n_pix))
    return Emulator(
        net=PixelNet((w0, w1), (b0, b1)),
        activation="sigmoid",
        label_names=("Teff", "logg", "[Fe/H]"),
        label_units=("K", "dex", "dex"),
        label_lo=np.array([4000.0, 1.0, -2.0]),
        label_hi=np.array([7000.0, 5.0, 0.5]),
        wavelength=15100.0 * np.exp(1.3815510557790844e-05 * idx),
        meta={"resolution": 22500.0},
    )


def scaled(emu, table):
    return emu.scale(np.column_stack([table[n] for n in emu.label_names]))


def degrade_reference(wave, flux, r_target, r_emu):
    """NumPy/SciPy: Gaussian of the quadrature difference in ln(lambda) on a
    log-uniform grid without gaps (scipy's sampled Gaussian, 5 sigma, edges held)."""
    step = np.log(wave[1] / wave[0])
    sigma = np.sqrt((1 / r_target) ** 2 - (1 / r_emu) ** 2) / FWHM_PER_SIGMA / step
    return gaussian_filter1d(flux, sigma, mode="nearest", truncate=5.0)


def gray_numpy(v, vsini, eps=0.6):
    """Gray (2005) eq. 18.14, written out again in NumPy."""
    x = np.asarray(v, np.float64) / vsini
    g = np.zeros_like(x)
    m = np.abs(x) < 1
    g[m] = (
        2 * (1 - eps) * np.sqrt(1 - x[m] ** 2) + 0.5 * np.pi * eps * (1 - x[m] ** 2)
    ) / (np.pi * vsini * (1 - eps / 3))
    return g


def rotate_reference(wave, flux, vsini, over=10):
    """NumPy/SciPy rotation: each chip interpolated by a cubic spline onto a grid
    ``over`` times finer in ln(lambda), convolved with the Gray profile averaged over
    each fine bin (41 sub-samples), sampled back; chip ends held."""
    if vsini == 0:
        return flux.copy()
    ln = np.log(wave)
    step = np.median(np.diff(ln))
    dv = C_KMS * step / over
    out = np.empty_like(flux)
    cut = np.flatnonzero(np.diff(ln) > 3 * step) + 1
    for a, b in zip(np.r_[0, cut], np.r_[cut, wave.size], strict=True):
        u = (ln[a:b] - ln[a]) / step
        uf = np.arange(0.0, u[-1] + 1e-9, 1.0 / over)
        ff = CubicSpline(u, flux[a:b])(uf)
        h = int(np.ceil(vsini / dv)) + 1
        sub = np.linspace(-0.5, 0.5, 41)[:, None] * dv
        k = gray_numpy(np.arange(-h, h + 1)[None, :] * dv + sub, vsini).mean(0)
        k /= k.sum()
        fp = np.concatenate([np.full(h, ff[0]), ff, np.full(h, ff[-1])])
        out[a:b] = np.interp(u, uf, np.convolve(fp, k, mode="valid"))
    return out


# --- air and vacuum ---------------------------------------------------------------------
def test_vacuum_to_air_hand_worked_and_round_trip():
    """15000 A vacuum by hand (Morton 2000 eq. 8): s^2 = (1e4/15000)^2 = 4/9;
    n - 1 = 8.34254e-5 + 2.406147e-2 / (130 - 4/9) + 1.5998e-4 / (38.9 - 4/9)
          = 8.34254e-5 + 1.8572318e-4 + 4.160127e-6 = 2.7330871e-4;
    lambda_air = 15000 / 1.00027330871 = 14995.90149 A."""
    assert float(vacuum_to_air(15000.0)) == pytest.approx(14995.90149, abs=1e-5)
    assert float(air_to_vacuum(14995.90149)) == pytest.approx(15000.0, abs=1e-4)
    wave = np.linspace(3000.0, 25000.0, 20001)
    back = air_to_vacuum(vacuum_to_air(wave))
    assert np.max(np.abs(back - wave)) < 1e-6
    # air wavelengths are shorter; the offset at 15000 A is ~4.1 A (82 km/s)
    assert np.all(vacuum_to_air(wave) < wave)


def test_fit_air_switch_is_the_vacuum_fit(default_emu):
    """Air wavelengths with Instrument(air=True) fit as their vacuum equivalents do."""
    wave_vac = np.linspace(15600.0, 16400.0, 1500)
    s_true = np.array([0.1, -0.2, 0.05, 0.0, -0.1])
    f = np.interp(
        wave_vac,
        default_emu.wavelength,
        default_emu.predict(default_emu.unscale(s_true)),
    )
    err = np.full_like(f, 0.01)
    t_vac = fit(f, err, default_emu, wavelength=wave_vac)
    t_air = fit(
        f, err, default_emu, wavelength=vacuum_to_air(wave_vac),
        instrument=Instrument(air=True),
    )  # fmt: skip
    for name in (*default_emu.label_names, "rv"):
        np.testing.assert_allclose(t_air[name], t_vac[name], rtol=1e-6, atol=1e-4)
    assert t_air.meta["wavelength_air"] is True
    # the same spectrum read as vacuum is ~82 km/s off
    t_wrong = fit(f, err, default_emu, wavelength=vacuum_to_air(wave_vac))
    assert abs(t_wrong["rv"][0] - t_vac["rv"][0]) > 70.0
    with pytest.raises(ValueError, match=r"Instrument\(air=True\) needs"):
        fit(f, err, default_emu, instrument=Instrument(air=True))


# --- kernels ----------------------------------------------------------------------------
def test_rotation_profile_hand_worked_and_normalised():
    """vsini = 10 km/s, epsilon = 0.6, by hand: G = [0.8 sqrt(1 - x^2) + 0.3 pi
    (1 - x^2)] / (8 pi); x = 0: 1.7424778 / 25.132741 = 0.0693310; x = 0.5:
    (0.6928203 + 0.7068583) / 25.132741 = 0.0556914; |x| >= 1: 0."""
    g = np.asarray(rotation_profile(jnp.array([0.0, 5.0, -5.0, 10.0, 12.0]), 10.0, 0.6))
    np.testing.assert_allclose(
        g, [0.0693310, 0.0556914, 0.0556914, 0.0, 0.0], atol=2e-7
    )
    v = np.linspace(-10.0, 10.0, 200001)
    for eps in (0.0, 0.6, 1.0):
        gv = np.asarray(rotation_profile(v, 10.0, eps), np.float64)
        assert np.trapezoid(gv, v) == pytest.approx(1.0, abs=1e-4)
        # float32 near |x| = 1: sqrt(1 - x^2) loses digits; 1e-6 of a peak of 0.07
        np.testing.assert_allclose(gv, gray_numpy(v, 10.0, eps), rtol=2e-6, atol=1e-6)


def test_rotation_kernel_weights():
    """Discrete weights on APOGEE's 4.14 km/s pixels: sum to 1, identity at vsini
    = 0, symmetric, and for vsini = 30 and 60 the variance of the continuous
    profile, vsini^2 (a/4 + (1 - a)/5) with a = (1 - e)/(1 - e/3) (the ellipse's and
    the parabola's second moments)."""
    dv = C_KMS * 1.3815510557790844e-05
    k = 40
    j = np.arange(-k, k + 1)
    w0 = np.asarray(rotation_kernel(0.0, dv, k))
    np.testing.assert_allclose(w0, np.eye(2 * k + 1)[k], atol=1e-6)
    a = 0.4 / 0.8
    for vsini in (10.0, 30.0, 60.0):
        w = np.asarray(rotation_kernel(vsini, dv, k, 0.6), np.float64)
        assert w.sum() == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(w, w[::-1], atol=1e-6)
        if vsini >= 30:
            var = (vsini / dv) ** 2 * (a / 4 + (1 - a) / 5)
            assert np.sum(j**2 * w) == pytest.approx(var, rel=0.01)
    # differentiable in vsini, also at 0 (no NaN)
    grad = jax.grad(lambda v: rotation_kernel(v, dv, k)[k])
    assert np.isfinite(float(grad(0.0))) and float(grad(10.0)) < 0


def test_gaussian_lsf_kernel_variance_and_fwhm(default_emu):
    """The instrumental kernel for R = 7500 from the emulator's 22,500: per-pixel
    weights sum to 1 and their variance is the quadrature difference
    (1/7500^2 - 1/22500^2) / (2 sqrt(2 ln 2))^2 in ln(lambda), in pixels^2; a delta
    line (an emulator of infinite resolution) comes out with FWHM = lambda / R, and
    a line at the emulator's resolution with FWHM = lambda / 7500."""
    wave = default_emu.wavelength
    step = np.log(wave[1] / wave[0])
    sig, r_emu = lsf_sigma_pixels(default_emu, wave, resolution=7500.0)
    assert r_emu == 22500.0  # recorded by the synthesizer in the grid's meta
    want = np.sqrt(1 / 7500.0**2 - 1 / 22500.0**2) / FWHM_PER_SIGMA / step
    np.testing.assert_allclose(sig, want, rtol=1e-9)  # median vs first step
    half = int(np.ceil(5 * want))
    w = gaussian_kernels(sig, half)
    j = np.arange(-half, half + 1)[:, None]
    np.testing.assert_allclose(w.sum(axis=0), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.sum(j**2 * w, axis=0), want**2, rtol=1e-4)
    # the traced scalar form agrees
    np.testing.assert_allclose(gaussian_kernel(want, half), w[:, 0], atol=1e-6)

    def fwhm(profile):
        x = np.arange(profile.size, dtype=np.float64)
        fine = np.linspace(0, x[-1], 200001)
        p = CubicSpline(x, profile)(fine)
        above = fine[p >= 0.5 * p.max()]
        return above[-1] - above[0]

    n = 201
    delta = np.zeros(n)
    delta[100] = 1.0
    for r in (7500.0, 15000.0):
        s_pix, _ = lsf_sigma_pixels(
            default_emu, wave, resolution=r, emulator_resolution=1e12
        )
        hw = int(np.ceil(5 * s_pix.max()))
        out = convolve_segments(
            jnp.asarray(delta), jnp.asarray(gaussian_kernels(s_pix[:n], hw)), ((0, n),)
        )
        # FWHM in ln(lambda) = 1/R, i.e. lambda/R in wavelength
        assert fwhm(np.asarray(out)) * step == pytest.approx(1.0 / r, rel=2e-3)
    line = np.exp(-0.5 * ((np.arange(n) - 100) * step * 22500.0 * FWHM_PER_SIGMA) ** 2)
    s_pix, _ = lsf_sigma_pixels(default_emu, wave, resolution=7500.0)
    out = convolve_segments(
        jnp.asarray(line), jnp.asarray(gaussian_kernels(s_pix[:n], half)), ((0, n),)
    )
    assert fwhm(np.asarray(out)) * step == pytest.approx(1.0 / 7500.0, rel=2e-3)


def test_resolution_forms_agree_and_bad_inputs(default_emu):
    """R as a number, as a callable of wavelength, per observed pixel, and the
    equivalent lsf_sigma [A] give the same model; sharpening is refused."""
    wave_obs = np.linspace(15500.0, 16500.0, 3000)
    p = jnp.asarray([0.1, -0.1, 0.0, 0.05, 0.2, 12.0])
    ref = build_obs_model(default_emu, wavelength=wave_obs, resolution=7500.0)
    f_ref = np.asarray(observe(ref, p)[0])
    # lsf_sigma: sigma_t [A] = lambda / (R FWHM_PER_SIGMA) per observed pixel
    forms = (
        dict(resolution=lambda lam: np.full_like(lam, 7500.0)),
        dict(resolution=np.full(wave_obs.size, 7500.0)),
        dict(lsf_sigma=wave_obs / (7500.0 * FWHM_PER_SIGMA)),
    )
    for kw in forms:
        obs = build_obs_model(default_emu, wavelength=wave_obs, **kw)
        np.testing.assert_allclose(observe(obs, p)[0], f_ref, atol=2e-5)
    # R(lambda) varying: its sigma follows
    sig, _ = lsf_sigma_pixels(
        default_emu, wave_obs, resolution=lambda lam: 5000.0 + 0.2 * (lam - 15000.0)
    )
    assert sig[0] > sig[-1] > 0
    with pytest.raises(ValueError, match="cannot be sharpened"):
        build_obs_model(default_emu, wavelength=wave_obs, resolution=30000.0)
    with pytest.raises(ValueError, match="not both"):
        build_obs_model(default_emu, resolution=7500.0, lsf_sigma=1.0)
    with pytest.raises(ValueError, match="one R per observed pixel"):
        build_obs_model(default_emu, wavelength=wave_obs, resolution=np.ones(7))


def test_convolution_does_not_cross_chip_gaps():
    """A segment's convolution sees only its own pixels (ends held)."""
    flux = jnp.concatenate([jnp.ones(50), jnp.zeros(50)])
    w = gaussian_kernel(4.0, 20)
    out = np.asarray(convolve_segments(flux, w, ((0, 50), (50, 50))))
    np.testing.assert_allclose(out, np.asarray(flux), atol=1e-6)
    joined = np.asarray(convolve_segments(flux, w, ((0, 100),)))
    assert joined[49] < 0.6 and joined[50] > 0.4


# --- the fast path with broadening off ----------------------------------------------------
def test_fast_path_used_and_unchanged_when_broadening_is_off(monkeypatch):
    """Without broadening the fitter still takes ``normal_equations`` (JetNet) and
    the model is the old one; with it, ``obs.jet`` is None and the Jacobian comes
    from jax.jacfwd, which at vsini = 0 (the identity kernel) and no LSF equals the
    analytic Jacobian of the plain model."""
    emu = log_emulator()
    plain = build_obs_model(emu)
    assert plain.jet is not None and plain.broad is None and plain.lsf is None
    same = build_obs_model(emu, resolution=22500.0)  # the emulator's own R: no LSF
    assert same.jet is not None and same.broad is None
    rot = build_obs_model(emu, broadening=("vsini",))
    assert rot.jet is None and rot.broad is not None

    calls = []
    original = lm_mod.normal_equations

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(lm_mod, "normal_equations", counted)
    p = jnp.asarray([0.1, -0.2, 0.3, 17.0])
    flux, sw = jnp.ones(emu.n_pix), jnp.full(emu.n_pix, 10.0)
    from payne_lite.observe import embed_obs

    jax.make_jaxpr(
        lambda: lm_mod._normal(plain, p, embed_obs(plain, flux), embed_obs(plain, sw))
    )()
    assert len(calls) == 1
    jax.make_jaxpr(lambda: lm_mod._normal(rot, jnp.append(p, 0.0), flux, sw))()
    assert len(calls) == 1  # the general path

    f0, v0, j0 = observe_jac_t(plain, p)
    f1, v1, j1 = observe_jac_t(rot, jnp.append(p, 0.0))
    # valid: the plain model's pixels whose interpolation taps all read rest pixels
    # whose kernels stay in their chip (rv 17 km/s reads rest pixels j + k + o for
    # the tap offsets o)
    from payne_lite.observe import TAP_OFFSETS, complete_rest

    step = np.log(emu.wavelength[1] / emu.wavelength[0])
    k = int(np.floor(-np.arctanh(17.0 / C_KMS) / step))
    c = complete_rest(rot)
    idx = np.arange(emu.n_pix)
    offs = TAP_OFFSETS[rot.interp]
    inside = (idx + k + offs[0] >= 0) & (idx + k + offs[-1] < emu.n_pix)
    reads = np.zeros(emu.n_pix, bool)
    reads[inside] = np.all([c[idx[inside] + k + o] for o in offs], axis=0)
    np.testing.assert_array_equal(np.asarray(v1), np.asarray(v0) & reads)
    assert np.asarray(v1).sum() > 100
    np.testing.assert_allclose(f1, f0, atol=2e-6)
    np.testing.assert_allclose(j1[:4], j0, atol=2e-4 * float(jnp.abs(j0).max()))
    np.testing.assert_allclose(j1[4], 0.0, atol=1e-6)  # d/dvsini at 0: second order


def test_fit_without_new_options_takes_the_fast_path(monkeypatch):
    """``fit`` traces ``normal_equations`` with broadening off and not with it on
    (a pixel count no other test uses, so that both compile here)."""
    emu = log_emulator(n_pix=283, seed=4)
    calls = []
    original = lm_mod.normal_equations

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(lm_mod, "normal_equations", counted)
    s = np.array([0.1, -0.1, 0.2])
    f = emu.predict(emu.unscale(s)).astype(np.float64)
    t = fit(f, np.full_like(f, 1e-3), emu, rv_range=(-50, 50))
    assert len(calls) >= 1
    np.testing.assert_allclose(scaled(emu, t)[0], s, atol=1e-3)
    n = len(calls)
    t = fit(f, np.full_like(f, 1e-3), emu, rv_range=(-50, 50), fixed={"vsini": 0.0})
    assert len(calls) == n
    np.testing.assert_allclose(scaled(emu, t)[0], s, atol=1e-3)
    assert t["vsini"][0] == 0.0 and t["vsini"].unit == "km / s"


# --- resolution in the fit --------------------------------------------------------------
def test_fit_at_lower_resolution_on_a_coarser_grid(default_emu):
    """Emulator spectra degraded (by SciPy) to R = 7500 and interpolated onto 3000
    pixels over 15500-16500 A (the emulator: 8366 pixels, 15100-16950 A, R = 22,500)
    are fitted back with resolution=7500: 8 noise-free ones to 1e-3 of the box; 24
    at S/N 100 with errors that describe the scatter: over the 144 label and rv
    errors in units of sigma, >= 90 % within 2 sigma, none beyond 4.5, rms within
    [0.8, 1.25]. Without the resolution the model misses the spectra. The spectra
    are the emulator's own, so they carry no emulator error: ``emulator_error=False``
    (with it, the default's correlated error term widens the errors by ~25 % here,
    rms 0.79, as it should for spectra that do carry it)."""
    rng = np.random.default_rng(7)
    wave_obs = np.linspace(15500.0, 16500.0, 3000)
    n_free, n = 8, 24
    s_true = rng.uniform(-0.35, 0.35, (n, default_emu.n_labels))
    rv_true = rng.uniform(-60.0, 60.0, n)
    rest = default_emu.predict(default_emu.unscale(s_true)).astype(np.float64)
    wave = default_emu.wavelength
    flux = np.empty((n, wave_obs.size))
    for i in range(n):
        deg = degrade_reference(wave, rest[i], 7500.0, 22500.0)
        f = np.sqrt((1 + rv_true[i] / C_KMS) / (1 - rv_true[i] / C_KMS))
        flux[i] = doppler_interp(wave_obs / f, wave, deg)  # the fitter's interpolant
    noisy = flux + 0.01 * rng.standard_normal(flux.shape)
    both = np.concatenate([flux[:n_free], noisy])
    err = np.concatenate(
        [np.full((n_free, wave_obs.size), 1e-4), np.full_like(flux, 0.01)]
    )
    t = fit(
        both, err, default_emu, wavelength=wave_obs,
        instrument=Instrument(resolution=7500.0), emulator_error=False,
    )  # fmt: skip
    assert t.meta["emulator_resolution"] == 22500.0
    assert np.all(t["converged"])
    s_fit = scaled(default_emu, t)
    print(
        "noise-free |scaled error| max", np.abs(s_fit[:n_free] - s_true[:n_free]).max()
    )
    np.testing.assert_allclose(s_fit[:n_free], s_true[:n_free], atol=1e-3)
    np.testing.assert_allclose(t["rv"][:n_free], rv_true[:n_free], atol=0.05)
    names = (*default_emu.label_names, "rv")
    truth_phys = np.column_stack([default_emu.unscale(s_true), rv_true])
    z = np.column_stack(
        [
            (t[c][n_free:] - truth_phys[:, j]) / t[f"{c}_err"][n_free:]
            for j, c in enumerate(names)
        ]
    )
    within = np.mean(np.abs(z) < 2)
    rms = np.sqrt(np.mean(z**2))
    print("S/N 100: |z| max", np.abs(z).max(), "within 2 sigma", within, "rms", rms)
    assert within >= 0.9 and np.all(np.abs(z) < 4.5) and 0.8 < rms < 1.25
    # the noise-free spectra are far from the emulator's own resolution: the model
    # without the LSF misses them by ~100x their 1e-4 errors
    obs = build_obs_model(default_emu, wavelength=wave_obs)
    p0 = jnp.asarray(np.r_[s_true[0], rv_true[0]])
    assert np.max(np.abs(np.asarray(observe(obs, p0)[0]) - flux[0])) > 0.01


# --- rotation in the fit (the real APOGEE network) -----------------------------------------
def test_vsini_recovered_with_the_real_apogee_network(payne5):
    """vsini = 0, 10, 30 km/s (Gray profile, epsilon 0.6, made by NumPy/SciPy on a
    10x finer grid) recovered at S/N 100 to 1.5 km/s, noise-free to 0.1 km/s (vsini 0:
    to the precision the data allow, see below), with
    the other labels free except the network's vmacro label, which is held at its
    true value (it broadens the lines too and is degenerate with vsini). The
    network's resolution is not in its file: the default, APOGEE's 22,500, is
    used (no LSF on its own grid)."""
    emu = payne5
    wave = emu.wavelength
    truth = np.array([5500.0, 4.4, -0.1, 0.05, 8.0])
    rest = emu.predict(truth).astype(np.float64)
    rng = np.random.default_rng(3)
    vs = np.array([0.0, 10.0, 30.0])
    flux = np.array([rotate_reference(wave, rest, v) for v in vs])
    noisy = flux + 0.01 * rng.standard_normal(flux.shape)
    both = np.concatenate([flux, noisy])
    err = np.concatenate([np.full_like(flux, 1e-4), np.full_like(flux, 0.01)])
    t = fit(
        both, err, emu, wavelength=wave, instrument=Instrument(vsini=True),
        fixed={"vmacro": 8.0},
    )  # fmt: skip
    print("vsini noise-free", list(t["vsini"][:3]), "S/N 100", list(t["vsini"][3:]))
    print("vsini_err", list(t["vsini_err"]))
    assert t["vsini"].unit == "km / s" and t["vsini_err"].unit == "km / s"
    assert "vsini" in t.meta["cov_params"]
    np.testing.assert_allclose(t["vsini"][1:3], vs[1:], atol=0.1)

    # At vsini = 0 the rotation changes the flux as vsini^2 and chi2 as vsini^4: with
    # errors of 1e-4, chi2 rises by 3.6 at 0.2 km/s and by 0.36 at 0.11 (measured),
    # so the data tell 0 from 0.11 by less than 1 sigma, and float32 chi2 is noisy at
    # the 0.2 level there. Asked of the fit: its chi2 within 1 of the chi2 at
    # vsini = 0, and vsini below 0.2, which the data exclude (checked here).
    def chi2_at(v):
        t1 = fit(
            flux[0], err[0], emu, wavelength=wave, fixed={"vsini": v, "vmacro": 8.0}
        )
        return float(t1["chi2"][0])

    chi2_0 = chi2_at(0.0)
    assert chi2_at(0.2) > chi2_0 + 1.0
    assert 0.0 <= t["vsini"][0] < 0.2
    assert t["chi2"][0] < chi2_0 + 1.0
    np.testing.assert_allclose(t["vsini"][3:], vs, atol=1.5)
    # errors from the covariance where vsini is measurable, a few 0.1 km/s
    assert np.all((t["vsini_err"][4:] > 0.02) & (t["vsini_err"][4:] < 1.0))
    assert np.all(np.abs(t["Teff"][3:] - truth[0]) < 4 * np.asarray(t["Teff_err"][3:]))
    # held: the column holds the value, and the error is 0
    t2 = fit(
        noisy[1], err[4], emu, wavelength=wave, fixed={"vsini": 10.0, "vmacro": 8.0}
    )
    assert t2["vsini"][0] == 10.0 and t2["vsini_err"][0] == 0.0
    with pytest.raises(ValueError, match="already has a label named 'vmacro'"):
        fit(noisy[1], err[4], emu, wavelength=wave, instrument=Instrument(vmacro=True))
    with pytest.raises(ValueError, match="vsini = 500 km/s is outside"):
        fit(noisy[1], err[4], emu, wavelength=wave, fixed={"vsini": 500.0})


# --- per-star grids -----------------------------------------------------------------------
def test_per_star_grids_match_separate_fits_and_share_one_compilation(
    default_emu, monkeypatch
):
    """Three stars on three grids of one shape (2345 pixels: two linear grids over
    different ranges, one NaN-padded at its red end) in one call give the answers of
    three separate calls; the three grids share the compiled LM (traced at most
    twice: its two batch programs; 2345 pixels is a shape no other test uses) and
    the joint call compiles nothing new; a grid
    off the emulator's range is refused naming the row."""
    rng = np.random.default_rng(5)
    p = 2345
    grids = np.stack(
        [
            np.linspace(15300.0, 16000.0, p),
            np.linspace(15900.0, 16800.0, p),
            np.linspace(15400.0, 16600.0, p),
        ]
    )
    grids[2, 2000:] = np.nan
    s_true = rng.uniform(-0.3, 0.3, (3, default_emu.n_labels))
    rv_true = np.array([12.0, -30.0, 45.0])
    rest = default_emu.predict(default_emu.unscale(s_true)).astype(np.float64)
    flux = np.empty((3, p))
    for i in range(3):
        f = np.sqrt((1 + rv_true[i] / C_KMS) / (1 - rv_true[i] / C_KMS))
        flux[i] = np.interp(grids[i] / f, default_emu.wavelength, rest[i])
    flux += 0.01 * rng.standard_normal(flux.shape)
    err = np.full_like(flux, 0.01)

    n_traces = 0
    original = lm_mod._lm_lanes

    def counted(*args):
        nonlocal n_traces
        n_traces += 1
        return original(*args)

    monkeypatch.setattr(lm_mod, "_lm_lanes", counted)
    # compiled programs from earlier tests (or a rerun) would hide the first trace
    jax.clear_caches()
    sep = [fit(flux[i], err[i], default_emu, wavelength=grids[i]) for i in range(3)]
    first = n_traces
    t = fit(flux, err, default_emu, wavelength=grids)
    print("LM traces: three separate grids", first, "then the joint call", n_traces)
    # at most two LM programs (best start; the other starts of doubtful fits) for
    # all three grids, and none new for the joint call
    assert 1 <= first <= 2, first
    assert n_traces == first, (first, n_traces)
    assert list(t["grid_group"]) == [0, 2, 1]  # np.unique's order of the grids
    for i in range(3):
        for name in (*default_emu.label_names, "rv", "chi2"):
            np.testing.assert_allclose(t[name][i], sep[i][name][0], rtol=1e-6)
    assert t["n_good_pixels"][2] == 2000
    np.testing.assert_allclose(t["rv"], rv_true, atol=1.0)

    bad = grids.copy()
    bad[1] = np.linspace(5000.0, 6000.0, p)
    with pytest.raises(ValueError, match="wavelength row 1: grid .* does not overlap"):
        fit(flux, err, default_emu, wavelength=bad)
    with pytest.raises(ValueError, match="does not overlap"):
        fit(flux[1], err[1], default_emu, wavelength=bad[1])


# --- chip ends (issue 17, part 6) ------------------------------------------------------
def test_chip_end_pixels_carry_no_weight():
    """A broadened pixel within a kernel's reach of a chip end or gap is not the model
    (convolve_segments holds the end pixel): those observed pixels get zero weight, so
    corrupting them moves no label, on the emulator's own grid and on another one."""
    from payne_lite.observe import complete_rest, kernel_reach, shift_pair, window_valid

    emu = log_emulator()
    inst = Instrument(resolution=15000.0, vsini=True)
    wave = emu.wavelength
    obs = build_obs_model(
        emu, wavelength=wave, resolution=15000.0, broadening=("vsini",)
    )
    k = kernel_reach(obs)
    lsf_half = (obs.lsf.shape[0] - 1) // 2
    assert k == obs.broad.vel_half + lsf_half and k > 5
    ok = complete_rest(obs)
    segs = obs.broad.segments
    assert segs == ((0, 120), (120, 180)) and ok.sum() == 300 - 4 * k
    assert not ok[:k].any() and ok[k] and not ok[120 - k : 120 + k].any()
    rng = np.random.default_rng(5)
    truth = np.array([[5200.0, 3.0, -0.4, 0.0, 12.0]])
    clean_rest = np.asarray(
        observe(obs, jnp.asarray(np.r_[emu.scale(truth[:, :3])[0], 8.0, 12.0]))[0]
    )
    flux = clean_rest + 0.002 * rng.standard_normal(clean_rest.shape)
    err = np.full_like(flux, 0.002)
    # observed pixels that read an incomplete rest pixel at every rv of the range
    # (+-50 km/s is 12.1 pixels of 4.14 km/s): within k - 14 pixels of a chip end.
    # Before, only the last ~13 were left out: these were fitted with the held end
    # value.
    near = np.zeros(wave.size, bool)
    for a, n in segs:
        lo, hi = emu.wavelength[a], emu.wavelength[a + n - 1]
        step = np.log(emu.wavelength[1] / emu.wavelength[0])
        near |= np.abs(np.log(wave / lo)) < (k - 14) * step
        near |= np.abs(np.log(wave / hi)) < (k - 14) * step
    bad = flux.copy()
    bad[near] = 3.0  # a cosmic ray in each
    kw = dict(wavelength=wave, instrument=inst, rv_range=(-50.0, 50.0), fixed={})
    t_clean = fit(flux, err, emu, **kw)
    t_bad = fit(bad, err, emu, **kw)
    for c in ("Teff", "logg", "[Fe/H]", "rv", "vsini", "chi2"):
        np.testing.assert_array_equal(t_bad[c], t_clean[c], err_msg=c)
    assert t_clean["n_good_pixels"][0] <= wave.size - near.sum()
    assert abs(t_clean["vsini"][0] - 12.0) < 3 * t_clean["vsini_err"][0] + 0.5
    # off the emulator's grid (interpolation in lambda): the same pixels are left out
    wave2 = emu.wavelength[3:-3] * (1 + 1e-6)
    obs2 = build_obs_model(
        emu, wavelength=wave2, resolution=15000.0, broadening=("vsini",)
    )
    assert obs2.log_grid is None
    near2 = near[3:-3]
    for rv in np.linspace(-50.0, 50.0, 9):
        valid = np.asarray(shift_pair(obs2, jnp.zeros((1, 300)), jnp.asarray(rv))[-1])
        assert not valid[near2].any(), rv
    v2 = np.asarray(window_valid(obs2, jnp.asarray(-50.0), jnp.asarray(50.0)))
    assert not v2[near2].any() and v2.sum() > 50
