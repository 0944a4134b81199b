"""A continuum per chip in the fit (:class:`payne_lite.ChipPolynomial`).

References: the block-diagonal design matrix written out by hand from numpy's
Chebyshev polynomials; the real network's spectra times a known per-chip quadratic
continuum (recovered, and the labels on the fit of the same spectra without a
continuum); the profiled path against the one that fits the coefficients as LM
parameters (the same minimum).
"""

from __future__ import annotations

import numpy as np
import pytest

import payne_lite as pl
from payne_lite.observe import APOGEE_CHIPS, build_obs_model, param_layout


def test_the_basis_is_one_chebyshev_polynomial_per_chip():
    wave = np.concatenate(
        [np.linspace(15090.0, 15800.0, 40), np.linspace(15900.0, 16400.0, 30)]
    )
    wave = np.concatenate([wave, np.linspace(16500.0, 17010.0, 20)])
    cont = pl.ChipPolynomial.apogee(2)
    assert (cont.n_chips, cont.n_cont) == (3, 9)
    assert cont.names[:4] == ("cont_0_0", "cont_0_1", "cont_0_2", "cont_1_0")
    np.testing.assert_array_equal(cont.flat(), [1, 0, 0, 1, 0, 0, 1, 0, 0])
    basis = cont.basis(wave)
    # pixels outside every chip (15090, 17010 A) go to the nearest one
    chip = np.repeat([0, 1, 2], [40, 30, 20])
    np.testing.assert_array_equal(cont.chip_of(wave), chip)
    for j in range(3):
        w = wave[chip == j]
        x = 2 * (w - w[0]) / (w[-1] - w[0]) - 1
        want = np.polynomial.chebyshev.chebvander(x, 2)
        np.testing.assert_allclose(basis[chip == j, 3 * j : 3 * j + 3], want)
        others = np.delete(np.arange(9), np.arange(3 * j, 3 * j + 3))
        assert not basis[chip == j][:, others].any()
    assert pl.ChipPolynomial.from_meta(cont.to_meta()) == cont
    assert pl.ChipPolynomial.from_meta({"cont_deg": 2}) == pl.ChipPolynomial(2)
    assert pl.ChipPolynomial.from_meta({"cont_deg": 0}) is None
    # an int cont_deg is one polynomial over the whole grid, as before
    whole = pl.ChipPolynomial(3).basis(wave)
    x = 2 * (wave - wave[0]) / (wave[-1] - wave[0]) - 1
    np.testing.assert_allclose(whole, np.polynomial.chebyshev.chebvander(x, 3))


def test_the_model_and_layout_take_a_chip_polynomial(tiny_emulator):
    emu = tiny_emulator
    wave = np.asarray(emu.wavelength)
    mid = 0.5 * (wave[0] + wave[-1])
    cont = pl.ChipPolynomial(1, chips=((wave[0], mid), (mid, wave[-1] + 1)))
    obs = build_obs_model(emu, cont_deg=cont)
    layout = param_layout(emu, cont_deg=cont)
    assert obs.n_cont == 4 and obs.cont_deg == 1
    want = ("cont_0_0", "cont_0_1", "cont_1_0", "cont_1_1")
    assert layout.names[layout.cont_slice] == want
    np.testing.assert_allclose(np.asarray(obs.basis), cont.basis(wave), atol=1e-6)
    # a scale per chip: degree 0 with chips is a continuum, without it is refused
    assert build_obs_model(emu, cont_deg=pl.ChipPolynomial(0, cont.chips)).n_cont == 2


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: pl.ChipPolynomial(-1), "deg must be an int >= 0"),
        (lambda: pl.ChipPolynomial(2.0), "deg must be an int >= 0"),
        (lambda: pl.ChipPolynomial(0), "no continuum"),
        (lambda: pl.ChipPolynomial(2, ((2.0, 1.0),)), "finite lo < hi"),
        (lambda: pl.ChipPolynomial(2, ((1.0, 3.0), (2.0, 4.0))), "not overlap"),
        (lambda: pl.ChipPolynomial(2, "apogee"), "wavelength ranges"),
        (
            lambda: pl.ChipPolynomial(2, ((1.0, 2.0), (3.0, 4.0))).basis([5.0]),
            "none of the",
        ),
        (lambda: pl.observe.as_continuum(-2), "cont_deg must be >= 0"),
        (lambda: pl.observe.as_continuum("3"), "or a ChipPolynomial"),
    ],
)
def test_bad_chip_polynomials_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_chip_of_no_observed_pixel_is_refused(tiny_emulator):
    cont = pl.ChipPolynomial(2, ((1.0, 2.0), *APOGEE_CHIPS))
    with pytest.raises(ValueError, match="holds none of the observed pixels"):
        build_obs_model(tiny_emulator, cont_deg=cont)


@pytest.fixture(scope="module")
def raw_mocks(payne_apogee):
    """6 mocks of the real network at S/N 50 (noise as the normalised spectra's),
    and the same times a known quadratic per APOGEE chip: a level of 50 to 500 and
    a shape whose max / min across the chip is up to 2."""
    emu, mask = payne_apogee
    wave = np.asarray(emu.wavelength, np.float64)
    rng = np.random.default_rng(20)
    lo, hi = emu.bounds
    labels = lo + (hi - lo) * rng.uniform(0.25, 0.75, (6, lo.size))
    err = np.full((6, wave.size), 0.02)
    flux = np.asarray(emu.predict(labels), np.float64)
    flux = flux + err * rng.standard_normal(flux.shape)
    cont = np.ones_like(flux)
    for i in range(len(labels)):
        for a, b in APOGEE_CHIPS:
            s = (wave >= a) & (wave < b)
            t = (wave[s] - a) / (b - a)
            q = np.polynomial.polynomial.polyval(t, rng.uniform(-1, 1, 3))
            q = (q - q.min()) / (q.max() - q.min())
            cont[i, s] = rng.uniform(50, 500) * (1 + rng.uniform(0.03, 1.0) * q)
    return emu, mask, labels, flux, err, cont


def test_a_profiled_continuum_per_chip_fits_raw_flux_as_well_as_normalised(
    raw_mocks,
):
    """The raw flux fitted with the emulator times a profiled quadratic per chip: the
    continuum is recovered to 0.5 %, and the labels land near the fit of the same
    noise draws without any continuum (no normalisation step to bias them); the
    table records the continuum, and rebuilds the model from it alone."""
    emu, mask, labels, flux, err, cont = raw_mocks
    names = list(emu.label_names)
    spec = pl.ChipPolynomial.apogee(2)
    ref = pl.fit(flux, err, emu, mask=mask)
    raw = pl.fit(
        flux * cont, err * cont, emu, mask=mask, cont_deg=spec, return_model=True,
        options=pl.LMOptions(continuum="profile"),
    )  # fmt: skip
    assert not np.any(np.asarray(raw["flags"]) & 0b111)
    coef = np.stack([np.asarray(raw[c], np.float64) for c in spec.names], axis=1)
    fitted = coef @ spec.basis(emu.wavelength).T
    good = ~mask
    np.testing.assert_allclose(fitted[:, good], cont[:, good], rtol=5e-3)
    # the same noise draws: typically within a quarter of an error bar of the
    # reference fit, none beyond one, with errors hardly larger than without a
    # continuum (median ratio under 1.1, none over 1.15: nine parameters more)
    d = np.stack([np.abs(np.asarray(raw[k]) - ref[k]) / ref[f"{k}_err"] for k in names])
    assert np.median(d) < 0.25 and np.max(d) < 1.0, d
    ratio = np.stack([np.asarray(raw[f"{k}_err"]) / ref[f"{k}_err"] for k in names])
    assert np.median(ratio) < 1.1 and np.all((ratio > 0.95) & (ratio < 1.15)), ratio
    assert raw.meta["cont_deg"] == 2
    assert raw.meta["cont_chips"] == [list(c) for c in APOGEE_CHIPS]
    model, valid = pl.model_from_results(raw, emu)
    fitted = np.asarray(raw["model_flux"])
    np.testing.assert_array_equal(np.isnan(fitted), ~valid)  # NaN where undefined
    ok = good & valid
    np.testing.assert_allclose(model[ok], fitted[ok], rtol=1e-4)


def test_the_profiled_and_fitted_continua_per_chip_reach_the_same_minimum(raw_mocks):
    """``continuum="profile"`` (variable projection) and ``"fit"`` (the coefficients
    as LM parameters) minimise the same chi2: the same labels, continuum and
    errors at the optimum."""
    emu, mask, _, flux, err, cont = raw_mocks
    spec = pl.ChipPolynomial.apogee(2)
    kw = dict(mask=mask, cont_deg=spec)
    prof = pl.fit(
        flux[:3] * cont[:3], err[:3] * cont[:3], emu,
        options=pl.LMOptions(continuum="profile"), **kw,
    )  # fmt: skip
    lm = pl.fit(
        flux[:3] * cont[:3], err[:3] * cont[:3], emu,
        options=pl.LMOptions(continuum="fit"), **kw,
    )  # fmt: skip
    for k in emu.label_names:
        d = np.abs(np.asarray(prof[k]) - lm[k]) / lm[f"{k}_err"]
        assert np.max(d) < 0.02, (k, d)
        np.testing.assert_allclose(prof[f"{k}_err"], lm[f"{k}_err"], rtol=0.02)
    for c in spec.names:
        scale = float(np.max(np.abs(lm[spec.names[0]])))
        np.testing.assert_allclose(prof[c], lm[c], rtol=1e-3, atol=1e-3 * scale)
    np.testing.assert_allclose(prof["chi2"], lm["chi2"], rtol=1e-4)


def test_the_scan_solves_the_continuum_as_numpy_does():
    """The RV scan's unrolled Cholesky solve (no LAPACK call: two threads' batches
    calling jnp.linalg.solve at once hung) against numpy's, with its ridge."""
    from payne_lite.fitting._rvscan import _spd_solve

    rng = np.random.default_rng(3)
    a = rng.normal(size=(7, 5, 4, 6))
    m = a @ np.swapaxes(a, -1, -2)  # (7, 5, 4, 4), positive definite
    b = rng.normal(size=(7, 5, 4))
    ridge = 1e-7 * np.trace(m, axis1=-2, axis2=-1)[..., None, None] / 4 * np.eye(4)
    want = np.linalg.solve(m + ridge, b[..., None])[..., 0]
    got = np.stack([np.asarray(x) for x in _spd_solve(m, b)], axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
