"""Continuum normalisation (:mod:`payne_lite.observe` normalisers).

References: a continuum put in by hand (per-chip polynomials, recovered exactly), the
hand-worked error of a constant continuum fitted to N pixels (``var(c) = sigma^2 /
N``), the real network's spectra times a known continuum, and the two real DR13 stars'
``aspcapStar`` files (ASPCAP's own normalisation of the same spectra).
"""

from __future__ import annotations

import numpy as np
import pytest

import payne_lite as pl
from payne_lite.catalog import read_apogee_fits
from payne_lite.observe import APOGEE_CHIPS, normalizer


@pytest.fixture(scope="module")
def norm():
    return pl.ContinuumPixels.apogee()


def _chip_continuum(wave, rng, amplitude):
    """A random quadratic continuum per APOGEE chip (a random overall level times
    a shape whose max / min across the chip is 1.03 to ``1 + amplitude``)."""
    cont = np.ones_like(wave)
    for lo, hi in APOGEE_CHIPS:
        s = (wave >= lo) & (wave < hi)
        t = (wave[s] - lo) / (hi - lo)
        q = np.polynomial.polynomial.polyval(t, rng.uniform(-1, 1, 3))
        q = (q - q.min()) / (q.max() - q.min())
        cont[s] = rng.uniform(50, 500) * (1 + rng.uniform(0.03, amplitude) * q)
    return cont


def test_a_per_chip_polynomial_continuum_is_divided_out_exactly(payne_data, norm):
    """Flux 1 on the continuum pixels (lines elsewhere) times a quadratic per chip:
    the continuum comes back to rounding and the lines are untouched."""
    rng = np.random.default_rng(3)
    wave = payne_data.wavelength
    cp = payne_data.continuum_pixels
    assert np.array_equal(norm.pixels(wave), cp)
    shape = np.where(cp, 1.0, rng.uniform(0.3, 1.0, wave.size))
    cont = np.stack([_chip_continuum(wave, rng, 1.0) for _ in range(3)])
    err = 0.01 * cont
    out = norm(wave, shape * cont, err)
    np.testing.assert_allclose(out.continuum, cont, rtol=1e-9)
    np.testing.assert_allclose(out.flux, np.broadcast_to(shape, cont.shape), rtol=1e-9)
    assert not out.mask.any()
    # errors: divided by the continuum, plus the continuum's own (small) variance
    assert np.all(out.flux_err >= 0.01 * (1 - 1e-12))
    assert np.median(out.flux_err) < 0.0101 and out.flux_err.max() < 0.0115


def test_the_error_of_a_constant_continuum_is_sigma_over_sqrt_n():
    """deg 0 through N continuum pixels of equal error sigma: c is their mean, with
    variance sigma^2 / N, so a pixel of flux f gets
    sqrt((sigma / c)^2 + (f / c)^2 sigma^2 / (N c^2))."""
    wave = np.linspace(15200.0, 15300.0, 200)
    is_cont = np.zeros(200, bool)
    is_cont[::4] = True  # N = 50
    flux = np.where(is_cont, 100.0, 60.0)
    flux[::4][::2] = 102.0  # continuum mean = 101
    n = pl.ContinuumPixels(wavelength=wave[is_cont], deg=0)
    out = n(wave, flux, np.full(200, 2.0))
    c, var_c = 101.0, 2.0**2 / 50
    np.testing.assert_allclose(out.continuum, c, rtol=1e-12)
    expect = np.sqrt((2.0 / c) ** 2 + (flux / c) ** 2 * var_c / c**2)
    np.testing.assert_allclose(out.flux_err, expect, rtol=1e-12)


def test_bad_pixels_are_left_out_and_masked_never_nan(payne_data, norm):
    """A masked continuum pixel with a wild value, a NaN flux, a zero and an inf
    error: the continuum is that of the good pixels, and the bad ones come out
    masked with flux 1 and infinite error (zero weight), no NaN."""
    rng = np.random.default_rng(4)
    wave = payne_data.wavelength
    cont = _chip_continuum(wave, rng, 0.5)
    flux = cont.copy()
    err = 0.01 * cont
    c_idx = np.flatnonzero(payne_data.continuum_pixels)
    mask = np.zeros(wave.size, bool)
    flux[c_idx[5]] = 1e6
    mask[c_idx[5]] = True
    flux[c_idx[6]] = np.nan
    err[c_idx[7]] = 0.0
    err[c_idx[8]] = np.inf
    flux_in, err_in = flux.copy(), err.copy()
    out = norm(wave, flux, err, mask)
    np.testing.assert_array_equal(flux, flux_in)  # inputs not mutated
    np.testing.assert_array_equal(err, err_in)
    bad = c_idx[5:9]
    assert np.array_equal(np.flatnonzero(out.mask), bad)
    assert np.all(out.flux[bad] == 1.0) and np.all(np.isinf(out.flux_err[bad]))
    assert np.isfinite(out.flux).all()
    good = ~out.mask
    np.testing.assert_allclose(out.continuum[good], cont[good], rtol=1e-9)


def test_a_chip_without_enough_pixels_is_masked_not_guessed(payne_data, norm):
    wave = payne_data.wavelength
    flux = np.ones(wave.size)
    err = np.full(wave.size, 0.01)
    blue = wave < APOGEE_CHIPS[0][1]
    out = norm(wave, flux, err, mask=blue)  # every blue pixel bad
    assert out.mask[blue].all() and not out.mask[~blue].any()
    assert np.isfinite(out.flux).all()


def test_sigma_clipped_finds_the_continuum_of_the_real_network(payne_apogee):
    """The real network's spectra (normalised, so about 1 at the continuum) times a
    continuum up to a factor 2 across a chip at S/N 100: the data-driven fit, with
    no pixel list, gives back the network's flux to within a few per cent on The
    Cannon's continuum pixels and the network's own spectrum to 3 % overall."""
    emu, _ = payne_apogee
    d = pl.datasets.payne_apogee()
    rng = np.random.default_rng(5)
    labels = np.array([[5000.0, 4.5, 0.0, 0.1, 5.0], [6200.0, 4.2, -0.5, 0.2, 8.0]])
    model = np.asarray(emu.predict(labels), np.float64)
    wave = d.wavelength
    cont = np.stack([_chip_continuum(wave, rng, 1.0) for _ in labels])
    err = cont * 0.01
    flux = model * cont + err * rng.standard_normal(cont.shape)
    out = pl.SigmaClipped()(wave, flux, err)
    assert not out.mask.any()
    ratio = out.flux / model
    cp = d.continuum_pixels
    assert np.all(np.abs(np.median(ratio[:, cp], axis=1) - 1) < 0.03)
    assert np.all(np.abs(np.median(ratio, axis=1) - 1) < 0.03)


def test_real_apstar_against_aspcapstar(norm):
    """Both real stars: our normalisation of the apStar combined spectrum against
    ASPCAP's normalised flux (aspcapStar), on The Cannon's continuum pixels, per
    chip. Measured (DR13 r6): medians 1.024-1.072 (ASPCAP's continuum of these
    cool M dwarfs sits a few per cent higher, its own choice), robust spreads
    0.007-0.013; the tolerances leave room for neither more than 10 % nor 2 %."""
    for star in pl.datasets.apogee_raw().stars:
        a = read_apogee_fits(star.apstar)
        b = read_apogee_fits(star.aspcapstar)
        np.testing.assert_array_equal(a.wavelength, b.wavelength)
        out = norm(a.wavelength, a.flux, a.flux_err, a.mask)
        cp = norm.pixels(a.wavelength)
        for lo, hi in APOGEE_CHIPS:
            s = cp & (a.wavelength >= lo) & (a.wavelength < hi) & ~out.mask
            s &= b.flux > 0  # ASPCAP's own bad pixels are zero
            assert s.sum() > 90
            q16, q50, q84 = np.percentile(out.flux[s] / b.flux[s], [16, 50, 84])
            assert abs(q50 - 1) < 0.10, (star.star, lo, q50)
            assert (q84 - q16) / 2 < 0.02, (star.star, lo, q84 - q16)


def test_no_normalization_keeps_the_flux_and_masks_bad_pixels():
    wave = np.linspace(15200.0, 15300.0, 10)
    flux = np.linspace(0.5, 1.0, 10)
    err = np.full(10, 0.01)
    err[3] = -1.0
    out = pl.NoNormalization()(wave, flux, err)
    np.testing.assert_array_equal(out.flux[out.mask == 0], flux[np.arange(10) != 3])
    assert np.flatnonzero(out.mask).tolist() == [3] and out.flux[3] == 1.0
    assert pl.NoNormalization().to_meta() == {"method": "none"}


def test_chips_split_at_runs_of_bad_pixels_without_a_chip_list():
    """``chips=None``: an apStar-like grid with a run of zero-flux, huge-error
    pixels in the middle is two chips, each with its own continuum."""
    wave = 10 ** (4.179 + 6e-6 * np.arange(400))
    flux = np.where(np.arange(400) < 200, 10.0, 30.0)
    err = np.ones(400)
    flux[190:230] = 0.0
    err[190:230] = 0.0
    out = pl.ContinuumPixels(wavelength=wave[::3], deg=1)(wave, flux, err)
    assert out.mask[190:230].all() and not out.mask[:190].any()
    np.testing.assert_allclose(out.flux[~out.mask], 1.0, rtol=1e-12)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: normalizer("spline"), "unknown continuum normalisation 'spline'"),
        (lambda: normalizer(3), "continuum must be a name"),
        (lambda: pl.ContinuumPixels(wavelength=[]), "non-empty array"),
        (lambda: pl.ContinuumPixels(wavelength=[1.0], deg=2.5), "deg must be"),
        (lambda: pl.SigmaClipped(chips=[(5.0, 1.0)]), "0 < lo < hi"),
        (lambda: pl.SigmaClipped(lower=0), "lower must be a positive"),
        (
            lambda: pl.NoNormalization()(np.arange(1.0, 4.0), np.ones(4), np.ones(4)),
            r"wavelength \(3,\) must be",
        ),
        (
            lambda: pl.NoNormalization()(np.arange(1.0, 5.0), np.ones(4), np.ones(3)),
            r"flux_err \(1, 3\) must have the shape",
        ),
    ],
)
def test_bad_settings_and_inputs_are_refused(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_refine_continuum_recovers_the_fit_of_perfectly_normalised_spectra(
    payne_apogee,
):
    """Mocks of the real network at S/N 50, fitted as they are (the reference) and
    times a continuum (up to 2x across a chip) normalised through The Cannon's
    pixels: with ``refine_continuum=2`` the labels land on the reference fit's
    (same noise draws), closer than without; the input arrays are left alone."""
    emu, mask = payne_apogee
    d = pl.datasets.payne_apogee()
    rng = np.random.default_rng(8)
    lo, hi = emu.bounds
    labels = lo + (hi - lo) * rng.uniform(0.25, 0.75, (6, lo.size))
    err = np.full((6, d.wavelength.size), 0.02)
    flux = np.asarray(emu.predict(labels), np.float64)
    flux = flux + err * rng.standard_normal(flux.shape)
    cont = np.stack([_chip_continuum(d.wavelength, rng, 1.0) for _ in labels])
    normed = pl.ContinuumPixels.apogee()(d.wavelength, flux * cont, err * cont)
    f_in, e_in = normed.flux.copy(), normed.flux_err.copy()
    names = list(emu.label_names)
    kw = {"mask": mask, "return_model": True}  # one compilation for all fits
    ref = pl.fit(flux, err, emu, **kw)
    plain = pl.fit(normed.flux, normed.flux_err, emu, **kw)
    refined = pl.fit(
        normed.flux, normed.flux_err, emu,
        options=pl.LMOptions(refine_continuum=2), **kw,
    )  # fmt: skip
    np.testing.assert_array_equal(normed.flux, f_in)
    np.testing.assert_array_equal(normed.flux_err, e_in)
    assert refined.meta["continuum_refined"] == {"passes": 2, "deg": 2}

    def dist(t):  # |fit - reference fit| in units of the reference's errors
        return np.median(
            [np.abs(np.asarray(t[k]) - ref[k]) / ref[f"{k}_err"] for k in names]
        )

    assert dist(refined) < 0.25 < dist(plain), (dist(refined), dist(plain))
    with pytest.raises(ValueError, match="refine_continuum must be"):
        pl.LMOptions(refine_continuum=-1)
    with pytest.raises(ValueError, match="refine_continuum must be <= 10"):
        pl.CurveFitOptions(refine_continuum=11)
    with pytest.raises(ValueError, match="refine_deg"):
        pl.LMOptions(refine_continuum=2, refine_deg=-1)
