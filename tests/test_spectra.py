"""specutils spectra in and out (payne_lite.spectra): a real APOGEE spectrum as a
``Spectrum`` (vacuum, air, other units, inverse variance) fits as the array call does;
the APOGEE files read by specutils' own loaders fit as this package's reader reads
them; lists, 2-D spectra and collections; what is refused and what is warned of."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import payne_lite as pl
from payne_lite.catalog import read_apogee_fits
from payne_lite.observe.broadening import vacuum_to_air
from payne_lite.spectra import model_spectrum, read_spectra, unpack

specutils = pytest.importorskip("specutils", reason="specutils is not installed")
u = pytest.importorskip("astropy.units")
from astropy.nddata import (  # noqa: E402
    InverseVariance,
    StdDevUncertainty,
    VarianceUncertainty,
)
from astropy.wcs import WCS  # noqa: E402
from specutils import Spectrum, SpectrumCollection  # noqa: E402

COLS = ("Teff", "logg", "[Fe/H]", "[alpha/Fe]", "vmacro", "rv")


@pytest.fixture(scope="module")
def real():
    d = pl.datasets.payne_apogee()
    return d.emulator(), d.combined_spectrum(), d.mask


@pytest.fixture(scope="module")
def array_fit(real):
    emu, s, mask = real
    return pl.fit(s.flux, s.flux_err, emu, mask=mask, wavelength=s.wavelength)


def spectrum(s, mask, *, axis=None, medium="vacuum", **kw):
    meta = {} if medium is None else {"medium": medium}
    return Spectrum(
        flux=np.asarray(s.flux, np.float64) * u.one,
        spectral_axis=s.wavelength * u.AA if axis is None else axis,
        uncertainty=kw.pop("uncertainty", StdDevUncertainty(s.flux_err)),
        mask=mask,
        meta=meta,
        **kw,
    )


def assert_same_fit(got, ref, rtol=0.0):
    for c in COLS:
        np.testing.assert_allclose(got[c], ref[c], rtol=rtol, atol=0, err_msg=c)
        np.testing.assert_allclose(
            got[f"{c}_err"], ref[f"{c}_err"], rtol=max(rtol, 1e-9)
        )
    assert list(got["flags"]) == list(ref["flags"])


def test_real_spectrum_fits_as_the_array_call(real, array_fit):
    emu, s, mask = real
    t = pl.fit(spectrum(s, mask), emu)
    assert_same_fit(t, array_fit)
    assert t.meta["input"] == {
        "kind": "specutils.Spectrum",
        "n_spectra": 1,
        "flux_unit": "dimensionless",
        "medium": "vacuum",
        "medium_from": 'meta["medium"]',
    }
    # in micron with inverse variances: converted, same fit to rounding
    ivar = InverseVariance(1.0 / np.asarray(s.flux_err, np.float64) ** 2)
    t_um = pl.fit(
        spectrum(s, mask, axis=(s.wavelength * u.AA).to(u.um), uncertainty=ivar),
        emulator=emu,
    )
    assert_same_fit(t_um, array_fit, rtol=1e-6)


def test_real_spectrum_in_air(real, array_fit):
    """The same star with its wavelengths converted to air and saying so: the
    instrument converts them back (to 4e-12 A), and the fit is the vacuum one."""
    emu, s, mask = real
    w_air = vacuum_to_air(s.wavelength)
    assert np.max(np.abs(w_air - s.wavelength)) > 4.0  # ~4.1-4.4 A in the H band
    t = pl.fit(spectrum(s, mask, axis=w_air * u.AA, medium="air"), emu)
    assert t.meta["instrument"]["air"] is True
    assert t.meta["input"]["medium"] == "air"
    assert_same_fit(t, array_fit, rtol=1e-7)
    # not stated: vacuum assumed, and said (4 A would be ~80 km/s of rv)
    bare = spectrum(s, mask, axis=w_air * u.AA, medium=None)
    with pytest.warns(UserWarning, match="vacuum is assumed"):
        got = unpack(
            bare, None, emu, mask=None, wavelength=None, instrument=None, cont_deg=0
        )
    assert got[5] is None and np.array_equal(got[4], w_air)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error"
        )  # an instrument given: its air decides, no warning
        got = unpack(bare, None, emu, mask=None, wavelength=None,
                     instrument=pl.Instrument(air=True), cont_deg=0)  # fmt: skip
    assert got[5].air
    # stated air against an instrument that says vacuum
    with pytest.raises(
        ValueError,
        match=r"in air \(meta\[\"medium\"\]\) but the instrument has air=False",
    ):
        pl.fit(
            spectrum(s, mask, axis=w_air * u.AA, medium="air"),
            emu,
            instrument=pl.Instrument(),
        )


def test_apogee_files_through_specutils_loaders(real):
    """specutils' own APOGEE loaders read what payne_lite's reader reads (so the fits
    are the same, as the array call's above); the medium comes from each file's
    header; apStar's flux, in 1e-17 erg/s/cm^2/A, is refused."""
    emu = real[0]
    for star in pl.datasets.apogee_raw().stars:
        ours = read_apogee_fits(star.aspcapstar)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # astropy's unit and FITS-keyword chatter
            theirs = read_spectra(
                Spectrum.read(star.aspcapstar, format="APOGEE aspcapStar")
            )
            raw = Spectrum.read(star.apstar, format="APOGEE apStar")
        assert theirs.medium_from == "APOGEE header (ASPCAP)"
        np.testing.assert_array_equal(theirs.flux, ours.flux)
        np.testing.assert_array_equal(theirs.flux_err, ours.flux_err)
        np.testing.assert_array_equal(theirs.mask, ours.mask)
        np.testing.assert_allclose(theirs.wavelength, ours.wavelength, rtol=1e-12)
        assert read_spectra(raw).medium_from == "APOGEE header (TELESCOP=apo25m)"
        with pytest.raises(ValueError, match=r"not continuum-normalised"):
            pl.fit(raw, emu)


def test_uncertainty_kinds_and_units():
    wave = np.linspace(15200.0, 15210.0, 6) * u.AA
    flux = np.linspace(0.9, 1.0, 6) * u.one
    sigma = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06])
    ivar = 1.0 / sigma**2
    ivar[2] = 0.0
    for unc in (
        StdDevUncertainty(sigma),
        VarianceUncertainty(sigma**2),
        InverseVariance(ivar),
        StdDevUncertainty(sigma * 100.0, unit=u.percent),
    ):
        got = read_spectra(Spectrum(flux=flux, spectral_axis=wave, uncertainty=unc))
        want = sigma.copy()
        if isinstance(unc, InverseVariance):
            want[2] = np.inf  # zero inverse variance: zero weight
        np.testing.assert_allclose(got.flux_err, want, rtol=1e-12)
    # flux in percent: values and errors converted to the first spectrum's unit
    pct = Spectrum(
        flux=flux.to(u.percent),
        spectral_axis=wave,
        uncertainty=StdDevUncertainty(sigma * 100),
    )
    both = read_spectra(
        [
            Spectrum(
                flux=flux, spectral_axis=wave, uncertainty=StdDevUncertainty(sigma)
            ),
            pct,
        ]
    )
    np.testing.assert_allclose(both.flux[1], flux.value, rtol=1e-12)
    np.testing.assert_allclose(both.flux_err[1], sigma, rtol=1e-12)
    # a frequency axis converts, but decreases as a wavelength
    freq = wave.to(u.THz, equivalencies=u.spectral())[::-1]
    with pytest.raises(ValueError, match="does not increase as a wavelength"):
        read_spectra(
            Spectrum(
                flux=flux, spectral_axis=freq, uncertainty=StdDevUncertainty(sigma)
            )
        )
    with pytest.raises(ValueError, match="has no uncertainty"):
        read_spectra(Spectrum(flux=flux, spectral_axis=wave))


def test_medium_from_wcs_and_mixed_media():
    flux = np.ones(5)
    for ctype, medium in (("AWAV", "air"), ("WAVE", "vacuum")):
        w = WCS(naxis=1)
        w.wcs.ctype, w.wcs.crval, w.wcs.cdelt, w.wcs.crpix = (
            [ctype],
            [1.5e-6],
            [1e-10],
            [1],
        )
        w.wcs.cunit = ["m"]
        sp = Spectrum(
            flux=flux * u.one, wcs=w, uncertainty=StdDevUncertainty(flux * 0.01)
        )
        got = read_spectra(sp)
        assert (got.medium, got.medium_from) == (medium, f"axis type {ctype!r}")
        np.testing.assert_allclose(got.wavelength, 15000.0 + np.arange(5), rtol=1e-12)
    wave = np.arange(5.0) + 15000.0
    mk = lambda m: Spectrum(  # noqa: E731
        flux=flux * u.one,
        spectral_axis=wave * u.AA,
        uncertainty=StdDevUncertainty(flux),
        meta={"medium": m},
    )
    with pytest.raises(ValueError, match="mix air and vacuum"):
        read_spectra([mk("air"), mk("vacuum")])
    with pytest.raises(ValueError, match='must be "air" or "vacuum"'):
        read_spectra(mk("glass"))


def test_lists_collections_and_model_spectra(real, array_fit):
    """Two copies of the real star as a list, a 2-D Spectrum and a collection: each
    fits as the (2, P) array call; the second with half its pixels dropped gives a
    padded per-spectrum grid. model_spectrum returns the model on the input's axes."""
    emu, s, mask = real
    one = spectrum(s, mask)
    ref = pl.fit(np.stack([s.flux] * 2), np.stack([s.flux_err] * 2), emu, mask=mask,
                 wavelength=s.wavelength, return_model=True)  # fmt: skip
    err2 = StdDevUncertainty(np.stack([s.flux_err] * 2))
    two_d = Spectrum(
        flux=np.stack([s.flux] * 2) * u.one,
        spectral_axis=s.wavelength * u.AA,
        uncertainty=err2,
        mask=np.stack([mask] * 2),
        meta={"medium": "vacuum"},
    )
    coll = SpectrumCollection(
        flux=np.stack([s.flux] * 2) * u.one,
        spectral_axis=np.stack([s.wavelength] * 2) * u.AA,
        uncertainty=err2,
        mask=np.stack([mask] * 2),
        meta={"medium": "vacuum"},
    )
    for obj, kind in (
        (two_d, "Spectrum"),
        (coll, "SpectrumCollection"),
        ([one, one], "list"),
    ):
        t = pl.fit(obj, emu, return_model=True)
        assert t.meta["input"]["n_spectra"] == 2, kind
        assert_same_fit(t, ref)
        model = model_spectrum(t, obj)
        flux_m = (
            np.stack([m.flux.value for m in model])
            if kind == "list"
            else model.flux.value
        )
        np.testing.assert_array_equal(flux_m, np.asarray(ref["model_flux"]))
    assert_same_fit(ref[:1], array_fit)
    # the model describes the data: its chi2 over the fitted pixels is the table's
    m = model_spectrum(t, [one, one])[0]
    assert m.spectral_axis.unit == u.AA and np.array_equal(
        m.spectral_axis.value, s.wavelength
    )
    good = ~mask & np.isfinite(s.flux_err) & (s.flux_err > 0)
    good &= np.isfinite(m.flux.value)  # the model is undefined off the grid
    chi2_data = np.sum(((s.flux - m.flux.value) / s.flux_err)[good] ** 2)
    assert chi2_data == pytest.approx(
        ref["chi2"][0], rel=0.2
    )  # + emulator error in the fit
    # ragged: padded with NaN wavelengths (masked) and read back at their lengths
    half = Spectrum(flux=one.flux[:3000], spectral_axis=one.spectral_axis[:3000],
                    uncertainty=StdDevUncertainty(s.flux_err[:3000]), mask=mask[:3000],
                    meta={"medium": "vacuum"})  # fmt: skip
    rag = read_spectra([one, half])
    assert rag.wavelength.shape == (2, s.flux.size) and rag.lengths == (
        s.flux.size,
        3000,
    )
    assert np.isnan(rag.wavelength[1, 3000:]).all() and rag.mask[1, 3000:].all()


def test_refused_arguments(real):
    emu, s, mask = real
    sp = spectrum(s, mask)
    with pytest.raises(ValueError, match="flux_err is taken from the spectrum"):
        pl.fit(sp, s.flux_err, emu)
    with pytest.raises(ValueError, match="wavelength is taken from the spectrum"):
        pl.fit(sp, emulator=emu, wavelength=s.wavelength)
    with pytest.raises(TypeError, match="an emulator is required"):
        pl.fit(sp)
    with pytest.raises(TypeError, match="flux_err is required with array flux"):
        pl.fit(s.flux, emulator=emu)
