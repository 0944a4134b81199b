"""pl.Instrument, the per-method options, and the bugs the old keyword flags caused.

Each ``test_bug_*`` reproduces one bug of the old call form (issue 14's list) through
the new objects; the model-from-results tests use the real APOGEE network, whose grid
is log-uniform (the broadening kernels need one).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import payne_lite as pl
from payne_lite.mdn import MDNConfig


# --- Instrument ---------------------------------------------------------------------
def test_instrument_validates_at_construction():
    with pytest.raises(ValueError, match="resolution or lsf_sigma, not both"):
        pl.Instrument(resolution=8000.0, lsf_sigma=0.3)
    with pytest.raises(ValueError, match="resolution must be finite and > 0"):
        pl.Instrument(resolution=-5.0)
    with pytest.raises(ValueError, match=r"limb_darkening must be in \[0, 1\]"):
        pl.Instrument(limb_darkening=1.5)
    with pytest.raises(ValueError, match="vsini must be True or False"):
        pl.Instrument(vsini="yes")
    with pytest.raises(ValueError, match="every finite value must be > 0"):
        pl.Instrument(lsf_sigma=np.array([0.2, 0.0, 0.3]))
    with pytest.raises(Exception, match="cannot assign|frozen"):
        pl.Instrument().air = True


def test_instrument_meta_round_trip():
    wave = np.linspace(15100.0, 16900.0, 50)
    for inst in (
        pl.Instrument(),
        pl.Instrument(air=True, resolution=8000.0, vsini=True, limb_darkening=0.4),
        pl.Instrument(lsf_sigma=np.linspace(0.2, 0.4, 50), vmacro=True),
        pl.Instrument(resolution=22_000.0, emulator_resolution=30_000.0),
    ):
        back = pl.Instrument.from_meta(inst.to_meta())
        for name in ("air", "vsini", "vmacro", "limb_darkening", "emulator_resolution"):
            assert getattr(back, name) == getattr(inst, name), name
        for name in ("resolution", "lsf_sigma"):
            np.testing.assert_array_equal(getattr(back, name), getattr(inst, name))
    # a callable resolution is recorded at the observed wavelengths
    inst = pl.Instrument(resolution=lambda w: w / 0.7)
    with pytest.raises(ValueError, match="callable resolution"):
        inst.to_meta()
    back = pl.Instrument.from_meta(inst.to_meta(wave))
    np.testing.assert_allclose(back.resolution, wave / 0.7)
    with pytest.raises(ValueError, match="version"):
        pl.Instrument.from_meta({"version": 99})


def test_instrument_broadening_names():
    emu_labels = type("E", (), {"label_names": ("Teff", "logg", "vmacro")})()
    inst = pl.Instrument(vsini=True)
    assert inst.broadening() == ("vsini",)
    # fixed switches a kernel on, unless the emulator has that label
    assert pl.Instrument().broadening({"vmacro": 5.0}) == ("vmacro",)
    assert pl.Instrument().broadening({"vmacro": 5.0}, emu_labels) == ()
    assert inst.broadening({"vmacro": 3.0}) == ("vsini", "vmacro")


# --- options -------------------------------------------------------------------------
def test_options_validate_and_belong_to_one_method(tiny_emulator):
    with pytest.raises(ValueError, match=r"LMOptions.max_iter must be an int >= 1"):
        pl.LMOptions(max_iter=0)
    with pytest.raises(ValueError, match="LMOptions.continuum must be one of"):
        pl.LMOptions(continuum="spline")
    with pytest.raises(ValueError, match="EmceeOptions.n_walkers must be even"):
        pl.EmceeOptions(n_walkers=7)
    with pytest.raises(ValueError, match="ISOptions.scale must be finite and > 0"):
        pl.ISOptions(scale=0.0)
    flux = tiny_emulator.predict(np.array([5000.0, 3.0, -0.5]))
    err = np.full_like(flux, 0.01)
    with pytest.raises(ValueError, match=r"CurveFitOptions is for method='curve_fit'"):
        pl.fit(flux, err, tiny_emulator, options=pl.CurveFitOptions())
    with pytest.raises(ValueError, match=r"method='nuts' takes payne_lite.NUTSOptions"):
        pl.sample(flux, err, tiny_emulator, method="nuts", options=pl.EmceeOptions())
    with pytest.raises(ValueError, match="return_model is a point-fit argument"):
        pl.fit(flux, err, tiny_emulator, method="emcee", return_model=True)


def test_entry_points_have_few_parameters():
    import inspect

    for f in (pl.fit, pl.sample, pl.log_posterior):
        params = inspect.signature(f).parameters.values()
        assert len(params) < 20, f.__name__
        assert not any(p.kind is p.VAR_KEYWORD for p in params), f.__name__


# --- the bugs of the old keyword flags ------------------------------------------------
def test_bug2_per_star_grids_keep_the_profiled_continuum(tiny_emulator):
    """Old: fit(..., wavelength=(n, P), cont_deg=1, continuum="profile") silently ran
    continuum="fit", and cont_deg=0 with "profile" was accepted there."""
    emu = tiny_emulator
    truth = np.array([[5000.0, 3.0, -0.5], [6000.0, 4.0, 0.0]])
    full = emu.predict(truth)
    # two grids of 45 of the emulator's 50 pixels (no resampling warning)
    flux = np.stack([full[0, :45], full[1, 3:48]])
    err = np.full_like(flux, 0.01)
    wave = np.stack([emu.wavelength[:45], emu.wavelength[3:48]])
    t = pl.fit(
        flux,
        err,
        emu,
        wavelength=wave,
        cont_deg=1,
        options=pl.LMOptions(continuum="profile"),
    )
    assert t.meta["continuum"] == "profile"
    assert t.meta["n_wavelength_grids"] == 2
    with pytest.raises(ValueError, match="needs a continuum to profile"):
        pl.fit(
            flux, err, emu, wavelength=wave, options=pl.LMOptions(continuum="profile")
        )


def test_bug3_sampler_options_belong_to_their_method(tiny_emulator):
    """Old: sample(method="emcee", n_chains=0) failed on a NUTS option, and
    sample(method="emcee", n_draws=10_000) ignored it but recorded it in the meta."""
    flux = tiny_emulator.predict(np.array([5000.0, 3.0, -0.5]))
    err = np.full_like(flux, 0.01)
    with pytest.raises(ValueError, match=r"ISOptions is for method='mdn-is'"):
        pl.sample(flux, err, tiny_emulator, method="emcee", options=pl.ISOptions())
    with pytest.raises(ValueError, match="NUTSOptions.n_chains must be an int >= 1"):
        pl.NUTSOptions(n_chains=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pl.SamplingWarning)
        t = pl.sample(
            flux,
            err,
            tiny_emulator,
            options=pl.EmceeOptions(n_walkers=16, n_steps=40, check_every=40),
        )
    assert t.meta["options"]["n_walkers"] == 16
    assert "n_draws" not in t.meta["options"] and "n_draws" not in t.meta
    # the same star as a specutils Spectrum (tests/test_spectra.py has the rest)
    specutils = pytest.importorskip("specutils")
    import astropy.units as u
    from astropy.nddata import StdDevUncertainty

    sp = specutils.Spectrum(
        flux=flux * u.one,
        spectral_axis=tiny_emulator.wavelength * u.AA,
        uncertainty=StdDevUncertainty(err),
        meta={"medium": "vacuum"},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pl.SamplingWarning)
        t_sp = pl.sample(
            sp,
            emulator=tiny_emulator,
            options=pl.EmceeOptions(n_walkers=16, n_steps=40, check_every=40),
        )
    assert t_sp.meta["input"]["kind"] == "specutils.Spectrum"
    for c in ("Teff", "Teff_p16", "Teff_p84", "rv", "rv_p84"):
        np.testing.assert_array_equal(t_sp[c], t[c])


@pytest.mark.parametrize("rv_range", [(-np.inf, np.inf), (100.0, -100.0), (0.0, 0.0)])
def test_bug4_rv_range_has_one_rule(tiny_emulator, rv_range):
    """Old: (-inf, inf) passed in the MDN and failed in fit."""
    flux = tiny_emulator.predict(np.array([5000.0, 3.0, -0.5]))
    err = np.full_like(flux, 0.01)
    match = r"rv_range must be \(lo, hi\) \[km/s\], finite, with lo < hi"
    with pytest.raises(ValueError, match=match):
        MDNConfig(rv_range=rv_range)
    with pytest.raises(ValueError, match=match):
        pl.fit(flux, err, tiny_emulator, rv_range=rv_range)
    with pytest.raises(ValueError, match=match):
        pl.sample(flux, err, tiny_emulator, rv_range=rv_range)


def test_bug5_fit_catalog_refuses_unknown_options_before_opening(
    tmp_path, tiny_emulator
):
    """Old: fit_catalog(..., cont_dge=1) raised a bare TypeError from inside the first
    chunk, after the catalog was opened. Now before: the catalog does not exist."""
    missing = tmp_path / "no_such_catalog.h5"
    with pytest.raises(TypeError, match=r"unknown fit option\(s\) \['cont_dge'\]"):
        pl.fit_catalog(missing, tmp_path / "out.fits", tiny_emulator, cont_dge=1)
    with pytest.raises(TypeError, match=r"\['max_iter'\].*LMOptions"):
        pl.fit_catalog(missing, tmp_path / "out.fits", tiny_emulator, max_iter=5)
    with pytest.raises(ValueError, match="EmceeOptions is for method='emcee'"):
        pl.fit_catalog(
            missing, tmp_path / "out.fits", tiny_emulator, options=pl.EmceeOptions()
        )
    assert not (tmp_path / "out.fits").exists()


# --- bug 1: the drawn model is the fitted model -----------------------------------
@pytest.fixture(scope="module")
def apogee_stars(payne_apogee):
    emu, mask = payne_apogee
    lo, hi = emu.label_lo, emu.label_hi
    truth = lo + np.array([[0.3], [0.6]]) * (hi - lo)  # two stars inside the box
    return emu, mask, truth


@pytest.mark.parametrize(
    "instrument, fixed",
    [(pl.Instrument(resolution=8000.0), None), (pl.Instrument(), {"vsini": 30.0})],
    ids=["resolution8000", "vsini30"],
)
def test_bug1_model_from_saved_results_is_the_fitted_model(
    apogee_stars, tmp_path, instrument, fixed
):
    """Old: payne-lite plot rebuilt the model without the instrument (off by 0.40 in
    flux for resolution=8000, 0.42 for vsini=30)."""
    emu, mask, truth = apogee_stars
    rng = np.random.default_rng(1)
    flux = emu.predict(truth)
    err = np.full_like(flux, 0.01)
    flux = flux + rng.normal(0.0, 0.01, flux.shape)
    t = pl.fit(
        flux,
        err,
        emu,
        mask=mask,
        instrument=instrument,
        fixed=fixed,
        rv_range=(-50.0, 50.0),
        return_model=True,
        options=pl.LMOptions(max_iter=20),
    )
    path = tmp_path / "res.fits"
    pl.write_results(t, path)
    back = pl.read_results(path)
    model, valid = pl.model_from_results(back, emu)
    fitted = np.asarray(t["model_flux"], np.float64)
    ok = valid & np.isfinite(fitted)
    assert ok.mean() > 0.9
    np.testing.assert_allclose(model[ok], fitted[ok], atol=1e-5, rtol=0)
    # without the instrument (the old behaviour) the model is visibly different
    plain = back.copy()
    plain.meta["instrument"] = pl.Instrument().to_meta()
    if fixed:
        plain.remove_columns(["vsini", "vsini_err"])
    old, _ = pl.model_from_results(plain, emu)
    assert np.nanmax(np.abs(old[ok] - fitted[ok])) > 0.05
